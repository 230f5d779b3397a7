// Arguments quoted for display the way a shell would need them.

/// Quotes arguments for display the way a shell would need them.
func shellQuoted(_ argv: [String]) -> String {
    shellQuoted(bytes: argv.map { Array($0.utf8) })
}

/// Whether a terminal acts on the character `v` (a Unicode scalar value) rather than showing
/// it: C0 controls but tab (ESC, CR, LF, BEL), DEL, C1 controls (U+0080-U+009F, CSI among them),
/// the bidirectional overrides, isolates and marks (U+202A-U+202E, U+2066-U+2069, U+200E,
/// U+200F, U+061C; Unicode UAX #9) and the line and paragraph separators. Output spells these
/// `\uXXXX`.
public func terminalActsOn(_ v: UInt32) -> Bool {
    (v < 0x20 && v != 0x09) || (0x7F...0x9F).contains(v) || (0x202A...0x202E).contains(v)
        || (0x2066...0x2069).contains(v) || v == 0x200E || v == 0x200F || v == 0x061C || v == 0x2028 || v == 0x2029
}

/// Quotes arguments, given as the bytes the kernel passes (execve(2)), so that a shell reading
/// the line passes the same bytes: plain words as they are, other UTF-8 text in single quotes,
/// and an argument with a control character, a character a terminal acts on
/// (`terminalActsOn`, which output would escape inside single quotes, changing the argument)
/// or a byte that is not UTF-8 in bash's ANSI-C quoting (`$'…'`, with `\xNN` for such bytes and
/// for the UTF-8 bytes of such characters; bash(1) "QUOTING"), which dash does not read.
func shellQuoted(bytes argv: [[UInt8]]) -> String {
    argv.map { arg in
        let text = String(validating: arg, as: UTF8.self)
        if let text, !arg.contains(where: { $0 < 0x20 || $0 == 0x7f }),
           !text.unicodeScalars.contains(where: { terminalActsOn($0.value) }) {
            let safe = !arg.isEmpty && arg.allSatisfy { c in
                (c >= 0x61 && c <= 0x7a) || (c >= 0x41 && c <= 0x5a) || (c >= 0x30 && c <= 0x39) || "-_./=:,+@%".utf8.contains(c)
            }
            return safe ? text : "'" + text.replacingOccurrences(of: "'", with: "'\\''") + "'"
        }
        // Text stays text (control characters escaped); an argument that is not UTF-8 keeps
        // its printable ASCII and shows every other byte in hexadecimal.
        let units: [UInt32] = text.map { $0.unicodeScalars.map(\.value) } ?? arg.map(UInt32.init)
        var out = "$'"
        for c in units {
            switch c {
            case 0x5c: out += "\\\\"
            case 0x27: out += "\\'"
            case 0x0a: out += "\\n"
            case 0x09: out += "\\t"
            case 0x20..<0x7f: out.unicodeScalars.append(UnicodeScalar(UInt8(c)))
            case 0x80... where text != nil && terminalActsOn(c):
                // A C1 control, bidirectional control or separator, as its UTF-8 bytes: bash
                // reads `\u` escapes as the character only in a UTF-8 locale (under LC_ALL=C,
                // as in cron, they stay text), `\x` escapes in any (trial J).
                for b in String(UnicodeScalar(c)!).utf8 { out += "\\x" + String(b, radix: 16) }
            case 0xa0... where text != nil: out.unicodeScalars.append(UnicodeScalar(c)!)
            default: out += "\\x" + (c < 0x10 ? "0" : "") + String(c, radix: 16)
            }
        }
        return out + "'"
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
