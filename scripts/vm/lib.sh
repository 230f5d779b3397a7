# shellcheck shell=bash
# Shell functions the scripts in scripts/vm/ share (sourced, not run): host packages, apt
# downloads, the kernel Debian's linux-image-amd64 points at, and stopping a QEMU.

# ensure_host_packages PROG PACKAGE...: installs the Debian packages that are missing, like
# scripts/install-deps, with no service started by their maintainer scripts (there may be no init).
# PROG names the caller in messages.
ensure_host_packages() {
    local prog=$1
    shift
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "$prog: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    local own_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        own_policy=1
    fi
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >&2 || {
        [ -n "$own_policy" ] && rm -f /usr/sbin/policy-rc.d
        return 1
    }
    [ -n "$own_policy" ] && rm -f /usr/sbin/policy-rc.d
    return 0
}

# apt_download PACKAGE...: apt-get download into the current directory; refreshes stale package
# lists once on failure.
apt_download() {
    apt-get download -q -o APT::Sandbox::User=root "$@" >&2 && return 0
    apt-get update -qq >&2
    apt-get download -q -o APT::Sandbox::User=root "$@" >&2
}

# candidate_version PACKAGE: the version apt would install (refreshes the lists once if none).
candidate_version() {
    local v
    v=$(apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p')
    if [ -z "$v" ] || [ "$v" = "(none)" ]; then
        apt-get update -qq >&2
        v=$(apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p')
    fi
    [ -n "$v" ] && [ "$v" != "(none)" ] || { echo "cannot resolve a version of $1" >&2; return 1; }
    echo "$v"
}

# kernel_package: the package linux-image-amd64 depends on, e.g. linux-image-6.1.0-56-amd64.
kernel_package() {
    local name
    name=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1)
    if [ -z "$name" ]; then
        apt-get update -qq >&2
        name=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1)
    fi
    [ -n "$name" ] || { echo "cannot resolve linux-image-amd64's kernel package" >&2; return 1; }
    echo "$name"
}

# stop_qemu PID: asks QEMU to quit (SIGTERM), waits up to 3 s, then SIGKILLs it and reaps it.
# Safe to call with an empty or dead PID.
stop_qemu() {
    local pid=$1
    [ -n "$pid" ] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null
        local _
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
    return 0
}
