#!/usr/bin/env bash
# Builds Stemma, starts it with its embedded defaults, creates a branch of `main` and connects
# to it. Safe to run again: it reuses what already exists.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/rust-env.sh

scripts/install-deps.sh
echo "==> building stemma (release)"
cargo build --release --quiet -p stemma-cli
bin="${CARGO_TARGET_DIR:-$PWD/target}/release/stemma"
if [ -w /usr/local/bin ]; then
    ln -sf "$bin" /usr/local/bin/stemma
    stemma=stemma
else
    stemma="$bin"
fi

echo "==> starting the daemon"
"$stemma" up
echo
if ! "$stemma" branch get dev-alice >/dev/null 2>&1; then
    echo "==> creating branch dev-alice from main"
    "$stemma" branch create dev-alice --parent main
    echo
fi
echo "==> branches"
"$stemma" branch list
echo
echo "==> connecting to dev-alice"
"$stemma" psql dev-alice -- -X -c "select 'hello from branch dev-alice' as greeting, current_database() as database, pg_size_pretty(pg_database_size(current_database())) as size"
cat <<TXT
Connect yourself:   psql "$("$stemma" connection-string dev-alice)"
                    or: $stemma psql dev-alice
More:               $stemma branch create dev-bob --parent main
                    $stemma branch reset dev-alice
                    $stemma status
Stop everything:    $stemma down
TXT
