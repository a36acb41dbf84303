#!/usr/bin/env bash
# Runs the whole test suite against real Redis and PostgreSQL, starting
# them (installing them first on a fresh machine) when they do not answer;
# then the integration tests once more against a Redis Cluster of three
# masters on loopback (scripts/redis-cluster.sh), which is what a
# deployment past one Redis runs. Each test makes its own database and
# Redis key prefix and drops them. TEST_REDIS_CLUSTER=0 skips the second
# pass.
set -euo pipefail
cd "$(dirname "$0")/.."
export TEST_REDIS_URL=${TEST_REDIS_URL:-redis://127.0.0.1:6379/0}
export TEST_DATABASE_URL=${TEST_DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}
REDIS_URL=$TEST_REDIS_URL DATABASE_URL=$TEST_DATABASE_URL scripts/services.sh
export RUST_TEST_THREADS=${RUST_TEST_THREADS:-4}
cargo test --locked --all-targets
if [ "${TEST_REDIS_CLUSTER:-1}" != 0 ]; then
  cluster=$(scripts/redis-cluster.sh)
  echo "test.sh: the integration tests again, against the Redis Cluster at $cluster" >&2
  # A cluster has one database: the test of a limiter in a Redis of its
  # own keeps using database 2 of the single server.
  TEST_LIMITER_REDIS_URL="${TEST_REDIS_URL%/*}/2" TEST_REDIS_URL=$cluster \
    cargo test --locked --test api
fi
