#!/usr/bin/env bash
# Consume throughput against the ceiling, and CPU per consume, in one run.
#
# Starts the release binary (or BINARY) with ROLES (default `api`; `all`
# for every role) on PORT (default 8010) against a database and Redis
# database of its own, and sets up the traffic of each of MIXES (default
# `one zipf`):
#
# - `one`: one enterprise customer (unlimited, so nothing runs out) with
#   vto-001 active, every request with its JWT;
# - `zipf`: CUSTOMERS (default 1,000) such customers, and 4,096 bearer
#   tokens drawn from them with weight 1/i for the i-th (Zipf, s = 1: a
#   few large merchants and a long tail), seed SEED (default 27), rotated
#   per request. Real traffic is many merchants; one customer flatters
#   anything that batches per customer or per shard.
#
# Then, for each mix:
#
# 1. `../shared/ceiling/compare.sh` with the mix as its TOKENS_FILE
#    (ROUNDS, 5 by default; 0 skips it): consume rps against the
#    ceiling's, median ratio (the ceiling ignores the token, so both sides
#    pay the same load-generator cost);
# 2. CPU per 1,000 consumes of the service, of Redis and of the ceiling
#    server (`thin-consume`), from /proc/<pid>/stat over one wrk run
#    (1 thread, 64 connections, CPU_SECONDS, 8 by default) each, with the
#    script calls and charges per call (`consume_batch_charges`) and the
#    commands Redis ran per 1,000 consumes, with their CPU (INFO
#    commandstats: which command of the script costs what);
# 3. when the flusher runs here (ROLES=all), LAG_SECONDS (60 by default;
#    0 skips it) of the same load through benches/lag.sh: the stream lag
#    each second, and whether the backlog drains;
#
# then the service's resident memory, now and at its peak, and with
# PROFILE=1, `perf record` of the service during another wrk run of the
# last mix, folded into a flamegraph (inferno, installed on first use) at
# PROFILE_SVG (default target/consume-flamegraph.svg).
#
# Settings are the defaults a user runs with, except that the consume rate
# limit is lifted (RATE_LIMIT_CONSUME_PER_HOUR=0): a benchmark of one
# customer at tens of thousands of consumes a second would measure 429s.
#
#   cargo build --release && benches/consume.sh
#   ROLES=all benches/consume.sh
#   MIXES=zipf ROUNDS=3 benches/consume.sh
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${BINARY:-$here/target/release/connected-apps}
port=${PORT:-8010}
roles=${ROLES:-api}
secs=${CPU_SECONDS:-8}
mixes=${MIXES:-one zipf}
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
work=$(mktemp -d)
trap 'kill $service 2>/dev/null || true; rm -rf "$work"' EXIT
base=http://127.0.0.1:$port
for _ in $(seq 100); do curl -fs "$base/health/ready" >/dev/null && break; sleep 0.1; done

. "$here/scripts/customer.sh"
url=$base/api/v1/customer/tokens/consume
echo "service: $bin serve --roles $roles on $port, commit $(git -C "$here" rev-parse --short HEAD)"
for mix in $mixes; do
  case $mix in
    one)
      new_customer "$bin" "$base" enterprise | cut -d' ' -f2 > "$work/one" ;;
    zipf)
      customers=${CUSTOMERS:-1000}
      export -f new_customer
      seq "$customers" | xargs -P 4 -I{} bash -c 'new_customer "$0" "$1" enterprise' "$bin" "$base" |
        cut -d' ' -f2 > "$work/customers"
      [ "$(wc -l < "$work/customers")" = "$customers" ] || { echo "consume.sh: customer set-up failed" >&2; exit 1; }
      # Token i is drawn with weight 1/i: a binary search of the
      # cumulative weights for each of 4,096 uniform draws.
      awk -v seed="${SEED:-27}" '{ token[NR] = $0; total += 1 / NR; cum[NR] = total }
        END { srand(seed)
              for (n = 0; n < 4096; n++) {
                x = rand() * total; lo = 1; hi = NR
                while (lo < hi) { mid = int((lo + hi) / 2); if (cum[mid] < x) lo = mid + 1; else hi = mid }
                print token[lo] } }' "$work/customers" > "$work/zipf"
      echo "zipf: $customers customers, 4,096 requests' tokens, the largest merchant $(sort "$work/zipf" | uniq -c | sort -rn | head -n 1 | awk '{ print $1 }') of them, $(sort -u "$work/zipf" | wc -l) merchants seen" ;;
    *) echo "consume.sh: unknown mix $mix (one, zipf)" >&2; exit 2 ;;
  esac
done
# One consume per customer before any load: each loads its hot state from
# the ledger while the streams are short. Without a flusher (ROLES=api) the
# streams only grow, and a first consume after a few hundred thousand
# others waits on a rebuild that reads them (503 past REBUILD_MAX_BACKLOG).
for mix in $mixes; do
  sort -u "$work/$mix" | xargs -P 4 -I{} curl -fs -o /dev/null "$url" -H 'Authorization: Bearer {}' \
    -H 'Content-Type: application/json' -d '{"app_id":"vto-001","tokens_consumed":1}'
done

# CPU time of a process in ms (utime + stime, fields 14 and 15, in ticks).
cpu_ms() { awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) * 1000 / hz }' "/proc/$1/stat"; }
# A wrk script posting the ceiling's body with the tokens of `$1` (one a
# line) in turn, as compare.sh's TOKENS_FILE does.
wrk_script() {
  echo 'wrk.method = "POST"'
  echo 'wrk.headers["Content-Type"] = "application/json"'
  echo 'local toks = {'; sed 's/.*/"&",/' "$1"; echo '}'
  echo 'local i = 0'
  echo 'request = function() i = i % #toks + 1; wrk.headers["Authorization"] = "Bearer " .. toks[i]; return wrk.format() end'
  grep '^wrk.body' "$ceiling/post.lua"
}
redis_pid=$(pgrep -x redis-server | head -n 1)
# CPU per 1,000 answered consumes of `pid` and of Redis, under wrk at `url`
# with the wrk script `script`.
cpu_per_consume() {
  local pid=$1 target=$2 script=$3 before redis_before idle_before out requests wrk_cpu TIMEFORMAT=%U+%S
  redis-cli -u "$REDIS_URL" config resetstat >/dev/null
  before=$(cpu_ms "$pid"); redis_before=$(cpu_ms "$redis_pid"); idle_before=$(idle)
  out=$( { time wrk -t1 -c64 -d"${secs}s" -s "$script" "$target"; } 2>&1)
  requests=$(echo "$out" | awk '/requests in/ { print $1 }')
  commands "$requests" > "$work/commands"
  wrk_cpu=$(echo "$out" | tail -n 1)
  awk -v r="$requests" -v s="$secs" -v a="$before" -v b="$(cpu_ms "$pid")" \
      -v c="$redis_before" -v d="$(cpu_ms "$redis_pid")" -v i="$idle_before" -v j="$(idle)" \
      -v w="$wrk_cpu" \
    'BEGIN { split(i, x); split(j, y); split(w, z, "+")
             printf "%d requests/s, server %.1f ms, redis %.1f ms, wrk %.1f ms per 1,000; machine idle %.0f %%\n",
               r / s, (b - a) * 1000 / r, (d - c) * 1000 / r, (z[1] + z[2]) * 1e6 / r,
               100 * (y[1] - x[1]) / (y[2] - x[2]) }'
  echo "  redis commands (INFO commandstats):"; cat "$work/commands"
}
# Idle and total ticks of the whole machine so far (/proc/stat): a run
# that leaves the cores idle is bound by waiting, not by CPU.
idle() { awk '/^cpu / { t = 0; for (f = 2; f <= NF; f++) t += $f; print $5 + $6, t }' /proc/stat; }
# Redis's own account of the commands it ran (INFO commandstats, scripts'
# commands included) since the last `CONFIG RESETSTAT`, per 1,000 of the
# `$1` requests wrk answered: calls and CPU µs of each command, the
# costliest first. Where a script's time goes, command by command; what
# the scripts' Lua itself costs is the evalsha line's µs less the rest.
commands() {
  redis-cli -u "$REDIS_URL" info commandstats | tr -d '\r' |
    awk -F'[:,=]' -v r="$1" '/^cmdstat_/ { sub("cmdstat_", "", $1); printf "%d %s %.0f %.0f\n", $5, $1, $3 * 1000 / r, $5 * 1000 / r }' |
    sort -rn | awk '{ printf "    %-12s %7s calls %8s µs per 1,000\n", $2, $3, $4 }'
}
# The ceiling's Redis database emptied before each start of its server.
# The server names its idempotency keys by a counter that starts at 0 with
# the process, and the keys live an hour: started again over an earlier
# run's keys, it answers those requests as replays (one GET in Redis, no
# charge), and the ceiling measured would be a cheaper one than a charge.
ceiling_redis=${CEILING_REDIS_URL:-redis://127.0.0.1:6379/15}
fresh_ceiling() { redis-cli -u "$ceiling_redis" flushdb >/dev/null; }
batches() {
  curl -fs "$base/metrics" | awk '/^consume_batch_charges_(sum|count)/ { v[$1] = $2 }
    END { c = v["consume_batch_charges_count"]; if (c > 0) printf "%d calls, %.1f charges a call\n", c, v["consume_batch_charges_sum"] / c }'
}

for mix in $mixes; do
  wrk_script "$work/$mix" > "$work/$mix.lua"
  if [ "${ROUNDS:-5}" != 0 ]; then
    echo "== $mix: compare.sh"
    fresh_ceiling
    TOKENS_FILE=$work/$mix "$ceiling/compare.sh" "$url" ''
  fi

  echo "== $mix: CPU per 1,000 consumes"
  before_calls=$(batches)
  printf 'connected-apps: '; cpu_per_consume "$service" "$url" "$work/$mix.lua"
  echo "  script calls so far: ${before_calls:-none} -> $(batches)"
  fresh_ceiling
  LUA="$ceiling/consume.lua" REDIS_URL=$ceiling_redis BIND=127.0.0.1:8099 \
    "${CEILING_TARGET_DIR:-/tmp/ceiling-target}/release/thin-consume" &
  thin=$!
  for _ in $(seq 50); do curl -fs http://127.0.0.1:8099/health >/dev/null && break; sleep 0.1; done
  printf 'ceiling:        '; cpu_per_consume "$thin" http://127.0.0.1:8099/api/v1/customer/tokens/consume "$work/$mix.lua"
  kill $thin; wait $thin 2>/dev/null || true

  if [ "$roles" = all ] && [ "${LAG_SECONDS:-60}" != 0 ]; then
    echo "== $mix: the flusher under ${LAG_SECONDS:-60} s of the same load (benches/lag.sh)"
    BASE_URL=$base TOKENS_FILE=$work/$mix LOAD_SECONDS=${LAG_SECONDS:-60} "$here/benches/lag.sh" | tail -n 5
  fi
done

echo "resident memory of the service after the runs: $(awk '/^VmRSS/ { printf "%.0f MB", $2 / 1024 }' "/proc/$service/status") (peak $(awk '/^VmHWM/ { printf "%.0f MB", $2 / 1024 }' "/proc/$service/status"))"

if [ "${PROFILE:-0}" = 1 ]; then
  svg=${PROFILE_SVG:-$here/target/consume-flamegraph.svg}
  command -v inferno-flamegraph >/dev/null || cargo install --locked inferno >/dev/null
  echo "== perf record of the service ($secs s under wrk, mix $mix)"
  wrk -t1 -c64 -d"$((secs + 2))s" -s "$work/$mix.lua" "$url" >/dev/null &
  load=$!
  sleep 1
  perf record -F 499 -g --call-graph dwarf -p "$service" -o "$here/target/consume.perf" -- sleep "$secs" 2>/dev/null
  wait "$load"
  perf script -i "$here/target/consume.perf" 2>/dev/null | inferno-collapse-perf | inferno-flamegraph --minwidth 0.5 \
    --title "POST /api/v1/customer/tokens/consume, serve --roles $roles, mix $mix" > "$svg"
  echo "flamegraph: $svg"
fi
