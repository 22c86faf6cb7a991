#!/usr/bin/env bash
# The money simulation (tests/money_sim.rs) over many seeds: a million by default, in a release
# build. It stops at the first seed whose invariants break and prints that seed with the command
# that replays it alone.
#
#   bash benches/money_sim.sh                 # seeds 0 .. 999,999
#   SEEDS=100000 FIRST=500000 bash benches/money_sim.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-1000000}
FIRST=${FIRST:-0}
# The store suite's PostgreSQL is not needed: the simulation runs on a SQLite file.
DUANG_SIM_SEEDS=$SEEDS DUANG_SIM_FIRST_SEED=$FIRST \
  cargo test --release --locked --test money_sim -- --nocapture --test-threads 1
