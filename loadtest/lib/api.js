// The setup stage: customers, activations, grants and embed keys, made
// through the service's public API and its operator endpoints only (no
// database access), so a run works against any deployment whose JWT_SECRET
// it knows. Requests go out in parallel batches of SETUP_PARALLEL.
import http from 'k6/http';
import { adminJwt, customerJwt } from './auth.js';
import { BASE_URL, KEY_RATE_LIMIT, int } from './config.js';

const PARALLEL = int('SETUP_PARALLEL', 16);
const JSON_HEADERS = { 'Content-Type': 'application/json' };

// A tag for this run's customers: their e-mails and the webhooks' ids.
export function runId() {
  return `${Date.now().toString(36)}${Math.floor(Math.random() * 1e6).toString(36)}`;
}

function bearer(token) {
  return { ...JSON_HEADERS, Authorization: `Bearer ${token}` };
}

function fail(what, res) {
  let hint = '';
  if (res.status === 401) {
    hint = ' (401: JWT_SECRET, JWT_ISSUER and JWT_AUDIENCE must be the service\'s)';
  } else if (res.status === 0) {
    hint = ` (no answer from ${BASE_URL}: ${res.error})`;
  } else if (res.status === 429) {
    hint = ' (429: a rate limit of the service; see loadtest/README.md, "Rate limits")';
  }
  throw new Error(`setup: ${what}: HTTP ${res.status} ${String(res.body).slice(0, 300)}${hint}`);
}

// Runs `requests` (k6 batch entries) PARALLEL at a time; every answer must
// have status `want`. Returns the responses in order.
function batched(what, requests, want) {
  const out = [];
  for (let i = 0; i < requests.length; i += PARALLEL) {
    const responses = http.batch(requests.slice(i, i + PARALLEL));
    for (const res of responses) {
      if (res.status !== want) fail(what, res);
      out.push(res);
    }
  }
  return out;
}

// The service is up. (The first operator call then shows whether the
// minted tokens are accepted: a 401 stops the setup naming the variables.)
export function checkService() {
  const ready = http.get(`${BASE_URL}/health/ready`);
  if (ready.status !== 200) fail('GET /health/ready', ready);
}

// The catalog entry of `appId` (its token_cost, pricing_tier), read with
// `token` (a customer's JWT).
export function catalogApp(appId, token) {
  const res = http.get(`${BASE_URL}/api/v1/apps?per_page=100`, { headers: bearer(token) });
  if (res.status !== 200) fail('GET /api/v1/apps', res);
  const app = res.json('apps').find((a) => a.id === appId);
  if (!app) throw new Error(`setup: app ${appId} is not in the catalog`);
  return app;
}

// Creates `count` customers on `plan`; returns their ids.
export function createCustomers(count, plan, label, run, iat) {
  const admin = bearer(adminJwt(iat));
  const requests = [];
  for (let i = 0; i < count; i++) {
    requests.push({
      method: 'POST',
      url: `${BASE_URL}/api/v1/admin/customers`,
      body: JSON.stringify({
        name: `Load test ${label} ${i}`,
        email: `loadtest-${run}-${label}-${i}@loadtest.example`,
        plan_id: plan,
      }),
      params: { headers: admin, tags: { name: 'setup: create customer' } },
    });
  }
  return batched('POST /api/v1/admin/customers', requests, 201).map((r) => r.json('id'));
}

// Grants `tokens` to each customer (purchased tokens, which do not expire).
export function grantTokens(customers, tokens, iat) {
  const admin = bearer(adminJwt(iat));
  batched('POST /api/v1/admin/customers/{id}/grants', customers.map((id) => ({
    method: 'POST',
    url: `${BASE_URL}/api/v1/admin/customers/${id}/grants`,
    body: JSON.stringify({ tokens, reason: 'load test' }),
    params: { headers: admin, tags: { name: 'setup: grant' } },
  })), 201);
}

// The activation body: a configuration the app's schema accepts (every
// field has a default, so an empty one is valid for any app).
export function activationBody(appId) {
  return appId === 'vto-001'
    ? JSON.stringify({ configuration: { widget_placement: 'product_page' } })
    : JSON.stringify({ configuration: {} });
}

// Activates each of `apps` for each customer.
export function activateApps(customers, apps, iat) {
  const requests = [];
  for (const id of customers) {
    const headers = bearer(customerJwt(id, iat));
    for (const app of apps) {
      requests.push({
        method: 'POST',
        url: `${BASE_URL}/api/v1/customer/apps/${app}/activate`,
        body: activationBody(app),
        params: { headers, tags: { name: 'setup: activate' } },
      });
    }
  }
  batched('POST /api/v1/customer/apps/{id}/activate', requests, 200);
}

// One embed key per customer, for `apps`; returns the keys in order.
export function createKeys(customers, apps, rateLimit, iat) {
  return batched('POST /api/v1/customer/api-keys', customers.map((id) => ({
    method: 'POST',
    url: `${BASE_URL}/api/v1/customer/api-keys`,
    body: JSON.stringify({ app_permissions: apps, rate_limit: rateLimit }),
    params: { headers: bearer(customerJwt(id, iat)), tags: { name: 'setup: embed key' } },
  })), 201).map((r) => r.json('key'));
}

// Customers ready to consume `appId` `requests` times between them:
// created on `plan`, the app activated, one embed key each (when `keys`),
// and, on a metered plan whose allowance would run out, a grant covering
// the rest. Returns [{id, key}].
export function prepareConsumers({ count, plan, appId, requests, keys, label, run, iat }) {
  const started = Date.now();
  const ids = createCustomers(count, plan, label, run, iat);
  const app = catalogApp(appId, customerJwt(ids[0], iat));
  activateApps(ids, [appId], iat);
  if (plan !== 'enterprise') {
    const allowance = { starter: 1000, professional: 10000 }[plan] || 0;
    // Even spreading plus a margin for the rounding and the retries.
    const needed = Math.ceil((requests / count) * 1.2 + 10) * app.token_cost;
    if (needed > allowance) grantTokens(ids, Math.min(needed - allowance, 100000000), iat);
  }
  const keyList = keys ? createKeys(ids, [appId], KEY_RATE_LIMIT, iat) : [];
  warmUp(ids, keyList, appId, iat);
  console.log(`setup: ${count} ${plan} customers for ${appId} (${app.token_cost} tokens each)` +
    `${keys ? ' with embed keys' : ''} in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  return ids.map((id, i) => ({ id, key: keyList[i] }));
}


// One consume per customer with its JWT and one with its key, before the
// measured run: the first consume of a customer loads its hot state and
// the first use of a credential verifies it (a JWT's signature, a key's
// record); in a service that has been running, a merchant's have been. The
// load test measures that steady state, not every merchant's first minute.
function warmUp(ids, keyList, appId, iat) {
  const url = `${BASE_URL}/api/v1/customer/tokens/consume`;
  const body = JSON.stringify({ app_id: appId, session_id: 'warm-up' });
  const requests = ids.map((id) => ({
    method: 'POST', url, body, params: { headers: bearer(customerJwt(id, iat)), tags: { name: 'setup: warm-up' } },
  }));
  keyList.forEach((key) => requests.push({
    method: 'POST', url, body,
    params: { headers: { ...JSON_HEADERS, 'X-API-Key': key }, tags: { name: 'setup: warm-up' } },
  }));
  batched('warm-up consume', requests, 200);
}
