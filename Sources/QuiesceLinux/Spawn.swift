// Child processes: spawn in their own process group, wait with a timeout, stop the whole group.
#if canImport(Glibc)
import Glibc
#endif

/// How a child process ended.
public enum ChildExit: Sendable, Equatable, CustomStringConvertible {
    case exited(Int32)
    case signaled(Int32)
    /// It outlived its timeout and was stopped (SIGTERM to its group, SIGKILL after a grace).
    case timedOut

    public var description: String {
        switch self {
        case .exited(let c): "exit status \(c)"
        case .signaled(let s): "killed by signal \(s)"
        case .timedOut: "timed out"
        }
    }
}

public enum Spawn {
    /// Starts `path` with `arguments` (argv[1...]) and `environment` ("K=V"), stdin from /dev/null,
    /// in a new process group. Returns the pid.
    public static func start(_ path: String, arguments: [String], environment: [String]) throws(SystemError) -> pid_t {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        posix_spawnattr_setpgroup(&attr, 0)
        var defaults = sigset_t()
        sigfillset(&defaults)
        posix_spawnattr_setsigdefault(&attr, &defaults)
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attr, &empty)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))
        let argv = ([path] + arguments).map { strdup($0) } + [nil]
        let envp = environment.map { strdup($0) } + [nil]
        defer {
            argv.forEach { free($0) }
            envp.forEach { free($0) }
        }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, path, &actions, &attr, argv, envp)
        guard rc == 0 else { throw SystemError("spawn", path, Errno(rc)) }
        return pid
    }

    /// Waits for `pid`; after `timeoutMs` sends SIGTERM to its process group, and SIGKILL after
    /// `graceMs` more. Blocks the calling thread: call it from a dedicated thread.
    public static func wait(_ pid: pid_t, timeoutMs: Int64?, graceMs: Int64 = 2000) -> ChildExit {
        let start = monotonicNanos()
        var status: Int32 = 0
        var terminatedAt: UInt64?
        var sleepUs: UInt32 = 1000
        while true {
            let rc = waitpid(pid, &status, WNOHANG)
            if rc == pid {
                if terminatedAt != nil { return .timedOut }
                if status & 0x7f == 0 { return .exited((status >> 8) & 0xff) }
                return .signaled(status & 0x7f)
            }
            if rc < 0 && errno != EINTR { return .exited(-1) }
            let elapsedMs = Int64((monotonicNanos() - start) / 1_000_000)
            if let timeoutMs {
                if terminatedAt == nil && elapsedMs >= timeoutMs {
                    _ = kill(-pid, SIGTERM)
                    _ = kill(pid, SIGTERM)
                    terminatedAt = monotonicNanos()
                } else if let t = terminatedAt, Int64((monotonicNanos() - t) / 1_000_000) >= graceMs {
                    _ = kill(-pid, SIGKILL)
                    _ = kill(pid, SIGKILL)
                }
            }
            usleep(sleepUs)
            sleepUs = min(sleepUs * 2, 20_000)
        }
    }
}
