// Requests, replies and events of protocol version 1, with their JSON forms.

/// Protocol versions. A peer announces its version in `hello`; both speak the lower one.
public enum ProtocolVersion {
    public static let current: Int64 = 1
    public static let oldestSupported: Int64 = 1
}

/// The release number of quiesced and quiescectl alike (their `--version`, `hello`, qemu-ga's
/// `guest-info`). packaging/debian/changelog carries the same number; `scripts/check-deb`
/// fails when the packaged binaries report another one.
public enum QuiesceRelease {
    public static let version = "0.1.0"
}

/// How a freeze relates to the connection that asked for it.
public enum FreezeMode: String, Sendable, Equatable {
    /// Thawed when the requesting connection closes (and at the deadline).
    case bound
    /// Lasts until `thaw` or the deadline, whatever happens to the connection.
    case detached
}

/// Every operation of protocol version 1, by its wire name.
public enum OperationName: String, Sendable, CaseIterable {
    case hello, ping, status, filesystems, freeze, thaw, sync, keepalive
}

/// A decoded request: an id echoed in the reply, and a typed operation.
public struct Request: Sendable, Equatable {
    public var id: JSON?
    public var operation: Operation

    public init(id: JSON?, _ operation: Operation) {
        self.id = id
        self.operation = operation
    }

    public enum Operation: Sendable, Equatable {
        case hello(version: Int64, client: String?, capabilities: [String])
        case ping
        case status
        /// What a freeze would touch, in freeze order (`mounts` previews an explicit list).
        case filesystems(mounts: [String]?)
        case freeze(FreezeRequest)
        /// Thaws the current freeze; with `opID`, only if that operation holds it.
        case thaw(opID: String?)
        case sync(mounts: [String]?)
        /// Pushes the current freeze's deadline to now + timeout (capped by the agent's maximum).
        case keepalive(opID: String?, timeoutMs: Int64?)

        public var name: OperationName {
            switch self {
            case .hello: .hello
            case .ping: .ping
            case .status: .status
            case .filesystems: .filesystems
            case .freeze: .freeze
            case .thaw: .thaw
            case .sync: .sync
            case .keepalive: .keepalive
            }
        }
    }
}

public struct FreezeRequest: Sendable, Equatable {
    /// Exactly these mountpoints; nil means every eligible filesystem in the agent's scope.
    public var mounts: [String]?
    /// Thaw by itself after this long; nil means the agent's maximum.
    public var timeoutMs: Int64?
    /// Names the operation: a repeated freeze with the same id returns the first result.
    public var opID: String?
    public var mode: FreezeMode

    public init(mounts: [String]? = nil, timeoutMs: Int64? = nil, opID: String? = nil, mode: FreezeMode = .bound) {
        self.mounts = mounts
        self.timeoutMs = timeoutMs
        self.opID = opID
        self.mode = mode
    }
}

/// A frame that is not a valid request, with the id to echo when one could be read.
public struct RequestDecodeError: Error, Sendable, Equatable {
    public var id: JSON?
    public var error: ProtocolError
    public init(id: JSON?, _ error: ProtocolError) { self.id = id; self.error = error }
}

// MARK: - Field access with precise errors

/// Typed access to a request object's fields: absent gives nil, a wrong type a `bad-request`.
struct Fields {
    let object: JSONObject

    func string(_ key: String, maxLength: Int = 4096) throws(ProtocolError) -> String? {
        guard let v = object[key], !v.isNull else { return nil }
        guard let s = v.stringValue else { throw ProtocolError(.badRequest, "\"\(key)\" must be a string") }
        guard s.utf8.count <= maxLength else {
            throw ProtocolError(.badRequest, "\"\(key)\" is longer than \(maxLength) bytes")
        }
        return s
    }

    /// `op_id`: absent, or 1 to 128 bytes with no control character (PROTOCOL.md section 6.5);
    /// an empty name would let a freeze be held under no name at all, and the name reaches
    /// hooks (QUIESCE_OP_ID), logs and the host's terminal.
    func opID() throws(ProtocolError) -> String? {
        guard let s = try string("op_id", maxLength: .max) else { return nil }
        guard ProtocolLimits.opIDBytes.contains(s.utf8.count) else {
            let r = ProtocolLimits.opIDBytes
            throw ProtocolError(.badRequest, "\"op_id\" must be \(r.lowerBound) to \(r.upperBound) bytes (it is \(s.utf8.count))")
        }
        if let c = OpID.controlCharacter(in: s) {
            throw ProtocolError(.badRequest, "\"op_id\" must not contain control characters (it has U+\(c))")
        }
        return s
    }

    func int(_ key: String, min: Int64 = 0, max: Int64 = Int64.max) throws(ProtocolError) -> Int64? {
        guard let v = object[key], !v.isNull else { return nil }
        guard let i = v.intValue else { throw ProtocolError(.badRequest, "\"\(key)\" must be an integer") }
        guard i >= min && i <= max else {
            throw ProtocolError(.badRequest, "\"\(key)\" must be between \(min) and \(max)")
        }
        return i
    }

    func bool(_ key: String) throws(ProtocolError) -> Bool? {
        guard let v = object[key], !v.isNull else { return nil }
        guard let b = v.boolValue else { throw ProtocolError(.badRequest, "\"\(key)\" must be true or false") }
        return b
    }

    func strings(_ key: String, maxCount: Int = 1024) throws(ProtocolError) -> [String]? {
        guard let v = object[key], !v.isNull else { return nil }
        guard let items = v.arrayValue else { throw ProtocolError(.badRequest, "\"\(key)\" must be an array of strings") }
        guard items.count <= maxCount else {
            throw ProtocolError(.badRequest, "\"\(key)\" has more than \(maxCount) items")
        }
        var out: [String] = []
        for item in items {
            guard let s = item.stringValue, !s.isEmpty else {
                throw ProtocolError(.badRequest, "\"\(key)\" must be an array of non-empty strings")
            }
            out.append(s)
        }
        return out
    }
}

// MARK: - Requests

extension Request {
    /// The longest timeout a request may name (one day); agents cap it further.
    public static let maxTimeoutMs: Int64 = 86_400_000

    /// Decodes a frame into a request. On failure the error carries the request's id when one
    /// could be read, so the reply can still echo it.
    public static func decode(frame: [UInt8]) -> Result<Request, RequestDecodeError> {
        let json: JSON
        do {
            json = try JSON.parse(frame, maxDepth: ProtocolLimits.maxDepth)
        } catch {
            return .failure(RequestDecodeError(id: nil, ProtocolError(.badRequest, "malformed JSON: \(error)")))
        }
        guard case .object(let object) = json else {
            return .failure(RequestDecodeError(id: nil, ProtocolError(.badRequest, "a request must be a JSON object")))
        }
        let id = object["id"]
        if let id, !Request.isValidID(id) {
            return .failure(RequestDecodeError(id: nil, ProtocolError(.badRequest, "\"id\" must be a string, an integer or null")))
        }
        do {
            return .success(try Request(object: object, id: id))
        } catch {
            return .failure(RequestDecodeError(id: id, error))
        }
    }

    static func isValidID(_ id: JSON) -> Bool {
        switch id {
        case .null, .int: return true
        case .string(let s): return s.utf8.count <= 256
        default: return false
        }
    }

    init(object: JSONObject, id: JSON?) throws(ProtocolError) {
        let f = Fields(object: object)
        guard let opName = try f.string("op", maxLength: 64) else {
            throw ProtocolError(.badRequest, "missing \"op\"")
        }
        guard let op = OperationName(rawValue: opName) ?? (opName == "extend" ? .keepalive : nil) else {
            throw ProtocolError(.unknownOp, "unknown operation \"\(opName)\"", details: ["op": .string(opName)])
        }
        self.id = id
        switch op {
        case .hello:
            guard let version = try f.int("version", min: Int64.min) else {
                throw ProtocolError(.badRequest, "hello needs \"version\"")
            }
            if version < ProtocolVersion.oldestSupported {
                throw ProtocolError(
                    .unsupportedVersion,
                    "protocol version \(version) is not supported (versions \(ProtocolVersion.oldestSupported) to \(ProtocolVersion.current) are)",
                    details: ["min_version": .int(ProtocolVersion.oldestSupported), "max_version": .int(ProtocolVersion.current)])
            }
            operation = .hello(version: version, client: try f.string("client", maxLength: 256),
                               capabilities: try f.strings("capabilities", maxCount: 64) ?? [])
        case .ping: operation = .ping
        case .status: operation = .status
        case .filesystems: operation = .filesystems(mounts: try f.strings("mounts"))
        case .freeze:
            var mode = FreezeMode.bound
            if let m = try f.string("mode", maxLength: 32) {
                guard let parsed = FreezeMode(rawValue: m) else {
                    throw ProtocolError(.badRequest, "\"mode\" must be \"bound\" or \"detached\"")
                }
                mode = parsed
            }
            let mounts = try f.strings("mounts")
            if let mounts, mounts.isEmpty {
                throw ProtocolError(.badRequest, "\"mounts\" is empty: omit it to freeze every eligible filesystem")
            }
            operation = .freeze(FreezeRequest(
                mounts: mounts,
                timeoutMs: try f.int("timeout_ms", min: 1, max: Request.maxTimeoutMs),
                opID: try f.opID(),
                mode: mode))
        case .thaw: operation = .thaw(opID: try f.opID())
        case .sync: operation = .sync(mounts: try f.strings("mounts"))
        case .keepalive:
            operation = .keepalive(opID: try f.opID(),
                                   timeoutMs: try f.int("timeout_ms", min: 1, max: Request.maxTimeoutMs))
        }
    }

    /// The request's wire form.
    public var json: JSON {
        var o = JSONObject()
        if let id { o["id"] = id }
        o["op"] = .string(operation.name.rawValue)
        switch operation {
        case .hello(let version, let client, let capabilities):
            o["version"] = .int(version)
            if let client { o["client"] = .string(client) }
            o["capabilities"] = .array(capabilities.map(JSON.string))
        case .ping, .status: break
        case .filesystems(let mounts), .sync(let mounts):
            if let mounts { o["mounts"] = .array(mounts.map(JSON.string)) }
        case .freeze(let r):
            if let m = r.mounts { o["mounts"] = .array(m.map(JSON.string)) }
            if let t = r.timeoutMs { o["timeout_ms"] = .int(t) }
            if let op = r.opID { o["op_id"] = .string(op) }
            o["mode"] = .string(r.mode.rawValue)
        case .thaw(let opID):
            if let opID { o["op_id"] = .string(opID) }
        case .keepalive(let opID, let timeoutMs):
            if let opID { o["op_id"] = .string(opID) }
            if let timeoutMs { o["timeout_ms"] = .int(timeoutMs) }
        }
        return .object(o)
    }
}

// MARK: - Replies and events

/// A reply to one request: a result object, or an error.
public struct Reply: Sendable, Equatable {
    public var id: JSON?
    public var outcome: Result<JSONObject, ProtocolError>

    public init(id: JSON?, result: JSONObject) { self.id = id; outcome = .success(result) }
    public init(id: JSON?, error: ProtocolError) { self.id = id; outcome = .failure(error) }

    public var json: JSON {
        var o = JSONObject()
        o["id"] = id ?? .null
        switch outcome {
        case .success(let result):
            o["ok"] = true
            o["result"] = .object(result)
        case .failure(let error):
            o["ok"] = false
            o["error"] = error.json
        }
        return .object(o)
    }

    /// The frame bytes to send: the compact JSON followed by "\n", fitted to the reply limits
    /// (`ReplyBudget`: lists of at most 1024 items, at most `maxReplyBytes` bytes).
    public var frame: [UInt8] {
        switch outcome {
        case .success(let result):
            return ReplyBudget.frame(body: result) { Reply(id: id, result: $0).json }
        case .failure(let error):
            var shortened = error
            if shortened.message.utf8.count > 4096 {
                shortened.message = String(decoding: shortened.message.utf8.prefix(4096), as: UTF8.self) + " (message truncated)"
            }
            return ReplyBudget.frame(body: shortened.details ?? [:]) { details in
                var e = shortened
                e.details = details.count == 0 ? nil : details
                return Reply(id: id, error: e).json
            }
        }
    }
}

/// A message the agent pushes without a request (after `hello`).
public struct Event: Sendable, Equatable {
    public var name: String
    public var fields: JSONObject

    public init(name: String, fields: JSONObject) {
        self.name = name
        self.fields = fields
    }

    /// The agent thawed: `reason` says why; `filesystems` lists what was thawed.
    public static func thawed(opID: String, reason: ThawReason, atMs: Int64, filesystems: [String], errors: [String] = []) -> Event {
        var f: JSONObject = [
            "op_id": .string(opID), "reason": .string(reason.rawValue), "at_ms": .int(atMs),
            "filesystems": .array(filesystems.map(JSON.string)),
        ]
        if !errors.isEmpty { f["errors"] = .array(errors.map(JSON.string)) }
        return Event(name: Event.thawedName, fields: f)
    }

    /// The name of the `thawed` event, the one event protocol version 1 defines.
    public static let thawedName = "thawed"

    /// For a `thawed` event, its reason (`ThawReason`); nil for other events or when it names none.
    public var thawReason: ThawReason? {
        guard name == Event.thawedName else { return nil }
        return fields["reason"]?.stringValue.map(ThawReason.init(rawValue:))
    }

    public var json: JSON {
        var o = JSONObject()
        o["event"] = .string(name)
        for (k, v) in fields where k != "event" { o[k] = v }
        return .object(o)
    }

    /// The frame bytes to send, fitted to the reply limits like a reply's (`ReplyBudget`).
    public var frame: [UInt8] {
        ReplyBudget.frame(body: fields) { Event(name: name, fields: $0).json }
    }
}

/// What a client can receive: a reply or an event.
public enum AgentMessage: Sendable, Equatable {
    case reply(Reply)
    case event(Event)

    /// Decodes one frame received from an agent.
    public static func decode(frame: [UInt8]) throws(ProtocolError) -> AgentMessage {
        let json: JSON
        do {
            json = try JSON.parse(frame, maxDepth: ProtocolLimits.maxDepth)
        } catch {
            throw ProtocolError(.badRequest, "agent sent malformed JSON: \(error)")
        }
        guard case .object(let o) = json else { throw ProtocolError(.badRequest, "agent sent a non-object") }
        if let name = o["event"]?.stringValue {
            var fields = o
            fields["event"] = nil
            return .event(Event(name: name, fields: fields))
        }
        guard let ok = o["ok"]?.boolValue else {
            throw ProtocolError(.badRequest, "agent reply has no \"ok\"")
        }
        let id = o["id"].flatMap { $0.isNull ? JSON?.none : $0 }
        if ok {
            guard let result = o["result"]?.objectValue else {
                throw ProtocolError(.badRequest, "agent reply has no \"result\" object")
            }
            return .reply(Reply(id: id, result: result))
        }
        guard let error = o["error"] else { throw ProtocolError(.badRequest, "agent reply has no \"error\"") }
        return .reply(Reply(id: id, error: try ProtocolError(json: error)))
    }
}

/// Operation names (`op_id`), chosen by the host.
public enum OpID {
    /// The first control character (C0, DEL or C1; Unicode category Cc) in `s`, as four hex
    /// digits ("000A"), or nil: an op id has none (PROTOCOL.md section 6.5).
    public static func controlCharacter(in s: String) -> String? {
        guard let c = s.unicodeScalars.first(where: { $0.value < 0x20 || (0x7F...0x9F).contains($0.value) }) else { return nil }
        let hex = String(c.value, radix: 16, uppercase: true)
        return String(repeating: "0", count: 4 - hex.count) + hex
    }
}
