#!/usr/bin/env bash
# How branch creation time grows with database size on the `copy` driver, against a plain
# `cp -a` of the same data directory (the baseline the pagestore has to beat).
#
#   bench/branch-create.sh [SCALE...]     pgbench scales; default "7 68" (about 100 MB and 1 GB)
#
# For each size it times, as the median of REPS runs (default 3):
#   cp -a           a plain copy of the parent's data directory (compute stopped)
#   create/stopped  `stemma branch create` from a parent whose compute is stopped
#   create/running  `stemma branch create` from a running parent (online backup)
# and prints each against cp -a. Everything runs in a temporary directory that is removed.
set -euo pipefail
cd "$(dirname "$0")/.."
scales=("$@")
[ ${#scales[@]} -gt 0 ] || scales=(7 68)
reps=${REPS:-3}

scripts/install-deps.sh
cargo build --release --quiet -p stemma-cli
stemma="${CARGO_TARGET_DIR:-$PWD/target}/release/stemma"
work=$(mktemp -d /tmp/stemma-bench-XXXXXX)
chmod 711 "$work"
export STEMMA_DATA_DIR="$work/data"
cleanup() {
    "$stemma" down >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

"$stemma" up --api-listen 127.0.0.1:0 --port-base 47000 >/dev/null
pgbin=$("$stemma" --output json status | python3 -c 'import json,sys; print(json.load(sys.stdin)["postgres_bin_dir"])')
storage=$("$stemma" --output json status | python3 -c 'import json,sys; print(json.load(sys.stdin)["storage_detail"])')

now() { date +%s.%N; }
calc() { awk "BEGIN { print $* }"; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)[\"$1\"])"; }

echo "storage: $storage"
echo "host: $(nproc) cores, $(df -hT "$work" | awk 'NR==2 {print $2}') at $work"
printf '%-6s %10s %10s %16s %16s %10s %10s\n' scale size "cp -a" "create/stopped" "create/running" "vs cp" "vs cp"
for scale in "${scales[@]}"; do
    root="bench-$scale"
    "$stemma" init --name "$root" >/dev/null
    conn=$("$stemma" connection-string "$root")
    "$pgbin/pgbench" -i -q -s "$scale" "$conn" >/dev/null 2>&1
    "$pgbin/psql" -X -q -c checkpoint "$conn"
    size=$("$stemma" --output json branch get "$root" | field logical_size_bytes)
    dir="$work/data/timelines/$("$stemma" --output json branch get "$root" | field timeline_id)"

    "$stemma" compute stop "$root" >/dev/null
    cp_times=(); stopped_times=()
    for _ in $(seq "$reps"); do
        t0=$(now); cp -a "$dir" "$work/cp"; sync -f "$work/cp"; t1=$(now)
        rm -rf "$work/cp"
        cp_times+=("$(calc "$t1 - $t0")")
        t0=$(now); "$stemma" branch create "$root-copy" --parent "$root" >/dev/null; t1=$(now)
        stopped_times+=("$(calc "$t1 - $t0")")
        "$stemma" branch delete "$root-copy" >/dev/null
    done
    "$stemma" compute start "$root" >/dev/null
    running_times=()
    for _ in $(seq "$reps"); do
        t0=$(now); "$stemma" branch create "$root-copy" --parent "$root" >/dev/null; t1=$(now)
        running_times+=("$(calc "$t1 - $t0")")
        "$stemma" branch delete "$root-copy" >/dev/null
    done
    cp_m=$(printf '%s\n' "${cp_times[@]}" | median)
    st_m=$(printf '%s\n' "${stopped_times[@]}" | median)
    run_m=$(printf '%s\n' "${running_times[@]}" | median)
    printf '%-6s %9.0fM %9.2fs %15.2fs %15.2fs %9.2fx %9.2fx\n' "$scale" \
        "$(calc "$size / 1048576")" "$cp_m" "$st_m" "$run_m" \
        "$(calc "$st_m / $cp_m")" "$(calc "$run_m / $cp_m")"
    "$stemma" compute stop "$root" >/dev/null
done
