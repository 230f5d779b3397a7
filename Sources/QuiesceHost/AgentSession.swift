// One agent's thread during a checkpoint: connect, hello, freeze, keep alive, thaw.
import QuiesceLinux
import QuiesceProtocol
import Synchronization

/// How one agent session ended its freeze: the thaw's result or error, whether the freeze had
/// already ended by itself, and the keepalives sent while it held. (Not the agent's
/// `ThawOutcome`, which is the thaw as the agent carried it out.)
struct SessionEnd: Sendable {
    var result: ThawResult?
    var error: AgentError?
    /// The agent had already thawed (deadline, disconnect): the freeze did not last.
    var alreadyThawed: Bool
    /// The agent's own account of when and why it ended the freeze (its `not-frozen` answer
    /// with `thawed_reason`, PROTOCOL.md 6.6), when it gave one.
    var endedEarly: String? = nil
    var reconnected: Bool
    var keepalives: Int
    /// The thaw's answer could not be read, or did not come, and the agent confirmed the thaw
    /// otherwise (status, or a retry by op id): how. Without the answer nothing says whether
    /// the freeze held until the thaw, and the checkpoint does not vouch for it.
    var confirmation: String? = nil
}

/// One agent's thread: connect, hello, freeze, keep alive, thaw.
final class AgentSession: Sendable {

    let index: Int
    let address: AgentAddress
    /// What the coordinator wants of the session, beyond the thaw order; read by the session thread.
    enum Mode: UInt8, AtomicRepresentable {
        case running
        /// Do not freeze (the checkpoint was interrupted before this agent froze).
        case cancelled
        /// Drop the connection at once (a second signal): no undo, no reconnect.
        case forced
        /// Given up on: the connection dropped because the agent did not freeze in time; its
        /// freeze is still undone by op id if it got through.
        case abandoned

        /// The connection is to be dropped.
        var dropsConnection: Bool { self == .forced || self == .abandoned }
    }

    /// Set by `orderThaw`; read by the session thread while it holds the freeze.
    private let thawOrdered = Atomic<Bool>(false)
    /// Wakes the session thread from its wait on the connection (`orderThaw`). Nil only when no
    /// eventfd could be made: the thread then looks for the order every 100 ms instead.
    private let wake: Wakeup? = try? Wakeup()
    let mode = Atomic<Mode>(.running)
    /// Monotonic time at which COMMAND is stopped (0: not known yet); caps the keepalive leases.
    let hardDeadline = Atomic<UInt64>(0)
    private let connection = Mutex<Connection?>(nil)

    init(index: Int, address: AgentAddress) {
        self.index = index
        self.address = address
    }

    /// Tells the session to end its freeze: it thaws as soon as it holds one (at once if it
    /// does already). Any thread; never blocks.
    func orderThaw() {
        thawOrdered.store(true, ordering: .releasing)
        wake?.signal()
    }

    func attach(_ c: Connection) {
        connection.withLock { $0 = c }
        if mode.load(ordering: .acquiring).dropsConnection { c.shutdown() }
    }

    /// The undo's connection, so that a second signal (`force`) interrupts its wait too. Unlike
    /// `attach`, an abandoned session's undo keeps it: abandoning dropped the freeze's.
    func attachUndo(_ c: Connection) {
        connection.withLock { $0 = c }
        if mode.load(ordering: .acquiring) == .forced { c.shutdown() }
    }

    func force() {
        mode.store(.forced, ordering: .releasing)
        connection.withLock { $0?.shutdown() }
    }

    /// Drops the connection of an agent that did not freeze in time (`Mode.abandoned`).
    func giveUp() {
        mode.store(.abandoned, ordering: .releasing)
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
            if event.name == Event.thawedName, event.fields["op_id"]?.stringValue == opID {
                thawedByAgent.store(true, ordering: .releasing)
            }
            events.post(.agentEvent(i, event, monotonicNanos()))
        }

        if mode.load(ordering: .acquiring) != .running {
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
                                             undo: { self.mode.load(ordering: .acquiring) != .forced },
                                             onConnection: { self.attachUndo($0) })
        } catch {
            events.post(.failed(i, .freeze, error, monotonicNanos()))
            return
        }
        // A freeze that froze nothing (no eligible filesystem in the agent's scope, or qemu-ga
        // answering 0) makes nothing consistent: it counts as a failed freeze, after ending it
        // (its freeze hooks are owed their thaw).
        if result.filesystemCount == 0 {
            let end = thaw(client, plan: plan, keepalives: 0, confirmedByAgent: { false })
            let undone = end.error.map { "; ending it failed: \($0.message)" } ?? ""
            events.post(.failed(i, .freeze, AgentError(.refused, "the freeze froze no filesystem: nothing in the agent's scope can be frozen, so a snapshot would only be crash-consistent\(undone)"), monotonicNanos()))
            return
        }
        let frozenAt = monotonicNanos()
        events.post(.frozen(i, result, frozenAt))

        // Keep the freeze alive until told to thaw. Keepalives come from this thread, which never
        // waits for COMMAND, so a long snapshot is never cut short while we are alive, and a
        // stopped or dead coordinator lets the lease run out. Between keepalives the thread
        // sleeps in one poll on the connection and the thaw order's eventfd, so a freeze lost
        // while COMMAND runs (the agent thawed by itself and said so, or the connection dropped)
        // is known when it happens, not at the thaw, and a long COMMAND costs no wakeups.
        let interval = UInt64(max(100, lease / 3)) * 1_000_000
        var next = frozenAt + interval
        var keepalives = 0
        var keepaliveFailed = false
        var lost = false
        func takeIncoming() {
            guard !lost else { return }
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
        while !thawOrdered.load(ordering: .acquiring) {
            if let wake {
                let ready = client.connection.waitForIncoming(watching: !lost, or: wake, deadline: next)
                if ready.woken { continue }  // the order is checked at the top
                if ready.incoming { takeIncoming() }
            } else {
                Threads.sleep(milliseconds: Int(min(100, max(1, (Int64(next) - Int64(monotonicNanos())) / 1_000_000))))
                takeIncoming()
            }
            guard monotonicNanos() >= next, !thawOrdered.load(ordering: .acquiring) else { continue }
            next = monotonicNanos() + interval
            guard !keepaliveFailed, !lost, mode.load(ordering: .acquiring) != .forced else { continue }
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
            // Events that came in the same read as the keepalive's reply are handled now: the
            // next poll would not see them.
            takeIncoming()
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
                      confirmedByAgent: () -> Bool) -> SessionEnd {
        var outcome = SessionEnd(result: nil, error: nil, alreadyThawed: false, reconnected: false, keepalives: keepalives)
        // `retried`: the thaw was asked for before, on a connection that dropped or whose answer
        // never came (the agent stopped answering even status; slow thaw hooks alone are waited
        // for, see `AgentClient.thaw`). An operation that no longer holds a freeze (`was_frozen`
        // false: a thaw request ended it, PROTOCOL.md 6.6; a freeze that ended early is
        // `not-frozen` with a reason instead) may have been thawed by that request, or by
        // someone else's; and a thaw still under way whose filesystems are thawed (status
        // `thawing` with `thawed_at_ms`) is one whose hooks are still running. Either is a thaw
        // confirmed without its report (trial H, I, J).
        // `busy` (a thaw or freeze under way: this one's thaw hooks, the agent's own deadline
        // thaw, someone else's thaw) is asked again for as long as the agent is carrying out
        // this operation's freeze or thaw, up to `AgentClient.thawHooksWaitLimitMs` (before: 72
        // "THAW FAILED" after one reply timeout, with the guest thawed, trial J).
        let limit = monotonicNanos() + UInt64(AgentClient.thawHooksWaitLimitMs) * 1_000_000
        func attempt(_ c: AgentClient, retried: Bool = false) -> AgentError? {
            let giveUp = monotonicNanos() + UInt64(plan.replyTimeoutMs) * 1_000_000
            while true {
                do {
                    // An answer that cannot be read is checked with status (before: 72 for a
                    // thaw that had happened, trial F).
                    let t = try c.thawConfirmed(opID: plan.opID)
                    if let r = t.result, retried && !r.wasFrozen {
                        outcome.confirmation = "the operation was thawed by a thaw request, ours asked for before (its answer was lost) or someone else's"
                    } else if let r = t.result {
                        outcome.result = r
                        outcome.alreadyThawed = !r.wasFrozen
                    } else {
                        outcome.confirmation = t.confirmation
                    }
                    return nil
                } catch {
                    if let remote = error.remote, remote.code == .notFrozen {
                        outcome.alreadyThawed = true
                        if remote.details?["thawed_reason"] != nil { outcome.endedEarly = remote.message }
                        return nil
                    }
                    // (Through qemu-ga's dialect the agent's code is in the details.)
                    let busy = error.remote?.code == .busy || error.remote?.details?["agent_code"] == .string(ErrorCode.busy.rawValue)
                    guard busy else { return error }
                    if monotonicNanos() < giveUp {
                        Threads.sleep(milliseconds: 100)
                        continue
                    }
                    let status = c.isQGA ? nil : try? c.status()
                    if retried, let s = status, s.state == .thawing, s.opID == plan.opID, let at = s.thawedAtMs {
                        let ago = TimeSpan.human(milliseconds: max(0, wallClockMillis() - at))
                        outcome.confirmation = "the agent thawed the filesystems \(ago) ago; its thaw hooks were still running when quiescectl stopped waiting (their outcome is in the agent's log)"
                        return nil
                    }
                    // Still this operation's (native: status names it; quiesced on qemu-ga's
                    // port answers busy only while a freeze or thaw is under way).
                    let ours = status.map { $0.isTaking(plan.opID) } ?? c.isQGA
                    if ours && monotonicNanos() < limit {
                        Threads.sleep(milliseconds: 200)
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
        if mode.load(ordering: .acquiring) == .forced {
            // quiescectl dropped the connection itself (a second signal), not the agent.
            outcome.error = AgentError(error.code, "stopped waiting for the thaw's answer on a second signal (the thaw had been asked for, and "
                                       + "an agent thaws a bound freeze when its connection closes, but neither is confirmed): check with "
                                       + "`\(shellQuoted(["quiescectl", "--agent", address.description, "status"]))`", remote: error.remote)
            return outcome
        }
        guard error.code == .disconnected || error.code == .timeout else {
            outcome.error = error
            return outcome
        }
        client.close()
        do {
            let again = try AgentClient.connect(address, connectTimeoutMs: plan.connectTimeoutMs,
                                                replyTimeoutMs: plan.replyTimeoutMs, onConnection: { self.attach($0) })
            defer { again.close() }
            outcome.reconnected = true
            if let e2 = attempt(again, retried: true) {
                outcome.error = AgentError(e2.code, "\(error.message); after reconnecting: \(e2.message)", remote: e2.remote)
            }
        } catch {
            outcome.error = AgentError(error.code, "could not confirm the thaw (\(error.message)); an agent thaws a bound freeze when its connection drops, and a restarted agent thaws what a crashed one left frozen: check with `quiescectl --agent \(address) status`")
        }
        return outcome
    }
}
