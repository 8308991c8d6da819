#!/usr/bin/env bash
# Runs the whole test suite: unit tests and integration tests with real PostgreSQL computes
# and the real daemon. Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "stemma: installing cargo-nextest" >&2
    cargo install --locked cargo-nextest >/dev/null 2>&1 || true
fi
profile=default
[ "${CI:-}" = "true" ] && profile=ci
if cargo nextest --version >/dev/null 2>&1; then
    exec cargo nextest run --workspace --profile "$profile" "$@"
else
    exec cargo test --workspace "$@"
fi
