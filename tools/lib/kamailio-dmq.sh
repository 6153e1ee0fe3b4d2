# tools/lib/kamailio-dmq.sh: sourced by tools/dmq-kamailio-*.sh. Starts
# Debian's Kamailio as a registrar with dmq + dmq_usrloc (the README's
# lines) on 127.0.0.1 in a process group of its own, and stops it.
#
#   kamailio_dmq_start DIR KAM NOTIFY EXTRA MM SHM_MB PKG_MB CHILDREN
#
# KAM: its address (IP:PORT); NOTIFY: its notification_address; EXTRA:
# more kamailio.cfg lines (modparams). Sets kam_pid (the group's leader);
# fails with Kamailio's log when it does not listen within 10 s.
kamailio_dmq_start() {
    local dir=$1 kam=$2 notify=$3 extra=$4 mm=$5 shm_mb=$6 pkg_mb=$7 children=$8
    local port=${kam##*:}
    cat >"$dir/kamailio.cfg" <<EOF
#!KAMAILIO
debug=1
log_stderror=yes
children=$children
auto_aliases=no
listen=udp:$kam
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "pv.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
# 2^16 slots: 1,000,000 AoRs in the default 2^10 make every REGISTER walk
# ~1,000 records.
modparam("usrloc", "hash_size", 16)
loadmodule "dmq.so"
loadmodule "dmq_usrloc.so"
modparam("dmq", "server_address", "sip:$kam")
modparam("dmq", "notification_address", "sip:$notify")
modparam("dmq_usrloc", "enable", 1)
$extra
request_route {
	if (method == "KDMQ") { dmq_handle_message(); exit; }
	if (method == "REGISTER") { if (!save("location")) sl_reply_error(); exit; }
	sl_send_reply("404", "Not here");
}
EOF
    # Job control on for this one child: its own process group, led by $!.
    set -m
    kamailio -f "$dir/kamailio.cfg" -DD -E -x "$mm" -m "$shm_mb" -M "$pkg_mb" -Y "$dir" \
        2>"$dir/kamailio.log" >/dev/null &
    kam_pid=$!
    set +m
    for _ in $(seq 100); do
        ss -Hlun "sport = :$port" | grep -q . && return 0
        sleep 0.1
    done
    cat "$dir/kamailio.log" >&2
    return 1
}

# Stops the group kamailio_dmq_start started (TERM, then KILL).
kamailio_dmq_stop() {
    if [[ -n ${kam_pid:-} ]]; then
        kill -TERM -- "-$kam_pid" 2>/dev/null || true
        sleep 1
        kill -KILL -- "-$kam_pid" 2>/dev/null || true
        kam_pid=
    fi
}
