// The few calls quiescectl's modules make beyond sockets and processes: errno names of
// connections, poll events, stat of a path, the process id, a blocking sleep, signal numbers.
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
}

extension Signals {
    /// SIGKILL: cannot be caught; ends a COMMAND that ignored SIGTERM.
    public static let forceKill = SIGKILL
}

// MARK: - Also on branch house-agent (issue 11, the agent's half)
// The declarations below have the same names and meaning as that branch's Stat
// (FileStatus.swift), PollEvents and FD.poll(_:for:timeoutMs:) (Descriptors.swift),
// CurrentProcess (FileStatus.swift), Threads.sleep(milliseconds:) (Threads.swift) and the
// Signals constants (Process.swift). Once both branches are merged, delete this section.

/// What stat(2) says about a file (the part the host needs: its type).
public struct Stat: Sendable, Equatable {
    /// The file type, from `st_mode & S_IFMT`.
    public enum Kind: Sendable, Equatable {
        case regular, directory, symbolicLink, characterDevice, blockDevice, socket, fifo, unknown
    }

    public var kind: Kind

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
    }

    /// stat(2) of `path`, following symbolic links. Errors: ENOENT, EACCES, ELOOP, …
    public static func of(path: String) throws(SystemError) -> Stat {
        var st = stat()
        guard stat(path, &st) == 0 else { throw SystemError("stat", path, Errno.current) }
        return Stat(st)
    }
}

/// The events poll(2) asks for and reports.
public struct PollEvents: OptionSet, Sendable {
    public let rawValue: Int16
    public init(rawValue: Int16) { self.rawValue = rawValue }

    /// POLLIN: data to read, or the end of the stream.
    public static let readable = PollEvents(rawValue: Int16(POLLIN))
    /// POLLOUT: room to write.
    public static let writable = PollEvents(rawValue: Int16(POLLOUT))
    /// POLLHUP: the peer hung up.
    public static let hangUp = PollEvents(rawValue: Int16(POLLHUP))
    /// POLLERR: an error is pending on the descriptor.
    public static let error = PollEvents(rawValue: Int16(POLLERR))
    /// POLLNVAL: the descriptor is not open.
    public static let invalid = PollEvents(rawValue: Int16(POLLNVAL))
}

extension FD {
    /// poll(2) on one descriptor: the events that happened, empty on timeout.
    public static func poll(_ fd: Int32, for events: PollEvents, timeoutMs: Int32) throws(SystemError) -> PollEvents {
        PollEvents(rawValue: try poll(fd, events: events.rawValue, timeoutMs: timeoutMs))
    }
}

/// The calling process.
public enum CurrentProcess {
    /// getpid(2).
    public static var id: Int32 { getpid() }
}

extension Threads {
    /// Blocks the calling thread for `milliseconds` (nanosleep, resumed after signals).
    public static func sleep(milliseconds: Int) {
        var request = timespec(tv_sec: milliseconds / 1000, tv_nsec: (milliseconds % 1000) * 1_000_000)
        var remaining = timespec()
        while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
    }
}

extension Signals {
    /// SIGTERM: a service manager's stop.
    public static let terminate = SIGTERM
    /// SIGINT: Ctrl-C.
    public static let interrupt = SIGINT
    /// SIGHUP.
    public static let hangUp = SIGHUP
    /// SIGPIPE: a write to a closed pipe or socket.
    public static let pipe = SIGPIPE
}
