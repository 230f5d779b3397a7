// The one actor that owns the agent's state. Every connection's requests pass through it.
import QuiesceLinux
import QuiesceProtocol
import Logging
import Synchronization

/// Identifies a connection (a serial port gets a new one each time the host reconnects).
public typealias ConnectionID = UInt64

/// Who sent a request.
public struct RequestContext: Sendable {
    public var connection: ConnectionID
    public var peer: Peer
    public init(connection: ConnectionID, peer: Peer) {
        self.connection = connection
        self.peer = peer
    }
}

/// The agent's state machine: thawed → freezing → frozen → thawing → thawed.
///
/// The actor never blocks: kernel work runs on dedicated threads and hooks in child processes,
/// awaited outside the actor's critical sections, so `status` is answered at once in every state.
public actor AgentState {
    struct Freeze: Sendable {
        var opID: String
        var mode: FreezeMode
        var owner: ConnectionID
        var requestedBy: String
        var held: HeldFreeze
        var result: FreezeResult
        /// Hooks whose `freeze` succeeded: each is owed a `thaw` or `freeze-failed`.
        var hooksOwed: [ActiveHook]
        var hookContext: HookContext
        var sinceMs: Int64
        var frozenAt: UInt64  // monotonic ns, when the last filesystem froze
        var timeoutMs: Int64
        var deadline: UInt64  // monotonic ns
        /// What the request asked for, to tell a retry from a different request reusing the id.
        var request: FreezeRequest
        /// While thawing: when the last FITHAW returned (wall clock, ms), before the thaw hooks.
        var thawedAtMs: Int64? = nil
    }

    struct Pending: Sendable {
        var opID: String
        var request: FreezeRequest
        var mode: FreezeMode
        var owner: ConnectionID
        var requestedBy: String
        var mountPoints: [String]
        var sinceMs: Int64
        var ownerGone = false
        /// Stops the freeze hook running when the freeze is no longer wanted.
        var hookStop = HookStop()
        var hookReports: [HookReport] = []
        var waiters: [CheckedContinuation<Reply, Never>] = []
    }

    enum Phase: Sendable {
        case thawed
        case freezing(Pending)
        case frozen(Freeze)
        case thawing(Freeze)

        /// The owner of a bound freeze in this phase.
        var boundOwner: ConnectionID? {
            switch self {
            case .thawed: nil
            case .freezing(let p): p.mode == .bound ? p.owner : nil
            case .frozen(let f), .thawing(let f): f.mode == .bound ? f.owner : nil
            }
        }
    }

    private var phase: Phase = .thawed {
        didSet { boundConnection.withLock { $0 = phase.boundOwner } }
    }
    /// The connection a bound freeze belongs to while it is being taken, held or thawed: the
    /// admission of a connection past max-connections never closes that one to make room.
    /// Readable from any thread.
    nonisolated let boundConnection = Mutex<ConnectionID?>(nil)
    /// Operations that ended, newest last (at most 64): why and when (wall clock ms).
    private var endedOps: [(opID: String, reason: ThawReason, atMs: Int64, timeoutMs: Int64)] = []
    /// The files of the notes an earlier process left (`FreezeRecord.EndedFreeze`), by op id:
    /// removed once the late thaw they answer is told, or a new freeze is made.
    private var endedNotes: [String: String] = [:]

    /// The error for a late thaw of `opID`, which ended early as `ended` says; once told, the
    /// note an earlier process left for it is no longer needed.
    private func told(endedEarly opID: String, _ ended: (opID: String, reason: ThawReason, atMs: Int64, timeoutMs: Int64)) -> ProtocolError {
        dropEndedNote(opID)
        return AgentState.endedEarly(opID: opID, reason: ended.reason, atMs: ended.atMs, timeoutMs: ended.timeoutMs)
    }

    /// The host has heard of `opID`'s early end (or, with nil, moved on to a new freeze).
    private func dropEndedNote(_ opID: String?) {
        let gone = opID.map { op in endedNotes.filter { $0.key == op } } ?? endedNotes
        for (op, path) in gone {
            Paths.remove(path)
            endedNotes[op] = nil
        }
    }
    /// The last freeze taken through qemu-ga's dialect that no `guest-fsfreeze-thaw` has answered
    /// for yet: the host's thaw is checked against it (see `qgaThaw`).
    private var qgaOpID: String?
    private var lastAutoThaw: AutoThawReport?
    private var opCounter: UInt64 = 0
    private var shuttingDown = false
    /// The tasks sleeping until the current freeze's deadline: cancelled when it thaws, so that a
    /// deadline of a freeze that ended never wakes the agent.
    private var deadlineTasks: [Task<Void, Never>] = []
    /// Plans that outlived their budget and are still blocked on their threads.
    private let overduePlans = OverduePlans()
    /// Hook files refused at the last look at the hooks directory (for `status`).
    private var hooksRefused: [RefusedHook] = []

    let config: AgentConfig
    let planner: any FreezePlanner
    let engine: FreezeEngine
    let record: FreezeRecord
    let hooks: Hooks?
    let logger: Logger
    /// Thaws by itself if this actor ever misses a deadline by more than its grace.
    let guardian: DeadlineGuard
    /// Pushes an event to every connection that said hello, except the one given (the
    /// requester whose `thaw` caused a `thawed` event gets the reply instead).
    let broadcast: @Sendable (Event, _ except: ConnectionID?) -> Void
    /// Reports a one-line state to the service manager (STATUS=).
    let reportStatus: @Sendable (String) -> Void
    /// Whether someone reads the STATUS= countdown (a service manager): only then does a frozen
    /// agent wake once a second to refresh it; otherwise it sleeps until the deadline.
    let statusCountdown: Bool

    /// - Parameters:
    ///   - statusCountdown: refresh `reportStatus` every second while frozen (set it when a
    ///     service manager listens, i.e. `$NOTIFY_SOCKET` is set).
    ///   - recovered: freezes an earlier agent process left, which start-up recovery thawed
    ///     (operation id and mountpoints). `status` reports the last as `last_auto_thaw` with
    ///     reason `restart`; a `thaw` naming one is told so; a qemu-ga freeze's later
    ///     `guest-fsfreeze-thaw` fails once saying why, as after a deadline.
    ///   - endedEarlier: the same for freezes an earlier process ended by itself as it stopped,
    ///     or that `quiesced --recover` thawed (`FreezeRecord.readEndedNotes`), with their
    ///     reason and time; taken before `recovered`.
    ///   - kernel: where FIFREEZE, FITHAW and syncfs go (the real kernel; a fake in tests).
    ///   - planner: what plans a freeze (nil: `Discovery` of the live system in `config.scope`).
    public init(config: AgentConfig, logger: Logger,
                broadcast: @escaping @Sendable (Event, _ except: ConnectionID?) -> Void = { _, _ in },
                reportStatus: @escaping @Sendable (String) -> Void = { _ in },
                statusCountdown: Bool = false,
                recovered: [(opID: String, filesystems: [String])] = [],
                endedEarlier: [FreezeRecord.EndedFreeze] = [],
                kernel: any FilesystemKernel = LinuxFilesystemKernel(),
                planner: (any FreezePlanner)? = nil) {
        self.config = config
        self.planner = planner ?? Discovery(scope: config.scope)
        self.engine = FreezeEngine(onFrozenElsewhere: config.onFrozenElsewhere, presync: config.presync, kernel: kernel)
        self.record = FreezeRecord(stateDir: config.stateDir, hooksDir: config.hooksDir, identity: config.identity)
        self.hooks = config.hooksDir.map { Hooks(directory: $0, timeoutMs: config.hookTimeoutMs, maxTimeoutMs: config.maxFreezeMs, logger: logger) }
        self.logger = logger
        self.guardian = DeadlineGuard(kernel: kernel) { [logger] opID, mounts in
            logger.critical("deadline guard thawed \(mounts.joined(separator: ", ")) itself: the agent missed the deadline",
                            metadata: ["op_id": "\(opID)"])
        }
        self.broadcast = broadcast
        self.reportStatus = reportStatus
        self.statusCountdown = statusCountdown
        let at = wallClockMillis()
        let ended = endedEarlier.map { (opID: $0.opID, filesystems: $0.filesystems, reason: $0.reason, atMs: $0.atMs) }
            + recovered.map { (opID: $0.opID, filesystems: $0.filesystems, reason: ThawReason.restart, atMs: at) }
        endedNotes = Dictionary(endedEarlier.compactMap { n in n.path.map { (n.opID, $0) } }, uniquingKeysWith: { _, last in last })
        for r in ended.suffix(64) {
            endedOps.append((r.opID, r.reason, r.atMs, 0))
            lastAutoThaw = AutoThawReport(reason: r.reason, opID: r.opID, atMs: r.atMs, filesystems: r.filesystems)
            if r.opID.hasPrefix(AgentState.qgaOpPrefix) { qgaOpID = r.opID }
        }
    }

    /// Answers one request. `hello` and `ping` are answered by the connection itself.
    public func handle(_ request: Request, context: RequestContext) async -> Reply {
        let id = request.id
        func reply(_ r: Result<JSONObject, ProtocolError>) -> Reply {
            switch r {
            case .success(let o): Reply(id: id, result: o)
            case .failure(let e): Reply(id: id, error: e)
            }
        }
        switch request.operation {
        case .hello, .ping:
            return Reply(id: id, result: [:])
        case .status:
            return Reply(id: id, result: status().json)
        case .filesystems(let mounts):
            switch await plan(explicitMounts: mounts) {
            case .success(let plan):
                return Reply(id: id, result: FilesystemsResult(filesystems: plan.targets.map(\.report), skipped: plan.skipped).json)
            case .failure(let error):
                return Reply(id: id, error: error)
            }
        case .freeze(let r):
            return await freeze(r, context: context, id: id)
        case .thaw(let opID):
            return reply(await thaw(opID: opID, reason: .request, requester: context.connection).map(\.json))
        case .sync(let mounts):
            return reply(await sync(mounts: mounts).map(\.json))
        case .keepalive(let opID, let timeoutMs):
            return reply(keepalive(opID: opID, timeoutMs: timeoutMs))
        }
    }

    /// Plans on the planning pool (`WorkPools.planning`): discovery reads /proc and sysfs and
    /// opens a loop device's backing file, which blocks for as long as the server of a FUSE or
    /// network filesystem does not answer; the actor must not. The wait, queueing included, is
    /// bounded by the step timeout. While a plan that outlived that budget is still blocked, the
    /// next one fails at once instead of queueing behind it.
    private func plan(explicitMounts: [String]?) async -> Result<(targets: [FreezeTarget], skipped: [SkippedReport]), ProtocolError> {
        if overduePlans.count > 0 {
            return .failure(ProtocolError(.busy, "an earlier reading of the mounts and block devices is still blocked (a FUSE or network filesystem's server is not answering); try again later"))
        }
        let planner = self.planner
        let stuck = engine.stuck.devices
        let budgetMs = config.freezeStepTimeoutMs
        let overdue = self.overduePlans
        let token = overdue.newToken()
        let result = await WorkPools.planning.run(until: monotonicNanos() + UInt64(budgetMs) * 1_000_000) {
            overdue.started(token)
            defer { overdue.finished(token) }
            return Result { () throws(ProtocolError) in try planner.plan(explicitMounts: explicitMounts, avoiding: stuck) }
        }
        if case .none = result { overdue.gaveUp(token) }
        return result ?? .failure(ProtocolError(
            .busy, "reading the mounts and block devices did not finish within \(budgetMs) ms (a FUSE or network filesystem's server is not answering?); nothing was frozen"))
    }

    // MARK: - Status

    public func status() -> StatusResult {
        switch phase {
        case .thawed:
            return StatusResult(state: .thawed, lastAutoThaw: lastAutoThaw, hooksRefused: hooksRefused,
                                stuck: engine.stuck.current)
        case .freezing(let p):
            return StatusResult(state: .freezing, opID: p.opID, mode: p.mode, filesystems: p.mountPoints,
                                sinceMs: p.sinceMs, requestedBy: p.requestedBy, lastAutoThaw: lastAutoThaw,
                                hooks: p.hookReports, hooksRefused: hooksRefused, stuck: engine.stuck.current)
        case .frozen(let f), .thawing(let f):
            // While thawing there is no deadline to count down: the thaw is under way (and the
            // filesystems may already be thawed while the thaw hooks run).
            let remainingMs = isThawing ? nil
                : max(0, Int64((Int64(bitPattern: f.deadline) - Int64(bitPattern: monotonicNanos())) / 1_000_000))
            return StatusResult(state: isThawing ? .thawing : .frozen, opID: f.opID, mode: f.mode,
                                filesystems: f.held.mountPoints, sinceMs: f.sinceMs, deadlineMs: isThawing ? nil : f.result.deadlineMs,
                                remainingMs: remainingMs, requestedBy: f.requestedBy, lastAutoThaw: lastAutoThaw,
                                hooks: liveHookReports(f), hooksRefused: hooksRefused, stuck: engine.stuck.current,
                                thawedAtMs: isThawing ? f.thawedAtMs : nil)
        }
    }

    /// The freeze's hook reports as they stand: a holding hook that has ended shows `lost`.
    private func liveHookReports(_ f: Freeze) -> [HookReport] {
        f.result.hooks.map { r in
            guard r.outcome == .holding, let owed = f.hooksOwed.first(where: { $0.spec.name == r.name }) else { return r }
            return owed.liveReport(r)
        }
    }

    private var isThawing: Bool { if case .thawing = phase { return true }; return false }

    /// A one-line summary for systemd's STATUS=.
    private func statusLine() -> String {
        switch phase {
        case .thawed:
            if let a = lastAutoThaw { return "thawed (last auto-thaw: \(a.reason))" }
            return "thawed"
        case .freezing(let p): return "freezing: \(p.mountPoints.count) filesystems"
        case .frozen(let f):
            let s = max(0, (Int64(bitPattern: f.deadline) - Int64(bitPattern: monotonicNanos())) / 1_000_000_000)
            return "frozen: \(f.held.entries.count) filesystems, auto-thaw in \(s) s"
        case .thawing(let f): return "thawing: \(f.held.entries.count) filesystems"
        }
    }

    // MARK: - Freeze

    /// What makes `retry` another request than `original` under the same op_id: its mounts (as
    /// sets, after the plan's normalisation) or its mode; nil when it is a true retry.
    static func differs(_ retry: FreezeRequest, from original: FreezeRequest) -> String? {
        func mounts(_ r: FreezeRequest) -> Set<String>? { r.mounts.map { Set($0.map(FreezePlan.normalise)) } }
        if mounts(retry) != mounts(original) { return "mounts" }
        if retry.mode != original.mode { return "mode" }
        return nil
    }

    private func freeze(_ r: FreezeRequest, context: RequestContext, id: JSON?) async -> Reply {
        if shuttingDown { return Reply(id: id, error: ProtocolError(.shuttingDown, "the agent is stopping")) }
        switch phase {
        case .frozen(let f):
            if r.opID == f.opID {
                if let mismatch = AgentState.differs(r, from: f.request) {
                    return Reply(id: id, error: ProtocolError(.badRequest, "op_id \(f.opID) names a freeze with other \(mismatch); a retry must repeat the request, a new freeze needs a new op_id"))
                }
                var replay = f.result
                replay.replayed = true
                return Reply(id: id, result: replay.json)
            }
            return Reply(id: id, error: ProtocolError(.alreadyFrozen, "already frozen by operation \(f.opID) (\(f.requestedBy))",
                                                      details: ["op_id": .string(f.opID)]))
        case .freezing(var p):
            guard r.opID == p.opID else {
                return Reply(id: id, error: ProtocolError(.busy, "a freeze (\(p.opID)) is in progress"))
            }
            if let mismatch = AgentState.differs(r, from: p.request) {
                return Reply(id: id, error: ProtocolError(.badRequest, "op_id \(p.opID) names a freeze with other \(mismatch); a retry must repeat the request, a new freeze needs a new op_id"))
            }
            // The same operation asked again while it is being taken: answer when it is done.
            let reply = await withCheckedContinuation { (c: CheckedContinuation<Reply, Never>) in
                p.waiters.append(c)
                phase = .freezing(p)
            }
            var out = reply
            out.id = id
            return out
        case .thawing:
            return Reply(id: id, error: ProtocolError(.busy, "a thaw is in progress"))
        case .thawed:
            break
        }
        if let opID = r.opID, let ended = endedOps.first(where: { $0.opID == opID }) {
            return Reply(id: id, error: ProtocolError(.badRequest, "operation \(opID) already ended (thawed: \(ended.reason.rawValue)); use a new op_id"))
        }

        let plan: (targets: [FreezeTarget], skipped: [SkippedReport])
        switch await self.plan(explicitMounts: r.mounts) {
        case .success(let p): plan = p
        case .failure(let error): return Reply(id: id, error: error)
        }
        // The plan was made outside the actor: if another freeze started meanwhile, decide again
        // from the new state (a repeat of the same op_id then waits for it or replays it).
        guard case .thawed = phase, !shuttingDown else {
            return await freeze(r, context: context, id: id)
        }
        guard !plan.targets.isEmpty else {
            return Reply(id: id, error: ProtocolError(.freezeFailed, "no eligible filesystem in scope (\(plan.skipped.count) skipped)"))
        }
        // A state dir inside the freeze would hang the agent with the guest frozen, or leave the
        // record naming what it must not (trial K). Refused, saying what to change.
        if let inside = record.target(holdingStateDirIn: plan.targets) {
            return Reply(id: id, error: ProtocolError(.freezeFailed,
                "state-dir \(config.stateDir) is on \(inside.mountPoint), which this freeze would freeze: the crash-safety record cannot be written while it is frozen. Put state-dir on a tmpfs (the default, /run/quiesce), or leave \(inside.mountPoint) out of the freeze; nothing was frozen",
                details: ["mountpoint": .string(inside.mountPoint)]))
        }
        opCounter += 1
        let opID = r.opID ?? "op-\(wallClockMillis())-\(opCounter)"
        let timeoutMs = min(r.timeoutMs ?? config.maxFreezeMs, config.maxFreezeMs)
        let start = monotonicNanos()
        let sinceMs = wallClockMillis()
        let mountPoints = plan.targets.map(\.mountPoint)
        phase = .freezing(Pending(opID: opID, request: r, mode: r.mode, owner: context.connection, requestedBy: context.peer.description,
                                  mountPoints: mountPoints, sinceMs: sinceMs))
        reportStatus(statusLine())
        var log = logger
        log[metadataKey: "op_id"] = "\(opID)"
        log.info("freeze requested", metadata: ["peer": "\(context.peer)", "filesystems": "\(mountPoints.joined(separator: ","))",
                                                "timeout_ms": "\(timeoutMs)", "mode": "\(r.mode.rawValue)"])

        // Crash safety: the record exists before anything is done, and names filesystems only
        // from just before their FIFREEZE (`WaveRecorder`): until then a crash's
        // recovery ends the owed hooks and FITHAWs nothing, so a filesystem that another party
        // froze while the hooks or the presync ran keeps its freeze (before: every planned
        // filesystem was named from the start, trial I).
        do {
            try record.write(opID: opID, targets: [])
        } catch {
            return finishFailedFreeze(ProtocolError(.internal, "cannot write the freeze record: \(error)"), id: id, log: log)
        }

        // Freeze hooks run before any filesystem freezes (applications flush and pause, or take
        // a lock that a hold-style hook keeps until its ending).
        var hookReports: [HookReport] = []
        var hooksOwed: [ActiveHook] = []
        var refused: [RefusedHook] = []
        let hookContext = HookContext(opID: opID, mounts: mountPoints, freezeTimeoutMs: timeoutMs)
        if let hooks {
            let listing = await WorkPools.hooks.run { hooks.list() }
            refused = listing.refused
            hooksRefused = refused
            for r in refused { log.warning("hook \(r.name) refused: \(r.reason)") }
            let record = self.record
            let stop: HookStop? = if case .freezing(let p) = phase { p.hookStop } else { nil }
            let outcome = await hooks.runFreeze(listing.hooks, context: hookContext,
                                                abandon: { await self.abandonReason(opID: opID) },
                                                stop: stop,
                                                onOwed: { owed in try? record.write(opID: opID, targets: [], hooksOwed: owed.map(\.spec.name), hookContext: hookContext) },
                                                onReport: { reports in await self.noteHookReports(reports, opID: opID) })
            hookReports = outcome.reports
            hooksOwed = outcome.owed
            if let failure = outcome.failure {
                hookReports += await hooks.end(hooksOwed, phase: .freezeFailed, context: hookContext)
                record.remove()
                return finishFailedFreeze(ProtocolError(.hookFailed, failure, details: hookDetails(hookReports, refused)),
                                          id: id, log: log)
            }
        }

        LogGate.shared.hold()
        // The kernel side is bounded by the step timeout and, whatever happens, by this freeze's
        // own deadline counted from the request: a FIFREEZE that never returns cannot keep the
        // guest frozen past it.
        let budget = FreezeBudget(stepNanos: UInt64(min(config.freezeStepTimeoutMs, timeoutMs)) * 1_000_000,
                                  deadline: start + UInt64(timeoutMs) * 1_000_000,
                                  setByRequest: timeoutMs < config.freezeStepTimeoutMs)
        // The freeze's timeout counts from the request, so slow freeze hooks take their share
        // of it; a step cut short then names them, not the storage (trial H).
        let hooksTook = hookReports.isEmpty ? nil : TimeSpan.human(microseconds: hookReports.reduce(0) { $0 + $1.durationUs })
        let outcome: Result<FreezeOutcome, FreezeFailure>
        if let hooksTook, monotonicNanos() >= budget.deadline {
            outcome = .failure(FreezeFailure(error: ProtocolError(.freezeFailed,
                "the freeze hooks took \(hooksTook), the whole of the freeze's timeout (\(TimeSpan.human(milliseconds: timeoutMs))): nothing was frozen; ask for a longer timeout_ms"),
                filesystems: []))
        } else {
            let recorder = WaveRecorder(record: record, opID: opID, hooksOwed: hooksOwed.map(\.spec.name), hookContext: hookContext)
            outcome = await engine.freeze(plan.targets, explicit: r.mounts != nil, opID: opID, budget: budget, progress: recorder)
            recorder.close()
        }
        switch outcome {
        case .failure(var failure):
            if let hooksTook, failure.error.details?["stuck"] != nil {
                failure.error.message += " (the freeze hooks had taken \(hooksTook) of the freeze's timeout, \(TimeSpan.human(milliseconds: timeoutMs)), counted from the request)"
            }
            LogGate.shared.release()
            if let hooks, !hooksOwed.isEmpty {
                // While the freeze-failed hooks run, the record names only what the failed freeze
                // may still hold: a crash's --recover must not FITHAW a filesystem that another
                // party froze (the EBUSY that failed this freeze) or froze after the rollback.
                let mayHold = Set(failure.mayHold)
                try? record.write(opID: opID, targets: plan.targets.filter { mayHold.contains($0.mountPoint) },
                                  hooksOwed: hooksOwed.map(\.spec.name), hookContext: hookContext)
                hookReports += await hooks.end(hooksOwed, phase: .freezeFailed, context: hookContext)
            }
            record.remove()
            var error = failure.error
            if !hookReports.isEmpty || !refused.isEmpty {
                var d = error.details ?? [:]
                let extra = hookDetails(hookReports, refused)
                d["hooks"] = extra["hooks"]
                if let r = extra["hooks_refused"] { d["hooks_refused"] = r }
                error.details = d
            }
            return finishFailedFreeze(error, id: id, log: log)
        case .success(let done):
            let deadline = monotonicNanos() + UInt64(timeoutMs) * 1_000_000
            // A holding hook that has ended already (it said ready, then exited before or while
            // the filesystems froze) is `lost` in the reply, as status shows it: its lock did
            // not cover the freeze (before: `holding`, and COMMAND was told application; trial H).
            let liveReports = hookReports.map { report in
                guard report.outcome == .holding, let owed = hooksOwed.first(where: { $0.spec.name == report.name }) else { return report }
                return owed.liveReport(report)
            }
            let result = FreezeResult(
                opID: opID, mode: r.mode, filesystems: done.filesystems, skipped: plan.skipped + done.skipped,
                hooks: liveReports, presyncUs: done.presyncUs, freezeUs: done.freezeUs, stallUs: done.stallUs,
                totalUs: micros(since: start), timeoutMs: timeoutMs, deadlineMs: wallClockMillis() + timeoutMs,
                hooksRefused: refused)
            guard case .freezing(let pending) = phase else { preconditionFailure("phase changed during freeze") }
            let freeze = Freeze(opID: opID, mode: r.mode, owner: context.connection, requestedBy: context.peer.description,
                                held: done.held, result: result, hooksOwed: hooksOwed, hookContext: hookContext, sinceMs: sinceMs,
                                frozenAt: monotonicNanos(), timeoutMs: timeoutMs, deadline: deadline, request: r)
            phase = .frozen(freeze)
            // What is held now: not the filesystems skipped at their FIFREEZE (frozen by another
            // party under on-frozen-elsewhere = skip, or not freezable).
            try? record.write(opID: opID, targets: done.held.entries.map(\.target), hooksOwed: hooksOwed.map(\.spec.name),
                              filesystemsFreezing: true, hookContext: hookContext)
            dropEndedNote(nil)  // a new freeze: the host has moved on from those that ended early
            guardian.arm(opID: opID, held: done.held, deadline: deadline)
            log.info("frozen", metadata: ["filesystems": "\(done.held.entries.count)", "stall_us": "\(done.stallUs)",
                                          "presync_us": "\(done.presyncUs)", "presync_passes": "\(done.presyncPasses)", "total_us": "\(result.totalUs)"])
            reportStatus(statusLine())
            var replay = result
            replay.replayed = true
            for w in pending.waiters { w.resume(returning: Reply(id: nil, result: replay.json)) }
            deadlineTasks.append(Task { await self.enforceDeadline(opID: opID) })
            if shuttingDown {
                _ = await thaw(opID: opID, reason: .signal, abandoned: true)
            } else if pending.ownerGone && r.mode == .bound && config.thawOnDisconnect {
                _ = await thaw(opID: opID, reason: .disconnect, abandoned: true)
            }
            return Reply(id: id, result: result.json)
        }
    }

    /// Why a freeze being taken should be given up between hooks: its requester left (a bound
    /// freeze that thaws on disconnect), or the agent is stopping. Nil to go on.
    private func abandonReason(opID: String) -> String? {
        if shuttingDown { return "the agent is stopping" }
        if case .freezing(let p) = phase, p.opID == opID, p.ownerGone, p.mode == .bound, config.thawOnDisconnect {
            return "the requester went away during the freeze"
        }
        return nil
    }

    /// Keeps the hook reports of a freeze being taken, for `status`.
    private func noteHookReports(_ reports: [HookReport], opID: String) {
        if case .freezing(var p) = phase, p.opID == opID {
            p.hookReports = reports
            phase = .freezing(p)
        }
    }

    private func hookDetails(_ reports: [HookReport], _ refused: [RefusedHook]) -> JSONObject {
        var d: JSONObject = ["hooks": .array(reports.map { .object($0.json) })]
        if !refused.isEmpty { d["hooks_refused"] = .array(refused.map { .object($0.json) }) }
        return d
    }

    private func finishFailedFreeze(_ error: ProtocolError, id: JSON?, log: Logger) -> Reply {
        if case .freezing(let p) = phase {
            for w in p.waiters { w.resume(returning: Reply(id: nil, error: error)) }
        }
        phase = .thawed
        log.warning("freeze failed", metadata: ["code": "\(error.code)", "error": "\(error.message)"])
        reportStatus(statusLine())
        return Reply(id: id, error: error)
    }

    // MARK: - Deadline, keepalive, disconnect

    /// Sleeps until the freeze's deadline (which keepalives may push) and thaws it there.
    /// Under a service manager (`statusCountdown`) it wakes once a second meanwhile to keep the
    /// STATUS= countdown live; without one it sleeps until the deadline (a keepalive that moved
    /// it only makes it sleep again).
    private func enforceDeadline(opID: String) async {
        while case .frozen(let f) = phase, f.opID == opID {
            let now = monotonicNanos()
            if now >= f.deadline {
                _ = await thaw(opID: opID, reason: .deadline)
                return
            }
            let wait = f.deadline - now
            if statusCountdown {
                reportStatus(statusLine())
                await AsyncSleep.nanoseconds(min(wait, 1_000_000_000))
            } else {
                await AsyncSleep.nanoseconds(wait)
            }
        }
    }

    private func keepalive(opID: String?, timeoutMs: Int64?) -> Result<JSONObject, ProtocolError> {
        guard case .frozen(var f) = phase else {
            if case .thawed = phase { return .failure(ProtocolError(.notFrozen, "nothing is frozen")) }
            return .failure(ProtocolError(.busy, "a freeze or thaw is in progress"))
        }
        if let opID, opID != f.opID {
            return .failure(ProtocolError(.notFrozen, "operation \(opID) does not hold the freeze (\(f.opID) does)"))
        }
        let ms = min(timeoutMs ?? f.timeoutMs, config.maxFreezeMs)
        let earlier = f.deadline
        f.deadline = monotonicNanos() + UInt64(ms) * 1_000_000
        f.result.deadlineMs = wallClockMillis() + ms
        phase = .frozen(f)
        guardian.extend(to: f.deadline)
        // A keepalive may bring the deadline closer: the deadline task sleeps until the one it
        // saw, so one more wakes at the new one (each re-checks the current deadline).
        if f.deadline < earlier {
            let opID = f.opID
            deadlineTasks.append(Task { await self.enforceDeadline(opID: opID) })
        }
        reportStatus(statusLine())
        return .success(status().json)
    }

    /// A connection closed: a freeze bound to it thaws (unless configured otherwise).
    public func connectionClosed(_ connection: ConnectionID) async {
        guard config.thawOnDisconnect else { return }
        switch phase {
        case .freezing(var p) where p.owner == connection && p.mode == .bound:
            p.ownerGone = true
            phase = .freezing(p)
            // An earlier hold-style hook keeps its application locked until this ends.
            p.hookStop.stop("the requester went away during the freeze")
        case .frozen(let f) where f.owner == connection && f.mode == .bound:
            _ = await thaw(opID: f.opID, reason: .disconnect)
        default:
            break
        }
    }

    // MARK: - Thaw

    /// Thaws the current freeze. Idempotent: thawing when thawed succeeds with `wasFrozen` false.
    /// `abandoned`: the freeze was given up before its requester had it; its hooks get
    /// `freeze-failed` instead of `thaw`. `requester`: the connection whose `thaw` request this
    /// is; the `thawed` event goes to every other hello'd connection (PROTOCOL.md section 7).
    public func thaw(opID: String?, reason: ThawReason, abandoned: Bool = false,
                     requester: ConnectionID? = nil) async -> Result<ThawResult, ProtocolError> {
        let f: Freeze
        switch phase {
        case .thawed:
            if let opID {
                guard let ended = endedOps.last(where: { $0.opID == opID }) else {
                    return .failure(ProtocolError(.notFrozen, "operation \(opID) does not hold a freeze"))
                }
                if ended.reason != .request {
                    return .failure(told(endedEarly: opID, ended))
                }
            }
            return .success(ThawResult(opID: opID, wasFrozen: false, filesystems: [], totalUs: 0, frozenUs: nil))
        case .freezing, .thawing:
            return .failure(ProtocolError(.busy, "a freeze or thaw is in progress; try again"))
        case .frozen(let current):
            if let opID, opID != current.opID {
                if let ended = endedOps.last(where: { $0.opID == opID }), ended.reason != .request {
                    return .failure(told(endedEarly: opID, ended))
                }
                return .failure(ProtocolError(.notFrozen, "operation \(opID) does not hold the freeze (\(current.opID) does)",
                                              details: ["frozen_by": .string(current.opID)]))
            }
            f = current
        }
        phase = .thawing(f)
        let outcome = await engine.thaw(f.held)
        // Frozen until the last FITHAW returned; the thaw hooks below run with writers free.
        let frozenUs = micros(since: f.frozenAt)
        LogGate.shared.release()
        // From here on the deadline guard and the freeze record (a crashed agent's --recover)
        // may FITHAW only what this freeze still holds: the thaw hooks can take minutes, and
        // another party (fsfreeze, qemu-ga, a backup tool) may freeze a thawed filesystem
        // meanwhile, which a late FITHAW of ours would end behind its back.
        let retryDeadline = min(f.deadline, monotonicNanos() + 1_000_000_000)
        if outcome.remaining.isEmpty {
            guardian.disarm()
            // Status says so while the thaw hooks run: a host that stopped waiting for this
            // thaw's reply learns that the filesystems were thawed.
            if case .thawing(var t) = phase { t.thawedAtMs = wallClockMillis(); phase = .thawing(t) }
        } else {
            guardian.arm(opID: f.opID, held: outcome.remaining, deadline: retryDeadline)
        }
        let owed = hooks == nil ? [] : f.hooksOwed.map(\.spec.name)
        if outcome.remaining.isEmpty && owed.isEmpty {
            record.remove()
        } else {
            // A crash during the thaw hooks: recovery ends them (thaw, or freeze-failed when
            // abandoned) and thaws only what is still held.
            try? record.write(opID: f.opID, targets: outcome.remaining.entries.map(\.target), hooksOwed: owed,
                              filesystemsFreezing: !abandoned, hookContext: f.hookContext)
        }
        var log = logger
        log[metadataKey: "op_id"] = "\(f.opID)"
        var hookReports: [HookReport] = []
        if let hooks, !f.hooksOwed.isEmpty {
            hookReports = await hooks.end(f.hooksOwed, phase: abandoned ? .freezeFailed : .thaw, context: f.hookContext)
            // Ended once: a retry of a failed thaw must not end them again.
            if case .thawing(var t) = phase { t.hooksOwed = []; phase = .thawing(t) }
        }
        let result = ThawResult(opID: f.opID, wasFrozen: true, filesystems: outcome.filesystems, hooks: hookReports,
                                totalUs: outcome.totalUs, frozenUs: frozenUs)
        if !outcome.remaining.isEmpty {
            // Keep holding what did not thaw; the deadline loop retries.
            var still = f
            still.hooksOwed = []
            still.held = outcome.remaining
            still.deadline = retryDeadline
            phase = .frozen(still)
            try? record.write(opID: f.opID, targets: outcome.remaining.entries.map(\.target))
            deadlineTasks.append(Task { await self.enforceDeadline(opID: f.opID) })
            log.error("thaw failed", metadata: ["errors": "\(outcome.errors.joined(separator: "; "))"])
            reportStatus(statusLine())
            return .failure(ProtocolError(.thawFailed, "could not thaw: \(outcome.errors.joined(separator: "; "))",
                                          details: ["result": .object(result.json)]))
        }
        phase = .thawed
        guardian.disarm()
        for t in deadlineTasks { t.cancel() }
        deadlineTasks = []
        record.remove()
        if reason == .signal {
            // This process is about to exit: its successor must know, for the host's late thaw.
            FreezeRecord.leaveEndedNote(.init(opID: f.opID, filesystems: outcome.filesystems.map(\.mountPoint), reason: reason,
                                              identity: config.identity), stateDir: config.stateDir)
        }
        endedOps.append((f.opID, reason, wallClockMillis(), f.timeoutMs))
        if endedOps.count > 64 { endedOps.removeFirst() }
        log.info("thawed", metadata: ["reason": "\(reason.rawValue)", "frozen_us": "\(frozenUs)", "thaw_us": "\(outcome.totalUs)"])
        let elsewhere = outcome.filesystems.filter { $0.thawedElsewhere == true }.map(\.mountPoint)
        if !elsewhere.isEmpty {
            log.warning("\(elsewhere.joined(separator: ", ")) was no longer frozen at the thaw: something else thawed it (fsfreeze -u, qemu-ga's guest-fsfreeze-thaw) while this freeze held it; a copy taken after that was not quiesced")
        }
        let at = wallClockMillis()
        if reason != .request {
            lastAutoThaw = AutoThawReport(reason: reason, opID: f.opID, atMs: at, filesystems: f.held.mountPoints)
        }
        broadcast(.thawed(opID: f.opID, reason: reason, atMs: at, filesystems: f.held.mountPoints, errors: outcome.errors),
                  reason == .request ? requester : nil)
        reportStatus(statusLine())
        return .success(result)
    }

    /// The error for a thaw that came after the agent had already ended its operation by itself:
    /// the requester's snapshot may have been taken partly unfrozen, and must hear so (libvirt
    /// fails a snapshot whose thaw fails). Code `not-frozen`, details `op_id`, `thawed_reason`
    /// (a `ThawReason`), `thawed_at_ms` (wall clock, ms since the epoch).
    static func endedEarly(opID: String, reason: ThawReason, atMs: Int64, timeoutMs: Int64) -> ProtocolError {
        let why = switch reason {
        case .deadline: "its deadline passed (\(timeoutMs) ms without a thaw or keepalive; --max-freeze caps it)"
        case .disconnect: "the connection (or device session) it was bound to closed"
        case .signal: "the agent was stopped"
        case .restart: "the agent restarted"
        case .request: "a thaw request"
        default: "\(reason)"
        }
        let ago = TimeSpan.human(microseconds: max(0, wallClockMillis() - atMs) * 1000)
        return ProtocolError(.notFrozen,
            "operation \(opID) was thawed by the agent before this thaw: at \(utcTimestamp(millis: atMs)) (\(ago) ago), because \(why); a snapshot taken after that was not quiesced",
            details: ["op_id": .string(opID), "thawed_reason": .string(reason.rawValue), "thawed_at_ms": .int(atMs)])
    }

    // MARK: - qemu-ga's dialect

    /// `guest-fsfreeze-freeze[-list]`: a detached freeze with the agent's max-freeze, remembered
    /// so that the host's later `guest-fsfreeze-thaw` can be told if it came too late.
    public func qgaFreeze(mounts: [String]?, context: RequestContext) async -> Reply {
        // The prefix survives in the crash record, so an agent restarted under the freeze knows
        // the host's next guest-fsfreeze-thaw is owed the truth (`recovered(opID:filesystems:)`).
        opCounter += 1
        let opID = "\(AgentState.qgaOpPrefix)\(wallClockMillis())-\(opCounter)"
        let reply = await freeze(FreezeRequest(mounts: mounts, timeoutMs: nil, opID: opID, mode: .detached), context: context, id: nil)
        if case .success(let result) = reply.outcome, case .string(let op)? = result["op_id"] { qgaOpID = op }
        return reply
    }

    /// Operation ids of freezes taken through qemu-ga's dialect start with this.
    static let qgaOpPrefix = "qga-"

    /// `guest-fsfreeze-thaw`. qemu-ga's thaw has no operation id; this one stands for the last
    /// freeze taken through qemu-ga's dialect. If that freeze ended before the host's thaw came
    /// (the agent's deadline or a signal, another client's thaw, or so long ago that how is
    /// forgotten), the thaw fails saying so, once, and never thaws another client's freeze in
    /// its place; with no freeze of this dialect outstanding it thaws whatever the agent holds
    /// (0 filesystems when nothing; an administrator's rescue with `virsh domfsthaw`).
    public func qgaThaw() async -> Result<ThawResult, ProtocolError> {
        if let op = qgaOpID {
            switch phase {
            case .freezing, .thawing: return .failure(ProtocolError(.busy, "a freeze or thaw is in progress; try again"))
            case .frozen(let f) where f.opID == op:
                qgaOpID = nil
                return await thaw(opID: op, reason: .request)
            case .frozen, .thawed:
                qgaOpID = nil
                // Never thaws another client's freeze: that one is not this dialect's to end.
                var other = ""
                if case .frozen(let f) = phase { other = "; the freeze held now (op \(f.opID)) is another client's and stays" }
                if let ended = endedOps.last(where: { $0.opID == op }) {
                    if ended.reason != .request {
                        return .failure(told(endedEarly: op, ended))
                    }
                    if !other.isEmpty {
                        return .failure(ProtocolError(.notFrozen, "the freeze taken through qemu-ga's protocol (op \(op)) was thawed by another client's request before this thaw\(other)",
                                                      details: ["op_id": .string(op), "thawed_reason": .string(ended.reason.rawValue)]))
                    }
                } else {
                    // Forgotten (more than 64 operations since): it ended before this thaw, by
                    // itself or by someone else; either way not at the host's word.
                    return .failure(ProtocolError(.notFrozen, "the freeze taken through qemu-ga's protocol (op \(op)) had ended before this thaw (how is no longer remembered: over 64 operations since); a snapshot taken after it ended was not quiesced\(other)",
                                                  details: ["op_id": .string(op)]))
                }
            }
        }
        return await thaw(opID: nil, reason: .request)
    }

    // MARK: - Sync

    private func sync(mounts: [String]?) async -> Result<SyncResult, ProtocolError> {
        guard case .thawed = phase else {
            return .failure(ProtocolError(.busy, "sync is not allowed while frozen or during a freeze or thaw"))
        }
        let targets: [FreezeTarget]
        switch await plan(explicitMounts: mounts) {
        case .success(let p): targets = p.targets
        case .failure(let error): return .failure(error)
        }
        let done = await engine.sync(targets)
        let result = SyncResult(filesystems: done.filesystems, totalUs: done.totalUs)
        let errors = done.filesystems.compactMap { fs in fs.error.map { "\(fs.mountPoint): \($0)" } }
        if !errors.isEmpty {
            return .failure(ProtocolError(.syncFailed, errors.joined(separator: "; "), details: ["result": .object(result.json)]))
        }
        return .success(result)
    }

    // MARK: - Shutdown

    /// Stops taking freezes and thaws whatever is frozen (SIGTERM, SIGINT). Returns when thawed.
    /// A freeze in progress is waited for, however long its hooks take (they have timeouts):
    /// exiting in the middle of one could leave filesystems frozen with nobody to thaw them.
    public func shutdown() async {
        shuttingDown = true
        if case .freezing(let p) = phase { p.hookStop.stop("the agent is stopping") }
        while true {
            switch phase {
            case .thawed: return
            case .frozen(let f):
                if case .failure = await thaw(opID: f.opID, reason: .signal) {
                    await AsyncSleep.nanoseconds(1_000_000_000)  // a device refusing FITHAW: retry, don't spin
                }
            case .freezing, .thawing: await AsyncSleep.nanoseconds(10_000_000)
            }
        }
    }
}

/// Plans whose caller gave up at the step timeout while they were still running: counted until
/// they return. A plan given up while still queued never runs, and is not counted.
final class OverduePlans: Sendable {
    private enum Plan { case running, overdue }
    private let state = Mutex<(next: UInt64, plans: [UInt64: Plan])>((0, [:]))

    func newToken() -> UInt64 { state.withLock { $0.next += 1; return $0.next } }
    func started(_ token: UInt64) { state.withLock { $0.plans[token] = .running } }
    func finished(_ token: UInt64) { state.withLock { _ = $0.plans.removeValue(forKey: token) } }
    func gaveUp(_ token: UInt64) {
        state.withLock { s in if s.plans[token] == .running { s.plans[token] = .overdue } }
    }
    var count: Int { state.withLock { $0.plans.values.filter { $0 == .overdue }.count } }
}
