#!/usr/bin/env bash
# Fuzzes the contract: schemathesis generates requests from /openapi.json
# (valid and invalid ones) and checks every answer against the document:
# never a 5xx, no status the operation does not document, bodies and
# content types as documented.
#
#   scripts/check-contract.sh       # BIN=target/debug/connected-apps (built if missing)
#
# It starts the service on a port and database of its own (Redis and
# PostgreSQL from scripts/services.sh, Stripe from scripts/stripe-standin.py),
# makes a customer with every app activated, runs schemathesis three
# times, each with the credentials its routes take: the customer's token (every customer scope), an operator
# token, and none (the webhook, the probes, /metrics, the document), and
# lints what /metrics then holds with promtool.
# CONTRACT_MAX_EXAMPLES (default 40) bounds the cases per operation.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN:-target/debug/connected-apps}
port=${CONTRACT_PORT:-8097}
base=http://127.0.0.1:$port
examples=${CONTRACT_MAX_EXAMPLES:-40}
work=$(mktemp -d)
log() { echo "check-contract: $*" >&2; }

if ! command -v schemathesis >/dev/null; then
  log "installing schemathesis (PyPI)"
  python3 -m pip install --quiet --break-system-packages schemathesis 2>/dev/null ||
    python3 -m pip install --quiet schemathesis
  hash -r
fi
[ -x "$bin" ] || cargo build --locked --bin connected-apps
scripts/services.sh >/dev/null

export DATABASE_URL=postgres://postgres:postgres@127.0.0.1:5432/connected_apps_contract
export REDIS_URL=redis://127.0.0.1:6379/0 REDIS_KEY_PREFIX=contract PORT=$port BIND_ADDRESS=127.0.0.1
# Generated requests arrive far faster than any shop's; the limiters would
# answer most with 429 and the fuzzing would test nothing else.
export RATE_LIMIT_CONSUME_PER_HOUR=0 RATE_LIMIT_APPS_PER_HOUR=0 \
  RATE_LIMIT_ACTIVATE_PER_HOUR=0 RATE_LIMIT_BILLING_PER_HOUR=0
# Stripe is the stand-in (scripts/stripe-standin.py): the billing routes
# answer as they would against Stripe, with whole objects, not just 503.
stripe_port=${CONTRACT_STRIPE_PORT:-12111}
export STRIPE_API_BASE=http://127.0.0.1:$stripe_port/ STRIPE_SECRET_KEY=sk_test_contract
export STRIPE_WEBHOOK_SECRET=whsec_contract_local_only LOG_LEVEL=error

python3 scripts/stripe-standin.py --port "$stripe_port" >"$work/stripe.log" 2>&1 &
stripe=$!
"$bin" migrate >"$work/service.log" 2>&1
"$bin" serve >>"$work/service.log" 2>&1 &
service=$!
trap 'kill $service $stripe 2>/dev/null || true; wait $service $stripe 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 300); do
  curl -fs "$base/health/ready" >/dev/null && break
  kill -0 "$service" 2>/dev/null || { cat "$work/service.log" >&2; exit 1; }
  sleep 0.1
done

admin=$("$bin" token --admin --ttl 7200)
customer=$(curl -fsS "$base/api/v1/admin/customers" -H "Authorization: Bearer $admin" \
  -H 'Content-Type: application/json' \
  -d "{\"name\":\"Contract Optics\",\"email\":\"contract-$(date +%s%N)@example.com\",\"plan_id\":\"enterprise\"}" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
shop=$("$bin" token --sub "$customer" --ttl 7200)
for app in $(curl -fsS "$base/api/v1/apps" -H "Authorization: Bearer $shop" |
  python3 -c 'import json, sys; print(" ".join(a["id"] for a in json.load(sys.stdin)["apps"]))'); do
  curl -fsS -o /dev/null -X POST "$base/api/v1/customer/apps/$app/activate" -H "Authorization: Bearer $shop"
done

# A merchant on the starter plan (1,000 tokens) who uses 85 % and then all
# of it: a first charge, and two usage alert crossings for the flusher and
# the delivery worker to record while the fuzzing runs (their series are
# linted below).
starter=$(curl -fsS "$base/api/v1/admin/customers" -H "Authorization: Bearer $admin" \
  -H 'Content-Type: application/json' \
  -d "{\"name\":\"Starter Optics\",\"email\":\"starter-$(date +%s%N)@example.com\",\"plan_id\":\"starter\"}" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
starter=$("$bin" token --sub "$starter" --ttl 7200)
curl -fsS -o /dev/null -X POST "$base/api/v1/customer/apps/rec-001/activate" -H "Authorization: Bearer $starter"
for tokens in 850 150; do
  curl -fsS -o /dev/null "$base/api/v1/customer/tokens/consume" -H "Authorization: Bearer $starter" \
    -H 'Content-Type: application/json' -d "{\"app_id\":\"rec-001\",\"tokens_consumed\":$tokens}"
done

# Every documented answer is a valid one: the checks that compare answers
# with the document, and "no 5xx" (503 is documented where a dependency
# can be down).
checks=not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection
run() {
  local what=$1
  shift
  log "$what"
  schemathesis run "$base/openapi.json" --checks "$checks" --max-examples "$examples" \
    --phases examples,coverage,fuzzing --seed 20261202 --no-color --workers 2 \
    --suppress-health-check too_slow,filter_too_much \
    --report junit --report-dir "${CONTRACT_REPORT_DIR:-target/contract}/$what" "$@"
}
started=$(date +%s)
failed=
run customer -H "Authorization: Bearer $shop" \
  --include-path-regex '^/api/v1/(customer/|apps$)' || failed="$failed customer"
run operator -H "Authorization: Bearer $admin" --include-path-regex '^/api/v1/admin/' || failed="$failed operator"
run anonymous --include-path-regex '^/(api/v1/webhooks/|health/|metrics$|openapi\.json$)' || failed="$failed anonymous"
# What the fuzzing left in /metrics: valid for Prometheus (promtool's lint:
# names, types, HELP on every series), and every series API.md names there.
if ! command -v promtool >/dev/null; then
  log "installing promtool (Debian's prometheus)"
  apt-get install -y -qq prometheus >/dev/null
fi
curl -fsS "$base/metrics" >"$work/metrics"
promtool check metrics <"$work/metrics" || failed="$failed metrics"
for series in billing_mrr_cents customers_active app_activations tokens_consumed_total \
  period_usage_ratio activations_total time_to_first_consume_seconds billing_sync_total \
  stripe_webhook_events_total usage_alerts_total usage_alert_deliveries_total; do
  grep -q "^# TYPE $series " "$work/metrics" || { log "/metrics lacks $series"; failed="$failed metrics"; }
done
if [ -n "$failed" ]; then
  log "FAILED:$failed (reports in ${CONTRACT_REPORT_DIR:-target/contract})"
  exit 1
fi
log "no 5xx, every answer as documented ($(($(date +%s) - started)) s)"
