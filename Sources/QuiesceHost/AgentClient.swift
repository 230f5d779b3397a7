// Request/reply with one agent over a Connection: ids, timeouts, events, and the serial resync.
import QuiesceLinux
import QuiesceProtocol

/// A client for one agent. Not thread-safe: one thread owns it and issues requests one at a
/// time; another thread may only call `connection.shutdown()` to interrupt it.
public final class AgentClient {
    public let connection: Connection
    public var address: AgentAddress { connection.address }
    /// How long to wait for an ordinary reply.
    public let replyTimeoutMs: Int64
    /// The agent's answer to `hello`, once connected.
    public private(set) var hello: HelloResult?
    /// Events the agent pushed (e.g. "thawed"), in arrival order: the last `maxKeptEvents`, so an
    /// agent flooding events cannot grow this client's memory.
    public private(set) var events: [Event] = []
    /// Events dropped from the front of `events` to keep it bounded.
    public private(set) var droppedEvents = 0
    public static let maxKeptEvents = 64
    /// Frames that were skipped: replies to earlier clients (serial) or to abandoned requests.
    public private(set) var discardedFrames = 0
    /// Called for each event as it arrives, on the owning thread.
    public var onEvent: ((Event) -> Void)?

    /// The name sent in `hello`.
    public static let clientName = "quiescectl \(QuiesceRelease.version)"

    /// Replies may exceed the 64 KiB request limit (a freeze of hundreds of mounts): the
    /// client takes lines up to `ProtocolLimits.clientMaxFrameBytes` (1 MiB), as PROTOCOL.md asks.
    var decoder = FrameDecoder(maxFrameBytes: ProtocolLimits.clientMaxFrameBytes)
    private let idPrefix: String
    private var counter = 0
    private var isSerial: Bool { if case .serial = address { return true }; return false }
    /// The agent is qemu-ga, spoken to in its own protocol (QGAClient.swift).
    var isQGA: Bool { address.speaksQGA }

    init(connection: Connection, replyTimeoutMs: Int64) {
        self.connection = connection
        self.replyTimeoutMs = replyTimeoutMs
        // Unique across clients of the same serial port: stale replies never match our ids.
        idPrefix = "qc-\(CurrentProcess.id)-\(String(UInt64.random(in: 0...UInt64.max) & 0xFFFF_FFFF_FFFF, radix: 16))"
        decoder.feed(connection.handshakeLeftover)
    }

    /// Connects, resynchronises a serial port, says `hello` and checks the agent's answer.
    ///
    /// `qgaHandshake: false` skips qemu-ga's guest-info (`hello` stays nil), for a thaw: qemu-ga
    /// carries out one command at a time (qga/main.c), so while it is inside a freeze (a slow
    /// fsfreeze hook) it answers nothing, and a thaw sent only after guest-info's answer would
    /// never be sent. Written at once instead, it waits in the channel and is carried out as
    /// soon as the freeze returns. Other agents always get `hello`.
    ///
    /// `interrupted` ends a wait for room in a full backlog early (`Connection.open`).
    public static func connect(_ address: AgentAddress, connectTimeoutMs: Int64, replyTimeoutMs: Int64,
                               onConnection: ((Connection) -> Void)? = nil, qgaHandshake: Bool = true,
                               interrupted: () -> Bool = { false }) throws(AgentError) -> AgentClient {
        let connection = try Connection.open(address, timeoutMs: connectTimeoutMs, interrupted: interrupted)
        onConnection?(connection)
        let client = AgentClient(connection: connection, replyTimeoutMs: replyTimeoutMs)
        if !qgaHandshake && client.isQGA { return client }
        do {
            try client.sayHello()
        } catch {
            connection.close()
            throw error
        }
        return client
    }

    /// Closes the connection. A bound freeze held by it is thawed by the agent.
    public func close() { connection.close() }

    // MARK: - Operations

    private func helloRequest(id: String) -> Request {
        Request(id: .string(id), .hello(version: ProtocolVersion.current, client: AgentClient.clientName, capabilities: []))
    }

    func sayHello() throws(AgentError) {
        if isQGA {
            hello = try qgaHello()
            return
        }
        let outcome: Result<JSONObject, ProtocolError>
        if isSerial {
            outcome = try resynchronise()
        } else {
            let id = nextID()
            try send(helloRequest(id: id).json)
            outcome = try awaitReply(ids: [id], what: "hello", deadline: deadline(replyTimeoutMs), timeoutMs: replyTimeoutMs)
        }
        switch outcome {
        case .failure(let e) where e.code == .unsupportedVersion:
            throw AgentError(.incompatible, "\(address.spoken): the agent cannot speak protocol version \(ProtocolVersion.current): \(e.message)", remote: e)
        case .failure(let e):
            throw AgentError(.refused, "hello refused: \(e.code): \(e.message)", remote: e)
        case .success(let object):
            let result: HelloResult
            do { result = try HelloResult(json: object) } catch {
                throw AgentError(.protocolViolation, "\(address.spoken) sent an invalid hello result: \(error.message)")
            }
            guard result.version >= ProtocolVersion.oldestSupported && result.version <= ProtocolVersion.current else {
                throw AgentError(.incompatible, "\(address.spoken) speaks protocol version \(result.version); quiescectl speaks \(ProtocolVersion.oldestSupported)...\(ProtocolVersion.current)")
            }
            hello = result
        }
    }

    /// virtio-serial has no connection boundary: bytes of an earlier client may be waiting in
    /// either direction. Send 0xFF (the agent drops any partial line), then `hello` with a fresh
    /// id, and discard everything until the reply with that id. Repeat every second with a new
    /// id in case the first request was garbled, until the reply timeout.
    private func resynchronise() throws(AgentError) -> Result<JSONObject, ProtocolError> {
        let end = deadline(replyTimeoutMs)
        var ids: Set<String> = []
        while true {
            let id = nextID()
            ids.insert(id)
            try send([0xFF] + helloRequest(id: id).json.encodedLine())
            let step = min(end, deadline(1000))
            if let reply = try awaitReplyOrTimeout(ids: ids, what: "hello", deadline: step) {
                return reply
            }
            if monotonicNanos() >= end {
                throw AgentError(.timeout, "guest did not answer hello within \(TimeSpan(milliseconds: replyTimeoutMs).human) (\(address.spoken); is an agent running on the other side?)")
            }
        }
    }

    /// Sends one request and waits for its reply (`timeoutMs` overrides the reply timeout).
    /// An error reply becomes an `AgentError` with code `.refused` carrying the agent's error.
    public func request(_ operation: Request.Operation, timeoutMs: Int64? = nil) throws(AgentError) -> JSONObject {
        if isQGA { return try qgaRequest(operation, timeoutMs: timeoutMs ?? replyTimeoutMs) }
        let id = nextID()
        let wait = timeoutMs ?? replyTimeoutMs
        try send(Request(id: .string(id), operation).json)
        let name = operation.name.rawValue
        switch try awaitReply(ids: [id], what: name, deadline: deadline(wait), timeoutMs: wait) {
        case .success(let result): return result
        case .failure(let e):
            throw AgentError(.refused, "\(name) refused: \(e.code): \(e.message)", remote: e)
        }
    }

    public func ping() throws(AgentError) -> JSONObject { try request(.ping) }

    public func status() throws(AgentError) -> StatusResult { try decode(StatusResult.self, try request(.status), "status") }

    public func filesystems(mounts: [String]?) throws(AgentError) -> FilesystemsResult {
        try decode(FilesystemsResult.self, try request(.filesystems(mounts: mounts)), "filesystems")
    }

    public func freeze(_ r: FreezeRequest, replyTimeoutMs: Int64? = nil) throws(AgentError) -> FreezeResult {
        try decode(FreezeResult.self, try request(.freeze(r), timeoutMs: replyTimeoutMs), "freeze")
    }

    /// Thaws (the freeze `opID`, or any) and returns the agent's `ThawResult`.
    ///
    /// The agent replies only after the thaw hooks, which may run longer than the reply timeout
    /// (a database's thaw hook). When the reply timeout passes, the client asks `status` on the
    /// same connection (answered at once in every state, PROTOCOL.md section 5) and goes on
    /// waiting, one reply timeout at a time, for as long as status says this thaw is under way
    /// (`thawing`, by `opID`; or `freezing` by `opID`, a freeze this thaw is queued behind),
    /// up to `thawHooksWaitLimitMs` in all. So the reply, the only
    /// account of whether the freeze held until the thaw (a filesystem something else thawed
    /// first, a holding hook that ended), is read rather than guessed. Throws `.timeout` when
    /// status goes unanswered, the agent is not carrying out this thaw, or the limit passes.
    /// To qemu-ga, which answers nothing while it carries out a command, a plain request.
    public func thaw(opID: String?) throws(AgentError) -> ThawResult {
        if isQGA { return try decode(ThawResult.self, try request(.thaw(opID: opID)), "thaw") }
        let thawID = nextID()
        try send(Request(id: .string(thawID), .thaw(opID: opID)).json)
        let limit = deadline(AgentClient.thawHooksWaitLimitMs)
        var statusID: String?
        var thawSeenDone = false
        while true {
            let ids: Set<String> = statusID.map { [thawID, $0] } ?? [thawID]
            guard let (id, outcome) = try awaitIdentifiedReply(ids: ids, deadline: deadline(replyTimeoutMs)) else {
                let waited = TimeSpan.human(milliseconds: replyTimeoutMs)
                if statusID != nil {
                    throw AgentError(.timeout, "guest did not answer thaw within \(waited), nor status after it (\(address.spoken))")
                }
                if thawSeenDone {
                    throw AgentError(.timeout, "guest did not answer thaw within \(waited) after status said it was done (\(address.spoken))")
                }
                if monotonicNanos() >= limit {
                    throw AgentError(.timeout, "guest did not answer thaw within \(TimeSpan.human(milliseconds: AgentClient.thawHooksWaitLimitMs)): its thaw hooks were still running (\(address.spoken))")
                }
                let sid = nextID()
                try send(Request(id: .string(sid), .status).json)
                statusID = sid
                continue
            }
            if id == thawID {
                switch outcome {
                case .success(let object): return try decode(ThawResult.self, object, "thaw")
                case .failure(let e): throw AgentError(.refused, "thaw refused: \(e.code): \(e.message)", remote: e)
                }
            }
            statusID = nil
            guard case .success(let object) = outcome, let status = try? StatusResult(json: object) else {
                throw AgentError(.timeout, "guest did not answer thaw within \(TimeSpan.human(milliseconds: replyTimeoutMs)), and its status could not be read (\(address.spoken))")
            }
            // Hooks still running: the thaw's, or (over serial, where this thaw waits behind it)
            // those of this operation's freeze, which an undo is waiting to end.
            if status.state == .thawing && (opID == nil || status.opID == opID) { continue }
            if status.state == .freezing && opID != nil && status.opID == opID { continue }
            if status.state == .thawed || (opID != nil && status.opID != opID) {
                // Done by now: the reply is on its way. One more reply timeout for it.
                thawSeenDone = true
                continue
            }
            throw AgentError(.timeout, "guest did not answer thaw within \(TimeSpan.human(milliseconds: replyTimeoutMs)) and is not carrying it out (status: \(status.state.rawValue)\(status.opID.map { " by \($0)" } ?? "")) (\(address.spoken))")
        }
    }

    /// How long `thaw` goes on waiting for a reply while the agent says its thaw hooks are
    /// still running: 10 minutes, well past the agent's hook timeouts (30 s per hook phase by
    /// default), so only an agent that misreports its state reaches it.
    public static let thawHooksWaitLimitMs: Int64 = 600_000

    public func sync(mounts: [String]?, replyTimeoutMs: Int64? = nil) throws(AgentError) -> SyncResult {
        try decode(SyncResult.self, try request(.sync(mounts: mounts), timeoutMs: replyTimeoutMs), "sync")
    }

    public func keepalive(opID: String?, timeoutMs: Int64?, replyTimeoutMs: Int64? = nil) throws(AgentError) -> JSONObject {
        try request(.keepalive(opID: opID, timeoutMs: timeoutMs), timeoutMs: replyTimeoutMs)
    }

    private func decode<T: WireObject>(_ type: T.Type, _ object: JSONObject, _ what: String) throws(AgentError) -> T {
        do { return try T(json: object) } catch {
            throw AgentError(.protocolViolation, "\(address.spoken) sent an invalid \(what) result: \(error.message)")
        }
    }

    // MARK: - Framing

    private func nextID() -> String {
        counter += 1
        return "\(idPrefix)-\(counter)"
    }

    func deadline(_ ms: Int64) -> UInt64 { monotonicNanos() + UInt64(max(0, ms)) * 1_000_000 }

    private func send(_ json: JSON) throws(AgentError) {
        try send(json.encodedLine())
    }

    /// Handles what the agent has sent meanwhile (events go to `onEvent`) without waiting.
    /// Throws `.disconnected` once the agent has closed the connection.
    public func takeIncoming() throws(AgentError) {
        if isQGA {
            // qemu-ga pushes nothing; what arrives is kept for the next command to skip.
            switch try connection.receive(deadline: 0) {
            case .data(let bytes): decoder.feed(bytes)
            case .timeout: break
            case .closed: throw AgentError(.disconnected, "\(address.spoken) closed the connection")
            }
            return
        }
        do {
            _ = try awaitReplyOrTimeout(ids: [], what: "no", deadline: 0)
        } catch where error.code == .disconnected {
            throw AgentError(.disconnected, "\(address.spoken) closed the connection", errno: error.errno)
        }
    }

    func send(_ bytes: [UInt8]) throws(AgentError) {
        try connection.send(bytes, timeoutMs: max(replyTimeoutMs, 1000))
    }

    private func awaitReply(ids: Set<String>, what: String, deadline: UInt64, timeoutMs: Int64) throws(AgentError) -> Result<JSONObject, ProtocolError> {
        guard let r = try awaitReplyOrTimeout(ids: ids, what: what, deadline: deadline) else {
            throw AgentError(.timeout, "guest did not answer \(what) within \(TimeSpan(milliseconds: timeoutMs).human) (\(address.spoken))")
        }
        return r
    }

    /// Reads frames until a reply to one of `ids` arrives; nil when `deadline` passes first.
    private func awaitReplyOrTimeout(ids: Set<String>, what: String, deadline: UInt64) throws(AgentError) -> Result<JSONObject, ProtocolError>? {
        try awaitIdentifiedReply(ids: ids, what: what, deadline: deadline)?.outcome
    }

    /// As `awaitReplyOrTimeout`, with the id the reply answers (nil: an error without an id).
    private func awaitIdentifiedReply(ids: Set<String>, what: String = "thaw", deadline: UInt64) throws(AgentError)
        -> (id: String?, outcome: Result<JSONObject, ProtocolError>)?
    {
        while true {
            while let event = decoder.next() {
                if let reply = try handle(event, ids: ids) { return reply }
            }
            switch try connection.receive(deadline: deadline) {
            case .data(let bytes): decoder.feed(bytes)
            case .timeout: return nil
            case .closed:
                throw AgentError(.disconnected, "\(address.spoken) closed the connection while waiting for the \(what) reply")
            }
        }
    }

    private func handle(_ event: FrameEvent, ids: Set<String>) throws(AgentError) -> (id: String?, outcome: Result<JSONObject, ProtocolError>)? {
        switch event {
        case .reset:
            return nil
        case .tooLarge:
            if isSerial { discardedFrames += 1; return nil }
            throw AgentError(.protocolViolation, "\(address.spoken) sent a frame larger than \(decoder.maxFrameBytes) bytes")
        case .frame(let bytes):
            let message: AgentMessage
            do {
                message = try AgentMessage.decode(frame: bytes)
            } catch {
                if isSerial, let salvaged = AgentClient.salvage(bytes) {
                    message = salvaged
                } else if isSerial {
                    discardedFrames += 1
                    return nil
                } else {
                    throw AgentError(.protocolViolation, "\(address.spoken) does not speak the quiesce protocol: it sent \"\(printable(String(decoding: bytes.prefix(80), as: UTF8.self)))\"")
                }
            }
            switch message {
            case .event(let e):
                if events.count == AgentClient.maxKeptEvents {
                    events.removeFirst()
                    droppedEvents += 1
                }
                events.append(e)
                onEvent?(e)
                return nil
            case .reply(let r):
                if let id = r.id?.stringValue, ids.contains(id) { return (id, r.outcome) }
                // On a stream with one request in flight, an error without an id (the agent could
                // not read ours) is the answer to it. On serial it may be anybody's.
                if r.id == nil, !isSerial, case .failure = r.outcome { return (nil, r.outcome) }
                discardedFrames += 1
                return nil
            }
        }
    }

    /// On serial, a stale partial line can be glued in front of a good frame. Try the suffixes
    /// that start an object, left to right, a bounded number of times.
    static func salvage(_ bytes: [UInt8]) -> AgentMessage? {
        var attempts = 0
        var i = 1
        while i < bytes.count - 1 && attempts < 32 {
            if bytes[i] == UInt8(ascii: "{") && bytes[i + 1] == UInt8(ascii: "\"") {
                attempts += 1
                if let m = try? AgentMessage.decode(frame: Array(bytes[i...])) { return m }
            }
            i += 1
        }
        return nil
    }
}


// MARK: - Outcomes a reply could not tell

/// A thaw that may have been confirmed by `status` instead of by its own reply.
public struct ConfirmedThaw: Sendable {
    /// The agent's thaw result, when its reply could be read.
    public var result: ThawResult?
    /// When the reply could not be read: how the thaw was confirmed instead.
    public var confirmation: String?

    public var json: JSON {
        var o = result?.json ?? [:]
        if let confirmation { o["confirmed_by_status"] = .string(confirmation) }
        return .object(o)
    }
}

extension AgentClient {
    /// Thaws (the freeze `opID`, or any), and when the agent's reply cannot be read (an agent
    /// whose reply breaks the protocol's limits, a garbled frame) asks `status` on a fresh
    /// connection: if nothing (or another operation) holds a freeze, the thaw happened and that
    /// is reported, not a failure. Errors the agent sent, timeouts and lost connections are thrown.
    /// To qemu-ga this connection is closed first (it serves one client at a time).
    public func thawConfirmed(opID: String?) throws(AgentError) -> ConfirmedThaw {
        do {
            return ConfirmedThaw(result: try thaw(opID: opID), confirmation: nil)
        } catch where error.code == .protocolViolation {
            let unreadable = error
            let status: StatusResult
            // qemu-ga serves one client at a time, QEMU's chardev one connection: this
            // connection goes first; to qemu-ga the status is asked without the guest-info
            // handshake, as the thaw was.
            if isQGA || isSerial { close() }
            do {
                let again = try AgentClient.connect(address, connectTimeoutMs: replyTimeoutMs, replyTimeoutMs: replyTimeoutMs, qgaHandshake: false)
                defer { again.close() }
                status = try again.status()
            } catch {
                throw AgentError(.protocolViolation, "\(unreadable.message); and status could not confirm the thaw: \(error.message)")
            }
            // Thawed, or frozen by another operation (our protocol names it). qemu-ga's status
            // names none, so there only "thawed" confirms (before, any state did: trial G).
            let othersFreeze = !isQGA && opID != nil && status.opID != nil && status.opID != opID
            if status.state == .thawed || othersFreeze {
                return ConfirmedThaw(result: nil, confirmation: "the thaw reply could not be read (\(error.message)); status confirms \(opID.map { "operation \($0) no longer holds a freeze" } ?? "nothing is frozen")")
            }
            throw AgentError(.protocolViolation, "\(error.message); status says the guest is still \(status.state.rawValue) by \(status.opID ?? "?")")
        }
    }

    /// Whether the agent's status says operation `op` is still being frozen or thawed (its
    /// hooks run), asked on a fresh connection. Not to qemu-ga, whose status names no operation.
    private func stillTaking(_ op: String) -> Bool {
        guard !isQGA, let c = try? AgentClient.connect(address, connectTimeoutMs: replyTimeoutMs, replyTimeoutMs: replyTimeoutMs) else {
            return false
        }
        defer { c.close() }
        guard let s = try? c.status() else { return false }
        return s.isTaking(op)
    }

    /// Writes qemu-ga a thaw on a fresh connection and waits for nothing (stopping at once),
    /// and says so: it is carried out when the freeze qemu-ga may still be inside returns.
    private func thawWithoutWaiting() -> (said: String, sent: Bool) {
        do {
            let again = try AgentClient.connect(address, connectTimeoutMs: min(replyTimeoutMs, 1000), replyTimeoutMs: replyTimeoutMs, qgaHandshake: false)
            defer { again.close() }
            try again.qgaSend(.fsfreezeThaw)
            return ("a thaw was written without waiting (stopping at once), which qemu-ga carries out when its freeze returns", true)
        } catch {
            return ("stopping at once, writing a thaw failed too (\(error.message))", false)
        }
    }

    /// How long a freeze of unknown outcome may hold, in words: qemu-ga has no deadline, so
    /// its freeze lasts until something thaws it; quiesced on qemu-ga's port ends it at its
    /// max-freeze (qemu-ga's protocol carries no timeout); on our protocol, at the request's.
    private func frozenUntil(_ request: FreezeRequest) -> String {
        if isQGA {
            if let h = hello, h.agent == "quiesced", h.maxFreezeMs > 0 {
                return "for up to \(TimeSpan.human(milliseconds: h.maxFreezeMs)) (quiesced's max-freeze)"
            }
            return "until it is thawed (qemu-ga has no deadline)"
        }
        return request.timeoutMs.map { "for up to \(TimeSpan.human(milliseconds: $0)) (its deadline)" } ?? "until the agent's --max-freeze deadline"
    }

    /// Freezes; when the outcome is unknown (the reply could not be read, did not come in
    /// time, or the connection dropped) the guest may be frozen, so the freeze is undone by its
    /// op id on a fresh connection. The error then says what became of it: undone, or (when it
    /// cannot be undone) that the guest may stay frozen until its deadline, with the command
    /// that thaws it. Without an op id nothing can be undone safely: the error says so.
    /// `undo` is asked first; when it says no (a second signal: stop at once), the error is
    /// thrown as it came, except to qemu-ga, which has no deadline and does not thaw when the
    /// connection drops: its thaw is still written, without waiting for an answer.
    ///
    /// `onConnection` gets the undo's connection, so that another thread can interrupt it
    /// (`Connection.shutdown`) on a second signal: `undo` then says no, and the undo stops
    /// waiting (to qemu-ga, after writing its thaw without waiting). A connect still waiting
    /// for room in the listener's backlog looks at `undo` too.
    public func freezeOrUndo(_ request: FreezeRequest, replyTimeoutMs wait: Int64? = nil,
                             undo mayUndo: () -> Bool = { true },
                             onConnection: ((Connection) -> Void)? = nil) throws(AgentError) -> FreezeResult {
        do {
            return try freeze(request, replyTimeoutMs: wait)
        } catch where error.code != .refused && error.code != .unreachable && !mayUndo() && isQGA {
            close()
            var unsure = AgentError(error.code, "\(error.message). The guest MAY BE FROZEN \(frozenUntil(request)): \(thawWithoutWaiting().said); check with `\(shellQuoted(["quiescectl", "--agent", address.description, "status"]))`, thaw it with `\(shellQuoted(["quiescectl", "--agent", address.description, "thaw"]))`")
            unsure.mayBeFrozen = true
            throw unsure
        } catch where error.code != .refused && error.code != .unreachable && mayUndo() {
            let original = error
            let until = frozenUntil(request)
            guard let op = request.opID else {
                throw AgentError(original.code, "\(original.message). The guest may be frozen \(until): thaw it with `\(shellQuoted(["quiescectl", "--agent", address.description, "thaw"]))`")
            }
            let giveUp = monotonicNanos() + UInt64(max(replyTimeoutMs, 1000)) * 1_000_000
            let limit = deadline(AgentClient.thawHooksWaitLimitMs)
            // qemu-ga serves one client at a time, and QEMU's chardev (serial:, qga:) one
            // connection: this connection goes first, or the undo's would wait behind it
            // (before, over serial: the undo's hello was never answered: trial H). A bound
            // freeze on the port ends with it too; the undo confirms that.
            if isQGA || isSerial { close() }
            var undo: Result<String, AgentError>
            var queued = false
            while true {
                do {
                    let again = try AgentClient.connect(address, connectTimeoutMs: replyTimeoutMs, replyTimeoutMs: replyTimeoutMs,
                                                        onConnection: onConnection, qgaHandshake: false, interrupted: { !mayUndo() })
                    defer { again.close() }
                    let t = try again.thawConfirmed(opID: op)
                    undo = .success(t.result.map { $0.wasFrozen ? "thawed \($0.filesystemCount) filesystem\($0.filesystemCount == 1 ? "" : "s")" : "nothing was frozen" }
                                    ?? (t.confirmation ?? "thawed"))
                } catch {
                    if !mayUndo() {
                        // A second signal while the undo waited: stop at once. quiesced thaws a
                        // bound freeze when its connection closes; qemu-ga gets its thaw written.
                        let written = isQGA ? thawWithoutWaiting() : nil
                        queued = written?.sent ?? false
                        undo = .failure(AgentError(error.code, "stopped waiting on a second signal\(written.map { "; \($0.said)" } ?? "")"))
                        break
                    }
                    if error.remote?.code == .notFrozen {
                        undo = .success("the agent says the operation holds no freeze (not-frozen)")
                    } else if (error.remote?.code == .busy || error.remote?.details?["agent_code"] == .string(ErrorCode.busy.rawValue))
                                && (monotonicNanos() < giveUp || (monotonicNanos() < limit && stillTaking(op))) {
                        // (Through qemu-ga's dialect the agent's code is in the details.)
                        // The freeze is still being taken: ask again once it is done. Past the
                        // reply timeout, for as long as status says this operation is still
                        // being frozen (its freeze hooks run) or thawed (before: 72 "MAY BE
                        // FROZEN" while a slow freeze hook ran and nothing had frozen, trial I).
                        Threads.sleep(milliseconds: 200)
                        continue
                    } else {
                        // The thaw was written: qemu-ga carries it out when its freeze returns.
                        queued = error.thawQueued
                        undo = .failure(error)
                    }
                }
                break
            }
            switch undo {
            case .success(let what):
                throw AgentError(original.code, "\(original.message). The freeze \(op) was undone: \(what); nothing is frozen by it")
            case .failure(let e):
                let left = queued ? "until its freeze returns and the thaw written behind it runs" : until
                var unsure = AgentError(original.code, "\(original.message). The guest MAY BE FROZEN \(left): undoing the freeze failed (\(e.message)); check with `\(shellQuoted(["quiescectl", "--agent", address.description, "status"]))`, thaw it with `\(shellQuoted(["quiescectl", "--agent", address.description, "thaw", "--op-id", op]))`")
                unsure.mayBeFrozen = true
                throw unsure
            }
        }
    }
}

extension StatusResult {
    /// The agent is still freezing or thawing operation `op` (its hooks or FIFREEZE/FITHAW run):
    /// a `busy` answer to that operation's thaw is worth asking again.
    func isTaking(_ op: String) -> Bool { (state == .freezing || state == .thawing) && opID == op }
}
