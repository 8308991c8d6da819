#!/usr/bin/env bash
# Runs the whole test suite: unit tests and integration tests with real PostgreSQL computes
# and the real daemon. Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/rust-env.sh

scripts/install-deps.sh
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "stemma: installing cargo-nextest" >&2
    cargo install --locked cargo-nextest >/dev/null 2>&1 || true
fi
profile=default
[ "${CI:-}" = "true" ] && profile=ci
status=0
if cargo nextest --version >/dev/null 2>&1; then
    # Everything, on the default storage driver (`auto`: the pagestore where FUSE works)...
    cargo nextest run --workspace --profile "$profile" "$@" || status=$?
    # ...and the daemon's integration tests again on the copy driver, the fallback of hosts
    # without FUSE, so that both drivers are held to the same behaviour.
    if [ -e /dev/fuse ] && [ -z "${STEMMA_STORAGE:-}" ]; then
        echo "==> the daemon's integration tests on the copy driver"
        # (--workspace with a filter, not -p: the same feature set, so nothing is rebuilt.)
        STEMMA_STORAGE=copy STEMMA_PROXY_SHORTCUT=0 cargo nextest run --workspace -E 'package(stemma-cli)' \
            --profile "$profile" "$@" || status=$?
    fi
else
    cargo test --workspace "$@" || status=$?
fi
exit "$status"
