# Entry points. `make demo` runs the main job in a real guest; `make test` runs every test.
SWIFT ?= swift
# Static Swift runtime: the agent goes into guests that have no Swift installed. Symbols bound
# at start (-z now), as Debian hardens its daemons (packaging/debian/rules uses the same flags).
# The agent is linked static-pie, with glibc too (QUIESCE_STATIC_PIE=1, see Package.swift),
# which needs no $ORIGIN RUNPATH (--disable-local-rpath; nothing here needs one).
RELEASE_FLAGS = -c release --static-swift-stdlib --disable-local-rpath -Xlinker -z -Xlinker now
RELEASE_BIN = .build/release

.PHONY: all build release deps test unit bench-smoke vm-test e2e storage-test fuzz-smoke fuzz bench demo demo-local demo-vm deb deb-check db-proof e2e-hooks clean

all: build

# Installs only what is missing (a dpkg query per package when nothing is), so the two
# newcomer commands below can depend on it.
deps:
	scripts/install-deps

build:
	$(SWIFT) build

release:
	QUIESCE_STATIC_PIE=1 $(SWIFT) build $(RELEASE_FLAGS)
	@$(RELEASE_BIN)/quiesced --version >/dev/null || { echo "make release: the agent just built does not start (see Package.swift on static-pie)" >&2; exit 1; }

# Every test: the benchmark's smoke run against qemu-ga (release build), the agent in a real
# QEMU guest (vsock, virtio-serial, a consistent snapshot of a virtio disk), 30 s of protocol
# fuzzing, then the Swift suites (protocol vectors, plan fixtures, the agent and coordinator on
# real loop filesystems), the databases behind the shipped hooks, the Debian packages' checks,
# the end-to-end scenarios in a systemd guest that installs those packages (e2e), stacked and
# failing storage in that guest (storage-test), and the database hooks under the agent's real
# unit in that guest (e2e-hooks).
test: deps bench-smoke vm-test fuzz-smoke unit db-proof deb-check e2e storage-test e2e-hooks

# The syscall funnel first (only QuiesceLinux imports Glibc: scripts/check-layering), then the
# Swift suites.
unit:
	scripts/check-layering
	$(SWIFT) test

bench-smoke: release
	bench/freeze-bench --quick --quiesced $(RELEASE_BIN)/quiesced

# Coverage-guided fuzzing of the wire protocol (libFuzzer from the Swift toolchain) with
# properties checked on every input; seeds are the protocol vectors. `make test` runs 30 s.
fuzz-smoke:
	fuzz/run 30

fuzz:
	fuzz/run 300

# A throwaway QEMU guest (Debian kernel, busybox initramfs, TCG) running the release agent:
# what the host cannot show (vsock connect, a real virtio-serial port, freeze-everything in scope).
vm-test: release
	scripts/vm/run-guest-test --bin $(RELEASE_BIN)

# The shipped database hooks on Debian's real MariaDB and PostgreSQL (installed by the script if
# missing, never auto-started): raw copies taken by `quiescectl checkpoint` are judged with and
# without the hooks. About 20 s.
db-proof: release
	scripts/db-proof --bin $(RELEASE_BIN)

# The full side-by-side benchmark with every target checked, printed as one table: light load
# (16 filesystems, 8 MiB dirty each), heavy load (streaming writers on 8 and 16 filesystems),
# idle wakeups over 30 s, RSS and PSS, and the group of 32 from bench/group-bench. ~4 minutes.
bench: release
	@mkdir -p build
	bench/group-bench --bin $(RELEASE_BIN) --json build/group-bench.json
	bench/freeze-bench --check --quiesced $(RELEASE_BIN)/quiesced --group-json build/group-bench.json

# The main job: a Debian 12 guest with systemd (built once, cached in .vm-cache/) gets the
# packages from `make deb` installed with apt; the host runs quiescectl checkpoint around a QMP
# snapshot of the guest's data disk while a workload writes, and proves the snapshot consistent
# beside a crash-consistent one.
demo: deps deb
	scripts/vm/demo-guest --debs build/deb

# The same job on loop filesystems on this machine (no VM): quiesced serving them and
# quiescectl checkpointing a raw copy that it proves consistent. Cleans up after itself.
demo-local: deps release
	scripts/demo $(RELEASE_BIN)

# Scenarios 1-6 of issue 8 in that guest: udev starts the agent, a consistent QMP snapshot,
# freeze-everything while journald/rsyslog write, SIGKILL while frozen, reinstall and upgrade
# while frozen, vsock. See scripts/vm/run-e2e. Then qemu-ga's port: qemu-ga alone against
# quiesced in front of it, by its protocol (run-qga-e2e) and through a real libvirtd and virsh
# (run-libvirt-e2e, which installs Debian's libvirt-daemon itself).
e2e: deps deb
	scripts/vm/run-e2e --debs build/deb
	scripts/vm/run-qga-e2e --debs build/deb
	scripts/vm/run-libvirt-e2e --debs build/deb

# Issue 13's storage cases in the same systemd guest (its kernel has device-mapper, md and nbd;
# this host's has not): LVM thin and linear, dm-crypt, md RAID1 and qemu-nbd stacks on images in
# another filesystem, mounted in the order that deadlocks reverse-mount-order freezers; a dm
# device that stops completing I/O; one that fails it. Freezes everything in the guest, never on
# the host. About 2 minutes. See scripts/vm/run-storage-test.
storage-test: deps deb
	scripts/vm/run-storage-test --debs build/deb

# The shipped database hooks under the agent's real systemd unit in that guest: Debian's MariaDB
# and PostgreSQL with their data on /data, writers running, both hooks enabled by their rename;
# the host checkpoints /data by QMP and judges the copy (MyISAM closed, PostgreSQL REDO fresh).
e2e-hooks: deps deb
	scripts/vm/run-guest-hooks --debs build/deb

# The same job in a throwaway QEMU guest: the host checkpoints the guest over virtio-serial and
# proves the disk copy consistent (see scripts/vm/run-guest-test for every check it prints).
demo-vm: vm-test

# The Debian packages quiesce-agent and quiesce-host, from the release binaries above (no second
# compile), into build/deb/; prints their paths. See packaging/README.md.
deb: deps release
	scripts/build-deb --bin $(RELEASE_BIN)

# lintian, systemd-analyze verify on the unit, what each package must contain, and
# install / reinstall / remove / purge on this machine (skipped if the packages are installed).
deb-check: deb
	scripts/check-deb --install

clean:
	rm -rf .build .build-* build
