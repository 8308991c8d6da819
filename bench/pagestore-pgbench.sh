#!/usr/bin/env bash
# pgbench on a pagestore (FUSE) data directory against the same PostgreSQL on a plain
# directory of the host filesystem, in the same run, interleaved, several repetitions.
# Prints medians and the ratios the pagestore issue sets as goals:
#   TPC-B tps ratio >= 0.90, select-only tps ratio >= 0.90, `pgbench -i` time ratio <= 1.5.
#
# Needs root (FUSE mounts as root, PostgreSQL runs as the `postgres` user), /dev/fuse and
# PostgreSQL 15. Everything it starts is stopped and unmounted on exit, even on failure.
#
# Settings (environment): REPS (3), SCALE (20), CLIENTS (4), JOBS (2), DURATION (30 s per
# pgbench run), PG_BIN, BENCH_DIR (a directory on the host filesystem, default /var/tmp),
# SKIP_BUILD (use the helper already built), WAL_SYNC_METHOD (fdatasync, the computes'
# default; both sides use it), DROP_CACHES (1: empty the page cache before each load).
# VARIANTS compares several pagestore configurations in the same run: space-separated
# NAME[:VAR=VALUE,...] with the STEMMA_FUSE_* variables of
# crates/stemma-fuse/examples/pagestore-mount.rs, e.g.
#   VARIANTS="pagestore walmount:STEMMA_FUSE_LIVE=0" (pg_wal on a FUSE mount, not live)
# (default: "pagestore", the driver's defaults). Ratios are printed for each variant.
# BIN=PATH among a variant's settings runs that variant with another build of the mount helper
# (e.g. a copy built from the base commit), to compare engine versions in the same run;
# BDI_MAX_RATIO=N lets the kernel keep up to N% of its dirty page cache for that mount (FUSE
# mounts get 1% under a strict limit by default).
# HALT_POLL_NS=N sets the guest's idle halt polling (/sys/module/haltpoll/parameters/
# guest_halt_poll_ns) for the whole run, both sides, and puts the old value back on exit: on a
# VM whose idle CPUs halt at once, every wake-up costs a VM exit, and a FUSE round trip has
# two of them (see docs/pagestore.md, "Wake-ups on this VM"). A host setting, not Stemma's.
set -euo pipefail

REPS=${REPS:-3}
SCALE=${SCALE:-20}
CLIENTS=${CLIENTS:-4}
JOBS=${JOBS:-2}
DURATION=${DURATION:-30}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
BENCH_DIR=${BENCH_DIR:-/var/tmp}
HERE=$(cd "$(dirname "$0")/.." && pwd)

[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
PGUID=$(id -u postgres)
PGGID=$(id -g postgres)

if [ -z "${SKIP_BUILD:-}" ]; then
  echo "building the mount helper (release)..." >&2
  (cd "$HERE" && cargo build --release -q -p stemma-fuse --example pagestore-mount)
fi
MOUNT_BIN="${CARGO_TARGET_DIR:-$HERE/target}/release/examples/pagestore-mount"

WORK=$(mktemp -d "$BENCH_DIR/stemma-pgbench.XXXXXX")
chmod 711 "$WORK"
MOUNT_PIDS=()
declare -A PGDATA

cleanup() {
  set +e
  for t in "${!PGDATA[@]}"; do
    d=${PGDATA[$t]:-}
    [ -n "$d" ] && [ -f "$d/postmaster.pid" ] &&
      runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$d" -m fast -w -t 60 stop >/dev/null 2>&1
  done
  for pid in "${MOUNT_PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  # Whatever is still mounted below the work directory goes (a crashed helper).
  grep -o " $WORK/[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m"; done
  rm -rf "$WORK"
  [ -n "${OLD_HALT_POLL:-}" ] && echo "$OLD_HALT_POLL" >"$HALT_POLL_PARAM"
}
trap cleanup EXIT INT TERM

HALT_POLL_PARAM=/sys/module/haltpoll/parameters/guest_halt_poll_ns
if [ -n "${HALT_POLL_NS:-}" ]; then
  [ -w "$HALT_POLL_PARAM" ] || { echo "HALT_POLL_NS: no $HALT_POLL_PARAM here" >&2; exit 1; }
  OLD_HALT_POLL=$(cat "$HALT_POLL_PARAM")
  echo "$HALT_POLL_NS" >"$HALT_POLL_PARAM"
  echo "guest halt polling: $HALT_POLL_NS ns for this run (was $OLD_HALT_POLL)" >&2
fi

# The compute's settings (stemma-control's DEFAULT_SETTINGS) for both sides.
SETTINGS=(-c shared_buffers=32MB -c max_connections=100 -c work_mem=4MB
  -c maintenance_work_mem=32MB -c effective_cache_size=256MB -c max_wal_size=512MB
  -c min_wal_size=32MB -c wal_level=replica -c max_wal_senders=4 -c max_replication_slots=4
  -c max_worker_processes=4 -c max_parallel_workers=2 -c max_parallel_workers_per_gather=1
  -c autovacuum_max_workers=2 -c huge_pages=off -c jit=off -c logging_collector=off
  -c recovery_init_sync_method=syncfs -c wal_sync_method=${WAL_SYNC_METHOD:-fdatasync}
  -c wal_recycle=off -c wal_init_zero=on
  -c listen_addresses=)

# Native: a directory of the host filesystem.
mkdir -p "$WORK/native"
chown postgres:postgres "$WORK/native"
chmod 700 "$WORK/native"
PGDATA[native]="$WORK/native"

# Pagestore: one timeline per variant, each mounted by its own helper process.
VARIANTS=${VARIANTS:-pagestore}
TARGETS=(native)
MOUNT_PIDS=()
# SCHED=POLICY_PRIO among a variant's settings: `chrt -a POLICY -p PRIO` on its helper's threads once its
# compute's pg_wal is mounted (e.g. SCHED=-f_1 for SCHED_FIFO at priority 1).
declare -A SCHED
for v in $VARIANTS; do
  name=${v%%:*}
  envs=()
  [ "$name" != "$v" ] && IFS=, read -r -a envs <<<"${v#*:}"
  bin=$MOUNT_BIN
  ratio=
  for i in "${!envs[@]}"; do
    case ${envs[$i]} in
      BIN=*) bin=${envs[$i]#BIN=} && unset "envs[$i]" ;;
      BDI_MAX_RATIO=*) ratio=${envs[$i]#BDI_MAX_RATIO=} && unset "envs[$i]" ;;
      SCHED=*) SCHED[$name]=${envs[$i]#SCHED=} && SCHED[$name]=${SCHED[$name]//_/ } && unset "envs[$i]" ;;
    esac
  done
  env "${envs[@]}" "$bin" "$WORK/$name" 0a --owner "$PGUID:$PGGID" \
    >"$WORK/$name.out" 2>"$WORK/$name.mount.log" &
  MOUNT_PIDS+=($!)
  for _ in $(seq 100); do
    [ -s "$WORK/$name.out" ] && break
    kill -0 "${MOUNT_PIDS[-1]}" 2>/dev/null || { cat "$WORK/$name.mount.log" >&2; exit 1; }
    sleep 0.1
  done
  PGDATA[$name]=$(head -1 "$WORK/$name.out")
  grep -q " ${PGDATA[$name]} " /proc/mounts || { echo "$name: not mounted" >&2; exit 1; }
  if [ -n "$ratio" ]; then
    # The share of the dirty page cache the kernel lets this mount hold (FUSE: 1%, strict).
    bdi=/sys/class/bdi/$(mountpoint -d "${PGDATA[$name]}")
    echo "$ratio" >"$bdi/max_ratio"
    [ -e "$bdi/strict_limit" ] && echo 0 >"$bdi/strict_limit"
  fi
  echo "$name (${envs[*]:-defaults}): $(sed -n 2p "$WORK/$name.mount.log")" >&2
  TARGETS+=("$name")
done

mkdir -p "$WORK/sock" "$WORK/logs"
chown postgres:postgres "$WORK/sock" "$WORK/logs"
port_of() {
  local i
  for i in "${!TARGETS[@]}"; do [ "${TARGETS[$i]}" = "$1" ] && echo $((5501 + i)); done
}

for t in "${TARGETS[@]}"; do
  runuser -u postgres -- "$PG_BIN/initdb" -D "${PGDATA[$t]}" -U postgres --auth=trust \
    --no-instructions >/dev/null
  if [ "$t" != native ]; then
    # What the daemon does before it starts a compute (mounts pg_wal on its own connection).
    for i in "${!TARGETS[@]}"; do [ "${TARGETS[$i]}" = "$t" ] && kill -USR2 "${MOUNT_PIDS[$((i - 1))]}"; done
    for _ in $(seq 100); do grep -q "ready for a compute\|readying the timeline failed" "$WORK/$t.mount.log" && break; sleep 0.1; done
    grep -q "ready for a compute" "$WORK/$t.mount.log" || { echo "$t: not ready for a compute" >&2; cat "$WORK/$t.mount.log" >&2; exit 1; }
    case "$(awk -v m="${PGDATA[$t]}/pg_wal" '$2 == m {print $3}' /proc/mounts)" in
      fuse*) echo "$t: pg_wal on a FUSE mount of its own (passthrough)" >&2 ;;
      "") echo "$t: pg_wal on the timeline's mount (pages)" >&2 ;;
      *) echo "$t: pg_wal a live directory (bind mount)" >&2 ;;
    esac
    if [ -n "${SCHED[$t]:-}" ]; then
      for i in "${!TARGETS[@]}"; do [ "${TARGETS[$i]}" = "$t" ] && read -r pol prio <<<"${SCHED[$t]}" && chrt -a "$pol" -p "$prio" "${MOUNT_PIDS[$((i - 1))]}"; done
      echo "$t: helper threads scheduled with chrt ${SCHED[$t]}" >&2
    fi
  fi
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "${PGDATA[$t]}" -w -t 120 \
    -l "$WORK/logs/$t.log" -o "-p $(port_of "$t") -k $WORK/sock ${SETTINGS[*]}" start >/dev/null
done

pgb() { # target, args...
  local t=$1
  shift
  runuser -u postgres -- "$PG_BIN/pgbench" -h "$WORK/sock" -p "$(port_of "$t")" -U postgres "$@" postgres
}

RESULTS="$WORK/results.tsv"
: >"$RESULTS"
for rep in $(seq "$REPS"); do
  # Alternate the order, so that drift of the host favours no side.
  order=("${TARGETS[@]}")
  if [ $((rep % 2)) = 0 ]; then
    order=()
    for ((i = ${#TARGETS[@]} - 1; i >= 0; i--)); do order+=("${TARGETS[$i]}"); done
  fi
  for t in "${order[@]}"; do
    # Each measurement starts with nothing of an earlier one still queued for the disk (the
    # previous target's writeback would otherwise slow whichever target comes next), and each
    # load with the page cache emptied: on this VM a page of memory the guest has not used
    # yet costs the hypervisor a fault on first touch, so a load that had to take fresh
    # memory (the earlier loads' cache holding the recycled pages) ran at a fraction of the
    # speed, whichever side it was (docs/pagestore.md, "Live directories"). DROP_CACHES=0
    # keeps the cache.
    sync
    [ "${DROP_CACHES:-1}" = 0 ] || echo 3 >/proc/sys/vm/drop_caches
    start=$(date +%s.%N)
    if ! pgb "$t" -i -q -s "$SCALE" >"$WORK/init.log" 2>&1; then
      { echo "pgbench -i failed on $t:"; cat "$WORK/init.log"; tail -20 "$WORK/logs/$t.log"; } >&2
      exit 1
    fi
    end=$(date +%s.%N)
    init=$(echo "$end - $start" | bc)
    pgb "$t" -c 1 -j 1 -t 1 -n >/dev/null 2>&1 # touch
    runuser -u postgres -- "$PG_BIN/psql" -h "$WORK/sock" -p "$(port_of "$t")" -U postgres -qc checkpoint postgres
    sync
    tpcb=$(pgb "$t" -c "$CLIENTS" -j "$JOBS" -T "$DURATION" -n 2>/dev/null |
      sed -n 's/^tps = \([0-9.]*\).*/\1/p')
    sync
    sel=$(pgb "$t" -S -c "$CLIENTS" -j "$JOBS" -T "$DURATION" -n 2>/dev/null |
      sed -n 's/^tps = \([0-9.]*\).*/\1/p')
    printf '%s\t%s\t%s\t%s\t%s\n' "$rep" "$t" "$init" "$tpcb" "$sel" | tee -a "$RESULTS" >&2
  done
done

python3 - "$RESULTS" "$SCALE" "$CLIENTS" "$JOBS" "$DURATION" "${TARGETS[@]}" <<'EOF'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().split("\n") if l]
scale, clients, jobs, dur = sys.argv[2:6]
targets = sys.argv[6:]
med = {}
for t in targets:
    r = [x for x in rows if x[1] == t]
    med[t] = [statistics.median(float(x[i]) for x in r) for i in (2, 3, 4)]
reps = len(rows) // len(targets)
print(f"pgbench scale {scale}, {clients} clients, {jobs} jobs, {dur} s per run, {reps} repetitions (medians)")
print(f"{'':12}{'pgbench -i (s)':>16}{'TPC-B tps':>12}{'select tps':>12}")
for t in targets:
    i, b, s = med[t]
    print(f"{t:12}{i:16.2f}{b:12.1f}{s:12.1f}")
ok = lambda c: "ok" if c else "BELOW GOAL"
n = med["native"]
for t in targets[1:]:
    p = med[t]
    ri, rb, rs = p[0] / n[0], p[1] / n[1], p[2] / n[2]
    print(f"ratio {t}/native: TPC-B {rb:.2f} ({ok(rb >= 0.90)}), select-only {rs:.2f} ({ok(rs >= 0.90)}), pgbench -i time {ri:.2f}x ({ok(ri <= 1.5)})")
EOF
