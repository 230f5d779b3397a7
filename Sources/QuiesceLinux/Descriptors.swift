// Typed flags and the remaining descriptor operations (open flags, poll events, reads that
// report EAGAIN, dup), so that callers outside this module never touch libc constants.
#if canImport(Glibc)
import Glibc
#endif

/// open(2) flags. O_CLOEXEC is always added by `FD.open`.
public struct OpenFlags: OptionSet, Sendable {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }

    public static let readOnly = OpenFlags(rawValue: O_RDONLY)
    public static let writeOnly = OpenFlags(rawValue: O_WRONLY)
    public static let readWrite = OpenFlags(rawValue: O_RDWR)
    public static let create = OpenFlags(rawValue: O_CREAT)
    public static let truncate = OpenFlags(rawValue: O_TRUNC)
    public static let nonBlocking = OpenFlags(rawValue: O_NONBLOCK)
    public static let noControllingTerminal = OpenFlags(rawValue: O_NOCTTY)
    public static let noFollow = OpenFlags(rawValue: O_NOFOLLOW)
    public static let directory = OpenFlags(rawValue: O_DIRECTORY)
}

/// poll(2) events and results.
public struct PollEvents: OptionSet, Sendable {
    public let rawValue: Int16
    public init(rawValue: Int16) { self.rawValue = rawValue }

    /// POLLIN: there is data to read (or, on a virtio-serial port with no host, EOF).
    public static let readable = PollEvents(rawValue: Int16(POLLIN))
    /// POLLOUT: a write would not block.
    public static let writable = PollEvents(rawValue: Int16(POLLOUT))
    /// POLLHUP: the peer hung up (a virtio-serial port: no host connected now).
    public static let hangUp = PollEvents(rawValue: Int16(POLLHUP))
    /// POLLERR.
    public static let error = PollEvents(rawValue: Int16(POLLERR))
    /// POLLNVAL: the descriptor is not open.
    public static let invalid = PollEvents(rawValue: Int16(POLLNVAL))
}

extension FD {
    /// Opens a path with typed flags (O_CLOEXEC added), retrying EINTR; `mode` for `.create`.
    public static func open(_ path: String, _ flags: OpenFlags, mode: UInt32 = 0) throws(SystemError) -> Int32 {
        try open(path, flags.rawValue, mode_t(mode))
    }

    /// Opens `path` only if it is a character device (see `openCharacterDevice(_:_:)`).
    public static func openCharacterDevice(_ path: String, _ flags: OpenFlags) throws(SystemError) -> Int32 {
        try openCharacterDevice(path, flags.rawValue)
    }

    /// Waits until `events` are ready or `timeoutMs` passes (-1: forever). Returns what is ready
    /// (empty on timeout); EINTR restarts the wait with the time left.
    public static func poll(_ fd: Int32, for events: PollEvents, timeoutMs: Int32) throws(SystemError) -> PollEvents {
        PollEvents(rawValue: try poll(fd, events: events.rawValue, timeoutMs: timeoutMs))
    }

    /// Waits on several descriptors at once (a negative fd is ignored, as poll(2) does) until one
    /// is ready or `timeoutMs` passes (-1: forever). Returns each one's ready events, all empty on
    /// timeout. EINTR returns all empty too: the caller loops anyway. Other errors (ENOMEM,
    /// EINVAL) are thrown.
    public static func poll(_ fds: [(fd: Int32, events: PollEvents)], timeoutMs: Int32) throws(SystemError) -> [PollEvents] {
        var p = fds.map { pollfd(fd: $0.fd, events: $0.events.rawValue, revents: 0) }
        let rc = Glibc.poll(&p, nfds_t(p.count), timeoutMs)
        if rc < 0 {
            let e = Errno.current
            if e != .EINTR { throw SystemError("poll", "\(fds.count) descriptors", e) }
        }
        if rc <= 0 { return Array(repeating: [], count: fds.count) }
        return p.map { PollEvents(rawValue: $0.revents) }
    }

    /// One read(2) of at most `buffer.count` bytes, EINTR retried: the byte count (0 at end of
    /// file) or the errno (EAGAIN on a non-blocking descriptor with nothing to read). errno is
    /// read before anything else runs.
    public static func readSome(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer) -> Result<Int, Errno> {
        syscallResult { Glibc.read(fd, buffer.baseAddress, buffer.count) }
    }

    /// `readSome` into the start of `buffer`.
    public static func readSome(_ fd: Int32, into buffer: inout [UInt8]) -> Result<Int, Errno> {
        buffer.withUnsafeMutableBytes { readSome(fd, into: $0) }
    }

    /// Appends what is queued on a non-blocking fd to `held` until it would block (or ends),
    /// keeping at most `limit` bytes (the newest); returns how many bytes were read.
    public static func readAvailable(_ fd: Int32, into held: inout [UInt8], limit: Int) -> Int {
        var total = 0
        var scratch = [UInt8](repeating: 0, count: 4096)
        while case .success(let n) = readSome(fd, into: &scratch), n > 0 {
            total += n
            held += scratch[0..<n]
        }
        if held.count > limit { held.removeFirst(held.count - limit) }
        return total
    }

    /// One write(2) attempt of a whole line, for a log sink that must never block or retry
    /// (standard error). Short writes and errors are dropped.
    public static func writeOnce(_ fd: Int32, _ bytes: [UInt8]) {
        _ = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
    }

    /// A close-on-exec duplicate of `fd` (fcntl F_DUPFD_CLOEXEC), or nil (EMFILE, EBADF).
    public static func duplicate(_ fd: Int32) -> Int32? {
        let copy = fcntl(fd, F_DUPFD_CLOEXEC, 0)
        return copy >= 0 ? copy : nil
    }

    /// Sets FD_CLOEXEC on an inherited descriptor (socket activation's), so children do not get it.
    public static func setCloseOnExec(_ fd: Int32) {
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
    }

    /// The standard error descriptor.
    public static let standardError: Int32 = 2
}

extension Socket {
    /// Shuts down our sending side (SHUT_WR): the peer reads EOF after what was sent.
    public static func shutdownWrite(_ fd: Int32) {
        _ = Glibc.shutdown(fd, Int32(SHUT_WR))
    }

    /// Shuts down our receiving side (SHUT_RD): a read blocked on it returns 0 (end of
    /// stream), while what we still have to send can be written.
    public static func shutdownRead(_ fd: Int32) {
        _ = Glibc.shutdown(fd, Int32(SHUT_RD))
    }

    /// Sends one datagram on a fresh AF_UNIX socket to `path` (a leading `@` names an abstract
    /// address): how systemd's notify and journal sockets are spoken to. False when it could not
    /// be sent whole (no such socket, a path too long, ENOBUFS…).
    public static func sendDatagram(_ bytes: [UInt8], toUnixPath path: String) -> Bool {
        var name = Array(path.utf8)
        if name.first == UInt8(ascii: "@") { name[0] = 0 }
        var addr = sockaddr_un()
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard !name.isEmpty, name.count < capacity else { return false }
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in p.copyBytes(from: name) }
        // Abstract names are exactly their bytes; a path also counts its terminating NUL.
        let length = socklen_t(MemoryLayout<sockaddr_un>.offset(of: \.sun_path)! + name.count + (name[0] == 0 ? 0 : 1))
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { Glibc.close(fd) }
        let sent = bytes.withUnsafeBytes { b in
            withUnsafePointer(to: &addr) { a in
                a.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(fd, b.baseAddress, b.count, Int32(MSG_NOSIGNAL), $0, length) }
            }
        }
        return sent == bytes.count
    }
}
