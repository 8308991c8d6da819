#!/usr/bin/env bash
# Anonymizing a database against a plain logical copy of it, in the same run.
#
#   bench/anonymize.sh            ROWS=4000000 by default (about 1.1 GB with its indexes)
#
# It builds a root branch `prod` holding one table of generated people (a unique email, a
# name, a city, a free-text note, an amount and a date), then times, REPS times each (default
# 1), alternating:
#   copy        `stemma init --name copy-N --from <prod> --jobs 2`: pg_dump -Fd -j 2 and
#               pg_restore -j 2 into a new root branch (the baseline)
#   anonymize   `stemma branch create anon-N --parent prod --anonymize rules.toml --jobs 2`:
#               the same rows streamed through the masks (email, name, city, text) into a new
#               root branch
# and prints anonymize / copy (goal: at most 1.5). Everything runs in a temporary directory
# that is removed.
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${ROWS:-4000000}
reps=${REPS:-1}

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

"$stemma" up --api-listen 127.0.0.1:0 --port-base 47100 --proxy-listen 127.0.0.1:0 >/dev/null
pgbin=$("$stemma" --output json status | python3 -c 'import json,sys; print(json.load(sys.stdin)["postgres_bin_dir"])')
now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.2f\", $* }"; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

"$stemma" init --name prod >/dev/null
prod=$("$stemma" connection-string prod)
echo "generating $rows rows..."
"$pgbin/psql" -X -q -v ON_ERROR_STOP=1 "$prod" <<SQL
CREATE TABLE people (
    id bigserial PRIMARY KEY,
    email text NOT NULL UNIQUE,
    full_name text NOT NULL,
    city text,
    notes text,
    amount numeric(12,2),
    signed_up date
);
INSERT INTO people(email, full_name, city, notes, amount, signed_up)
SELECT 'user' || g || '@example.org',
       'Person ' || g,
       (ARRAY['Lisbon','Berlin','Osaka','Lima','Oslo'])[1 + g % 5],
       'Customer ' || g || ' asked about invoice ' || (g * 7) || ' and the delivery of order ' || (g * 13) || '; call back in the morning.',
       (g % 1000) * 1.5,
       date '2015-01-01' + (g % 3000)
FROM generate_series(1, $rows) g;
CHECKPOINT;
SQL
size=$("$stemma" --output json branch get prod | python3 -c 'import json,sys; print(json.load(sys.stdin)["logical_size_bytes"])')
cat > "$work/rules.toml" <<'TOML'
[options]
unlisted = "keep"

[[rule]]
table = "public.people"
column = "email"
mask = "email"

[[rule]]
table = "public.people"
column = "full_name"
mask = "full_name"

[[rule]]
table = "public.people"
column = "city"
mask = "city"

[[rule]]
table = "public.people"
column = "notes"
mask = "text"
TOML

copy_times=()
anon_times=()
for i in $(seq 1 "$reps"); do
    t0=$(now)
    "$stemma" init --name "copy-$i" --from "$prod" --jobs 2 >/dev/null
    t1=$(now)
    copy_times+=("$(calc "$t1 - $t0")")
    "$stemma" branch delete "copy-$i" >/dev/null
    t0=$(now)
    "$stemma" branch create "anon-$i" --parent prod --anonymize "$work/rules.toml" --jobs 2 >/dev/null
    t1=$(now)
    anon_times+=("$(calc "$t1 - $t0")")
    "$stemma" branch delete "anon-$i" >/dev/null
done
copy=$(printf '%s\n' "${copy_times[@]}" | median)
anon=$(printf '%s\n' "${anon_times[@]}" | median)
echo "host: $(nproc) cores; database: $rows rows, $(calc "$size / 1048576") MiB"
printf '%-28s %10s\n' "" seconds
printf '%-28s %10s\n' "copy (pg_dump | pg_restore)" "$copy"
printf '%-28s %10s\n' "anonymize" "$anon"
echo "ratio anonymize/copy: $(calc "$anon / $copy") (goal <= 1.5)"
