// Retrying a device that failed to open: twice as long each time, up to a ceiling.

/// How long a listener waits before it retries a device it could not open for a reason other
/// than its absence (a missing device is waited for through `PathWatch`, with no timer): EBUSY
/// while another daemon holds it, EACCES, EIO from a driver being reset. The first retry comes
/// after `first` ms, each later one after twice the previous, never more than `ceiling` ms, so
/// a device that stays unusable costs one wakeup a minute rather than one a second.
/// `reset()` after a successful open starts over.
public struct RetryBackoff: Sendable {
    public let first: Int
    public let ceiling: Int
    public private(set) var next: Int

    /// - Parameters: `first` and `ceiling` delays in milliseconds (`first` >= 1, `ceiling` >= `first`).
    public init(first: Int = 1000, ceiling: Int = 60_000) {
        self.first = max(1, first)
        self.ceiling = max(self.first, ceiling)
        next = self.first
    }

    /// The delay to wait now, in milliseconds; doubles the one after it.
    public mutating func take() -> Int {
        let now = next
        next = min(ceiling, next * 2)
        return now
    }

    /// Sleeps for `take()` milliseconds on the calling thread.
    public mutating func sleep() { Threads.sleep(milliseconds: take()) }

    public mutating func reset() { next = first }
}
