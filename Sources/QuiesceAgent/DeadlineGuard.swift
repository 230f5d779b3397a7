// A last line of defence: a plain thread that thaws by itself if the state actor misses a deadline.
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
    /// Tells the guard thread that the armed state changed. The thread waits on it (a condition
    /// variable on CLOCK_MONOTONIC) until the armed deadline plus grace, and without any timeout
    /// while disarmed: an idle agent costs no wakeup here.
    private let changed = Mailbox<Void>()
    private let graceNanos: UInt64
    private let onFire: @Sendable (String, [String]) -> Void
    private let kernel: any FilesystemKernel

    /// - Parameters:
    ///   - kernel: where its duplicates, FITHAW and close go (the real kernel but in tests).
    ///   - onFire: told which operation and what it thawed (for the log), after the fact.
    public init(graceMs: UInt64 = 5000, kernel: any FilesystemKernel = LinuxFilesystemKernel(),
                onFire: @escaping @Sendable (String, [String]) -> Void) {
        graceNanos = graceMs * 1_000_000
        self.kernel = kernel
        self.onFire = onFire
        Threads.detach(name: "deadline-guard") { [self] in run() }
    }

    /// Arms the guard for a new freeze (replacing any earlier one).
    public func arm(opID: String, held: HeldFreeze, deadline: UInt64) {
        let fds = held.entries.compactMap { kernel.duplicate($0.fd) }
        let old = state.withLock { s -> Armed? in
            defer { s = Armed(opID: opID, fds: fds, mountPoints: held.mountPoints, deadline: deadline) }
            return s
        }
        old?.fds.forEach(kernel.close)
        changed.post(())
    }

    /// Moves the deadline (keepalive).
    public func extend(to deadline: UInt64) {
        state.withLock { $0?.deadline = deadline }
        changed.post(())
    }

    /// The freeze ended normally: forget it.
    public func disarm() {
        let old = state.withLock { s -> Armed? in
            defer { s = nil }
            return s
        }
        old?.fds.forEach(kernel.close)
        changed.post(())
    }

    /// Sleeps until the armed deadline plus grace (or until arm/extend/disarm says the state
    /// changed), never periodically. A change posted between reading the state and waiting is
    /// queued in the mailbox, so the wait returns at once and the state is read again.
    private func run() {
        while true {
            let now = monotonicNanos()
            let next = state.withLock { s -> (fire: Armed?, wakeAt: UInt64?) in
                guard let armed = s else { return (nil, nil) }
                let due = armed.deadline &+ graceNanos
                guard now >= due else { return (nil, due) }
                s = nil
                return (armed, nil)
            }
            if let fired = next.fire {
                for fd in fired.fds.reversed() { _ = kernel.thaw(fd) }
                fired.fds.forEach(kernel.close)
                onFire(fired.opID, fired.mountPoints)
                continue
            }
            _ = changed.receive(deadlineNanos: next.wakeAt)
        }
    }
}
