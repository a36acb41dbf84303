#!/usr/bin/env bash
# Makes sure Redis and PostgreSQL answer at REDIS_URL and DATABASE_URL.
#
# Where one does not answer and its URL points at this machine, it is
# started on loopback, and installed from the OS packages (Debian/Ubuntu)
# first when missing. A service elsewhere that does not answer is an error:
# this script never touches remote hosts.
set -euo pipefail

REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
DATABASE_URL=${DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/connected_apps}

log() { echo "services: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# host and port of a URL: scheme://[user[:pass]@]host[:port][/…]
url_host() { [[ $1 =~ ^[a-z]+://([^@/]*@)?([^:/?]+) ]] && echo "${BASH_REMATCH[2]}"; }
url_port() { if [[ $1 =~ ^[a-z]+://([^@/]*@)?[^:/?]+:([0-9]+) ]]; then echo "${BASH_REMATCH[2]}"; else echo "$2"; fi; }
is_local() { case $1 in 127.*|localhost|::1|\[::1\]) return 0 ;; *) return 1 ;; esac; }

apt_updated=
install_packages() {
  command -v apt-get >/dev/null || { log "cannot install $* here: no apt-get; install it by hand"; exit 1; }
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
  log "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

tcp_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_for() {
  local what=$1; shift
  for _ in $(seq 60); do "$@" && return 0; sleep 0.5; done
  log "$what did not come up"; exit 1
}

ensure_redis() {
  local host port
  host=$(url_host "$REDIS_URL"); port=$(url_port "$REDIS_URL" 6379)
  if tcp_open "$host" "$port"; then return; fi
  is_local "$host" || { log "Redis at $host:$port does not answer"; exit 1; }
  command -v redis-server >/dev/null || install_packages redis-server
  log "starting Redis on 127.0.0.1:$port"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 --port "$port" \
    --dir /var/lib/redis --logfile /var/log/redis/connected-apps.log
  wait_for Redis tcp_open 127.0.0.1 "$port"
}

ensure_postgres() {
  local host port
  host=$(url_host "$DATABASE_URL"); port=$(url_port "$DATABASE_URL" 5432)
  if tcp_open "$host" "$port"; then return; fi
  is_local "$host" || { log "PostgreSQL at $host:$port does not answer"; exit 1; }
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    install_packages postgresql
  fi
  local version
  version=$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)
  log "starting PostgreSQL $version on port $port"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start -- -o "-p $port" 2>/dev/null \
    || as_root pg_ctlcluster "$version" main start
  wait_for PostgreSQL tcp_open 127.0.0.1 "$port"
  # A fresh cluster takes passwords over TCP: give the URL's user its password.
  local user pass
  if [[ $DATABASE_URL =~ ^[a-z]+://([^:@/]+):([^@/]*)@ ]]; then
    user=${BASH_REMATCH[1]}; pass=${BASH_REMATCH[2]}
    as_root runuser -u postgres -- psql -q -p "$port" -c \
      "DO \$\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$user') THEN CREATE ROLE \"$user\" LOGIN SUPERUSER; END IF; END \$\$; ALTER ROLE \"$user\" PASSWORD '$pass';"
  fi
}

ensure_redis
ensure_postgres
log "Redis and PostgreSQL answer"
