// Sleeping in async code without libdispatch: one timer thread that waits on a condition variable.
#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// `await AsyncSleep.until(deadline)` suspends the calling task until a CLOCK_MONOTONIC deadline,
/// or until the task is cancelled (then it returns early; check `Task.isCancelled`).
///
/// Why not `Task.sleep`: on Linux, Swift 6.3's `Task.sleep` schedules through libdispatch's
/// timers even when the global executor is replaced, and once libdispatch's worker pool exists
/// its workqueue monitor wakes the process once a second for good (measured here: an agent that
/// had slept once through `Task.sleep` then woke 1/s while idle, in an `epoll_wait` thread named
/// `-qos.overcommit`). Here one thread, started on first use, holds the pending deadlines and
/// waits on a condition variable until the earliest (`Mailbox`); with none pending it waits with
/// no timeout. A cancelled sleep is removed at once, so a timer for work that ended (the
/// deadline of a freeze already thawed) never wakes the process later.
public enum AsyncSleep {
    /// Suspends until the monotonic `deadline` in ns (`monotonicNanos()`) or cancellation;
    /// returns at once if either has already happened.
    public static func until(_ deadline: UInt64) async {
        if monotonicNanos() >= deadline || Task.isCancelled { return }
        let timer = SleepTimer.shared
        let id = timer.reserve(deadline: deadline)
        await withTaskCancellationHandler {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in timer.schedule(id, c) }
        } onCancel: {
            timer.cancel(id)
        }
    }

    /// Suspends for `nanoseconds`, or until cancellation.
    public static func nanoseconds(_ nanoseconds: UInt64) async {
        await until(monotonicNanos() &+ nanoseconds)
    }
}

private final class SleepTimer: Sendable {
    static let shared = SleepTimer()

    private struct Entry {
        var deadline: UInt64
        var continuation: CheckedContinuation<Void, Never>?
        var cancelled = false
    }
    /// Sleeps by id: reserved (no continuation yet), scheduled, or cancelled before scheduling.
    /// Fired and cancelled entries are removed, so nothing accumulates.
    private let entries = Mutex<(next: UInt64, byID: [UInt64: Entry])>((0, [:]))
    private let wake = Mailbox<Void>()

    private init() {
        Threads.detach(name: "sleep-timer") { [self] in run() }
    }

    func reserve(deadline: UInt64) -> UInt64 {
        entries.withLock { s in
            s.next += 1
            s.byID[s.next] = Entry(deadline: deadline)
            return s.next
        }
    }

    func schedule(_ id: UInt64, _ c: CheckedContinuation<Void, Never>) {
        let resumeNow = entries.withLock { s -> Bool in
            guard let e = s.byID[id], !e.cancelled else { s.byID[id] = nil; return true }
            s.byID[id]!.continuation = c
            return false
        }
        if resumeNow { c.resume() } else { wake.post(()) }
    }

    func cancel(_ id: UInt64) {
        let c = entries.withLock { s -> CheckedContinuation<Void, Never>? in
            guard let e = s.byID[id] else { return nil }  // fired already
            if let c = e.continuation { s.byID[id] = nil; return c }
            s.byID[id]!.cancelled = true  // cancelled before it was scheduled: schedule resumes it
            return nil
        }
        c?.resume()
        // The timer thread recomputes its deadline at its next wake; a removed entry only means it
        // may wake once for nothing, which is why it is told now.
        if c != nil { wake.post(()) }
    }

    private func run() {
        while true {
            let now = monotonicNanos()
            let (due, next) = entries.withLock { s -> ([CheckedContinuation<Void, Never>], UInt64?) in
                var due: [CheckedContinuation<Void, Never>] = []
                var next: UInt64?
                for (id, e) in s.byID {
                    guard let c = e.continuation else { continue }
                    if e.deadline <= now {
                        due.append(c)
                        s.byID[id] = nil
                    } else {
                        next = min(next ?? .max, e.deadline)
                    }
                }
                return (due, next)
            }
            for c in due { c.resume() }
            _ = wake.receive(deadlineNanos: next)
        }
    }
}
