#!/usr/bin/env bash
# tools/dmq-kamailio-lag.sh: the lag from a REGISTER to kaping, through a
# real Kamailio and DMQ (DESIGN §11; tuning.md, "The registrar feed").
#
#   tools/dmq-kamailio-lag.sh RATE SECONDS RUNS
#
# Starts Debian's Kamailio (registrar, dmq + dmq_usrloc with the README's
# lines) on 127.0.0.1 and kaping as a DMQ node following it (release
# binaries, 1 worker, `--interval 3600s`: the contacts are not answered),
# then RUNS times sends RATE REGISTERs a second for SECONDS with
# `kaping-loadgen register --watch-shm`, which times each one from its send
# to kaping's workers holding one more contact (kaping's shm file, sampled
# every 0.5 ms). Each run registers new users. One line per run.
#
# Needs: kamailio (5.6), release binaries (cargo build --release; or
# BIN=dir). Everything is stopped on exit.
set -euo pipefail
. "$(dirname "$0")/lib/kamailio-dmq.sh"

rate=${1:?usage: $0 RATE SECONDS RUNS}
seconds=${2:-10}
runs=${3:-1}
bin=${BIN:-target/release}
count=$(( rate * seconds ))

dir=$(mktemp -d /tmp/dmq-kamailio-lag.XXXXXX)
kam_pid=
kaping_pid=
cleanup() {
    [[ -n $kaping_pid ]] && kill "$kaping_pid" 2>/dev/null && wait "$kaping_pid" 2>/dev/null
    kamailio_dmq_stop
    rm -rf "$dir"
}
trap cleanup EXIT

port=$(( 30000 + RANDOM % 20000 ))
kam=127.0.0.1:$port
node=127.0.0.1:$(( port + 1 ))
kamailio_dmq_start "$dir" "$kam" "$node" 'modparam("dmq_usrloc", "batch_msg_contacts", 50)' \
    tlsf 1024 32 2 || exit 1
"$bin/kaping" run --allow-destinations 127.0.0.0/8 --control "$dir/k.sock" --shm "$dir/k.shm" --instance lag \
    --dmq "sip:$node" --dmq-peer "sip:$kam" --bind 127.0.0.1:$(( port + 2 )) --workers 1 \
    --interval 3600s --events none --run-for 3600s 2>"$dir/kaping.log" >/dev/null &
kaping_pid=$!
for _ in $(seq 100); do
    [[ -S $dir/k.sock ]] && "$bin/kaping" ctl --control "$dir/k.sock" --json keepalive.stats 2>/dev/null \
        | grep -q '"syncs_done":[1-9]' && break
    sleep 0.1
done
for r in $(seq "$runs"); do
    "$bin/kaping-loadgen" register --registrar "sip:$kam" --first $(( (r - 1) * count )) \
        --count "$count" --user-prefix u --contact 127.1.0.1:1024 --expires 3600 \
        --rate "$rate" --window 256 --watch-shm "$dir/k.shm"
done
