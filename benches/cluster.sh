#!/usr/bin/env bash
# Consumes against one Redis and against a Redis Cluster of three masters
# (scripts/redis-cluster.sh), in one run: the release binary (or BINARY)
# with the API role, three enterprise customers whose shards live on
# three different masters of the cluster, wrk (1 thread, 64 connections,
# SECONDS each, 8 by default) sending each customer a third of the
# consumes. Reports consumes/s and, per Redis process, its CPU per 1,000
# consumes and its script calls per second. On two cores the total cannot
# grow with masters (wrk, the service and Redis share them); what the
# cluster shows is each master's share of the work.
#
#   cargo build --release && benches/cluster.sh
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${BINARY:-$here/target/release/connected-apps}
port=${PORT:-8013}
secs=${SECONDS_EACH:-8}
command -v wrk >/dev/null || { echo "cluster.sh: wrk is missing (apt-get install wrk)" >&2; exit 2; }
[ -x "$bin" ] || { echo "cluster.sh: $bin is missing (cargo build --release)" >&2; exit 2; }
cluster_url=$("$here/scripts/redis-cluster.sh")
. "$here/scripts/customer.sh"
export DATABASE_URL=${BENCH_DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/bench_cluster}
export LOG_LEVEL=warn PORT=$port RATE_LIMIT_CONSUME_PER_HOUR=0
"$bin" migrate >/dev/null
cpu_ms() { awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) * 1000 / hz }' "/proc/$1/stat"; }
base=http://127.0.0.1:$port
script=$(mktemp --suffix=.lua)
service=
trap 'kill $service 2>/dev/null || true; rm -f "$script"' EXIT

# The master (port) serving shard n's hash tag.
owner_of_shard() {
  local slot
  slot=$(redis-cli -p 7001 cluster keyslot "{s$1}")
  redis-cli -p 7001 cluster nodes | awk -v slot="$slot" '{
    split($2, addr, "[:@]")
    for (i = 9; i <= NF; i++) { n = split($i, r, "-"); lo = r[1]; hi = (n == 2) ? r[2] : r[1]
      if (slot >= lo && slot <= hi) print addr[2] } }'
}

# One run against REDIS_URL: serve, three customers on three masters (the
# cluster's) or the one server, wrk, CPU of each Redis process.
run() {
  local label=$1 url=$2 pids=$3
  REDIS_URL=$url REDIS_KEY_PREFIX="bench-cluster-$RANDOM" "$bin" serve --roles api &
  service=$!
  for _ in $(seq 100); do curl -fs "$base/health/ready" >/dev/null && break; sleep 0.1; done
  local tokens=() masters=() customer token shard owner
  while [ "${#tokens[@]}" -lt 3 ]; do
    read -r customer token < <(new_customer "$bin" "$base" enterprise)
    # UUIDs end in random bits: the shard is the last hex digit (16 shards).
    shard=$((16#${customer: -1}))
    owner=$(owner_of_shard "$shard")
    [[ " ${masters[*]} " == *" $owner "* ]] && continue
    masters+=("$owner")
    tokens+=("$token")
  done
  {
    printf 'local tokens = { "%s", "%s", "%s" }\nlocal i = 0\n' "${tokens[@]}"
    grep '^wrk.body' "$here/../shared/ceiling/post.lua"
    cat <<'LUA'
request = function()
  i = i + 1
  return wrk.format("POST", nil, { ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. tokens[i % 3 + 1] }, wrk.body)
end
LUA
  } > "$script"
  local before=() calls_before out requests
  for pid in $pids; do before+=("$(cpu_ms "$pid")"); done
  calls_before=$(curl -fs "$base/metrics" | awk '/^consume_batch_charges_count/ { print $2 }')
  out=$(wrk -t1 -c64 -d"${secs}s" -s "$script" "$base/api/v1/customer/tokens/consume")
  requests=$(echo "$out" | awk '/requests in/ { print $1 }')
  local calls
  calls=$(curl -fs "$base/metrics" | awk -v b="${calls_before:-0}" '/^consume_batch_charges_count/ { print $2 - b }')
  printf '%-34s %6d consumes/s, %5d script calls/s;' "$label" "$((requests / secs))" "$(echo "$calls / $secs" | bc)"
  local i=0
  for pid in $pids; do
    printf ' redis %s: %.1f ms' "$(tr '\0' ' ' < "/proc/$pid/cmdline" | grep -o ':[0-9]*' | head -n 1)" \
      "$(echo "($(cpu_ms "$pid") - ${before[$i]}) * 1000 / $requests" | bc -l)"
    i=$((i + 1))
  done
  echo " per 1,000 consumes"
  kill $service; wait $service 2>/dev/null || true
}

single=$(pgrep -f 'redis-server .*:6379' | head -n 1)
masters=$(for p in 7001 7002 7003; do pgrep -f "redis-server .*:$p" | head -n 1; done | tr '\n' ' ')
echo "service: $bin serve --roles api, commit $(git -C "$here" rev-parse --short HEAD), wrk ${secs}s x 64 connections"
run "one Redis (127.0.0.1:6379)" "redis://127.0.0.1:6379/1" "$single"
run "cluster of three masters" "$cluster_url" "$masters"
run "one Redis again" "redis://127.0.0.1:6379/1" "$single"
run "cluster again" "$cluster_url" "$masters"
