#!/usr/bin/env bash
# Runs the whole test suite against real Redis and PostgreSQL, starting
# them (installing them first on a fresh machine) when they do not answer.
# Each test makes its own database and Redis key prefix and drops them.
set -euo pipefail
cd "$(dirname "$0")/.."
export TEST_REDIS_URL=${TEST_REDIS_URL:-redis://127.0.0.1:6379/0}
export TEST_DATABASE_URL=${TEST_DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}
REDIS_URL=$TEST_REDIS_URL DATABASE_URL=$TEST_DATABASE_URL scripts/services.sh
RUST_TEST_THREADS=${RUST_TEST_THREADS:-4} cargo test --locked --all-targets
