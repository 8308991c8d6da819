#!/usr/bin/env bash
# The page store's model test, long: random operations (writes, truncates, renames, unlinks,
# branches at past positions, GC, compaction, checkpoints, clean reopens and simulated power
# losses at random bytes) against an in-memory model. CI runs 48 cases per `cargo nextest`;
# this runs CASES (default 2000) in release mode and prints how long it took. A failure
# prints the minimal sequence of operations, and proptest records its seed in
# crates/stemma-pagestore/tests/model.proptest-regressions so the next run replays it first.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/rust-env.sh
cases=${CASES:-2000}
start=$(date +%s)
PROPTEST_CASES=$cases cargo nextest run --release -p stemma-pagestore --test model
echo "model test: $cases cases passed in $(( $(date +%s) - start )) s"
