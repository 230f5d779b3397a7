// The few calls quiescectl's modules make beyond sockets and processes: errno names of
// connections and SIGKILL (stat, poll, the process id, sleep and the other signals live in
// FileStatus, Descriptors, Threads and Process).
#if canImport(Glibc)
import Glibc
#endif

// MARK: - Only here

extension Errno {
    public static let ECONNRESET = Errno(Glibc.ECONNRESET)
    public static let EPIPE = Errno(Glibc.EPIPE)
    public static let ENOTCONN = Errno(Glibc.ENOTCONN)
    public static let EBADF = Errno(Glibc.EBADF)
    public static let EHOSTUNREACH = Errno(Glibc.EHOSTUNREACH)
    public static let ENETUNREACH = Errno(Glibc.ENETUNREACH)
    public static let EADDRNOTAVAIL = Errno(Glibc.EADDRNOTAVAIL)
    /// File too large: also what `FD.readWholeFile` says past its `maxBytes`.
    public static let EFBIG = Errno(Glibc.EFBIG)
    /// Exec format error: an executable the kernel cannot run (a script without `#!`).
    public static let ENOEXEC = Errno(Glibc.ENOEXEC)
}

extension Signals {
    /// SIGKILL: cannot be caught; ends a COMMAND that ignored SIGTERM.
    public static let forceKill = SIGKILL
}
