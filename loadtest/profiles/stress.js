// Stress: consumes at a rate that steps up until the service no longer
// keeps its latency, to find the highest rate it sustains.
//
// From STRESS_START requests/s (500), up STRESS_STEP (250) every
// STRESS_STEP_DURATION (20 s), to STRESS_MAX (20,000). The run stops as
// soon as the p95 of one window (STRESS_WINDOW, the step by default)
// exceeds STRESS_P95_MS (2 ms), or any request fails: one threshold per
// window (the window's requests carry its number as tag `w`), with
// abortOnFail. The post-processing (report.py) reads the highest rate
// achieved in a window whose p95 held and that had no error from the raw
// series, and writes it to max-rate.txt, from which the soak takes its
// rate. The service's consume limits must be above the load (run.sh
// raises them when it starts the service).
import exec from 'k6/execution';
import { checkService, prepareConsumers, runId } from '../lib/api.js';
import { APP_ID, SUMMARY_TREND_STATS, duration, int, num, seconds, str } from '../lib/config.js';
import { consumeOnce, every, scrape as scrapeOnce } from '../lib/scenarios.js';
import { SETUP_TIMEOUT } from '../lib/spec.js';

const start = int('STRESS_START', 500);
const step = int('STRESS_STEP', 250);
const max = int('STRESS_MAX', 20000);
const stepDuration = duration('STRESS_STEP_DURATION', '20s');
const windowMs = seconds(duration('STRESS_WINDOW', stepDuration)) * 1000;
const limit = num('STRESS_P95_MS', 2);
const delayAbortEval = duration('STRESS_DELAY_ABORT', '30s');

const stages = [{ target: start, duration: stepDuration }];
for (let r = start + step; r < max + step; r += step) {
  const target = Math.min(r, max);
  stages.push({ target, duration: '0s' }, { target, duration: stepDuration });
}
const levels = (stages.length + 1) / 2;
const totalMs = seconds(stepDuration) * 1000 * levels;
// Requests if no level stops the run (for the grants on a metered plan).
const planned = stages.filter((s) => s.duration !== '0s')
  .reduce((n, s) => n + s.target * seconds(stepDuration), 0);

const thresholds = {
  'http_req_failed{scenario:stress}': [{ threshold: 'rate==0', abortOnFail: true, delayAbortEval }],
  'http_req_duration{scenario:stress}': ['max>=0'], // listed in the summary
};
for (let w = 0; w * windowMs < totalMs; w++) {
  thresholds[`http_req_duration{w:${w}}`] = [
    { threshold: `p(95)<${limit}`, abortOnFail: true, delayAbortEval },
  ];
}

export const options = {
  scenarios: {
    stress: {
      executor: 'ramping-arrival-rate',
      exec: 'stress',
      startRate: start,
      timeUnit: '1s',
      stages,
      preAllocatedVUs: int('STRESS_VUS', 100),
      maxVUs: int('STRESS_MAX_VUS', 1000),
    },
    scrape: every('scrape', duration('SCRAPE_INTERVAL', '5s'), `${Math.ceil(totalMs / 1000)}s`),
  },
  thresholds,
  setupTimeout: SETUP_TIMEOUT,
  summaryTrendStats: SUMMARY_TREND_STATS,
};

export function setup() {
  checkService();
  const run = runId();
  const iat = Math.floor(Date.now() / 1000);
  console.log(`stress: ${start}/s up by ${step}/s every ${stepDuration} to ${max}/s; ` +
    `stops when a window's p95 passes ${limit} ms or a request fails`);
  return {
    run,
    iat,
    appId: APP_ID,
    auth: str('STRESS_AUTH', 'both'),
    consumers: prepareConsumers({
      count: int('STRESS_CUSTOMERS', 100),
      plan: str('STRESS_PLAN', 'enterprise'),
      appId: APP_ID,
      requests: planned,
      keys: str('STRESS_AUTH', 'both') !== 'jwt',
      label: 'stress',
      run,
      iat,
    }),
  };
}

export function stress(data) {
  const w = Math.floor((Date.now() - exec.scenario.startTime) / windowMs);
  consumeOnce(data, data.auth, { w: String(w) });
}

export function scrape() {
  scrapeOnce();
}
