#!/usr/bin/env bash
# tools/dmq-kamailio-sync.sh: a full DMQ sync from a real Kamailio to kaping,
# timed (DESIGN §11; tuning.md, "The registrar feed").
#
#   tools/dmq-kamailio-sync.sh CONTACTS BATCH RUNS
#
# Starts Debian's Kamailio (dmq + dmq_usrloc, the README's lines, plus
# `modparam("dmq_usrloc", "batch_msg_contacts", BATCH)` when BATCH > 1) on
# 127.0.0.1, fills its location table with CONTACTS registrations from
# `kaping-loadgen register` (contacts on 127.0.0.0/8 that nobody answers),
# then RUNS times: starts `kaping run --dmq ... --dmq-peer ...` as a new DMQ
# node and measures, from kaping's start until `keepalive.stats` shows
# `contacts.total == CONTACTS` and a completed sync (polled every 50 ms):
# the wall time, kaping's CPU (utime + stime of /proc/PID/stat) and
# Kamailio's (the sum over its process group) over the same span. One line
# per run, then the medians.
#
# Needs: kamailio (5.6), jq, release binaries (cargo build --release; or
# BIN=dir). Environment: BIN, KAMAILIO_SHM_MB (default 4096),
# KAMAILIO_PKG_MB (64), KAMAILIO_CHILDREN (2), KAMAILIO_MM (tlsf),
# REGISTER_RATE (40000),
# KEEP=1 keeps the work directory. Everything is stopped on exit.
set -euo pipefail
. "$(dirname "$0")/lib/kamailio-dmq.sh"

contacts=${1:?usage: $0 CONTACTS BATCH RUNS}
batch=${2:-1}
runs=${3:-1}
bin=${BIN:-target/release}
shm_mb=${KAMAILIO_SHM_MB:-4096}
pkg_mb=${KAMAILIO_PKG_MB:-64}
children=${KAMAILIO_CHILDREN:-2}
rate=${REGISTER_RATE:-40000}
# Kamailio's memory manager. Debian's default, q_malloc, costs ~125 us of
# CPU per REGISTER here against ~20 us with TLSF (-x tlsf): 1,000,000
# registrations take 2 min instead of 30 s.
mm=${KAMAILIO_MM:-tlsf}
hz=$(getconf CLK_TCK)

dir=$(mktemp -d /tmp/dmq-kamailio-sync.XXXXXX)
kam_pid=
kaping_pid=
cleanup() {
    [[ -n $kaping_pid ]] && kill "$kaping_pid" 2>/dev/null && wait "$kaping_pid" 2>/dev/null
    kamailio_dmq_stop
    [[ ${KEEP:-0} == 1 ]] && echo "kept $dir" >&2 || rm -rf "$dir"
}
trap cleanup EXIT

# A free port for Kamailio; kaping's nodes and ping sockets follow it.
port=$(( 30000 + RANDOM % 20000 ))
kam=127.0.0.1:$port

batch_line=
if (( batch > 1 )); then
    batch_line="modparam(\"dmq_usrloc\", \"batch_msg_contacts\", $batch)"
fi
kamailio_dmq_start "$dir" "$kam" "$kam" "$batch_line" "$mm" "$shm_mb" "$pkg_mb" "$children" || exit 1

# Sum of utime + stime (clock ticks) over Kamailio's process group.
kam_ticks() {
    local t=0 f
    for f in /proc/[0-9]*/stat; do
        read -r -a s <"$f" 2>/dev/null || continue
        # Fields after the "(comm)": pgrp is field 5, utime 14, stime 15;
        # Kamailio's comm has no spaces.
        [[ ${s[4]} == "$kam_pid" ]] && t=$(( t + s[13] + s[14] ))
    done
    echo "$t"
}
pid_ticks() {
    local s
    read -r -a s <"/proc/$1/stat"
    echo $(( s[13] + s[14] ))
}

echo "registering $contacts contacts at $kam ($rate/s)" >&2
reg_t0=$(kam_ticks)
"$bin/kaping-loadgen" register --registrar "sip:$kam" --count "$contacts" \
    --user-prefix u --contact 127.1.0.1:1024 --expires 7200 \
    --rate "$rate" --window 64 --timeout 16s --progress
reg_t1=$(kam_ticks)
echo "Kamailio CPU while registering: $(( (reg_t1 - reg_t0) * 1000 / hz )) ms" >&2

printf 'run contacts batch sync_s kaping_cpu_s kaping_us_per_contact kamailio_cpu_s\n'
results=()
for r in $(seq "$runs"); do
    node=127.0.0.1:$(( port + 2 * r ))
    bind=127.0.0.1:$(( port + 2 * r + 1 ))
    rm -f "$dir/k.sock" "$dir/k.shm"
    k0=$(kam_ticks)
    t0=$(date +%s%N)
    "$bin/kaping" run --allow-destinations 127.0.0.0/8 --control "$dir/k.sock" --shm "$dir/k.shm" --instance "sync$r" \
        --dmq "sip:$node" --dmq-peer "sip:$kam" --bind "$bind" --workers 1 \
        --interval 3600s --events none --max-contacts $(( contacts + 1024 )) \
        --run-for 1800s 2>"$dir/kaping$r.log" >/dev/null &
    kaping_pid=$!
    while :; do
        if [[ -S $dir/k.sock ]]; then
            s=$("$bin/kaping" ctl --control "$dir/k.sock" --json keepalive.stats 2>/dev/null || true)
            if [[ -n $s ]] && jq -e --argjson n "$contacts" \
                '.contacts.total == $n and .registrar.syncs_done >= 1' <<<"$s" >/dev/null; then
                break
            fi
        fi
        kill -0 "$kaping_pid" 2>/dev/null || { cat "$dir/kaping$r.log" >&2; exit 1; }
        if (( $(date +%s%N) - t0 > 1200 * 1000000000 )); then
            echo "run $r: no full sync within 1200 s: $s" >&2
            exit 1
        fi
        sleep 0.05
    done
    t1=$(date +%s%N)
    kc=$(pid_ticks "$kaping_pid")
    k1=$(kam_ticks)
    jq -c '.registrar' <<<"$s" >&2
    kill "$kaping_pid"
    wait "$kaping_pid" || true
    kaping_pid=
    line=$(awk -v r="$r" -v n="$contacts" -v b="$batch" -v dt=$(( t1 - t0 )) \
        -v kc="$kc" -v kk=$(( k1 - k0 )) -v hz="$hz" 'BEGIN {
            printf "%d %d %d %.2f %.2f %.2f %.2f", r, n, b, dt / 1e9, kc / hz,
                kc / hz * 1e6 / n, kk / hz }')
    echo "$line"
    results+=("$line")
    # Let Kamailio's transactions of this sync end (timer K, 5 s) and
    # its pings to the node just stopped give up.
    sleep 10
done
printf '%s\n' "${results[@]}" | sort -k4 -n | awk '{ a[NR] = $0 } END {
    split(a[int((NR + 1) / 2)], m, " ")
    printf "median run of %d (by sync time): sync %s s, kaping CPU %s s (%s us per contact), Kamailio CPU %s s\n",
        NR, m[4], m[5], m[6], m[7] }'
