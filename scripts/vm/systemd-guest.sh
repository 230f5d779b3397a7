# shellcheck shell=bash
# Boots and drives the systemd guest of scripts/vm/build-systemd-guest (sourced by run-e2e and
# demo-guest). Needs lib.sh sourced first, ROOT set, and a caller that traps EXIT to sg_cleanup.
#
#   sg_boot DIR DEBS_DIR [agent-port-at-boot=yes|no]
#       builds or reuses the cached image, makes in DIR a qcow2 overlay over it, a fresh 256 MiB
#       ext4 data disk (/data in the guest) and a read-only disk holding DEBS_DIR's .deb files,
#       boots QEMU (TCG) and waits for the guest's command channel. Sets SG_DIR, SG_QMP,
#       SG_AGENT_SOCK, SG_VSOCK_CID (empty when the host has no usable /dev/vhost-vsock and
#       SG_VSOCK_SKIP says why), SG_BOOT_MS.
#   sg_run TIMEOUT_S SCRIPT   runs SCRIPT with bash in the guest (as root); prints its output,
#                             returns its exit code (124 on timeout, 125 if the channel failed)
#   sg_qmp ARGS...            scripts/vm/qmp on the guest's QMP socket
#   sg_add_agent_port         hot-adds the agent's virtio-serial port (QMP device_add)
#   sg_cleanup                kills QEMU and the channel; removes DIR unless SG_KEEP is set
#
# The guest: /dev/vda the system disk (overlay), /dev/vdb the data disk (QMP drive id "data",
# cache=writethrough), /dev/vdc the package disk (label quiesce-debs); virtio-serial ports
# org.quiesce.test.cmd (test channel) and org.quiesce.agent.0 (the agent's, chardev socket
# SG_AGENT_SOCK); ttyS0 the console (DIR/console.log), ttyS1 an autologin root shell
# (DIR/shell.sock, for a human: socat -,raw,echo=0 UNIX-CONNECT:DIR/shell.sock).

SG_DIR= SG_QEMU_PID= SG_QMP= SG_AGENT_SOCK= SG_VSOCK_CID= SG_VSOCK_SKIP= SG_BOOT_MS= SG_SEQ=0
SG_CMD_PID= SG_KEEP=${SG_KEEP:-}

sg_ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

sg_boot() {
    local dir=$1 debs=$2 port_at_boot=${3:-yes}
    SG_DIR=$dir
    local guest kernel initrd base t0
    echo "== build or reuse the systemd guest image (.vm-cache/systemd-guest)"
    t0=$(date +%s%N)
    guest=$("$ROOT/scripts/vm/build-systemd-guest") || return 1
    kernel=$(sed -n 's/^KERNEL=//p' <<<"$guest")
    initrd=$(sed -n 's/^INITRD=//p' <<<"$guest")
    base=$(sed -n 's/^BASE=//p' <<<"$guest")
    echo "image ready in $(sg_ms_since "$t0") ms: $base"

    ls "$debs"/quiesce-agent_*.deb >/dev/null 2>&1 || { echo "no quiesce-agent_*.deb in $debs" >&2; return 1; }
    qemu-img create -q -f qcow2 -F raw -b "$base" "$dir/system.qcow2"
    truncate -s 256M "$dir/data.img"
    mkfs.ext4 -q -F -L quiesce-data "$dir/data.img"
    mkdir -p "$dir/debs"
    cp "$debs"/*.deb "$dir/debs/"
    truncate -s 128M "$dir/debs.img"
    mkfs.ext4 -q -F -L quiesce-debs -d "$dir/debs" "$dir/debs.img"

    SG_QMP=$dir/qmp.sock
    SG_AGENT_SOCK=$dir/agent.sock
    local vsock=()
    SG_VSOCK_CID= SG_VSOCK_SKIP=
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
    # One connection for the whole run: bytes sent while the guest has not opened its port are
    # dropped by QEMU, so the guest announces READY first.
    coproc SG_CMD { exec socat - "UNIX-CONNECT:$dir/cmd.sock"; }
    SG_CMD_PID=$SG_CMD_PID
    local line deadline=$(( $(date +%s) + ${SG_BOOT_TIMEOUT:-300} )) next=30
    while :; do
        if IFS= read -r -t 5 line <&"${SG_CMD[0]}"; then
            [[ $line == READY* ]] && break
        fi
        if ! kill -0 "$SG_QEMU_PID" 2>/dev/null; then
            echo "QEMU exited during boot:" >&2; cat "$dir/qemu.out" >&2; tail -n 30 "$dir/console.log" >&2
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
        IFS=' ' read -r -t 5 verb rid rc out <&"${SG_CMD[0]}" || continue
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
    [ -n "$SG_CMD_PID" ] && kill "$SG_CMD_PID" 2>/dev/null
    stop_qemu "$SG_QEMU_PID"
    SG_QEMU_PID=
    [ -n "$SG_CMD_PID" ] && wait "$SG_CMD_PID" 2>/dev/null
    SG_CMD_PID=
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
