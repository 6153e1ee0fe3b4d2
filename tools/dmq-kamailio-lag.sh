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
    if [[ -n $kam_pid ]]; then
        kill -TERM -- "-$kam_pid" 2>/dev/null || true
        sleep 1
        kill -KILL -- "-$kam_pid" 2>/dev/null || true
    fi
    rm -rf "$dir"
}
trap cleanup EXIT

port=$(( 30000 + RANDOM % 20000 ))
kam=127.0.0.1:$port
node=127.0.0.1:$(( port + 1 ))
cat >"$dir/kamailio.cfg" <<EOF
#!KAMAILIO
debug=1
log_stderror=yes
children=2
auto_aliases=no
listen=udp:$kam
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "pv.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
modparam("usrloc", "hash_size", 16)
loadmodule "dmq.so"
loadmodule "dmq_usrloc.so"
modparam("dmq", "server_address", "sip:$kam")
modparam("dmq", "notification_address", "sip:$node")
modparam("dmq_usrloc", "enable", 1)
modparam("dmq_usrloc", "batch_msg_contacts", 50)
request_route {
	if (method == "KDMQ") { dmq_handle_message(); exit; }
	if (method == "REGISTER") { if (!save("location")) sl_reply_error(); exit; }
	sl_send_reply("404", "Not here");
}
EOF
set -m
kamailio -f "$dir/kamailio.cfg" -DD -E -x tlsf -m 1024 -M 32 -Y "$dir" \
    2>"$dir/kamailio.log" >/dev/null &
kam_pid=$!
set +m
for _ in $(seq 100); do
    ss -Hlun "sport = :$port" | grep -q . && break
    sleep 0.1
done
"$bin/kaping" run --control "$dir/k.sock" --shm "$dir/k.shm" --instance lag \
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
