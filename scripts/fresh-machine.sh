#!/usr/bin/env bash
# Proves the README's two commands on a fresh machine: a minimal Debian
# bookworm root (debootstrap --variant=minbase) with only what a newcomer
# brings (the Rust toolchain, gcc, git, curl), Redis and PostgreSQL wanted
# on ports of the user's choosing, not the defaults. In it, twice (the
# second run must find everything in place and change nothing):
# `scripts/up.sh` until the service answers, the README's "Try it" block
# pasted as it is, then `scripts/test.sh`.
#
# Slow (a release and a test build from nothing: about 25 minutes on two
# cores the first time), so it is not part of CI's default run. Needs root
# (debootstrap, chroot, mounts) and Debian's package mirror.
#
#   scripts/fresh-machine.sh            # FRESH_ROOT=/var/tmp/connected-apps-fresh
#   FRESH_KEEP=1 scripts/fresh-machine.sh   # reuse the root of an earlier run
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
root=${FRESH_ROOT:-/var/tmp/connected-apps-fresh}
redis_port=${FRESH_REDIS_PORT:-6391}
pg_port=${FRESH_PG_PORT:-5491}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
log() { echo "fresh-machine: $*" >&2; }

[ "$(id -u)" = 0 ] || { log "run as root (debootstrap, chroot and mounts need it)"; exit 2; }
command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap
if [ ! -d "$HOME/.rustup" ] || [ ! -d "$HOME/.cargo" ]; then
  log "no Rust toolchain in $HOME/.rustup and $HOME/.cargo"
  exit 2
fi

# Every process running inside the root (the service, Redis, PostgreSQL),
# found from the host: a minimal root has no procps.
stop_inside() {
  local pid pids=()
  for pid in /proc/[0-9]*; do
    [ "$(readlink "$pid/root" 2>/dev/null)" = "$root" ] && pids+=("${pid#/proc/}")
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 20); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && return 0
    sleep 0.5
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
}

mounts=()
cleanup() {
  stop_inside
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount -l "${mounts[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
bind() { mkdir -p "$root$2"; mount --bind "$1" "$root$2"; mounts+=("$root$2"); }

started=$(date +%s)
if [ -z "${FRESH_KEEP:-}" ] || [ ! -x "$root/bin/bash" ]; then
  rm -rf "$root"
  log "debootstrap --variant=minbase bookworm into $root"
  debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null
  # The host's CA certificates, so crates.io and the mirror are trusted.
  mkdir -p "$root/etc/ssl/certs"
  cp -rL /etc/ssl/certs/. "$root/etc/ssl/certs/"
fi
cp /etc/resolv.conf "$root/etc/resolv.conf"
mount -t proc proc "$root/proc"; mounts+=("$root/proc")
bind /sys /sys
bind /dev /dev
bind /dev/pts /dev/pts
# The newcomer's toolchain: the host's rustup and cargo, bound in.
bind "$HOME/.rustup" /root/.rustup
bind "$HOME/.cargo" /root/.cargo
in_root() { chroot "$root" /usr/bin/env -i HOME=/root PATH=/root/.cargo/bin:/usr/sbin:/usr/bin:/sbin:/bin TERM=dumb "$@"; }

log "what a newcomer brings: gcc, git, curl"
in_root apt-get update -qq >/dev/null
in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev git curl ca-certificates >/dev/null

# A fresh clone of the repository as committed.
rm -rf "$root/work/connected-apps"
mkdir -p "$root/work"
git clone -q "$here" "$root/work/connected-apps"

urls="REDIS_URL=redis://127.0.0.1:$redis_port/0 DATABASE_URL=postgres://postgres:postgres@127.0.0.1:$pg_port/connected_apps"
test_urls="TEST_REDIS_URL=redis://127.0.0.1:$redis_port/0 TEST_DATABASE_URL=postgres://postgres:postgres@127.0.0.1:$pg_port/postgres"
walkthrough=$(awk '/^## Try it/ {section = 1} section && /^```sh$/ {inside = 1; next} inside && /^```$/ {exit} inside {print}' "$here/README.md")
[ -n "$walkthrough" ] || { log "no walkthrough block in README.md"; exit 1; }
printf '%s\n' "$walkthrough" > "$root/work/walkthrough.sh"

for run in 1 2; do
  log "run $run: scripts/up.sh on Redis :$redis_port and PostgreSQL :$pg_port"
  run_started=$(date +%s)
  in_root /bin/bash -c "cd /work/connected-apps && exec env $urls PORT=8091 scripts/up.sh" > "$root/work/up-$run.log" 2>&1 &
  up=$!
  until grep -q "serving the API" "$root/work/up-$run.log"; do
    kill -0 "$up" 2>/dev/null || { tail -n 30 "$root/work/up-$run.log"; log "run $run: scripts/up.sh stopped"; exit 1; }
    sleep 1
  done
  log "run $run: the service answers after $(( $(date +%s) - run_started )) s; the README walkthrough"
  in_root /bin/bash -c "cd /work/connected-apps && PORT=8091 timeout 120 bash -e /work/walkthrough.sh" > "$root/work/walkthrough-$run.log" 2>&1 \
    || { cat "$root/work/walkthrough-$run.log"; log "run $run: the walkthrough failed"; exit 1; }
  grep -q '"tokens_remaining":9995' "$root/work/walkthrough-$run.log" \
    || { cat "$root/work/walkthrough-$run.log"; log "run $run: the walkthrough's consume did not charge"; exit 1; }
  kill -TERM "$up"; wait "$up" || true
  log "run $run: scripts/test.sh"
  in_root /bin/bash -c "cd /work/connected-apps && env $test_urls scripts/test.sh" > "$root/work/test-$run.log" 2>&1 \
    || { tail -n 60 "$root/work/test-$run.log"; log "run $run: the tests failed"; exit 1; }
  grep -E "^test result" "$root/work/test-$run.log" >&2
  log "run $run done in $(( $(date +%s) - run_started )) s"
  # As a reboot would: nothing left running for the next run.
  stop_inside
done
log "both runs passed in $(( $(date +%s) - started )) s"
