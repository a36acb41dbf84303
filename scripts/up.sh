#!/usr/bin/env bash
# Brings the service up on a fresh machine: Redis and PostgreSQL (started,
# or installed and started, on loopback when they do not answer), the
# database, migrations and the seeded catalog, then every role on :8000.
set -euo pipefail
cd "$(dirname "$0")/.."
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
export DATABASE_URL=${DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/connected_apps}
export LOG_FORMAT=${LOG_FORMAT:-text}
scripts/services.sh
cargo build --release --locked
target/release/connected-apps migrate
exec target/release/connected-apps serve "$@"
