// Sleeping in async code without libdispatch: one timer thread that waits on a condition variable.
#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// `await AsyncSleep.until(deadline)` suspends the calling task until a CLOCK_MONOTONIC deadline.
///
/// Why not `Task.sleep`: on Linux, Swift 6.3's `Task.sleep` schedules through libdispatch's
/// timers even when the global executor is replaced, and once libdispatch's worker pool exists
/// its workqueue monitor wakes the process once a second for good (measured here: an agent that
/// had slept once through `Task.sleep` then woke 1/s while idle, in an `epoll_wait` thread named
/// `-qos.overcommit`). Here one thread, started on first use, holds the pending deadlines and
/// waits on a condition variable until the earliest (`Mailbox`); with none pending it waits with
/// no timeout. Not cancellable: a cancelled task still sleeps until its deadline.
public enum AsyncSleep {
    /// Suspends until the monotonic `deadline` in ns (`monotonicNanos()`); returns at once if passed.
    public static func until(_ deadline: UInt64) async {
        if monotonicNanos() >= deadline { return }
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            SleepTimer.shared.schedule(deadline: deadline, c)
        }
    }

    /// Suspends for `nanoseconds`.
    public static func nanoseconds(_ nanoseconds: UInt64) async {
        await until(monotonicNanos() &+ nanoseconds)
    }
}

private final class SleepTimer: Sendable {
    static let shared = SleepTimer()
    private struct Entry: Sendable {
        var deadline: UInt64
        var continuation: CheckedContinuation<Void, Never>
    }
    private let inbox = Mailbox<Entry>()

    private init() {
        Threads.detach { [inbox] in
            var pending: [Entry] = []  // sorted by deadline, earliest first
            while true {
                if let e = inbox.receive(deadlineNanos: pending.first?.deadline) {
                    let at = pending.firstIndex { $0.deadline > e.deadline } ?? pending.count
                    pending.insert(e, at: at)
                }
                let now = monotonicNanos()
                while let first = pending.first, first.deadline <= now {
                    pending.removeFirst().continuation.resume()
                }
            }
        }
    }

    func schedule(deadline: UInt64, _ c: CheckedContinuation<Void, Never>) {
        inbox.post(Entry(deadline: deadline, continuation: c))
    }
}
