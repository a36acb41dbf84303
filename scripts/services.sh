#!/usr/bin/env bash
# Makes sure Redis and PostgreSQL answer at REDIS_URL and DATABASE_URL.
#
# Where one does not answer and its URL points at this machine, it is
# started on loopback on the URL's port, and installed from the OS
# packages (Debian/Ubuntu) first when missing. For PostgreSQL that is a
# cluster of its own on that port (`pg_createcluster -p`), unless one is
# already configured there. The URL's user is given the URL's password
# whenever it does not log in yet, so a run that was interrupted is
# repaired by the next. A service elsewhere that does not answer is an
# error: this script never touches remote hosts.
#
# Needs root, or sudo, to install and start services; nothing when both
# already answer.
set -euo pipefail

REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
DATABASE_URL=${DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/connected_apps}

log() { echo "services: $*" >&2; }
die() { log "$*"; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# host and port of a URL: scheme://[user[:pass]@]host[:port][/…]
url_host() { [[ $1 =~ ^[a-z]+://([^@/]*@)?([^:/?]+) ]] && echo "${BASH_REMATCH[2]}"; }
url_port() { if [[ $1 =~ ^[a-z]+://([^@/]*@)?[^:/?]+:([0-9]+) ]]; then echo "${BASH_REMATCH[2]}"; else echo "$2"; fi; }
is_local() { case $1 in 127.*|localhost|::1|\[::1\]) return 0 ;; *) return 1 ;; esac; }

apt_updated=
install_packages() {
  command -v apt-get >/dev/null || die "cannot install $* here: no apt-get; install it by hand"
  if [ -z "$apt_updated" ]; then
    log "updating the package lists"
    as_root apt-get update -qq || die "apt-get update failed (network, or a broken sources list?)"
    apt_updated=1
  fi
  log "installing $*"
  local out
  out=$(mktemp)
  if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >"$out" 2>&1; then
    cat "$out" >&2
    die "installing $* failed"
  fi
  rm -f "$out"
}

tcp_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_for() {
  local what=$1; shift
  for _ in $(seq 60); do "$@" && return 0; sleep 0.5; done
  die "$what did not come up"
}

ensure_redis() {
  local host port
  host=$(url_host "$REDIS_URL"); port=$(url_port "$REDIS_URL" 6379)
  if tcp_open "$host" "$port"; then return; fi
  is_local "$host" || die "Redis at $host:$port does not answer"
  command -v redis-server >/dev/null || install_packages redis-server
  log "starting Redis on 127.0.0.1:$port"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 --port "$port" \
    --dir /var/lib/redis --logfile "/var/log/redis/connected-apps-$port.log" \
    || die "redis-server did not start (see /var/log/redis/connected-apps-$port.log)"
  wait_for "Redis on port $port" tcp_open 127.0.0.1 "$port"
}

# The cluster configured on $1, as "version name", if any.
cluster_on_port() {
  pg_lsclusters --no-header 2>/dev/null | awk -v port="$1" '$3 == port {print $1, $2; exit}'
}

ensure_postgres() {
  local host port
  host=$(url_host "$DATABASE_URL"); port=$(url_port "$DATABASE_URL" 5432)
  if ! tcp_open "$host" "$port"; then
    is_local "$host" || die "PostgreSQL at $host:$port does not answer"
    command -v pg_createcluster >/dev/null || install_packages postgresql
    local cluster version name
    cluster=$(cluster_on_port "$port")
    if [ -z "$cluster" ]; then
      version=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)
      [ -n "$version" ] || die "no PostgreSQL server is installed under /usr/lib/postgresql"
      name="connected-apps-$port"
      log "creating PostgreSQL $version cluster $name on port $port"
      # UTF8 whatever this machine's locale: a cluster made without one
      # would be SQL_ASCII, which refuses every non-ASCII character in jsonb.
      as_root pg_createcluster --port "$port" --encoding UTF8 --locale C.UTF-8 "$version" "$name" >/dev/null \
        || die "pg_createcluster $version $name failed"
      cluster="$version $name"
    fi
    read -r version name <<<"$cluster"
    log "starting PostgreSQL $version/$name on port $port"
    local out
    if ! out=$(as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$name" start 2>&1); then
      # Another start won the race, or it was running on a socket only.
      [[ $out == *"already running"* ]] || die "pg_ctlcluster $version $name start failed: $out"
    fi
    wait_for "PostgreSQL on port $port" tcp_open 127.0.0.1 "$port"
  fi
  ensure_password "$host" "$port"
}

# Gives the URL's user its password (and creates it) unless it logs in
# already. Over the server's local socket, as the postgres superuser.
ensure_password() {
  local host=$1 port=$2 user pass
  [[ $DATABASE_URL =~ ^[a-z]+://([^:@/]+):([^@/]*)@ ]] || return 0
  user=${BASH_REMATCH[1]}; pass=${BASH_REMATCH[2]}
  if command -v psql >/dev/null \
    && PGPASSWORD=$pass PGCONNECT_TIMEOUT=5 psql -qtA -h "$host" -p "$port" -U "$user" -d postgres -c 'SELECT 1' >/dev/null 2>&1; then
    return
  fi
  is_local "$host" || die "PostgreSQL at $host:$port does not accept $user with the URL's password"
  [ -n "$(cluster_on_port "$port")" ] \
    || die "PostgreSQL on port $port does not accept $user with the URL's password, and it is not a cluster of this machine's to repair"
  log "setting the password of $user on port $port"
  local sql
  sql="DO \$\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$user') THEN CREATE ROLE \"$user\" LOGIN SUPERUSER; END IF; END \$\$; ALTER ROLE \"$user\" PASSWORD '$pass';"
  as_root runuser -u postgres -- psql -q -p "$port" -d postgres -c "$sql" \
    || die "could not set the password of $user on port $port"
}

ensure_redis
ensure_postgres
log "Redis and PostgreSQL answer"
