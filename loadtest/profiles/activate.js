// The specification's app-activation load test: 100 concurrent virtual
// users, 20 activations a second for 5 minutes, each on a customer of its
// own; fails unless p95 < 500 ms with under 1 % errors.
// loadtest/run.sh activate; variables in loadtest/README.md (ACTIVATE_*).
import { checkService, runId } from '../lib/api.js';
import { SUMMARY_TREND_STATS } from '../lib/config.js';
import { activateOnce } from '../lib/scenarios.js';
import { activation, SETUP_TIMEOUT } from '../lib/spec.js';

const spec = activation(1);

export const options = {
  scenarios: { activate: spec.scenario },
  thresholds: spec.thresholds,
  setupTimeout: SETUP_TIMEOUT,
  summaryTrendStats: SUMMARY_TREND_STATS,
};

export function setup() {
  checkService();
  const run = runId();
  const iat = Math.floor(Date.now() / 1000);
  return { run, iat, activateApp: spec.app, activationCustomers: spec.setup(run, iat) };
}

export function activate(data) {
  activateOnce(data);
}
