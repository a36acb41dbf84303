#!/usr/bin/env bash
# The billing simulation (tests/simulation.rs) at length: random sequences
# of subscriptions, plan changes, cancellations, purchases, refunds,
# disputes, consumes, late, doubled, shuffled and lost webhooks, missed
# scheduler runs, Redis wipes, killed flushers and failing Stripe calls,
# against the real service, Redis and PostgreSQL, with the books checked
# after every step.
#
#   scripts/simulate.sh [STEPS]       STEPS in all (default 2000)
#
# SIM_STEPS (steps a sequence, default 60), SIM_PARALLEL (sequences at
# once, default 8: most of a sequence's time is spent waiting for period
# boundaries) and SIM_SEED (the first seed; default drawn and printed) as
# in tests/simulation.rs. A failure prints its seed and its shrunk
# sequence; SIM_SEED=<seed> SIM_SEQUENCES=1 replays it. Release build.
set -euo pipefail
cd "$(dirname "$0")/.."
export TEST_REDIS_URL=${TEST_REDIS_URL:-redis://127.0.0.1:6379/0}
export TEST_DATABASE_URL=${TEST_DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}
REDIS_URL=$TEST_REDIS_URL DATABASE_URL=$TEST_DATABASE_URL scripts/services.sh
steps=${1:-2000}
export SIM_STEPS=${SIM_STEPS:-60}
export SIM_PARALLEL=${SIM_PARALLEL:-8}
export SIM_SEQUENCES=$(( (steps + SIM_STEPS - 1) / SIM_STEPS ))
echo "simulate: $SIM_SEQUENCES sequences of $SIM_STEPS steps, $SIM_PARALLEL at once" >&2
started=$(date +%s)
cargo test --release --locked --test simulation -- --nocapture
echo "simulate: done in $(( $(date +%s) - started )) s" >&2
