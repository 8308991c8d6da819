#!/usr/bin/env bash
# Branch creation on the pagestore by database size, while the parent is being written.
#
#   bench/pagestore-branch.sh [SCALE...]    pgbench scales; default "68 680" (about 1 GB and 10 GB)
#
# The pagestore issue's goals: `stemma branch create` from the CLI has a median under 50 ms, the
# same on a 1 GB and a 10 GB database (ratio <= 1.2), and the first query on a new branch
# answers in under 1 s. For each size, with pgbench writing to the parent throughout (a branch
# needs no pause of the parent), REPS times (default 11):
#   create        wall time of `stemma branch create NAME --parent ROOT` (the CLI process)
#   first query   wall time of the first `psql -c 'select count(*) from pgbench_branches'` on
#                 the new branch: its compute starts (wakes) and recovers like after a crash,
#                 replaying the parent's WAL since the parent's last checkpoint (which the
#                 daemon moves to the branch point when the parent has written more than
#                 --checkpoint-before-branch since it: then create waits for a checkpoint)
# then the same with the parent idle after a checkpoint ("idle"), once every size is loaded
# and the sizes taking turns trial by trial (so that the host's drift falls on all alike).
# Creates are printed apart: an idle create is the branch record alone, whose median must not
# grow with the size (the ratio printed at the end; "daemon" is the same create as the
# daemon's log times it, without the CLI process); a busy create may include the parent's
# checkpoint. Every size stays on disk until the end (about 12 GB for the default sizes).
# A branch of a busy parent is a crash image with the parent's WAL since its last checkpoint
# to replay, which PostgreSQL needs on any disk: with NATIVE=1 (the default) each busy trial
# also copies the same image (a second branch of the new one, which nobody started) to a
# directory next to the data directory and times a plain `postgres` with the compute's
# settings on it, from its start to the same first query ("native"); page caches are dropped
# before each of the two timings, so both start cold. The ratio of the medians is printed.
# VERBOSE=1 prints each busy trial's redo and end-of-recovery checkpoint times from both logs.
# Prints medians and p90s per size, and the ratio of the largest size's create median to the
# smallest's. Everything runs in a temporary data directory that is removed at the end.
# KEEP_LOGS=DIR copies the daemon's, the pagestore server's and the computes' logs there at the
# end (the daemon's "branch created" and the server's "created branch" lines give each create's
# parts; STEMMA_LOG sets their level).
# Needs root and FUSE (the daemon is started with --storage pagestore).
set -euo pipefail
cd "$(dirname "$0")/.."
scales=("$@")
[ ${#scales[@]} -gt 0 ] || scales=(68 680)
reps=${REPS:-11}
dir_base=${BENCH_DIR:-/var/tmp}
# BRANCH_SETTINGS="NAME=VALUE ...": settings of each new branch (`branch create --setting`).
setting_args=()
for kv in ${BRANCH_SETTINGS:-}; do setting_args+=(--setting "$kv"); done

scripts/install-deps.sh >/dev/null
source scripts/rust-env.sh
cargo build --release --quiet -p stemma-cli
stemma="${CARGO_TARGET_DIR:-$PWD/target}/release/stemma"
work=$(mktemp -d "$dir_base/stemma-bench-XXXXXX")
chmod 711 "$work"
export STEMMA_DATA_DIR="$work/data"
native=${NATIVE:-1}
writer=""
native_pid=""
cleanup() {
    [ -n "$writer" ] && kill "$writer" 2>/dev/null && wait "$writer" 2>/dev/null
    # From its pid file: native_first_query runs in a command substitution's subshell, so
    # native_pid is not set here.
    stop_native
    "$stemma" down >/dev/null 2>&1 || true
    [ -z "${KEEP_LOGS:-}" ] || cp -r "$STEMMA_DATA_DIR/logs" "$KEEP_LOGS"
    rm -rf "$work"
}
trap cleanup EXIT

"$stemma" up --api-listen 127.0.0.1:0 --port-base 47200 --storage pagestore >/dev/null
pgbin=$("$stemma" --output json status | python3 -c 'import json,sys; print(json.load(sys.stdin)["postgres_bin_dir"])')

now() { date +%s.%N; }
calc() { awk "BEGIN { print $* }"; }
pct() { sort -n | awk -v p="$1" '{a[NR]=$1} END {i=int(NR*p+0.999); if (i<1) i=1; print a[i]}'; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)[\"$1\"])"; }

# VERBOSE=1: what a recovery's log says of its redo and its end-of-recovery checkpoint.
recovery_lines() { # LABEL LOG
    sed -n 's/.*\(redo done at [^ ]*\).*elapsed: \([0-9.]* s\).*/\1 in \2/p; s/.*checkpoint complete: \(wrote [0-9]* buffers\).*\(sync=[0-9.]* s\), \(total=[0-9.]* s\).*/checkpoint \1, \2, \3/p' "$2" |
        tail -2 | paste -sd ';' | sed "s/^/  $1: /" >&2
}
# Stops the native postgres (immediately: its data directory is thrown away).
stop_native() {
    local pm
    pm=$(head -1 "$work/native/postmaster.pid" 2>/dev/null) && kill -QUIT "$pm" 2>/dev/null
    [ -z "$native_pid" ] || wait "$native_pid" 2>/dev/null || true
    native_pid=""
}
mount_of() { echo "$STEMMA_DATA_DIR/pagestore/mnt/$("$stemma" --output json branch get "$1" | field timeline_id)"; }
# The `-c` settings of the running compute of branch $1, without where it listens.
compute_settings() {
    local pid
    pid=$(head -1 "$(mount_of "$1")/postmaster.pid")
    tr '\0' '\n' <"/proc/$pid/cmdline" | awk 'prev == "-c" && !/^(unix_socket_directories|listen_addresses|port)=/ {print} {prev = $0}'
}
# Times a native `postgres` on a copy of the branch $1 (never started), with the settings of
# the compute of $2, from its start to the first query's answer, in ms.
native_first_query() {
    local copy="$work/native" sock="$work/native-run" owner args=() t0 t1 i
    rm -rf "$copy" "$sock"
    cp -a "$(mount_of "$1")" "$copy"
    rm -f "$copy/postmaster.pid"
    owner=$(stat -c %U "$copy")
    mkdir -p "$sock"
    echo "local all all trust" >"$sock/hba.conf"
    chown -R "$owner" "$sock"
    while read -r kv; do args+=(-c "$kv"); done < <(compute_settings "$2")
    args+=(-c "port=47399" -c "listen_addresses=" -c "unix_socket_directories=$sock" -c "hba_file=$sock/hba.conf")
    sync; echo 3 >/proc/sys/vm/drop_caches
    t0=$(now)
    runuser -u "$owner" -- "$pgbin/postgres" -D "$copy" "${args[@]}" >"$sock/log" 2>&1 &
    native_pid=$!
    for i in $(seq 60000); do # bounded: 10 minutes at most
        runuser -u "$owner" -- "$pgbin/psql" -X -q -At -h "$sock" -p 47399 -U "$dbuser" -d postgres \
            -c 'select count(*) from pgbench_branches' >/dev/null 2>&1 && break
        kill -0 "$native_pid" 2>/dev/null || { echo "native postgres exited: $(tail -3 "$sock/log")" >&2; exit 1; }
        sleep 0.01
    done
    t1=$(now)
    [ -n "${VERBOSE:-}" ] && recovery_lines native "$sock/log"
    stop_native
    rm -rf "$copy"
    calc "($t1 - $t0) * 1000"
}

echo "host: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), data in $work ($(df -hT "$work" | awk 'NR==2 {print $2}'))"
# Each trial's results, by scale: space-separated lists.
declare -A creates busy_creates queries idle natives daemon_ms sizes
trial() { # SCALE NAME KIND: KIND queries (busy) or idle
    local scale=$1 root="bench-$1" t0 t1 t2 t3 bconn q
    t0=$(now)
    "$stemma" branch create "$2" --parent "$root" "${setting_args[@]}" >/dev/null
    t1=$(now)
    bconn=$("$stemma" connection-string "$2")
    if [ "$3" = queries ] && [ "$native" = 1 ]; then
        "$stemma" branch create "$2-copy" --parent "$2" >/dev/null
        natives[$scale]+=" $(native_first_query "$2-copy" "$root")"
        "$stemma" branch delete "$2-copy" >/dev/null
        sync; echo 3 >/proc/sys/vm/drop_caches
    fi
    t2=$(now)
    "$pgbin/psql" -X -q -At -c 'select count(*) from pgbench_branches' "$bconn" >/dev/null
    t3=$(now)
    if [ -n "${VERBOSE:-}" ] && [ "$3" = queries ]; then
        recovery_lines branch "$(grep -l "redo starts" "$STEMMA_DATA_DIR"/logs/compute-*.log | xargs ls -t | head -1)"
    fi
    q=$(calc "($t3 - $t2) * 1000")
    if [ "$3" = queries ]; then
        busy_creates[$scale]+=" $(calc "($t1 - $t0) * 1000")"
        queries[$scale]+=" $q"
    else
        creates[$scale]+=" $(calc "($t1 - $t0) * 1000")"
        idle[$scale]+=" $q"
        # The daemon's own time for the same create (its log), without the CLI process.
        daemon_ms[$scale]+=" $(grep -o "branch created branch=$2 .*total_ms=[0-9]*" "$STEMMA_DATA_DIR/logs/daemon.log" | tail -1 | sed 's/.*total_ms=//')"
    fi
    "$stemma" branch delete "$2" >/dev/null
}
list_pct() { printf '%s\n' $1 | pct "$2"; }

# Per size: the parent, its load, and the busy trials while pgbench writes to it.
for scale in "${scales[@]}"; do
    root="bench-$scale"
    "$stemma" init --name "$root" >/dev/null
    conn=$("$stemma" connection-string "$root")
    dbuser=$(echo "$conn" | sed 's|^postgresql://\([^:@]*\).*|\1|')
    "$pgbin/pgbench" -i -q -s "$scale" "$conn" >/dev/null 2>&1
    sizes[$scale]=$("$stemma" --output json branch get "$root" | field logical_size_bytes)
    # The parent is written throughout: a branch never pauses it.
    "$pgbin/pgbench" -n -c 2 -T 100000 "$conn" >/dev/null 2>&1 &
    writer=$!
    sleep 2
    for i in $(seq "$reps"); do trial "$scale" "$root-b$i" queries; done
    kill "$writer" 2>/dev/null; wait "$writer" 2>/dev/null || true
    writer=""
    # The parent idle after its writes: its next timed checkpoint (checkpoint_timeout) leaves
    # a new branch almost nothing to replay; CHECKPOINT stands in for waiting for it.
    "$pgbin/psql" -X -q -c checkpoint "$conn"
done
# The idle trials, every size in turn (1 GB, 10 GB, 1 GB, ...), so that what the host does
# meanwhile falls on all sizes alike. `sync`: they start with nothing of the busy phases still
# queued for the disk (as bench/pagestore-pgbench.sh does before each measurement).
sync
for i in $(seq "$reps"); do
    for scale in "${scales[@]}"; do trial "$scale" "bench-$scale-i$i" idle; done
done

printf '%-6s %9s %14s %14s %10s %17s %17s %17s %17s %8s\n' scale size "idle create p50" "idle create p90" "daemon p50" "busy create p50/90" "1st q. busy p50/90" "native p50/90" "1st q. idle p50/90" "busy/nat"
first_create=""; last_create=""; first_busy=""; last_busy=""; first_daemon=""; last_daemon=""
for scale in "${scales[@]}"; do
    b50=$(list_pct "${busy_creates[$scale]}" 0.5)
    b90=$(list_pct "${busy_creates[$scale]}" 0.9)
    c50=$(list_pct "${creates[$scale]}" 0.5)
    c90=$(list_pct "${creates[$scale]}" 0.9)
    d50=$(list_pct "${daemon_ms[$scale]}" 0.5)
    q50=$(list_pct "${queries[$scale]}" 0.5)
    q90=$(list_pct "${queries[$scale]}" 0.9)
    i50=$(list_pct "${idle[$scale]}" 0.5)
    i90=$(list_pct "${idle[$scale]}" 0.9)
    n50=0; n90=0; nratio="   -"
    if [ -n "${natives[$scale]:-}" ]; then
        n50=$(list_pct "${natives[$scale]}" 0.5)
        n90=$(list_pct "${natives[$scale]}" 0.9)
        nratio=$(awk "BEGIN { printf \"%.2f\", $q50 / $n50 }")
    fi
    printf '%-6s %8.0fM %11.1f ms %11.1f ms %7.0f ms %9.0f/%4.0f ms %9.0f/%4.0f ms %9.0f/%4.0f ms %9.0f/%4.0f ms %8s\n' "$scale" \
        "$(calc "${sizes[$scale]} / 1048576")" "$c50" "$c90" "$d50" "$b50" "$b90" "$q50" "$q90" "$n50" "$n90" "$i50" "$i90" "$nratio"
    [ -n "$first_create" ] || { first_create=$c50; first_busy=$b50; first_daemon=$d50; }
    last_create=$c50; last_busy=$b50; last_daemon=$d50
done
for scale in "${scales[@]}"; do
    "$stemma" branch delete "bench-$scale" >/dev/null 2>&1 || "$stemma" compute stop "bench-$scale" >/dev/null
done
if [ "${#scales[@]}" -gt 1 ]; then
    ratio=$(calc "$last_create / $first_create")
    verdict=$(awk "BEGIN { print ($ratio <= 1.2) ? \"ok\" : \"ABOVE GOAL\" }")
    printf 'idle create median, largest / smallest size: %.2f (goal <= 1.2: %s)\n' "$ratio" "$verdict"
    printf 'idle create median in the daemon (its log; no CLI process), largest / smallest size: %s ms / %s ms\n' \
        "$last_daemon" "$first_daemon"
    printf 'busy create median (may include a checkpoint of the parent), largest / smallest size: %.2f\n' \
        "$(calc "$last_busy / $first_busy")"
fi
