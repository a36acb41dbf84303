// Read the usage report, as dashboards do, at a fixed arrival rate.
//
//   BASE_URL=http://127.0.0.1:8000 TOKEN=<jwt with tokens:read> FROM=2025-12-01 TO=2026-11-30 \
//     RATE=200 DURATION=30s k6 run loadtest/bench/usage.js
//
// Fails (non-zero exit) when p95 exceeds 10 ms or any request errors.
// loadtest/bench/usage-setup.sh prepares a customer with a year of daily rows.
import http from 'k6/http';
import { check } from 'k6';

const url = `${__ENV.BASE_URL || 'http://127.0.0.1:8000'}/api/v1/customer/tokens/usage` +
  (__ENV.FROM ? `?from=${__ENV.FROM}&to=${__ENV.TO}` : '');
const params = { headers: { Authorization: `Bearer ${__ENV.TOKEN}` } };

export const options = {
  scenarios: {
    usage: {
      executor: 'constant-arrival-rate',
      rate: Number(__ENV.RATE || 200),
      timeUnit: '1s',
      duration: __ENV.DURATION || '30s',
      preAllocatedVUs: 10,
      maxVUs: 100,
    },
  },
  thresholds: {
    http_req_failed: ['rate==0'],
    http_req_duration: ['p(95)<10'],
  },
  summaryTrendStats: ['avg', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

export default function () {
  const res = http.get(url, params);
  check(res, {
    'status 200': (r) => r.status === 200,
    'a year of days': (r) => !__ENV.FROM || r.json('daily_usage').length >= 365,
  });
}
