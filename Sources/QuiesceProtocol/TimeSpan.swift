// Durations as people write them on a command line ("500ms", "30s", "5m") and as we print them.

/// A non-negative span of time with millisecond resolution.
public struct TimeSpan: Sendable, Hashable, Comparable, CustomStringConvertible {
    public var milliseconds: Int64

    public init(milliseconds: Int64) {
        precondition(milliseconds >= 0, "a time span cannot be negative")
        self.milliseconds = milliseconds
    }

    public static func seconds(_ s: Int64) -> TimeSpan { TimeSpan(milliseconds: s * 1000) }
    public static func milliseconds(_ ms: Int64) -> TimeSpan { TimeSpan(milliseconds: ms) }

    public static func < (a: TimeSpan, b: TimeSpan) -> Bool { a.milliseconds < b.milliseconds }

    /// The longest span accepted: one day, the protocol's longest timeout.
    public static let maximum = TimeSpan(milliseconds: 86_400_000)

    /// Parses `500ms`, `30s`, `1.5s`, `5m`, `1h` or plain seconds (`30`, `0.5`).
    /// Fractions are rounded to the millisecond; a non-zero span shorter than 1 ms is an error.
    public init(parsing text: String) throws(TimeSpanParseError) {
        let t = text.trimmingASCIIWhitespace()
        guard !t.isEmpty else { throw TimeSpanParseError(text: text, reason: "it is empty") }
        let units: [(suffix: String, ms: Double)] = [("ms", 1), ("h", 3_600_000), ("m", 60_000), ("s", 1000)]
        var number = Substring(t)
        var factor: Double = 1000
        for unit in units where t.hasSuffix(unit.suffix) {
            number = t.dropLast(unit.suffix.count)
            factor = unit.ms
            break
        }
        number = Substring(String(number).trimmingASCIIWhitespace())
        guard !number.isEmpty,
              number.allSatisfy({ $0.isASCII && ($0.isNumber || $0 == ".") }),
              number.filter({ $0 == "." }).count <= 1,
              number.first != ".", number.last != ".",
              let value = Double(number)
        else {
            throw TimeSpanParseError(text: text, reason: "use a number followed by ms, s, m or h (500ms, 30s, 5m), or plain seconds")
        }
        // Compare before converting: Int64(_:) traps on a value out of its range (or infinite).
        guard value * factor + 0.5 < Double(TimeSpan.maximum.milliseconds) + 1 else {
            throw TimeSpanParseError(text: text, reason: "it is longer than one day")
        }
        let ms = Double(Int64(value * factor + 0.5))  // round half up without libm
        if ms == 0 && value != 0 {
            throw TimeSpanParseError(text: text, reason: "it is shorter than 1 ms")
        }
        self.init(milliseconds: Int64(ms))
    }

    /// The shortest form that parses back to the same value: "500ms", "30s", "5m", "1h", "1500ms".
    public var description: String {
        let ms = milliseconds
        if ms == 0 { return "0s" }
        if ms % 3_600_000 == 0 { return "\(ms / 3_600_000)h" }
        if ms % 60_000 == 0 { return "\(ms / 60_000)m" }
        if ms % 1000 == 0 { return "\(ms / 1000)s" }
        return "\(ms)ms"
    }

    /// For messages: "5 s", "500 ms", "1.5 s", "2 min 30 s".
    public var human: String { TimeSpan.human(milliseconds: milliseconds) }

    /// Formats a measured duration for people: "0.42 ms", "6.2 ms", "62 ms", "2.06 s", "2 min 5 s".
    public static func human(microseconds us: Int64) -> String {
        let us = max(0, us)
        if us < 1000 { return "\(fixed(Double(us) / 1000, 2)) ms" }
        if us < 10_000 { return "\(fixed(Double(us) / 1000, 1)) ms" }
        if us < 1_000_000 { return "\((us + 500) / 1000) ms" }
        if us < 10_000_000 { return "\(trimmed(fixed(Double(us) / 1_000_000, 2))) s" }
        if us < 60_000_000 { return "\(trimmed(fixed(Double(us) / 1_000_000, 1))) s" }
        // Rounded without adding first: a guest's duration may be near Int64.max.
        let s = us / 1_000_000 + (us % 1_000_000 >= 500_000 ? 1 : 0)
        if s < 3600 { return s % 60 == 0 ? "\(s / 60) min" : "\(s / 60) min \(s % 60) s" }
        let m = s / 60
        return m % 60 == 0 ? "\(m / 60) h" : "\(m / 60) h \(m % 60) min"
    }

    public static func human(nanoseconds ns: UInt64) -> String { human(microseconds: Int64(ns / 1000)) }

    /// `human(microseconds:)` of `ms` milliseconds, for any Int64 (no overflow: a value from a
    /// guest may be anything the wire allows; above about 292,000 years it reads as that).
    public static func human(milliseconds ms: Int64) -> String {
        human(microseconds: ms.multipliedReportingOverflow(by: 1000).overflow ? (ms < 0 ? 0 : Int64.max) : ms * 1000)
    }

    static func fixed(_ v: Double, _ digits: Int) -> String {
        var scale = 1.0
        for _ in 0..<digits { scale *= 10 }
        let n = Int64(v * scale + 0.5)
        let whole = n / Int64(scale)
        var frac = String(n % Int64(scale))
        while frac.count < digits { frac = "0" + frac }
        return digits == 0 ? "\(whole)" : "\(whole).\(frac)"
    }

    static func trimmed(_ s: String) -> String {
        guard s.contains(".") else { return s }
        var t = Substring(s)
        while t.last == "0" { t = t.dropLast() }
        if t.last == "." { t = t.dropLast() }
        return String(t)
    }
}

/// Why a duration could not be read.
public struct TimeSpanParseError: Error, Sendable, Equatable, CustomStringConvertible {
    public let text: String
    public let reason: String
    public var description: String { "\"\(text)\" is not a duration: \(reason)" }
}

extension String {
    package func trimmingASCIIWhitespace() -> String {
        var s = Substring(self)
        while let c = s.first, c == " " || c == "\t" || c == "\n" || c == "\r" { s = s.dropFirst() }
        while let c = s.last, c == " " || c == "\t" || c == "\n" || c == "\r" { s = s.dropLast() }
        return String(s)
    }
}
