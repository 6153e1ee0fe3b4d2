#!/usr/bin/env bash
# Runs every fuzz target (or those named) for SECONDS each, one after the
# other, from its seeds and its growing corpus (fuzz/corpus/, not kept in
# git). A crash does not stop the run (-ignore_crashes): findings land in
# fuzz/artifacts/<target>/ and the summary says how many. Each finding,
# once fixed, goes to fuzz/regressions/<target>/ with a name that says what
# it was, and `cargo test` replays it from then on.
#
#   fuzz/run.sh 600                # every target, 10 minutes each
#   fuzz/run.sh 30 uri control     # two targets, 30 s each
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
cargo +nightly fuzz build -O >/dev/null 2>&1
mkdir -p logs
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    start=$(date +%s)
    cargo +nightly fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -fork=1 -ignore_crashes=1 -ignore_timeouts=1 \
        -ignore_ooms=1 -rss_limit_mb=2048 -timeout=10 -max_len=65536 \
        >"logs/$t.log" 2>&1 || true
    runs=$(grep -o 'exec/s: [0-9]*' "logs/$t.log" | tail -1 || true)
    found=$(find "artifacts/$t" -type f | wc -l)
    cov=$(grep -o 'cov: [0-9]*' "logs/$t.log" | tail -1 || true)
    echo "$t: $(( $(date +%s) - start )) s, $cov, $runs, corpus $(find "corpus/$t" -type f | wc -l) inputs, $found finding(s)"
done
