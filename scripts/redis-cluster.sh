#!/usr/bin/env bash
# Starts a Redis Cluster of three masters on loopback (ports PORT,
# PORT+1, PORT+2; 7001 by default), each in its own directory under
# CLUSTER_DIR, without persistence, and waits until it serves every slot.
# Prints the URL the service takes (`REDIS_URL`):
#
#   redis-cluster://127.0.0.1:7001?node=127.0.0.1:7002&node=127.0.0.1:7003
#
# A cluster already answering on those ports is left as it is. `stop` as
# the first argument shuts the three nodes down and removes their
# directory. Installs redis-server (Debian's package) when it is missing.
set -euo pipefail
port=${PORT:-7001}
dir=${CLUSTER_DIR:-/tmp/connected-apps-redis-cluster}
ports=("$port" "$((port + 1))" "$((port + 2))")
log() { echo "redis-cluster: $*" >&2; }

if [ "${1:-}" = stop ]; then
  for p in "${ports[@]}"; do redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true; done
  rm -rf "$dir"
  exit 0
fi

if ! command -v redis-server >/dev/null; then
  log "installing redis-server"
  as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi

url="redis-cluster://127.0.0.1:${ports[0]}?node=127.0.0.1:${ports[1]}&node=127.0.0.1:${ports[2]}"
if [ "$(redis-cli -p "${ports[0]}" cluster info 2>/dev/null | tr -d '\r' | grep -c '^cluster_state:ok')" = 1 ]; then
  echo "$url"
  exit 0
fi

for p in "${ports[@]}"; do
  mkdir -p "$dir/$p"
  redis-cli -p "$p" ping >/dev/null 2>&1 && continue
  # No persistence, as the shared Redis: the cluster is for tests and
  # benchmarks. nodes.conf lives in the node's own directory.
  redis-server --port "$p" --bind 127.0.0.1 --dir "$dir/$p" --daemonize yes \
    --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 5000 \
    --save '' --appendonly no --logfile "$dir/$p/redis.log" >/dev/null
done
for p in "${ports[@]}"; do
  for _ in $(seq 50); do redis-cli -p "$p" ping >/dev/null 2>&1 && break; sleep 0.1; done
done
if [ "$(redis-cli -p "${ports[0]}" cluster info | tr -d '\r' | awk -F: '/^cluster_slots_assigned/ { print $2 }')" != 16384 ]; then
  redis-cli --cluster create "${ports[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes >/dev/null
fi
for _ in $(seq 100); do
  ok=0
  for p in "${ports[@]}"; do
    redis-cli -p "$p" cluster info | tr -d '\r' | grep -q '^cluster_state:ok' && ok=$((ok + 1))
  done
  [ "$ok" = 3 ] && { echo "$url"; exit 0; }
  sleep 0.1
done
log "the cluster on ${ports[*]} did not reach cluster_state:ok"
exit 1
