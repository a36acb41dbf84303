// Mixed: the traffic of a working day, all at once.
//
//   widgets     embed keys consuming APP_ID in shoppers' browsers,
//               WIDGETS_RATE a second (300)
//   dashboards  merchants' dashboards reading their usage report with
//               JWTs, DASHBOARDS_RATE a second (10)
//   scrape      Prometheus scraping /metrics every SCRAPE_INTERVAL (5 s)
//   webhooks    Stripe delivering signed payment_intent.succeeded events,
//               a new payment intent each, WEBHOOKS_RATE a second (2);
//               needs STRIPE_WEBHOOK_SECRET, the service's (skipped without)
//
// for MIXED_DURATION (5 min), over MIXED_CUSTOMERS merchants (200: 1.5
// consumes a second each, under the default limit of 2.8). Each scenario
// has its own thresholds (p95 and errors).
import { checkService, prepareConsumers, runId } from '../lib/api.js';
import { APP_ID, STRIPE_WEBHOOK_SECRET, SUMMARY_TREND_STATS, duration, int, num, seconds, str } from '../lib/config.js';
import {
  consumeOnce, constantRate, criteria, every, paymentSucceeded, readUsage, scrape as scrapeOnce,
} from '../lib/scenarios.js';
import { SETUP_TIMEOUT } from '../lib/spec.js';

const length = duration('MIXED_DURATION', '5m');
const widgetsRate = int('WIDGETS_RATE', 300);
const webhooksRate = num('WEBHOOKS_RATE', 2);

const scenarios = {
  widgets: constantRate('widgets', widgetsRate, length, int('WIDGETS_VUS', 50), int('WIDGETS_MAX_VUS', 500)),
  dashboards: constantRate('dashboards', int('DASHBOARDS_RATE', 10), length, 10, 100),
  scrape: every('scrape', duration('SCRAPE_INTERVAL', '5s'), length),
};
const thresholds = {
  ...criteria('widgets', num('WIDGETS_P95_MS', 200), 0),
  ...criteria('dashboards', num('DASHBOARDS_P95_MS', 500), 0),
  ...criteria('scrape', num('SCRAPE_P95_MS', 1000), 0),
};
if (STRIPE_WEBHOOK_SECRET && webhooksRate > 0) {
  // Arrival rates are whole numbers per time unit: 2/s is 120/min.
  scenarios.webhooks = {
    ...constantRate('webhooks', Math.round(webhooksRate * 60), length, 5, 50),
    timeUnit: '1m',
  };
  Object.assign(thresholds, criteria('webhooks', num('WEBHOOKS_P95_MS', 1000), 0));
}

export const options = { scenarios, thresholds, setupTimeout: SETUP_TIMEOUT, summaryTrendStats: SUMMARY_TREND_STATS };

export function setup() {
  checkService();
  if (!scenarios.webhooks) {
    console.warn('mixed: no STRIPE_WEBHOOK_SECRET (or WEBHOOKS_RATE=0): the webhooks scenario is skipped');
  }
  const run = runId();
  const iat = Math.floor(Date.now() / 1000);
  return {
    run,
    iat,
    appId: APP_ID,
    consumers: prepareConsumers({
      count: int('MIXED_CUSTOMERS', 200),
      plan: str('MIXED_PLAN', 'professional'),
      appId: APP_ID,
      requests: widgetsRate * seconds(length),
      keys: true,
      label: 'mixed',
      run,
      iat,
    }),
  };
}

export function widgets(data) {
  consumeOnce(data, 'key');
}

export function dashboards(data) {
  readUsage(data);
}

export function scrape() {
  scrapeOnce();
}

export function webhooks(data) {
  paymentSucceeded(data);
}
