// qemu-ga's wire dialect, so that hosts that drive qemu-guest-agent (libvirt, Proxmox) can
// drive quiesced unchanged: QMP-style commands in, `return`/`error` objects out.
//
//   → {"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":["/srv"]},"id":7}
//   ← {"return":1,"id":7}
//   ← {"error":{"class":"GenericError","desc":"…"},"id":7}
//
// Framing is qemu-ga's: a stream of JSON objects with or without newlines between them (libvirt
// ends every command with one, old Proxmox releases send none; see FrameDecoder's value mode),
// up to 16 MiB each, and 0xFF resets the parser. `guest-sync-delimited` replies are preceded by
// a 0xFF byte, so a client can skip whatever an earlier client left unread.

public enum QGA {
    /// The commands this dialect implements: the ones hosts use around snapshots.
    public enum CommandName: String, Sendable, CaseIterable {
        case sync = "guest-sync"
        case syncDelimited = "guest-sync-delimited"
        case ping = "guest-ping"
        case info = "guest-info"
        case fsfreezeStatus = "guest-fsfreeze-status"
        case fsfreezeFreeze = "guest-fsfreeze-freeze"
        case fsfreezeFreezeList = "guest-fsfreeze-freeze-list"
        case fsfreezeThaw = "guest-fsfreeze-thaw"
    }

    /// A decoded command with its arguments checked.
    public enum Command: Sendable, Equatable {
        /// Echo `id`; with `delimited`, the reply is preceded by 0xFF.
        case sync(id: Int64, delimited: Bool)
        case ping
        case info
        case fsfreezeStatus
        /// `mountpoints` nil: every eligible filesystem in the agent's scope.
        case fsfreezeFreeze(mountpoints: [String]?)
        case fsfreezeThaw

        public var name: CommandName {
            switch self {
            case .sync(_, let delimited): delimited ? .syncDelimited : .sync
            case .ping: .ping
            case .info: .info
            case .fsfreezeStatus: .fsfreezeStatus
            case .fsfreezeFreeze(let m): m == nil ? .fsfreezeFreeze : .fsfreezeFreezeList
            case .fsfreezeThaw: .fsfreezeThaw
            }
        }

        /// The command as a host sends it: `{"execute": NAME}`, with `"arguments"` when it has
        /// any (the sync's `id`, the freeze list's `mountpoints`). The inverse of `QGA.decode`.
        public var json: JSONObject {
            var o: JSONObject = ["execute": .string(name.rawValue)]
            switch self {
            case .sync(let id, _): o["arguments"] = ["id": .int(id)]
            case .fsfreezeFreeze(let mountpoints?): o["arguments"] = ["mountpoints": .array(mountpoints.map(JSON.string))]
            case .ping, .info, .fsfreezeStatus, .fsfreezeFreeze(nil), .fsfreezeThaw: break
            }
            return o
        }

        /// The command as one line (`json`, then "\n"): how libvirt and Proxmox frame it.
        public var line: [UInt8] { JSON.object(json).encodedLine() }
    }

    /// A qemu-ga error: its class (`GenericError`, `CommandNotFound`) and description.
    public struct Failure: Error, Sendable, Equatable {
        /// QMP's class of most errors.
        public static let genericError = "GenericError"
        /// QMP's class for a command that does not exist or is disabled.
        public static let commandNotFound = "CommandNotFound"

        public var errorClass: String
        public var desc: String

        public init(_ desc: String, errorClass: String = Failure.genericError) {
            self.errorClass = errorClass
            self.desc = desc
        }

        public var json: JSON { ["class": .string(errorClass), "desc": .string(desc)] }

        /// A refusal of quiesced's in this dialect: `GenericError` with the description
        /// `CODE: MESSAGE`, CODE one of section 8 (PROTOCOL.md section 12).
        public init(_ refusal: ProtocolError) {
            self.init("\(refusal.code): \(refusal.message)")
        }

        /// The refusal a description of that form carries (the inverse of `init(_:)`); nil for
        /// any other description, such as qemu-ga's own.
        public var refusal: ProtocolError? {
            guard errorClass == Failure.genericError, let colon = desc.firstIndex(of: ":") else { return nil }
            let code = ErrorCode(rawValue: String(desc[..<colon]))
            let rest = desc[desc.index(after: colon)...]
            guard ErrorCode.all.contains(code), rest.first == " " else { return nil }
            return ProtocolError(code, String(rest.dropFirst()))
        }
    }

    /// A decoded command and the request's `id` (echoed in the reply).
    public struct Decoded: Sendable, Equatable {
        public var command: Command
        public var id: JSON?
    }

    /// A refused frame: the error to answer, and the request's `id` when it could be read.
    public struct Refusal: Error, Sendable, Equatable {
        public var failure: Failure
        public var id: JSON?
        /// The name of a well-formed command this dialect does not implement: one that an agent
        /// with a private qemu-ga behind it passes on instead of refusing.
        public var unknownCommand: String? = nil
    }

    /// Decodes one frame.
    public static func decode(frame: [UInt8]) -> Result<Decoded, Refusal> {
        func refuse(_ desc: String, _ id: JSON?, errorClass: String = Failure.genericError) -> Result<Decoded, Refusal> {
            .failure(Refusal(failure: Failure(desc, errorClass: errorClass), id: id))
        }
        func ok(_ command: Command, _ id: JSON?) -> Result<Decoded, Refusal> { .success(Decoded(command: command, id: id)) }
        let object: JSONObject
        do {
            guard case .object(let o) = try JSON.parse(frame, maxDepth: ProtocolLimits.maxDepth) else {
                return refuse("QMP input must be a JSON object", nil)
            }
            object = o
        } catch {
            return refuse("JSON parse error: \(error)", nil)
        }
        let id = object["id"]
        guard let execute = object["execute"] else {
            return refuse("QMP input lacks member 'execute'", id)
        }
        guard let name = execute.stringValue else {
            return refuse("QMP input member 'execute' must be a string", id)
        }
        let arguments: JSONObject
        switch object["arguments"] {
        case nil, .null?: arguments = [:]
        case .object(let a)?: arguments = a
        default: return refuse("QMP input member 'arguments' must be an object", id)
        }
        guard let known = CommandName(rawValue: name) else {
            return .failure(Refusal(failure: Failure("The command \(name) has not been found", errorClass: Failure.commandNotFound),
                                    id: id, unknownCommand: name))
        }
        switch known {
        case .sync, .syncDelimited:
            guard let v = arguments["id"] else { return refuse("Parameter 'id' is missing", id) }
            guard let n = v.intValue else {
                return refuse("Invalid parameter type for 'id', expected: integer", id)
            }
            return ok(.sync(id: n, delimited: known == .syncDelimited), id)
        case .ping: return ok(.ping, id)
        case .info: return ok(.info, id)
        case .fsfreezeStatus: return ok(.fsfreezeStatus, id)
        case .fsfreezeThaw: return ok(.fsfreezeThaw, id)
        case .fsfreezeFreeze: return ok(.fsfreezeFreeze(mountpoints: nil), id)
        case .fsfreezeFreezeList:
            switch arguments["mountpoints"] {
            case nil, .null?:
                return ok(.fsfreezeFreeze(mountpoints: nil), id)
            case .array(let items)?:
                let paths = items.compactMap(\.stringValue)
                guard paths.count == items.count, paths.allSatisfy({ !$0.isEmpty }) else {
                    return refuse("Invalid parameter type for 'mountpoints', expected: array of non-empty strings", id)
                }
                guard !paths.isEmpty else {
                    return refuse("'mountpoints' is empty: omit it to freeze every eligible filesystem", id)
                }
                guard paths.count <= 1024 else { return refuse("'mountpoints' has more than 1024 entries", id) }
                return ok(.fsfreezeFreeze(mountpoints: paths), id)
            default:
                return refuse("Invalid parameter type for 'mountpoints', expected: array", id)
            }
        }
    }

    /// `{"return": value}` with the request's id, as one line. A reply that would pass
    /// `ProtocolLimits.maxReplyBytes` becomes a `GenericError` saying so.
    public static func returnFrame(_ value: JSON, id: JSON?) -> [UInt8] {
        var o: JSONObject = ["return": value]
        if let id { o["id"] = id }
        let line = JSON.object(o).encodedLine()
        guard line.count - 1 <= ProtocolLimits.maxReplyBytes else {
            return errorFrame(Failure("the reply (\(line.count - 1) bytes) exceeds \(ProtocolLimits.maxReplyBytes) bytes"), id: id)
        }
        return line
    }

    /// `{"error": {"class": …, "desc": …}}` with the request's id, as one line. The description
    /// is cut to 4096 bytes, and an id that would make the line pass `maxReplyBytes` is dropped.
    public static func errorFrame(_ failure: Failure, id: JSON?) -> [UInt8] {
        var failure = failure
        if failure.desc.utf8.count > 4096 {
            failure.desc = String(decoding: failure.desc.utf8.prefix(4096), as: UTF8.self) + " (truncated)"
        }
        var o: JSONObject = ["error": failure.json]
        if let id { o["id"] = id }
        let line = JSON.object(o).encodedLine()
        if line.count - 1 > ProtocolLimits.maxReplyBytes { return JSON.object(["error": failure.json]).encodedLine() }
        return line
    }

    /// What `guest-info` lists: every implemented command, enabled.
    /// While `frozen`, the freeze commands are listed disabled, as qemu-ga lists them (qga/main.c
    /// disables every command outside its frozen-state allow list: ping, info, sync,
    /// sync-delimited, fsfreeze-status, fsfreeze-thaw); a host that reads guest-info sees what it
    /// would see with qemu-ga.
    public static func supportedCommands(frozen: Bool = false) -> JSON {
        .array(CommandName.allCases.map { c in
            let enabled = !frozen || (c != .fsfreezeFreeze && c != .fsfreezeFreezeList)
            return ["name": .string(c.rawValue), "enabled": .bool(enabled), "success-response": true]
        })
    }

    /// The names of the commands a `guest-info` answer lists as enabled (the reverse of
    /// `supportedCommands()`; an entry without `enabled` counts as enabled).
    public static func enabledCommands(info: JSON) -> [String] {
        (info["supported_commands"]?.arrayValue ?? []).compactMap { c in
            c["enabled"]?.boolValue == false ? nil : c["name"]?.stringValue
        }
    }

    /// `guest-fsfreeze-status`'s answer for a state: qemu-ga knows only these two.
    public static func freezeStatus(frozen: Bool) -> JSON { .string(frozen ? "frozen" : "thawed") }

    /// Whether a `guest-fsfreeze-status` answer says frozen.
    public static func isFrozen(status: JSON) -> Bool { status == freezeStatus(frozen: true) }
}
