// Talking to qemu-guest-agent (`--agent qga:unix:PATH`) in its own protocol, behind the same
// AgentClient API, so ping, info, status, freeze, thaw and checkpoint work on qemu-ga guests.
//
// What qemu-ga cannot do, and how it shows:
// - No deadline and no thaw on disconnect: a freeze holds until somebody thaws it. checkpoint
//   still thaws on every path it controls, and its timeline warns that a killed quiescectl
//   would leave such a guest frozen.
// - No `filesystems` and no `sync`: refused with an error that says so.
// - Per-filesystem timings and the stall window are unknown: the freeze call's duration is
//   reported as the (upper bound of the) stall.
import QuiesceLinux
import QuiesceProtocol

extension AgentClient {
    /// Resynchronises (0xFF, then guest-sync-delimited) and asks guest-info.
    func qgaHello() throws(AgentError) -> HelloResult {
        let info = try qgaExecute(.info, timeoutMs: replyTimeoutMs)
        let names = QGA.enabledCommands(info: info)
        // Only what every operation needs is checked here. A frozen qemu-ga disables
        // guest-fsfreeze-freeze until it is thawed (qga/main.c keeps ping, info, sync,
        // fsfreeze-status and fsfreeze-thaw), and one started with the freeze blocked (-b) still
        // answers ping and info: refusing those would leave a frozen guest no way to be thawed
        // or even looked at. A freeze that qemu-ga will not do is refused by qemu-ga, saying why.
        let listed = (info["supported_commands"]?.arrayValue ?? []).compactMap { $0["name"]?.stringValue }
        guard listed.contains(QGA.CommandName.fsfreezeStatus.rawValue) else {
            throw AgentError(.incompatible, "\(address.spoken) has no \(QGA.CommandName.fsfreezeStatus.rawValue): it cannot freeze filesystems (it lists \(listed.count) commands)")
        }
        var capabilities: [String] = []
        if names.contains(QGA.CommandName.fsfreezeFreezeList.rawValue) { capabilities.append("freeze-list") }
        // quiesced on qemu-ga's port says so in guest-info (`quiesce`), with its deadline: its
        // freezes end at max-freeze, where qemu-ga's last until a thaw.
        if let q = info["quiesce"], q["agent"]?.stringValue == "quiesced" {
            let maxFreeze = q["max_freeze_ms"]?.intValue.flatMap { $0 > 0 ? $0 : nil } ?? 0
            return HelloResult(version: ProtocolVersion.current, agent: "quiesced", agentVersion: printable(q["version"]?.stringValue ?? ""),
                               capabilities: capabilities, maxFrame: Int64(ProtocolLimits.maxFrameBytes), maxFreezeMs: maxFreeze)
        }
        return HelloResult(version: ProtocolVersion.current, agent: "qemu-ga", agentVersion: info["version"]?.stringValue ?? "",
                           capabilities: capabilities, maxFrame: Int64(ProtocolLimits.maxFrameBytes), maxFreezeMs: 0)
    }

    /// One of our operations, carried out with qemu-ga's commands; the result in our shapes.
    func qgaRequest(_ operation: Request.Operation, timeoutMs: Int64) throws(AgentError) -> JSONObject {
        switch operation {
        case .hello:
            return (try qgaHello()).json
        case .ping:
            _ = try qgaExecute(.ping, timeoutMs: timeoutMs)
            return [:]
        case .status:
            let state = try qgaExecute(.fsfreezeStatus, timeoutMs: timeoutMs)
            return StatusResult(state: QGA.isFrozen(status: state) ? .frozen : .thawed).json
        case .keepalive:
            // Nothing to extend (qemu-ga has no deadline); make sure the freeze still holds.
            let state = try qgaExecute(.fsfreezeStatus, timeoutMs: timeoutMs)
            guard QGA.isFrozen(status: state) else {
                // quiesced on qemu-ga's port ends a freeze at its max-freeze; qemu-ga never does.
                let why = if let h = hello, h.agent == "quiesced", h.maxFreezeMs > 0 {
                    "quiesced ended it at its deadline (max-freeze \(TimeSpan.human(milliseconds: h.maxFreezeMs))), or something else thawed it"
                } else { "somebody thawed it" }
                let e = ProtocolError(.notFrozen, "\(hello?.agent ?? "qemu-ga") reports \(printable(state.stringValue ?? "\(state)")): \(why)")
                throw AgentError(.refused, "keepalive refused: \(e.code): \(e.message)", remote: e)
            }
            return ["remaining_ms": .int(0)]
        case .freeze(let r):
            let start = monotonicNanos()
            // guest-fsfreeze-freeze-list with mounts, guest-fsfreeze-freeze without.
            let count = try qgaExecute(.fsfreezeFreeze(mountpoints: r.mounts), timeoutMs: timeoutMs)
            let us = Int64((monotonicNanos() - start) / 1000)
            // A count of frozen filesystems, or the freeze's outcome is unknown (and undone).
            guard let frozen = AgentClient.qgaCount(count) else {
                throw AgentError(.protocolViolation, "qemu-ga answered guest-fsfreeze-freeze with \(printable(count.text)), not a count of frozen filesystems")
            }
            let n = Int(frozen)
            // qemu-ga's freeze-list skips a mountpoint it does not find and counts the rest: a
            // checkpoint of fewer filesystems than asked for is not the one asked for. Treated
            // as a freeze of unknown extent, so it is undone.
            if let asked = r.mounts, n != asked.count {
                throw AgentError(.protocolViolation, "qemu-ga froze \(n) filesystem\(n == 1 ? "" : "s") of the \(asked.count) asked for (\(asked.joined(separator: ", "))): it skips mountpoints it does not find or cannot freeze")
            }
            // qemu-ga names no filesystem: with an explicit list these are the ones asked for.
            let reports = r.mounts.flatMap { $0.count == n ? $0 : nil }.map(AgentClient.qgaReports) ?? AgentClient.qgaReports(count: n)
            return FreezeResult(opID: r.opID ?? "qga", mode: .detached, filesystems: reports, skipped: [], hooks: [],
                                presyncUs: 0, freezeUs: us, stallUs: us, totalUs: us, timeoutMs: 0, deadlineMs: 0).json
        case .thaw(let opID):
            let start = monotonicNanos()
            let count: JSON
            do {
                // quiesced on qemu-ga's port answers only after its thaw hooks; while its
                // guest-fsfreeze-status on another connection answers, the thaw is waited for.
                // Also when the peer is unknown (a thaw sent without guest-info): qemu-ga behind
                // QEMU's chardev does not answer a second connection, which costs one more reply
                // timeout before the thaw is reported unconfirmed.
                let patient = hello == nil || hello?.agent == "quiesced"
                let limit = deadline(AgentClient.thawHooksWaitLimitMs)
                count = try qgaExecute(.fsfreezeThaw, timeoutMs: timeoutMs, keepWaiting: {
                    patient && monotonicNanos() < limit && self.qgaAnswersElsewhere()
                }, unanswered: { late in
                    // Written whole, so it waits in the channel for its turn.
                    var queued = AgentError(.timeout, "\(late.message); the thaw was sent and waits in qemu-ga's channel (qemu-ga does one command at a time, and may still be inside a freeze, such as a slow fsfreeze hook), where it is carried out in its turn, but it is not confirmed")
                    queued.thawQueued = true
                    return queued
                })
            } catch {
                // quiesced on qemu-ga's port fails the first thaw after its own deadline (or a
                // restart) ended the freeze with `not-frozen`, saying when and why (PROTOCOL.md
                // 12): the freeze did not hold, but nothing is left frozen, which is not a failed thaw.
                if let remote = error.remote, remote.details?["agent_code"] == .string(ErrorCode.notFrozen.rawValue) {
                    let why = remote.details?["agent_message"]?.stringValue ?? remote.message
                    let e = ProtocolError(.notFrozen, why, details: ["thawed_reason": "agent"])
                    throw AgentError(.refused, "thaw refused: \(e.code): \(why)", remote: e)
                }
                throw error
            }
            guard let n = AgentClient.qgaCount(count) else {
                throw AgentError(.protocolViolation, "qemu-ga answered guest-fsfreeze-thaw with \(printable(count.text)), not a count of thawed filesystems: the thaw is not confirmed")
            }
            return ThawResult(opID: opID, wasFrozen: n > 0, filesystems: AgentClient.qgaReports(count: Int(n)),
                              totalUs: Int64((monotonicNanos() - start) / 1000), frozenUs: nil).json
        case .filesystems, .sync:
            let e = ProtocolError(.unknownOp, "qemu-ga cannot do \(operation.name.rawValue): its protocol has no such command")
            throw AgentError(.refused, "\(operation.name.rawValue) refused: \(e.code): \(e.message)", remote: e)
        }
    }

    /// The largest count of filesystems believed from qemu-ga (a guest with more than 65536
    /// frozen superblocks is not real); each counted one becomes a report, so a larger count
    /// would cost the host memory without bound (10^9 took 22 GB).
    static let qgaMaxCount: Int64 = 65_536

    /// qemu-ga's answer to a freeze or thaw as a count of filesystems: an integer from 0 to
    /// `qgaMaxCount`, else nil (not a count, or not a plausible one).
    static func qgaCount(_ answer: JSON) -> Int64? {
        guard let n = answer.intValue, (0...qgaMaxCount).contains(n) else { return nil }
        return n
    }

    /// Reports for filesystems qemu-ga counted but did not name.
    static func qgaReports(count n: Int) -> [FilesystemReport] {
        qgaReports((0..<max(0, n)).map { "(filesystem \($0 + 1) of \(n), unnamed by qemu-ga)" })
    }

    static func qgaReports(_ mountPoints: [String]) -> [FilesystemReport] {
        mountPoints.map { FilesystemReport(mountPoint: $0, type: "", device: "", source: "") }
    }

    /// Writes 0xFF, guest-sync-delimited with a fresh id, and the command; returns the sync's
    /// id. Waits for nothing: alone, for a thaw that must reach qemu-ga even when nobody can
    /// wait for its answer.
    @discardableResult
    func qgaSend(_ command: QGA.Command) throws(AgentError) -> Int64 {
        let syncID = Int64.random(in: 1...Int64(Int32.max))
        try send([0xFF] + QGA.Command.sync(id: syncID, delimited: true).line + command.line)
        return syncID
    }

    /// Sends 0xFF and guest-sync-delimited with a fresh id, then the command, and returns the
    /// command's `return` value. Whatever precedes the sync reply (an earlier client's replies
    /// left in the chardev) is skipped. An `error` reply throws `.refused`. When the command
    /// was sent but not answered in time, `unanswered` may say more than the timeout does.
    /// `keepWaiting`, asked each time `timeoutMs` passes without the answer, may extend the
    /// wait by another `timeoutMs`.
    func qgaExecute(_ command: QGA.Command, timeoutMs: Int64, keepWaiting: () -> Bool = { false },
                    unanswered: (AgentError) -> AgentError = { $0 }) throws(AgentError) -> JSON {
        let name = command.name.rawValue
        let syncID = try qgaSend(command)
        var end = deadline(timeoutMs)
        var synced = false
        while true {
            let frame: [UInt8]
            do {
                frame = try qgaNextFrame(deadline: end, what: name, timeoutMs: timeoutMs)
            } catch where error.code == .timeout {
                if keepWaiting() {
                    end = deadline(timeoutMs)
                    continue
                }
                throw unanswered(error)
            }
            guard case .object(let o)? = try? JSON.parse(frame, maxDepth: ProtocolLimits.maxDepth) else {
                if synced {
                    throw AgentError(.protocolViolation, "\(address.spoken) answered \(name) with something that is not a JSON object")
                }
                continue
            }
            if !synced {
                synced = o["return"]?.intValue == syncID
                continue
            }
            if let value = o["return"] { return value }
            if let error = o["error"] {
                let failure = QGA.Failure(error["desc"]?.stringValue ?? "\(error)",
                                          errorClass: error["class"]?.stringValue ?? QGA.Failure.genericError)
                let cls = failure.errorClass, desc = failure.desc
                // quiesced on qemu-ga's port names its refusal's code: code and message ride
                // along in the details (`agent_code`, `agent_message`) without changing how the
                // refusal is classed here.
                let code: ErrorCode = cls == QGA.Failure.commandNotFound ? .unknownOp : .freezeFailed
                let details: JSONObject? = failure.refusal.map {
                    ["agent_code": .string($0.code.rawValue), "agent_message": .string($0.message)]
                }
                let e = ProtocolError(code, "\(cls): \(desc)", details: details)
                throw AgentError(.refused, "\(name) refused: \(cls): \(desc)", remote: e)
            }
            throw AgentError(.protocolViolation, "\(address.spoken) answered \(name) with neither return nor error")
        }
    }

    /// Whether the agent answers guest-fsfreeze-status on a second connection: quiesced's
    /// qemu-ga listener serves connections side by side while one of them waits for a thaw's
    /// hooks (it says "thawed" once the filesystems are, as qemu-ga does before its thaw
    /// hook). qemu-ga, and a QEMU chardev, serve one connection at a time: no answer.
    func qgaAnswersElsewhere() -> Bool {
        guard let c = try? AgentClient.connect(address, connectTimeoutMs: replyTimeoutMs, replyTimeoutMs: replyTimeoutMs,
                                               qgaHandshake: false) else { return false }
        defer { c.close() }
        return (try? c.qgaExecute(.fsfreezeStatus, timeoutMs: replyTimeoutMs)) != nil
    }

    /// The next complete line from qemu-ga (0xFF delimiters are dropped by the decoder).
    private func qgaNextFrame(deadline end: UInt64, what: String, timeoutMs: Int64) throws(AgentError) -> [UInt8] {
        while true {
            while let event = decoder.next() {
                switch event {
                case .frame(let bytes): return bytes
                case .reset: continue
                case .tooLarge:
                    throw AgentError(.protocolViolation, "\(address.spoken) sent a line larger than \(decoder.maxFrameBytes) bytes")
                }
            }
            switch try connection.receive(deadline: end) {
            case .data(let bytes): decoder.feed(bytes)
            case .timeout:
                throw AgentError(.timeout, "guest did not answer \(what) within \(TimeSpan(milliseconds: timeoutMs).human) (\(address.spoken))")
            case .closed:
                throw AgentError(.disconnected, "\(address.spoken) closed the connection while waiting for the \(what) reply")
            }
        }
    }
}
