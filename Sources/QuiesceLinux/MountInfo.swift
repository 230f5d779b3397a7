// Parsing /proc/self/mountinfo (proc(5)): the one list of mounts that says which
// superblock (major:minor) each mount shows, with the root of the mount inside it.
#if canImport(Glibc)
import Glibc
#endif

/// A Linux device number (`dev_t`) split into major and minor, as printed "8:1".
///
/// Used both for block devices (`st_rdev`, sysfs `dev` files) and for the device a
/// filesystem reports as `st_dev` (the mountinfo `major:minor` column), which is the
/// key the kernel freezes by: one freeze per superblock.
public struct DeviceNumber: Hashable, Sendable, Comparable, CustomStringConvertible {
    public var major: UInt32
    public var minor: UInt32

    public init(major: UInt32, minor: UInt32) {
        self.major = major
        self.minor = minor
    }

    /// Splits a `dev_t` (`st_dev`, `st_rdev`, `lo_device`) the way glibc's
    /// `gnu_dev_major`/`gnu_dev_minor` do.
    public init(_ dev: UInt64) {
        major = UInt32(truncatingIfNeeded: ((dev >> 8) & 0xfff) | ((dev >> 32) & ~UInt64(0xfff)))
        minor = UInt32(truncatingIfNeeded: (dev & 0xff) | ((dev >> 12) & ~UInt64(0xff)))
    }

    /// Parses "MAJOR:MINOR" in decimal, as in mountinfo and sysfs `dev` files
    /// (no surrounding whitespace). Returns nil for anything else.
    public init?(parsing text: some StringProtocol) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2,
              parts.allSatisfy({ !$0.isEmpty && $0.utf8.allSatisfy { $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") } }),
              let major = UInt32(parts[0]), let minor = UInt32(parts[1])
        else { return nil }
        self.init(major: major, minor: minor)
    }

    /// The `dev_t` value glibc's `gnu_dev_makedev` would give, so that
    /// `DeviceNumber(d.rawValue) == d`.
    public var rawValue: UInt64 {
        let major = UInt64(self.major), minor = UInt64(self.minor)
        return ((major & 0xfff) << 8) | ((major & ~UInt64(0xfff)) << 32)
            | (minor & 0xff) | ((minor & ~UInt64(0xff)) << 12)
    }

    /// "8:1".
    public var description: String { "\(major):\(minor)" }

    public static func < (lhs: DeviceNumber, rhs: DeviceNumber) -> Bool {
        (lhs.major, lhs.minor) < (rhs.major, rhs.minor)
    }
}

/// One line of /proc/self/mountinfo, with octal escapes decoded.
///
/// Field names follow proc(5): `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`.
public struct MountEntry: Sendable, Equatable {
    /// Unique id of the mount (may be reused after unmount).
    public var mountID: Int
    /// Id of the parent mount (of itself for the root of the mount tree).
    public var parentID: Int
    /// The `major:minor` of the superblock: what `stat` reports as `st_dev` for files in it.
    /// For btrfs this is an anonymous per-subvolume number (major 0), not the disk.
    public var device: DeviceNumber
    /// The directory of the filesystem that forms the root of this mount
    /// ("/" for an ordinary mount, "/@home" for a btrfs subvolume, a subdirectory for a bind mount).
    public var root: String
    /// Where the mount is, relative to the reading process's root.
    public var mountPoint: String
    /// Per-mount options ("rw", "noatime", ...).
    public var mountOptions: [String]
    /// Zero or more "tag[:value]" fields ("shared:1", "master:2", "unbindable").
    public var optionalFields: [String]
    /// Filesystem type, possibly with a subtype ("ext4", "fuse.sshfs").
    public var fsType: String
    /// Filesystem-specific source ("/dev/vda1", "server:/export", "none", possibly empty).
    public var source: String
    /// Per-superblock options ("rw", "errors=remount-ro", ...).
    public var superOptions: [String]

    public init(
        mountID: Int, parentID: Int, device: DeviceNumber, root: String = "/", mountPoint: String,
        mountOptions: [String] = ["rw"], optionalFields: [String] = [], fsType: String, source: String,
        superOptions: [String] = ["rw"]
    ) {
        self.mountID = mountID
        self.parentID = parentID
        self.device = device
        self.root = root
        self.mountPoint = mountPoint
        self.mountOptions = mountOptions
        self.optionalFields = optionalFields
        self.fsType = fsType
        self.source = source
        self.superOptions = superOptions
    }

    /// This mount is read-only (the mount flag; the superblock may still be writable through another mount).
    public var isReadOnlyMount: Bool { mountOptions.contains("ro") }

    /// The filesystem itself is read-only: nothing can write to it, so there is nothing to freeze.
    public var isReadOnlySuperblock: Bool { superOptions.contains("ro") }
}

/// A mountinfo line that does not have the format of proc(5).
public struct MountInfoError: Error, Sendable, Equatable, CustomStringConvertible {
    /// 1-based line number in the parsed text.
    public var line: Int
    /// What is wrong with it.
    public var message: String

    public init(line: Int, message: String) {
        self.line = line
        self.message = message
    }

    public var description: String { "mountinfo line \(line): \(message)" }
}

/// Reads and parses /proc/self/mountinfo.
public enum MountInfo {
    /// Parses the whole text of a mountinfo file. Empty lines are ignored; any other line
    /// that does not have the proc(5) format is an error naming its line number.
    public static func parse(_ text: String) throws(MountInfoError) -> [MountEntry] {
        var entries: [MountEntry] = []
        var lineNumber = 0
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            lineNumber += 1
            if line.isEmpty { continue }
            entries.append(try parseLine(line, number: lineNumber))
        }
        return entries
    }

    /// Reads `path` (a procfs file: its size is 0 in stat, so it is read until EOF) and parses it.
    /// Throws `SystemError` when it cannot be read, `MountInfoError` when it cannot be parsed.
    public static func read(path: String = "/proc/self/mountinfo") throws -> [MountEntry] {
        let bytes = try FD.readWholeFile(atPath: path)
        return try parse(String(decoding: bytes, as: UTF8.self))
    }

    private static func parseLine(_ line: Substring, number: Int) throws(MountInfoError) -> MountEntry {
        // Fields are separated by single spaces; an empty source shows as two spaces in a row,
        // so empty fields are kept.
        let fields = line.split(separator: " ", omittingEmptySubsequences: false)
        func fail(_ message: String) -> MountInfoError {
            MountInfoError(line: number, message: "\(message): \"\(line)\"")
        }
        guard fields.count >= 10 else { throw fail("expected at least 10 fields, found \(fields.count)") }
        guard let mountID = Int(fields[0]) else { throw fail("mount ID is not a number") }
        guard let parentID = Int(fields[1]) else { throw fail("parent ID is not a number") }
        guard let device = DeviceNumber(parsing: fields[2]) else { throw fail("device is not MAJOR:MINOR") }
        guard !fields[3].isEmpty else { throw fail("empty root") }
        guard !fields[4].isEmpty else { throw fail("empty mount point") }
        guard let separator = fields[6...].firstIndex(of: "-") else {
            throw fail("no \"-\" separator after the optional fields")
        }
        let tail = fields[(separator + 1)...]
        guard tail.count == 3 else {
            throw fail("expected 3 fields after \"-\", found \(tail.count)")
        }
        let fsType = unescape(tail[tail.startIndex])
        guard !fsType.isEmpty else { throw fail("empty filesystem type") }
        return MountEntry(
            mountID: mountID,
            parentID: parentID,
            device: device,
            root: unescape(fields[3]),
            mountPoint: unescape(fields[4]),
            mountOptions: options(fields[5]),
            optionalFields: fields[6..<separator].map { unescape($0) },
            fsType: fsType,
            source: unescape(tail[tail.startIndex + 1]),
            superOptions: options(tail[tail.startIndex + 2])
        )
    }

    /// Splits a comma-separated option list; the kernel escapes commas inside values as \054,
    /// so each option is unescaped after splitting.
    private static func options(_ field: Substring) -> [String] {
        field.split(separator: ",").map { unescape($0) }
    }

    /// Decodes the kernel's octal escapes ("\040" space, "\011" tab, "\012" newline,
    /// "\134" backslash, and any other "\ooo"). A backslash not followed by three
    /// octal digits is kept as it is.
    static func unescape(_ field: Substring) -> String {
        let utf8 = field.utf8
        guard utf8.contains(UInt8(ascii: "\\")) else { return String(field) }
        let bytes = Array(utf8)
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count)
        func octal(_ b: UInt8) -> UInt8? {
            b >= UInt8(ascii: "0") && b <= UInt8(ascii: "7") ? b - UInt8(ascii: "0") : nil
        }
        var i = 0
        while i < bytes.count {
            if bytes[i] == UInt8(ascii: "\\"), i + 3 < bytes.count,
               let a = octal(bytes[i + 1]), let b = octal(bytes[i + 2]), let c = octal(bytes[i + 3]),
               a <= 3 {
                out.append(a << 6 | b << 3 | c)
                i += 4
            } else {
                out.append(bytes[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}

