#!/usr/bin/env bash
# Installs what Stemma needs to build, run and test, when it is missing. Idempotent: on a
# machine that has everything it only checks.
set -euo pipefail
. "$(dirname "$0")/rust-env.sh"

need_apt=()
have_pg_server() {
    command -v postgres >/dev/null 2>&1 && return 0
    ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1
}
pg_bin_has() {
    ls /usr/lib/postgresql/*/bin/"$1" >/dev/null 2>&1 || command -v "$1" >/dev/null 2>&1
}

if ! have_pg_server; then
    need_apt+=(postgresql)
fi
for tool in psql pg_dump pg_restore pgbench pg_amcheck pg_basebackup; do
    if ! pg_bin_has "$tool"; then
        need_apt+=(postgresql-client postgresql)
        break
    fi
done
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
# The pagestore driver mounts through FUSE: as root it needs only /dev/fuse, otherwise
# fusermount3; tests and cleanup use it to unmount.
command -v fusermount3 >/dev/null 2>&1 || need_apt+=(fuse3)
id postgres >/dev/null 2>&1 || need_apt+=(postgresql)

if [ "${#need_apt[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "stemma: missing packages: ${need_apt[*]}; install them as root (apt-get install ${need_apt[*]})" >&2
        exit 1
    fi
    echo "stemma: installing ${need_apt[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# PostgreSQL refuses to run as root: computes run as this user when the daemon is root.
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi
# Computes of anonymized branches run as their own user, apart from the other computes' files
# (the daemon also creates it when missing).
if [ "$(id -u)" -eq 0 ] && ! id stemma-anon >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin stemma-anon
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "stemma: no Rust toolchain (cargo) found; install it with rustup (https://rustup.rs)" >&2
    exit 1
fi
