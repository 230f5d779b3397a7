// A small bounded set of threads for blocking work that is not the point of parallelism:
// planning, hooks' waits, syncfs on request.
import Synchronization

/// Runs blocking jobs on at most `maxThreads` threads of its own, in the order they were
/// submitted; jobs beyond that wait in a queue. Threads start when work comes and end as soon as
/// the queue is empty, so an idle pool has no thread and costs no wakeup.
///
/// A job must not wait for another job of the same pool (with every thread waiting, nothing
/// would run). Freeze waves do not use a pool: their FIFREEZE calls run in parallel on purpose.
public final class BlockingPool: Sendable {
    /// The threads' name prefix (at most 15 bytes with the thread number), e.g. "plan".
    public let name: String
    public let maxThreads: Int

    private struct State {
        var queue: [@Sendable () -> Void] = []
        var head = 0
        var threads = 0
        var started = 0
    }
    private let state = Mutex(State())

    public init(name: String, maxThreads: Int) {
        precondition(maxThreads > 0, "a pool needs at least one thread")
        self.name = name
        self.maxThreads = maxThreads
    }

    /// Threads running now (for tests and `status`-style diagnostics).
    public var threadCount: Int { state.withLock { $0.threads } }

    /// Queues `job`; starts a thread for it when fewer than `maxThreads` run.
    public func submit(_ job: @escaping @Sendable () -> Void) {
        let number = state.withLock { s -> Int? in
            s.queue.append(job)
            guard s.threads < maxThreads else { return nil }
            s.threads += 1
            s.started += 1
            return s.started
        }
        if let number {
            Threads.detach(name: "\(name)-\(number)") { [self] in work() }
        }
    }

    private func work() {
        while let job = next() { job() }
    }

    /// The next job, or nil after this thread has counted itself out (the queue was empty).
    private func next() -> (@Sendable () -> Void)? {
        state.withLock { s in
            guard s.head < s.queue.count else {
                s.threads -= 1
                s.queue.removeAll(keepingCapacity: false)
                s.head = 0
                return nil
            }
            let job = s.queue[s.head]
            s.head += 1
            if s.head > 64 && s.head * 2 > s.queue.count {
                s.queue.removeFirst(s.head)
                s.head = 0
            }
            return job
        }
    }

    /// Runs blocking `body` on the pool and resumes the caller with its result.
    public func run<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
        await withCheckedContinuation { (c: CheckedContinuation<T, Never>) in
            submit { c.resume(returning: body()) }
        }
    }

    /// Runs blocking `body` on the pool and resumes the caller with its result, or with nil at
    /// `deadline` (monotonic ns) if it has not returned by then. A job still queued at the
    /// deadline never runs; one already running runs on, and its result is dropped.
    public func run<T: Sendable>(until deadline: UInt64, _ body: @escaping @Sendable () -> T) async -> T? {
        let once = OnceResumer<T>()
        let timer = Task {
            await AsyncSleep.until(deadline)
            if !Task.isCancelled { once.give(nil) }
        }
        let result = await withCheckedContinuation { (c: CheckedContinuation<T?, Never>) in
            once.set(c)
            submit {
                guard once.claim() else { return }  // the caller gave up while this was queued
                once.give(body())
            }
        }
        timer.cancel()
        return result
    }
}

/// A continuation that is resumed exactly once, by whichever comes first: the job's result or
/// the deadline; also tells a queued job whether it is still wanted.
private final class OnceResumer<T: Sendable>: Sendable {
    private struct State {
        var continuation: CheckedContinuation<T?, Never>?
        var early: T??  // given before the continuation was set
        var done = false
    }
    private let state = Mutex(State())

    func set(_ c: CheckedContinuation<T?, Never>) {
        let now = state.withLock { s -> T?? in
            if let early = s.early { return early }
            s.continuation = c
            return nil
        }
        if let now { c.resume(returning: now) }
    }

    /// True when nobody has given a result yet (the job may start).
    func claim() -> Bool { state.withLock { !$0.done } }

    func give(_ value: T?) {
        let c = state.withLock { s -> CheckedContinuation<T?, Never>? in
            guard !s.done else { return nil }
            s.done = true
            guard let c = s.continuation else { s.early = .some(value); return nil }
            s.continuation = nil
            return c
        }
        c?.resume(returning: value)
    }
}
