// Dedicated OS threads for blocking work (ioctls, syncfs, blocking reads), kept off Swift's cooperative pool.
#if canImport(Glibc)
import Glibc
#endif
import CQuiesceShims
import Synchronization

private final class ThreadBody: @unchecked Sendable {
    let body: () -> Void
    init(_ body: @escaping () -> Void) { self.body = body }
}

public enum Threads {
    /// Starts a detached thread running `body`. The stack is small: these threads do syscalls.
    /// `name` (at most 15 bytes, longer ones are cut) is what `ps -L`, `top -H` and
    /// `/proc/PID/task/TID/comm` show for it.
    public static func detach(name: String? = nil, _ body: @escaping @Sendable () -> Void) {
        let t = spawn(name: name, body)
        pthread_detach(t)
    }

    /// Names the calling thread (pthread_setname_np; the kernel keeps 15 bytes).
    public static func setCurrentName(_ name: String) {
        // Cut at 15 bytes, never inside a character's UTF-8 sequence.
        var bytes: [UInt8] = []
        for scalar in name.unicodeScalars {
            let utf8 = Array(String(scalar).utf8)
            if bytes.count + utf8.count > 15 { break }
            bytes += utf8
        }
        bytes.append(0)
        _ = bytes.withUnsafeBufferPointer { p in
            p.withMemoryRebound(to: CChar.self) { qs_set_thread_name($0.baseAddress!) }
        }
    }

    /// Blocks the calling thread for `milliseconds` (nanosleep, resumed after signals).
    public static func sleep(milliseconds: Int) {
        var request = timespec(tv_sec: milliseconds / 1000, tv_nsec: (milliseconds % 1000) * 1_000_000)
        var remaining = timespec()
        while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
    }

    /// Starts a detached thread, or returns false when none can be made (pthread_create's EAGAIN:
    /// a pids cgroup's or RLIMIT_NPROC's limit), where `detach` stops the process. For threads
    /// a peer's actions make, so a peer can never crash the agent by exhausting them.
    @discardableResult
    public static func tryDetach(name: String? = nil, _ body: @escaping @Sendable () -> Void) -> Bool {
        guard let t = trySpawn(name: name, body) else { return false }
        pthread_detach(t)
        return true
    }

    /// Starts a joinable thread. A thread that cannot be made stops the process (see `tryDetach`).
    public static func spawn(name: String? = nil, _ body: @escaping @Sendable () -> Void) -> pthread_t {
        guard let t = trySpawn(name: name, body) else { preconditionFailure("pthread_create failed") }
        return t
    }

    /// Starts a joinable thread; nil when pthread_create fails.
    public static func trySpawn(name: String? = nil, _ body: @escaping @Sendable () -> Void) -> pthread_t? {
        var attr = pthread_attr_t()
        pthread_attr_init(&attr)
        pthread_attr_setstacksize(&attr, 256 * 1024)
        defer { pthread_attr_destroy(&attr) }
        let box = Unmanaged.passRetained(ThreadBody(name.map { name in { setCurrentName(name); body() } } ?? body)).toOpaque()
        var thread = pthread_t()
        // The new thread inherits its creator's signal mask. quiesced blocks every asynchronous
        // signal on its main thread before any thread exists (`Signals.blockAsynchronous`), so
        // all of its threads are born with them blocked. (Blocking here as well would hand a
        // fully blocked mask to every thread and child process of other programs using this
        // module: a test's `Process` children could no longer be stopped by SIGTERM.)
        let rc = pthread_create(&thread, &attr, { ctx in
            let b = Unmanaged<ThreadBody>.fromOpaque(ctx!).takeRetainedValue()
            b.body()
            return nil
        }, box)
        guard rc == 0 else {
            Unmanaged<ThreadBody>.fromOpaque(box).release()
            return nil
        }
        return thread
    }

    public static func join(_ t: pthread_t) { pthread_join(t, nil) }

    /// Runs `body(i)` for every i in 0..<count, each on its own thread (at most `maxThreads` at a
    /// time), and returns the results in order. This is how a wave of FIFREEZE calls runs in parallel.
    public static func parallelMap<T: Sendable>(_ count: Int, maxThreads: Int = 64, _ body: @escaping @Sendable (Int) -> T) -> [T] {
        if count == 0 { return [] }
        if count == 1 { return [body(0)] }
        let results = ResultSlots<T>(count)
        let next = Atomic<Int>(0)
        let threads = (0..<min(count, maxThreads)).map { _ in
            spawn {
                while true {
                    let i = next.add(1, ordering: .relaxed).oldValue
                    if i >= count { return }
                    results.set(i, body(i))
                }
            }
        }
        threads.forEach(join)
        return results.values()
    }

    /// Runs `body(i)` for every i in 0..<count, each on its own detached thread, and waits for
    /// them until `deadline` (monotonic ns). Returns the results in order, nil for a task still
    /// running at the deadline.
    ///
    /// A task that has not finished by then is abandoned, not cancelled: its thread runs on,
    /// and when `body` returns, `late(i, result)` runs on that thread instead of the result
    /// being delivered. Exactly one of the two happens for each task, so whoever owns what the
    /// task touched (an fd, a frozen filesystem) is never in doubt.
    public static func parallelMap<T: Sendable>(
        _ count: Int, until deadline: UInt64, _ body: @escaping @Sendable (Int) -> T,
        late: @escaping @Sendable (Int, T) -> Void
    ) -> [T?] {
        if count == 0 { return [] }
        let slots = AbandonableSlots<T>(count)
        let finished = Mailbox<Int>()
        for i in 0..<count {
            detach {
                let value = body(i)
                if slots.deliver(i, value) { finished.post(i) } else { late(i, value) }
            }
        }
        // The wait costs no wakeup: a condition variable with the deadline (Mailbox).
        var done = 0
        while done < count, finished.receive(deadlineNanos: deadline) != nil { done += 1 }
        return slots.closeAndCollect()
    }

    /// Runs blocking `body` on a dedicated thread and resumes the caller with its result, or
    /// with nil at `deadline` (monotonic ns) if it has not returned by then. The thread is not
    /// cancelled: it runs on, and its result is dropped.
    public static func run<T: Sendable>(until deadline: UInt64, _ body: @escaping @Sendable () -> T) async -> T? {
        await withCheckedContinuation { (c: CheckedContinuation<T?, Never>) in
            detach {
                let result = parallelMap(1, until: deadline, { _ in body() }, late: { _, _ in })
                c.resume(returning: result[0])
            }
        }
    }

    /// Runs blocking `body` on a dedicated thread and resumes the caller with its result.
    public static func run<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
        await withCheckedContinuation { (c: CheckedContinuation<T, Never>) in
            detach { c.resume(returning: body()) }
        }
    }
}

/// Slots that distinct threads fill until the reader closes them; a value that comes after
/// that is refused, and its thread handles it itself.
private final class AbandonableSlots<T: Sendable>: @unchecked Sendable {
    private var slots: [T?]
    private var closed = false
    private let lock = Mutex(())
    init(_ count: Int) { slots = Array(repeating: nil, count: count) }
    /// False when the reader has already given up on this slot.
    func deliver(_ i: Int, _ value: T) -> Bool {
        lock.withLock { _ in
            if closed { return false }
            slots[i] = value
            return true
        }
    }
    func closeAndCollect() -> [T?] {
        lock.withLock { _ in
            closed = true
            return slots
        }
    }
}

/// Write-once slots filled by distinct threads, read after all of them are joined.
private final class ResultSlots<T: Sendable>: @unchecked Sendable {
    private var slots: [T?]
    private let lock = Mutex(())
    init(_ count: Int) { slots = Array(repeating: nil, count: count) }
    func set(_ i: Int, _ value: T) { lock.withLock { _ in slots[i] = value } }
    func values() -> [T] { lock.withLock { _ in slots.map { $0! } } }
}

/// A thread started with `Threads.spawn`, to be joined with `Threads.join`.
public typealias JoinableThread = pthread_t
