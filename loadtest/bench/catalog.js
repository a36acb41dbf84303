// Browse the app catalog, as merchant dashboards do, at a fixed arrival rate:
// the whole list, filters, a search and a second page, in turn.
//
//   BASE_URL=http://127.0.0.1:8000 TOKEN=<jwt with apps:read> RATE=1000 DURATION=30s \
//     k6 run loadtest/bench/catalog.js
//
// Fails (non-zero exit) when p95 exceeds 5 ms or any request errors. The
// service under test needs RATE_LIMIT_APPS_PER_HOUR=0 (the catalog's limit
// is 100 per customer and hour); loadtest/bench/catalog-setup.sh prints a token.
import http from 'k6/http';
import { check } from 'k6';

const base = `${__ENV.BASE_URL || 'http://127.0.0.1:8000'}/api/v1/apps`;
const params = { headers: { Authorization: `Bearer ${__ENV.TOKEN}` } };
const queries = [
  '',
  '?category=ai_vision',
  '?pricing_tier=starter',
  '?q=frame',
  '?per_page=3&page=2',
  '?status=available&per_page=100',
];

export const options = {
  scenarios: {
    catalog: {
      executor: 'constant-arrival-rate',
      rate: Number(__ENV.RATE || 1000),
      timeUnit: '1s',
      duration: __ENV.DURATION || '30s',
      preAllocatedVUs: 20,
      maxVUs: 200,
    },
  },
  thresholds: {
    http_req_failed: ['rate==0'],
    http_req_duration: ['p(95)<5'],
  },
  summaryTrendStats: ['avg', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

export default function () {
  const res = http.get(base + queries[__ITER % queries.length], params);
  check(res, {
    'status 200': (r) => r.status === 200,
    'a page of apps': (r) => Array.isArray(r.json('apps')),
  });
}
