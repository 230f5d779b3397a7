import QuiesceAgent
import QuiesceLinux
import QuiesceProtocol
import Testing

private func dev(_ major: UInt32, _ minor: UInt32) -> DeviceNumber { DeviceNumber(major: major, minor: minor) }

private func mounts(_ text: String) throws -> [MountEntry] { try MountInfo.parse(text) }

/// Resolves btrfs sources the way `BlockTopology.blockDevice(ofSource:)` would on that machine.
private func resolving(_ table: [String: DeviceNumber]) -> (MountEntry) -> DeviceNumber? {
    { table[$0.source] }
}

private extension FreezePlan {
    var mountPointsByWave: [[String]] { waves.map { $0.map(\.mountPoint) } }
    func planned(_ mountPoint: String) -> PlannedFilesystem? { freezeOrder.first { $0.mountPoint == mountPoint } }
    func skip(_ mountPoint: String) -> SkippedMount? { skipped.first { $0.mountPoint == mountPoint } }
}

@Suite("FreezePlan")
struct FreezePlanTests {
    // MARK: Eligibility and scope

    @Test("a Debian VM freezes its three disk filesystems in one wave and lists each pseudo filesystem once")
    func debianVM() throws {
        let plan = try FreezePlan.make(mounts: mounts(MountInfoFixtures.debianVM), topology: BlockTopology(), scope: FreezeScope())
        #expect(plan.mountPointsByWave == [["/", "/boot", "/boot/efi"]])
        let root = try #require(plan.planned("/"))
        #expect(root == PlannedFilesystem(
            mountPoint: "/", otherMountPoints: [], fsType: "ext4", source: "/dev/vda3", device: dev(254, 3),
            mountDevices: [dev(254, 3)], wave: 0, dependsOn: []))
        #expect(plan.skipped.allSatisfy { $0.reason == .pseudo })
        #expect(plan.skipped.count == 20)
        // binfmt_misc over its autofs trigger: two filesystems at one path, each listed once.
        #expect(plan.skipped.filter { $0.mountPoint == "/proc/sys/fs/binfmt_misc" }.map(\.fsType) == ["autofs", "binfmt_misc"])
        #expect(plan.skip("/run/user/1000")?.detail.contains("tmpfs") == true)
    }

    @Test("mounts outside an include scope are not listed as skipped")
    func includeScopeIsQuiet() throws {
        let plan = try FreezePlan.make(
            mounts: mounts(MountInfoFixtures.debianVM), topology: BlockTopology(), scope: FreezeScope(include: ["/boot*"]))
        #expect(plan.mountPointsByWave == [["/boot", "/boot/efi"]])
        #expect(plan.skipped.isEmpty)
    }

    @Test("include globs match across slashes, so /lab/* takes /lab/a/b but not /lab")
    func globsWithoutPathname() throws {
        let scope = FreezeScope(include: ["/lab/*"])
        #expect(scope.isIncluded(mountPoint: "/lab/a/b", fsType: "ext4"))
        #expect(scope.isIncluded(mountPoint: "/lab/a", fsType: "ext4"))
        #expect(!scope.isIncluded(mountPoint: "/lab", fsType: "ext4"))
        #expect(!scope.isIncluded(mountPoint: "/", fsType: "ext4"))
        let plan = try FreezePlan.make(mounts: mounts(MountInfoFixtures.threeLevelStack), topology: BlockTopology(), scope: scope)
        #expect(plan.freezeOrder.map(\.mountPoint).sorted() == ["/lab/outer", "/lab/outer/inner"])
    }

    @Test("exclude wins over include, and an excluded mount is reported with its pattern")
    func excludeWins() throws {
        let plan = try FreezePlan.make(
            mounts: mounts(MountInfoFixtures.debianVM), topology: BlockTopology(),
            scope: FreezeScope(include: ["/boot*"], exclude: ["/boot/*"]))
        #expect(plan.mountPointsByWave == [["/boot"]])
        #expect(plan.skipped == [SkippedMount(mountPoint: "/boot/efi", fsType: "vfat", reason: .excluded, detail: "excluded by /boot/*")])
    }

    @Test("type lists select and exclude by filesystem type, globs included")
    func typeLists() throws {
        let debian = try mounts(MountInfoFixtures.debianVM)
        let ext4Only = try FreezePlan.make(mounts: debian, topology: BlockTopology(), scope: FreezeScope(includeTypes: ["ext*"]))
        #expect(ext4Only.mountPointsByWave == [["/", "/boot"]])
        #expect(ext4Only.skipped.isEmpty)
        let noVfat = try FreezePlan.make(mounts: debian, topology: BlockTopology(), scope: FreezeScope(excludeTypes: ["vfat"]))
        #expect(noVfat.mountPointsByWave == [["/", "/boot"]])
        #expect(noVfat.skip("/boot/efi")?.reason == .excluded)
        #expect(noVfat.skip("/boot/efi")?.detail == "excluded by type vfat")
    }

    @Test("network, host-shared, read-only and pseudo block filesystems are skipped; a read-only bind of a writable disk is not")
    func networkAndReadOnly() throws {
        let plan = try FreezePlan.make(mounts: mounts(MountInfoFixtures.networkAndReadOnly), topology: BlockTopology(), scope: FreezeScope())
        #expect(plan.mountPointsByWave == [["/", "/mnt/archive"]])
        #expect(plan.skip("/mnt/nfs")?.reason == .network)
        #expect(plan.skip("/mnt/windows")?.reason == .network)
        #expect(plan.skip("/mnt/host")?.reason == .network)
        #expect(plan.skip("/mnt/ro-disk")?.reason == .readOnly)
        #expect(plan.skip("/media/cdrom")?.reason == .pseudo)
        #expect(plan.skip("/snap/core22/1380")?.reason == .pseudo)
        #expect(plan.skip("/proc")?.reason == .pseudo)
        #expect(SkipReason.readOnly.rawValue == "read-only")
    }

    @Test("FUSE filesystems and major-0 filesystems without a block device are never planned")
    func fuseAndNoDevice() throws {
        let plan = try FreezePlan.make(mounts: mounts(MountInfoFixtures.escapedPaths), topology: BlockTopology(), scope: FreezeScope())
        #expect(plan.skip("/mnt/sshfs")?.reason == .pseudo)
        #expect(plan.skip("/mnt/scratch")?.reason == .pseudo)
        let zfs = MountEntry(mountID: 99, parentID: 21, device: dev(0, 70), mountPoint: "/tank", fsType: "zfs", source: "tank")
        let withZFS = try FreezePlan.make(
            mounts: mounts(MountInfoFixtures.escapedPaths) + [zfs], topology: BlockTopology(), scope: FreezeScope())
        #expect(withZFS.skip("/tank")?.reason == .noDevice)
    }

    @Test("escaped mount points are planned by their decoded paths")
    func escapedMountPoints() throws {
        let plan = try FreezePlan.make(mounts: mounts(MountInfoFixtures.escapedPaths), topology: BlockTopology(), scope: FreezeScope())
        #expect(plan.mountPointsByWave == [["/", "/media/usb\nstick", "/mnt/My Disk", "/srv/tab\there"]])
        #expect(plan.planned("/mnt/My Disk")?.otherMountPoints == ["/home/alice/Photos (raw)"])
    }

    // MARK: One entry per superblock

    @Test("bind mounts of one filesystem freeze once, through the mount of its root")
    func bindMountsFreezeOnce() throws {
        let plan = try FreezePlan.make(mounts: mounts(MountInfoFixtures.dockerHost), topology: BlockTopology(), scope: FreezeScope())
        #expect(plan.mountPointsByWave == [["/", "/srv"]])
        #expect(plan.planned("/")?.otherMountPoints == ["/opt/app/config"])
        #expect(plan.planned("/srv")?.otherMountPoints == ["/var/lib/docker"])
        #expect(plan.planned("/srv")?.mountDevices == [dev(254, 17)])
        // The container's overlay, shm and network namespace are pseudo filesystems.
        #expect(plan.skipped.filter { $0.mountPoint.hasPrefix("/var/lib/docker/") || $0.mountPoint.hasPrefix("/run/docker/") }
            .map(\.fsType) == ["overlay", "tmpfs", "nsfs"])
        #expect(plan.skipped.allSatisfy { $0.reason == .pseudo })
    }

    @Test("a filesystem in scope only through a bind mount is opened through that bind mount")
    func scopeThroughBindMount() throws {
        let plan = try FreezePlan.make(
            mounts: mounts(MountInfoFixtures.dockerHost), topology: BlockTopology(), scope: FreezeScope(include: ["/var/lib/docker*"]))
        #expect(plan.mountPointsByWave == [["/var/lib/docker"]])
        #expect(plan.planned("/var/lib/docker")?.device == dev(254, 17))
        #expect(plan.skipped.map(\.fsType) == ["overlay", "tmpfs"])
    }

    @Test("excluding any mount of a filesystem keeps the whole filesystem from freezing: a freeze through another of its mounts would freeze the excluded one too")
    func excludedBindMount() throws {
        let plan = try FreezePlan.make(
            mounts: mounts(MountInfoFixtures.dockerHost), topology: BlockTopology(), scope: FreezeScope(exclude: ["/opt/*"]))
        // /opt/app/config is a bind mount of a directory of the root filesystem.
        #expect(plan.planned("/") == nil && plan.planned("/srv") != nil)
        #expect(plan.skip("/opt/app/config")?.detail == "excluded by /opt/*")
        let root = try #require(plan.skip("/"))
        #expect(root.reason == .excluded)
        #expect(root.detail.hasPrefix("its filesystem is also mounted at /opt/app/config, which is excluded by /opt/*"), "\(root.detail)")
        // Named explicitly, it is refused the same way.
        #expect(throws: PlanError.self) {
            try FreezePlan.make(mounts: mounts(MountInfoFixtures.dockerHost), topology: BlockTopology(),
                                scope: FreezeScope(exclude: ["/opt/*"]), explicitMounts: ["/"])
        }
    }

    @Test("an excluded filesystem bind-mounted inside the include scope is not frozen: exclude = / with a bind of a root directory under /srv/* leaves / alone (trial)")
    func excludeReachesBindsInsideTheIncludeScope() throws {
        let text = #"""
        25 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
        61 25 254:17 / /srv/data rw,relatime shared:32 - xfs /dev/vdb1 rw
        66 25 254:1 /var/www /srv/www rw,relatime shared:1 - ext4 /dev/vda1 rw

        """#
        let plan = try FreezePlan.make(mounts: mounts(text), topology: BlockTopology(),
                                       scope: FreezeScope(include: ["/srv/*"], exclude: ["/"]))
        // Before: /srv/www was a candidate (in the include scope, itself not excluded), and the
        // freeze through it froze /.
        #expect(plan.mountPointsByWave == [["/srv/data"]])
        #expect(plan.skip("/srv/www")?.reason == .excluded)
        #expect(plan.skip("/srv/www")?.detail.contains("also mounted at /, which is excluded by /") == true)
    }

    @Test("btrfs subvolumes of one filesystem freeze once, keyed by the device of their source")
    func btrfsSubvolumes() throws {
        for fixture in [MountInfoFixtures.btrfsRoot, MountInfoFixtures.btrfsRootDistinctDevices] {
            let entries = try mounts(fixture)
            let plan = try FreezePlan.make(
                mounts: entries, topology: BlockTopology(), scope: FreezeScope(), resolveDevice: resolving(["/dev/vda2": dev(254, 2)]))
            #expect(plan.mountPointsByWave == [["/", "/boot/efi"]])
            let root = try #require(plan.planned("/"))
            #expect(root.fsType == "btrfs")
            #expect(root.device == dev(254, 2))
            #expect(root.otherMountPoints == ["/home", "/.snapshots", "/var/log"])
            #expect(root.mountDevices == Set(entries.filter { $0.fsType == "btrfs" }.map(\.device)))
        }
    }

    @Test("without a resolved device a btrfs filesystem is skipped once, as no-device")
    func btrfsUnresolved() throws {
        let plan = try FreezePlan.make(mounts: mounts(MountInfoFixtures.btrfsRoot), topology: BlockTopology(), scope: FreezeScope())
        #expect(plan.mountPointsByWave == [["/boot/efi"]])
        #expect(plan.skipped.filter { $0.reason == .noDevice }.map(\.mountPoint) == ["/"])
    }

    @Test("a covered mount is frozen through another mount of its filesystem, or skipped as shadowed")
    func shadowedMounts() throws {
        let plan = try FreezePlan.make(mounts: mounts(MountInfoFixtures.shadowed), topology: BlockTopology(), scope: FreezeScope())
        #expect(plan.mountPointsByWave == [["/", "/mnt/old", "/mnt/twice", "/srv/xfs"]])
        #expect(plan.planned("/mnt/old")?.fsType == "ext4")
        #expect(plan.planned("/srv/xfs")?.fsType == "xfs")
        #expect(plan.planned("/srv/xfs")?.otherMountPoints == [])
        #expect(plan.planned("/mnt/twice")?.otherMountPoints == [])
        #expect(plan.skipped.map { "\($0.mountPoint) \($0.fsType) \($0.reason.rawValue)" } == [
            "/mnt/data ext4 shadowed",
            "/mnt/data tmpfs pseudo",
            "/mnt/old xfs shadowed",
            "/mnt/twice ext4 duplicate",
        ])
        #expect(plan.skipped[2].detail.hasSuffix("frozen through /srv/xfs"))
    }

    // MARK: Explicit mode

    @Test("explicit mount points plan exactly those, with trailing slashes ignored and no skipped list")
    func explicitExactly() throws {
        let plan = try FreezePlan.make(
            mounts: mounts(MountInfoFixtures.debianVM), topology: BlockTopology(), scope: FreezeScope(),
            explicitMounts: ["/boot/", "/", "//boot"])
        #expect(plan.mountPointsByWave == [["/", "/boot"]])
        #expect(plan.skipped.isEmpty)
    }

    @Test("an explicit list obeys the guest's scope: outside the include scope or excluded is ineligible, with the reason")
    func explicitObeysScope() throws {
        let entries = try mounts(MountInfoFixtures.debianVM)
        let scope = FreezeScope(include: ["/boot*"], exclude: ["/boot/efi"])
        #expect(try FreezePlan.make(mounts: entries, topology: BlockTopology(), scope: scope,
                                    explicitMounts: ["/boot"]).mountPointsByWave == [["/boot"]])
        for (path, reason) in [("/", SkipReason.notIncluded), ("/boot/efi", .excluded)] {
            do {
                _ = try FreezePlan.make(mounts: entries, topology: BlockTopology(), scope: scope, explicitMounts: ["/boot", path])
                Issue.record("\(path) was planned although the scope leaves it out")
            } catch {
                #expect(error.kind == .ineligibleMount && error.mountPoint == path && error.reason == reason, "\(error)")
                #expect(error.message.contains(reason.rawValue))
            }
        }
        let byType = FreezeScope(excludeTypes: ["vfat"])
        #expect(throws: PlanError.self) {
            try FreezePlan.make(mounts: entries, topology: BlockTopology(), scope: byType, explicitMounts: ["/boot/efi"])
        }
    }

    @Test("two explicit mount points of one filesystem give one entry, opened through the first given")
    func explicitSameSuperblock() throws {
        let plan = try FreezePlan.make(
            mounts: mounts(MountInfoFixtures.dockerHost), topology: BlockTopology(), scope: FreezeScope(),
            explicitMounts: ["/var/lib/docker", "/srv"])
        #expect(plan.mountPointsByWave == [["/var/lib/docker"]])
        #expect(plan.planned("/var/lib/docker")?.otherMountPoints == ["/srv"])
        let btrfs = try FreezePlan.make(
            mounts: mounts(MountInfoFixtures.btrfsRoot), topology: BlockTopology(), scope: FreezeScope(),
            explicitMounts: ["/home", "/var/log"], resolveDevice: resolving(["/dev/vda2": dev(254, 2)]))
        #expect(btrfs.mountPointsByWave == [["/home"]])
        // Freezing /home freezes the whole btrfs filesystem: / and /.snapshots too, and the
        // reply says so, though only /home and /var/log were asked for.
        #expect(btrfs.planned("/home")?.otherMountPoints == ["/", "/.snapshots", "/var/log"])
    }

    /// Before: only the in-scope mounts were listed, so the host could not see that a freeze
    /// through a bind inside the scope froze a mountpoint outside it (trial A).
    @Test("a filesystem's other mountpoints are listed in scope or not: all of them freeze with it")
    func otherMountPointsOutsideTheScope() throws {
        let plan = try FreezePlan.make(
            mounts: mounts(MountInfoFixtures.dockerHost), topology: BlockTopology(), scope: FreezeScope(include: ["/var/lib/docker"]))
        #expect(plan.mountPointsByWave == [["/var/lib/docker"]])
        #expect(plan.planned("/var/lib/docker")?.otherMountPoints == ["/srv"])
    }

    @Test("an explicit path that is not a mount point is an unknown-mount error")
    func explicitUnknown() throws {
        let entries = try mounts(MountInfoFixtures.debianVM)
        #expect(throws: PlanError(kind: .unknownMount, mountPoint: "/home", message: "/home/ is not a mount point")) {
            try FreezePlan.make(mounts: entries, topology: BlockTopology(), scope: FreezeScope(), explicitMounts: ["/", "/home/"])
        }
    }

    @Test("an explicit mount that cannot be frozen is an ineligible-mount error that gives the reason",
          arguments: [
              ("/mnt/nfs", "network"), ("/mnt/ro-disk", "read-only"), ("/proc", "pseudo"), ("/media/cdrom", "pseudo"),
          ])
    func explicitIneligible(mountPoint: String, reason: String) throws {
        let entries = try mounts(MountInfoFixtures.networkAndReadOnly)
        do {
            _ = try FreezePlan.make(mounts: entries, topology: BlockTopology(), scope: FreezeScope(), explicitMounts: [mountPoint])
            Issue.record("\(mountPoint) was planned")
        } catch {
            #expect(error.kind == .ineligibleMount)
            #expect(error.mountPoint == mountPoint)
            #expect(error.message.contains(reason), "\(error.message)")
            #expect(error.reason?.rawValue == reason)
            #expect(error.description == error.message)
        }
    }

    @Test("an explicit btrfs mount with no resolvable device is ineligible as no-device")
    func explicitNoDevice() throws {
        let entries = try mounts(MountInfoFixtures.btrfsRoot)
        #expect {
            try FreezePlan.make(mounts: entries, topology: BlockTopology(), scope: FreezeScope(), explicitMounts: ["/home"])
        } throws: { error in
            (error as? PlanError)?.kind == .ineligibleMount && (error as? PlanError)?.message.contains("no-device") == true
        }
    }

    @Test("an explicit path covered by a later mount opens the mount on top")
    func explicitShadowedPath() throws {
        let plan = try FreezePlan.make(
            mounts: mounts(MountInfoFixtures.shadowed), topology: BlockTopology(), scope: FreezeScope(), explicitMounts: ["/mnt/old"])
        #expect(plan.planned("/mnt/old")?.device == dev(254, 49))
        #expect(throws: PlanError.self) {
            try FreezePlan.make(mounts: mounts(MountInfoFixtures.shadowed), topology: BlockTopology(), scope: FreezeScope(),
                                explicitMounts: ["/mnt/data"]) // a tmpfs is on top
        }
    }

    // MARK: Stacking

    static let loopOnVdb = BlockTopology(lower: [:], loopBacking: [dev(7, 0): dev(254, 16)])

    @Test("a loop-stacked filesystem freezes before its backing filesystem whatever the mount order")
    func loopStackWhateverOrder() throws {
        let listed = try mounts(MountInfoFixtures.loopBackingListedAfter)
        // As listed (backing after the stacked one), and the other way round.
        let backingFirst = listed.filter { $0.mountPoint != "/mnt/lab" } + listed.filter { $0.mountPoint == "/mnt/lab" }
        for entries in [listed, backingFirst, Array(listed.reversed())] {
            let plan = try FreezePlan.make(mounts: entries, topology: Self.loopOnVdb, scope: FreezeScope())
            #expect(plan.mountPointsByWave == [["/", "/mnt/lab"], ["/srv/data"]])
            #expect(plan.planned("/mnt/lab")?.dependsOn == ["/srv/data"])
            #expect(plan.planned("/srv/data")?.wave == 1)
            let order = plan.freezeOrder.map(\.mountPoint)
            #expect(order.firstIndex(of: "/mnt/lab")! < order.firstIndex(of: "/srv/data")!)
        }
    }

    @Test("reverse mount order would freeze the backing filesystem first; the plan does not")
    func reverseMountOrderIsWrong() throws {
        let entries = try mounts(MountInfoFixtures.loopBackingListedAfter)
        let reverseMountOrder = entries.reversed().map(\.mountPoint).filter { ["/mnt/lab", "/srv/data"].contains($0) }
        #expect(reverseMountOrder == ["/srv/data", "/mnt/lab"])
        let plan = try FreezePlan.make(mounts: entries, topology: Self.loopOnVdb, scope: FreezeScope())
        #expect(plan.freezeOrder.map(\.mountPoint).filter { ["/mnt/lab", "/srv/data"].contains($0) } == ["/mnt/lab", "/srv/data"])
    }

    @Test("an nbd filesystem freezes before the filesystem holding the file its server writes into")
    func nbdServedFromFile() throws {
        // qemu-nbd -c /dev/nbd0 /srv/data/disk.qcow2, nbd0 mounted at /mnt/nbd, /srv/data listed after.
        let entries = try mounts(MountInfoFixtures.loopBackingListedAfter).map { m -> MountEntry in
            guard m.mountPoint == "/mnt/lab" else { return m }
            return MountEntry(mountID: m.mountID, parentID: m.parentID, device: dev(43, 0), mountPoint: "/mnt/nbd",
                              fsType: "ext4", source: "/dev/nbd0")
        }
        for file in [BlockTopology.PathLocation(device: dev(254, 16), mountID: 75), BlockTopology.PathLocation(device: dev(254, 16))] {
            let plan = try FreezePlan.make(mounts: entries, topology: BlockTopology(servedFiles: [dev(43, 0): [file]]), scope: FreezeScope())
            #expect(plan.mountPointsByWave == [["/", "/mnt/nbd"], ["/srv/data"]])
            #expect(plan.planned("/mnt/nbd")?.dependsOn == ["/srv/data"])
        }
        // Without the server's files nothing links them: one wave, and the step timeout is the net.
        let blind = try FreezePlan.make(mounts: entries, topology: BlockTopology(), scope: FreezeScope())
        #expect(blind.waves.count == 1)
    }

    @Test("a loop backing file found by its mount ID is followed even when its st_dev is in no mountinfo line (btrfs)")
    func loopOnBtrfsSubvolume() throws {
        // A lab image in /home (subvolume @home, st_dev 0:41 which mountinfo never shows) on loop2.
        let image = MountEntry(mountID: 90, parentID: 62, device: dev(7, 2), mountPoint: "/mnt/lab", fsType: "ext4", source: "/dev/loop2")
        let entries = try mounts(MountInfoFixtures.btrfsRoot) + [image]
        let resolve = resolving(["/dev/vda2": dev(254, 2)])
        let byMount = BlockTopology(loopBacking: [dev(7, 2): dev(0, 41)], loopBackingMount: [dev(7, 2): 62])
        let plan = try FreezePlan.make(mounts: entries, topology: byMount, scope: FreezeScope(), resolveDevice: resolve)
        #expect(plan.mountPointsByWave == [["/boot/efi", "/mnt/lab"], ["/"]])
        #expect(plan.planned("/mnt/lab")?.dependsOn == ["/"])
        // Without the mount ID the anonymous st_dev matches nothing: no order can be derived.
        let byDeviceOnly = BlockTopology(loopBacking: [dev(7, 2): dev(0, 41)])
        let blind = try FreezePlan.make(mounts: entries, topology: byDeviceOnly, scope: FreezeScope(), resolveDevice: resolve)
        #expect(blind.waves.count == 1)
    }

    @Test("filesystems on device-mapper over partitions do not wait for each other")
    func cryptLVMSiblings() throws {
        let topology = Self.cryptLVMTopology
        let plan = try FreezePlan.make(mounts: mounts(MountInfoFixtures.cryptLVM), topology: topology, scope: FreezeScope())
        #expect(plan.mountPointsByWave == [["/", "/boot", "/boot/efi", "/mnt/scratch"], ["/home"]])
        #expect(plan.planned("/")?.dependsOn == [])
        #expect(plan.planned("/home")?.dependsOn == [])
    }

    @Test("a loop image on an LVM volume freezes before the volume's filesystem")
    func loopOnLVM() throws {
        let plan = try FreezePlan.make(mounts: mounts(MountInfoFixtures.cryptLVM), topology: Self.cryptLVMTopology, scope: FreezeScope())
        #expect(plan.planned("/mnt/scratch")?.dependsOn == ["/home"])
        #expect(plan.planned("/mnt/scratch")?.wave == 0)
        #expect(plan.planned("/home")?.wave == 1)
    }

    static let cryptLVMTopology = BlockTopology(
        lower: [
            dev(253, 1): [dev(253, 0)], dev(253, 2): [dev(253, 0)], dev(253, 0): [dev(254, 3)],
            dev(254, 1): [dev(254, 0)], dev(254, 2): [dev(254, 0)], dev(254, 3): [dev(254, 0)],
        ],
        loopBacking: [dev(7, 1): dev(253, 2)])

    static let threeLevelTopology = BlockTopology(lower: [:], loopBacking: [dev(7, 0): dev(254, 16), dev(7, 1): dev(7, 0)])

    @Test("a three-level loop stack freezes top down in three waves and thaws bottom up")
    func threeLevels() throws {
        let entries = try mounts(MountInfoFixtures.threeLevelStack)
        for ordering in [entries, entries.reversed()] {
            let plan = try FreezePlan.make(mounts: ordering, topology: Self.threeLevelTopology, scope: FreezeScope())
            #expect(plan.mountPointsByWave == [["/", "/lab/outer/inner"], ["/lab/outer"], ["/lab"]])
            #expect(plan.planned("/lab/outer/inner")?.dependsOn == ["/lab", "/lab/outer"])
            #expect(plan.planned("/lab/outer")?.dependsOn == ["/lab"])
            #expect(plan.freezeOrder.map(\.wave) == [0, 0, 1, 2])
        }
    }

    @Test("stacking is followed through filesystems that are not planned")
    func throughUnplannedFilesystems() throws {
        let entries = try mounts(MountInfoFixtures.threeLevelStack)
        let explicit = try FreezePlan.make(
            mounts: entries, topology: Self.threeLevelTopology, scope: FreezeScope(), explicitMounts: ["/lab", "/lab/outer/inner"])
        #expect(explicit.mountPointsByWave == [["/lab/outer/inner"], ["/lab"]])
        let scoped = try FreezePlan.make(
            mounts: entries, topology: Self.threeLevelTopology, scope: FreezeScope(exclude: ["/lab/outer"]))
        #expect(scoped.mountPointsByWave == [["/", "/lab/outer/inner"], ["/lab"]])
    }

    @Test("a loop image on the root filesystem puts root in the last wave, with no special case for /")
    func rootLastNaturally() throws {
        // loop0 backed by a file on the root fs (vda1); root itself is on a partition of vda.
        let entries = try mounts(MountInfoFixtures.threeLevelStack)
        let topology = BlockTopology(
            lower: [dev(254, 1): [dev(254, 0)]], loopBacking: [dev(7, 0): dev(254, 1), dev(7, 1): dev(7, 0)])
        let plan = try FreezePlan.make(mounts: entries, topology: topology, scope: FreezeScope())
        #expect(plan.mountPointsByWave == [["/lab", "/lab/outer/inner"], ["/lab/outer"], ["/"]])
    }

    @Test("a cycle in the stacking is an error, not a hang")
    func cycle() throws {
        let entries = try mounts(MountInfoFixtures.threeLevelStack)
        let topology = BlockTopology(lower: [:], loopBacking: [dev(7, 0): dev(7, 1), dev(7, 1): dev(7, 0)])
        #expect {
            try FreezePlan.make(mounts: entries, topology: topology, scope: FreezeScope())
        } throws: { error in
            guard let error = error as? PlanError else { return false }
            return error.kind == .cycle && error.mountPoint == "/lab/outer"
        }
        let selfLoop = BlockTopology(lower: [:], loopBacking: [dev(7, 0): dev(7, 0)])
        #expect(throws: PlanError.self) {
            try FreezePlan.make(mounts: entries, topology: selfLoop, scope: FreezeScope(), explicitMounts: ["/lab/outer"])
        }
    }

    @Test("waves are sorted by mount point, so the same input always gives the same plan")
    func deterministic() throws {
        let entries = try mounts(MountInfoFixtures.cryptLVM)
        let a = try FreezePlan.make(mounts: entries, topology: Self.cryptLVMTopology, scope: FreezeScope())
        let b = try FreezePlan.make(mounts: entries.reversed(), topology: Self.cryptLVMTopology, scope: FreezeScope())
        #expect(a.waves == b.waves)
        for wave in a.waves { #expect(wave.map(\.mountPoint) == wave.map(\.mountPoint).sorted()) }
    }

    // MARK: Dependencies beyond sysfs

    /// /srv on vdb; /data is xfs on vdc with its log on loop0, an image on /srv; an ext4 on
    /// vdd keeps its journal on loop1, also an image on /srv; /ct is an overlay whose upper
    /// directory is on /srv, and loop2 is an image inside it, mounted at /img.
    static let hidden = """
        21 1 254:3 / / rw - ext4 /dev/vda3 rw
        30 21 254:16 / /srv rw - ext4 /dev/vdb rw
        31 21 254:32 / /data rw - xfs /dev/vdc rw,logdev=/dev/loop0,noquota
        32 21 254:48 / /journaled rw - ext4 /dev/vdd rw
        33 21 0:50 / /ct rw - overlay overlay rw,lowerdir=/base,upperdir=/srv/ct/upper,workdir=/srv/ct/work
        34 21 7:2 / /img rw - ext4 /dev/loop2 rw

        """
    static let hiddenTopology = BlockTopology(
        loopBacking: [dev(7, 0): dev(254, 16), dev(7, 1): dev(254, 16), dev(7, 2): dev(0, 51)],
        loopBackingMount: [dev(7, 2): 33],
        externalDevices: [dev(254, 32): [dev(7, 0)], dev(254, 48): [dev(7, 1)]],
        overlayUpper: [dev(0, 50): BlockTopology.PathLocation(device: dev(254, 16), mountID: 30)])

    @Test("an external log or journal, and a loop image inside an overlay, put their filesystem before the one they write into")
    func externalDevicesAndOverlayUpper() throws {
        let plan = try FreezePlan.make(mounts: mounts(Self.hidden), topology: Self.hiddenTopology, scope: FreezeScope())
        #expect(plan.mountPointsByWave == [["/", "/data", "/img", "/journaled"], ["/srv"]])
        for mp in ["/data", "/img", "/journaled"] { #expect(plan.planned(mp)?.dependsOn == ["/srv"], "\(mp)") }
        // Without those facts the same mounts fall into one wave: the deadlock of issue 13.
        let blind = try FreezePlan.make(mounts: mounts(Self.hidden), topology: BlockTopology(
            loopBacking: Self.hiddenTopology.loopBacking, loopBackingMount: Self.hiddenTopology.loopBackingMount), scope: FreezeScope())
        #expect(blind.waves.count == 1)
    }

    @Test("an overlay upper directory on a btrfs subvolume is found by its mount ID")
    func overlayUpperByMountID() throws {
        let text = """
            21 1 254:3 / / rw - ext4 /dev/vda3 rw
            40 21 0:45 /@containers /var/lib/containers rw - btrfs /dev/vdb rw,subvol=/@containers
            41 21 0:50 / /ct rw - overlay overlay rw,upperdir=/var/lib/containers/u,workdir=/var/lib/containers/w
            42 21 7:3 / /img rw - ext4 /dev/loop3 rw

            """
        let topology = BlockTopology(loopBacking: [dev(7, 3): dev(0, 51)], loopBackingMount: [dev(7, 3): 41],
                                     overlayUpper: [dev(0, 50): BlockTopology.PathLocation(device: dev(0, 46), mountID: 40)])
        let plan = try FreezePlan.make(mounts: mounts(text), topology: topology, scope: FreezeScope(),
                                       resolveDevice: resolving(["/dev/vdb": dev(254, 16)]))
        #expect(plan.planned("/img")?.dependsOn == ["/var/lib/containers"])
        #expect(plan.mountPointsByWave == [["/", "/img"], ["/var/lib/containers"]])
    }
}

@Suite("ext4 superblock")
struct Ext4SuperblockTests {
    /// A superblock (the 1024 bytes at offset 1024) with the fields the parser reads.
    private func superblock(magic: UInt16 = 0xEF53, compat: UInt32, journalInode: UInt32, journalDevice: UInt32) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 1024)
        func put(_ v: UInt32, at: Int, bytes: Int) { for i in 0..<bytes { b[at + i] = UInt8((v >> (8 * i)) & 0xff) } }
        put(UInt32(magic), at: 0x38, bytes: 2)
        put(compat, at: 0x5C, bytes: 4)
        put(journalInode, at: 0xE0, bytes: 4)
        put(journalDevice, at: 0xE4, bytes: 4)
        return b
    }

    @Test("s_journal_dev is decoded as new_encode_dev packs it, only for an external journal")
    func externalJournal() {
        // dumpe2fs shows "Journal device: 0x0704" for /dev/loop4 (7:4).
        #expect(Ext4Superblock.externalJournal(superblock(compat: 0x4, journalInode: 0, journalDevice: 0x0704)) == DeviceNumber(major: 7, minor: 4))
        // Minor numbers past 255 (new_encode_dev: minor's high bits go above the major).
        #expect(Ext4Superblock.externalJournal(superblock(compat: 0x4, journalInode: 0, journalDevice: (259 << 8) | 0x12 | (0x3 << 20))) == DeviceNumber(major: 259, minor: 0x312))
        #expect(Ext4Superblock.externalJournal(superblock(compat: 0x4, journalInode: 8, journalDevice: 0)) == nil, "internal journal")
        #expect(Ext4Superblock.externalJournal(superblock(compat: 0x0, journalInode: 0, journalDevice: 0x0704)) == nil, "no journal")
        #expect(Ext4Superblock.externalJournal(superblock(magic: 0x1234, compat: 0x4, journalInode: 0, journalDevice: 0x0704)) == nil)
        #expect(Ext4Superblock.externalJournal([0, 1, 2]) == nil)
    }
}
