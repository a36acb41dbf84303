// Consume at a fixed arrival rate and check the latency budget.
//
//   BASE_URL=http://127.0.0.1:8000 TOKEN=<jwt or ak_ key> RATE=2000 DURATION=30s \
//     k6 run loadtest/bench/consume.js
//
// Fails (non-zero exit) when p95 exceeds 2 ms or any request errors.
import http from 'k6/http';
import { check } from 'k6';

const rate = Number(__ENV.RATE || 2000);
const body = JSON.stringify({
  app_id: __ENV.APP_ID || 'vto-001',
  session_id: 'sess-abc123',
  metadata: {
    user_agent: 'Mozilla/5.0',
    ip_address: '192.168.1.1',
    product_id: 'frame-001',
    processing_time_ms: 1250,
  },
});
const token = __ENV.TOKEN;
const headers = token && token.startsWith('ak_')
  ? { 'Content-Type': 'application/json', 'X-API-Key': token }
  : { 'Content-Type': 'application/json', Authorization: `Bearer ${token}` };

export const options = {
  scenarios: {
    consume: {
      executor: 'constant-arrival-rate',
      rate,
      timeUnit: '1s',
      duration: __ENV.DURATION || '30s',
      // At sub-millisecond latencies a few VUs carry 2,000 requests/s;
      // more only add load-generator jitter to the figures.
      preAllocatedVUs: 20,
      maxVUs: 200,
    },
  },
  discardResponseBodies: true,
  thresholds: {
    http_req_failed: ['rate==0'],
    http_req_duration: ['p(95)<2'],
  },
  summaryTrendStats: ['avg', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

export default function () {
  const res = http.post(`${__ENV.BASE_URL || 'http://127.0.0.1:8000'}/api/v1/customer/tokens/consume`, body, { headers });
  check(res, { 'status is 200': (r) => r.status === 200 });
}
