// stat(2), lstat(2) and fstat(2) as a value, and the few path operations the agent needs.
#if canImport(Glibc)
import Glibc
#endif
import CQuiesceShims

/// What stat(2) says about a file: its type, permission bits, owner and identity.
///
/// Source of each field: `struct stat` (`st_mode`, `st_uid`, `st_dev`, `st_rdev`, `st_ino`).
public struct Stat: Sendable, Equatable {
    /// The file type, from `st_mode & S_IFMT`.
    public enum Kind: Sendable, Equatable {
        case regular, directory, symbolicLink, characterDevice, blockDevice, socket, fifo, unknown
    }

    public var kind: Kind
    /// The permission bits and set-id/sticky bits (`st_mode & 0o7777`).
    public var permissions: UInt32
    /// The owner's uid (`st_uid`).
    public var uid: UInt32
    /// The filesystem the file lives on (`st_dev`): for a mountpoint, its superblock's device.
    public var device: DeviceNumber
    /// The device a device node stands for (`st_rdev`); zero for other files.
    public var representedDevice: DeviceNumber
    /// The inode number (`st_ino`).
    public var inode: UInt64

    init(_ st: stat) {
        switch st.st_mode & S_IFMT {
        case S_IFREG: kind = .regular
        case S_IFDIR: kind = .directory
        case S_IFLNK: kind = .symbolicLink
        case S_IFCHR: kind = .characterDevice
        case S_IFBLK: kind = .blockDevice
        case S_IFSOCK: kind = .socket
        case S_IFIFO: kind = .fifo
        default: kind = .unknown
        }
        permissions = UInt32(st.st_mode & 0o7777)
        uid = st.st_uid
        device = DeviceNumber(UInt64(st.st_dev))
        representedDevice = DeviceNumber(UInt64(st.st_rdev))
        inode = UInt64(st.st_ino)
    }

    /// stat(2) of `path`, following symbolic links. Errors: ENOENT, EACCES, ELOOP, …
    public static func of(path: String) throws(SystemError) -> Stat {
        var st = stat()
        guard stat(path, &st) == 0 else { throw SystemError("stat", path, Errno.current) }
        return Stat(st)
    }

    /// lstat(2) of `path`: a symbolic link is described itself, not followed.
    public static func ofLink(path: String) throws(SystemError) -> Stat {
        var st = stat()
        guard lstat(path, &st) == 0 else { throw SystemError("lstat", path, Errno.current) }
        return Stat(st)
    }

    /// fstat(2) of an open descriptor.
    public static func of(fd: Int32) throws(SystemError) -> Stat {
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let e = Errno.current
            throw SystemError("fstat", "fd \(fd)", e)
        }
        return Stat(st)
    }

    /// Whether `other` is the same file as this one (same filesystem, inode and, for a device
    /// node, the same device): how a reopened path is told from a replaced one.
    public func isSameFile(as other: Stat) -> Bool {
        device == other.device && inode == other.inode && representedDevice == other.representedDevice
    }
}

/// Path operations: directories, renames, removal, existence.
public enum Paths {
    /// mkdir(2) with `mode`; an existing directory is not an error. Errors: EACCES, ENOENT, ENOTDIR, …
    public static func makeDirectory(_ path: String, mode: UInt32 = 0o700) throws(SystemError) {
        if mkdir(path, mode_t(mode)) == 0 { return }
        let e = Errno.current
        if e == .EEXIST { return }
        throw SystemError("mkdir", path, e)
    }

    /// rename(2): atomically replaces `to` with `from`.
    public static func rename(_ from: String, to: String) throws(SystemError) {
        _ = try retryingEINTR("rename", from) { Glibc.rename(from, to) }
    }

    /// unlink(2); a missing file is not an error (it is gone either way).
    public static func remove(_ path: String) {
        _ = unlink(path)
    }

    /// `path` with `.` and empty components removed and `..` applied to the components before
    /// it, without looking at the filesystem (links are not followed): "/a//b/../c/." is "/a/c".
    public static func lexicallyNormal(_ path: String) -> String {
        var parts: [Substring] = []
        for c in path.split(separator: "/", omittingEmptySubsequences: true) {
            if c == "." { continue }
            if c == ".." { if !parts.isEmpty { parts.removeLast() }; continue }
            parts.append(c)
        }
        return (path.hasPrefix("/") ? "/" : "") + parts.joined(separator: "/")
    }

    /// The directory part of `path`, as dirname(1) gives it: "/run/q/a.sock" is "/run/q", "/a" is "/".
    public static func parent(_ path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        let head = path[..<slash]
        return head.isEmpty ? "/" : String(head)
    }

    /// Whether something exists at `path` (access(2) with F_OK, symbolic links followed).
    public static func exists(_ path: String) -> Bool {
        access(path, F_OK) == 0
    }
}

/// fnmatch(3)-style glob patterns.
public enum Glob {
    /// fnmatch(3) with no flags: `*` and `?` match "/" too, a leading "." is not special, and
    /// a backslash escapes the next character.
    public static func matches(_ pattern: String, _ string: String) -> Bool {
        fnmatch(pattern, string, 0) == 0
    }

    /// Why `pattern` is malformed, or nil. fnmatch(3) takes an unclosed `[` as a literal
    /// character, matches nothing with a trailing backslash, an unknown character class or a
    /// range whose end sorts before its start (glob(7), checked against glibc); in a
    /// configuration each is a typo that silently changes which mountpoints match, so each is
    /// named: "unclosed [ at offset N", "ends with a lone backslash", "unknown character class
    /// [:NAME:]", "empty range z-a". A bracket expression may start with `!` or `^` and takes a
    /// `]` right after its opening (or after the `!`) as a member.
    public static func problem(in pattern: String) -> String? {
        let p = Array(pattern.utf8)
        var i = 0
        while i < p.count {
            switch p[i] {
            case UInt8(ascii: "\\"):
                if i + 1 == p.count { return "ends with a lone backslash" }
                i += 2
            case UInt8(ascii: "["):
                switch bracket(p, from: i) {
                case .end(let next): i = next
                case .problem(let why): return why
                }
            default:
                i += 1
            }
        }
        return nil
    }

    /// The POSIX character classes (glob(7), wctype(3) in the C locale).
    static let classes: Set<String> = ["alnum", "alpha", "blank", "cntrl", "digit", "graph", "lower", "print",
                                       "punct", "space", "upper", "xdigit"]

    private enum Bracket { case end(Int), problem(String) }

    /// Reads the bracket expression opening at `open`: where it ends, or what is wrong with it.
    private static func bracket(_ p: [UInt8], from open: Int) -> Bracket {
        var j = open + 1
        if j < p.count, p[j] == UInt8(ascii: "!") || p[j] == UInt8(ascii: "^") { j += 1 }
        var first = true
        var previous: UInt8?  // the last single member, a possible range start
        while j < p.count {
            let c = p[j]
            if c == UInt8(ascii: "]") && !first { return .end(j + 1) }
            first = false
            if c == UInt8(ascii: "["), j + 1 < p.count, [UInt8(ascii: ":"), UInt8(ascii: "="), UInt8(ascii: ".")].contains(p[j + 1]) {
                // [:class:], [=equivalence=] or [.collating.]: runs to the same mark and "]".
                let mark = p[j + 1]
                var k = j + 2
                while k + 1 < p.count, !(p[k] == mark && p[k + 1] == UInt8(ascii: "]")) { k += 1 }
                if k + 1 < p.count {
                    let name = String(decoding: p[(j + 2)..<k], as: UTF8.self)
                    if mark == UInt8(ascii: ":"), !classes.contains(name) {
                        return .problem("unknown character class [:\(name):] (one of \(classes.sorted().joined(separator: ", ")))")
                    }
                    j = k + 2
                    previous = nil
                    continue
                }
            }
            var member = c
            var width = 1
            if c == UInt8(ascii: "\\"), j + 1 < p.count { member = p[j + 1]; width = 2 }
            if c == UInt8(ascii: "-"), let start = previous, j + 1 < p.count, p[j + 1] != UInt8(ascii: "]") {
                var end = p[j + 1]
                var w = 2
                if end == UInt8(ascii: "\\"), j + 2 < p.count { end = p[j + 2]; w = 3 }
                if start < 0x80, end < 0x80, end < start {  // ASCII; others compare by collation
                    return .problem("empty range \(Character(Unicode.Scalar(start)))-\(Character(Unicode.Scalar(end))) (a range runs from low to high)")
                }
                j += w
                previous = nil
                continue
            }
            previous = member
            j += width
        }
        return .problem("unclosed [ at offset \(open) (write \\[ for a literal bracket)")
    }
}

/// The calling process: identity, environment, exit.
public enum CurrentProcess {
    /// getpid(2).
    public static var id: Int32 { getpid() }
    /// geteuid(2).
    public static var effectiveUID: UInt32 { geteuid() }
    /// The value of an environment variable, nil when unset.
    public static func environment(_ name: String) -> String? {
        getenv(name).map { String(cString: $0) }
    }
    /// unsetenv(3).
    public static func unsetEnvironment(_ name: String) { _ = unsetenv(name) }
    /// exit(3): runs atexit handlers and flushes stdio.
    public static func exit(_ code: Int32) -> Never { Glibc.exit(code) }
    /// Opens /dev/null on each of descriptors 0, 1 and 2 that is closed (`prog 2>&-`), so that
    /// no socket or file opened later takes that number and gets the log or the report written
    /// into it (a timeline line sent to an agent as a frame). Call first thing in main.
    public static func openClosedStandardDescriptors() {
        for fd: Int32 in 0...2 where fcntl(fd, F_GETFD) == -1 && errno == EBADF {
            // open(2) returns the lowest free descriptor: this one, as those below are open.
            let got = open("/dev/null", O_RDWR)
            if got >= 0 && got != fd { _ = close(got) }
        }
    }
    /// Caps glibc's malloc arenas (M_ARENA_MAX): fewer arenas, less idle RSS in a many-threaded
    /// daemon. Returns false if glibc refused.
    @discardableResult
    public static func limitMallocArenas(_ arenas: Int32) -> Bool { qs_malloc_arena_max(arenas) != 0 }
}
