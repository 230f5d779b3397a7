// What a run did, for people (a timeline) and for programs (one JSON document); exit codes.
import QuiesceLinux
import QuiesceProtocol

/// quiescectl's exit codes. Every failure has its own, so scripts can tell them apart.
public enum ExitCodes {
    /// Everything worked. For `checkpoint` this includes a crash-consistent run that the
    /// `--on-agent-failure crash-consistent` policy allowed (the output says so).
    public static let success: Int32 = 0
    /// Bad command line: unknown flag, bad address, bad duration.
    public static let usage: Int32 = 64
    /// An agent could not be reached, did not answer hello, or does not speak the protocol. (One
    /// that answered the connection with an error refused it: `freezeFailed`.)
    public static let agentUnreachable: Int32 = 69
    /// An agent refused or failed the request (for `checkpoint`: the freeze failed, or did not
    /// hold until COMMAND finished, or a holding hook not marked optional ended while frozen).
    public static let freezeFailed: Int32 = 70
    /// COMMAND failed: non-zero exit, killed by a signal, could not start, or stopped at the deadline.
    public static let commandFailed: Int32 = 71
    /// A thaw failed or could not be confirmed: a guest may still be frozen.
    public static let thawFailed: Int32 = 72
    /// quiescectl was interrupted by SIGINT or SIGTERM (after forwarding it to COMMAND and thawing).
    public static let interrupted: Int32 = 73
    /// Everything else worked, but the output could not be written (standard output or error
    /// full or closed): the report, or the --json document, is lost. (sysexits.h EX_IOERR.)
    public static let outputLost: Int32 = 74

    /// The table for --help and the README.
    public static let table: [(code: Int32, meaning: String)] = [
        (success, "success"),
        (usage, "usage error (bad flag, address or duration, or a COMMAND that cannot run: nothing was frozen)"),
        (agentUnreachable, "an agent is unreachable or does not speak the protocol"),
        (freezeFailed, "an agent refused (the connection too: allow-uid, allow-vsock-cid, max-connections) or failed the request; for checkpoint: a freeze (or a holding hook) failed or did not hold; for thaw --op-id: that operation holds no freeze"),
        (commandFailed, "COMMAND failed, could not start, or was stopped at the deadline (its own code is reported)"),
        (thawFailed, "a thaw failed or could not be confirmed: a guest may still be frozen"),
        (interrupted, "interrupted by SIGINT/SIGTERM (forwarded to COMMAND, guests thawed)"),
        (outputLost, "everything else succeeded, but the output (the report, or --json's document) could not be written"),
    ]
}

/// One line of the timeline: when (from the start of the run), which agent, what.
public struct TimelineEntry: Sendable {
    public var offsetNs: UInt64
    public var agent: String?
    /// A stable keyword: start, connected, frozen, unreachable, freeze-failed, command-started, ...
    public var event: String
    /// One line: a newline in it is part of what a guest sent, never a line break of ours.
    public var message: String
    /// Lines that follow `message` (the closing summary's per-agent lines).
    public var detail: [String] = []

    public var json: JSON {
        var o: JSONObject = ["t_ms": ms(offsetNs), "event": .string(event)]
        if let agent { o["agent"] = .string(agent) }
        o["message"] = .string(([message] + detail).joined(separator: "\n"))
        return .object(o)
    }

    /// "[   48 ms] unix:/run/a.sock: frozen 2 filesystems ..."
    public var human: String {
        let t = TimeSpan.human(nanoseconds: offsetNs)
        let pad = String(repeating: " ", count: max(0, 9 - t.count))
        return "[\(pad)\(t)] " + (agent.map { "\($0): " } ?? "") + message
    }

    /// `human`, then the `detail` lines: each one line on a terminal.
    public var humanLines: [String] { [human] + detail }
}

/// Why an agent did not freeze.
public struct AgentFailure: Sendable {
    public var stage: AgentStage
    public var error: AgentError

    public init(stage: AgentStage, error: AgentError) {
        self.stage = stage
        self.error = error
    }
}

/// One agent's part of a checkpoint.
public struct AgentReport: Sendable {
    public var address: AgentAddress
    public var hello: HelloResult?
    public var connectedNs: UInt64?
    public var freeze: FreezeResult?
    public var frozenNs: UInt64?
    public var failure: AgentFailure?
    public var consistency: Consistency = .crash
    /// Set when the freeze did not hold until the thaw (keepalive failed, agent thawed by itself).
    public var freezeLost: String?
    public var thaw: ThawResult?
    public var thawError: AgentError?
    public var thawedNs: UInt64?
    public var keepalives = 0
    /// Events the agent pushed, the first `maxListedEvents` of them: an agent that floods events
    /// cannot grow the report (or the timeline) without bound.
    public var events: [QuiesceProtocol.Event] = []
    /// Events past `maxListedEvents`, counted but not listed.
    public var droppedEvents = 0
    public static let maxListedEvents = 32

    public init(address: AgentAddress) { self.address = address }

    /// Holding hooks, not marked `optional`, that ended while the guest was frozen (the thaw's
    /// `lost` outcome): their application's lock did not cover the snapshot although COMMAND
    /// was told it would. An optional hook's loss only lowers the consistency.
    public var holdsLost: [HookReport] {
        (thaw?.hooks ?? []).filter { $0.effectiveOutcome == .lost && !$0.optional }
    }

    public var json: JSON {
        var o: JSONObject = ["address": .string(address.description), "consistency": .string(consistency.rawValue)]
        o["frozen"] = .bool(freeze != nil)
        if let connectedNs { o["connected_ms"] = ms(connectedNs) }
        if let frozenNs { o["frozen_ms"] = ms(frozenNs) }
        if let thawedNs { o["thawed_ms"] = ms(thawedNs) }
        if let hello { o["hello"] = .object(hello.json) }
        if let freeze { o["freeze"] = .object(freeze.json) }
        if let failure {
            var f = failure.error.json.objectValue ?? [:]
            f["stage"] = .string(failure.stage.rawValue)
            o["error"] = .object(f)
        }
        if let freezeLost { o["freeze_lost"] = .string(freezeLost) }
        if freeze != nil { o["keepalives"] = .int(Int64(keepalives)) }
        if let thaw { o["thaw"] = .object(thaw.json) }
        if let thawError { o["thaw_error"] = thawError.json }
        if !events.isEmpty { o["events"] = .array(events.map(\.json)) }
        if droppedEvents > 0 { o["events_not_listed"] = .int(Int64(droppedEvents)) }
        return .object(o)
    }
}

/// What happened to COMMAND.
public struct CommandReport: Sendable {
    public var argv: [String]
    public var environment: [(String, String)]
    public var pid: Int32?
    public var startedNs: UInt64?
    public var endedNs: UInt64?
    public var status: ExitStatus?
    public var spawnError: String?
    /// "deadline", or the signal forwarded to it ("SIGINT").
    public var stoppedBy: String?
    /// It did not exit even after SIGKILL.
    public var abandoned = false
    /// When it exited, processes it started were still running in its process group (in the
    /// background, not waited for): they ran on after the thaw.
    public var leftRunning = false

    public init(argv: [String], environment: [(String, String)]) {
        self.argv = argv
        self.environment = environment
    }

    public var json: JSON {
        var o: JSONObject = ["argv": .array(argv.map(JSON.string))]
        if let pid { o["pid"] = .int(Int64(pid)) }
        if let startedNs { o["started_ms"] = ms(startedNs) }
        if let endedNs { o["ended_ms"] = ms(endedNs) }
        if let s = startedNs, let e = endedNs { o["duration_ms"] = ms(e - s) }
        switch status {
        case .exited(let c)?: o["exit_code"] = .int(Int64(c))
        case .signaled(let s)?: o["signal"] = .string(Signals.name(s))
        case nil: o["exit_code"] = .null
        }
        if let spawnError { o["error"] = .string(spawnError) }
        if let stoppedBy { o["stopped_by"] = .string(stoppedBy) }
        if abandoned { o["abandoned"] = .bool(true) }
        if leftRunning { o["left_running"] = .bool(true) }
        var env = JSONObject()
        for (k, v) in environment { env[k] = .string(v) }
        o["environment"] = .object(env)
        return .object(o)
    }
}

/// How a checkpoint ended, in order of precedence when several things went wrong.
public enum CheckpointOutcome: String, Sendable {
    case success
    case agentUnreachable = "agent-unreachable"
    case freezeFailed = "freeze-failed"
    case commandFailed = "command-failed"
    case thawFailed = "thaw-failed"
    case interrupted

    public var exitCode: Int32 {
        switch self {
        case .success: ExitCodes.success
        case .agentUnreachable: ExitCodes.agentUnreachable
        case .freezeFailed: ExitCodes.freezeFailed
        case .commandFailed: ExitCodes.commandFailed
        case .thawFailed: ExitCodes.thawFailed
        case .interrupted: ExitCodes.interrupted
        }
    }
}

/// Everything about one checkpoint run.
public struct CheckpointReport: Sendable {
    public var opID: String
    public var policy: AgentFailurePolicy
    public var timeoutMs: Int64
    public var leaseMs: Int64
    public var agents: [AgentReport]
    public var command: CommandReport?
    /// What COMMAND was told (QUIESCE_CONSISTENCY), lowered after the thaw when a holding hook
    /// turned out to have ended while frozen; nil when COMMAND did not run.
    public var consistency: Consistency?
    public var outcome: CheckpointOutcome = .success
    public var interruptedBy: String?
    public var timeline: [TimelineEntry] = []
    public var endNs: UInt64 = 0

    public init(opID: String, policy: AgentFailurePolicy, timeoutMs: Int64, leaseMs: Int64, agents: [AgentReport]) {
        self.opID = opID
        self.policy = policy
        self.timeoutMs = timeoutMs
        self.leaseMs = leaseMs
        self.agents = agents
    }

    public var exitCode: Int32 { outcome.exitCode }

    /// Agents whose checkpoint is only crash-consistent (could not freeze, or the freeze did not hold).
    public var crashConsistentAgents: [AgentAddress] {
        agents.filter { $0.failure != nil || $0.freezeLost != nil }.map(\.address)
    }

    /// The longest time any guest was frozen, from the agents' thaw results when they have it.
    public var longestFreezeUs: Int64? {
        agents.compactMap { a -> Int64? in
            if let f = a.thaw?.frozenUs { return f }
            if let s = a.frozenNs, let e = a.thawedNs, e > s { return Int64((e - s) / 1000) }
            return nil
        }.max()
    }

    /// One paragraph saying how it ended.
    public var summary: String { summaryLines.joined(separator: "\n") }

    /// How it ended, a line each: the verdict, then what happened to each agent.
    public var summaryLines: [String] {
        var lines: [String] = []
        let frozen = agents.filter { $0.freeze != nil }.count
        switch outcome {
        case .success:
            var s = "checkpoint succeeded: \(consistency?.adjective ?? "?")"
            s += ", \(frozen) of \(agents.count) agent\(agents.count == 1 ? "" : "s") frozen"
            if let l = longestFreezeUs { s += " (longest freeze \(TimeSpan.human(microseconds: l)))" }
            lines.append(s)
        case .agentUnreachable, .freezeFailed, .commandFailed, .thawFailed, .interrupted:
            var s = "checkpoint FAILED (\(outcome.rawValue), exit code \(exitCode))"
            if let c = command {
                if let e = c.spawnError { s += ": \(e)" }
                else if c.stoppedBy == "deadline" { s += ": COMMAND was stopped at the deadline (\(TimeSpan(milliseconds: timeoutMs).human))" }
                else if let st = c.status, outcome == .commandFailed { s += ": COMMAND \(st)" }
            } else if outcome != .interrupted && outcome != .thawFailed {
                s += ": COMMAND did not run"
            }
            if let sig = interruptedBy { s += "; interrupted by \(sig)" }
            lines.append(s)
        }
        for a in agents {
            if let f = a.failure { lines.append("  \(a.address): could not \(f.stage == .connect ? "connect" : "freeze"): \(f.error.message)") }
            if let l = a.freezeLost { lines.append("  \(a.address): the freeze did not hold: \(l)") }
            for h in a.holdsLost {
                lines.append("  \(a.address): hook \(h.name) ended while frozen (\(h.error ?? "lost")): "
                             + "its application is only filesystem-consistent in this checkpoint")
            }
            if let t = a.thawError { lines.append("  \(a.address): THAW FAILED: \(t.message)") }
        }
        let crash = crashConsistentAgents
        if command != nil && !crash.isEmpty {
            lines.append("  WARNING: this checkpoint is only CRASH-CONSISTENT for \(crash.map(\.description).joined(separator: ", "))")
        }
        return lines
    }

    public var json: JSON {
        var o: JSONObject = [
            "op_id": .string(opID),
            "ok": .bool(outcome == .success),
            "outcome": .string(outcome.rawValue),
            "exit_code": .int(Int64(exitCode)),
        ]
        o["consistency"] = consistency.map { .string($0.rawValue) } ?? .null
        o["crash_consistent_agents"] = .array(crashConsistentAgents.map { .string($0.description) })
        o["policy"] = .string(policy.rawValue)
        o["timeout_ms"] = .int(timeoutMs)
        o["lease_ms"] = .int(leaseMs)
        if let l = longestFreezeUs { o["longest_freeze_us"] = .int(l) }
        if let interruptedBy { o["interrupted_by"] = .string(interruptedBy) }
        o["duration_ms"] = ms(endNs)
        o["agents"] = .array(agents.map(\.json))
        o["command"] = command?.json ?? .null
        o["timeline"] = .array(timeline.map(\.json))
        return .object(o)
    }
}

/// Milliseconds with 0.1 ms resolution.
func ms(_ ns: UInt64) -> JSON { .double((Double(ns) / 100_000).rounded() / 10) }

/// Human descriptions of protocol results, shared by the checkpoint timeline and the subcommands.
public enum Describe {
    /// `qga`: the result came through qemu-ga's protocol, which reports a count and nothing
    /// else: the time is the request's round trip, and whether hooks ran (qemu-ga's
    /// fsfreeze-hook, or quiesced's hooks behind its qemu-ga port) is not known.
    public static func frozen(_ r: FreezeResult, qga: Bool = false) -> String {
        let mounts = r.filesystems.map(\.mountPoint)
        let count = Int(r.filesystemCount)
        var s = "frozen \(count) filesystem\(count == 1 ? "" : "s")"
        if !mounts.isEmpty { s += " (\(list(mounts, total: count)))" }
        let mountpoints = r.mountCount
        if mountpoints > Int64(mounts.count) { s += ", \(mountpoints)\(r.filesystemsTotal != nil ? "+" : "") mountpoints with bind mounts" }
        if qga && r.hooks.isEmpty {
            s += " in \(TimeSpan.human(microseconds: r.totalUs)) (the request's round trip: qemu-ga's protocol reports no timings)"
            s += ", hooks unknown (qemu-ga's protocol does not report them)"
        } else {
            s += " in \(TimeSpan.human(microseconds: r.totalUs)), writers stalled \(TimeSpan.human(microseconds: r.stallUs))"
            s += ", " + hooks(r.hooks.filter(\.isFreezePhase))
        }
        if !r.hooksRefused.isEmpty { s += ", hooks refused: " + r.hooksRefused.map { "\($0.name) (\($0.reason))" }.joined(separator: ", ") }
        let skipped = r.skippedTotal ?? Int64(r.skipped.count)
        if skipped > 0 { s += ", \(skipped) skipped" }
        if r.truncated { s += " (the agent's reply lists a sample of each long list, with full counts)" }
        if count == 0 { s += " (WARNING: nothing to freeze)" }
        return s
    }

    /// "no hooks", or "hooks: NAME OUTCOME (duration[, optional][, error]), ...".
    public static func hooks(_ hs: [HookReport]) -> String {
        if hs.isEmpty { return "no hooks" }
        return "hooks: " + hs.map { h in
            var s = "\(h.name) \(h.effectiveOutcome.rawValue) (\(TimeSpan.human(microseconds: h.durationUs))"
            if h.optional { s += ", optional" }
            if !h.succeeded, let e = h.error { s += ", \(e)" }
            // What a failed hook said last (its output tail), on one line.
            if !h.succeeded, let said = h.lastOutputLine(limit: 120) { s += ": \"\(said)\"" }
            return s + ")"
        }.joined(separator: ", ")
    }

    public static func thawed(_ r: ThawResult?, frozenUs: Int64?, reconnected: Bool = false) -> String {
        var s = "thawed"
        if let r {
            s += " \(r.filesystemCount) filesystem\(r.filesystemCount == 1 ? "" : "s") in \(TimeSpan.human(microseconds: r.totalUs))"
            if !r.hooks.isEmpty { s += ", \(r.hooks.first!.phase) " + hooks(r.hooks) }
        }
        if let frozenUs { s += ", frozen for \(TimeSpan.human(microseconds: frozenUs))" }
        if reconnected { s += " (after reconnecting)" }
        if let elsewhere = r?.filesystems.filter({ $0.thawedElsewhere == true }).map(\.mountPoint), !elsewhere.isEmpty {
            s += "; WARNING: \(elsewhere.joined(separator: ", ")) had already been thawed by something else"
        }
        return s
    }

    /// At most `limit` items, then how many more there are (of `total` when `items` is a sample).
    static func list(_ items: [String], limit: Int = 6, total: Int? = nil) -> String {
        let all = max(total ?? items.count, items.count)
        return all <= limit && items.count == all ? items.joined(separator: ", ")
            : items.prefix(limit).joined(separator: ", ") + ", … (\(all - min(limit, items.count)) more)"
    }

    /// `qga`: the agent was spoken to in qemu-ga's protocol (a `qga:` address): qemu-ga itself,
    /// or quiesced on qemu-ga's port, which says so in guest-info.
    public static func info(_ h: HelloResult, qga: Bool = false) -> [String] {
        let maxFreeze = h.maxFreezeMs > 0 ? TimeSpan(milliseconds: h.maxFreezeMs).human
            : qga && h.agent == "qemu-ga" ? "none: qemu-ga has no deadline, a freeze holds until it is thawed" : "not announced"
        return [
            "agent: \(h.agent.isEmpty ? "?" : h.agent) \(h.agentVersion)",
            qga ? "protocol: qemu-ga's (guest-sync-delimited, guest-fsfreeze-*)"
                : "protocol: \(h.version) (quiescectl \(QuiesceRelease.version) speaks \(ProtocolVersion.oldestSupported)...\(ProtocolVersion.current))",
            "capabilities: \(h.capabilities.isEmpty ? "none" : h.capabilities.joined(separator: ", "))",
            "max frame: \(h.maxFrame) bytes",
            "max freeze: \(maxFreeze)",
        ]
    }

    public static func status(_ s: StatusResult, nowWallMs: Int64) -> [String] {
        var lines: [String] = []
        var head = "state: \(s.state.rawValue)"
        if let op = s.opID { head += ", op \(op)" }
        if let m = s.mode { head += " (\(m.rawValue))" }
        lines.append(head)
        if !s.filesystems.isEmpty {
            lines.append("filesystems: \(list(s.filesystems, limit: 32, total: s.filesystemsTotal.map(Int.init)))")
        }
        if let since = s.sinceMs { lines.append("since: \(TimeSpan.human(milliseconds: max(0, nowWallMs - since))) ago") }
        if let r = s.remainingMs { lines.append("auto-thaw in: \(TimeSpan.human(milliseconds: max(0, r)))") }
        else if let d = s.deadlineMs { lines.append("auto-thaw in: \(TimeSpan.human(milliseconds: max(0, d - nowWallMs)))") }
        if let at = s.thawedAtMs {
            lines.append("filesystems thawed: \(TimeSpan.human(milliseconds: max(0, nowWallMs - at))) ago; the thaw hooks are running")
        }
        if let by = s.requestedBy { lines.append("requested by: \(by)") }
        if !s.hooks.isEmpty { lines.append(hooks(s.hooks)) }
        for r in s.hooksRefused { lines.append("hook refused: \(r.name): \(r.reason)") }
        if let a = s.lastAutoThaw {
            lines.append("last auto-thaw: \(a.reason), op \(a.opID), \(TimeSpan.human(milliseconds: max(0, nowWallMs - a.atMs))) ago, \(a.filesystemsTotal ?? Int64(a.filesystems.count)) filesystem\((a.filesystemsTotal ?? Int64(a.filesystems.count)) == 1 ? "" : "s")")
        }
        return lines
    }

    public static func filesystems(_ r: FilesystemsResult) -> [String] {
        var lines: [String] = []
        let count = r.filesystemsTotal ?? Int64(r.filesystems.count)
        lines.append(count == 0 ? "nothing to freeze" : "freeze order (\(count) filesystem\(count == 1 ? "" : "s"); thaw runs the waves backwards):")
        let width = r.filesystems.map(\.mountPoint.count).max() ?? 0
        for f in r.filesystems {
            var s = "  wave \(f.wave.map(String.init) ?? "?")  \(f.mountPoint.padding(width))  \(f.type)  \(f.device)  \(f.source)"
            if !f.otherMounts.isEmpty { s += "  (also mounted at \(list(f.otherMounts, total: f.otherMountsTotal.map(Int.init))))" }
            if !f.dependsOn.isEmpty { s += "  depends on \(f.dependsOn.joined(separator: ", "))" }
            if let e = f.error { s += "  error: \(e)" }
            lines.append(s)
        }
        if r.filesystems.count < count { lines.append("  … and \(count - Int64(r.filesystems.count)) more (the agent listed a sample)") }
        if !r.skipped.isEmpty {
            lines.append("skipped (\(r.skippedTotal ?? Int64(r.skipped.count))\(r.skippedTotal != nil ? ", \(r.skipped.count) listed" : "")):")
            let w = r.skipped.map(\.mountPoint.count).max() ?? 0
            for k in r.skipped {
                lines.append("  \(k.mountPoint.padding(w))  \(k.type)  \(k.reason)\(k.detail.isEmpty ? "" : ": \(k.detail)")")
            }
        }
        return lines
    }

    /// `agent`: where the freeze was taken, for the thaw command printed with it.
    public static func freeze(_ r: FreezeResult, agent: AgentAddress, nowWallMs: Int64) -> [String] {
        var lines = ["\(frozen(r, qga: agent.speaksQGA))", "op: \(r.opID) (\(r.mode.rawValue))\(r.replayed ? ", replayed" : "")"]
        let thaw = shellQuoted(["quiescectl", "--agent", agent.description, "thaw", "--op-id", r.opID])
        if r.deadlineMs > 0 { lines.append("auto-thaw in \(TimeSpan.human(milliseconds: max(0, r.deadlineMs - nowWallMs))) unless thawed: \(thaw)") }
        let width = r.filesystems.map(\.mountPoint.count).max() ?? 0
        for f in r.filesystems {
            var s = "  \(f.mountPoint.padding(width))"
            if let us = f.freezeUs { s += "  freeze \(TimeSpan.human(microseconds: us))" }
            if let us = f.frozenAtUs { s += "  frozen at +\(TimeSpan.human(microseconds: us))" }
            if f.mountCount > 1 { s += "  (+\(f.mountCount - 1) other mountpoint\(f.mountCount == 2 ? "" : "s") of the same filesystem)" }
            lines.append(s)
        }
        return lines
    }

    public static func thaw(_ r: ThawResult) -> [String] {
        guard r.wasFrozen else { return ["was not frozen: nothing to thaw"] }
        var lines = [thawed(r, frozenUs: r.frozenUs)]
        if let op = r.opID { lines.append("op: \(op)") }
        for f in r.filesystems where f.error != nil { lines.append("  \(f.mountPoint): \(f.error!)") }
        return lines
    }

    public static func sync(_ r: SyncResult) -> [String] {
        let count = r.filesystemsTotal ?? Int64(r.filesystems.count)
        var lines = ["synced \(count) filesystem\(count == 1 ? "" : "s") in \(TimeSpan.human(microseconds: r.totalUs))"]
        let width = r.filesystems.map(\.mountPoint.count).max() ?? 0
        for f in r.filesystems {
            var s = "  \(f.mountPoint.padding(width))"
            if let us = f.syncUs { s += "  \(TimeSpan.human(microseconds: us))" }
            if let e = f.error { s += "  error: \(e)" }
            lines.append(s)
        }
        return lines
    }
}

extension String {
    func padding(_ width: Int) -> String { count >= width ? self : self + String(repeating: " ", count: width - count) }
}
