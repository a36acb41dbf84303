// Both of the specification's load tests at once, at a tenth of their
// rates and virtual users, for 30 seconds (SMOKE_DURATION), with their
// success criteria: consume p95 < 200 ms and no error, activate p95 <
// 500 ms and under 1 % errors. CI runs it; loadtest/run.sh smoke.
import { checkService, runId } from '../lib/api.js';
import { APP_ID, SUMMARY_TREND_STATS, duration } from '../lib/config.js';
import { activateOnce, consumeOnce } from '../lib/scenarios.js';
import { activation, consumption, SETUP_TIMEOUT } from '../lib/spec.js';

const length = duration('SMOKE_DURATION', '30s');
const consuming = consumption(0.1, length);
const activating = activation(0.1, length);

export const options = {
  scenarios: { consume: consuming.scenario, activate: activating.scenario },
  thresholds: { ...consuming.thresholds, ...activating.thresholds },
  setupTimeout: SETUP_TIMEOUT,
  summaryTrendStats: SUMMARY_TREND_STATS,
};

export function setup() {
  checkService();
  const run = runId();
  const iat = Math.floor(Date.now() / 1000);
  return {
    run,
    iat,
    appId: APP_ID,
    auth: consuming.auth,
    consumers: consuming.setup(run, iat),
    activateApp: activating.app,
    activationCustomers: activating.setup(run, iat),
  };
}

export function consume(data) {
  consumeOnce(data, data.auth);
}

export function activate(data) {
  activateOnce(data);
}
