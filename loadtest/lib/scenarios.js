// What the virtual users do, one request per iteration, and the pieces the
// profiles are built from: scenario definitions and their thresholds.
//
// Every request is tagged with its scenario (k6 does it), so each
// scenario's thresholds see only its own requests; the setup stage's
// requests carry no scenario and count in none.
import http from 'k6/http';
import { check } from 'k6';
import exec from 'k6/execution';
import { Trend } from 'k6/metrics';
import { cachedCustomerJwt, customerJwt, stripeSignature } from './auth.js';
import { activationBody } from './api.js';
import { APP_ID, BASE_URL, METRICS_URL, STRIPE_WEBHOOK_SECRET } from './config.js';

const CONSUME_URL = `${BASE_URL}/api/v1/customer/tokens/consume`;
const USAGE_URL = `${BASE_URL}/api/v1/customer/tokens/usage`;
const WEBHOOK_URL = `${BASE_URL}/api/v1/webhooks/stripe`;

// What the service reports about itself, scraped from /metrics: the
// post-processing charts them (either may be missing).
const rss = new Trend('service_rss_bytes');
const lag = new Trend('flusher_lag_seconds');

// ---- scenario definitions ------------------------------------------------

// An open model: `rate` requests a second whatever the latency, from a
// pool of `vus` virtual users (each with its own connections).
export function constantRate(fn, rate, duration, vus, maxVUs) {
  return {
    executor: 'constant-arrival-rate',
    exec: fn,
    rate,
    timeUnit: '1s',
    duration,
    preAllocatedVUs: vus,
    maxVUs: maxVUs || vus,
  };
}

// One request every `interval` (a k6 duration), as a Prometheus scrape.
export function every(fn, interval, duration) {
  return {
    executor: 'constant-arrival-rate',
    exec: fn,
    rate: 1,
    timeUnit: interval,
    duration,
    preAllocatedVUs: 1,
    maxVUs: 2,
  };
}

// The success criteria of a scenario as thresholds that fail the run:
// p95 under `p95Ms`, the share of failed requests (any status but 2xx/3xx,
// or no answer) under `maxErrorRate` (0: none at all), and every planned
// request sent (none dropped for want of a free virtual user).
export function criteria(scenario, p95Ms, maxErrorRate) {
  return {
    [`http_req_duration{scenario:${scenario}}`]: [`p(95)<${p95Ms}`],
    [`http_req_failed{scenario:${scenario}}`]: [maxErrorRate > 0 ? `rate<${maxErrorRate}` : 'rate==0'],
    [`checks{scenario:${scenario}}`]: [maxErrorRate > 0 ? `rate>${1 - maxErrorRate}` : 'rate==1'],
    [`dropped_iterations{scenario:${scenario}}`]: ['count==0'],
  };
}

// ---- requests --------------------------------------------------------------

function pick(list, i) {
  return list[i % list.length];
}

// A widget's or backend's consume body: a shopper's session spans a few
// uses; metadata as the specification's example.
function consumeBody(appId, i) {
  const shopper = exec.vu.idInTest;
  return JSON.stringify({
    app_id: appId,
    session_id: `sess-${shopper}-${Math.floor(exec.vu.iterationInInstance / 5)}`,
    metadata: {
      user_agent: 'Mozilla/5.0 (k6 load test)',
      ip_address: `10.${(shopper >> 8) & 255}.${shopper & 255}.${i % 250 + 1}`,
      product_id: `frame-${i % 500}`,
      processing_time_ms: 800 + (i % 900),
    },
  });
}

// One consume by customer number `i` (mod the customers), with an embed
// key or a JWT: `auth` is `jwt`, `key` or `both` (each customer uses
// both, in turn). `tags` are added to the request's.
export function consumeOnce(data, auth, tags) {
  const i = exec.scenario.iterationInTest;
  const customers = data.consumers;
  const c = pick(customers, i);
  const viaKey = auth === 'key' || (auth === 'both' && Math.floor(i / customers.length) % 2 === 1);
  const headers = viaKey
    ? { 'Content-Type': 'application/json', 'X-API-Key': c.key }
    : { 'Content-Type': 'application/json', Authorization: `Bearer ${cachedCustomerJwt(c.id, data.iat)}` };
  const res = http.post(CONSUME_URL, consumeBody(data.appId || APP_ID, i), {
    headers,
    responseType: 'none',
    tags: { auth: viaKey ? 'key' : 'jwt', ...tags },
  });
  check(res, { 'consume: 200': (r) => r.status === 200 });
  return res;
}

// One activation, each on a customer of its own (iteration i activates for
// customer i), so the per-customer activation limit is never reached.
export function activateOnce(data) {
  const i = exec.scenario.iterationInTest;
  const list = data.activationCustomers;
  if (i >= list.length) {
    // More iterations than planned (k6 may start one more): activating
    // again answers the same activation, still one request for a customer
    // well under its limit.
    console.warn(`activation ${i}: beyond the ${list.length} prepared customers; reusing one`);
  }
  const id = pick(list, i);
  const res = http.post(`${BASE_URL}/api/v1/customer/apps/${data.activateApp}/activate`,
    activationBody(data.activateApp), {
      headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${customerJwt(id, data.iat)}` },
    });
  check(res, {
    'activate: 200': (r) => r.status === 200,
    'activate: active': (r) => r.status !== 200 || r.json('app.status') === 'active',
  });
}

// A merchant's dashboard reading its usage report.
export function readUsage(data) {
  const c = pick(data.consumers, exec.scenario.iterationInTest);
  const res = http.get(USAGE_URL, {
    headers: { Authorization: `Bearer ${cachedCustomerJwt(c.id, data.iat)}` },
  });
  check(res, {
    'usage: 200': (r) => r.status === 200,
    'usage: current period': (r) => r.status !== 200 || r.json('current_period') !== undefined,
  });
}

// Prometheus scraping /metrics. Records the process's resident memory
// (`process_resident_memory_bytes`) and the flusher's lag (the largest
// `usage_stream_oldest_unflushed_seconds` over the shards), when present.
export function scrape() {
  const res = http.get(METRICS_URL, { tags: { name: 'metrics' } });
  check(res, { 'metrics: 200': (r) => r.status === 200 });
  if (res.status !== 200 || typeof res.body !== 'string') return;
  let worst = -1;
  for (const line of res.body.split('\n')) {
    if (line.startsWith('process_resident_memory_bytes ')) {
      rss.add(Number(line.split(' ')[1]));
    } else if (line.startsWith('usage_stream_oldest_unflushed_seconds')) {
      const v = Number(line.slice(line.lastIndexOf(' ') + 1));
      if (v > worst) worst = v;
    }
  }
  if (worst >= 0) lag.add(worst);
}

// Stripe telling us a token purchase succeeded: a new payment intent each
// time, for one of the customers, signed as Stripe signs it.
export function paymentSucceeded(data) {
  const i = exec.scenario.iterationInTest;
  const c = pick(data.consumers, i * 7 + 3);
  const now = Math.floor(Date.now() / 1000);
  const body = JSON.stringify({
    id: `evt_lt_${data.run}_${i}`,
    object: 'event',
    type: 'payment_intent.succeeded',
    created: now,
    data: {
      object: {
        id: `pi_lt_${data.run}_${i}`,
        object: 'payment_intent',
        amount: 250,
        amount_received: 250,
        currency: 'usd',
        status: 'succeeded',
        metadata: { customer_id: c.id, tokens: '500' },
      },
    },
  });
  const res = http.post(WEBHOOK_URL, body, {
    headers: {
      'Content-Type': 'application/json',
      'Stripe-Signature': stripeSignature(STRIPE_WEBHOOK_SECRET, body, now),
    },
  });
  check(res, {
    'webhook: 200': (r) => r.status === 200,
    'webhook: applied': (r) => r.status !== 200 || r.json('outcome') === 'applied',
  });
}
