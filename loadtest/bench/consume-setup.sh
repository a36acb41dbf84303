#!/usr/bin/env bash
# Prepares the consume benchmarks: a customer on the enterprise plan
# (unlimited, so nothing runs out) with vto-001 activated and an embed key
# for it, on a running service. Prints `export TOKEN=… KEY=…`.
#
#   BASE_URL=http://127.0.0.1:8000 KEY_RATE_LIMIT=1000000000 loadtest/bench/consume-setup.sh
#
# The service's own limits stay on for a benchmark; raise them so the
# load stays under them (RATE_LIMIT_CONSUME_PER_HOUR, _BURST), and give the
# key a rate_limit above the load (KEY_RATE_LIMIT), or wrk measures 429s.
set -euo pipefail
cd "$(dirname "$0")/../.."

. loadtest/bench/lib.sh
customer=$(new_enterprise_customer)
token=$($bin token --sub "$customer")
curl -sf "$base/api/v1/customer/apps/vto-001/activate" -H "Authorization: Bearer $token" \
  -H 'Content-Type: application/json' -d '{}' >/dev/null
key=$(curl -sf "$base/api/v1/customer/api-keys" -H "Authorization: Bearer $token" \
  -H 'Content-Type: application/json' \
  -d "{\"app_permissions\":[\"vto-001\"],\"rate_limit\":${KEY_RATE_LIMIT:-1000000000}}" |
  sed -E 's/.*"key":"([^"]+)".*/\1/')
echo "export TOKEN=$token KEY=$key"
