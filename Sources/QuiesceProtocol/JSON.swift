// A small JSON value, parser and encoder: enough for the wire protocol, with limits enforced while parsing.

/// A JSON value. Objects keep their key order so encoded output is stable.
public enum JSON: Sendable, Hashable {
    case null
    case bool(Bool)
    case int(Int64)
    case double(Double)
    case string(String)
    case array([JSON])
    case object(JSONObject)

    public subscript(key: String) -> JSON? {
        if case .object(let o) = self { return o[key] }
        return nil
    }

    public var stringValue: String? { if case .string(let s) = self { return s }; return nil }
    public var boolValue: Bool? { if case .bool(let b) = self { return b }; return nil }
    public var arrayValue: [JSON]? { if case .array(let a) = self { return a }; return nil }
    public var objectValue: JSONObject? { if case .object(let o) = self { return o }; return nil }

    /// An integer, also from a double with no fractional part (1e3).
    public var intValue: Int64? {
        switch self {
        case .int(let i): return i
        case .double(let d) where abs(d) < 9.0e18 && Double(Int64(d)) == d: return Int64(d)
        default: return nil
        }
    }

    public var doubleValue: Double? {
        switch self {
        case .int(let i): return Double(i)
        case .double(let d): return d
        default: return nil
        }
    }

    public var isNull: Bool { if case .null = self { return true }; return false }
}

/// A JSON object with insertion-ordered keys. Equality ignores order.
public struct JSONObject: Sendable, Hashable, ExpressibleByDictionaryLiteral, Sequence {
    public private(set) var pairs: [(key: String, value: JSON)] = []

    public init() {}

    /// Pairs whose keys the caller has already checked to be distinct (the parser).
    init(distinctPairs: [(key: String, value: JSON)]) { pairs = distinctPairs }

    public init(dictionaryLiteral elements: (String, JSON)...) {
        for (k, v) in elements { self[k] = v }
    }

    public subscript(key: String) -> JSON? {
        get { pairs.first(where: { $0.key == key })?.value }
        set {
            if let i = pairs.firstIndex(where: { $0.key == key }) {
                if let newValue { pairs[i].value = newValue } else { pairs.remove(at: i) }
            } else if let newValue {
                pairs.append((key, newValue))
            }
        }
    }

    public var keys: [String] { pairs.map(\.key) }
    public var count: Int { pairs.count }
    public func makeIterator() -> IndexingIterator<[(key: String, value: JSON)]> { pairs.makeIterator() }

    public static func == (a: JSONObject, b: JSONObject) -> Bool {
        guard a.pairs.count == b.pairs.count else { return false }
        for (k, v) in a.pairs where b[k] != v { return false }
        return true
    }

    public func hash(into hasher: inout Hasher) {
        // Order-independent: combine per-pair hashes commutatively.
        var acc = 0
        for (k, v) in pairs {
            var h = Hasher()
            h.combine(k)
            h.combine(v)
            acc ^= h.finalize()
        }
        hasher.combine(acc)
    }
}

extension JSON: ExpressibleByStringLiteral, ExpressibleByIntegerLiteral, ExpressibleByBooleanLiteral,
    ExpressibleByArrayLiteral, ExpressibleByDictionaryLiteral, ExpressibleByNilLiteral, ExpressibleByFloatLiteral
{
    public init(stringLiteral value: String) { self = .string(value) }
    public init(integerLiteral value: Int64) { self = .int(value) }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(arrayLiteral elements: JSON...) { self = .array(elements) }
    public init(dictionaryLiteral elements: (String, JSON)...) {
        var o = JSONObject()
        for (k, v) in elements { o[k] = v }
        self = .object(o)
    }
    public init(nilLiteral: ()) { self = .null }
    public init(floatLiteral value: Double) { self = .double(value) }
}

// MARK: - Parsing

/// Why a byte sequence is not acceptable JSON, with the byte offset where it went wrong.
public struct JSONParseError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        case invalidUTF8, unexpectedEnd, unexpectedByte, invalidNumber, invalidString, invalidEscape
        case tooDeep, trailingData, duplicateKey
    }
    public let kind: Kind
    public let offset: Int

    public var description: String {
        switch kind {
        case .invalidUTF8: "invalid UTF-8 at byte \(offset)"
        case .unexpectedEnd: "unexpected end of JSON at byte \(offset)"
        case .unexpectedByte: "unexpected character at byte \(offset)"
        case .invalidNumber: "invalid number at byte \(offset)"
        case .invalidString: "invalid string (control character) at byte \(offset)"
        case .invalidEscape: "invalid escape sequence at byte \(offset)"
        case .tooDeep: "nesting deeper than allowed at byte \(offset)"
        case .trailingData: "unexpected data after the JSON value at byte \(offset)"
        case .duplicateKey: "duplicate object key at byte \(offset)"
        }
    }
}

extension JSON {
    /// Parses one complete JSON value from UTF-8 bytes. Rejects nesting deeper than `maxDepth`,
    /// duplicate keys and anything after the value but white space.
    ///
    /// The cost is linear in the number of bytes, whatever their shape: a peer's frame is hostile
    /// input (an object with 100 000 keys must not cost 10^10 key comparisons).
    public static func parse(_ bytes: some Collection<UInt8>, maxDepth: Int = 32) throws(JSONParseError) -> JSON {
        var work = 0
        return try parse(bytes, maxDepth: maxDepth, keyWork: &work)
    }

    /// `parse`, also counting the key comparisons and set look-ups the duplicate-key check made
    /// (in `keyWork`, even when parsing fails): the deterministic measure of the parser's cost
    /// that tests and the fuzzer hold against the input's size.
    static func parse(_ bytes: some Collection<UInt8>, maxDepth: Int, keyWork: inout Int) throws(JSONParseError) -> JSON {
        let array = Array(bytes)
        var work = 0
        defer { keyWork += work }
        return try array.withUnsafeBufferPointer { (buf) throws(JSONParseError) -> JSON in
            var p = Parser(bytes: buf, maxDepth: maxDepth)
            defer { work = p.keyWork }
            p.skipWhitespace()
            let value = try p.parseValue(depth: 0)
            p.skipWhitespace()
            if p.pos != buf.count { throw JSONParseError(kind: .trailingData, offset: p.pos) }
            return value
        }
    }

    public static func parse(_ text: String, maxDepth: Int = 32) throws(JSONParseError) -> JSON {
        try parse(Array(text.utf8), maxDepth: maxDepth)
    }
}

private struct Parser {
    let bytes: UnsafeBufferPointer<UInt8>
    let maxDepth: Int
    var pos = 0
    /// Key comparisons and set look-ups made to refuse duplicate keys.
    var keyWork = 0
    /// Up to this many keys, an object's keys are compared one by one; beyond, a set is faster.
    static let linearKeyCount = 8

    init(bytes: UnsafeBufferPointer<UInt8>, maxDepth: Int) {
        self.bytes = bytes
        self.maxDepth = maxDepth
    }

    func fail(_ kind: JSONParseError.Kind, at offset: Int? = nil) -> JSONParseError {
        JSONParseError(kind: kind, offset: offset ?? pos)
    }

    mutating func skipWhitespace() {
        while pos < bytes.count {
            switch bytes[pos] {
            case 0x20, 0x09, 0x0A, 0x0D: pos += 1
            default: return
            }
        }
    }

    mutating func peek() throws(JSONParseError) -> UInt8 {
        guard pos < bytes.count else { throw fail(.unexpectedEnd) }
        return bytes[pos]
    }

    mutating func expect(_ literal: StaticString, _ value: JSON) throws(JSONParseError) -> JSON {
        let lit = UnsafeBufferPointer(start: literal.utf8Start, count: literal.utf8CodeUnitCount)
        for (i, b) in lit.enumerated() {
            guard pos + i < bytes.count else { throw fail(.unexpectedEnd, at: bytes.count) }
            guard bytes[pos + i] == b else { throw fail(.unexpectedByte, at: pos + i) }
        }
        pos += lit.count
        return value
    }

    mutating func parseValue(depth: Int) throws(JSONParseError) -> JSON {
        switch try peek() {
        case UInt8(ascii: "{"): return try parseObject(depth: depth + 1)
        case UInt8(ascii: "["): return try parseArray(depth: depth + 1)
        case UInt8(ascii: "\""): return .string(try parseString())
        case UInt8(ascii: "t"): return try expect("true", .bool(true))
        case UInt8(ascii: "f"): return try expect("false", .bool(false))
        case UInt8(ascii: "n"): return try expect("null", .null)
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try parseNumber()
        default: throw fail(.unexpectedByte)
        }
    }

    mutating func parseObject(depth: Int) throws(JSONParseError) -> JSON {
        if depth > maxDepth { throw fail(.tooDeep) }
        pos += 1
        var pairs: [(key: String, value: JSON)] = []
        // Small objects (every request) compare keys one by one; larger ones keep a set, so an
        // object of n keys costs O(n), not O(n^2).
        var seen: Set<String>? = nil
        skipWhitespace()
        if try peek() == UInt8(ascii: "}") { pos += 1; return .object(JSONObject()) }
        while true {
            skipWhitespace()
            guard try peek() == UInt8(ascii: "\"") else { throw fail(.unexpectedByte) }
            let keyOffset = pos
            let key = try parseString()
            if seen != nil {
                keyWork += 1
                if !seen!.insert(key).inserted { throw fail(.duplicateKey, at: keyOffset) }
            } else {
                for pair in pairs {
                    keyWork += 1
                    if pair.key == key { throw fail(.duplicateKey, at: keyOffset) }
                }
                if pairs.count + 1 == Parser.linearKeyCount {
                    keyWork += pairs.count + 1
                    seen = Set(pairs.map(\.key) + [key])
                }
            }
            skipWhitespace()
            guard try peek() == UInt8(ascii: ":") else { throw fail(.unexpectedByte) }
            pos += 1
            skipWhitespace()
            pairs.append((key, try parseValue(depth: depth)))
            skipWhitespace()
            switch try peek() {
            case UInt8(ascii: ","): pos += 1
            case UInt8(ascii: "}"): pos += 1; return .object(JSONObject(distinctPairs: pairs))
            default: throw fail(.unexpectedByte)
            }
        }
    }

    mutating func parseArray(depth: Int) throws(JSONParseError) -> JSON {
        if depth > maxDepth { throw fail(.tooDeep) }
        pos += 1
        var items: [JSON] = []
        skipWhitespace()
        if try peek() == UInt8(ascii: "]") { pos += 1; return .array(items) }
        while true {
            skipWhitespace()
            items.append(try parseValue(depth: depth))
            skipWhitespace()
            switch try peek() {
            case UInt8(ascii: ","): pos += 1
            case UInt8(ascii: "]"): pos += 1; return .array(items)
            default: throw fail(.unexpectedByte)
            }
        }
    }

    mutating func parseNumber() throws(JSONParseError) -> JSON {
        let start = pos
        var isInteger = true
        if bytes[pos] == UInt8(ascii: "-") { pos += 1 }
        guard pos < bytes.count else { throw fail(.invalidNumber, at: start) }
        if bytes[pos] == UInt8(ascii: "0") {
            pos += 1
        } else if (UInt8(ascii: "1")...UInt8(ascii: "9")).contains(bytes[pos]) {
            while pos < bytes.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(bytes[pos]) { pos += 1 }
        } else {
            throw fail(.invalidNumber, at: start)
        }
        if pos < bytes.count, bytes[pos] == UInt8(ascii: ".") {
            isInteger = false
            pos += 1
            let digits = pos
            while pos < bytes.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(bytes[pos]) { pos += 1 }
            if pos == digits { throw fail(.invalidNumber, at: start) }
        }
        if pos < bytes.count, bytes[pos] == UInt8(ascii: "e") || bytes[pos] == UInt8(ascii: "E") {
            isInteger = false
            pos += 1
            if pos < bytes.count, bytes[pos] == UInt8(ascii: "+") || bytes[pos] == UInt8(ascii: "-") { pos += 1 }
            let digits = pos
            while pos < bytes.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(bytes[pos]) { pos += 1 }
            if pos == digits { throw fail(.invalidNumber, at: start) }
        }
        let text = String(decoding: UnsafeBufferPointer(rebasing: bytes[start..<pos]), as: UTF8.self)
        if isInteger, let i = Int64(text) { return .int(i) }
        guard let d = Double(text), d.isFinite else { throw fail(.invalidNumber, at: start) }
        return .double(d)
    }

    mutating func parseHex4() throws(JSONParseError) -> UInt32 {
        guard pos + 4 <= bytes.count else { throw fail(.invalidEscape) }
        var v: UInt32 = 0
        for _ in 0..<4 {
            let b = bytes[pos]
            let digit: UInt32
            switch b {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = UInt32(b - UInt8(ascii: "0"))
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = UInt32(b - UInt8(ascii: "a") + 10)
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = UInt32(b - UInt8(ascii: "A") + 10)
            default: throw fail(.invalidEscape)
            }
            v = v << 4 | digit
            pos += 1
        }
        return v
    }

    mutating func parseString() throws(JSONParseError) -> String {
        let open = pos
        pos += 1
        // Fast path: no escapes.
        var scan = pos
        while scan < bytes.count {
            let b = bytes[scan]
            if b == UInt8(ascii: "\"") {
                let slice = UnsafeBufferPointer(rebasing: bytes[pos..<scan])
                guard let s = String(validating: slice, as: UTF8.self) else { throw fail(.invalidUTF8, at: pos) }
                pos = scan + 1
                return s
            }
            if b == UInt8(ascii: "\\") { break }
            if b < 0x20 { throw fail(.invalidString, at: scan) }
            scan += 1
        }
        if scan >= bytes.count { throw fail(.unexpectedEnd, at: bytes.count) }
        // Slow path with escapes.
        var out: [UInt8] = Array(UnsafeBufferPointer(rebasing: bytes[pos..<scan]))
        pos = scan
        while true {
            guard pos < bytes.count else { throw fail(.unexpectedEnd, at: bytes.count) }
            let b = bytes[pos]
            if b == UInt8(ascii: "\"") {
                pos += 1
                guard let s = String(validating: out, as: UTF8.self) else { throw fail(.invalidUTF8, at: open) }
                return s
            }
            if b < 0x20 { throw fail(.invalidString) }
            if b != UInt8(ascii: "\\") { out.append(b); pos += 1; continue }
            pos += 1
            guard pos < bytes.count else { throw fail(.unexpectedEnd, at: bytes.count) }
            let e = bytes[pos]
            pos += 1
            switch e {
            case UInt8(ascii: "\""): out.append(0x22)
            case UInt8(ascii: "\\"): out.append(0x5C)
            case UInt8(ascii: "/"): out.append(0x2F)
            case UInt8(ascii: "b"): out.append(0x08)
            case UInt8(ascii: "f"): out.append(0x0C)
            case UInt8(ascii: "n"): out.append(0x0A)
            case UInt8(ascii: "r"): out.append(0x0D)
            case UInt8(ascii: "t"): out.append(0x09)
            case UInt8(ascii: "u"):
                var scalar = try parseHex4()
                if (0xD800...0xDBFF).contains(scalar) {
                    guard pos + 2 <= bytes.count, bytes[pos] == UInt8(ascii: "\\"), bytes[pos + 1] == UInt8(ascii: "u")
                    else { throw fail(.invalidEscape) }
                    pos += 2
                    let low = try parseHex4()
                    guard (0xDC00...0xDFFF).contains(low) else { throw fail(.invalidEscape) }
                    scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                } else if (0xDC00...0xDFFF).contains(scalar) {
                    throw fail(.invalidEscape)
                }
                guard let u = Unicode.Scalar(scalar) else { throw fail(.invalidEscape) }
                out.append(contentsOf: Array(String(Character(u)).utf8))
            default:
                throw fail(.invalidEscape, at: pos - 2)
            }
        }
    }
}

// MARK: - Encoding

extension JSON {
    /// Compact UTF-8 encoding with object keys in insertion order. Never contains a newline byte.
    public func encoded() -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(128)
        encode(into: &out)
        return out
    }

    /// One frame of either dialect: the compact encoding followed by "\n" (0x0A). The encoding
    /// never holds a newline byte, so the line is exactly one frame.
    public func encodedLine() -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(128)
        encode(into: &out)
        out.append(0x0A)
        return out
    }

    /// The compact encoding as a String.
    public var text: String { String(decoding: encoded(), as: UTF8.self) }

    public func encode(into out: inout [UInt8]) {
        switch self {
        case .null: out.append(contentsOf: "null".utf8)
        case .bool(let b): out.append(contentsOf: (b ? "true" : "false").utf8)
        case .int(let i): out.append(contentsOf: String(i).utf8)
        case .double(let d):
            if d.isFinite {
                if abs(d) < 1e15 && Double(Int64(d)) == d {
                    out.append(contentsOf: String(Int64(d)).utf8)
                } else {
                    out.append(contentsOf: d.description.utf8)
                }
            } else {
                out.append(contentsOf: "null".utf8)
            }
        case .string(let s): JSON.encodeString(s, into: &out)
        case .array(let items):
            out.append(UInt8(ascii: "["))
            for (i, item) in items.enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                item.encode(into: &out)
            }
            out.append(UInt8(ascii: "]"))
        case .object(let o):
            out.append(UInt8(ascii: "{"))
            for (i, pair) in o.pairs.enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                JSON.encodeString(pair.key, into: &out)
                out.append(UInt8(ascii: ":"))
                pair.value.encode(into: &out)
            }
            out.append(UInt8(ascii: "}"))
        }
    }

    static func encodeString(_ s: String, into out: inout [UInt8]) {
        out.append(UInt8(ascii: "\""))
        for b in s.utf8 {
            switch b {
            case UInt8(ascii: "\""): out.append(contentsOf: #"\""#.utf8)
            case UInt8(ascii: "\\"): out.append(contentsOf: #"\\"#.utf8)
            case 0x0A: out.append(contentsOf: #"\n"#.utf8)
            case 0x0D: out.append(contentsOf: #"\r"#.utf8)
            case 0x09: out.append(contentsOf: #"\t"#.utf8)
            case 0..<0x20:
                let hex: [UInt8] = Array("0123456789abcdef".utf8)
                out.append(contentsOf: #"\u00"#.utf8)
                out.append(hex[Int(b >> 4)])
                out.append(hex[Int(b & 0xF)])
            default: out.append(b)
            }
        }
        out.append(UInt8(ascii: "\""))
    }
}
