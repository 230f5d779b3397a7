// A FIFO between threads with a deadline on the receiving side, on a mutex and a condition variable.
#if canImport(Glibc)
import Glibc
#endif

/// A thread-safe FIFO that one or more threads post to and one thread receives from, with a
/// timeout. Built on a mutex and a condition variable on the monotonic clock: no descriptors.
public final class Mailbox<Message: Sendable>: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let cond: UnsafeMutablePointer<pthread_cond_t>
    private var queue: [Message] = []
    private var head = 0

    public init() {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        cond = .allocate(capacity: 1)
        cond.initialize(to: pthread_cond_t())
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(cond, &attr)
        pthread_condattr_destroy(&attr)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        cond.deallocate()
        mutex.deallocate()
    }

    public func post(_ message: Message) {
        pthread_mutex_lock(mutex)
        queue.append(message)
        pthread_cond_signal(cond)
        pthread_mutex_unlock(mutex)
    }

    /// The next message, waiting at most `timeoutMs` (nil: forever). Nil on timeout.
    public func receive(timeoutMs: Int64? = nil) -> Message? {
        let deadline = timeoutMs.map { monotonicNanos() + UInt64(max(0, $0)) * 1_000_000 }
        return receive(deadlineNanos: deadline)
    }

    /// The next message, waiting until the monotonic `deadlineNanos` (nil: forever). Nil on timeout.
    public func receive(deadlineNanos: UInt64?) -> Message? {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        while head == queue.count {
            if let deadlineNanos {
                if monotonicNanos() >= deadlineNanos { return nil }
                var ts = timespec(tv_sec: Int(deadlineNanos / 1_000_000_000), tv_nsec: Int(deadlineNanos % 1_000_000_000))
                _ = pthread_cond_timedwait(cond, mutex, &ts)
            } else {
                pthread_cond_wait(cond, mutex)
            }
        }
        let m = queue[head]
        head += 1
        if head == queue.count {
            queue.removeAll(keepingCapacity: true)
            head = 0
        }
        return m
    }
}
