#!/usr/bin/env bash
# What one consume leaves behind, for the README's capacity model: bytes
# of Redis per retained Idempotency-Key record, per charge record (a
# consume without the key) and per unflushed usage event, and bytes of
# Postgres per ledger row (table and indexes).
#
# Starts the release binary (or BINARY) with the API role only, on PORT
# (8012) against a database and Redis prefix of its own, an enterprise
# customer with vto-001; sends KEYED consumes with an Idempotency-Key each
# and then wrk's key-less consumes for LOAD_SECONDS (10); reads Redis's
# MEMORY USAGE of the keys; then starts a flusher, waits for the streams
# to drain and reads the ledger's sizes.
#
#   cargo build --release && benches/capacity.sh
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${BINARY:-$here/target/release/connected-apps}
port=${PORT:-8012}
keyed=${KEYED:-2000}
command -v wrk >/dev/null || { echo "capacity.sh: wrk is missing (apt-get install wrk)" >&2; exit 2; }
[ -x "$bin" ] || { echo "capacity.sh: $bin is missing (cargo build --release)" >&2; exit 2; }

export DATABASE_URL=${BENCH_DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/bench_capacity}
export REDIS_URL=${BENCH_REDIS_URL:-redis://127.0.0.1:6379/1}
export REDIS_KEY_PREFIX=bench-capacity LOG_LEVEL=warn PORT=$port RATE_LIMIT_CONSUME_PER_HOUR=0
redis() { redis-cli -u "$REDIS_URL" "$@"; }
redis --scan --pattern 'bench-capacity:*' | xargs -r -n 500 redis-cli -u "$REDIS_URL" del >/dev/null
psql -q "${DATABASE_URL%/*}/postgres" -c "DROP DATABASE IF EXISTS ${DATABASE_URL##*/} WITH (FORCE)" 2>/dev/null
"$bin" migrate >/dev/null
"$bin" serve --roles api &
service=$!
trap 'kill $service 2>/dev/null || true' EXIT
base=http://127.0.0.1:$port
for _ in $(seq 100); do curl -fs "$base/health/ready" >/dev/null && break; sleep 0.1; done
. "$here/scripts/customer.sh"
read -r customer token < <(new_customer "$bin" "$base" enterprise)
body='{"app_id":"vto-001","session_id":"sess-1","metadata":{"visitor_id":"visitor-1","processing_time_ms":120.5}}'

# Sum of MEMORY USAGE over the keys matching a pattern, and their count.
memory_of() {
  redis --scan --pattern "$1" | while read -r key; do redis memory usage "$key" samples 0; done |
    awk '{ s += $1; n++ } END { printf "%d %d\n", s, n }'
}

echo "== $keyed consumes, each with its own Idempotency-Key"
# One connection, keep-alive: curl's --next sends the requests in turn.
args=()
for i in $(seq "$keyed"); do
  args+=(--next -s -o /dev/null "$base/api/v1/customer/tokens/consume" -H "Authorization: Bearer $token"
    -H 'Content-Type: application/json' -H "Idempotency-Key: capacity-$i" -d "$body")
done
curl "${args[@]:1}"
read -r bytes count < <(memory_of 'bench-capacity:*:idem:*')
echo "idempotency records: $count, $((bytes / count)) bytes each"

echo "== wrk, ${LOAD_SECONDS:-10} s of consumes without Idempotency-Key"
script=$(mktemp --suffix=.lua)
trap 'kill $service 2>/dev/null || true; rm -f "$script"' EXIT
printf 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.headers["Authorization"] = "Bearer %s"\nwrk.body = [[%s]]\n' \
  "$token" "$body" > "$script"
wrk -t1 -c16 -d"${LOAD_SECONDS:-10}s" -s "$script" "$base/api/v1/customer/tokens/consume" | awk '/requests in/ { print $1 " consumes" }'
read -r bytes count < <(memory_of 'bench-capacity:*:charges:*')
records=$(redis --scan --pattern 'bench-capacity:*:charges:*' | while read -r key; do redis hlen "$key"; done | awk '{ s += $1 } END { print s + 0 }')
echo "charge records (kept ~10 s): $records in $count hashes, $((bytes / records)) bytes each"
read -r bytes count < <(memory_of 'bench-capacity:*:usage')
events=$(redis --scan --pattern 'bench-capacity:*:usage' | while read -r key; do redis xlen "$key"; done | awk '{ s += $1 } END { print s }')
echo "unflushed events: $events in $count streams, $((bytes / events)) bytes each"

echo "== the flusher drains them into the ledger"
kill $service; wait $service 2>/dev/null || true
"$bin" serve --roles flusher &
service=$!
for _ in $(seq 600); do
  [ "$(psql -qtA "$DATABASE_URL" -c 'SELECT count(*) FROM token_usage')" -ge "$events" ] && break
  sleep 1
done
psql -qtA "$DATABASE_URL" -c "
  SELECT format('ledger rows: %s; token_usage %s bytes a row (heap %s, indexes %s)',
    (SELECT count(*) FROM token_usage),
    (SELECT sum(pg_total_relation_size(c.oid))::int8 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
      WHERE i.inhparent = 'token_usage'::regclass) / (SELECT count(*) FROM token_usage),
    (SELECT sum(pg_relation_size(c.oid))::int8 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
      WHERE i.inhparent = 'token_usage'::regclass) / (SELECT count(*) FROM token_usage),
    (SELECT sum(pg_indexes_size(c.oid))::int8 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
      WHERE i.inhparent = 'token_usage'::regclass) / (SELECT count(*) FROM token_usage))"
