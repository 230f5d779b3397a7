// The protocol's own JSON parser and encoder: strict parsing, stable compact encoding.
import QuiesceProtocol
import Testing

private func parse(_ text: String, maxDepth: Int = 32) throws(JSONParseError) -> JSON {
    try JSON.parse(text, maxDepth: maxDepth)
}

private func parseError(_ bytes: [UInt8], maxDepth: Int = 32) -> JSONParseError? {
    do {
        _ = try JSON.parse(bytes, maxDepth: maxDepth)
        return nil
    } catch {
        return error
    }
}

private func parseError(_ text: String, maxDepth: Int = 32) -> JSONParseError? {
    parseError(Array(text.utf8), maxDepth: maxDepth)
}

private func nested(_ depth: Int) -> String {
    // `depth` levels: an object holding depth-1 arrays.
    "{\"a\":" + String(repeating: "[", count: depth - 1) + String(repeating: "]", count: depth - 1) + "}"
}

@Suite("JSON")
struct JSONTests {
    // MARK: Round trips

    static let documents = [
        #"{}"#, #"[]"#, #"null"#, #"true"#, #"false"#, #"0"#, #"-7"#, #""""#, #""text""#,
        #"{"id":1,"op":"freeze","mounts":["/srv","/"],"timeout_ms":30000,"mode":"bound"}"#,
        #"{"a":{"b":{"c":[1,2,{"d":null}]}},"e":[true,false,[]],"f":{}}"#,
        #"{"unicode":"é漢😀","escapes":"\"\\\n\r\t\u0001"}"#,
        #"[9223372036854775807,-9223372036854775808,0.5,-1.25,1e+20]"#,
    ]

    @Test("parse then encode then parse gives the same value", arguments: JSONTests.documents)
    func roundTrip(_ text: String) throws {
        let value = try parse(text)
        let again = try JSON.parse(value.encoded())
        #expect(again == value)
        #expect(again.encoded() == value.encoded(), "the encoding is stable")
    }

    @Test("compact documents encode back to the very same bytes")
    func compactIsCanonical() throws {
        for text in [#"{"id":1,"op":"freeze","mounts":["/srv","/"],"timeout_ms":30000,"mode":"bound"}"#,
                     #"{"z":1,"a":2,"m":[null,true,false,"x"]}"#] {
            #expect(try parse(text).text == text)
        }
    }

    @Test("white space between tokens is accepted and dropped by the encoder")
    func whiteSpace() throws {
        let value = try parse(" \t\r\n{ \"id\" : 7 ,\n \"op\" :\t\"ping\" } \r\n")
        #expect(value.text == #"{"id":7,"op":"ping"}"#)
    }

    @Test("objects keep key order when encoded, and compare equal in any order")
    func keyOrder() throws {
        let a = try parse(#"{"b":1,"a":2}"#)
        let b = try parse(#"{"a":2,"b":1}"#)
        #expect(a == b)
        #expect(a.hashValue == b.hashValue)
        #expect(a.text == #"{"b":1,"a":2}"#)
        #expect(try a != parse(#"{"a":2,"b":1,"c":3}"#))
    }

    @Test("setting a key to nil removes it; setting it again appends it")
    func objectMutation() {
        var o: JSONObject = ["a": 1, "b": 2]
        o["a"] = nil
        #expect(o.keys == ["b"])
        o["a"] = 3
        #expect(o.keys == ["b", "a"])
        o["b"] = "x"
        #expect(JSON.object(o).text == #"{"b":"x","a":3}"#)
    }

    // MARK: Strings and escapes

    @Test("every JSON escape decodes")
    func escapes() throws {
        let value = try parse(#""\"\\\/\b\f\n\r\t\u0041\u00e9\u6F22""#)
        #expect(value == .string("\"\\/\u{08}\u{0C}\n\r\tAé漢"))
    }

    @Test("a surrogate pair escape decodes to one scalar")
    func surrogatePair() throws {
        #expect(try parse(#""\ud83d\ude00""#) == .string("😀"))
        #expect(try parse(#""x\uD834\uDD1Ey""#) == .string("x𝄞y"))
    }

    @Test("lone or mismatched surrogate escapes are rejected", arguments: [
        #""\ud83d""#, #""\ud83dx""#, #""\ude00""#, #""\ud83d\u0041""#, #""\ud83d\ud83d""#,
    ])
    func badSurrogates(_ text: String) {
        #expect(parseError(text)?.kind == .invalidEscape)
    }

    @Test("unknown or short escapes are rejected", arguments: [#""\x""#, #""\u12""#, #""\u12g4""#, #""\'""#])
    func badEscapes(_ text: String) {
        #expect(parseError(text)?.kind == .invalidEscape)
    }

    @Test("raw control characters inside strings are rejected, DEL is not", arguments: [0x00, 0x01, 0x0A, 0x0D, 0x1F] as [UInt8])
    func controlCharacters(_ byte: UInt8) {
        let plain: [UInt8] = [0x22, 0x61, byte, 0x62, 0x22]
        #expect(parseError(plain)?.kind == .invalidString)
        #expect(parseError(plain)?.offset == 2)
        let escaped: [UInt8] = Array(#""\n"#.utf8) + [byte, 0x22]
        #expect(parseError(escaped)?.kind == .invalidString, "also after an escape")
    }

    @Test("DEL and non-ASCII characters need no escape")
    func delAndUnicode() throws {
        #expect(try JSON.parse([0x22, 0x7F, 0x22]) == .string("\u{7F}"))
        #expect(try parse("\"é漢😀\"") == .string("é漢😀"))
    }

    @Test("invalid UTF-8 is rejected, in plain and escaped strings", arguments: [
        [0x22, 0xC3, 0x28, 0x22],  // bad continuation
        [0x22, 0x80, 0x22],  // lone continuation byte
        [0x22, 0xC0, 0xAF, 0x22],  // overlong "/"
        [0x22, 0xED, 0xA0, 0x80, 0x22],  // a UTF-16 surrogate encoded in UTF-8
        [0x22, 0xE6, 0xBC, 0x22],  // truncated sequence
        [0x22, 0xF5, 0x80, 0x80, 0x80, 0x22],  // beyond U+10FFFF
        [0x22, 0x5C, 0x6E, 0xC3, 0x28, 0x22],  // after an escape
    ] as [[UInt8]])
    func invalidUTF8(_ bytes: [UInt8]) {
        #expect(parseError(bytes)?.kind == .invalidUTF8)
    }

    @Test("a byte that is not UTF-8 outside a string is an unexpected byte")
    func invalidByteOutsideString() {
        #expect(parseError([0x7B, 0xC3, 0x7D])?.kind == .unexpectedByte)
    }

    @Test("the encoder escapes quotes, backslashes and every control character")
    func encoderEscapes() throws {
        #expect(JSON.string("a\"b\\c/d").text == #""a\"b\\c/d""#)
        #expect(JSON.string("\n\r\t").text == #""\n\r\t""#)
        #expect(JSON.string("\u{00}\u{08}\u{0C}\u{1F}").text == #""\u0000\u0008\u000c\u001f""#)
        #expect(JSON.string("é😀").encoded() == Array("\"é😀\"".utf8), "non-ASCII is written as UTF-8")
        let all = String((0..<0x80).map { Character(Unicode.Scalar(UInt8($0))) })
        #expect(try JSON.parse(JSON.string(all).encoded()) == .string(all))
    }

    @Test("the encoder never writes a raw newline or carriage return, whatever the strings hold")
    func encoderNeverEmitsNewline() {
        let nasty = "line1\nline2\r\n\u{2028}\u{0B}\u{0C}"
        let value: JSON = [
            nasty: [.string(nasty), ["k\n": .string(nasty)], 1.5, .int(-1), nil, true],
            "message": .string(nasty),
        ]
        let bytes = value.encoded()
        #expect(!bytes.contains(0x0A))
        #expect(!bytes.contains(0x0D))
        #expect(Reply(id: .string(nasty), error: ProtocolError(.internal, nasty, details: ["x": .string(nasty)])).frame
            .filter { $0 == 0x0A }.count == 1, "a reply frame holds exactly one newline: its end")
    }

    // MARK: Numbers

    @Test("integers parse as Int64, including the extremes and negative zero")
    func integers() throws {
        #expect(try parse("0") == .int(0))
        #expect(try parse("-0") == .int(0))
        #expect(try parse("42") == .int(42))
        #expect(try parse("-42") == .int(-42))
        #expect(try parse("9223372036854775807") == .int(Int64.max))
        #expect(try parse("-9223372036854775808") == .int(Int64.min))
    }

    @Test("fractions, exponents and integers beyond Int64 parse as doubles")
    func doubles() throws {
        #expect(try parse("1.5") == .double(1.5))
        #expect(try parse("-0.25") == .double(-0.25))
        #expect(try parse("1e3") == .double(1000))
        #expect(try parse("1E+2") == .double(100))
        #expect(try parse("-1.5e-3") == .double(-0.0015))
        #expect(try parse("9223372036854775808") == .double(9_223_372_036_854_775_808))
    }

    @Test("intValue accepts whole doubles and refuses fractions")
    func intValue() throws {
        #expect(try parse("1e3").intValue == 1000)
        #expect(try parse("30000.0").intValue == 30000)
        #expect(try parse("1.5").intValue == nil)
        #expect(try parse("1e19").intValue == nil)
        #expect(try parse("\"1\"").intValue == nil)
    }

    @Test("malformed numbers are rejected", arguments: [
        "01", "-01", "00", "1.", ".5", "-", "+1", "1e", "1e+", "1.e3", "0x10", "1e400", "-1e400", "NaN", "Infinity",
        "-Infinity", "[01]", #"{"a":01}"#,
    ])
    func malformedNumbers(_ text: String) {
        #expect(parseError(text) != nil, "\(text) must not parse")
    }

    @Test("doubles encode compactly: whole values as integers, non-finite values as null")
    func doubleEncoding() throws {
        #expect(JSON.double(3).text == "3")
        #expect(JSON.double(-2).text == "-2")
        #expect(JSON.double(0.5).text == "0.5")
        #expect(JSON.double(.infinity).text == "null")
        #expect(JSON.double(.nan).text == "null")
        for d in [1e20, 1e-7, -123.456, Double.leastNonzeroMagnitude, 1.7976931348623157e308] {
            #expect(try JSON.parse(JSON.double(d).encoded()).doubleValue == d, "\(d) survives a round trip")
        }
    }

    // MARK: Structure

    @Test("nesting up to maxDepth parses, one level more is tooDeep")
    func depthLimit() throws {
        #expect(throws: Never.self) { try parse(nested(16), maxDepth: 16) }
        #expect(parseError(nested(17), maxDepth: 16)?.kind == .tooDeep)
        let arrays = String(repeating: "[", count: 33) + String(repeating: "]", count: 33)
        #expect(parseError(arrays)?.kind == .tooDeep, "the default limit is 32")
        #expect(throws: Never.self) { try parse(String(arrays.dropFirst().dropLast())) }
    }

    @Test("a request nested 17 levels deep is a bad request, 16 levels is fine")
    func requestDepth() {
        let sixteen = #"{"id":1,"op":"ping","x":"# + String(repeating: "[", count: 15) + String(repeating: "]", count: 15) + "}"
        let seventeen = #"{"id":1,"op":"ping","x":"# + String(repeating: "[", count: 16) + String(repeating: "]", count: 16) + "}"
        #expect(Request.decode(frame: Array(sixteen.utf8)) == .success(Request(id: .int(1), .ping)))
        guard case .failure(let e) = Request.decode(frame: Array(seventeen.utf8)) else {
            Issue.record("17 levels decoded")
            return
        }
        #expect(e.error.code == .badRequest)
    }

    @Test("duplicate keys are rejected at the second key, also in nested objects")
    func duplicateKeys() {
        let e = parseError(#"{"op":"ping","op":"freeze"}"#)
        #expect(e?.kind == .duplicateKey)
        #expect(e?.offset == 13)
        #expect(parseError(#"{"a":{"x":1,"x":1}}"#)?.kind == .duplicateKey)
        #expect(parseError(#"{"a\u0062":1,"ab":2}"#)?.kind == .duplicateKey, "keys compare after unescaping")
        #expect(throws: Never.self) { try parse(#"{"a":{"x":1},"b":{"x":1}}"#) }
    }

    @Test("anything but white space after the value is trailing data")
    func trailingData() {
        #expect(parseError(#"{"id":1} {"id":2}"#)?.kind == .trailingData)
        #expect(parseError(#"{"id":1}x"#)?.kind == .trailingData)
        #expect(parseError("1 2")?.kind == .trailingData)
        #expect(parseError("[]]")?.kind == .trailingData)
    }

    @Test("structural mistakes are rejected", arguments: [
        "", " ", "{", "[", #"{"a"}"#, #"{"a":}"#, #"{"a":1,}"#, "[1,]", "[1 2]", #"{a:1}"#, #"{'a':1}"#,
        #""open"#, "tru", "nul", "True", "[,1]", #"{"a":1"#, "{,}",
    ])
    func structuralErrors(_ text: String) {
        #expect(parseError(text) != nil, "\(text.debugDescription) must not parse")
    }

    @Test("truncated input reports unexpectedEnd")
    func unexpectedEnd() {
        #expect(parseError("")?.kind == .unexpectedEnd)
        #expect(parseError(#"{"a":"#)?.kind == .unexpectedEnd)
        #expect(parseError(#"{"a":"xy"#)?.kind == .unexpectedEnd)
        #expect(parseError("nul")?.kind == .unexpectedEnd)
    }

    @Test("parse errors describe the problem and the byte offset")
    func errorDescriptions() {
        let e = parseError(#"{"id":1,"op":"ping","op":"x"}"#)
        #expect(e?.description == "duplicate object key at byte 20")
        #expect(parseError("[1,x]")?.description == "unexpected character at byte 3")
    }
}
