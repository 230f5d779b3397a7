// Durations as people write them on command lines and in config files.

/// Parses "500ms", "30s", "5m", "1h", "1.5s" or plain seconds ("30") into milliseconds.
/// Returns nil for anything else, including negative, empty or overflowing values.
public func parseDurationMs(_ text: String) -> Int64? {
    let s = text.trimmingWhitespace()
    guard !s.isEmpty else { return nil }
    let units: [(String, Double)] = [("ms", 1), ("s", 1000), ("m", 60_000), ("h", 3_600_000)]
    var number = Substring(s)
    var scale = 1000.0
    for (suffix, factor) in units where s.hasSuffix(suffix) {
        number = s.dropLast(suffix.count)
        scale = factor
        break
    }
    guard !number.isEmpty, number.allSatisfy({ $0.isASCII && ($0.isNumber || $0 == ".") }),
          let value = Double(number), value.isFinite, value >= 0 else { return nil }
    let ms = value * scale + 0.5  // round half up without libm
    guard ms < 9.0e15 else { return nil }
    return Int64(ms)
}

/// "250ms", "30s", "5m", "1.5s": the shortest exact human form of a duration in milliseconds.
public func formatDurationMs(_ ms: Int64) -> String {
    if ms % 3_600_000 == 0 && ms >= 3_600_000 { return "\(ms / 3_600_000)h" }
    if ms % 60_000 == 0 && ms >= 60_000 { return "\(ms / 60_000)m" }
    if ms % 1000 == 0 && ms >= 1000 { return "\(ms / 1000)s" }
    if ms < 1000 { return "\(ms)ms" }
    return "\(Double(ms) / 1000)s"
}

extension String {
    func trimmingWhitespace() -> String {
        var s = Substring(self)
        while let f = s.first, f.isWhitespace { s.removeFirst() }
        while let l = s.last, l.isWhitespace { s.removeLast() }
        return String(s)
    }
}
