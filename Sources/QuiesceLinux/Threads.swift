// Dedicated OS threads for blocking work (ioctls, syncfs, blocking reads), kept off Swift's cooperative pool.
#if canImport(Glibc)
import Glibc
#endif
import Synchronization

private final class ThreadBody: @unchecked Sendable {
    let body: () -> Void
    init(_ body: @escaping () -> Void) { self.body = body }
}

public enum Threads {
    /// Starts a detached thread running `body`. The stack is small: these threads do syscalls.
    public static func detach(name: String? = nil, _ body: @escaping @Sendable () -> Void) {
        let t = spawn(body)
        pthread_detach(t)
    }

    /// Starts a joinable thread.
    public static func spawn(_ body: @escaping @Sendable () -> Void) -> pthread_t {
        var attr = pthread_attr_t()
        pthread_attr_init(&attr)
        pthread_attr_setstacksize(&attr, 256 * 1024)
        defer { pthread_attr_destroy(&attr) }
        let box = Unmanaged.passRetained(ThreadBody(body)).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, &attr, { ctx in
            let b = Unmanaged<ThreadBody>.fromOpaque(ctx!).takeRetainedValue()
            b.body()
            return nil
        }, box)
        precondition(rc == 0, "pthread_create failed: \(rc)")
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

    /// Runs blocking `body` on a dedicated thread and resumes the caller with its result.
    public static func run<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
        await withCheckedContinuation { (c: CheckedContinuation<T, Never>) in
            detach { c.resume(returning: body()) }
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
