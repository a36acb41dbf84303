#!/usr/bin/env bash
# The worst day, on loopback: consumes for many customers while the
# processes and stores under them are killed, stopped and paused; then
# the books. Bounded (CHAOS_SECONDS of load, 60 by default) and
# self-contained: its own Redis (AOF, `appendfsync everysec`) on port
# 6395 and its own PostgreSQL cluster (initdb) on 5495, in a directory of
# its own, never the machine's shared servers; the release binary as an
# API process (8095) and a flusher process (8096).
#
# Clients (tests/chaos/client.py, THREADS threads): each consume under its
# own Idempotency-Key, sent again on a refused connection or a 503 until
# answered, as a well-behaved client does. Faults, spread over the run:
#   kill -9 of the API process (started again);
#   kill -9 of the flusher, three times, with batches of 20 so kills fall
#     between a commit and its acknowledgement; the second while Redis is
#     paused for 0.3 s, so a flusher that was writing has committed and
#     waits on its acknowledgement when it dies. Each flusher's
#     flusher_events_duplicate_total, read before it is killed and summed,
#     shows how many events were written twice and stored once: a kill
#     that fell between a commit and its acknowledgement;
#   kill -9 of Redis (started again from its AOF);
#   PostgreSQL stopped for PG_DOWN_SECONDS (10 by default; 60 in the long
#     run);
#   Redis paused (SIGSTOP) for 1.5 s, past the consume's 250 ms deadline.
# With CHAOS_REDIS=cluster, Redis is a cluster of three masters with a
# replica each (ports 7395-7400, AOF everysec on every node): the kill and
# the pause hit one master each (both shorter than the cluster's node
# timeout, so no failover), and a further fault fails a third master over
# to its replica (CLUSTER FAILOVER, the planned kind, under load).
# Afterwards the flusher drains, and per customer: the charges answered
# 200 = the rows in token_usage = the hot balance's usage; no event twice;
# no usage past the allowance. Prints the faults, requests, charges, lost
# and duplicated (both must be 0) and the availability during each fault;
# exits non-zero when anything is lost or doubled.
#
#   cargo build --release && scripts/chaos.sh
#   CHAOS_REDIS=cluster scripts/chaos.sh                     # on Redis Cluster
#   CHAOS_SECONDS=300 PG_DOWN_SECONDS=60 CUSTOMERS=600 scripts/chaos.sh  # the long run
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${BINARY:-$here/target/release/connected-apps}
secs=${CHAOS_SECONDS:-60}
pg_down=${PG_DOWN_SECONDS:-10}
threads=${THREADS:-16}
# Enough customers that their allowances (10,000 tokens each) last the
# run, so every fault meets charges rather than refusals.
customers=${CUSTOMERS:-150}
mode=${CHAOS_REDIS:-single}
pg_port=5495 api_port=8095 flusher_port=8096
case $mode in
  single) redis_ports=(6395) ;;
  cluster) redis_ports=(7395 7396 7397 7398 7399 7400) ;;
  *) echo "chaos.sh: CHAOS_REDIS is single or cluster" >&2; exit 2 ;;
esac
[ -x "$bin" ] || { echo "chaos.sh: $bin is missing (cargo build --release)" >&2; exit 2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
# PostgreSQL's server binaries and Redis, from the OS packages when missing.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v redis-server >/dev/null; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    postgresql redis-server >/dev/null
fi
pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

dir=$(mktemp -d /tmp/connected-apps-chaos.XXXXXX)
chmod 755 "$dir"
log() { echo "chaos $(date -u +%H:%M:%S): $*"; }
api= flusher=
# kill -9, and reaped quietly (the shell would report each as "Killed").
slay() { kill -9 "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
cleanup() {
  for pid in $api $flusher; do slay "$pid"; done
  for p in "${redis_ports[@]}"; do redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true; done
  as_postgres "$pg_bin/pg_ctl" -D "$dir/pg" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT

# --- its own Redis and PostgreSQL -------------------------------------
# start_redis PORT: one node, from its AOF when it has one.
start_redis() {
  local p=$1 cluster=()
  [ "$mode" = cluster ] && cluster=(--cluster-enabled yes --cluster-config-file nodes.conf
    --cluster-node-timeout 5000)
  mkdir -p "$dir/redis/$p"
  redis-server --port "$p" --bind 127.0.0.1 --dir "$dir/redis/$p" --daemonize yes \
    --appendonly yes --appendfsync everysec --save '' --maxmemory-policy noeviction \
    "${cluster[@]}" --pidfile "$dir/redis/$p.pid" --logfile "$dir/redis/$p.log" >/dev/null
  for _ in $(seq 50); do redis-cli -p "$p" ping >/dev/null 2>&1 && return; sleep 0.1; done
  log "redis on $p did not start"; exit 1
}
redis_pid() { cat "$dir/redis/$1.pid"; }
# The cluster's view, from one node: "<port> <role> <master's port>" a line.
cluster_nodes() {
  redis-cli -p "${redis_ports[0]}" cluster nodes | awk '
    { split($2, a, "[:@]"); port[$1] = a[2]; role[$1] = ($3 ~ /master/) ? "master" : "replica"; of[$1] = $4 }
    END { for (id in port) print port[id], role[id], (of[id] in port) ? port[of[id]] : "-" }'
}
masters() { cluster_nodes | awk '$2 == "master" { print $1 }' | sort; }
replica_of() { cluster_nodes | awk -v m="$1" '$2 == "replica" && $3 == m { print $1; exit }'; }
cluster_ok() {
  for p in "${redis_ports[@]}"; do
    redis-cli -p "$p" cluster info | tr -d '\r' | grep -q '^cluster_state:ok' || return 1
  done
}
mkdir -p "$dir/pg" "$dir/pgsock"
chown postgres "$dir/pg" "$dir/pgsock" 2>/dev/null || true
as_postgres "$pg_bin/initdb" -D "$dir/pg" -A trust -U postgres >/dev/null
start_pg() {
  as_postgres "$pg_bin/pg_ctl" -D "$dir/pg" -l "$dir/pg/server.log" -w \
    -o "-p $pg_port -k $dir/pgsock -c listen_addresses=127.0.0.1" start >/dev/null
}
stop_pg() { as_postgres "$pg_bin/pg_ctl" -D "$dir/pg" -m fast -w stop >/dev/null; }
for p in "${redis_ports[@]}"; do start_redis "$p"; done
if [ "$mode" = cluster ]; then
  redis-cli --cluster create "${redis_ports[@]/#/127.0.0.1:}" --cluster-replicas 1 --cluster-yes >/dev/null
  for _ in $(seq 100); do cluster_ok && [ "$(masters | wc -l)" = 3 ] && break; sleep 0.2; done
  cluster_ok || { log "the cluster did not come up"; exit 1; }
  REDIS_URL="redis-cluster://127.0.0.1:${redis_ports[0]}?node=127.0.0.1:${redis_ports[1]}&node=127.0.0.1:${redis_ports[2]}"
else
  REDIS_URL=redis://127.0.0.1:${redis_ports[0]}/0
fi
start_pg

export DATABASE_URL=postgres://postgres@127.0.0.1:$pg_port/chaos
export REDIS_URL REDIS_KEY_PREFIX=chaos LOG_LEVEL=error
export RATE_LIMIT_CONSUME_PER_HOUR=0 FLUSH_BATCH_SIZE=20 FLUSH_CLAIM_IDLE_MS=2000
"$bin" migrate >/dev/null

start_api() {
  PORT=$api_port "$bin" serve --roles api >>"$dir/api.log" 2>&1 &
  api=$!
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$api_port/health/live" >/dev/null && return; sleep 0.1; done
}
start_flusher() {
  PORT=$flusher_port "$bin" serve --roles flusher >>"$dir/flusher.log" 2>&1 &
  flusher=$!
}
# Events a flusher found already in the ledger (redelivered after another
# flusher's commit), summed over every flusher of the run.
duplicates_written=0
count_duplicates() {
  local n
  n=$(curl -fs "http://127.0.0.1:$flusher_port/metrics" 2>/dev/null |
    awk '/^flusher_events_duplicate_total/ { s += $2 } END { printf "%d", s }')
  duplicates_written=$((duplicates_written + ${n:-0}))
}
kill_flusher() { count_duplicates; slay "$flusher"; start_flusher; }
start_api
start_flusher
base=http://127.0.0.1:$api_port

# --- customers: professional (10,000 tokens a period), vto-001 active --
. "$here/scripts/customer.sh"
for _ in $(seq "$customers"); do new_customer "$bin" "$base" professional >> "$dir/tokens"; done

# --- load, and the faults ---------------------------------------------
log "load: $threads clients, $customers customers, ${secs}s, Redis: $mode"
python3 "$here/tests/chaos/client.py" "$base" "$dir/tokens" "$dir/answers" "$dir/stop" "$threads" &
clients=$!
start=$(date +%s)
at() { local t=$(($1 * secs / 100)); while [ $(($(date +%s) - start)) -lt $t ]; do sleep 0.2; done; }
faults=()
fault() { faults+=("$1 $2 $3"); log "$3"; }

at 8;  t=$(date +%s); slay $api; sleep 1; start_api; fault "$t" "$(date +%s)" "kill -9 of the API process, started again"
at 16; t=$(date +%s); kill_flusher; fault "$t" "$(date +%s)" "kill -9 of the flusher, started again"
# Single: the one Redis. Cluster: the masters in turn (the kill, the
# failover and the pause each on another one).
if [ "$mode" = cluster ]; then mapfile -t master < <(masters); else master=("${redis_ports[0]}" "${redis_ports[0]}" "${redis_ports[0]}"); fi
at 24; t=$(date +%s); kill -9 "$(redis_pid "${master[0]}")"; sleep 1; start_redis "${master[0]}"; fault "$t" "$(date +%s)" "kill -9 of Redis (${master[0]}), started again from its AOF"
at 34; t=$(date +%s); count_duplicates
for p in "${master[@]}"; do kill -STOP "$(redis_pid "$p")"; done
sleep 0.3; slay "$flusher"
for p in "${master[@]}"; do kill -CONT "$(redis_pid "$p")"; done
start_flusher; fault "$t" "$(date +%s)" "kill -9 of the flusher while Redis is paused, started again"
at 42; t=$(date +%s); stop_pg; sleep "$pg_down"; start_pg; fault "$t" "$(date +%s)" "PostgreSQL stopped for ${pg_down}s"
if [ "$mode" = cluster ]; then
  at 60; t=$(date +%s); replica=$(replica_of "${master[1]}")
  redis-cli -p "$replica" cluster failover >/dev/null
  for _ in $(seq 100); do [ "$(replica_of "$replica")" = "${master[1]}" ] && cluster_ok && break; sleep 0.1; done
  fault "$t" "$(date +%s)" "failover of master ${master[1]} to its replica $replica"
fi
at 70; t=$(date +%s); kill -STOP "$(redis_pid "${master[2]}")"; sleep 1.5; kill -CONT "$(redis_pid "${master[2]}")"; fault "$t" "$(date +%s)" "Redis (${master[2]}) paused for 1.5 s"
at 82; t=$(date +%s); kill_flusher; fault "$t" "$(date +%s)" "kill -9 of the flusher, started again"
at 100
touch "$dir/stop"
wait $clients

# --- the books ----------------------------------------------------------
log "load stopped; waiting for the flusher to drain"
charged=$(awk '$3 == 200' "$dir/answers" | wc -l)
for _ in $(seq 120); do
  rows=$(psql -qtA "$DATABASE_URL" -c 'SELECT count(*) FROM token_usage' 2>/dev/null || echo 0)
  [ "$rows" -ge "$charged" ] && break
  sleep 1
done
sleep 2
count_duplicates

psql -qtA "$DATABASE_URL" -c "COPY (SELECT id, customer_id, tokens_consumed - purchased_tokens_consumed FROM token_usage) TO STDOUT" > "$dir/rows"
# Every customer's `used`, from whichever master holds its account.
if [ "$mode" = cluster ]; then mapfile -t master < <(masters); else master=("${redis_ports[0]}"); fi
for p in "${master[@]}"; do
  redis-cli -p "$p" --scan --pattern 'chaos:v1:*:c:*:acct' | while read -r key; do
    id=${key%:acct}; echo "${id##*:} $(redis-cli -p "$p" hget "$key" used)"
  done
done | sort -u > "$dir/hot"

python3 - "$dir" "$charged" <<'PY'
import collections, sys
d = sys.argv[1]
answers = [l.split() for l in open(f"{d}/answers") if l.strip()]
rows = [l.split("\t") for l in open(f"{d}/rows") if l.strip()]
hot = dict(l.split() for l in open(f"{d}/hot") if l.strip())
acked = {a[3]: a[0] for a in answers if a[2] == "200"}
stored = collections.Counter(r[0] for r in rows)
lost = [e for e in acked if e not in stored]
doubled = [e for e, n in stored.items() if n > 1 or e not in acked]
unanswered = sum(1 for a in answers if a[2] == "0")
tokens = collections.Counter()
for r in rows:
    tokens[r[1]] += int(r[2])
customers = [l.split()[0] for l in open(f"{d}/tokens") if l.strip()]
mismatched = [c for c in customers if int(hot.get(c, 0)) != tokens[c]]
over = [c for c in customers if int(hot.get(c, 0)) > 10000]
by_status = collections.Counter(a[2] for a in answers)
print(f"requests {len(answers)}: " + ", ".join(f"{s} x{n}" for s, n in sorted(by_status.items())))
print(f"charges answered 200: {len(acked)}; rows in token_usage: {len(rows)}")
print(f"lost: {len(lost)}; duplicated: {len(doubled)}; never answered: {unanswered}")
print(f"customers whose hot usage differs from their rows: {len(mismatched)}; past the allowance: {len(over)}")
open(f"{d}/verdict", "w").write("ok" if not (lost or doubled or mismatched or over or unanswered) else "failed")
PY
echo "events written twice and stored once (flusher_events_duplicate_total, over every flusher): $duplicates_written"
echo "availability during each fault (answered / attempts, from its start to 2 s after its end):"
for f in "${faults[@]}"; do
  read -r from to what <<<"$f"
  awk -v a="$from" -v b="$((to + 2))" -v what="$what" '$1 >= a && $1 <= b { ok += $2; bad += $3 }
    END { printf "  %-62s %5.1f %% (%d of %d)\n", what, (ok + bad) ? 100 * ok / (ok + bad) : 100, ok, ok + bad }' \
    "$dir/answers.attempts"
done
[ "$(cat "$dir/verdict")" = ok ] || { log "FAILED: see above"; exit 1; }
log "ok: nothing lost, nothing doubled"
