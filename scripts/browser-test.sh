#!/usr/bin/env bash
# The merchant dashboard (/dashboard) in headless Chromium: Debian's
# chromium, driven by playwright-core, with axe-core for accessibility
# (tests/browser/, versions pinned by its package-lock.json).
#
# Starts the release binary (or BINARY) with every role on port 8097,
# against a database (connected_apps_browser) and a Redis key prefix of
# its own, makes a professional customer with two apps and seeded usage
# through the public API, then runs tests/browser/dashboard.test.mjs at a
# desktop's and a phone's width. A second API process on 8099 has billing
# configured against Stripe's stand-in (scripts/stripe-standin.py, port
# 12113) with a publishable key, for two customers subscribed through it. Screenshots of each state go to
# target/dashboard-screenshots/ (CI keeps them) and are checked: one per
# state and width, at that width, not blank.
#
# Also checks that the dashboard's vendored Chart.js is the npm package's
# file at the pinned version.
#
# Installs chromium (Debian), Node.js and npm when missing.
#
#   cargo build --release && scripts/browser-test.sh
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${BINARY:-$here/target/release/connected-apps}
port=${PORT:-8097}
shots=$here/target/dashboard-screenshots
log() { echo "browser-test: $*" >&2; }
[ -x "$bin" ] || { log "$bin is missing (cargo build --release)"; exit 2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v npm >/dev/null || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
(cd "$here/tests/browser" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
cmp -s "$here/tests/browser/node_modules/chart.js/dist/chart.umd.js" "$here/src/http/dashboard/vendor/chart.umd.js" || {
  log "src/http/dashboard/vendor/chart.umd.js is not chart.js's dist/chart.umd.js at the version tests/browser/package.json pins"
  exit 1
}

export DATABASE_URL=${BROWSER_DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/connected_apps_browser}
export REDIS_KEY_PREFIX=browser LOG_LEVEL=warn PORT=$port
export FLUSH_MAX_AGE_MS=50
# A failed usage alert delivery is retried within the story's wait.
export USAGE_ALERT_RETRY_BASE_MS=300
"$here/scripts/services.sh" >/dev/null
# A clean slate: the stand-in numbers its Stripe objects from 1 each run.
psql -q "${DATABASE_URL%/*}/postgres" -c "DROP DATABASE IF EXISTS ${DATABASE_URL##*/} WITH (FORCE)"
redis-cli --scan --pattern "$REDIS_KEY_PREFIX:*" | xargs -r redis-cli del >/dev/null
"$bin" migrate >/dev/null
"$bin" serve >"$here/target/browser-test-service.log" 2>&1 &
service=$!
stripe_port=12113 billing_port=$((port + 2))
python3 "$here/scripts/stripe-standin.py" --port $stripe_port >"$here/target/browser-test-stripe.log" 2>&1 &
stripe=$!
PORT=$billing_port STRIPE_API_BASE=http://127.0.0.1:$stripe_port/ STRIPE_SECRET_KEY=sk_test_dashboard \
  STRIPE_WEBHOOK_SECRET=whsec_dashboard_local_only STRIPE_PUBLISHABLE_KEY=pk_test_dashboard \
  "$bin" serve --roles api >"$here/target/browser-test-billing.log" 2>&1 &
billing=$!
trap 'kill $service $stripe $billing 2>/dev/null || true' EXIT
base=http://127.0.0.1:$port billing_base=http://127.0.0.1:$billing_port
# waits_for WHAT COMMAND…: until COMMAND succeeds, for 10 s at most.
waits_for() {
  local what=$1
  shift
  for _ in $(seq 100); do "$@" && return; sleep 0.1; done
  log "gave up waiting for $what"
  exit 1
}
for url in "$base" "$billing_base"; do
  waits_for "$url to be ready" curl -fs -o /dev/null "$url/health/ready"
done

# A customer with Virtual Try-On and Eyewear Recommendations, and usage.
. "$here/scripts/customer.sh"
seeded=$(new_customer "$bin" "$base" professional)
read -r customer token <<<"$seeded"
[ -n "$token" ] || { log "could not make the customer"; exit 1; }
auth=(-H "Authorization: Bearer $token" -H 'Content-Type: application/json')
curl -fs "$base/api/v1/customer/apps/rec-001/activate" "${auth[@]}" -d '{"configuration":{}}' >/dev/null
for i in $(seq 7); do
  curl -fs "$base/api/v1/customer/tokens/consume" "${auth[@]}" -d '{"app_id":"vto-001","session_id":"s'$((i % 3))'"}' >/dev/null
done
for i in $(seq 11); do
  curl -fs "$base/api/v1/customer/tokens/consume" "${auth[@]}" -d '{"app_id":"rec-001","session_id":"r'$((i % 4))'"}' >/dev/null
done
# 7 x 5 + 11 x 2 tokens, in the daily aggregates once flushed.
flushed() {
  local report
  report=$(curl -fs "$base/api/v1/customer/tokens/usage" "${auth[@]}") || return 1
  [[ $report == *'"app_id":"rec-001","app_name":"Eyewear Recommendations","tokens_consumed":22,'* &&
    $report == *'"app_id":"vto-001","app_name":"Virtual Try-On","tokens_consumed":35,'* ]]
}
waits_for "the seeded usage in the ledger" flushed
log "customer $customer: 57 tokens used over two apps"

# Two customers (one per width) subscribed to professional through Stripe.
admin=$("$bin" token --admin)
billing_tokens=()
for width in desktop phone; do
  id=$(curl -fs "$billing_base/api/v1/admin/customers" -H "Authorization: Bearer $admin" \
    -H 'Content-Type: application/json' \
    -d '{"name":"Billing Optics","email":"billing-'"$width-$RANDOM$RANDOM"'@example.com"}' |
    grep -o '"id":"[^"]*"' | head -n 1 | cut -d'"' -f4)
  jwt=$("$bin" token --sub "$id")
  curl -fs "$billing_base/api/v1/customer/billing/subscribe" -H "Authorization: Bearer $jwt" \
    -H 'Content-Type: application/json' -d '{"plan_id":"professional","payment_method_id":"pm_card_visa"}' >/dev/null
  billing_tokens+=("$jwt")
done

rm -rf "$shots"
mkdir -p "$shots"
(cd "$here/tests/browser" && BASE_URL=$base TOKEN=$token SCREENSHOTS=$shots \
  BILLING_URL=$billing_base BILLING_TOKENS="${billing_tokens[*]}" node dashboard.test.mjs)
