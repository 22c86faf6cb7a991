#!/usr/bin/env bash
# What the settlement journal costs a request, measured alone: serializing one settlement, one
# append to the segment (no fsync), and marking it stored, 200,000 times, in a release build.
#   bash benches/journal_cost.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --locked --lib gateway::nodes::tests::journal_cost -- --ignored --nocapture 2>&1 \
  | grep -E '^journal:'
