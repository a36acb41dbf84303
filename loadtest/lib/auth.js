// Credentials the service accepts, made inside k6 so a load test needs no
// other tool: HS256 JWTs signed with JWT_SECRET (as `connected-apps token`
// signs them) and Stripe webhook signatures under STRIPE_WEBHOOK_SECRET.
//
// JWT_SECRET, JWT_ISSUER and JWT_AUDIENCE must be the service's; their
// defaults are the service's development defaults (src/config.rs).
import crypto from 'k6/crypto';
import encoding from 'k6/encoding';

export const JWT_SECRET = __ENV.JWT_SECRET || 'development-only-jwt-secret-change-me-0123456789';
export const JWT_ISSUER = __ENV.JWT_ISSUER || 'varai.com';
export const JWT_AUDIENCE = __ENV.JWT_AUDIENCE || 'connected-apps';
// How long a minted token lives: past the longest run (the soak's hour) by default.
const TTL_SECS = Number(__ENV.TOKEN_TTL_SECS || 6 * 3600);

// Every scope a merchant's dashboard or backend holds.
export const CUSTOMER_SCOPES = ['apps:read', 'apps:activate', 'tokens:consume', 'tokens:read', 'billing:manage'];

const HEADER = encoding.b64encode(JSON.stringify({ alg: 'HS256', typ: 'JWT' }), 'rawurl');

// A JWT for `sub` with `scope`. `iat` defaults to now; pass the same `iat`
// (setup's) from every VU and each customer gets one token, so the
// service's cache of verified tokens holds one entry per customer.
export function mintJwt(sub, scope, iat) {
  const now = iat || Math.floor(Date.now() / 1000);
  const claims = { sub, iss: JWT_ISSUER, aud: JWT_AUDIENCE, iat: now, exp: now + TTL_SECS, scope };
  const signingInput = `${HEADER}.${encoding.b64encode(JSON.stringify(claims), 'rawurl')}`;
  return `${signingInput}.${crypto.hmac('sha256', JWT_SECRET, signingInput, 'base64rawurl')}`;
}

// An operator's token: any subject, scope ["admin"].
export function adminJwt(iat) {
  return mintJwt('00000000-0000-4000-8000-00000000ad01', ['admin'], iat);
}

export function customerJwt(customerId, iat) {
  return mintJwt(customerId, CUSTOMER_SCOPES, iat);
}

// Memoises customer tokens per VU: minting is an HMAC and two JSON
// encodings, cheap, but not free at thousands of requests a second.
const tokens = {};
export function cachedCustomerJwt(customerId, iat) {
  let t = tokens[customerId];
  if (t === undefined) {
    t = customerJwt(customerId, iat);
    tokens[customerId] = t;
  }
  return t;
}

// The `Stripe-Signature` header Stripe sends with `body`:
// t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>.
export function stripeSignature(secret, body, t) {
  const ts = t || Math.floor(Date.now() / 1000);
  return `t=${ts},v1=${crypto.hmac('sha256', secret, `${ts}.${body}`, 'hex')}`;
}
