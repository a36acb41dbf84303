#!/usr/bin/env bash
# Stream lag under the consume endpoint's maximum load.
#
# Drives POST /api/v1/customer/tokens/consume with wrk (1 thread, 64
# connections, no rate limit: as fast as the service answers) against a
# running service whose flusher role is on, and samples the flusher's
# `usage_stream_oldest_unflushed_seconds` (the age of the oldest event not
# yet in Postgres, worst shard) once a second from /metrics, during the
# load and until the backlog is gone.
#
#   BASE_URL=http://127.0.0.1:8000 TOKEN=<jwt> LOAD_SECONDS=30 benches/lag.sh
#   TOKENS_FILE=<file of JWTs, one a line> … (rotated per request: many merchants)
#   METRICS_URL=… when the flusher runs in another process
set -euo pipefail
base=${BASE_URL:-http://127.0.0.1:8000}
metrics=${METRICS_URL:-$base/metrics}
secs=${LOAD_SECONDS:-30}
[ -n "${TOKENS_FILE:-}" ] || : "${TOKEN:?TOKEN must hold a JWT with tokens:consume (or TOKENS_FILE name a file of them)}"
command -v wrk >/dev/null || { echo "lag.sh: wrk is missing (apt-get install wrk)" >&2; exit 2; }

script=$(mktemp --suffix=.lua)
trap 'rm -f "$script"' EXIT
{
  echo 'wrk.method = "POST"'
  echo 'wrk.headers["Content-Type"] = "application/json"'
  if [ -n "${TOKENS_FILE:-}" ]; then
    echo 'local toks = {'; sed 's/.*/"&",/' "$TOKENS_FILE"; echo '}'
    echo 'local i = 0'
    echo 'request = function() i = i % #toks + 1; wrk.headers["Authorization"] = "Bearer " .. toks[i]; return wrk.format() end'
  else
    echo "wrk.headers[\"Authorization\"] = \"Bearer $TOKEN\""
  fi
  echo "wrk.body = '{\"app_id\":\"${APP_ID:-vto-001}\",\"tokens_consumed\":5,\"session_id\":\"sess-abc123\",\"metadata\":{\"user_agent\":\"Mozilla/5.0\",\"ip_address\":\"192.168.1.1\",\"product_id\":\"frame-001\",\"processing_time_ms\":1250}}'"
} > "$script"

lag() {
  curl -fs "$metrics" | awk '/^usage_stream_oldest_unflushed_seconds/ { if ($2 > max) max = $2 } END { printf "%.3f", max + 0 }'
}
backlog() {
  curl -fs "$metrics" | awk '/^usage_stream_(pending|undelivered)/ { n += $2 } END { printf "%d", n + 0 }'
}

wrk -t1 -c64 -d"${secs}s" -s "$script" "$base/api/v1/customer/tokens/consume" > /tmp/lag-wrk.txt &
load=$!
worst=0
second=0
while kill -0 "$load" 2>/dev/null; do
  sleep 1
  second=$((second + 1))
  l=$(lag); b=$(backlog)
  echo "t=${second}s lag=${l}s backlog=${b}"
  worst=$(awk -v a="$worst" -v b="$l" 'BEGIN { print (b > a) ? b : a }')
done
grep -E "Requests/sec|Latency" /tmp/lag-wrk.txt
for _ in $(seq 30); do
  sleep 1
  second=$((second + 1))
  b=$(backlog)
  echo "t=${second}s (load over) lag=$(lag)s backlog=${b}"
  [ "$b" -eq 0 ] && break
done
echo "worst lag during load: ${worst}s"
