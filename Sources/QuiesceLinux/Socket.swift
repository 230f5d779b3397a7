// File descriptors and sockets (Unix, vsock): the blocking primitives both executables build on.
#if canImport(Glibc)
import Glibc
#endif
import CQuiesceShims
import Synchronization

/// Who is on the other end of a connection.
public enum Peer: Sendable, Equatable, CustomStringConvertible {
    case unix(pid: Int32, uid: UInt32, gid: UInt32)
    case vsock(cid: UInt32, port: UInt32)
    case serial(path: String)
    /// The kernel's Hyper-V VSS driver, on its character device (`/dev/vmbus/hv_vss`).
    case hvVSS(path: String)
    case unknown

    public var description: String {
        switch self {
        case .unix(let pid, let uid, _): "unix uid=\(uid) pid=\(pid)"
        case .vsock(let cid, let port): "vsock cid=\(cid) port=\(port)"
        case .serial(let path): "serial \(path)"
        case .hvVSS(let path): "hv-vss \(path)"
        case .unknown: "unknown peer"
        }
    }
}

/// Thin, explicit operations on a raw file descriptor. Ownership is the caller's: nothing closes
/// implicitly, so a descriptor can move between threads without surprises.
public enum FD {
    public static func close(_ fd: Int32) {
        // close() must not be retried on EINTR on Linux: the fd is gone either way.
        _ = Glibc.close(fd)
    }

    /// Reads up to `count` bytes. Returns 0 at end of file.
    public static func read(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer) throws(SystemError) -> Int {
        try retryingEINTR("read", "fd \(fd)") { Glibc.read(fd, buffer.baseAddress, buffer.count) }
    }

    /// Writes every byte, waiting for writability on a non-blocking descriptor.
    /// `timeoutMs` bounds each wait for a peer that stopped reading (nil waits forever).
    /// `hangupGraceMs`: how long a hang-up (POLLHUP) is retried before it counts as the peer
    /// gone (EPIPE). A virtio-serial port learns that the host connected through a control
    /// message that can arrive after the host's first bytes (drivers/char/virtio_console.c
    /// sets host_connected on VIRTIO_CONSOLE_PORT_OPEN), so an answer written at once may meet
    /// the previous hang-up for a moment.
    public static func writeAll(_ fd: Int32, _ bytes: [UInt8], timeoutMs: Int32? = nil, hangupGraceMs: Int32 = 0) throws(SystemError) {
        var offset = 0
        var hangupSince: UInt64?
        while offset < bytes.count {
            let r = bytes.withUnsafeBytes { buf in
                syscallResult { Glibc.write(fd, buf.baseAddress! + offset, buf.count - offset) }
            }
            switch r {
            case .success(let n):
                offset += n
                hangupSince = nil
            case .failure(let e) where e == .EAGAIN:
                let ready = try poll(fd, events: Int16(POLLOUT), timeoutMs: timeoutMs ?? -1)
                if ready == 0 { throw SystemError("write", "fd \(fd)", .ETIMEDOUT) }
                // A virtio-serial port whose host left polls POLLHUP (never POLLOUT) and its
                // writes fail with EAGAIN: the peer is gone, not slow (after the grace).
                if ready & Int16(POLLOUT) == 0 && ready & Int16(POLLHUP | POLLERR | POLLNVAL) != 0 {
                    let now = monotonicNanos()
                    let since = hangupSince ?? now
                    hangupSince = since
                    guard ready & Int16(POLLNVAL) == 0, now - since < UInt64(max(0, hangupGraceMs)) * 1_000_000 else {
                        throw SystemError("write", "fd \(fd)", Errno(Glibc.EPIPE))
                    }
                    usleep(5_000)  // bounded by the grace; only while the port says hung up
                }
            case .failure(let e): throw SystemError("write", "fd \(fd)", e)
            }
        }
    }

    /// Waits until `events` are ready or `timeoutMs` passes (-1: forever). Returns revents (0 on timeout).
    /// The raw form inside this module; callers use `poll(_:for:timeoutMs:)` with `PollEvents`.
    static func poll(_ fd: Int32, events: Int16, timeoutMs: Int32) throws(SystemError) -> Int16 {
        var p = pollfd(fd: fd, events: events, revents: 0)
        let deadline = timeoutMs < 0 ? nil : monotonicNanos() + UInt64(timeoutMs) * 1_000_000
        while true {
            var wait = timeoutMs
            if let deadline {
                let now = monotonicNanos()
                wait = now >= deadline ? 0 : Int32((deadline - now + 999_999) / 1_000_000)
            }
            let rc = Glibc.poll(&p, 1, wait)
            if rc > 0 { return p.revents }
            if rc == 0 { return 0 }
            let e = Errno.current  // before the message's string is built
            if e != .EINTR { throw SystemError("poll", "fd \(fd)", e) }
        }
    }

    public static func setNonBlocking(_ fd: Int32, _ on: Bool) {
        let flags = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK)
    }

    /// The names in a directory, "." and ".." left out; nil when it cannot be opened.
    public static func directoryEntries(atPath path: String) -> [String]? {
        guard let dir = opendir(path) else { return nil }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    /// Reads a whole file with open/read until EOF (procfs and sysfs files report size 0).
    /// More than `maxBytes` is an error (EFBIG), so a wrong path cannot make us read forever.
    public static func readWholeFile(atPath path: String, maxBytes: Int = 16 << 20) throws(SystemError) -> [UInt8] {
        let fd = try open(path, O_RDONLY)
        defer { close(fd) }
        var result: [UInt8] = []
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 1)
        defer { buffer.deallocate() }
        while true {
            let n = try retryingEINTR("read", path) { Glibc.read(fd, buffer.baseAddress, buffer.count) }
            if n == 0 { return result }
            result.append(contentsOf: buffer[0..<n])
            if result.count > maxBytes { throw SystemError("read", path, Errno(Glibc.EFBIG)) }
        }
    }

    /// Opens a path, retrying EINTR. The raw form inside this module; callers pass `OpenFlags`.
    static func open(_ path: String, _ flags: Int32, _ mode: mode_t = 0) throws(SystemError) -> Int32 {
        try retryingEINTR("open", path) { Glibc.open(path, flags | O_CLOEXEC, mode) }
    }

    /// Opens `path` only if it is a character device (a virtio-serial port, a pty, the Hyper-V
    /// VSS device): checked with stat(2) before the open, so nothing else (a disk image, a block
    /// device named by a typo) is ever opened for writing, and with fstat(2) after it.
    /// Throws ENOTTY with "not a character device" for anything else.
    static func openCharacterDevice(_ path: String, _ flags: Int32) throws(SystemError) -> Int32 {
        func isCharacterDevice(_ st: stat) -> Bool { (st.st_mode & S_IFMT) == S_IFCHR }
        var st = stat()
        guard stat(path, &st) == 0 else { throw SystemError("stat", path, Errno.current) }
        guard isCharacterDevice(st) else { throw SystemError("open", "\(path) (not a character device)", Errno(ENOTTY)) }
        let fd = try open(path, flags)
        guard fstat(fd, &st) == 0, isCharacterDevice(st) else {
            close(fd)
            throw SystemError("open", "\(path) (not a character device)", Errno(ENOTTY))
        }
        return fd
    }
}

/// Stream sockets: listen, accept and connect for Unix and vsock addresses.
public enum Socket {
    public static let unixPathMax = 107

    /// Listens on a Unix socket path with the given permission bits. A stale socket file left by
    /// an earlier run is replaced; a live one (something accepts connections on it) or any other
    /// kind of file at the path is an error.
    public static func listenUnix(path: String, mode: mode_t = 0o600, backlog: Int32 = 16) throws(SystemError) -> Int32 {
        var st = stat()
        if lstat(path, &st) == 0 {
            guard (st.st_mode & S_IFMT) == S_IFSOCK else {
                throw SystemError("listen", "\(path) (exists and is not a socket)", .EEXIST)
            }
            // Replace a stale socket, never a live one: taking over the path of a process that
            // still listens would cut its clients off from it. Only "connection refused" (or the
            // file vanishing meanwhile) proves the file stale.
            let live: Bool
            do {
                FD.close(try connectUnix(path: path, timeoutMs: 500))
                live = true
            } catch {
                live = error.errno != Errno(ECONNREFUSED) && error.errno != .ENOENT
            }
            if live { throw SystemError("listen", "\(path) (another process is listening on it)", Errno(EADDRINUSE)) }
            _ = unlink(path)
        }
        let fd = try retryingEINTR("socket", "unix") { Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        do throws(SystemError) {
            var addr = sockaddr_un()
            let len = path.withCString { qs_sockaddr_un_make(&addr, $0, strlen($0)) }
            guard len > 0 else { throw SystemError("listen", "\(path) (path too long)", .EINVAL) }
            // Create with the right mode from the start (no window in which others may
            // connect): bind under a umask that leaves only `mode`.
            let bound = withThreadUmask(~mode & 0o777) { [addr] in
                var a = addr
                return withUnsafePointer(to: &a) { p in
                    p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sp in
                        Result { () throws(SystemError) -> Int32 in try retryingEINTR("bind", path) { Glibc.bind(fd, sp, len) } }
                    }
                }
            }
            _ = try bound.get()
            _ = chmod(path, mode)
            _ = try retryingEINTR("listen", path) { Glibc.listen(fd, backlog) }
            return fd
        } catch {
            FD.close(fd)
            throw error
        }
    }

    /// Runs `body` under the umask `mask` without changing the umask the process's other
    /// threads create files with: the umask belongs to the filesystem context that threads
    /// share (CLONE_FS), so `body` runs on a thread of its own that unshares it first
    /// (unshare(2)); setting it for the whole process would narrow the mode of files other
    /// threads create meanwhile (a hook copied by a test lost its x bit). Where unshare is
    /// refused (a seccomp filter), or no thread can be made, the umask is set for the process
    /// around `body`, as before.
    static func withThreadUmask<T: Sendable>(_ mask: mode_t, _ body: @escaping @Sendable () -> T) -> T {
        let out = Mutex<T?>(nil)
        if let t = Threads.trySpawn(name: "umask", {
            guard qs_unshare_fs() == 0 else { return }
            umask(mask)
            let r = body()
            out.withLock { $0 = r }
        }) {
            Threads.join(t)
            if let r = out.withLock({ $0 }) { return r }
        }
        let old = umask(mask)
        defer { umask(old) }
        return body()
    }

    /// Listens on vsock `cid:port` (cid VMADDR_CID_ANY for any).
    public static func listenVsock(cid: UInt32 = QS_VMADDR_CID_ANY, port: UInt32, backlog: Int32 = 16) throws(SystemError) -> Int32 {
        let subject = "vsock \(cid == QS_VMADDR_CID_ANY ? "any" : String(cid)):\(port)"
        let fd = try retryingEINTR("socket", subject) { Glibc.socket(QS_AF_VSOCK, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        do throws(SystemError) {
            var addr = sockaddr_vm()
            let len = qs_sockaddr_vm_make(&addr, cid, port)
            _ = try withUnsafePointer(to: &addr) { (p) throws(SystemError) -> Int32 in
                try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { (sp) throws(SystemError) -> Int32 in
                    try retryingEINTR("bind", subject) { Glibc.bind(fd, sp, len) }
                }
            }
            _ = try retryingEINTR("listen", subject) { Glibc.listen(fd, backlog) }
            return fd
        } catch {
            FD.close(fd)
            throw error
        }
    }

    /// Accepts one connection (blocking) and says who the peer is.
    public static func accept(_ listener: Int32) throws(SystemError) -> (fd: Int32, peer: Peer) {
        let fd = try retryingEINTR("accept", "fd \(listener)") { qs_accept_cloexec(listener) }
        return (fd, peer(of: fd))
    }

    /// The peer of a connected socket: Unix credentials (SO_PEERCRED) or the vsock CID and port.
    public static func peer(of fd: Int32) -> Peer {
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &storage) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        guard rc == 0 else { return .unknown }
        switch Int32(storage.ss_family) {
        case AF_UNIX:
            var pid: pid_t = 0, uid: uid_t = 0, gid: gid_t = 0
            guard qs_peercred(fd, &pid, &uid, &gid) == 0 else { return .unknown }
            return .unix(pid: pid, uid: uid, gid: gid)
        case QS_AF_VSOCK:
            var addr = sockaddr_vm()
            var alen = socklen_t(MemoryLayout<sockaddr_vm>.size)
            let prc = withUnsafeMutablePointer(to: &addr) { p in
                p.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &alen) }
            }
            guard prc == 0 else { return .unknown }
            return .vsock(cid: addr.svm_cid, port: addr.svm_port)
        default:
            return .unknown
        }
    }

    /// Connects to a Unix socket, giving up after `timeoutMs`, or with ECANCELED as soon as
    /// `interrupted` says so while the listener's backlog is full.
    public static func connectUnix(path: String, timeoutMs: Int32, interrupted: () -> Bool = { false }) throws(SystemError) -> Int32 {
        var addr = sockaddr_un()
        let len = path.withCString { qs_sockaddr_un_make(&addr, $0, strlen($0)) }
        guard len > 0 else { throw SystemError("connect", "unix \(path) (path too long)", .EINVAL) }
        return try connect(family: AF_UNIX, subject: "unix \(path)", timeoutMs: timeoutMs, interrupted: interrupted) { fd in
            withUnsafePointer(to: &addr) { p in
                p.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, len) }
            }
        }
    }

    /// Connects to vsock `cid:port`, giving up after `timeoutMs`.
    public static func connectVsock(cid: UInt32, port: UInt32, timeoutMs: Int32) throws(SystemError) -> Int32 {
        var addr = sockaddr_vm()
        let len = qs_sockaddr_vm_make(&addr, cid, port)
        return try connect(family: QS_AF_VSOCK, subject: "vsock \(cid):\(port)", timeoutMs: timeoutMs) { fd in
            withUnsafePointer(to: &addr) { p in
                p.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, len) }
            }
        }
    }

    private static func connect(family: Int32, subject: String, timeoutMs: Int32, interrupted: () -> Bool = { false },
                                _ call: (Int32) -> Int32) throws(SystemError) -> Int32 {
        let fd = try retryingEINTR("socket", subject) {
            Glibc.socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        }
        do throws(SystemError) {
            // A Unix listener whose backlog is full (qemu-ga listens with a backlog of 1 and
            // serves one client at a time) answers EAGAIN, and the socket stays unconnected:
            // retry until the listener takes us or the timeout passes.
            let deadline = monotonicNanos() + UInt64(max(timeoutMs, 0)) * 1_000_000
            var rc = call(fd)
            while rc != 0 && family == AF_UNIX && Errno.current == .EAGAIN {
                guard monotonicNanos() < deadline else { throw SystemError("connect", subject + " (backlog full)", .ETIMEDOUT) }
                if interrupted() { throw SystemError("connect", subject + " (backlog full)", .ECANCELED) }
                usleep(10_000)
                rc = call(fd)
            }
            if rc != 0 {
                let e = Errno.current
                guard e == Errno(EINPROGRESS) || e == .EAGAIN || e == .EINTR else { throw SystemError("connect", subject, e) }
                let ready = try FD.poll(fd, events: Int16(POLLOUT), timeoutMs: timeoutMs)
                if ready == 0 { throw SystemError("connect", subject, .ETIMEDOUT) }
                var err: Int32 = 0
                var len = socklen_t(MemoryLayout<Int32>.size)
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len)
                if err != 0 { throw SystemError("connect", subject, Errno(err)) }
            }
            FD.setNonBlocking(fd, false)
            return fd
        } catch {
            FD.close(fd)
            throw error
        }
    }

    /// Bounds how long a blocking write may wait for a peer that stopped reading.
    public static func setSendTimeout(_ fd: Int32, milliseconds: Int) {
        var tv = timeval(tv_sec: milliseconds / 1000, tv_usec: (milliseconds % 1000) * 1000)
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Shuts down both directions, waking any thread blocked reading the socket.
    public static func shutdown(_ fd: Int32) {
        _ = Glibc.shutdown(fd, Int32(SHUT_RDWR))
    }

    /// This machine's vsock CID, or nil without /dev/vsock.
    public static func localVsockCID() -> UInt32? {
        guard let fd = try? FD.open("/dev/vsock", O_RDONLY) else { return nil }
        defer { FD.close(fd) }
        var cid: UInt32 = 0
        return qs_vsock_local_cid(fd, &cid) == 0 ? cid : nil
    }
}

extension Socket {
    /// Sends every byte on a connected socket without raising SIGPIPE when the peer has gone
    /// (MSG_NOSIGNAL: the error is EPIPE instead). `timeoutMs` bounds each wait for buffer space.
    public static func sendAll(_ fd: Int32, _ bytes: [UInt8], timeoutMs: Int32) throws(SystemError) {
        var offset = 0
        while offset < bytes.count {
            let r = bytes.withUnsafeBytes { buf in
                syscallResult { Glibc.send(fd, buf.baseAddress! + offset, buf.count - offset, Int32(MSG_NOSIGNAL)) }
            }
            switch r {
            case .success(let n): offset += n
            case .failure(let e) where e == .EAGAIN:
                let ready = try FD.poll(fd, events: Int16(POLLOUT), timeoutMs: timeoutMs)
                if ready == 0 { throw SystemError("send", "fd \(fd)", .ETIMEDOUT) }
            case .failure(let e): throw SystemError("send", "fd \(fd)", e)
            }
        }
    }
}
