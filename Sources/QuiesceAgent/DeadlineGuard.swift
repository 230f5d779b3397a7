// A last line of defence: a plain thread that thaws by itself if the state actor misses a deadline.
#if canImport(Glibc)
import Glibc
#endif
import QuiesceLinux
import Synchronization

/// Holds duplicates of the frozen filesystems' fds and a deadline. If the deadline plus a grace
/// period passes while still armed, it issues FITHAW on them itself.
///
/// The state actor thaws at the deadline in the normal course; this guard only acts if that
/// machinery is wedged (a runtime bug, a starved executor), so "never left frozen" does not
/// depend on Swift concurrency being healthy. It owns its own `dup`s: no fd of the actor is
/// ever touched, so a racing normal thaw cannot make it hit a reused descriptor.
public final class DeadlineGuard: Sendable {
    private struct Armed {
        var opID: String
        var fds: [Int32]
        var mountPoints: [String]
        var deadline: UInt64
    }
    private let state = Mutex<Armed?>(nil)
    private let graceNanos: UInt64
    private let onFire: @Sendable (String, [String]) -> Void

    /// - Parameter onFire: told which operation and what it thawed (for the log), after the fact.
    public init(graceMs: UInt64 = 5000, onFire: @escaping @Sendable (String, [String]) -> Void) {
        graceNanos = graceMs * 1_000_000
        self.onFire = onFire
        Threads.detach { [self] in run() }
    }

    /// Arms the guard for a new freeze (replacing any earlier one).
    public func arm(opID: String, held: HeldFreeze, deadline: UInt64) {
        let fds = held.entries.map { dup($0.fd) }.filter { $0 >= 0 }
        let old = state.withLock { s -> Armed? in
            defer { s = Armed(opID: opID, fds: fds, mountPoints: held.mountPoints, deadline: deadline) }
            return s
        }
        old?.fds.forEach(FD.close)
    }

    /// Moves the deadline (keepalive).
    public func extend(to deadline: UInt64) {
        state.withLock { $0?.deadline = deadline }
    }

    /// The freeze ended normally: forget it.
    public func disarm() {
        let old = state.withLock { s -> Armed? in
            defer { s = nil }
            return s
        }
        old?.fds.forEach(FD.close)
    }

    private func run() {
        while true {
            let fired = state.withLock { s -> Armed? in
                guard let armed = s, monotonicNanos() >= armed.deadline + graceNanos else { return nil }
                s = nil
                return armed
            }
            if let fired {
                for fd in fired.fds.reversed() { _ = FilesystemOps.thaw(fd) }
                fired.fds.forEach(FD.close)
                onFire(fired.opID, fired.mountPoints)
            }
            usleep(200_000)
        }
    }
}
