// The one gate to libc: EINTR retries and errno turned into typed errors.
// glibc only (Debian, Ubuntu, the guests this agent is packaged for): the errno names below are
// glibc's. A musl port would start here, and fail to build rather than half work.
#if canImport(Glibc)
import Glibc
#else
#error("QuiesceLinux is written against glibc")
#endif

/// An errno value with its symbolic name ("EBUSY") and libc's message.
public struct Errno: Error, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: Int32
    public init(_ rawValue: Int32) { self.rawValue = rawValue }

    public static var current: Errno { Errno(errno) }

    public static let EPERM = Errno(Glibc.EPERM)
    public static let ENOENT = Errno(Glibc.ENOENT)
    public static let EINTR = Errno(Glibc.EINTR)
    public static let EBUSY = Errno(Glibc.EBUSY)
    public static let EEXIST = Errno(Glibc.EEXIST)
    public static let EROFS = Errno(Glibc.EROFS)
    public static let EIO = Errno(Glibc.EIO)
    public static let EINVAL = Errno(Glibc.EINVAL)
    public static let EAGAIN = Errno(Glibc.EAGAIN)
    public static let EACCES = Errno(Glibc.EACCES)
    public static let EOPNOTSUPP = Errno(Glibc.EOPNOTSUPP)
    public static let ENOTTY = Errno(Glibc.ENOTTY)
    public static let ETIMEDOUT = Errno(Glibc.ETIMEDOUT)
    public static let ECANCELED = Errno(Glibc.ECANCELED)
    public static let ECONNREFUSED = Errno(Glibc.ECONNREFUSED)
    public static let ENODEV = Errno(Glibc.ENODEV)

    /// The symbolic name, e.g. "EBUSY" (falls back to "errno N").
    public var name: String {
        switch rawValue {
        case Glibc.EPERM: "EPERM"
        case Glibc.ENOENT: "ENOENT"
        case Glibc.ESRCH: "ESRCH"
        case Glibc.EINTR: "EINTR"
        case Glibc.EIO: "EIO"
        case Glibc.ENXIO: "ENXIO"
        case Glibc.EBADF: "EBADF"
        case Glibc.EAGAIN: "EAGAIN"
        case Glibc.ENOMEM: "ENOMEM"
        case Glibc.EACCES: "EACCES"
        case Glibc.EFAULT: "EFAULT"
        case Glibc.EBUSY: "EBUSY"
        case Glibc.EEXIST: "EEXIST"
        case Glibc.ENODEV: "ENODEV"
        case Glibc.ENOTDIR: "ENOTDIR"
        case Glibc.EISDIR: "EISDIR"
        case Glibc.EINVAL: "EINVAL"
        case Glibc.ENOTTY: "ENOTTY"
        case Glibc.ENOSPC: "ENOSPC"
        case Glibc.EROFS: "EROFS"
        case Glibc.EPIPE: "EPIPE"
        case Glibc.ENAMETOOLONG: "ENAMETOOLONG"
        case Glibc.ENOSYS: "ENOSYS"
        case Glibc.ELOOP: "ELOOP"
        case Glibc.EOPNOTSUPP: "EOPNOTSUPP"
        case Glibc.EADDRINUSE: "EADDRINUSE"
        case Glibc.EADDRNOTAVAIL: "EADDRNOTAVAIL"
        case Glibc.ENETUNREACH: "ENETUNREACH"
        case Glibc.ECONNRESET: "ECONNRESET"
        case Glibc.ENOTCONN: "ENOTCONN"
        case Glibc.ETIMEDOUT: "ETIMEDOUT"
        case Glibc.ECONNREFUSED: "ECONNREFUSED"
        case Glibc.EHOSTUNREACH: "EHOSTUNREACH"
        case Glibc.EAFNOSUPPORT: "EAFNOSUPPORT"
        case Glibc.ENOTSOCK: "ENOTSOCK"
        case Glibc.ESTALE: "ESTALE"
        case Glibc.ENOEXEC: "ENOEXEC"
        case Glibc.E2BIG: "E2BIG"
        case Glibc.ECHILD: "ECHILD"
        case Glibc.ENFILE: "ENFILE"
        case Glibc.EMFILE: "EMFILE"
        case Glibc.ETXTBSY: "ETXTBSY"
        case Glibc.EFBIG: "EFBIG"
        case Glibc.EXDEV: "EXDEV"
        case Glibc.ENOTEMPTY: "ENOTEMPTY"
        case Glibc.ERANGE: "ERANGE"
        case Glibc.EOVERFLOW: "EOVERFLOW"
        case Glibc.EPROTO: "EPROTO"
        case Glibc.EMSGSIZE: "EMSGSIZE"
        case Glibc.ENOBUFS: "ENOBUFS"
        case Glibc.EINPROGRESS: "EINPROGRESS"
        case Glibc.EALREADY: "EALREADY"
        case Glibc.ECANCELED: "ECANCELED"
        case Glibc.ENOTBLK: "ENOTBLK"
        default: "errno \(rawValue)"
        }
    }

    /// libc's message, e.g. "Device or resource busy".
    public var message: String { String(cString: strerror(rawValue)) }

    public var description: String { "\(message) (\(name))" }
}

/// An error that says what was attempted, on what, and the errno it met:
/// "freeze /var: Device or resource busy (EBUSY)".
public struct SystemError: Error, Sendable, CustomStringConvertible {
    public let operation: String
    public let subject: String
    public let errno: Errno

    public init(_ operation: String, _ subject: String, _ errno: Errno) {
        self.operation = operation
        self.subject = subject
        self.errno = errno
    }

    public var description: String {
        subject.isEmpty ? "\(operation): \(errno)" : "\(operation) \(subject): \(errno)"
    }
}

/// Runs a libc call that returns -1 and sets errno on failure, retrying EINTR.
@inline(__always)
public func retryingEINTR<T: BinaryInteger>(
    _ operation: String, _ subject: String = "", _ call: () -> T
) throws(SystemError) -> T {
    while true {
        let rc = call()
        if rc >= 0 { return rc }
        let e = Errno.current
        if e == .EINTR { continue }
        throw SystemError(operation, subject, e)
    }
}

/// Like `retryingEINTR` but gives back the errno instead of throwing, for callers that branch on it.
@inline(__always)
public func syscallResult<T: BinaryInteger>(_ call: () -> T) -> Result<T, Errno> {
    while true {
        let rc = call()
        if rc >= 0 { return .success(rc) }
        let e = Errno.current
        if e == .EINTR { continue }
        return .failure(e)
    }
}

/// Monotonic time in nanoseconds (CLOCK_MONOTONIC).
public func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// Wall-clock time in milliseconds since the epoch (CLOCK_REALTIME).
public func wallClockMillis() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
}

/// `millis` (ms since the epoch, as `wallClockMillis()`) as "2026-11-30 12:47:38.869 UTC"
/// (gmtime_r(3)), for messages a person reads.
public func utcTimestamp(millis: Int64) -> String {
    let (q, r) = millis.quotientAndRemainder(dividingBy: 1000)  // truncates toward zero
    var seconds = time_t(r < 0 ? q - 1 : q)
    let ms = Int(r < 0 ? r + 1000 : r)
    var t = tm()
    guard gmtime_r(&seconds, &t) != nil else { return "\(millis) ms since the epoch" }
    func two(_ v: Int32) -> String { v < 10 ? "0\(v)" : "\(v)" }
    let msText = ms < 10 ? "00\(ms)" : ms < 100 ? "0\(ms)" : "\(ms)"
    return "\(t.tm_year + 1900)-\(two(t.tm_mon + 1))-\(two(t.tm_mday)) \(two(t.tm_hour)):\(two(t.tm_min)):\(two(t.tm_sec)).\(msText) UTC"
}
