# shellcheck shell=bash disable=SC2034,SC2016
# SC2034: the SG_ variables are for the caller; SC2016: guest scripts are single-quoted on purpose.
# Boots and drives the systemd guest of scripts/vm/build-systemd-guest (sourced by run-e2e and
# demo-guest). Needs lib.sh sourced first, ROOT set, and a caller that traps EXIT to sg_cleanup.
#
#   sg_boot DIR DEBS_DIR [agent-port-at-boot=yes|no]
#       sg_make_disks (below), then boots QEMU (TCG) on them and waits for the guest's command
#       channel (sg_open_channel; run-libvirt-e2e uses both with a libvirt domain instead). Sets SG_DIR, SG_QMP,
#       SG_AGENT_SOCK, SG_VSOCK_CID (empty when the host has no usable /dev/vhost-vsock and
#       SG_VSOCK_SKIP says why), SG_BOOT_MS.
#   sg_run TIMEOUT_S SCRIPT   runs SCRIPT with bash in the guest (as root); prints its output,
#                             returns its exit code (124 on timeout, 125 if the channel failed).
#                             Call it directly or in $(...), never in a pipeline: bash closes a
#                             coprocess's descriptors in pipeline members (and loses them).
#   sg_qmp ARGS...            scripts/vm/qmp on the guest's QMP socket
#   sg_add_agent_port         hot-adds the agent's virtio-serial port (QMP device_add)
#   sg_cleanup                kills QEMU and the channel; removes DIR unless SG_KEEP is set
#
# The guest: /dev/vda the system disk (overlay), /dev/vdb the data disk (QMP drive id "data",
# cache=writethrough), /dev/vdc the package disk (label quiesce-debs); virtio-serial ports
# org.quiesce.test.cmd (test channel) and org.quiesce.agent.0 (the agent's, chardev socket
# SG_AGENT_SOCK); ttyS0 the console (DIR/console.log), ttyS1 an autologin root shell
# (DIR/shell.sock, for a human: socat -,raw,echo=0 UNIX-CONNECT:DIR/shell.sock).

SG_DIR='' SG_QEMU_PID='' SG_QMP='' SG_AGENT_SOCK='' SG_VSOCK_CID='' SG_VSOCK_SKIP='' SG_BOOT_MS=''
SG_SEQ=0 SG_CHANNEL_PID='' SG_KEEP=${SG_KEEP:-} SG_KERNEL='' SG_INITRD=''

sg_ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

# sg_make_disks DIR DEBS_DIR: builds or reuses the cached image and makes in DIR the guest's
# disks: system.qcow2 (an overlay over the image), data.img (a fresh 256 MiB ext4, /data) and
# debs.img (DEBS_DIR's files, label quiesce-debs). Sets SG_DIR, SG_KERNEL and SG_INITRD.
sg_make_disks() {
    local dir=$1 debs=$2
    SG_DIR=$dir
    local guest base t0
    echo "== build or reuse the systemd guest image (.vm-cache/systemd-guest)"
    t0=$(date +%s%N)
    guest=$("$ROOT/scripts/vm/build-systemd-guest") || return 1
    SG_KERNEL=$(sed -n 's/^KERNEL=//p' <<<"$guest")
    SG_INITRD=$(sed -n 's/^INITRD=//p' <<<"$guest")
    base=$(sed -n 's/^BASE=//p' <<<"$guest")
    echo "image ready in $(sg_ms_since "$t0") ms: $base"

    ls "$debs"/quiesce-agent_*.deb >/dev/null 2>&1 || { echo "no quiesce-agent_*.deb in $debs" >&2; return 1; }
    qemu-img create -q -f qcow2 -F raw -b "$base" "$dir/system.qcow2"
    truncate -s 256M "$dir/data.img"
    mkfs.ext4 -q -F -L quiesce-data "$dir/data.img"
    truncate -s 128M "$dir/debs.img"
    mkfs.ext4 -q -F -L quiesce-debs -d "$debs" "$dir/debs.img"
}

sg_boot() {
    local dir=$1 debs=$2 port_at_boot=${3:-yes}
    local kernel initrd t0
    sg_make_disks "$dir" "$debs" || return 1
    kernel=$SG_KERNEL initrd=$SG_INITRD

    SG_QMP=$dir/qmp.sock
    SG_AGENT_SOCK=$dir/agent.sock
    local vsock=()
    SG_VSOCK_CID='' SG_VSOCK_SKIP=''
    if [ ! -c /dev/vhost-vsock ]; then
        SG_VSOCK_SKIP="the host has no /dev/vhost-vsock (vhost_vsock not loaded or not built), so QEMU cannot give the guest a host-reachable vsock"
    elif ! : 2>/dev/null <>/dev/vhost-vsock; then
        SG_VSOCK_SKIP="/dev/vhost-vsock cannot be opened"
    else
        # A random CID well away from 0-2 (2 is the machine's own hypervisor: never a target).
        SG_VSOCK_CID=$(( 1000 + RANDOM % 60000 ))
        vsock=(-device "vhost-vsock-pci,guest-cid=$SG_VSOCK_CID")
    fi
    local agent_dev=()
    # shellcheck disable=SC2054  # commas separate QEMU's -device properties
    [ "$port_at_boot" = yes ] && agent_dev=(-device virtserialport,bus=vser0.0,chardev=agent,name=org.quiesce.agent.0,id=agentport)

    echo "== boot the guest (QEMU TCG, systemd as PID 1)"
    t0=$(date +%s%N)
    qemu-system-x86_64 -accel tcg -machine pc -m 1024 -smp 2 \
        -nodefaults -no-user-config -display none -monitor none -no-reboot -nic none \
        -serial "file:$dir/console.log" -serial "unix:$dir/shell.sock,server=on,wait=off" \
        -kernel "$kernel" -initrd "$initrd" \
        -append "root=/dev/vda rw console=ttyS0 panic=-1 quiet systemd.show_status=0 net.ifnames=0" \
        -drive "if=none,id=sys,file=$dir/system.qcow2,format=qcow2" -device virtio-blk-pci,drive=sys \
        -drive "if=none,id=data,file=$dir/data.img,format=raw,cache=writethrough" -device virtio-blk-pci,drive=data \
        -drive "if=none,id=debs,file=$dir/debs.img,format=raw,readonly=on" -device virtio-blk-pci,drive=debs \
        -device virtio-serial-pci,id=vser0 \
        -chardev "socket,path=$dir/cmd.sock,server=on,wait=off,id=cmd" \
        -device virtserialport,bus=vser0.0,chardev=cmd,name=org.quiesce.test.cmd \
        -chardev "socket,path=$SG_AGENT_SOCK,server=on,wait=off,id=agent" "${agent_dev[@]}" \
        "${vsock[@]}" \
        -qmp "unix:$SG_QMP,server=on,wait=off" \
        </dev/null >"$dir/qemu.out" 2>&1 &
    SG_QEMU_PID=$!
    local _
    for _ in $(seq 100); do [ -S "$dir/cmd.sock" ] && break; sleep 0.1; done
    [ -S "$dir/cmd.sock" ] || { cat "$dir/qemu.out" >&2; echo "QEMU did not start" >&2; return 1; }
    sg_open_channel "$dir/cmd.sock" "$t0"
}

# sg_open_channel SOCKET T0: connects to the guest's command channel (the host end of the port
# org.quiesce.test.cmd) and waits for the guest's READY. SG_QEMU_PID is the QEMU being booted
# (its exit ends the wait); T0 (date +%s%N) when the boot began. Sets SG_BOOT_MS.
sg_open_channel() {
    local sock=$1 t0=$2 dir=$SG_DIR
    # One connection for the whole boot: bytes sent while the guest has not opened its port are
    # dropped by QEMU, so the guest announces READY first.
    coproc SG_CMD { exec socat - "UNIX-CONNECT:$sock"; }
    SG_CHANNEL_PID=$SG_CMD_PID
    local line deadline=$(( $(date +%s) + ${SG_BOOT_TIMEOUT:-300} )) next=30
    while :; do
        if IFS= read -r -t 5 line <&"${SG_CMD[0]}"; then
            [[ $line == READY* ]] && break
        fi
        if ! kill -0 "$SG_QEMU_PID" 2>/dev/null; then
            echo "QEMU exited during boot:" >&2; cat "$dir/qemu.out" >&2 2>/dev/null; tail -n 30 "$dir/console.log" >&2
            return 1
        fi
        local waited=$(( $(sg_ms_since "$t0") / 1000 ))
        if [ "$waited" -ge "$next" ]; then echo "  still booting (${waited} s)..."; next=$((next + 30)); fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "the guest's command channel did not come up in ${SG_BOOT_TIMEOUT:-300} s; console:" >&2
            tail -n 40 "$dir/console.log" >&2
            return 1
        fi
    done
    SG_BOOT_MS=$(sg_ms_since "$t0")
    echo "guest up (command channel ready) after ${SG_BOOT_MS} ms"
}

sg_run() {
    local limit=$1 script=$2 id line verb rid rc out
    SG_SEQ=$((SG_SEQ + 1))
    id=$SG_SEQ
    printf 'RUN %s %s %s\n' "$id" "$limit" "$(printf '%s\n' "$script" | base64 -w0)" >&"${SG_CMD[1]}" || return 125
    local deadline=$(( $(date +%s) + limit + 15 ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        if ! IFS=' ' read -r -t 5 verb rid rc out <&"${SG_CMD[0]}"; then
            kill -0 "$SG_CHANNEL_PID" 2>/dev/null || { echo "(the command channel to the guest is gone)"; return 125; }
            continue
        fi
        [ "$verb" = DONE ] && [ "$rid" = "$id" ] || continue
        printf '%s' "$out" | base64 -d
        return "$rc"
    done
    echo "(no answer from the guest's command channel within $((limit + 15)) s)"
    return 125
}

sg_qmp() { "$ROOT/scripts/vm/qmp" "$SG_QMP" "$@"; }

sg_add_agent_port() {
    sg_qmp run device_add '{"driver":"virtserialport","bus":"vser0.0","chardev":"agent","name":"org.quiesce.agent.0","id":"agentport"}' >/dev/null
}

sg_cleanup() {
    [ -n "$SG_CHANNEL_PID" ] && kill "$SG_CHANNEL_PID" 2>/dev/null
    stop_qemu "$SG_QEMU_PID"
    SG_QEMU_PID=
    [ -n "$SG_CHANNEL_PID" ] && wait "$SG_CHANNEL_PID" 2>/dev/null
    SG_CHANNEL_PID=
    if [ -n "$SG_DIR" ] && [ -d "$SG_DIR" ]; then
        [ -f "$SG_DIR/console.log" ] && cp -f "$SG_DIR/console.log" "$ROOT/.vm-cache/last-systemd-console.log" 2>/dev/null
        if [ -n "$SG_KEEP" ]; then
            echo "work directory kept: $SG_DIR"
        else
            rm -rf "$SG_DIR"
        fi
    fi
    return 0
}

# --- The workload and the snapshots (shared by run-e2e scenario 2 and demo-guest) -------------

# sg_install_packages: installs quiesce-agent and quiesce-host from the package disk inside the
# guest, with apt, as a user would (`apt install ./file.deb`). Prints apt's tail.
sg_install_packages() {
    sg_run 300 '
        set -e
        mkdir -p /media/debs
        mountpoint -q /media/debs || mount -o ro LABEL=quiesce-debs /media/debs
        cd /media/debs
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q ./quiesce-agent_*.deb ./quiesce-host_*.deb 2>&1 | tail -n 4
        dpkg-query -W -f="installed: \${Package} \${Version}\n" quiesce-agent quiesce-host'
}

# sg_start_workload: a writer appending fixed-format records to /data/records.log, each written
# and fsynced by dd (conv=fsync) before its id and time are logged to /run/workload.acks (tmpfs).
# Record N is one line: "record", N as 8 digits, those 8 digits eight times over, "end".
sg_start_workload() {
    sg_run 30 '
        rm -f /data/records.log /run/workload.acks
        systemd-run --quiet --unit=quiesce-workload --property=StandardOutput=null bash -c '\''
            i=0
            while :; do
                p=$(printf "%08d" $i)
                printf "record %s %s%s%s%s%s%s%s%s end\n" $p $p $p $p $p $p $p $p $p |
                    dd of=/data/records.log oflag=append conv=notrunc,fsync status=none || exit 1
                echo "$i $(date +%s%N)" >> /run/workload.acks
                i=$((i + 1))
            done'\''
        for _ in $(seq 100); do [ -s /run/workload.acks ] && exit 0; sleep 0.1; done
        echo "the workload acknowledged no record in 10 s"; exit 1'
}

# sg_last_ack: "ID TIME_NS" of the last record the workload has acknowledged (guest clock).
sg_last_ack() { sg_run 20 'tail -n 1 /run/workload.acks'; }

# sg_records IMAGE: "COUNT WHOLE" for /records.log in an ext4 image, read with debugfs (no
# journal replay). WHOLE=1 when the COUNT lines are records 0..COUNT-1, each complete and exact.
sg_records() {
    debugfs -R 'cat /records.log' "$1" 2>/dev/null | awk '
        BEGIN { ok = 1 }
        { p = sprintf("%08d", NR - 1)
          if ($0 != "record " p " " p p p p p p p p " end") ok = 0 }
        END { print NR, (NR > 0 && ok) }'
}

# sg_needs_recovery IMAGE: succeeds when ext4 says its journal must be replayed.
sg_needs_recovery() { dumpe2fs -h "$1" 2>/dev/null | grep -q '^Filesystem features:.*needs_recovery'; }

# sg_crash_snapshot IMAGE: the data disk copied by QMP drive-backup with no agent involved, while
# the workload writes. Sets SG_CRASH_ACKED (the last record acknowledged before the copy began).
sg_crash_snapshot() {
    SG_CRASH_ACKED=$(sg_last_ack)
    SG_CRASH_ACKED=${SG_CRASH_ACKED%% *}
    sg_qmp backup data "$1"
}

# sg_checkpoint_snapshot IMAGE [QUIESCECTL ARGS...]: quiescectl checkpoint over the agent's
# virtio-serial port around a QMP drive-backup of the data disk to IMAGE. While the guest is
# frozen, reads the workload's last acknowledged record (SG_ACKED), then starts the copy.
# Sets SG_CK_RC (quiescectl's exit code), SG_CK_OUT (its report), SG_CK_T0/SG_CK_T1 (guest
# clock in ns around the checkpoint) and SG_BACKUP_MS.
sg_checkpoint_snapshot() {
    local img=$1
    shift
    local flag=$SG_DIR/ck-frozen done=$SG_DIR/ck-done
    rm -f "$flag" "$done"
    SG_CK_T0=$(sg_run 10 'date +%s%N')
    # COMMAND runs when every agent reports frozen: it tells this shell, and waits until the
    # copy has been made (the command channel is this shell's, so the copy is made from here).
    "$SG_QUIESCECTL" --agent "serial:$SG_AGENT_SOCK" checkpoint --timeout 120s "$@" -- \
        sh -c 'touch "$1"; while [ ! -e "$2" ]; do sleep 0.05; done' sh "$flag" "$done" \
        >"$SG_DIR/checkpoint.out" 2>&1 &
    local ck=$!
    local _
    for _ in $(seq 600); do [ -e "$flag" ] && break; kill -0 "$ck" 2>/dev/null || break; sleep 0.05; done
    SG_ACKED=
    if [ -e "$flag" ]; then
        SG_ACKED=$(sg_last_ack)
        SG_ACKED=${SG_ACKED%% *}
        local t0
        t0=$(date +%s%N)
        sg_qmp backup data "$img" || echo "QMP drive-backup failed" >>"$SG_DIR/checkpoint.out"
        SG_BACKUP_MS=$(sg_ms_since "$t0")
    fi
    touch "$done"
    SG_CK_RC=0
    wait "$ck" || SG_CK_RC=$?
    SG_CK_OUT=$(cat "$SG_DIR/checkpoint.out")
    SG_CK_T1=$(sg_run 10 'date +%s%N')
}

# sg_writer_stall T0 T1: the longest gap, in ms, between two acknowledgements of the workload
# from T0 until 2 s after T1 (guest clock, ns): how long the application was held up.
sg_writer_stall() {
    sg_run 20 "awk -v t0=$1 -v t1=$(( $2 + 2000000000 )) '\$2 >= t0 && \$2 <= t1 { if (prev && \$2 - prev > gap) gap = \$2 - prev; prev = \$2 } END { printf \"%d\\n\", gap / 1000000 }' /run/workload.acks"
}
