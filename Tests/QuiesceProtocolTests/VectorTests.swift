// Checks every golden vector in protocol/vectors against the protocol code, and that the vectors cover the code.
import Foundation
import QuiesceProtocol
import Testing

// MARK: - Loading

/// Why a vector file could not be read as a vector.
struct VectorError: Error, CustomStringConvertible {
    let description: String
}

/// One file of protocol/vectors. The schema is documented in protocol/vectors/README.md.
struct Vector: Sendable, CustomTestStringConvertible {
    let file: String
    let object: JSONObject

    var testDescription: String { file }

    var name: String { object["name"]?.stringValue ?? "" }
    var kind: String { object["kind"]?.stringValue ?? "" }
    var op: String? { object["op"]?.stringValue }
    var resultType: String? { object["result_type"]?.stringValue }
    var expectDecoder: String { object["expect_decoder"]?.stringValue ?? "" }
    var json: JSON? { object["json"] }
    var reencoded: JSON? { object["reencoded"] }
    var expectErrorCode: String? { object["expect_error"]?["code"]?.stringValue }
    var expectErrorMessage: String? { object["expect_error"]?["message_contains"]?.stringValue }
    var isGenerated: Bool { object["frame_generate"] != nil }

    /// The error code this vector shows: an error reply's code, or what an invalid request gets.
    var errorCode: String? {
        if kind == "reply", json?["ok"]?.boolValue == false { return json?["error"]?["code"]?.stringValue }
        return expectErrorCode
    }

    /// The line's bytes, without the newline that ends it.
    func lineBytes() throws -> [UInt8] {
        if let frame = object["frame"] {
            guard let s = frame.stringValue else { throw VectorError(description: "\(file): \"frame\" is not a string") }
            return Array(s.utf8)
        }
        if let hex = object["frame_hex"] {
            guard let s = hex.stringValue, let bytes = Vector.bytes(hex: s) else {
                throw VectorError(description: "\(file): \"frame_hex\" is not an even-length hex string")
            }
            return bytes
        }
        if let generate = object["frame_generate"] {
            guard let byte = generate["byte"]?.stringValue, byte.utf8.count == 1,
                  let count = generate["count"]?.intValue, count >= 0
            else { throw VectorError(description: "\(file): \"frame_generate\" needs a one-byte \"byte\" and a \"count\"") }
            return [UInt8](repeating: byte.utf8.first!, count: Int(count))
        }
        throw VectorError(description: "\(file): no frame, frame_hex or frame_generate")
    }

    /// What goes on the wire: the line and its "\n" (unless frame_generate asks for none).
    func streamBytes() throws -> [UInt8] {
        var bytes = try lineBytes()
        if object["frame_generate"]?["newline"]?.boolValue != false { bytes.append(0x0A) }
        return bytes
    }

    static func bytes(hex: String) -> [UInt8]? {
        let digits = Array(hex.utf8)
        guard digits.count % 2 == 0 else { return nil }
        var out: [UInt8] = []
        out.reserveCapacity(digits.count / 2)
        var i = 0
        while i < digits.count {
            guard let hi = nibble(digits[i]), let lo = nibble(digits[i + 1]) else { return nil }
            out.append(hi << 4 | lo)
            i += 2
        }
        return out
    }

    private static func nibble(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): c - UInt8(ascii: "A") + 10
        default: nil
        }
    }
}

enum Vectors {
    /// protocol/vectors, found from this file: Tests/QuiesceProtocolTests/../../protocol/vectors.
    static let packageRoot: URL = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    static let directory: URL = packageRoot.appendingPathComponent("protocol").appendingPathComponent("vectors")

    static let loaded: Result<[Vector], VectorError> = load()

    /// Every vector, sorted by file name (empty when loading failed: `vectorsLoad` reports why).
    static var all: [Vector] { (try? loaded.get()) ?? [] }

    static func load() -> Result<[Vector], VectorError> {
        let files: [String]
        do {
            files = try FileManager.default.contentsOfDirectory(atPath: directory.path)
                .filter { $0.hasSuffix(".json") }.sorted()
        } catch {
            return .failure(VectorError(description: "cannot list \(directory.path): \(error)"))
        }
        var vectors: [Vector] = []
        for file in files {
            guard let data = FileManager.default.contents(atPath: directory.appendingPathComponent(file).path) else {
                return .failure(VectorError(description: "cannot read \(file)"))
            }
            do {
                guard case .object(let o) = try JSON.parse([UInt8](data), maxDepth: 64) else {
                    return .failure(VectorError(description: "\(file) is not a JSON object"))
                }
                vectors.append(Vector(file: file, object: o))
            } catch {
                return .failure(VectorError(description: "\(file) is not valid JSON: \(error)"))
            }
        }
        return .success(vectors)
    }

    /// Feeds bytes to a fresh decoder in one call and takes every event out.
    static func decode(_ bytes: [UInt8]) -> [FrameEvent] {
        var decoder = FrameDecoder()
        decoder.feed(bytes)
        var events: [FrameEvent] = []
        while let e = decoder.next() { events.append(e) }
        return events
    }

    /// The typed result each operation's success reply carries (nil: a plain object).
    static let resultTypeOfOp: [String: String?] = [
        "hello": "HelloResult", "ping": nil, "status": "StatusResult", "filesystems": "FilesystemsResult",
        "freeze": "FreezeResult", "thaw": "ThawResult", "sync": "SyncResult", "keepalive": "StatusResult",
    ]

    static let resultTypes: [String: any WireObject.Type] = [
        "HelloResult": HelloResult.self, "FilesystemsResult": FilesystemsResult.self, "FreezeResult": FreezeResult.self,
        "ThawResult": ThawResult.self, "SyncResult": SyncResult.self, "StatusResult": StatusResult.self,
        "FilesystemReport": FilesystemReport.self, "SkippedReport": SkippedReport.self, "HookReport": HookReport.self,
        "AutoThawReport": AutoThawReport.self,
    ]
}

/// The frame a vector's bytes decode to, checked against `expect_decoder`; nil when there is none (too-large).
private func payload(of v: Vector) throws -> [UInt8]? {
    let line = try v.lineBytes()
    let events = Vectors.decode(try v.streamBytes())
    /// The line as a frame: one trailing "\r" removed.
    func stripped(_ bytes: ArraySlice<UInt8>) -> [UInt8] { Array(bytes.last == 0x0D ? bytes.dropLast() : bytes) }
    switch v.expectDecoder {
    case "frame":
        guard events.count == 1, case .frame(let frame) = events[0] else {
            Issue.record("\(v.file): expected one frame, the decoder gave \(events.map(describe))")
            return nil
        }
        #expect(frame == stripped(line[...]), "\(v.file): the frame is the line without its trailing CR")
        return frame
    case "reset":
        guard events.count == 2, case .reset(let dropped) = events[0], case .frame(let frame) = events[1],
              let ff = line.firstIndex(of: 0xFF)
        else {
            Issue.record("\(v.file): expected a reset then a frame, the decoder gave \(events.map(describe))")
            return nil
        }
        #expect(dropped == ff, "\(v.file): the reset drops the bytes before 0xFF")
        #expect(frame == stripped(line[(ff + 1)...]), "\(v.file): the frame is what follows 0xFF")
        return frame
    case "too-large":
        let tooLarge = events.filter { if case .tooLarge = $0 { true } else { false } }
        let frames = events.filter { if case .frame = $0 { true } else { false } }
        #expect(tooLarge.count == 1, "\(v.file): \(events.map(describe))")
        #expect(frames.isEmpty, "\(v.file): an oversized line must never come out as a frame")
        return nil
    default:
        Issue.record("\(v.file): unknown expect_decoder \"\(v.expectDecoder)\"")
        return nil
    }
}

func describe(_ e: FrameEvent) -> String {
    switch e {
    case .frame(let b): "frame(\(b.count) bytes)"
    case .tooLarge(let n): "tooLarge(\(n))"
    case .reset(let n): "reset(\(n))"
    }
}

// MARK: - Each vector against the code

@Suite("Golden vectors")
struct VectorTests {
    @Test("the vector directory loads and holds at least 40 vectors")
    func vectorsLoad() throws {
        let vectors = try Vectors.loaded.get()
        #expect(vectors.count >= 40)
    }

    @Test("every vector follows the schema", arguments: Vectors.all)
    func schema(_ v: Vector) throws {
        #expect(v.file == v.name + ".json", "the file is named after the vector")
        #expect(v.object["description"]?.stringValue?.isEmpty == false)
        #expect(["request", "reply", "event", "invalid-request"].contains(v.kind))
        #expect(["frame", "too-large", "reset"].contains(v.expectDecoder))
        let sources = ["frame", "frame_hex", "frame_generate"].filter { v.object[$0] != nil }
        #expect(sources.count == 1, "exactly one of frame, frame_hex, frame_generate")
        #expect(!(try v.lineBytes()).contains(0x0A), "a frame never contains a newline byte")
        let prefix = v.kind == "invalid-request" ? "invalid" : v.kind
        #expect(v.name.hasPrefix(prefix + "-"), "names start with their kind")
        switch v.kind {
        case "invalid-request":
            #expect(v.expectErrorCode != nil && v.expectErrorMessage != nil)
            #expect(v.json == nil)
        case "request":
            #expect(v.op != nil && v.json != nil)
        case "reply":
            #expect(v.json != nil)
            if v.json?["ok"]?.boolValue == true {
                let op = try #require(v.op, "success replies name their op")
                let expected = try #require(Vectors.resultTypeOfOp[op], "unknown op \(op)")
                #expect(v.resultType == expected, "\(op) replies carry \(expected ?? "a plain object")")
            } else {
                #expect(v.resultType == nil)
            }
        default:
            #expect(v.json != nil)
        }
        if let op = v.op { #expect(OperationName(rawValue: op) != nil, "\(op) is an operation") }
    }

    @Test("request vectors decode to their op and re-encode to their JSON",
          arguments: Vectors.all.filter { $0.kind == "request" })
    func request(_ v: Vector) throws {
        guard let frame = try payload(of: v) else { return }
        let json = try #require(v.json)
        #expect(try JSON.parse(frame, maxDepth: 64) == json, "\"json\" is the frame's decoded value")
        let request: Request
        switch Request.decode(frame: frame) {
        case .success(let r): request = r
        case .failure(let e): Issue.record("\(v.file) did not decode: \(e.error)"); return
        }
        #expect(request.operation.name.rawValue == v.op)
        #expect(request.id == json["id"], "the id is kept as sent")
        #expect(request.json == (v.reencoded ?? json), "re-encoding gives the vector's JSON (or its \"reencoded\" form)")
        #expect(Request.decode(frame: request.json.encoded()) == .success(request), "the re-encoded form decodes to the same request")
    }

    @Test("reply vectors decode, also as their typed result, and re-encode byte for byte",
          arguments: Vectors.all.filter { $0.kind == "reply" })
    func reply(_ v: Vector) throws {
        guard let frame = try payload(of: v) else { return }
        let json = try #require(v.json)
        #expect(try JSON.parse(frame) == json)
        guard case .reply(let reply) = try AgentMessage.decode(frame: frame) else {
            Issue.record("\(v.file) decoded as an event")
            return
        }
        #expect(reply.json == json)
        if json["id"] == .null { #expect(reply.id == nil, "a null id decodes as no id") }
        let line = String(decoding: frame, as: UTF8.self)
        #expect(reply.json.text == line, "the encoder writes exactly the vector's line")
        #expect(reply.frame == frame + [0x0A])
        switch reply.outcome {
        case .success(let result):
            guard let typeName = v.resultType else {
                #expect(v.op == "ping")
                return
            }
            let type = try #require(Vectors.resultTypes[typeName], "unknown result_type \(typeName)")
            let typed = try type.init(json: result)
            #expect(JSON.object(typed.json) == JSON.object(result), "the typed struct re-encodes to the same object")
            #expect(Reply(id: reply.id, result: typed.json).json.text == line, "and to the same bytes")
            try checkSemantics(of: typed, in: v)
        case .failure(let error):
            #expect(ErrorCode.all.contains(error.code), "\(error.code) is in ErrorCode.all")
            #expect(!error.message.isEmpty)
            #expect(Reply(id: reply.id, error: error).json.text == line)
        }
    }

    /// Facts the spec states about results, checked on the vectors so the examples stay truthful.
    private func checkSemantics(of typed: any WireObject, in v: Vector) throws {
        if let r = typed as? FreezeResult {
            let waves = r.filesystems.compactMap(\.wave)
            #expect(waves == waves.sorted(), "\(v.file): filesystems are listed in freeze order (wave 0 first)")
            let lastFrozen = r.filesystems.compactMap(\.frozenAtUs).max() ?? 0
            #expect(r.stallUs == lastFrozen, "\(v.file): stall_us ends when the last filesystem is frozen")
            #expect(r.timeoutMs >= 1 && r.timeoutMs <= Request.maxTimeoutMs)
            for fs in r.filesystems { #expect(fs.freezeUs != nil && fs.frozenAtUs != nil) }
        }
        if let r = typed as? ThawResult {
            let waves = r.filesystems.compactMap(\.wave)
            #expect(waves == waves.sorted(by: >), "\(v.file): thaw runs the waves in reverse")
            if !r.wasFrozen { #expect(r.filesystems.isEmpty) }
        }
        if let r = typed as? StatusResult {
            if r.state == .thawed { #expect(r.opID == nil && r.filesystems.isEmpty) }
            if r.state == .frozen { #expect(r.opID != nil && r.deadlineMs != nil) }
        }
        if let r = typed as? HelloResult {
            #expect(r.version >= ProtocolVersion.oldestSupported && r.version <= ProtocolVersion.current)
            #expect(r.maxFrame == Int64(ProtocolLimits.maxFrameBytes))
        }
    }

    @Test("event vectors decode as events and match Event.thawed", arguments: Vectors.all.filter { $0.kind == "event" })
    func event(_ v: Vector) throws {
        guard let frame = try payload(of: v) else { return }
        let json = try #require(v.json)
        guard case .event(let event) = try AgentMessage.decode(frame: frame) else {
            Issue.record("\(v.file) decoded as a reply")
            return
        }
        #expect(event.json == json)
        #expect(event.json.text == String(decoding: frame, as: UTF8.self))
        #expect(event.name == Event.thawedName)
        let reason = try #require(event.thawReason)
        #expect(ThawReason.all.contains(reason), "\(v.file): reason \(reason) is not one protocol version 1 defines")
        let rebuilt = Event.thawed(
            opID: try #require(event.fields["op_id"]?.stringValue), reason: reason,
            atMs: try #require(event.fields["at_ms"]?.intValue),
            filesystems: try #require(event.fields["filesystems"]?.arrayValue).compactMap(\.stringValue),
            errors: (event.fields["errors"]?.arrayValue ?? []).compactMap(\.stringValue))
        #expect(rebuilt.frame == frame + [0x0A], "Event.thawed writes exactly the vector's line")
    }

    @Test("invalid requests give exactly the expected error", arguments: Vectors.all.filter { $0.kind == "invalid-request" })
    func invalidRequest(_ v: Vector) throws {
        let code = try #require(v.expectErrorCode)
        let contains = try #require(v.expectErrorMessage)
        #expect(ErrorCode.all.contains(ErrorCode(rawValue: code)))
        guard let frame = try payload(of: v) else {
            #expect(v.expectDecoder == "too-large")
            #expect(code == ErrorCode.frameTooLarge.rawValue, "an oversized line is answered frame-too-large")
            return
        }
        let failure: RequestDecodeError
        switch Request.decode(frame: frame) {
        case .success(let r): Issue.record("\(v.file) decoded as \(r.operation.name)"); return
        case .failure(let f): failure = f
        }
        #expect(failure.error.code.rawValue == code)
        #expect(failure.error.message.contains(contains), "message: \(failure.error.message)")
        if let id = v.object["expect_id"] {
            #expect((failure.id ?? .null) == id, "the error reply echoes the id")
        } else {
            #expect(failure.id == nil, "no readable id: the error reply's id is null")
        }
        // The error reply the agent would send is itself a valid reply.
        let reply = Reply(id: failure.id, error: failure.error)
        #expect(try AgentMessage.decode(frame: reply.json.encoded()) == .reply(reply))
    }
}

// MARK: - Coverage: spec and code cannot drift apart

@Suite("Vector coverage")
struct VectorCoverageTests {
    let vectors = Vectors.all

    @Test("every error code in ErrorCode.all has an error reply vector")
    func everyErrorCodeHasAReply() {
        let shown = Set(vectors.filter { $0.kind == "reply" }.compactMap(\.errorCode))
        for code in ErrorCode.all { #expect(shown.contains(code.rawValue), "no reply-error vector for \(code)") }
    }

    @Test("vectors use no error code outside ErrorCode.all")
    func noUndefinedErrorCodes() {
        let defined = Set(ErrorCode.all.map(\.rawValue))
        for v in vectors { if let code = v.errorCode { #expect(defined.contains(code), "\(v.file) uses \(code)") } }
    }

    @Test("every operation has a request vector and a success reply vector")
    func everyOperationHasVectors() {
        let requested = Set(vectors.filter { $0.kind == "request" }.compactMap(\.op))
        let answered = Set(vectors.filter { $0.kind == "reply" && $0.json?["ok"]?.boolValue == true }.compactMap(\.op))
        for op in OperationName.allCases {
            #expect(requested.contains(op.rawValue), "no request vector for \(op)")
            #expect(answered.contains(op.rawValue), "no reply vector for \(op)")
        }
        #expect(Set(Vectors.resultTypeOfOp.keys) == Set(OperationName.allCases.map(\.rawValue)))
    }

    @Test("every thaw reason has an event vector")
    func everyThawReasonHasAnEvent() {
        let reasons = Set(vectors.filter { $0.kind == "event" }.compactMap { $0.json?["reason"]?.stringValue })
        for reason in ThawReason.all { #expect(reasons.contains(reason.rawValue), "no event vector for \(reason)") }
    }

    @Test("every agent state has a status reply vector")
    func everyStateHasAStatus() {
        let states = Set(vectors.filter { $0.resultType == "StatusResult" && $0.op == "status" }
            .compactMap { $0.json?["result"]?["state"]?.stringValue })
        for state in AgentStateName.allCases { #expect(states.contains(state.rawValue), "no status vector for \(state)") }
    }

    @Test("every decoder outcome has a vector")
    func everyDecoderOutcome() {
        let outcomes = Set(vectors.map(\.expectDecoder))
        #expect(outcomes == ["frame", "too-large", "reset"])
    }

    @Test("PROTOCOL.md names every error code, operation, thaw reason, state, skip reason and hook phase")
    func specNamesEverything() throws {
        let url = Vectors.packageRoot.appendingPathComponent("protocol").appendingPathComponent("PROTOCOL.md")
        let data = try #require(FileManager.default.contents(atPath: url.path), "protocol/PROTOCOL.md is missing")
        let spec = String(decoding: data, as: UTF8.self)
        let names = ErrorCode.all.map(\.rawValue) + OperationName.allCases.map(\.rawValue)
            + ThawReason.all.map(\.rawValue) + AgentStateName.allCases.map(\.rawValue)
            + SkipReason.all.map(\.rawValue) + HookPhase.all.map(\.rawValue)
        for name in names { #expect(spec.contains("`\(name)`"), "PROTOCOL.md does not mention `\(name)`") }
        #expect(spec.contains("\(ProtocolLimits.maxFrameBytes)"))
        #expect(spec.contains("\(ProtocolLimits.maxDepth)"))
        #expect(spec.contains("\(Request.maxTimeoutMs)"))
    }

    @Test("every JSON line in PROTOCOL.md's examples is a valid request, reply or event")
    func specExamplesAreValid() throws {
        let url = Vectors.packageRoot.appendingPathComponent("protocol").appendingPathComponent("PROTOCOL.md")
        let data = try #require(FileManager.default.contents(atPath: url.path), "protocol/PROTOCOL.md is missing")
        let lines = String(decoding: data, as: UTF8.self).split(separator: "\n")
            .filter { $0.hasPrefix("{\"") && !$0.contains("...") }
        #expect(lines.count >= 10)
        for line in lines {
            let frame = Array(line.utf8)
            let json = try JSON.parse(frame, maxDepth: ProtocolLimits.maxDepth)
            if json["op"] != nil {
                if case .failure(let e) = Request.decode(frame: frame), json["op"] != "frobnicate" {
                    Issue.record("PROTOCOL.md example \(line) is refused: \(e.error)")
                }
            } else {
                #expect(throws: Never.self, "PROTOCOL.md example \(line)") { try AgentMessage.decode(frame: frame) }
                if let result = json["result"]?.objectValue, result["state"] != nil {
                    #expect(throws: Never.self) { try StatusResult(json: result) }
                }
                if let result = json["result"]?.objectValue, result["stall_us"] != nil {
                    #expect(throws: Never.self) { try FreezeResult(json: result) }
                }
            }
        }
    }
}
