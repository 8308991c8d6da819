# Sourced by the other scripts. rustup keeps its toolchains under the home of whoever installed
# it; with another HOME (a fresh account, a CI sandbox) `cargo` finds no toolchain. Point it at
# the installed one instead of failing.
if ! cargo --version >/dev/null 2>&1; then
    for cargo_home in "${CARGO_HOME:-}" "$HOME/.cargo" /root/.cargo /usr/local/cargo; do
        [ -n "$cargo_home" ] && [ -x "$cargo_home/bin/cargo" ] || continue
        export PATH="$cargo_home/bin:$PATH" CARGO_HOME="$cargo_home"
        for rustup_home in "${RUSTUP_HOME:-}" "$(dirname "$cargo_home")/.rustup" /usr/local/rustup; do
            if [ -n "$rustup_home" ] && [ -d "$rustup_home/toolchains" ]; then
                export RUSTUP_HOME="$rustup_home"
                break
            fi
        done
        cargo --version >/dev/null 2>&1 && break
    done
fi
