#!/usr/bin/env bash
# CI's short fuzz pass: every target for 50,000 runs (at most SECONDS,
# default 10) from its seeds
# and regressions, so a target that no longer builds or fails at once is
# caught on every change. The long runs are fuzz/run.sh (cargo fuzz).
#
# Builds without cargo-fuzz (saving its install): the same coverage
# instrumentation cargo fuzz passes to rustc, no sanitizer (Rust code needs
# none to catch a panic; the targets' unsafe-free), nightly only.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-10}
runs=${FUZZ_SMOKE_RUNS:-50000}
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz smoke: SKIP (no nightly toolchain: rustup toolchain install nightly)"
    exit 0
fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/../target/fuzz-smoke}
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
# A build for a short pass: less optimisation, no debug info (faster to
# build; the long runs use cargo fuzz's optimised build).
export CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_DEBUG=0
# With --target, RUSTFLAGS reach only the target's code, not build scripts.
host=$(rustc +nightly -vV | sed -n 's/^host: //p')
start=$(date +%s)
cargo +nightly build --release --quiet --bins --target "$host"
echo "fuzz smoke: built in $(( $(date +%s) - start )) s"
failed=0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for t in $(sed -n 's/^name = "\(.*\)"/\1/p' Cargo.toml | grep -v kaping-fuzz); do
    mkdir -p "$work/$t" "$CARGO_TARGET_DIR/findings"
    dirs=("$work/$t" "seeds/$t")
    [ -d "regressions/$t" ] && dirs+=("regressions/$t")
    # A fixed seed and run count: the same code explores the same inputs,
    # so CI fails for a change, not for a lucky draw (the long runs look
    # for new findings).
    if out=$("$CARGO_TARGET_DIR/$host/release/$t" -seed=1 -runs="$runs" \
            -max_total_time="$secs" -rss_limit_mb=2048 \
            -timeout=10 -artifact_prefix="$CARGO_TARGET_DIR/findings/$t-" "${dirs[@]}" 2>&1); then
        echo "fuzz smoke: $t ok ($(echo "$out" | grep -o 'Done [0-9]* runs' | tail -1))"
    else
        echo "$out" | tail -40
        echo "fuzz smoke: $t FAILED"
        failed=1
    fi
done
exit $failed
