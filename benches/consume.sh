#!/usr/bin/env bash
# Consume throughput against the ceiling, and CPU per consume, in one run.
#
# Starts the release binary (or BINARY) with ROLES (default `api`; `all`
# for every role) on PORT (default 8010) against a database and Redis
# database of its own, sets up an enterprise customer (unlimited, so
# nothing runs out) with vto-001 active, then:
#
# 1. `../shared/ceiling/compare.sh` with the customer's JWT (ROUNDS, 5 by
#    default; 0 skips it): consume rps against the ceiling's, median ratio;
# 2. CPU per 1,000 consumes of the service, of Redis and of the ceiling
#    server (`thin-consume`), from /proc/<pid>/stat over one wrk run
#    (1 thread, 64 connections, CPU_SECONDS, 8 by default) each, with the
#    script calls and charges per call (`consume_batch_charges`);
#    then the service's resident memory, now and at its peak;
# 3. with PROFILE=1, `perf record` of the service during another wrk run,
#    folded into a flamegraph (inferno, installed on first use) at
#    PROFILE_SVG (default target/consume-flamegraph.svg).
#
# Settings are the defaults a user runs with, except that the consume rate
# limit is lifted (RATE_LIMIT_CONSUME_PER_HOUR=0): a benchmark of one
# customer at tens of thousands of consumes a second would measure 429s.
#
#   cargo build --release && benches/consume.sh
#   ROLES=all benches/consume.sh
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${BINARY:-$here/target/release/connected-apps}
port=${PORT:-8010}
roles=${ROLES:-api}
secs=${CPU_SECONDS:-8}
ceiling=$here/../shared/ceiling
command -v wrk >/dev/null || { echo "consume.sh: wrk is missing (apt-get install wrk)" >&2; exit 2; }
[ -x "$bin" ] || { echo "consume.sh: $bin is missing (cargo build --release)" >&2; exit 2; }

export DATABASE_URL=${BENCH_DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/bench_consume}
export REDIS_URL=${BENCH_REDIS_URL:-redis://127.0.0.1:6379/1}
export REDIS_KEY_PREFIX=bench-consume LOG_LEVEL=warn PORT=$port RATE_LIMIT_CONSUME_PER_HOUR=0
redis-cli -u "$REDIS_URL" --scan --pattern 'bench-consume:*' | xargs -r -n 500 redis-cli -u "$REDIS_URL" del >/dev/null
"$bin" migrate >/dev/null
"$bin" serve --roles "$roles" &
service=$!
trap 'kill $service 2>/dev/null || true' EXIT
base=http://127.0.0.1:$port
for _ in $(seq 100); do curl -fs "$base/health/ready" >/dev/null && break; sleep 0.1; done

. "$here/scripts/customer.sh"
read -r customer token < <(new_customer "$bin" "$base" enterprise)
url=$base/api/v1/customer/tokens/consume
echo "service: $bin serve --roles $roles on $port, commit $(git -C "$here" rev-parse --short HEAD)"

if [ "${ROUNDS:-5}" != 0 ]; then
  echo "== compare.sh"
  "$ceiling/compare.sh" "$url" "Authorization: Bearer $token"
fi

# CPU time of a process in ms (utime + stime, fields 14 and 15, in ticks).
cpu_ms() { awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) * 1000 / hz }' "/proc/$1/stat"; }
wrk_script=$(mktemp --suffix=.lua)
trap 'kill $service 2>/dev/null || true; rm -f "$wrk_script"' EXIT
{
  echo 'wrk.method = "POST"'
  echo 'wrk.headers["Content-Type"] = "application/json"'
  echo "wrk.headers[\"Authorization\"] = \"Bearer $token\""
  grep '^wrk.body' "$ceiling/post.lua"
} > "$wrk_script"
redis_pid=$(pgrep -x redis-server | head -n 1)
# CPU per 1,000 answered consumes of `pid` and of Redis, under wrk at `url`.
cpu_per_consume() {
  local pid=$1 target=$2 before redis_before idle_before out requests wrk_cpu TIMEFORMAT=%U+%S
  before=$(cpu_ms "$pid"); redis_before=$(cpu_ms "$redis_pid"); idle_before=$(idle)
  out=$( { time wrk -t1 -c64 -d"${secs}s" -s "$wrk_script" "$target"; } 2>&1)
  requests=$(echo "$out" | awk '/requests in/ { print $1 }')
  wrk_cpu=$(echo "$out" | tail -n 1)
  awk -v r="$requests" -v s="$secs" -v a="$before" -v b="$(cpu_ms "$pid")" \
      -v c="$redis_before" -v d="$(cpu_ms "$redis_pid")" -v i="$idle_before" -v j="$(idle)" \
      -v w="$wrk_cpu" \
    'BEGIN { split(i, x); split(j, y); split(w, z, "+")
             printf "%d requests/s, server %.1f ms, redis %.1f ms, wrk %.1f ms per 1,000; machine idle %.0f %%\n",
               r / s, (b - a) * 1000 / r, (d - c) * 1000 / r, (z[1] + z[2]) * 1e6 / r,
               100 * (y[1] - x[1]) / (y[2] - x[2]) }'
}
# Idle and total ticks of the whole machine so far (/proc/stat): a run
# that leaves the cores idle is bound by waiting, not by CPU.
idle() { awk '/^cpu / { t = 0; for (f = 2; f <= NF; f++) t += $f; print $5 + $6, t }' /proc/stat; }
batches() {
  curl -fs "$base/metrics" | awk '/^consume_batch_charges_(sum|count)/ { v[$1] = $2 }
    END { c = v["consume_batch_charges_count"]; if (c > 0) printf "%d calls, %.1f charges a call\n", c, v["consume_batch_charges_sum"] / c }'
}

echo "== CPU per 1,000 consumes"
before_calls=$(batches)
printf 'connected-apps: '; cpu_per_consume "$service" "$url"
echo "  script calls so far: ${before_calls:-none} -> $(batches)"
LUA="$ceiling/consume.lua" REDIS_URL=redis://127.0.0.1:6379/15 BIND=127.0.0.1:8099 \
  "${CEILING_TARGET_DIR:-/tmp/ceiling-target}/release/thin-consume" &
thin=$!
trap 'kill $service $thin 2>/dev/null || true; rm -f "$wrk_script"' EXIT
for _ in $(seq 50); do curl -fs http://127.0.0.1:8099/health >/dev/null && break; sleep 0.1; done
printf 'ceiling:        '; cpu_per_consume "$thin" http://127.0.0.1:8099/api/v1/customer/tokens/consume
kill $thin

echo "resident memory of the service after the runs: $(awk '/^VmRSS/ { printf "%.0f MB", $2 / 1024 }' "/proc/$service/status") (peak $(awk '/^VmHWM/ { printf "%.0f MB", $2 / 1024 }' "/proc/$service/status"))"

if [ "${PROFILE:-0}" = 1 ]; then
  svg=${PROFILE_SVG:-$here/target/consume-flamegraph.svg}
  command -v inferno-flamegraph >/dev/null || cargo install --locked inferno >/dev/null
  echo "== perf record of the service ($secs s under wrk)"
  wrk -t1 -c64 -d"$((secs + 2))s" -s "$wrk_script" "$url" >/dev/null &
  load=$!
  sleep 1
  perf record -F 499 -g --call-graph dwarf -p "$service" -o "$here/target/consume.perf" -- sleep "$secs" 2>/dev/null
  wait "$load"
  perf script -i "$here/target/consume.perf" 2>/dev/null | inferno-collapse-perf | inferno-flamegraph --minwidth 0.5 \
    --title "POST /api/v1/customer/tokens/consume, serve --roles $roles" > "$svg"
  echo "flamegraph: $svg"
fi
