// The coordinator's loop for one checkpoint: wait for the freezes, apply the policy, run and watch COMMAND, thaw, judge the outcome.
import QuiesceLinux
import QuiesceProtocol

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
    var pid: Int32?
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

    func note(_ at: UInt64, _ agent: Int?, _ event: String, _ message: String, detail: [String] = []) {
        let entry = TimelineEntry(offsetNs: at > start ? at - start : 0, agent: agent.map { plan.agents[$0].description },
                                  event: event, message: message, detail: detail)
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
            // Tied to this thread, which watches COMMAND until it ends: if quiescectl is killed
            // (SIGKILL, the OOM killer), COMMAND gets SIGTERM instead of copying on after the
            // agents have thawed for the lost connection.
            let child = try Subprocess.spawn(argumentBytes: plan.commandArguments, environmentBytes: merged, newProcessGroup: true,
                                             stdoutToStderr: plan.commandStdoutToStderr, parentDeathSignal: Signals.terminate)
            pid = child
            report.command?.pid = child
            report.command?.startedNs = monotonicNanos() - start
            note(monotonicNanos(), nil, "command-started", "\(report.consistency!.adjective): running \(shellQuoted(bytes: plan.commandArguments)) (pid \(child))")
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
                    signalCommand(Signals.terminate)
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
            signalCommand(Signals.forceKill)
            killAt = monotonicNanos() + 10_000_000_000
        } else {
            note(monotonicNanos(), nil, "kill", "COMMAND (pid \(pid)) did not exit 10 s after SIGKILL; not waiting for it")
            childExited = true
            report.command?.abandoned = true
        }
    }

    func reap(_ pid: Int32) {
        guard report.command?.abandoned != true, report.command?.status == nil else { return }
        if let status = try? Subprocess.wait(pid) { report.command?.status = status }
    }

    // MARK: Thaw

    func startThaw() {
        guard !thawStarted else { return }
        thawStarted = true
        guard !thawPending.isEmpty else { return }
        note(monotonicNanos(), nil, "thaw", "thawing \(thawPending.count) agent\(thawPending.count == 1 ? "" : "s")")
        for i in thawPending { sessions[i].orderThaw() }
    }

    /// Gives up on agents that did not freeze in time: each counts as failed, and its connection
    /// is dropped, which ends its session and makes the agent thaw a freeze it takes late.
    func abandon(_ late: Set<Int>) {
        let now = monotonicNanos()
        for i in late.sorted() {
            abandoned.insert(i)
            undoPending.insert(i)
            let qga = plan.agents[i].speaksQGA
            let error = AgentError(.timeout, "did not freeze within \(TimeSpan(milliseconds: plan.freezeWaitMs).human) of the first guest "
                                   + "(--freeze-wait): dropped its connection so the other guests do not wait for it"
                                   + (qga ? "; a late qemu-ga freeze is undone by a thaw on a new connection" : " (a late bound freeze thaws on disconnect)"))
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
            case .frozen: sessions[i].orderThaw()
            case .failed(_, _, let error, let at):
                undoPending.remove(i)
                note(at, i, "gave-up", "after giving up: \(error.message)")
                // Its undo failed: a thaw that could not be confirmed (72), whatever the policy
                // made of the failed freeze (before, crash-consistent read exit 0).
                if error.mayBeFrozen { report.agents[i].thawError = error }
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
            let dialect = plan.agents[i].speaksQGA ? "qemu-ga's protocol" : "protocol \(hello.version)"
            note(at, i, "connected", "connected: \(hello.agent.isEmpty ? "agent" : hello.agent) \(hello.agentVersion), \(dialect)")
            // qemu-ga, or an agent on its port that announces no deadline.
            if plan.agents[i].speaksQGA, hello.maxFreezeMs == 0 {
                note(at, i, "no-deadline", "\(hello.agent) has no deadline and does not thaw when the connection drops: "
                     + "quiescectl thaws it on every path it controls, but if quiescectl is killed, this guest stays frozen until thawed")
            }

        case .frozen(let i, let r, let at):
            report.agents[i].freeze = r
            report.agents[i].frozenNs = at - start
            report.agents[i].consistency = Consistency.of(r)
            note(at, i, "frozen", Describe.frozen(r, qga: plan.agents[i].speaksQGA))
            let notHeld = Consistency.notHeld(r)
            if !notHeld.isEmpty {
                note(at, i, "hooks-not-held", "only filesystem-consistent for: \(notHeld.joined(separator: "; "))")
            }

        case .failed(let i, let stage, let error, let at):
            report.agents[i].failure = AgentFailure(stage: stage, error: error)
            report.agents[i].consistency = .crash
            // Its undo failed too: a thaw that could not be confirmed (72), whatever COMMAND did.
            if error.mayBeFrozen { report.agents[i].thawError = error }
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
            if ev.name == Event.thawedName {
                let reason = ev.thawReason?.rawValue ?? "unknown"
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
            // qemu-ga names no filesystem: it counts those its thaw thawed, which leaves out any
            // that something else thawed first. Fewer than it froze (none included: qemu-ga has
            // no deadline, and quiesced on its port refuses the thaw of a freeze it ended): the
            // freeze did not hold.
            if plan.agents[i].speaksQGA, let froze = report.agents[i].freeze?.filesystemCount,
               let thawed = outcome.result, thawed.filesystemCount < froze, report.agents[i].freezeLost == nil {
                report.agents[i].freezeLost = "qemu-ga's thaw thawed \(thawed.filesystemCount) of the \(froze) filesystems it froze: "
                    + "the others had been thawed by something else before the thaw"
            }
            // More than it froze: its thaw takes no list and thaws every frozen filesystem it
            // sees, so it also ended freezes that were not this checkpoint's. Ours held; the
            // other freezer's did not, and it is told here, as nothing else will tell it.
            if plan.agents[i].speaksQGA, let froze = report.agents[i].freeze?.filesystemCount,
               let thawed = outcome.result, thawed.filesystemCount > froze {
                note(at, i, "thawed-others", "WARNING: qemu-ga's thaw thawed \(thawed.filesystemCount) filesystems, \(thawed.filesystemCount - froze) more "
                     + "than the \(froze) this checkpoint froze: its thaw ends every freeze in the guest, so a freeze by something else was ended too")
            }
            let elsewhere = (outcome.result?.filesystems ?? []).filter { $0.thawedElsewhere == true }.map(\.mountPoint)
            if !elsewhere.isEmpty && report.agents[i].freezeLost == nil {
                // The agent's FITHAW found them thawed already: some other process thawed them
                // while COMMAND ran, and the copy may have been taken after that.
                report.agents[i].freezeLost = "\(elsewhere.joined(separator: ", ")) \(elsewhere.count == 1 ? "was" : "were") thawed by something else "
                    + "(fsfreeze -u, qemu-ga's thaw) before the thaw: the agent found \(elsewhere.count == 1 ? "it" : "them") no longer frozen"
            }
            if outcome.result == nil && outcome.error == nil && !outcome.alreadyThawed, let how = outcome.confirmation,
               report.agents[i].freezeLost == nil {
                // Thawed, but the thaw's own report (the only account of a filesystem that
                // something else thawed first, or of a holding hook that ended) was not read:
                // nothing vouches for the freeze having held (before: "consistent", trial I).
                report.agents[i].freezeLost = "not shown to have held until the thaw: the thaw's report was not read (\(how)), so whether "
                    + "something else thawed a filesystem or a holding hook ended while COMMAND ran is unknown"
            }
            if outcome.alreadyThawed && report.agents[i].freezeLost == nil {
                report.agents[i].freezeLost = outcome.endedEarly.map { "the agent says: \($0)" }
                    ?? "the agent had already thawed when asked to (a thaw request from someone else, its deadline, or a lost connection)"
            }
            if let error = outcome.error {
                note(at, i, "thaw-failed", "THAW FAILED: \(error.message)")
            } else if outcome.alreadyThawed {
                // qemu-ga's thaw counting 0 says only that nothing was left frozen, not by whom.
                let what = plan.agents[i].speaksQGA && outcome.result != nil
                    ? "nothing left to thaw (qemu-ga's thaw thawed 0 filesystems)" : "already thawed by the agent"
                note(at, i, "thawed", "\(what)\(outcome.reconnected ? " (checked after reconnecting)" : "")")
            } else {
                let frozenFor = outcome.result?.frozenUs ?? report.agents[i].frozenNs.map { Int64((at - start - $0) / 1000) }
                note(at, i, "thawed", Describe.thawed(outcome.result, frozenUs: frozenFor, reconnected: outcome.reconnected)
                     + (outcome.confirmation.map { ": \($0)" } ?? ""))
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
            // COMMAND leads its own process group: members left after it exited are processes
            // it started and did not wait for (`cp ... &`). The thaw does not wait for them.
            // (One that left the group, setsid or a double fork to another group, is not seen.)
            if (try? Signals.send(0, to: pid, group: true)) != nil {
                report.command?.leftRunning = true
                note(at, nil, "command-left-running", "WARNING: COMMAND exited but left processes running in its process group \(pid) "
                     + "(started in the background and not waited for): they run on after the thaw, so whatever they still copy or write is not quiesced; make COMMAND wait for them")
            }
            startThaw()

        case .signal(let sig, let at):
            signalsSeen += 1
            if interruptedBy == nil { interruptedBy = sig }
            report.interruptedBy = Signals.name(interruptedBy!)
            if signalsSeen == 1 {
                if pid != nil && !childExited {
                    // SIGINT, SIGTERM and SIGHUP are passed on as they came; any other stopping
                    // signal (SIGQUIT, SIGXCPU, SIGPWR, ...) stops COMMAND with SIGTERM.
                    let toCommand = [Signals.interrupt, Signals.terminate, Signals.hangUp].contains(sig) ? sig : Signals.terminate
                    note(at, nil, "interrupted", "\(Signals.name(sig)): \(toCommand == sig ? "forwarding it" : "sending SIGTERM") to COMMAND and thawing")
                    report.command?.stoppedBy = Signals.name(toCommand)
                    signalCommand(toCommand)
                    killAt = monotonicNanos() + UInt64(plan.killGraceMs) * 1_000_000
                    startThaw()
                } else {
                    note(at, nil, "interrupted", "\(Signals.name(sig)): stopping; agents that froze will be thawed")
                    // Agents not yet frozen will not freeze; those that froze are thawed once all answered.
                    for s in sessions { s.mode.store(.cancelled, ordering: .releasing) }
                }
            } else {
                note(at, nil, "interrupted", "second \(Signals.name(sig)): dropping agent connections (agents thaw bound freezes on disconnect)"
                     + (pid != nil && !childExited ? " and killing COMMAND" : ""))
                for s in sessions { s.force() }
                if pid != nil && !childExited {
                    killed = true
                    signalCommand(Signals.forceKill)
                    killAt = monotonicNanos() + 10_000_000_000
                }
            }
        }
    }

    // MARK: Outcome

    func finish() {
        var r = report
        // A freeze that ended before COMMAND did (the agent thawed by itself, something else
        // thawed a filesystem, the connection dropped) vouches for nothing: crash-consistent.
        for i in r.agents.indices where r.agents[i].freezeLost != nil {
            r.agents[i].consistency = .crash
            if let told = r.consistency { r.consistency = min(told, .crash) }
        }
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
        } else if !lost.isEmpty || r.agents.contains(where: { !$0.holdsLost.isEmpty }) {
            // The freeze, or an application's hold on its data, ended before COMMAND did.
            r.outcome = .freezeFailed
        } else {
            r.outcome = .success
        }
        r.endNs = monotonicNanos() - start
        report = r
        let summary = report.summaryLines
        note(monotonicNanos(), nil, "done", summary.first ?? "", detail: Array(summary.dropFirst()))
    }
}
