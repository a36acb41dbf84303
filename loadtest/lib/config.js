// Settings read from the environment, with their defaults. Every duration,
// rate and URL of every profile comes through here (loadtest/README.md
// lists them all).

export const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8000').replace(/\/+$/, '');
export const METRICS_URL = __ENV.METRICS_URL || `${BASE_URL}/metrics`;
// The app widgets and backends consume, and its plan.
export const APP_ID = __ENV.APP_ID || 'vto-001';
// Each embed key's own limit, requests an hour (the service allows up to 1e9).
export const KEY_RATE_LIMIT = int('KEY_RATE_LIMIT', 1000000);
export const STRIPE_WEBHOOK_SECRET = __ENV.STRIPE_WEBHOOK_SECRET || '';

// The variable's value as a number, or `fallback` when unset or empty.
export function num(name, fallback) {
  const v = __ENV[name];
  if (v === undefined || v === '') return fallback;
  const n = Number(v);
  if (!Number.isFinite(n)) throw new Error(`${name}=${v} is not a number`);
  return n;
}

export function int(name, fallback) {
  return Math.round(num(name, fallback));
}

export function str(name, fallback) {
  const v = __ENV[name];
  return v === undefined || v === '' ? fallback : v;
}

// A k6 duration ("90s", "10m", "1h30m", "500ms") in seconds.
export function seconds(duration) {
  const re = /(\d+(?:\.\d+)?)(ms|s|m|h)/g;
  let total = 0;
  let matched = '';
  let m;
  while ((m = re.exec(duration)) !== null) {
    total += Number(m[1]) * { ms: 0.001, s: 1, m: 60, h: 3600 }[m[2]];
    matched += m[0];
  }
  if (matched !== duration || matched === '') throw new Error(`not a duration: ${duration}`);
  return total;
}

// A duration variable, checked, as k6 takes it.
export function duration(name, fallback) {
  const d = str(name, fallback);
  seconds(d);
  return d;
}

// The trend statistics every summary shows.
export const SUMMARY_TREND_STATS = ['avg', 'med', 'p(90)', 'p(95)', 'p(99)', 'max', 'count'];
