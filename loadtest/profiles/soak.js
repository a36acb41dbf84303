// Soak: consumes at a constant rate for an hour (SOAK_DURATION) at
// SOAK_RATE, by default half the highest rate the last stress run
// sustained (run.sh reads it), while /metrics is scraped every
// SCRAPE_INTERVAL for the process's memory and the flusher's lag. The
// thresholds hold the consume's latency and errors; the post-processing
// (report.py) checks that memory and lag stayed flat.
import { checkService, prepareConsumers, runId } from '../lib/api.js';
import { APP_ID, SUMMARY_TREND_STATS, duration, int, num, seconds, str } from '../lib/config.js';
import { consumeOnce, constantRate, criteria, every, scrape as scrapeOnce } from '../lib/scenarios.js';
import { SETUP_TIMEOUT } from '../lib/spec.js';

const rate = int('SOAK_RATE', 500);
const length = duration('SOAK_DURATION', '1h');

export const options = {
  scenarios: {
    soak: constantRate('soak', rate, length, int('SOAK_VUS', 100), int('SOAK_MAX_VUS', 1000)),
    scrape: every('scrape', duration('SCRAPE_INTERVAL', '5s'), length),
  },
  thresholds: {
    ...criteria('soak', num('SOAK_P95_MS', 200), num('SOAK_MAX_ERROR_RATE', 0)),
    'http_req_failed{scenario:scrape}': ['rate==0'],
  },
  setupTimeout: SETUP_TIMEOUT,
  summaryTrendStats: SUMMARY_TREND_STATS,
};

export function setup() {
  checkService();
  const run = runId();
  const iat = Math.floor(Date.now() / 1000);
  console.log(`soak: ${rate}/s for ${length}`);
  return {
    run,
    iat,
    appId: APP_ID,
    auth: str('SOAK_AUTH', 'both'),
    consumers: prepareConsumers({
      count: int('SOAK_CUSTOMERS', 100),
      plan: str('SOAK_PLAN', 'enterprise'),
      appId: APP_ID,
      requests: rate * seconds(length),
      keys: str('SOAK_AUTH', 'both') !== 'jwt',
      label: 'soak',
      run,
      iat,
    }),
  };
}

export function soak(data) {
  consumeOnce(data, data.auth);
}

export function scrape() {
  scrapeOnce();
}
