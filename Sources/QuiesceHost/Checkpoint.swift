// The checkpoint bracket: freeze every agent in parallel, run COMMAND once all are frozen, thaw whatever happens.
import QuiesceLinux
import QuiesceProtocol
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// What to do when an agent cannot be reached or cannot freeze.
public enum AgentFailurePolicy: String, Sendable, CaseIterable {
    /// Thaw the others and do not run COMMAND.
    case fail
    /// Run COMMAND anyway; that guest's checkpoint is only crash-consistent, and the output says so.
    case crashConsistent = "crash-consistent"
}

/// How good a checkpoint of a guest is.
public enum Consistency: String, Sendable, CaseIterable, Comparable {
    /// Not quiesced: like pulling the power cord (journal replay on restore, page cache lost).
    case crash
    /// Filesystems synced and frozen.
    case filesystem
    /// Frozen, and freeze hooks told applications (databases) to flush first.
    case application

    private var rank: Int {
        switch self {
        case .crash: 0
        case .filesystem: 1
        case .application: 2
        }
    }

    public static func < (a: Consistency, b: Consistency) -> Bool { a.rank < b.rank }

    /// The consistency a freeze gives: application when freeze hooks ran and every one
    /// succeeded or holds (an optional hook that failed leaves its application only
    /// filesystem-consistent), lowered to filesystem when the thaw says a holding hook ended
    /// while frozen (`lost`).
    public static func of(_ freeze: FreezeResult?, thaw: ThawResult? = nil) -> Consistency {
        guard let freeze else { return .crash }
        let hooks = freeze.hooks.filter(\.isFreezePhase)
        if !hooks.isEmpty && notHeld(freeze, thaw: thaw).isEmpty { return .application }  // a refused hook counts against
        return .filesystem
    }

    /// The hooks that did not keep their application consistent through the snapshot, one
    /// "NAME: why" each: a hook file the agent refused to run (its application was not asked),
    /// a freeze hook that failed (optional) and a holding hook that ended while frozen.
    public static func notHeld(_ freeze: FreezeResult, thaw: ThawResult? = nil) -> [String] {
        var out: [String] = freeze.hooksRefused.map { "\($0.name): refused (\($0.reason))" }
        for h in freeze.hooks where h.isFreezePhase && !h.succeeded {
            out.append("\(h.name): \(h.error ?? h.effectiveOutcome.rawValue)\(h.optional ? " (optional)" : "")")
        }
        for h in thaw?.hooks ?? [] where h.effectiveOutcome == .lost {
            out.append("\(h.name): \(h.error ?? "ended while holding")")
        }
        return out
    }

    /// "application-consistent".
    public var adjective: String { "\(rawValue)-consistent" }
}

/// Everything a checkpoint needs to know before it starts.
public struct CheckpointPlan: Sendable {
    /// Names the freeze on every agent; thaw and keepalive refer to it.
    public var opID: String
    public var agents: [AgentAddress]
    /// Mountpoints to freeze on every agent; nil freezes everything in each agent's scope.
    public var mounts: [String]?
    /// How long COMMAND may run while the guests are frozen. Past it, COMMAND is stopped and
    /// the guests are thawed.
    public var timeoutMs: Int64
    /// How long an agent keeps a guest frozen without hearing from us; renewed by keepalives
    /// every third of it. Bounds the freeze when quiescectl is stopped or hangs.
    public var leaseMs: Int64
    /// Between SIGTERM and SIGKILL when COMMAND must stop.
    public var killGraceMs: Int64
    public var policy: AgentFailurePolicy
    public var connectTimeoutMs: Int64
    public var replyTimeoutMs: Int64
    /// How long guests already frozen wait for the others: once the first agent is frozen, an
    /// agent that has not answered its freeze within this time counts as failed (`policy`
    /// decides), and its connection is dropped so that a late freeze thaws. One slow or hostile
    /// agent cannot keep the other guests frozen beyond this.
    public var freezeWaitMs: Int64
    /// COMMAND and its arguments.
    public var command: [String]
    /// Send COMMAND's standard output to our standard error (keeps --json output clean).
    public var commandStdoutToStderr: Bool
    /// The environment COMMAND inherits, before the QUIESCE_* variables are added.
    public var baseEnvironment: [String]

    public init(opID: String = CheckpointPlan.makeOpID(), agents: [AgentAddress], mounts: [String]? = nil,
                timeoutMs: Int64 = 60_000, leaseMs: Int64? = nil, killGraceMs: Int64 = 5000,
                policy: AgentFailurePolicy = .fail, connectTimeoutMs: Int64 = 5000, replyTimeoutMs: Int64 = 30_000,
                freezeWaitMs: Int64? = nil,
                command: [String], commandStdoutToStderr: Bool = false, baseEnvironment: [String] = []) {
        self.opID = opID
        self.agents = agents
        self.mounts = mounts
        self.timeoutMs = timeoutMs
        self.leaseMs = leaseMs ?? CheckpointPlan.defaultLease(timeoutMs: timeoutMs)
        self.killGraceMs = killGraceMs
        self.policy = policy
        self.connectTimeoutMs = connectTimeoutMs
        self.replyTimeoutMs = replyTimeoutMs
        self.freezeWaitMs = freezeWaitMs ?? CheckpointPlan.defaultFreezeWait(replyTimeoutMs: replyTimeoutMs)
        self.command = command
        self.commandStdoutToStderr = commandStdoutToStderr
        self.baseEnvironment = baseEnvironment
    }

    /// The freeze wait when none is given: the reply timeout, but at most 10 s.
    public static func defaultFreezeWait(replyTimeoutMs: Int64) -> Int64 { min(replyTimeoutMs, 10_000) }

    /// The lease when none is given: the timeout, but at most 10 s.
    public static func defaultLease(timeoutMs: Int64) -> Int64 { min(timeoutMs, 10_000) }

    /// A fresh operation id: "qc-<epoch ms>-<random>".
    public static func makeOpID() -> String {
        "qc-\(wallClockMillis())-\(String(UInt32.random(in: 0...UInt32.max), radix: 16))"
    }
}

/// What happened to one agent, as the coordinator saw it.
public enum AgentStage: String, Sendable {
    /// Connecting and hello.
    case connect
    case freeze, keepalive, thaw
    /// Any other one-shot request (ping, status, filesystems, sync).
    case request
}

/// Messages from agent sessions, the command waiter and the signal thread to the coordinator.
enum CheckpointEvent: Sendable {
    case connected(Int, HelloResult, UInt64)
    case frozen(Int, FreezeResult, UInt64)
    case failed(Int, AgentStage, AgentError, UInt64)
    case keepaliveFailed(Int, AgentError, UInt64)
    case keepaliveLate(Int, AgentError, UInt64)
    /// The connection dropped while the guest should have been frozen.
    case connectionLost(Int, AgentError, UInt64)
    case agentEvent(Int, QuiesceProtocol.Event, UInt64)
    case thawed(Int, ThawOutcome, UInt64)
    case childExited(UInt64)
    case signal(Int32, UInt64)

    /// The agent session the event comes from, if any.
    var agent: Int? {
        switch self {
        case .connected(let i, _, _), .frozen(let i, _, _), .failed(let i, _, _, _), .keepaliveFailed(let i, _, _),
             .keepaliveLate(let i, _, _), .connectionLost(let i, _, _), .agentEvent(let i, _, _), .thawed(let i, _, _):
            return i
        case .childExited, .signal:
            return nil
        }
    }
}

/// The end of one agent's freeze.
struct ThawOutcome: Sendable {
    var result: ThawResult?
    var error: AgentError?
    /// The agent had already thawed (deadline, disconnect): the freeze did not last.
    var alreadyThawed: Bool
    /// The agent's own account of when and why it ended the freeze (its `not-frozen` answer
    /// with `thawed_reason`, PROTOCOL.md 6.6), when it gave one.
    var endedEarly: String? = nil
    var reconnected: Bool
    var keepalives: Int
}

/// One agent's thread: connect, hello, freeze, keep alive, thaw.
final class AgentSession: Sendable {
    enum Order: Sendable { case thaw }

    let index: Int
    let address: AgentAddress
    let orders = Mailbox<Order>()
    /// 0 running, 1 cancelled (do not freeze), 2 forced (drop the connection at once), 3 given
    /// up on (the connection dropped because the agent did not freeze in time; its freeze is
    /// still undone by op id if it got through).
    let mode = Atomic<Int>(0)
    /// Monotonic time at which COMMAND is stopped (0: not known yet); caps the keepalive leases.
    let hardDeadline = Atomic<UInt64>(0)
    private let connection = Mutex<Connection?>(nil)

    init(index: Int, address: AgentAddress) {
        self.index = index
        self.address = address
    }

    func attach(_ c: Connection) {
        connection.withLock { $0 = c }
        if mode.load(ordering: .acquiring) >= 2 { c.shutdown() }
    }

    func force() {
        mode.store(2, ordering: .releasing)
        connection.withLock { $0?.shutdown() }
    }

    /// Drops the connection of an agent that did not freeze in time (see `mode` 3).
    func giveUp() {
        mode.store(3, ordering: .releasing)
        connection.withLock { $0?.shutdown() }
    }

    func run(plan: CheckpointPlan, events: Mailbox<CheckpointEvent>) {
        let i = index
        let client: AgentClient
        do {
            client = try AgentClient.connect(address, connectTimeoutMs: plan.connectTimeoutMs,
                                             replyTimeoutMs: plan.replyTimeoutMs, onConnection: { self.attach($0) })
        } catch {
            events.post(.failed(i, .connect, error, monotonicNanos()))
            return
        }
        defer { client.close() }
        events.post(.connected(i, client.hello!, monotonicNanos()))
        // The agent's own word that it thawed our freeze (deadline, signal): the freeze is lost,
        // and the thaw needs no further confirmation.
        let thawedByAgent = Atomic<Bool>(false)
        let opID = plan.opID
        client.onEvent = { event in
            if event.name == "thawed", event.fields["op_id"]?.stringValue == opID {
                thawedByAgent.store(true, ordering: .releasing)
            }
            events.post(.agentEvent(i, event, monotonicNanos()))
        }

        if mode.load(ordering: .acquiring) != 0 {
            events.post(.failed(i, .freeze, AgentError(.refused, "not frozen: the checkpoint was interrupted"), monotonicNanos()))
            return
        }
        var lease = plan.leaseMs
        if let max = client.hello?.maxFreezeMs, max > 0 { lease = min(lease, max) }
        let request = FreezeRequest(mounts: plan.mounts, timeoutMs: lease, opID: plan.opID, mode: .bound)
        let result: FreezeResult
        do {
            // A freeze whose outcome is unknown (its reply unreadable or late, the connection
            // dropped) is undone by op id on a new connection: a bound freeze also ends when this
            // connection closes, but qemu-ga's do not, and the undo confirms it either way. Not
            // after a second signal, which asks to stop at once.
            result = try client.freezeOrUndo(request, replyTimeoutMs: max(plan.replyTimeoutMs, plan.timeoutMs),
                                             undo: { self.mode.load(ordering: .acquiring) != 2 })
        } catch {
            events.post(.failed(i, .freeze, error, monotonicNanos()))
            return
        }
        let frozenAt = monotonicNanos()
        events.post(.frozen(i, result, frozenAt))

        // Keep the freeze alive until told to thaw. Keepalives come from this thread, which never
        // waits for COMMAND, so a long snapshot is never cut short while we are alive, and a
        // stopped or dead coordinator lets the lease run out. Between keepalives the connection
        // is watched, so a freeze lost while COMMAND runs (the agent thawed by itself and said
        // so, or the connection dropped) is known within a tenth of a second, not at the thaw.
        let interval = UInt64(max(100, lease / 3)) * 1_000_000
        let watchSlice: UInt64 = 100_000_000
        var next = frozenAt + interval
        var keepalives = 0
        var keepaliveFailed = false
        var lost = false
        while orders.receive(deadlineNanos: lost ? next : min(next, monotonicNanos() + watchSlice)) == nil {
            if !lost {
                do {
                    try client.takeIncoming()
                } catch {
                    lost = true
                    if !thawedByAgent.load(ordering: .acquiring) {
                        events.post(.connectionLost(i, error, monotonicNanos()))
                    }
                }
                if thawedByAgent.load(ordering: .acquiring) { lost = true }
            }
            guard monotonicNanos() >= next else { continue }
            next = monotonicNanos() + interval
            guard !keepaliveFailed, !lost, mode.load(ordering: .acquiring) != 2 else { continue }
            var ttl = lease
            let hard = hardDeadline.load(ordering: .acquiring)
            if hard != 0 {
                let now = monotonicNanos()
                if now >= hard { continue }
                // Never ask the agent to stay frozen much past the moment COMMAND is stopped.
                ttl = min(lease, Int64((hard - now) / 1_000_000) + 1000)
            }
            do {
                _ = try client.keepalive(opID: plan.opID, timeoutMs: ttl,
                                         replyTimeoutMs: max(1000, min(plan.replyTimeoutMs, lease / 2)))
                keepalives += 1
            } catch where error.code == .timeout {
                // A slow agent may still hold the freeze: say so and try again at the next tick.
                events.post(.keepaliveLate(i, error, monotonicNanos()))
            } catch {
                keepaliveFailed = true
                events.post(.keepaliveFailed(i, error, monotonicNanos()))
            }
        }
        let outcome = thaw(client, plan: plan, keepalives: keepalives,
                           confirmedByAgent: { thawedByAgent.load(ordering: .acquiring) })
        events.post(.thawed(i, outcome, monotonicNanos()))
    }

    /// Thaws our operation. If the connection is gone, reconnects once to make sure: a bound
    /// freeze should have been thawed by the agent when the connection dropped, but we verify.
    /// `confirmedByAgent` tells whether the agent has pushed a `thawed` event for our operation:
    /// then a connection the agent closed afterwards (it exited on SIGTERM) is no thaw failure.
    private func thaw(_ client: AgentClient, plan: CheckpointPlan, keepalives: Int,
                      confirmedByAgent: () -> Bool) -> ThawOutcome {
        var outcome = ThawOutcome(result: nil, error: nil, alreadyThawed: false, reconnected: false, keepalives: keepalives)
        func attempt(_ c: AgentClient) -> AgentError? {
            let giveUp = monotonicNanos() + UInt64(plan.replyTimeoutMs) * 1_000_000
            while true {
                do {
                    let r = try c.thaw(opID: plan.opID)
                    outcome.result = r
                    outcome.alreadyThawed = !r.wasFrozen
                    return nil
                } catch {
                    if let remote = error.remote, remote.code == .notFrozen {
                        outcome.alreadyThawed = true
                        if remote.details?["thawed_reason"] != nil { outcome.endedEarly = remote.message }
                        return nil
                    }
                    // The agent is busy thawing by itself (deadline) or finishing a freeze: ask again.
                    if error.remote?.code == .busy && monotonicNanos() < giveUp {
                        usleep(100_000)
                        continue
                    }
                    return error
                }
            }
        }
        guard let error = attempt(client) else { return outcome }
        if error.code == .disconnected && confirmedByAgent() {
            outcome.alreadyThawed = true
            return outcome
        }
        guard error.code == .disconnected || error.code == .timeout, mode.load(ordering: .acquiring) != 2 else {
            outcome.error = error
            return outcome
        }
        client.close()
        do {
            let again = try AgentClient.connect(address, connectTimeoutMs: plan.connectTimeoutMs,
                                                replyTimeoutMs: plan.replyTimeoutMs, onConnection: { self.attach($0) })
            defer { again.close() }
            outcome.reconnected = true
            if let e2 = attempt(again) {
                outcome.error = AgentError(e2.code, "\(error.message); after reconnecting: \(e2.message)", remote: e2.remote)
            }
        } catch {
            outcome.error = AgentError(error.code, "could not confirm the thaw (\(error.message)); an agent thaws a bound freeze when its connection drops, and a restarted agent thaws what a crashed one left frozen: check with `quiescectl --agent \(address) status`")
        }
        return outcome
    }
}

/// Runs one checkpoint. Create it, hand `interrupt` to whatever receives SIGINT/SIGTERM, call `run`.
public final class Checkpoint: Sendable {
    public let plan: CheckpointPlan
    let events = Mailbox<CheckpointEvent>()
    private let onTimeline: @Sendable (TimelineEntry) -> Void

    /// `onTimeline` sees each timeline entry as it happens (for live output), on the calling thread of `run`.
    public init(plan: CheckpointPlan, onTimeline: @escaping @Sendable (TimelineEntry) -> Void = { _ in }) {
        self.plan = plan
        self.onTimeline = onTimeline
    }

    /// Tells the checkpoint that quiescectl got a signal. The first one is forwarded to COMMAND,
    /// the guests are thawed and the run ends as interrupted; a second one stops waiting.
    public func interrupt(signal: Int32) {
        events.post(.signal(signal, monotonicNanos()))
    }

    /// Runs the checkpoint to the end and reports it. Blocks; call once.
    public func run() -> CheckpointReport {
        let run = CheckpointRun(plan: plan, events: events, onTimeline: onTimeline)
        return run.execute()
    }
}

/// The coordinator's state for one run; used only by the thread that calls `Checkpoint.run`.
final class CheckpointRun {
    let plan: CheckpointPlan
    let events: Mailbox<CheckpointEvent>
    let onTimeline: @Sendable (TimelineEntry) -> Void
    let start = monotonicNanos()
    var report: CheckpointReport
    let sessions: [AgentSession]
    var interruptedBy: Int32?
    var signalsSeen = 0
    var thawStarted = false
    var thawPending: Set<Int> = []
    var pid: pid_t?
    var childExited = false
    /// Agents given up on because they did not freeze within `freezeWaitMs` of the first one.
    var abandoned: Set<Int> = []
    /// Of those, the ones whose session has not ended yet (it is undoing a late freeze).
    var undoPending: Set<Int> = []

    init(plan: CheckpointPlan, events: Mailbox<CheckpointEvent>, onTimeline: @escaping @Sendable (TimelineEntry) -> Void) {
        self.plan = plan
        self.events = events
        self.onTimeline = onTimeline
        sessions = plan.agents.enumerated().map { AgentSession(index: $0.offset, address: $0.element) }
        report = CheckpointReport(opID: plan.opID, policy: plan.policy, timeoutMs: plan.timeoutMs, leaseMs: plan.leaseMs,
                                  agents: plan.agents.map { AgentReport(address: $0) })
    }

    func note(_ at: UInt64, _ agent: Int?, _ event: String, _ message: String) {
        let entry = TimelineEntry(offsetNs: at > start ? at - start : 0, agent: agent.map { plan.agents[$0].description },
                                  event: event, message: message)
        report.timeline.append(entry)
        onTimeline(entry)
    }

    func execute() -> CheckpointReport {
        let n = plan.agents.count
        note(start, nil, "start", "checkpoint \(plan.opID): freezing \(n) agent\(n == 1 ? "" : "s") "
             + "(COMMAND may run \(TimeSpan(milliseconds: plan.timeoutMs).human), lease \(TimeSpan(milliseconds: plan.leaseMs).human), on agent failure: \(plan.policy.rawValue))")
        for s in sessions {
            let plan = self.plan, events = self.events
            Threads.detach { s.run(plan: plan, events: events) }
        }

        // 1. Every agent connects and freezes, in parallel. Once one guest is frozen, the others
        //    have freezeWaitMs to follow; a slow or hostile agent is given up on, not waited for.
        var settling = Set(0..<n)
        var waitEnd: UInt64?
        while !settling.isEmpty {
            guard let e = events.receive(deadlineNanos: waitEnd) else {
                abandon(settling)
                settling.removeAll()
                continue
            }
            if case .frozen(let i, _, let at) = e {
                settling.remove(i)
                thawPending.insert(i)
                if waitEnd == nil { waitEnd = at + UInt64(max(0, plan.freezeWaitMs)) * 1_000_000 }
            }
            if case .failed(let i, _, _, _) = e { settling.remove(i) }
            handle(e)
        }

        // 2. The policy decides whether COMMAND runs.
        let failed = report.agents.indices.filter { report.agents[$0].failure != nil }
        var runCommand = interruptedBy == nil
        if runCommand && !failed.isEmpty && plan.policy == .fail {
            runCommand = false
            let what = failed.map { "\(plan.agents[$0]): \(report.agents[$0].failure!.error.message)" }.joined(separator: "; ")
            note(monotonicNanos(), nil, "abort", "not running COMMAND: \(failed.count) of \(n) agent\(n == 1 ? "" : "s") could not freeze (\(what))"
                 + (thawPending.isEmpty ? "" : "; thawing the others"))
        }
        if runCommand {
            runAndWatchCommand()
        } else if interruptedBy != nil {
            note(monotonicNanos(), nil, "abort", "not running COMMAND: interrupted")
        }

        // 3. Thaw whatever is still frozen, in parallel, and wait for every answer.
        startThaw()
        while !thawPending.isEmpty || !undoPending.isEmpty || (pid != nil && !childExited) {
            guard let e = events.receive(deadlineNanos: killDeadline) else {
                escalateKill()
                continue
            }
            handle(e)
        }
        if let pid { reap(pid) }
        finish()
        return report
    }

    // MARK: COMMAND

    var killAt: UInt64?
    var killed = false
    var killDeadline: UInt64? { pid != nil && !childExited ? killAt : nil }

    func runAndWatchCommand() {
        let now = monotonicNanos()
        let hard = now + UInt64(plan.timeoutMs) * 1_000_000
        for s in sessions { s.hardDeadline.store(hard, ordering: .releasing) }
        let deadlineWallMs = wallClockMillis() + plan.timeoutMs
        let env = CommandEnvironment.make(opID: plan.opID, agents: report.agents, deadlineWallMs: deadlineWallMs)
        report.consistency = CommandEnvironment.overallConsistency(report.agents)
        report.command = CommandReport(argv: plan.command, environment: env)
        let crash = report.agents.filter { $0.failure != nil }.map(\.address.description)
        if !crash.isEmpty {
            note(now, nil, "crash-consistent", "WARNING: running COMMAND although \(crash.joined(separator: ", ")) could not freeze: "
                 + "the checkpoint is only CRASH-CONSISTENT for \(crash.count == 1 ? "that guest" : "those guests")")
        }
        let merged = CommandEnvironment.merge(base: plan.baseEnvironment, env)
        do {
            let child = try Subprocess.spawn(arguments: plan.command, environment: merged, newProcessGroup: true,
                                             stdoutToStderr: plan.commandStdoutToStderr)
            pid = child
            report.command?.pid = child
            report.command?.startedNs = monotonicNanos() - start
            note(monotonicNanos(), nil, "command-started", "\(report.consistency!.adjective): running \(shellQuoted(plan.command)) (pid \(child))")
            let events = self.events
            Threads.detach {
                try? Subprocess.waitUntilExited(child)
                events.post(.childExited(monotonicNanos()))
            }
        } catch {
            let message = error.errno == .ENOENT ? "command not found: \(plan.command[0])" : "cannot start \(plan.command[0]): \(error.errno)"
            report.command?.spawnError = message
            note(monotonicNanos(), nil, "command-failed", message)
            return
        }

        // Wait for COMMAND, its deadline or a signal. Keepalives run on the agent threads.
        while !childExited {
            let wait = killAt ?? hard
            guard let e = events.receive(deadlineNanos: wait) else {
                if killAt == nil {
                    report.command?.stoppedBy = "deadline"
                    note(monotonicNanos(), nil, "deadline", "COMMAND still running after \(TimeSpan(milliseconds: plan.timeoutMs).human): "
                         + "sending SIGTERM (SIGKILL in \(TimeSpan(milliseconds: plan.killGraceMs).human)) and thawing")
                    signalCommand(SIGTERM)
                    killAt = monotonicNanos() + UInt64(plan.killGraceMs) * 1_000_000
                    startThaw()
                } else {
                    escalateKill()
                }
                continue
            }
            handle(e)
        }
    }

    func signalCommand(_ sig: Int32) {
        guard let pid, !childExited else { return }
        do { try Signals.send(sig, to: pid, group: true) } catch { try? Signals.send(sig, to: pid) }
    }

    func escalateKill() {
        guard let pid, !childExited else { killAt = nil; return }
        if !killed {
            killed = true
            note(monotonicNanos(), nil, "kill", "COMMAND (pid \(pid)) did not stop within \(TimeSpan(milliseconds: plan.killGraceMs).human): sending SIGKILL")
            signalCommand(SIGKILL)
            killAt = monotonicNanos() + 10_000_000_000
        } else {
            note(monotonicNanos(), nil, "kill", "COMMAND (pid \(pid)) did not exit 10 s after SIGKILL; not waiting for it")
            childExited = true
            report.command?.abandoned = true
        }
    }

    func reap(_ pid: pid_t) {
        guard report.command?.abandoned != true, report.command?.status == nil else { return }
        if let status = try? Subprocess.wait(pid) { report.command?.status = status }
    }

    // MARK: Thaw

    func startThaw() {
        guard !thawStarted else { return }
        thawStarted = true
        guard !thawPending.isEmpty else { return }
        note(monotonicNanos(), nil, "thaw", "thawing \(thawPending.count) agent\(thawPending.count == 1 ? "" : "s")")
        for i in thawPending { sessions[i].orders.post(.thaw) }
    }

    /// Gives up on agents that did not freeze in time: each counts as failed, and its connection
    /// is dropped, which ends its session and makes the agent thaw a freeze it takes late.
    func abandon(_ late: Set<Int>) {
        let now = monotonicNanos()
        for i in late.sorted() {
            abandoned.insert(i)
            undoPending.insert(i)
            let error = AgentError(.timeout, "did not freeze within \(TimeSpan(milliseconds: plan.freezeWaitMs).human) of the first guest "
                                   + "(--freeze-wait): dropped its connection (a late bound freeze thaws on disconnect) so the other guests do not wait for it")
            report.agents[i].failure = AgentFailure(stage: .freeze, error: error)
            report.agents[i].consistency = .crash
            note(now, i, "freeze-failed", "cannot freeze: \(error.message)")
            sessions[i].giveUp()
        }
    }

    // MARK: Events

    func handle(_ e: CheckpointEvent) {
        if let i = e.agent, abandoned.contains(i) {
            // Its session ends on its own, undoing a late freeze by op id; one that got through
            // just before the drop is told to thaw at once. The run ends when it has.
            switch e {
            case .frozen: sessions[i].orders.post(.thaw)
            case .failed(_, _, let error, let at):
                undoPending.remove(i)
                note(at, i, "gave-up", "after giving up: \(error.message)")
            case .thawed(_, let outcome, let at):
                undoPending.remove(i)
                note(at, i, outcome.error == nil ? "thawed" : "thaw-failed",
                     outcome.error.map { "THAW FAILED after giving up: \($0.message)" } ?? "thawed the freeze that came after giving up")
                if let error = outcome.error { report.agents[i].thawError = error }
            default: break
            }
            return
        }
        switch e {
        case .connected(let i, let hello, let at):
            report.agents[i].hello = hello
            report.agents[i].connectedNs = at - start
            note(at, i, "connected", "connected: \(hello.agent.isEmpty ? "agent" : hello.agent) \(hello.agentVersion), protocol \(hello.version)")
            if case .qga = plan.agents[i] {
                note(at, i, "no-deadline", "qemu-ga has no deadline and does not thaw when the connection drops: "
                     + "quiescectl thaws it on every path it controls, but if quiescectl is killed, this guest stays frozen until thawed")
            }

        case .frozen(let i, let r, let at):
            report.agents[i].freeze = r
            report.agents[i].frozenNs = at - start
            report.agents[i].consistency = Consistency.of(r)
            note(at, i, "frozen", Describe.frozen(r))
            let notHeld = Consistency.notHeld(r)
            if !notHeld.isEmpty {
                note(at, i, "hooks-not-held", "only filesystem-consistent for: \(notHeld.joined(separator: "; "))")
            }

        case .failed(let i, let stage, let error, let at):
            report.agents[i].failure = AgentFailure(stage: stage, error: error)
            report.agents[i].consistency = .crash
            note(at, i, stage == .connect ? "unreachable" : "freeze-failed",
                 "\(stage == .connect ? "cannot connect" : "cannot freeze"): \(error.message)")

        case .keepaliveFailed(let i, let error, let at):
            if report.agents[i].freezeLost == nil { report.agents[i].freezeLost = "keepalive failed: \(error.message)" }
            note(at, i, "keepalive-failed", "keepalive failed: \(error.message): the freeze may no longer hold")

        case .connectionLost(let i, let error, let at):
            if report.agents[i].freezeLost == nil && !thawStarted {
                report.agents[i].freezeLost = "the connection dropped (\(error.message)); the agent thaws a bound freeze when that happens"
                note(at, i, "connection-lost", "the connection dropped while frozen (\(error.message)): the freeze no longer holds")
            }

        case .keepaliveLate(let i, let error, let at):
            note(at, i, "keepalive-late", "\(error.message); trying again")

        case .agentEvent(let i, let ev, let at):
            let listed = report.agents[i].events.count < AgentReport.maxListedEvents
            if listed {
                report.agents[i].events.append(ev)
            } else {
                if report.agents[i].droppedEvents == 0 {
                    note(at, i, "agent-event", "more than \(AgentReport.maxListedEvents) events: further ones are counted, not listed")
                }
                report.agents[i].droppedEvents += 1
            }
            if ev.name == "thawed" {
                let reason = ev.fields["reason"]?.stringValue ?? "unknown"
                let lostHere = report.agents[i].freezeLost == nil && !thawStarted
                if lostHere { report.agents[i].freezeLost = "the agent thawed by itself (\(reason))" }
                if listed || lostHere { note(at, i, "agent-thawed", "the agent thawed by itself (reason: \(reason))") }
            } else if listed {
                let text = JSON.object(ev.fields).text
                note(at, i, "agent-event", "event \(ev.name): \(text.utf8.count <= 300 ? text : String(decoding: text.utf8.prefix(300), as: UTF8.self) + "…")")
            }

        case .thawed(let i, let outcome, let at):
            thawPending.remove(i)
            report.agents[i].thawedNs = at - start
            report.agents[i].thaw = outcome.result
            report.agents[i].thawError = outcome.error
            report.agents[i].keepalives = outcome.keepalives
            if let freeze = report.agents[i].freeze, let thaw = outcome.result,
               thaw.hooks.contains(where: { $0.effectiveOutcome == .lost }) {
                // A holding hook ended while frozen: its lock did not cover the snapshot.
                let lost = thaw.hooks.filter { $0.effectiveOutcome == .lost }.map(\.name)
                report.agents[i].consistency = min(report.agents[i].consistency, Consistency.of(freeze, thaw: thaw))
                if let told = report.consistency { report.consistency = min(told, report.agents[i].consistency) }
                note(at, i, "hook-lost", "WARNING: \(lost.joined(separator: ", ")) ended while holding: the snapshot is only "
                     + "filesystem-consistent for \(lost.count == 1 ? "that application" : "those applications") (COMMAND was told otherwise)")
            }
            if outcome.alreadyThawed && report.agents[i].freezeLost == nil {
                report.agents[i].freezeLost = outcome.endedEarly.map { "the agent says: \($0)" }
                    ?? "the agent had already thawed when asked to (deadline or lost connection)"
            }
            if let error = outcome.error {
                note(at, i, "thaw-failed", "THAW FAILED: \(error.message)")
            } else if outcome.alreadyThawed {
                note(at, i, "thawed", "already thawed by the agent\(outcome.reconnected ? " (checked after reconnecting)" : "")")
            } else {
                let frozenFor = outcome.result?.frozenUs ?? report.agents[i].frozenNs.map { Int64((at - start - $0) / 1000) }
                note(at, i, "thawed", Describe.thawed(outcome.result, frozenUs: frozenFor, reconnected: outcome.reconnected))
            }

        case .childExited(let at):
            childExited = true
            guard let pid else { return }
            if let status = try? Subprocess.wait(pid) { report.command?.status = status }
            report.command?.endedNs = at - start
            let status = report.command?.status
            let ran = TimeSpan.human(nanoseconds: at - start - (report.command?.startedNs ?? 0))
            note(at, nil, status?.succeeded == true ? "command-done" : "command-failed",
                 "COMMAND \(status.map { $0.succeeded ? "succeeded (exit code 0)" : "failed: \($0)" } ?? "ended") after \(ran)")
            startThaw()

        case .signal(let sig, let at):
            signalsSeen += 1
            if interruptedBy == nil { interruptedBy = sig }
            report.interruptedBy = Signals.name(interruptedBy!)
            if signalsSeen == 1 {
                if pid != nil && !childExited {
                    note(at, nil, "interrupted", "\(Signals.name(sig)): forwarding it to COMMAND and thawing")
                    report.command?.stoppedBy = Signals.name(sig)
                    signalCommand(sig)
                    killAt = monotonicNanos() + UInt64(plan.killGraceMs) * 1_000_000
                    startThaw()
                } else {
                    note(at, nil, "interrupted", "\(Signals.name(sig)): stopping; agents that froze will be thawed")
                    // Agents not yet frozen will not freeze; those that froze are thawed once all answered.
                    for s in sessions { s.mode.store(1, ordering: .releasing) }
                }
            } else {
                note(at, nil, "interrupted", "second \(Signals.name(sig)): dropping agent connections (agents thaw bound freezes on disconnect)"
                     + (pid != nil && !childExited ? " and killing COMMAND" : ""))
                for s in sessions { s.force() }
                if pid != nil && !childExited {
                    killed = true
                    signalCommand(SIGKILL)
                    killAt = monotonicNanos() + 10_000_000_000
                }
            }
        }
    }

    // MARK: Outcome

    func finish() {
        var r = report
        let thawFailures = r.agents.filter { $0.thawError != nil }
        let phase1Failures = r.agents.filter { $0.failure != nil }
        let lost = r.agents.filter { $0.freezeLost != nil && $0.thawError == nil }
        let commandFailed: Bool = {
            guard let c = r.command else { return false }
            return c.spawnError != nil || c.stoppedBy == "deadline" || c.abandoned || !(c.status?.succeeded ?? false)
        }()
        if !thawFailures.isEmpty {
            r.outcome = .thawFailed
        } else if r.interruptedBy != nil {
            r.outcome = .interrupted
        } else if r.command == nil && !phase1Failures.isEmpty {
            r.outcome = phase1Failures.contains { $0.failure!.stage != .connect } ? .freezeFailed : .agentUnreachable
        } else if commandFailed {
            r.outcome = .commandFailed
        } else if !lost.isEmpty {
            r.outcome = .freezeFailed
        } else {
            r.outcome = .success
        }
        r.endNs = monotonicNanos() - start
        report = r
        note(monotonicNanos(), nil, "done", report.summary)
    }
}

/// The QUIESCE_* variables COMMAND receives.
public enum CommandEnvironment {
    /// Every variable name, with what it means, for --help.
    public static let documentation: [(name: String, meaning: String)] = [
        ("QUIESCE_CONSISTENCY", "application, filesystem or crash: the weakest over all agents (application: frozen after freeze hooks succeeded; filesystem: frozen without hooks; crash: some agent could not freeze)"),
        ("QUIESCE_OP_ID", "the operation id of this checkpoint's freeze on every agent"),
        ("QUIESCE_AGENTS", "every agent address, separated by ';'"),
        ("QUIESCE_FROZEN", "per frozen agent, ADDR=MOUNT,MOUNT,... separated by ';' (mountpoints in freeze order)"),
        ("QUIESCE_CRASH_CONSISTENT_AGENTS", "agents that could not freeze (only with --on-agent-failure crash-consistent), separated by ';'; empty when none"),
        ("QUIESCE_AGENT_CONSISTENCY", "per agent, ADDR=application|filesystem|crash separated by ';'"),
        ("QUIESCE_DEADLINE_MS", "wall-clock time (ms since the epoch) at which COMMAND is stopped and the guests thawed"),
        ("QUIESCE_HOOKS_NOT_HELD", "per agent, ADDR=HOOK,HOOK for the hooks that did not make it application-consistent (an optional hook that failed, a hook file the agent refused to run), separated by ';'; empty when none"),
        ("QUIESCE_FROZEN_JSON", "the same facts, exact whatever the paths contain: {\"ADDR\": {\"consistency\": C, \"frozen\": [MOUNT, ...], \"hooks_not_held\": [\"HOOK: why\", ...]}, ...}"),
    ]

    public static func overallConsistency(_ agents: [AgentReport]) -> Consistency {
        agents.map { $0.failure == nil ? Consistency.of($0.freeze) : .crash }.min() ?? .crash
    }

    /// The variables for COMMAND, in the documented order.
    public static func make(opID: String, agents: [AgentReport], deadlineWallMs: Int64) -> [(String, String)] {
        let frozen = agents.filter { $0.freeze != nil && $0.failure == nil }
        let crash = agents.filter { $0.failure != nil || $0.freeze == nil }
        return [
            ("QUIESCE_CONSISTENCY", overallConsistency(agents).rawValue),
            ("QUIESCE_OP_ID", opID),
            ("QUIESCE_AGENTS", agents.map(\.address.description).joined(separator: ";")),
            ("QUIESCE_FROZEN", frozen.map { "\($0.address)=\($0.freeze!.filesystems.map(\.mountPoint).joined(separator: ","))" }.joined(separator: ";")),
            ("QUIESCE_CRASH_CONSISTENT_AGENTS", crash.map(\.address.description).joined(separator: ";")),
            ("QUIESCE_AGENT_CONSISTENCY", agents.map { "\($0.address)=\(($0.failure == nil ? Consistency.of($0.freeze) : .crash).rawValue)" }.joined(separator: ";")),
            ("QUIESCE_DEADLINE_MS", String(deadlineWallMs)),
            ("QUIESCE_HOOKS_NOT_HELD", frozen.compactMap { a -> String? in
                let names = a.freeze!.hooksRefused.map(\.name)
                    + a.freeze!.hooks.filter { $0.isFreezePhase && !$0.succeeded }.map(\.name)
                return names.isEmpty ? nil : "\(a.address)=\(names.joined(separator: ","))"
            }.joined(separator: ";")),
            ("QUIESCE_FROZEN_JSON", frozenJSON(agents)),
        ]
    }

    /// QUIESCE_FROZEN_JSON: per agent, its consistency and frozen mountpoints, exact whatever
    /// characters the paths contain (QUIESCE_FROZEN's ';' ',' '=' separators cannot be).
    static func frozenJSON(_ agents: [AgentReport]) -> String {
        var o = JSONObject()
        for a in agents {
            let frozen = a.failure == nil ? (a.freeze?.filesystems.map(\.mountPoint) ?? []) : []
            let consistency = (a.failure == nil ? Consistency.of(a.freeze) : .crash).rawValue
            let notHeld = a.failure == nil ? (a.freeze.map { Consistency.notHeld($0) } ?? []) : []
            o[a.address.description] = ["consistency": .string(consistency), "frozen": .array(frozen.map(JSON.string)),
                                        "hooks_not_held": .array(notHeld.map(JSON.string))]
        }
        return JSON.object(o).text
    }

    /// `base` with every QUIESCE_* variable replaced by `vars`.
    public static func merge(base: [String], _ vars: [(String, String)]) -> [String] {
        let names = Set(vars.map { $0.0 })
        let kept = base.filter { entry in
            guard let eq = entry.firstIndex(of: "=") else { return true }
            return !names.contains(String(entry[..<eq]))
        }
        return kept + vars.map { "\($0.0)=\($0.1)" }
    }
}

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
