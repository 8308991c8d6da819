#!/usr/bin/env bash
# Physical source freshness: from a commit on production to its visibility in a newly created
# branch of `main`, while pgbench writes to production. Also the throughput of
# `stemma source add --mode physical` against a plain `pg_basebackup` into a local directory,
# and of `--mode snapshot` against a plain `pg_dump -j 2` + `pg_restore -j 2`, same machine,
# same run (each ratio should be at least 0.8).
#
#   bench/source-freshness.sh
#
# Settings (environment): TRIALS (9), SCALE (pgbench scale of production, 10), RATE (pgbench
# transactions per second on production, 50), STORAGE (copy | pagestore, default copy),
# STEMMA_BIN (default: target/release/stemma, built when missing), PG_BIN, SKIP_THROUGHPUT=1
# (only the freshness trials), LOGS (a directory to keep the daemon's and computes' logs in),
# KEEP_BRANCHES=1 (the new branches are not deleted, so their logs stay).
# Needs root (production and computes run as the `postgres` user). Everything it starts is
# stopped and removed on exit, even on failure. Prints each trial's steps (branch create,
# first query on the new branch, attempts), and the median, min and max freshness.
set -euo pipefail
cd "$(dirname "$0")/.."
trials=${TRIALS:-9}
scale=${SCALE:-10}
rate=${RATE:-50}
storage=${STORAGE:-copy}
pgbin=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
stemma=${STEMMA_BIN:-$PWD/target/release/stemma}
if [ ! -x "$stemma" ]; then
    cargo build --release --quiet -p stemma-cli
fi

work=$(mktemp -d /tmp/stemma-freshness-XXXXXX)
chmod 711 "$work"
export STEMMA_DATA_DIR="$work/data"
prod="$work/prod"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
pgbench_pid=
cleanup() {
    [ -n "$pgbench_pid" ] && kill "$pgbench_pid" 2>/dev/null || true
    "$stemma" down >/dev/null 2>&1 || true
    if [ -n "${LOGS:-}" ]; then
        mkdir -p "$LOGS" && cp -r "$STEMMA_DATA_DIR/logs/." "$LOGS/" 2>/dev/null || true
    fi
    runuser -u postgres -- "$pgbin/pg_ctl" -D "$prod" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s.%N; }
calc() { awk "BEGIN { print $* }"; }
stats() { sort -n | awk '{a[NR]=$1} END {printf "median %.3f s  (min %.3f, max %.3f, n=%d)\n", a[int((NR+1)/2)], a[1], a[NR], NR}'; }

# "Production": its own cluster on loopback, a replication user, WAL for standbys.
mkdir -p "$prod" "$work/sock" && chown postgres: "$prod" "$work/sock" && chmod 700 "$prod"
runuser -u postgres -- "$pgbin/initdb" -D "$prod" -U postgres -A trust --no-instructions >/dev/null
cat >"$prod/pg_hba.conf" <<EOF
local all all trust
host replication replicator 127.0.0.1/32 scram-sha-256
host all all 127.0.0.1/32 scram-sha-256
EOF
runuser -u postgres -- "$pgbin/pg_ctl" -D "$prod" -w -l "$prod/server.log" -o \
    "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$work/sock -c wal_level=replica -c shared_buffers=128MB" \
    start >/dev/null
psql_prod() { "$pgbin/psql" -X -A -t -q -v ON_ERROR_STOP=1 -h "$work/sock" -p "$port" -U postgres "$@"; }
psql_prod -d postgres -c "CREATE ROLE replicator REPLICATION LOGIN PASSWORD 'bench'"
psql_prod -d postgres -c "CREATE DATABASE app"
"$pgbin/pgbench" -i -q -s "$scale" -h "$work/sock" -p "$port" -U postgres app >/dev/null 2>&1
psql_prod -d app -c "CREATE TABLE freshness(id int PRIMARY KEY, at timestamptz DEFAULT now())"
size=$(psql_prod -d app -c "SELECT pg_database_size('app')")

"$stemma" up --storage "$storage" --api-listen 127.0.0.1:0 --proxy-listen 127.0.0.1:0 --port-base 47500 >/dev/null
url="postgresql://replicator:bench@127.0.0.1:$port/app"

echo "storage: $storage; production: pgbench scale $scale ($((size / 1048576)) MiB in app), $rate tps while measuring"

if [ "${SKIP_THROUGHPUT:-}" = 1 ]; then
    "$stemma" source add prod --url "$url" --mode physical >/dev/null
else
# Base backup: plain pg_basebackup into a local directory, then `source add`.
t0=$(now)
PGPASSWORD=bench "$pgbin/pg_basebackup" -D "$work/plain-backup" -d "host=127.0.0.1 port=$port user=replicator" -X stream -c fast
t1=$(now)
rm -rf "$work/plain-backup"
"$stemma" source add prod --url "$url" --mode physical >/dev/null
t2=$(now)
plain=$(calc "$t1 - $t0")
ours=$(calc "$t2 - $t1")
echo "base backup: pg_basebackup $(printf %.2f "$plain") s, source add $(printf %.2f "$ours") s (throughput ratio $(printf %.2f "$(calc "$plain / $ours")"))"

# Snapshot: plain pg_dump -j 2 into a local directory and pg_restore -j 2 into a new database,
# then `source add --mode snapshot` into a new root.
t0=$(now)
"$pgbin/pg_dump" -Fd -j 2 -f "$work/plain-dump" -h "$work/sock" -p "$port" -U postgres app
psql_prod -d postgres -c "CREATE DATABASE restore_target"
"$pgbin/pg_restore" -j 2 -h "$work/sock" -p "$port" -U postgres -d restore_target "$work/plain-dump"
t1=$(now)
rm -rf "$work/plain-dump"
psql_prod -d postgres -c "DROP DATABASE restore_target"
psql_prod -d postgres -c "ALTER ROLE replicator SUPERUSER"
"$stemma" source add snap --url "$url" --mode snapshot --branch snap --jobs 2 >/dev/null
t2=$(now)
plain=$(calc "$t1 - $t0")
ours=$(calc "$t2 - $t1")
echo "snapshot: pg_dump + pg_restore $(printf %.2f "$plain") s, source add $(printf %.2f "$ours") s (throughput ratio $(printf %.2f "$(calc "$plain / $ours")"))"
"$stemma" source remove snap >/dev/null
fi

"$pgbin/pgbench" -n -c 2 -j 2 -R "$rate" -T 3600 -h "$work/sock" -p "$port" -U postgres app >/dev/null 2>&1 &
pgbench_pid=$!

results=()
for i in $(seq 1 "$trials"); do
    psql_prod -d app -c "INSERT INTO freshness(id) VALUES ($i)"
    committed=$(now)
    visible=
    deletions=()
    # The first new branch of main that holds the row; a branch without it is deleted.
    steps=
    for attempt in $(seq 1 100); do
        b="fresh-$i-$attempt"
        a0=$(now)
        "$stemma" branch create "$b" --parent main >/dev/null
        a1=$(now)
        conn=$("$stemma" connection-string "$b")
        seen=$("$pgbin/psql" -X -A -t -d "$conn" -c "SELECT count(*) FROM freshness WHERE id = $i")
        a2=$(now)
        steps="$steps create $(printf %.3f "$(calc "$a1 - $a0")") query $(printf %.3f "$(calc "$a2 - $a1")");"
        if [ "${KEEP_BRANCHES:-}" != 1 ]; then
            "$stemma" branch delete "$b" >/dev/null &
            deletions+=($!)
        fi
        if [ "$seen" = "1" ]; then
            visible=$(now)
            break
        fi
    done
    [ ${#deletions[@]} -eq 0 ] || wait "${deletions[@]}"
    [ -n "$visible" ] || { echo "row $i never became visible in a new branch" >&2; exit 1; }
    results+=("$(calc "$visible - $committed")")
    echo "trial $i: $(printf %.3f "${results[-1]}") s (attempts:$steps)"
done
printf '%s\n' "${results[@]}" | { printf "freshness (commit on production -> visible in a new branch of main): "; stats; }
