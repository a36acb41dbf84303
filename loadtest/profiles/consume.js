// The specification's token-consumption load test: 1,000 concurrent
// virtual users, 100 consumes a second for 10 minutes; fails unless p95 <
// 200 ms with no error. loadtest/run.sh consume; variables in
// loadtest/README.md (CONSUME_*).
import { checkService, runId } from '../lib/api.js';
import { APP_ID, SUMMARY_TREND_STATS } from '../lib/config.js';
import { consumeOnce } from '../lib/scenarios.js';
import { consumption, SETUP_TIMEOUT } from '../lib/spec.js';

const spec = consumption(1);

export const options = {
  scenarios: { consume: spec.scenario },
  thresholds: spec.thresholds,
  setupTimeout: SETUP_TIMEOUT,
  summaryTrendStats: SUMMARY_TREND_STATS,
};

export function setup() {
  checkService();
  const run = runId();
  const iat = Math.floor(Date.now() / 1000);
  return { run, iat, appId: APP_ID, auth: spec.auth, consumers: spec.setup(run, iat) };
}

export function consume(data) {
  consumeOnce(data, data.auth);
}
