import Foundation
import Glibc
import QuiesceLinux
import Testing

@Suite("MountInfo")
struct MountInfoTests {
    @Test("device numbers split a dev_t like gnu_dev_major/gnu_dev_minor and print as MAJOR:MINOR")
    func deviceNumbers() throws {
        #expect(DeviceNumber(0x0801) == DeviceNumber(major: 8, minor: 1))
        #expect(DeviceNumber(0x0801).description == "8:1")
        // Large numbers use the high bits: major 259 minor 65536 (an NVMe partition far out).
        let big = DeviceNumber(major: 0x1234, minor: 0x12345)
        #expect(DeviceNumber(big.rawValue) == big)
        #expect(DeviceNumber(parsing: "254:17") == DeviceNumber(major: 254, minor: 17))
        for bad in ["", "8", "8:", ":1", "8:1:2", " 8:1", "8:1\n", "a:b", "-1:2", "99999999999:1"] {
            #expect(DeviceNumber(parsing: bad) == nil, "\(bad.debugDescription) must not parse")
        }
        #expect(DeviceNumber(major: 8, minor: 1) < DeviceNumber(major: 8, minor: 2))
        #expect(DeviceNumber(major: 7, minor: 9) < DeviceNumber(major: 8, minor: 0))
        // The real thing: /dev/null is character device 1:3.
        var st = stat()
        try #require(stat("/dev/null", &st) == 0)
        #expect(DeviceNumber(UInt64(st.st_rdev)) == DeviceNumber(major: 1, minor: 3))
    }

    @Test("every field of a Debian VM's mountinfo is parsed")
    func debianFields() throws {
        let mounts = try MountInfo.parse(MountInfoFixtures.debianVM)
        #expect(mounts.count == 23)
        let root = try #require(mounts.first)
        #expect(root == MountEntry(
            mountID: 21, parentID: 1, device: DeviceNumber(major: 254, minor: 3), root: "/", mountPoint: "/",
            mountOptions: ["rw", "relatime"], optionalFields: ["shared:1"], fsType: "ext4",
            source: "/dev/vda3", superOptions: ["rw", "errors=remount-ro"]))
        let shm = try #require(mounts.first { $0.mountPoint == "/dev/shm" })
        #expect(shm.mountOptions == ["rw", "nosuid", "nodev"])
        #expect(shm.fsType == "tmpfs" && shm.source == "tmpfs")
        let efi = try #require(mounts.first { $0.mountPoint == "/boot/efi" })
        #expect(efi.parentID == 60 && efi.fsType == "vfat" && efi.superOptions.contains("utf8"))
        #expect(!root.isReadOnlyMount && !root.isReadOnlySuperblock)
    }

    @Test("octal escapes in root, mount point and source are decoded")
    func octalEscapes() throws {
        let mounts = try MountInfo.parse(MountInfoFixtures.escapedPaths)
        let points = mounts.map(\.mountPoint)
        #expect(points.contains("/mnt/My Disk"))
        #expect(points.contains("/srv/tab\there"))
        #expect(points.contains("/media/usb\nstick"))
        let photos = try #require(mounts.first { $0.mountID == 82 })
        #expect(photos.root == "/photos \\raw")
        #expect(photos.mountPoint == "/home/alice/Photos (raw)")
        let usb = try #require(mounts.first { $0.mountID == 83 })
        #expect(usb.source == "/dev/sd a1")
        #expect(usb.optionalFields == ["unbindable"])
    }

    @Test("zero, one or several optional fields come before the separator")
    func optionalFields() throws {
        let mounts = try MountInfo.parse(MountInfoFixtures.escapedPaths)
        #expect(mounts.first { $0.mountID == 80 }?.optionalFields == ["shared:40", "master:7", "propagate_from:2"])
        #expect(mounts.first { $0.mountID == 81 }?.optionalFields == [])
        #expect(mounts.first { $0.mountID == 21 }?.optionalFields == ["shared:1"])
    }

    @Test("a FUSE subtype stays in the type, an empty source parses as empty, an nsfs root is kept")
    func oddFields() throws {
        let mounts = try MountInfo.parse(MountInfoFixtures.escapedPaths)
        let sshfs = try #require(mounts.first { $0.mountID == 84 })
        #expect(sshfs.fsType == "fuse.sshfs")
        #expect(sshfs.source == "alice@build:/home/alice")
        let scratch = try #require(mounts.first { $0.mountID == 85 })
        #expect(scratch.fsType == "tmpfs" && scratch.source == "" && scratch.superOptions == ["rw", "size=1024k"])
        let netns = try #require(try MountInfo.parse(MountInfoFixtures.dockerHost).first { $0.fsType == "nsfs" })
        #expect(netns.root == "net:[4026532301]")
        #expect(netns.device == DeviceNumber(major: 0, minor: 4))
    }

    @Test("read-only mount and read-only superblock are told apart")
    func readOnly() throws {
        let mounts = try MountInfo.parse(MountInfoFixtures.networkAndReadOnly)
        let archive = try #require(mounts.first { $0.mountPoint == "/mnt/archive" })
        #expect(archive.isReadOnlyMount && !archive.isReadOnlySuperblock)
        let disk = try #require(mounts.first { $0.mountPoint == "/mnt/ro-disk" })
        #expect(disk.isReadOnlyMount && disk.isReadOnlySuperblock)
    }

    @Test("every fixture parses", arguments: [
        MountInfoFixtures.debianVM, MountInfoFixtures.dockerHost, MountInfoFixtures.btrfsRoot,
        MountInfoFixtures.btrfsRootDistinctDevices, MountInfoFixtures.escapedPaths,
        MountInfoFixtures.networkAndReadOnly, MountInfoFixtures.loopBackingListedAfter,
        MountInfoFixtures.cryptLVM, MountInfoFixtures.threeLevelStack, MountInfoFixtures.shadowed,
    ])
    func fixturesParse(text: String) throws {
        let mounts = try MountInfo.parse(text)
        #expect(mounts.count == text.split(separator: "\n").count)
    }

    @Test("a malformed line is an error that names its line number", arguments: [
        ("21 1 254:1 / / rw shared:1 - ext4 /dev/vda1", "expected 3 fields"),
        ("21 1 254:1 / / rw shared:1 ext4 /dev/vda1 rw", "separator"),
        ("x 1 254:1 / / rw - ext4 /dev/vda1 rw", "mount ID"),
        ("21 y 254:1 / / rw - ext4 /dev/vda1 rw", "parent ID"),
        ("21 1 254-1 / / rw - ext4 /dev/vda1 rw", "MAJOR:MINOR"),
        ("21 1 254:1 / /", "at least 10 fields"),
        ("21 1 254:1 / / rw - ext4 /dev/vda1 rw extra", "expected 3 fields"),
    ])
    func malformed(line: String, fragment: String) {
        let text = "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n\n" + line + "\n"
        do {
            _ = try MountInfo.parse(text)
            Issue.record("\(line) parsed")
        } catch {
            #expect(error.line == 3)
            #expect(error.message.contains(fragment), "\(error.message)")
            #expect(error.description.hasPrefix("mountinfo line 3: "))
        }
    }

    @Test("the live /proc/self/mountinfo is read to the end and parsed")
    func live() throws {
        let mounts = try MountInfo.read()
        #expect(!mounts.isEmpty)
        #expect(mounts.contains { $0.mountPoint == "/" })
        // procfs reports size 0: a reader trusting stat would get nothing.
        let expected = try String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)
            .split(separator: "\n").count
        #expect(abs(mounts.count - expected) <= 2) // the mount table may change in between
    }

    @Test("reading a missing file throws the system error")
    func missingFile() {
        #expect(throws: SystemError.self) { try MountInfo.read(path: "/nonexistent/mountinfo") }
    }
}

@Suite("BlockTopology")
struct BlockTopologyTests {
    /// A fake sysfs tree: vda (8:0 is avoided; these numbers are made up) with partition vda3,
    /// dm-0 on vda3, dm-1 on dm-0, loop0 backed by a real file, loop1 by a missing file.
    final class FakeSysfs {
        let root: URL
        var sys: String { root.appendingPathComponent("sys").path }
        var dev: String { root.appendingPathComponent("dev").path }
        let image: String

        init() throws {
            let fm = FileManager.default
            root = fm.temporaryDirectory.appendingPathComponent("quiesce-sysfs-\(UUID().uuidString)")
            image = root.appendingPathComponent("images/disk one.img").path
            try fm.createDirectory(atPath: root.appendingPathComponent("images").path, withIntermediateDirectories: true)
            try fm.createDirectory(atPath: dev, withIntermediateDirectories: true)
            try Data("image".utf8).write(to: URL(fileURLWithPath: image))

            let disk = "devices/pci0000:00/0000:00:04.0/virtio2/block/vda"
            try file("\(disk)/dev", "252:0\n")
            try file("\(disk)/size", "41943040\n")
            try file("\(disk)/vda3/dev", "252:3\n")
            try file("\(disk)/vda3/partition", "3\n")
            try file("devices/virtual/block/dm-0/dev", "251:0\n")
            try link("devices/virtual/block/dm-0/slaves/vda3", to: "../../../../pci0000:00/0000:00:04.0/virtio2/block/vda/vda3")
            try file("devices/virtual/block/dm-1/dev", "251:1\n")
            try link("devices/virtual/block/dm-1/slaves/dm-0", to: "../../dm-0")
            try file("devices/virtual/block/loop0/dev", "7:40\n")
            try file("devices/virtual/block/loop0/loop/backing_file", image + "\n")
            try file("devices/virtual/block/loop1/dev", "7:41\n")
            try file("devices/virtual/block/loop1/loop/backing_file", root.appendingPathComponent("gone.img").path + "\n")
            try link("dev/block/252:0", to: "../../\(disk)")
            try link("dev/block/252:3", to: "../../\(disk)/vda3")
            try link("dev/block/251:0", to: "../../devices/virtual/block/dm-0")
            try link("dev/block/251:1", to: "../../devices/virtual/block/dm-1")
            try link("dev/block/7:40", to: "../../devices/virtual/block/loop0")
            try link("dev/block/7:41", to: "../../devices/virtual/block/loop1")
        }

        deinit { try? FileManager.default.removeItem(at: root) }

        /// Adds a device served by a user-space process, as nbd shows one while connected:
        /// `dev` and `pid` (the process that called NBD_DO_IT), and the /sys/dev/block link.
        func addServedDevice(_ name: String, _ number: String, pid: Int32) throws {
            try file("devices/virtual/block/\(name)/dev", number + "\n")
            try file("devices/virtual/block/\(name)/pid", "\(pid)\n")
            try link("dev/block/\(number)", to: "../../devices/virtual/block/\(name)")
        }

        private func file(_ relative: String, _ contents: String) throws {
            let url = URL(fileURLWithPath: sys).appendingPathComponent(relative)
            try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
            try Data(contents.utf8).write(to: url)
        }

        private func link(_ relative: String, to destination: String) throws {
            let url = URL(fileURLWithPath: sys).appendingPathComponent(relative)
            try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
            try FileManager.default.createSymbolicLink(atPath: url.path, withDestinationPath: destination)
        }
    }

    static func device(_ major: UInt32, _ minor: UInt32) -> DeviceNumber { DeviceNumber(major: major, minor: minor) }

    @Test("device-mapper slaves and a partition's whole disk are followed recursively from a fake sysfs")
    func slavesAndPartitions() throws {
        let fake = try FakeSysfs()
        let topology = BlockTopology.read(startingFrom: [Self.device(251, 1)], sysfsRoot: fake.sys, devRoot: fake.dev)
        #expect(topology.lower == [
            Self.device(251, 1): [Self.device(251, 0)],
            Self.device(251, 0): [Self.device(252, 3)],
            Self.device(252, 3): [Self.device(252, 0)],
        ])
        #expect(topology.loopBacking.isEmpty)
    }

    @Test("a loop device's backing file gives the st_dev and mount of the filesystem holding it")
    func loopBackingFromSysfsPath() throws {
        let fake = try FakeSysfs()
        let topology = BlockTopology.read(
            startingFrom: [Self.device(7, 40), Self.device(7, 41)], sysfsRoot: fake.sys, devRoot: fake.dev)
        var st = stat()
        try #require(stat(fake.image, &st) == 0)
        #expect(topology.loopBacking[Self.device(7, 40)] == DeviceNumber(UInt64(st.st_dev)))
        // The mount the path is reached through is a line of mountinfo with that device (unless btrfs).
        let mountID = try #require(topology.loopBackingMount[Self.device(7, 40)])
        let mount = try #require(try MountInfo.read().first { $0.mountID == mountID })
        if mount.fsType != "btrfs" { #expect(mount.device == DeviceNumber(UInt64(st.st_dev))) }
        // A backing file that cannot be found leaves nothing, and nothing throws.
        #expect(topology.loopBacking[Self.device(7, 41)] == nil)
        #expect(topology.loopBackingMount[Self.device(7, 41)] == nil)
    }

    /// A process holding `writable` open read-write on fd 3 and /proc/version read-only on fd 4,
    /// like `qemu-nbd -c /dev/nbdN FILE` holding its image; it has printed "ready" when returned.
    private func startServer(holding writable: String) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", "exec 3<>\"$1\" 4</proc/version; echo ready; exec sleep 60", "sh", writable]
        let pipe = Pipe()
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = pipe
        process.standardError = FileHandle.nullDevice
        try process.run()
        _ = pipe.fileHandleForReading.availableData  // "ready": the fds are open
        return process
    }

    @Test("an nbd device's dependency is found through its server: the files its process holds open for writing")
    func nbdServedFiles() throws {
        let fake = try FakeSysfs()
        let server = try startServer(holding: fake.image)
        // SIGKILL: the child may inherit a mask that blocks SIGTERM from the test runner's thread.
        defer { kill(server.processIdentifier, SIGKILL); server.waitUntilExit() }
        try fake.addServedDevice("nbd3", "43:96", pid: server.processIdentifier)
        try fake.addServedDevice("nbd4", "43:128", pid: 0)
        let nbd = Self.device(43, 96)

        let topology = BlockTopology.read(startingFrom: [nbd, Self.device(43, 128)], sysfsRoot: fake.sys, devRoot: fake.dev)
        // Exactly the image's filesystem and mount: not /proc/version (read-only), not the pipe.
        let image = try #require(BlockTopology.location(ofPath: fake.image))
        #expect(topology.servedFiles[nbd] == [image])
        #expect(topology.servedFiles[Self.device(43, 128)] == nil)
        #expect(topology.lower.isEmpty && topology.loopBacking.isEmpty)

        // Under a FUSE or network mount the file is never touched: the mount alone is recorded.
        let fuse = BlockTopology.PathLocation(device: Self.device(0, 99), mountID: 4242)
        let imageDirectory = (fake.image as NSString).deletingLastPathComponent
        let served = BlockTopology.read(startingFrom: [nbd], sysfsRoot: fake.sys, devRoot: fake.dev,
                                        servedMount: { $0.hasPrefix(imageDirectory + "/") ? fuse : nil })
        #expect(served.servedFiles[nbd] == [fuse])

        // Once the server is gone, nothing is known and nothing throws.
        kill(server.processIdentifier, SIGKILL)
        server.waitUntilExit()
        let gone = BlockTopology.read(startingFrom: [nbd], sysfsRoot: fake.sys, devRoot: fake.dev)
        #expect(gone.servedFiles.isEmpty)
    }

    @Test("jbd2's /proc/fs/jbd2 names tell an internal journal (DEVICE-INODE) from an external one")
    func internalJournalFromJbd2Names() throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("quiesce-proc-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: root) }
        // Internal journals of vda1 and dm-8; loop3 holds someone's external journal.
        for entry in ["vda1-8", "dm-8-8", "loop3"] {
            try FileManager.default.createDirectory(at: root.appendingPathComponent("fs/jbd2/\(entry)"), withIntermediateDirectories: true)
        }
        for name in ["vda1", "dm-8"] { #expect(BlockTopology.hasInternalJournal(deviceName: name, procRoot: root.path), "\(name)") }
        for name in ["vda", "dm-80", "dm", "loop3", "loop2", ""] {
            #expect(!BlockTopology.hasInternalJournal(deviceName: name, procRoot: root.path), "\(name)")
        }
        #expect(!BlockTopology.hasInternalJournal(deviceName: "vda1", procRoot: "/nonexistent"))
    }

    @Test("devices without sysfs entries and major 0 are simply absent")
    func absent() throws {
        let fake = try FakeSysfs()
        let topology = BlockTopology.read(
            startingFrom: [Self.device(0, 30), Self.device(250, 9), Self.device(252, 0)], sysfsRoot: fake.sys, devRoot: fake.dev)
        #expect(topology == BlockTopology(lower: [:], loopBacking: [:]))
    }

    @Test("blockDevice(ofSource:) gives st_rdev of a block device node and nil for anything else")
    func blockDeviceOfSource() throws {
        #expect(BlockTopology.blockDevice(ofSource: "/dev/null") == nil)
        #expect(BlockTopology.blockDevice(ofSource: "tmpfs") == nil)
        #expect(BlockTopology.blockDevice(ofSource: "/nonexistent/vda2") == nil)
        // Block devices of this machine: /sys/dev/block/M:m names each one's node in its uevent.
        let numbers = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/dev/block")) ?? []
        var checked = 0
        for number in numbers.sorted() where checked < 3 {
            guard let uevent = try? String(contentsOfFile: "/sys/dev/block/\(number)/uevent", encoding: .utf8),
                  let line = uevent.split(separator: "\n").first(where: { $0.hasPrefix("DEVNAME=") }) else { continue }
            let node = "/dev/" + line.dropFirst("DEVNAME=".count)
            guard FileManager.default.fileExists(atPath: node) else { continue }
            #expect(BlockTopology.blockDevice(ofSource: node) == DeviceNumber(parsing: number), "\(node)")
            checked += 1
        }
    }

    static var canUseLoopDevices: Bool {
        getuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/sbin/losetup")
            && FileManager.default.fileExists(atPath: "/dev/loop-control")
    }

    @Test("a real loop device's backing filesystem comes from LOOP_GET_STATUS64, even once its file is deleted",
          .enabled(if: canUseLoopDevices, "needs root and losetup"))
    func realLoopDevice() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("quiesce-loop-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let image = dir.appendingPathComponent("loop.img").path
        #expect(FileManager.default.createFile(atPath: image, contents: Data(count: 1 << 20)))

        let loop = try run("/usr/sbin/losetup", "-f", "--show", image).trimmingCharacters(in: .whitespacesAndNewlines)
        defer { _ = try? run("/usr/sbin/losetup", "-d", loop) }
        let loopDevice = try #require(BlockTopology.blockDevice(ofSource: loop))
        #expect(loopDevice.major == 7 || loopDevice.major == 259)

        var st = stat()
        try #require(stat(image, &st) == 0)
        let topology = BlockTopology.read(startingFrom: [loopDevice])
        #expect(topology.loopBacking[loopDevice] == DeviceNumber(UInt64(st.st_dev)))
        #expect(topology.loopBackingMount[loopDevice] != nil)

        // Once the backing file is deleted, sysfs shows "PATH (deleted)" and only the loop driver
        // knows: the st_dev is still found, and the mount (found by path) is not guessed.
        try #require(unlink(image) == 0)
        let afterMove = BlockTopology.read(startingFrom: [loopDevice])
        #expect(afterMove.loopBacking[loopDevice] == DeviceNumber(UInt64(st.st_dev)))
        #expect(afterMove.loopBackingMount[loopDevice] == nil)
    }

    private func run(_ tool: String, _ arguments: String...) throws -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: tool)
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        try process.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw SystemError(tool, arguments.joined(separator: " "), Errno(EIO))
        }
        return String(decoding: data, as: UTF8.self)
    }
}
