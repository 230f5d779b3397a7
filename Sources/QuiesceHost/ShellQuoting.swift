// Arguments quoted for display the way a shell would need them.

/// Quotes arguments for display the way a shell would need them.
func shellQuoted(_ argv: [String]) -> String {
    argv.map { arg in
        let safe = !arg.isEmpty && arg.unicodeScalars.allSatisfy { c in
            (c >= "a" && c <= "z") || (c >= "A" && c <= "Z") || (c >= "0" && c <= "9") || "-_./=:,+@%".unicodeScalars.contains(c)
        }
        return safe ? arg : "'" + arg.replacingOccurrences(of: "'", with: "'\\''") + "'"
    }.joined(separator: " ")
}

extension String {
    func replacingOccurrences(of target: String, with replacement: String) -> String {
        guard !target.isEmpty else { return self }
        var out = ""
        var rest = Substring(self)
        while let r = rest.firstRange(of: target) {
            out += rest[..<r.lowerBound]
            out += replacement
            rest = rest[r.upperBound...]
        }
        return out + rest
    }
}
