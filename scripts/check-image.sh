#!/usr/bin/env bash
# Checks the image's runtime stage without a container engine: builds its
# root filesystem with debootstrap (Debian bookworm, minbase, plus the
# packages the Dockerfile's runtime stage installs), adds the user and the
# stripped binary as the Dockerfile does, mounts it read-only (as the Helm
# chart runs it), and runs `connected-apps serve` in it as that unprivileged
# user against this machine's Redis and PostgreSQL until /health/ready
# answers and the image's HEALTHCHECK passes; then stops it with SIGTERM
# and expects a clean exit.
#
#   scripts/check-image.sh                 # BIN=target/release/connected-apps (built if missing)
#   IMAGE_ROOT_FRESH=1 scripts/check-image.sh   # rebuild the cached root
#
# Needs root (debootstrap, chroot, mounts) and Debian's package mirror the
# first time (the root is kept in IMAGE_ROOT for the next run).
set -euo pipefail
cd "$(dirname "$0")/.."
root=${IMAGE_ROOT:-/var/tmp/connected-apps-image-root}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
bin=${BIN:-target/release/connected-apps}
redis_url=${IMAGE_REDIS_URL:-redis://127.0.0.1:6379/0}
pg_server=${IMAGE_DATABASE_SERVER:-postgres://postgres:postgres@127.0.0.1:5432}
log() { echo "check-image: $*" >&2; }

[ "$(id -u)" = 0 ] || { log "run as root (debootstrap, chroot and mounts need it)"; exit 2; }
command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null

# What the runtime stage installs, read from the Dockerfile itself.
packages=$(awk '/^FROM .* AS runtime/ {runtime = 1} runtime && /apt-get install/ {
  for (i = 1; i <= NF; i++) if ($i !~ /^-/ && $i != "apt-get" && $i != "install" && $i != "&&" && $i != "\\") print $i }' Dockerfile | tr '\n' ',' | sed 's/,$//')
[ -n "$packages" ] || { log "no apt-get install found in the Dockerfile's runtime stage"; exit 1; }
user_line=$(grep -E 'useradd .*--uid ([0-9]+)' Dockerfile) || { log "no useradd in the Dockerfile"; exit 1; }
uid=$(sed -E 's/.*--uid ([0-9]+).*/\1/' <<<"$user_line")

if [ ! -x "$bin" ]; then
  log "building $bin"
  cargo build --release --locked --bin connected-apps
fi

if [ -n "${IMAGE_ROOT_FRESH:-}" ] || [ ! -f "$root/.packages" ] || [ "$(cat "$root/.packages")" != "$packages" ]; then
  rm -rf "$root"
  log "debootstrap --variant=minbase --include=$packages bookworm into $root"
  debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" >/dev/null
  # As the Dockerfile's RUN lines do.
  chroot "$root" groupadd --system --gid "$uid" connected-apps
  chroot "$root" useradd --system --uid "$uid" --gid "$uid" --no-create-home \
    --home-dir /nonexistent --shell /usr/sbin/nologin connected-apps
  rm -rf "$root"/var/lib/apt/lists/*
  echo "$packages" > "$root/.packages"
fi

# The binary without debug information or symbols, as the builder stage
# leaves it. The Dockerfile builds it in the dist profile (fat LTO, 13 min
# here); stripping the release build of the same code spares CI that build
# (BIN=target/dist/connected-apps checks the image's own).
install -m 0755 "$bin" "$root/usr/local/bin/connected-apps"
strip --strip-all "$root/usr/local/bin/connected-apps"
size=$(du -h "$root/usr/local/bin/connected-apps" | cut -f1)
log "binary $(du -h "$bin" | cut -f1) as built, $size stripped as in the image"

run=$(mktemp -d /var/tmp/connected-apps-image-run.XXXXXX)
mounts=()
pid=
database="image_check_$(date +%s)_$$"
prefix="img$$"
cleanup() {
  [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount -l "${mounts[$i]}" 2>/dev/null || true; done
  rmdir "$run" 2>/dev/null || true
  psql -q "$pg_server/postgres" -c "DROP DATABASE IF EXISTS \"$database\" WITH (FORCE)" >/dev/null 2>&1 || true
  redis-cli -u "$redis_url" --scan --pattern "$prefix:*" 2>/dev/null | xargs -r redis-cli -u "$redis_url" del >/dev/null 2>&1 || true
}
trap cleanup EXIT
# The root read-only, as `readOnlyRootFilesystem: true` runs it, with the
# kernel's filesystems and a writable /tmp beside it.
mount --bind "$root" "$run"; mounts+=("$run")
mount -o remount,bind,ro "$run"
mount -t proc proc "$run/proc"; mounts+=("$run/proc")
mount --bind /dev "$run/dev"; mounts+=("$run/dev")
mount -t tmpfs tmpfs "$run/tmp"; mounts+=("$run/tmp")

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
image_env=(PATH=/usr/local/bin:/usr/bin:/bin APP_ENV=production PORT="$port" BIND_ADDRESS=127.0.0.1
  LOG_FORMAT=json DATABASE_URL="$pg_server/$database" REDIS_URL="$redis_url" REDIS_KEY_PREFIX="$prefix"
  JWT_SECRET=image-check-secret-of-at-least-32-bytes
  DATA_ENCRYPTION_KEYS="check:$(head -c 32 /dev/urandom | base64)")
log "serving as uid $uid on 127.0.0.1:$port from the read-only root"
# chroot execs env, which execs the binary: $! is the service itself.
chroot --userspec="$uid:$uid" "$run" /usr/bin/env -i "${image_env[@]}" \
  /usr/local/bin/connected-apps serve > /var/tmp/connected-apps-image-check.log 2>&1 &
pid=$!
for _ in $(seq 120); do
  if curl -fs "http://127.0.0.1:$port/health/ready" >/dev/null; then break; fi
  kill -0 "$pid" 2>/dev/null || { cat /var/tmp/connected-apps-image-check.log >&2; log "the service stopped"; exit 1; }
  sleep 0.5
done
curl -fs "http://127.0.0.1:$port/health/ready" >/dev/null \
  || { cat /var/tmp/connected-apps-image-check.log >&2; log "/health/ready never answered"; exit 1; }
chroot --userspec="$uid:$uid" "$run" /usr/bin/env -i "${image_env[@]}" \
  /usr/local/bin/connected-apps healthcheck || { log "the image's HEALTHCHECK failed"; exit 1; }
log "/health/ready answers and the HEALTHCHECK passes"
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
pid=
[ "$status" = 0 ] || { cat /var/tmp/connected-apps-image-check.log >&2; log "exit $status after SIGTERM"; exit 1; }
log "stopped cleanly on SIGTERM"
