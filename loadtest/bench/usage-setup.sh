#!/usr/bin/env bash
# Prepares the usage-report benchmark: a customer on the enterprise plan
# with a year of daily aggregates for all ten apps (3,650 rows), on a
# running service. Prints the customer's token (scope tokens:read).
#
#   BASE_URL=http://127.0.0.1:8000 DATABASE_URL=postgres://… loadtest/bench/usage-setup.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
db=${DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/connected_apps}

. loadtest/bench/lib.sh
customer=$(new_enterprise_customer)
psql -q "$db" -c "INSERT INTO usage_analytics_daily (customer_id, app_id, date, tokens_consumed, events_count, sessions_count, unique_users)
  SELECT '$customer', a.id, d::date, 100 + (random() * 900)::int, 100, 20, 15
  FROM apps a, generate_series(current_date - 364, current_date, '1 day') d" >&2
$bin token --sub "$customer" --scope "tokens:read"
