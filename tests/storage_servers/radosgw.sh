#!/usr/bin/env bash
# One-node Ceph (monitor + memstore OSD + radosgw) on 127.0.0.1 for S3 tests against a real server.
#
#   apt-get install -y --no-install-recommends radosgw ceph-mon ceph-osd ceph-common   # Debian 12: Ceph 16.2
#   tests/storage_servers/radosgw.sh start DIR   # prints KEY=VALUE lines (endpoint, keys); ~15 s, ~400 MB RAM
#   tests/storage_servers/radosgw.sh stop DIR
#
# Why these settings (design.md §6): cephx is off (no keyrings to manage), which makes the messenger
# pick "secure" mode unless every ms_*_mode is "crc" -- then radosgw hangs ~300 s on
# "get_initial_auth_request returned -13". Every daemon binds 127.0.0.1 only; ports are picked free.
# Data lives in memory (memstore) and under DIR; `stop` kills the daemons, DIR can then be removed.
set -euo pipefail

cmd=${1:-}
dir=${2:-}
[[ -n "$cmd" && -n "$dir" ]] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }

ACCESS_KEY=${RGW_ACCESS_KEY:-KOLORSTESTACCESSKEY0}
SECRET_KEY=${RGW_SECRET_KEY:-kolorsTestSecretKey0000000000000000000000}

stop() {
    local pidfile
    for pidfile in "$dir"/run/*.pid; do
        [[ -e "$pidfile" ]] || continue
        kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    sleep 0.5
    for pidfile in "$dir"/run/*.pid; do
        [[ -e "$pidfile" ]] || continue
        kill -9 "$(cat "$pidfile")" 2>/dev/null || true
        rm -f "$pidfile"
    done
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() {  # wait_for SECONDS what command...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS > deadline)); then
            echo "radosgw.sh: timed out waiting for $what; logs in $dir/log" >&2
            tail -n 20 "$dir"/log/*.log >&2 || true
            exit 1
        fi
        sleep 0.3
    done
}

start() {
    for tool in ceph-mon ceph-osd radosgw radosgw-admin monmaptool ceph; do
        command -v "$tool" >/dev/null || {
            echo "radosgw.sh: $tool missing: apt-get install --no-install-recommends radosgw ceph-mon ceph-osd ceph-common" >&2
            exit 3
        }
    done
    mkdir -p "$dir"/{mon,osd,run,log,rgw}
    dir=$(cd "$dir" && pwd)
    local fsid osd_uuid mon_port rgw_port conf="$dir/ceph.conf"
    fsid=$(python3 -c 'import uuid; print(uuid.uuid4())')
    osd_uuid=$(python3 -c 'import uuid; print(uuid.uuid4())')
    mon_port=$(free_port)
    rgw_port=$(free_port)
    cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$mon_port
public addr = 127.0.0.1
public network = 127.0.0.1/32
cluster network = 127.0.0.1/32
ms bind ipv6 = false
ms bind msgr1 = false
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
ms_cluster_mode = crc
ms_service_mode = crc
ms_client_mode = crc
ms_mon_cluster_mode = crc
ms_mon_service_mode = crc
ms_mon_client_mode = crc
run dir = $dir/run
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
log to stderr = false
err to stderr = false
keyring = /dev/null
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
mon max pg per osd = 1000

[mon.a]
mon data = $dir/mon

[osd.0]
osd data = $dir/osd
osd objectstore = memstore
memstore device bytes = 2147483648
osd max object name len = 460
osd max object namespace len = 64

[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$rgw_port
rgw data = $dir/rgw
rgw dns name = 127.0.0.1
rgw enable usage log = false
EOF
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$mon_port]" "$dir/monmap" >/dev/null
    ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" >"$dir/log/mkfs-mon.out" 2>&1
    ceph-mon -c "$conf" -i a
    wait_for 30 "ceph-mon" ceph -c "$conf" --connect-timeout 5 mon stat

    local osd_id
    osd_id=$(ceph -c "$conf" osd new "$osd_uuid")
    [[ "$osd_id" == 0 ]] || { echo "radosgw.sh: unexpected osd id $osd_id" >&2; exit 1; }
    ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid" >"$dir/log/mkfs-osd.out" 2>&1
    ceph-osd -c "$conf" -i 0
    wait_for 60 "ceph-osd" bash -c "ceph -c '$conf' osd stat --format json | grep -q '\"num_up_osds\":1'"

    radosgw -c "$conf" -n client.rgw.a
    wait_for 90 "radosgw" python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$rgw_port/', timeout=2)"
    radosgw-admin -c "$conf" -n client.rgw.a user create --uid=kolors-test --display-name="kolors test" \
        --access-key="$ACCESS_KEY" --secret-key="$SECRET_KEY" >"$dir/log/user.out"
    echo "RADOSGW_ENDPOINT=http://127.0.0.1:$rgw_port"
    echo "RADOSGW_ACCESS_KEY=$ACCESS_KEY"
    echo "RADOSGW_SECRET_KEY=$SECRET_KEY"
    echo "RADOSGW_REGION=us-east-1"
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
