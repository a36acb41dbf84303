// The specification's two load tests ("Load Tests" in SPEC.md), as pieces
// the `consume`, `activate` and `smoke` profiles are built from.
//
//   token_consumption: 1000 concurrent users, 100 requests/s, 10 minutes,
//                      p95 < 200 ms, 0 % errors
//   app_activation:    100 concurrent, 20 requests/s, 5 minutes,
//                      p95 < 500 ms, < 1 % errors
//
// `scale` multiplies the rates and the virtual users (smoke runs both at a
// tenth); the criteria stay the specification's.
import { createCustomers, prepareConsumers } from './api.js';
import { duration, num, seconds, str } from './config.js';
import { constantRate, criteria } from './scenarios.js';

function scaled(name, fallback, scale) {
  return Math.max(1, Math.round(num(name, fallback) * scale));
}

// Token consumption: widgets (embed keys) and app backends (JWTs) of
// CONSUME_CUSTOMERS merchants consuming APP_ID, spread evenly over them so
// each stays under the service's default consume limit (10,000 an hour,
// burst 100): 100/s over 100 customers is 1/s each, the limit 2.8/s.
export function consumption(scale, durationOverride) {
  const rate = scaled('CONSUME_RATE', 100, scale);
  const d = durationOverride || duration('CONSUME_DURATION', '10m');
  const vus = scaled('CONSUME_VUS', 1000, scale);
  const customers = scaled('CONSUME_CUSTOMERS', 100, scale);
  return {
    rate,
    duration: d,
    scenario: constantRate('consume', rate, d, vus),
    thresholds: criteria('consume', num('CONSUME_P95_MS', 200), num('CONSUME_MAX_ERROR_RATE', 0)),
    setup: (run, iat) => prepareConsumers({
      count: customers,
      plan: str('CONSUME_PLAN', 'professional'),
      appId: str('APP_ID', 'vto-001'),
      requests: rate * seconds(d),
      keys: str('CONSUME_AUTH', 'both') !== 'jwt',
      label: 'consume',
      run,
      iat,
    }),
    auth: str('CONSUME_AUTH', 'both'),
  };
}

// App activation: every activation is a new customer's first, so the
// per-customer activation limit (10 an hour) is never what is measured.
// The customers are made in setup, as many as activations are planned.
export function activation(scale, durationOverride) {
  const rate = scaled('ACTIVATE_RATE', 20, scale);
  const d = durationOverride || duration('ACTIVATE_DURATION', '5m');
  const vus = scaled('ACTIVATE_VUS', 100, scale);
  const app = str('ACTIVATE_APP', 'vto-001');
  return {
    rate,
    duration: d,
    app,
    scenario: constantRate('activate', rate, d, vus),
    thresholds: criteria('activate', num('ACTIVATE_P95_MS', 500), num('ACTIVATE_MAX_ERROR_RATE', 0.01)),
    setup: (run, iat) => {
      const started = Date.now();
      // k6 may start an iteration or two beyond rate × duration.
      const count = Math.ceil(rate * seconds(d)) + Math.max(2, Math.ceil(rate));
      const ids = createCustomers(count, str('ACTIVATE_PLAN', 'professional'), 'activate', run, iat);
      console.log(`setup: ${count} customers to activate ${app} in ${((Date.now() - started) / 1000).toFixed(1)} s`);
      return ids;
    },
  };
}

export const SETUP_TIMEOUT = str('SETUP_TIMEOUT', '15m');
