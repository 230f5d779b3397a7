// What a block device is built on, read from sysfs: device-mapper and md slaves, a partition's
// whole disk, the filesystem holding a loop device's backing file, and the files an nbd device's
// server process writes to.
// The freeze plan needs this to freeze a stacked filesystem before the one under it.
#if canImport(Glibc)
import Glibc
#endif
import CQuiesceShims

/// The stacking of block devices: which devices each one rests on.
///
/// Only what could be read is present: a device with nothing below it (a plain disk),
/// or whose sysfs entries could not be read, has no key in `lower`.
public struct BlockTopology: Sendable, Equatable {
    /// Block device -> the block devices it is built on: device-mapper / md slaves
    /// (`/sys/dev/block/M:m/slaves/*/dev`) and, for a partition, its whole disk.
    public var lower: [DeviceNumber: [DeviceNumber]]
    /// Loop block device -> `st_dev` of the filesystem that holds its backing file.
    /// That is a filesystem's device, not a block device: match it against mountinfo's `major:minor`.
    public var loopBacking: [DeviceNumber: DeviceNumber]
    /// Loop block device -> mount ID (mountinfo's first column) of the mount through which its
    /// backing file's path is reached, when that path (from sysfs) still names the very file
    /// the loop device uses.
    ///
    /// Needed for btrfs: every subvolume has its own anonymous `st_dev` (the top-level one
    /// too), and mountinfo shows none of them, only one `major:minor` per filesystem. So a
    /// backing file on btrfs has an `st_dev` found in no mountinfo line; its mount ID finds
    /// the filesystem all the same.
    public var loopBackingMount: [DeviceNumber: Int]
    /// A filesystem's block device -> the other block devices it writes to: an xfs external log
    /// or realtime device (`logdev=`, `rtdev=` in mountinfo's super options) and an ext3/ext4
    /// external journal (`s_journal_dev` in its superblock). Its freeze flushes into them, so it
    /// rests on whatever they rest on. Filled by `externalDevices(of:device:)`.
    public var externalDevices: [DeviceNumber: [DeviceNumber]]
    /// An overlay mount's `major:minor` (mountinfo) -> where its upper directory lives. Every
    /// write to a file in the overlay (a loop image's too) lands in the upper directory's
    /// filesystem. Filled by `location(ofPath:)` on the `upperdir=` super option.
    public var overlayUpper: [DeviceNumber: PathLocation]
    /// A block device served by a user-space process (nbd: `/sys/dev/block/M:m/pid`, present
    /// while connected) -> where the regular files that process holds open for writing live
    /// (`/proc/PID/fd/*`; the mount ID from `/proc/PID/fdinfo/*`). sysfs shows no link for such a
    /// device, yet its writes land in those files: with `qemu-nbd -c /dev/nbdN FILE` the server is
    /// the process named there and FILE is one of them. Like a loop device's backing file, each
    /// is a dependency. Empty when the server serves from elsewhere (a socket to another process
    /// or machine): then nothing here can see what the device rests on.
    public var servedFiles: [DeviceNumber: [PathLocation]]

    public init(
        lower: [DeviceNumber: [DeviceNumber]] = [:], loopBacking: [DeviceNumber: DeviceNumber] = [:],
        loopBackingMount: [DeviceNumber: Int] = [:], externalDevices: [DeviceNumber: [DeviceNumber]] = [:],
        overlayUpper: [DeviceNumber: PathLocation] = [:], servedFiles: [DeviceNumber: [PathLocation]] = [:]
    ) {
        self.lower = lower
        self.loopBacking = loopBacking
        self.loopBackingMount = loopBackingMount
        self.externalDevices = externalDevices
        self.overlayUpper = overlayUpper
        self.servedFiles = servedFiles
    }

    /// Where a path lives: its filesystem's `st_dev` and the ID of the mount it is reached
    /// through (exact even for btrfs subvolumes, whose `st_dev` mountinfo does not show).
    public struct PathLocation: Sendable, Equatable {
        public var device: DeviceNumber
        public var mountID: Int?
        public init(device: DeviceNumber, mountID: Int? = nil) {
            self.device = device
            self.mountID = mountID
        }
    }

    /// Walks sysfs from each of `devices`, recursively through slaves, partition parents
    /// and loop backing devices, and records what each device rests on.
    ///
    /// Pass the real block device of every mounted filesystem (for btrfs the device of its
    /// source, see `blockDevice(ofSource:)`); devices with major 0 have no sysfs entry and
    /// are ignored. For a loop device the backing file's `st_dev` comes from
    /// `LOOP_GET_STATUS64` on `devRoot/block/M:m` or `devRoot/DEVNAME` (exact, whatever mount
    /// namespace the loop was set up in, and still right after the backing filesystem was
    /// moved or lazily unmounted), else from `stat` of the path in `loop/backing_file`.
    /// Nothing here throws: what cannot be read is simply absent.
    ///
    /// For a device with a `pid` attribute (nbd), the regular files its server process holds open
    /// for writing are recorded in `servedFiles` (see there).
    ///
    /// - Parameters:
    ///   - sysfsRoot: where sysfs is mounted; tests point it at a fake tree.
    ///   - devRoot: where devtmpfs is mounted; tests point it at a directory without device nodes.
    ///   - procRoot: where procfs is mounted (for an nbd server's open files).
    ///   - servedMount: the FUSE or network mount a path lies under (by mountpoint prefix, no
    ///     syscall), or nil. Every call that touches a file there (even the loop driver's
    ///     `LOOP_GET_STATUS64`, which stats its backing file) waits for a server that may never
    ///     answer, so a loop device whose backing file is there, or an nbd server's open file, is
    ///     recorded from that mount alone.
    public static func read(
        startingFrom devices: [DeviceNumber], sysfsRoot: String = "/sys", devRoot: String = "/dev",
        procRoot: String = "/proc", servedMount: (String) -> PathLocation? = { _ in nil }
    ) -> BlockTopology {
        var topology = BlockTopology()
        var pending = devices
        var visited = Set<DeviceNumber>()
        while let device = pending.popLast() {
            guard device.major != 0, visited.insert(device).inserted else { continue }
            let directory = "\(sysfsRoot)/dev/block/\(device)"

            var below: [DeviceNumber] = []
            for name in directoryEntries("\(directory)/slaves").sorted() {
                if let slave = readDeviceFile("\(directory)/slaves/\(name)/dev"), !below.contains(slave) {
                    below.append(slave)
                }
            }
            if exists("\(directory)/partition"), let real = realPath(directory),
               let disk = readDeviceFile("\(Paths.parent(real))/dev"), disk != device, !below.contains(disk) {
                below.append(disk)
            }
            if !below.isEmpty {
                topology.lower[device] = below
                pending.append(contentsOf: below)
            }

            if exists("\(directory)/loop") {
                let (backing, mountID) = loopBackingFile(device, directory: directory, devRoot: devRoot, servedMount: servedMount)
                if let backing {
                    topology.loopBacking[device] = backing
                    // The backing filesystem's own block device (when it is one) may rest on more.
                    pending.append(backing)
                }
                if let mountID { topology.loopBackingMount[device] = mountID }
            }

            if let server = readNumber("\(directory)/pid") {
                let files = filesWritten(byProcess: server, procRoot: procRoot, servedMount: servedMount)
                if !files.isEmpty {
                    topology.servedFiles[device] = files
                    pending.append(contentsOf: files.map(\.device))
                }
            }
        }
        return topology
    }

    /// The block device at `source` (`st_rdev`), or nil when `source` is not an absolute path
    /// to a block device node.
    ///
    /// btrfs reports an anonymous per-subvolume `major:minor` (0:N) in mountinfo; its source
    /// ("/dev/vda2") names the real device, which is what the filesystem rests on.
    public static func blockDevice(ofSource source: String) -> DeviceNumber? {
        guard source.hasPrefix("/") else { return nil }
        var st = stat()
        guard stat(source, &st) == 0, (st.st_mode & S_IFMT) == S_IFBLK else { return nil }
        return DeviceNumber(UInt64(st.st_rdev))
    }

    /// The block devices besides `device` that the filesystem of `mount` writes to: an xfs
    /// filesystem's `logdev=` and `rtdev=` (mountinfo super options, see xfs(5)), an ext3/ext4
    /// filesystem's external journal (`s_journal_dev`, read from its superblock on the device).
    /// Empty when there are none or they cannot be read.
    ///
    /// An ext3/ext4 filesystem whose journal jbd2 lists as internal (`hasInternalJournal`) is not
    /// read at all: a read of a device that has stopped completing I/O blocks in the kernel, and
    /// even a superblock the kernel holds in memory may share its page with blocks it never read
    /// (1 KiB blocks), so the read would go to the device.
    public static func externalDevices(of mount: MountEntry, device: DeviceNumber, devRoot: String = "/dev",
                                       sysfsRoot: String = "/sys", procRoot: String = "/proc") -> [DeviceNumber] {
        switch mount.fsType {
        case "xfs":
            return mount.superOptions.compactMap { option -> DeviceNumber? in
                for key in ["logdev=", "rtdev="] where option.hasPrefix(key) {
                    return blockDevice(ofSource: String(option.dropFirst(key.count)))
                }
                return nil
            }
        case "ext3", "ext4":
            let directory = "\(sysfsRoot)/dev/block/\(device)"
            if let real = realPath(directory), hasInternalJournal(deviceName: baseName(real), procRoot: procRoot) { return [] }
            guard let fd = openBlockNode(device, directory: directory, devRoot: devRoot) else { return [] }
            defer { close(fd) }
            var bytes = [UInt8](repeating: 0, count: Ext4Superblock.size)
            let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, Ext4Superblock.offset) }
            guard n == Ext4Superblock.size, let journal = Ext4Superblock.externalJournal(bytes), journal != device else { return [] }
            return [journal]
        default:
            return []
        }
    }

    /// Whether jbd2 runs a journal inside the filesystem on the block device the kernel calls
    /// `deviceName` ("vda1", "dm-3"): jbd2 names an internal journal "DEVICE-INODE" in
    /// `/proc/fs/jbd2/` (an external one after the journal's own device, with no inode).
    public static func hasInternalJournal(deviceName: String, procRoot: String = "/proc") -> Bool {
        guard !deviceName.isEmpty else { return false }
        let prefix = deviceName + "-"
        return directoryEntries("\(procRoot)/fs/jbd2").contains { entry in
            guard entry.hasPrefix(prefix) else { return false }
            let inode = entry.dropFirst(prefix.count)
            return !inode.isEmpty && inode.utf8.allSatisfy { $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }
        }
    }

    /// Where `path` lives (`st_dev` and mount ID), or nil when it cannot be opened.
    public static func location(ofPath path: String) -> PathLocation? {
        guard path.hasPrefix("/"), case .success(let fd) = syscallResult({ open(path, QS_O_PATH | O_CLOEXEC) }) else { return nil }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { return nil }
        return PathLocation(device: DeviceNumber(UInt64(st.st_dev)), mountID: mountID(ofDescriptor: fd))
    }

    /// The upper directory of an overlay mount (its `upperdir=` super option), nil for a
    /// read-only overlay or another filesystem type.
    public static func overlayUpperDirectory(_ mount: MountEntry) -> String? {
        guard mount.fsType == "overlay" else { return nil }
        return mount.superOptions.first { $0.hasPrefix("upperdir=") }.map { String($0.dropFirst("upperdir=".count)) }
    }

    // MARK: - sysfs helpers

    /// Opens the node of block device `device` read-only: /dev/block/M:m where udev runs, else
    /// /dev/DEVNAME (devtmpfs's name, from sysfs `uevent`). Nil unless the node really is that
    /// device: a stale or foreign /dev must not answer for it.
    private static func openBlockNode(_ device: DeviceNumber, directory: String, devRoot: String) -> Int32? {
        var nodes = ["\(devRoot)/block/\(device)"]
        if let name = deviceName(directory) { nodes.append("\(devRoot)/\(name)") }
        for node in nodes {
            guard case .success(let fd) = syscallResult({ open(node, O_RDONLY | O_CLOEXEC) }) else { continue }
            var st = stat()
            if fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFBLK, DeviceNumber(UInt64(st.st_rdev)) == device { return fd }
            close(fd)
        }
        return nil
    }

    /// The `st_dev` of a loop device's backing file, and the mount ID its sysfs path leads to.
    private static func loopBackingFile(
        _ device: DeviceNumber, directory: String, devRoot: String, servedMount: (String) -> PathLocation?
    ) -> (device: DeviceNumber?, mountID: Int?) {
        // The path sysfs shows, as seen by whoever set the loop up.
        var path: String?
        if let bytes = try? FD.readWholeFile(atPath: "\(directory)/loop/backing_file") {
            var p = String(decoding: bytes, as: UTF8.self)
            if p.hasSuffix("\n") { p.removeLast() }
            if p.hasPrefix("/") { path = p }
        }
        if let path, let served = servedMount(path) { return (served.device, served.mountID) }

        // Exact: ask the loop driver (dev and inode of the file it really uses).
        // The node is /dev/block/M:m where udev runs, else /dev/DEVNAME (devtmpfs's name, from uevent).
        var fromDriver: (device: UInt64, inode: UInt64)?
        if let fd = openBlockNode(device, directory: directory, devRoot: devRoot) {
            defer { close(fd) }
            var backingDevice: UInt64 = 0
            var backingInode: UInt64 = 0
            if case .success = syscallResult({ qs_loop_backing(fd, &backingDevice, &backingInode) }) {
                fromDriver = (backingDevice, backingInode)
            }
        }

        // The path may be stale, deleted or in another mount namespace: it only counts when it
        // is the same file.
        var fromPath: (device: DeviceNumber, mountID: Int?)?
        if let path {
            if case .success(let fd) = syscallResult({ open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC) }) {
                defer { close(fd) }
                var st = stat()
                if fstat(fd, &st) == 0,
                   fromDriver.map({ DeviceNumber($0.device) == DeviceNumber(UInt64(st.st_dev)) && $0.inode == UInt64(st.st_ino) }) ?? true {
                    fromPath = (DeviceNumber(UInt64(st.st_dev)), mountID(ofDescriptor: fd))
                }
            }
        }
        return (fromDriver.map { DeviceNumber($0.device) } ?? fromPath?.device, fromPath?.mountID)
    }

    /// Where the regular files that process `pid` holds open for writing live, each once, in fd
    /// order. The access mode and mount ID come from `/proc/PID/fdinfo/FD` (no call reaches the
    /// file's filesystem); a file under a FUSE or network mount (by its `/proc/PID/fd/FD` link's
    /// path) is recorded from that mount alone; any other is `stat`ed through its fd link. A
    /// process that is gone or not ours to read gives nothing.
    static func filesWritten(byProcess pid: Int, procRoot: String, servedMount: (String) -> PathLocation?) -> [PathLocation] {
        guard pid > 0 else { return [] }
        var found: [PathLocation] = []
        let fdDirectory = "\(procRoot)/\(pid)/fd"
        for name in directoryEntries(fdDirectory).compactMap(Int.init).sorted() {
            guard let info = try? FD.readWholeFile(atPath: "\(procRoot)/\(pid)/fdinfo/\(name)") else { continue }
            let fields = fdinfoFields(info)
            // flags: octal open flags; O_RDONLY files take no writes from the device.
            guard let flags = fields["flags"].flatMap({ Int($0, radix: 8) }), flags & Int(O_ACCMODE) != Int(O_RDONLY) else { continue }
            let mountID = fields["mnt_id"].flatMap { Int($0) }
            let link = "\(fdDirectory)/\(name)"
            var location: PathLocation?
            if let target = readLink(link), target.hasPrefix("/"), let served = servedMount(target) {
                location = served
            } else {
                var st = stat()
                if stat(link, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG {
                    location = PathLocation(device: DeviceNumber(UInt64(st.st_dev)), mountID: mountID)
                }
            }
            if let location, !found.contains(location) { found.append(location) }
        }
        return found
    }

    /// The "key:\tvalue" lines of an fdinfo file.
    private static func fdinfoFields(_ bytes: [UInt8]) -> [String: String] {
        var fields: [String: String] = [:]
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let value = line[line.index(after: colon)...].trimmingPrefix(while: { $0 == " " || $0 == "\t" })
            fields[String(line[..<colon])] = String(value)
        }
        return fields
    }

    /// The mount ID of an open fd, from the "mnt_id:" line of /proc/self/fdinfo/FD (Linux 3.15+).
    private static func mountID(ofDescriptor fd: Int32) -> Int? {
        guard let bytes = try? FD.readWholeFile(atPath: "/proc/self/fdinfo/\(fd)") else { return nil }
        return fdinfoFields(bytes)["mnt_id"].flatMap { Int($0) }
    }

    /// The target of a symbolic link (a /proc/PID/fd entry), nil if it cannot be read.
    private static func readLink(_ path: String) -> String? {
        var buffer = [CChar](repeating: 0, count: 4097)
        let n = readlink(path, &buffer, buffer.count - 1)
        guard n > 0 else { return nil }
        return String(decoding: buffer[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Reads a sysfs file holding one decimal number ("1234\n").
    private static func readNumber(_ path: String) -> Int? {
        guard let bytes = try? FD.readWholeFile(atPath: path) else { return nil }
        return String(decoding: bytes, as: UTF8.self).split(whereSeparator: { $0 == "\n" || $0 == " " }).first.flatMap { Int($0) }
    }

    /// The kernel's name for the device node under /dev ("loop0", "dm-0"), from the `DEVNAME=`
    /// line of its sysfs `uevent` file.
    private static func deviceName(_ directory: String) -> String? {
        guard let bytes = try? FD.readWholeFile(atPath: "\(directory)/uevent") else { return nil }
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") where line.hasPrefix("DEVNAME=") {
            let name = line.dropFirst("DEVNAME=".count)
            return name.isEmpty || name.contains("..") ? nil : String(name)
        }
        return nil
    }

    /// Reads a sysfs `dev` file ("8:1\n").
    private static func readDeviceFile(_ path: String) -> DeviceNumber? {
        guard let bytes = try? FD.readWholeFile(atPath: path) else { return nil }
        let text = String(decoding: bytes, as: UTF8.self)
        return DeviceNumber(parsing: text.split(whereSeparator: { $0 == "\n" || $0 == " " }).first ?? "")
    }

    private static func directoryEntries(_ path: String) -> [String] {
        FD.directoryEntries(atPath: path) ?? []
    }

    private static func exists(_ path: String) -> Bool {
        access(path, F_OK) == 0
    }

    private static func realPath(_ path: String) -> String? {
        guard let resolved = realpath(path, nil) else { return nil }
        defer { free(resolved) }
        return String(cString: resolved)
    }

    private static func baseName(_ path: String) -> String {
        path.lastIndex(of: "/").map { String(path[path.index(after: $0)...]) } ?? path
    }
}

/// The fields of an ext2/3/4 superblock that say where its journal is (the kernel's
/// `struct ext4_super_block`, fs/ext4/ext4.h). The superblock is 1024 bytes at byte 1024 of
/// the device, little-endian.
public enum Ext4Superblock {
    public static let offset: Int = 1024
    public static let size = 1024
    static let magic: UInt16 = 0xEF53                 // s_magic at 0x38
    static let featureCompatHasJournal: UInt32 = 0x4  // EXT4_FEATURE_COMPAT_HAS_JOURNAL, s_feature_compat at 0x5C

    /// The external journal device of the filesystem whose superblock is `bytes`, or nil when
    /// it has no journal, an internal one (`s_journal_inum` at 0xE0 is non-zero), or `bytes` is
    /// not an ext superblock. `s_journal_dev` (0xE4) holds the device as `new_encode_dev` packs
    /// it (include/linux/kdev_t.h); the kernel rewrites it at mount when the journal was found
    /// elsewhere (`journal_path=`), so on a mounted filesystem it is current.
    public static func externalJournal(_ bytes: [UInt8]) -> DeviceNumber? {
        guard bytes.count >= 0xE8 else { return nil }
        func u16(_ at: Int) -> UInt16 { UInt16(bytes[at]) | UInt16(bytes[at + 1]) << 8 }
        func u32(_ at: Int) -> UInt32 { UInt32(u16(at)) | UInt32(u16(at + 2)) << 16 }
        guard u16(0x38) == magic, u32(0x5C) & featureCompatHasJournal != 0, u32(0xE0) == 0 else { return nil }
        let encoded = u32(0xE4)
        guard encoded != 0 else { return nil }
        return DeviceNumber(major: (encoded & 0xfff00) >> 8, minor: (encoded & 0xff) | ((encoded >> 12) & 0xfff00))
    }
}
