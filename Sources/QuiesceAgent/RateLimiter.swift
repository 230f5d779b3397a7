// Requests per second per session: a token bucket.

/// A token bucket: `rate` requests per second sustained, `burst` at once.
struct RateLimiter {
    let rate: Double
    let burst: Double
    var tokens: Double
    var last: UInt64 = 0

    init(rate: Int, burst: Int) {
        self.rate = Double(rate)
        self.burst = Double(burst)
        tokens = Double(burst)
    }

    mutating func allow(now: UInt64) -> Bool {
        if last != 0 { tokens = min(burst, tokens + Double(now - last) / 1e9 * rate) }
        last = now
        guard tokens >= 1 else { return false }
        tokens -= 1
        return true
    }
}
