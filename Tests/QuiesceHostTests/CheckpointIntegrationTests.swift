// quiescectl checkpoint against real quiesced processes on real loop filesystems this test creates.
import Foundation
import QuiesceHost
import QuiesceLinux
import QuiesceProtocol
import QuiesceTestSupport
import Testing

/// A lab with `count` ext4 filesystems and one quiesced per filesystem (scoped to it), or one
/// quiesced for all of them.
private struct Guests {
    let lab: LoopLab
    let mounts: [String]
    let agents: [AgentProcess]
    var addresses: [String] { agents.flatMap { ["--agent", "unix:\($0.socketPath)"] } }

    init(_ lab: LoopLab, filesystems count: Int, agentPerFilesystem: Bool = false) throws {
        self.lab = lab
        mounts = try (0..<count).map { try lab.filesystem("fs\($0)") }
        if agentPerFilesystem {
            agents = try mounts.enumerated().map { i, mp in
                try AgentProcess(in: lab.root, name: "agent\(i)", arguments: ["--include", mp])
            }
        } else {
            agents = [try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])]
        }
    }

    func stop() { agents.forEach { $0.stop() } }
}

/// A shell snippet that exits 1 unless `mp` is frozen: a second FIFREEZE answers EBUSY.
private func requireFrozen(_ mp: String) -> String {
    "fsfreeze -f '\(mp)' 2>/dev/null && { fsfreeze -u '\(mp)'; echo 'NOT FROZEN: \(mp)' >&2; exit 1; }"
}

/// Safety: every agent runs with --include limited to the lab's own mounts, so nothing else can freeze.
@Suite("Checkpoint against real agents and loop filesystems", .serialized,
       .enabled(if: canUseLoopDevices, "needs root and loop devices"))
struct CheckpointIntegrationTests {
    @Test("COMMAND runs while the filesystem is frozen (writes block, FIFREEZE says EBUSY); everything is thawed after")
    func runsWhileFrozen() async throws {
        try await LoopLab.with { lab in
            let g = try Guests(lab, filesystems: 1)
            defer { g.stop() }
            let mp = g.mounts[0]
            let dir = TempDir()
            let wrote = dir.file("wrote"), checked = dir.file("checked")
            let script = """
                \(requireFrozen(mp))
                (echo data > '\(mp)/during.txt' && touch '\(wrote)') &
                sleep 0.3
                [ -e '\(wrote)' ] && { echo 'a write completed while frozen' >&2; exit 1; }
                touch '\(checked)'
                """
            let r = try Ctl.run(g.addresses + ["--json", "checkpoint", "--", "sh", "-c", script], in: dir)
            #expect(r.status == 0, "\(r.stderr)")
            #expect(FileManager.default.fileExists(atPath: checked))
            let doc = try #require(r.json)
            #expect(doc["consistency"] == "filesystem")
            let agent = try #require(doc["agents"]?.arrayValue?.first)
            #expect(agent["freeze"].map { FreezeResultMounts($0) } == [mp])
            #expect(agent["thaw"]?["was_frozen"] == true)
            #expect(try !isFrozen(mp))
            #expect(eventually(withinMs: 5000) { FileManager.default.fileExists(atPath: wrote) }, "the blocked write completes after the thaw")
        }
    }

    @Test("a failing COMMAND leaves the filesystem thawed and fails the run with the command's code reported")
    func failingCommand() async throws {
        try await LoopLab.with { lab in
            let g = try Guests(lab, filesystems: 1)
            defer { g.stop() }
            let dir = TempDir()
            let r = try Ctl.run(g.addresses + ["--json", "checkpoint", "--", "sh", "-c", "\(requireFrozen(g.mounts[0])); exit 5"], in: dir)
            #expect(r.status == ExitCodes.commandFailed)
            #expect(r.json?["command"]?["exit_code"] == 5)
            #expect(try !isFrozen(g.mounts[0]))
        }
    }

    @Test("kill -9 of quiescectl mid-checkpoint: the agent thaws the bound freeze when the connection drops")
    func killedCoordinator() async throws {
        try await LoopLab.with { lab in
            let g = try Guests(lab, filesystems: 1)
            defer { g.stop() }
            let mp = g.mounts[0]
            let dir = TempDir()
            let ready = dir.file("ready"), pidFile = dir.file("pid")
            let ctl = try Ctl(g.addresses + ["checkpoint", "--timeout", "60s", "--lease", "10s", "--", "sh", "-c",
                                             "echo $$ > '\(pidFile)'; touch '\(ready)'; sleep 60"], in: dir)
            defer { if let pid = contents(pidFile).flatMap({ Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }) { kill(-pid, SIGKILL) } }
            #expect(eventually(withinMs: 10_000) { FileManager.default.fileExists(atPath: ready) })
            #expect(try isFrozen(mp))
            ctl.signal(SIGKILL)
            let t0 = Date()
            #expect(try eventually(withinMs: 5000) { try !isFrozen(mp) }, "thawed well before the 10 s lease")
            #expect(Date().timeIntervalSince(t0) < 5)
            let status = try TestClient(path: g.agents[0].socketPath).result(["op": "status"])
            #expect(status["last_auto_thaw"]?["reason"] == "disconnect")
        }
    }

    @Test("SIGSTOP of quiescectl mid-checkpoint: the agent thaws when the lease runs out; the run then reports the lost freeze")
    func stoppedCoordinator() async throws {
        try await LoopLab.with { lab in
            let g = try Guests(lab, filesystems: 1)
            defer { g.stop() }
            let mp = g.mounts[0]
            let dir = TempDir()
            let ready = dir.file("ready"), go = dir.file("go")
            let ctl = try Ctl(g.addresses + ["checkpoint", "--timeout", "60s", "--lease", "1s", "--", "sh", "-c",
                                             "touch '\(ready)'; while [ ! -e '\(go)' ]; do sleep 0.05; done"], in: dir)
            #expect(eventually(withinMs: 10_000) { FileManager.default.fileExists(atPath: ready) })
            usleep(1_500_000)
            let before = try TestClient(path: g.agents[0].socketPath).result(["op": "status"])
            #expect(before["state"] == "frozen", "keepalives hold the freeze past the 1 s lease while quiescectl runs: \(before)")
            #expect(before["last_auto_thaw"] == nil)
            ctl.signal(SIGSTOP)
            let t0 = Date()
            #expect(try eventually(withinMs: 4000) { try !isFrozen(mp) }, "thawed by the agent at the lease deadline")
            let waited = Date().timeIntervalSince(t0)
            #expect(waited < 3.0, "within the lease (1 s) plus slack: \(waited) s")
            let status = try TestClient(path: g.agents[0].socketPath).result(["op": "status"])
            #expect(status["last_auto_thaw"]?["reason"] == "deadline")
            ctl.signal(SIGCONT)
            #expect(FileManager.default.createFile(atPath: go, contents: nil))
            let r = try #require(ctl.wait(timeoutMs: 15_000))
            #expect(r.status == ExitCodes.freezeFailed, "the freeze did not hold until COMMAND finished: \(r.stderr)")
            #expect(r.stderr.contains("the freeze did not hold"))
        }
    }

    @Test("SIGTERM to the agent mid-COMMAND: it thaws and says so; the run reports the lost freeze (70), not a failed thaw")
    func agentStoppedMidCommand() async throws {
        try await LoopLab.with { lab in
            let g = try Guests(lab, filesystems: 1)
            defer { g.stop() }
            let dir = TempDir()
            let ready = dir.file("ready"), go = dir.file("go")
            let ctl = try Ctl(g.addresses + ["--json", "checkpoint", "--", "sh", "-c",
                                             "touch '\(ready)'; while [ ! -e '\(go)' ]; do sleep 0.05; done"], in: dir)
            #expect(eventually(withinMs: 10_000) { FileManager.default.fileExists(atPath: ready) })
            #expect(try isFrozen(g.mounts[0]))
            g.agents[0].signal(SIGTERM)
            #expect(g.agents[0].waitForExit() == 0)
            #expect(try !isFrozen(g.mounts[0]), "the agent thawed before exiting")
            usleep(300_000)  // quiescectl notices at once: it sleeps on the connection
            #expect(FileManager.default.createFile(atPath: go, contents: nil))
            let r = try #require(ctl.wait(timeoutMs: 15_000))
            #expect(r.status == ExitCodes.freezeFailed, "\(r.stderr)")
            let agent = try #require(r.json?["agents"]?.arrayValue?.first)
            #expect(agent["freeze_lost"]?.stringValue?.contains("thawed by itself (signal)") == true, "\(agent)")
            #expect(agent["thaw_error"] == nil, "the agent's thawed event confirms the thaw")
            let thawedAt = try #require(r.timelineMs("agent-thawed")), doneAt = try #require(r.timelineMs("command-done"))
            #expect(thawedAt < doneAt - 200, "noticed while COMMAND ran: \(thawedAt) ms vs \(doneAt) ms")
        }
    }

    @Test("a long COMMAND costs quiescectl no periodic wakeups: it sleeps on the connection until a keepalive is due or COMMAND ends")
    func holdingCostsNoWakeups() async throws {
        try await LoopLab.with { lab in
            let g = try Guests(lab, filesystems: 1)
            defer { g.stop() }
            let dir = TempDir()
            let ready = dir.file("ready"), go = dir.file("go")
            // A 60 s lease: the first keepalive is due after 20 s, well past the 2.5 s counted.
            let ctl = try Ctl(g.addresses + ["checkpoint", "--lease", "60s", "--", "sh", "-c",
                                             "touch '\(ready)'; while [ ! -e '\(go)' ]; do sleep 0.05; done"], in: dir)
            #expect(eventually(withinMs: 10_000) { FileManager.default.fileExists(atPath: ready) })
            usleep(300_000)
            let before = try contextSwitches(of: ctl.pid)
            usleep(2_500_000)
            let switches = try contextSwitches(of: ctl.pid) - before
            // Watching the connection in 100 ms slices made about 25 here.
            #expect(switches <= 4, "\(switches) context switches of quiescectl in 2.5 s while COMMAND ran")
            #expect(FileManager.default.createFile(atPath: go, contents: nil))
            let r = try #require(ctl.wait(timeoutMs: 15_000))
            #expect(r.status == 0, "\(r.stderr)")
            #expect(try !isFrozen(g.mounts[0]))
        }
    }

    @Test("a filesystem thawed by something else while COMMAND runs (fsfreeze -u): the run reports the lost freeze (70), naming it")
    func thawedElsewhereMidCommand() async throws {
        try await LoopLab.with { lab in
            let g = try Guests(lab, filesystems: 2)
            defer { g.stop() }
            let dir = TempDir()
            let r = try Ctl.run(g.addresses + ["--json", "checkpoint", "--", "fsfreeze", "-u", g.mounts[1]], in: dir)
            #expect(r.status == ExitCodes.freezeFailed, "\(r.stderr)")
            let agent = try #require(r.json?["agents"]?.arrayValue?.first)
            #expect(agent["freeze_lost"]?.stringValue?.contains("\(g.mounts[1]) was thawed by something else") == true, "\(agent)")
            #expect(agent["consistency"]?.stringValue == "crash", "\(agent)")
            let reports = agent["thaw"]?["filesystems"]?.arrayValue ?? []
            #expect(reports.filter { $0["thawed_elsewhere"] == true }.compactMap { $0["mountpoint"]?.stringValue } == [g.mounts[1]])
            #expect(try !isFrozen(g.mounts[0]) && !isFrozen(g.mounts[1]))
            #expect(g.agents[0].log.contains("was no longer frozen at the thaw"))
        }
    }

    @Test("through qemu-ga's dialect too: a filesystem thawed by something else mid-COMMAND leaves the thaw's count short, and the run reports the lost freeze (70)")
    func thawedElsewhereThroughQGA() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a"), b = try lab.filesystem("b")
            let qga = "\(lab.root)/qga.sock"
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--listen", "qga+unix:\(qga)"])
            defer { agent.stop() }
            let dir = TempDir()
            let r = try Ctl.run(["--agent", "qga:unix:\(qga)", "--json", "checkpoint", "--", "fsfreeze", "-u", b], in: dir)
            #expect(r.status == ExitCodes.freezeFailed, "\(r.stderr)")
            let lost = r.json?["agents"]?.arrayValue?.first?["freeze_lost"]?.stringValue ?? ""
            #expect(lost.contains("thawed 1 of the 2 filesystems it froze"), "\(r.stdout)")
            #expect(try !isFrozen(a) && !isFrozen(b))
            // quiesced on qemu-ga's port says which agent it is, and its deadline, in guest-info.
            let info = try Ctl.run(["--agent", "qga:unix:\(qga)", "info"], in: dir)
            #expect(info.status == 0 && info.stdout.contains("agent: quiesced \(QuiesceRelease.version)")
                    && info.stdout.contains("protocol: qemu-ga's") && info.stdout.contains("max freeze: 10 min"), "\(info.stdout)")
            let timeline = try Ctl.run(["--agent", "qga:unix:\(qga)", "checkpoint", "--", "true"], in: dir)
            #expect(timeline.status == 0 && timeline.stderr.contains("connected: quiesced") && !timeline.stderr.contains("qemu-ga has no deadline"), "\(timeline.stderr)")
            // qemu-ga's protocol carries a count only: whether hooks ran is not known, and is not
            // reported as "no hooks" (quiesced's hooks may have run behind its qemu-ga port).
            #expect(timeline.stderr.contains("hooks unknown (qemu-ga's protocol does not report them)") && !timeline.stderr.contains("no hooks"), "\(timeline.stderr)")
        }
    }

    @Test("through qemu-ga's dialect, a freeze whose reply comes too late is undone once the agent is done freezing (busy is retried), and an undo that cannot be confirmed exits 72 (trial)")
    func lateQGAFreezeIsUndone() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let hooks = try makeHooks(in: lab.root, ["10-slow": "[ \"$1\" = freeze ] && sleep 3; exit 0"])
            let qga = "\(lab.root)/qga.sock"
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--listen", "qga+unix:\(qga)", "--hooks-dir", hooks])
            defer { agent.stop() }
            let dir = TempDir()
            // The reply is late (3 s hook, 2 s reply timeout); the undo's thaw meets the freeze
            // still being taken (busy) and asks again until it is done. Before: it took busy
            // (inside qemu-ga's GenericError) for a failure, printed MAY BE FROZEN, exited 70,
            // and the guest stayed frozen until --max-freeze.
            let r = try Ctl.run(["--agent", "qga:unix:\(qga)", "--reply-timeout", "2s", "checkpoint", "--timeout", "2s", "--", "true"], in: dir)
            #expect(r.status == ExitCodes.freezeFailed, "\(r.stderr)")
            #expect(r.stderr.contains("was undone"), "\(r.stderr)")
            #expect(try !isFrozen(a))
            // Too short a wait for the undo too: the guest may still be frozen, which is 72.
            let short = try Ctl.run(["--agent", "qga:unix:\(qga)", "--reply-timeout", "1s", "checkpoint", "--timeout", "1s", "--", "true"], in: dir)
            #expect(short.status == ExitCodes.thawFailed, "\(short.stderr)")
            // quiesced says in guest-info that its freezes end at its max-freeze.
            #expect(short.stderr.contains("MAY BE FROZEN for up to 10 min (quiesced's max-freeze)"), "\(short.stderr)")
            #expect(!short.stderr.contains("qemu-ga has no deadline"), "\(short.stderr)")
            // It was: the slow freeze completed after the undo gave up. What the message says to
            // do, once the 3 s hook is surely done.
            sleep(4)
            #expect(try isFrozen(a), "the freeze the undo could not end")
            #expect(try Ctl.run(["--agent", "qga:unix:\(qga)", "thaw"], in: dir).status == 0)
            #expect(try !isFrozen(a))
        }
    }

    /// Before: through qemu-ga's dialect, thaw hooks slower than the reply timeout made the
    /// checkpoint exit 72 "THAW FAILED" although the guest was thawed (trial I, M1). quiesced's
    /// qemu-ga listener answers guest-fsfreeze-status on another connection meanwhile ("thawed"
    /// once the filesystems are), so the thaw's count is waited for.
    @Test("through qemu-ga's dialect, thaw hooks slower than the reply timeout: quiesced's count is waited for; the freeze held (0) or something else thawed (70)",
          arguments: [false, true])
    func slowThawHooksThroughQGA(thawedElsewhere: Bool) async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let hooks = try makeHooks(in: lab.root, ["50-slow": "[ \"$1\" = thaw ] && sleep 2.5; exit 0"])
            let qga = "\(lab.root)/qga.sock"
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--listen", "qga+unix:\(qga)", "--hooks-dir", hooks])
            defer { agent.stop() }
            let dir = TempDir()
            let command = thawedElsewhere ? "fsfreeze -u '\(a)'" : "true"  // our own lab mount
            let r = try Ctl.run(["--agent", "qga:unix:\(qga)", "--reply-timeout", "1s", "checkpoint", "--", "sh", "-c", command], in: dir)
            if thawedElsewhere {
                #expect(r.status == ExitCodes.freezeFailed, "\(r.stderr)")
                #expect(r.stderr.contains("thawed by something else"), "\(r.stderr)")
            } else {
                #expect(r.status == 0, "\(r.stderr)")
                #expect(r.stderr.contains("checkpoint succeeded"), "\(r.stderr)")
            }
            #expect(try !isFrozen(a))
        }
    }

    /// Before: a thaw whose hooks outlasted the reply timeout read as a lost freeze (70) once
    /// the retry found the operation thawed, or as a failed thaw (72) while they still ran,
    /// although the freeze held (trial H). Then that was confirmed by status or the retry, which
    /// do not carry the thaw's report: a filesystem something else thawed during COMMAND, or a
    /// holding hook killed during COMMAND, was hidden and the checkpoint said
    /// application-consistent (trial I). quiescectl now waits for the thaw's own reply while
    /// status says the thaw is under way.
    @Test("thaw hooks slower than the reply timeout: the thaw's own report is waited for; the freeze held (0), or did not (70: thawed by something else, a holding hook lost)",
          arguments: ["one-slow-hook", "two-slow-hooks", "thawed-elsewhere", "hold-lost"])
    func slowThawHooksAreWaitedFor(scenario: String) async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let pidFile = "\(lab.root)/hold.pid"
            var hooks = ["50-slow": "[ \"$1\" = thaw ] && sleep 3; exit 0"]
            if scenario == "two-slow-hooks" { hooks["60-slow"] = hooks["50-slow"] }
            if scenario == "hold-lost" {
                hooks["10-hold"] = "# quiesce: hold\nif [ \"$1\" = freeze ]; then echo $$ > '\(pidFile)'; echo ready; read x; fi; exit 0"
            }
            let dir = TempDir()
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--hooks-dir",
                                                                   try makeHooks(in: lab.root, hooks)])
            defer { agent.stop() }
            let command = switch scenario {
            case "thawed-elsewhere": "fsfreeze -u '\(a)'"  // our own lab mount
            case "hold-lost": "kill -9 $(cat '\(pidFile)')"
            default: "true"
            }
            let r = try Ctl.run(["--agent", "unix:\(agent.socketPath)", "--reply-timeout", "1s", "checkpoint", "--", "sh", "-c", command], in: dir)
            #expect(!r.stderr.contains("not shown to have held") && !r.stderr.contains("confirm"), "the thaw's reply was read: \(r.stderr)")
            switch scenario {
            case "thawed-elsewhere":
                #expect(r.status == ExitCodes.freezeFailed, "\(r.stderr)")
                #expect(r.stderr.contains("was thawed by something else"), "\(r.stderr)")
            case "hold-lost":
                #expect(r.status == ExitCodes.freezeFailed, "\(r.stderr)")
                #expect(r.stderr.contains("10-hold ended while holding"), "\(r.stderr)")
            default:
                #expect(r.status == 0, "\(r.stderr)")
                #expect(r.stderr.contains("checkpoint succeeded: application-consistent"), "\(r.stderr)")
            }
            #expect(try !isFrozen(a))
        }
    }

    /// Before: the undo of a freeze whose reply did not come in time gave up while the late
    /// freeze was still in its freeze hook (busy past the reply timeout): exit 72, "THAW
    /// FAILED ... MAY BE FROZEN", although nothing had frozen (trial I, M3).
    @Test("a freeze still in a slow freeze hook when its reply is given up on: the undo waits while status says it is being taken, and nothing is frozen (70, undone)")
    func undoWaitsForASlowFreezeHook() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--hooks-dir",
                                                                   try makeHooks(in: lab.root, ["20-slow": "[ \"$1\" = freeze ] && sleep 4; exit 0"])])
            defer { agent.stop() }
            let dir = TempDir()
            let r = try Ctl.run(["--agent", "unix:\(agent.socketPath)", "--reply-timeout", "1s", "checkpoint", "--timeout", "1s", "--", "true"], in: dir)
            #expect(r.status == ExitCodes.freezeFailed, "\(r.stderr)")
            #expect(r.stderr.contains("was undone") && !r.stderr.contains("MAY BE FROZEN"), "\(r.stderr)")
            let status = try Ctl.run(["--agent", "unix:\(agent.socketPath)", "--json", "status"], in: dir)
            #expect(status.json?["agents"]?.arrayValue?.first?["result"]?["state"] == "thawed", "\(status.stdout)")
            #expect(try !isFrozen(a))
        }
    }

    /// Before: someone else's thaw during COMMAND, with thaw hooks slower than the reply
    /// timeout, made the checkpoint's own thaw meet `busy` for one reply timeout and exit 72
    /// "THAW FAILED" with the guest thawed (trial I L1, trial J M1/M2: the same for a dropped
    /// connection and for the agent's own deadline thaw). It now waits while the agent is
    /// thawing its operation, and says the freeze did not hold.
    @Test("someone else's thaw during COMMAND, with slow thaw hooks: the checkpoint waits out the busy thaw and says the freeze did not hold (70), over our protocol and qemu-ga's",
          arguments: ["unix", "qga"])
    func otherThawDuringCommandWithSlowHooks(dialect: String) async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let qga = "\(lab.root)/qga.sock"
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--listen", "qga+unix:\(qga)", "--hooks-dir",
                                                                   try makeHooks(in: lab.root, ["50-slow": "[ \"$1\" = thaw ] && sleep 3; exit 0"])])
            defer { agent.stop() }
            let dir = TempDir()
            let address = dialect == "qga" ? "qga:unix:\(qga)" : "unix:\(agent.socketPath)"
            let other = "'\(Ctl.path)' --agent 'unix:\(agent.socketPath)' thaw >/dev/null 2>&1 &"
            let r = try Ctl.run(["--agent", address, "--reply-timeout", "1s", "checkpoint", "--", "sh", "-c", "\(other) sleep 0.5"], in: dir)
            #expect(r.status == ExitCodes.freezeFailed, "\(r.stderr)")
            #expect(r.stderr.contains("did not hold") && !r.stderr.contains("THAW FAILED"), "\(r.stderr)")
            #expect(try !isFrozen(a))
        }
    }

    /// Before: a plain `quiescectl thaw` through qemu-ga's dialect never reads guest-info, so it
    /// did not know the peer was quiesced and exited 72 after one reply timeout while the thaw
    /// hooks ran (trial J, M3).
    @Test("quiescectl thaw through qemu-ga's dialect to quiesced, with thaw hooks slower than the reply timeout: exit 0 with the count")
    func qgaThawSubcommandWaitsForSlowHooks() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let qga = "\(lab.root)/qga.sock"
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--listen", "qga+unix:\(qga)", "--hooks-dir",
                                                                   try makeHooks(in: lab.root, ["50-slow": "[ \"$1\" = thaw ] && sleep 2.5; exit 0"])])
            defer { agent.stop() }
            let dir = TempDir()
            let ctl = ["--agent", "qga:unix:\(qga)", "--reply-timeout", "1s"]
            #expect(try Ctl.run(ctl + ["freeze"], in: dir).status == 0)
            #expect(try isFrozen(a))
            let r = try Ctl.run(ctl + ["thaw"], in: dir)
            #expect(r.status == 0 && r.stdout.contains("thawed 1 filesystem"), "\(r.stdout)\(r.stderr)")
            #expect(try !isFrozen(a))
        }
    }

    /// Before: `quiescectl thaw` with thaw hooks slower than the reply timeout exited 72
    /// ("a guest may still be frozen") although the thaw was carried out (trial I, M2).
    @Test("quiescectl thaw --op-id with thaw hooks slower than the reply timeout waits for the thaw's reply and exits 0 with it")
    func thawSubcommandWaitsForSlowHooks() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--hooks-dir",
                                                                   try makeHooks(in: lab.root, ["50-slow": "[ \"$1\" = thaw ] && sleep 2.5; exit 0"])])
            defer { agent.stop() }
            let dir = TempDir()
            let ctl = ["--agent", "unix:\(agent.socketPath)", "--reply-timeout", "1s"]
            let frozen = try Ctl.run(ctl + ["freeze", "--op-id", "slow-thaw"], in: dir)
            #expect(frozen.status == 0, "\(frozen.stderr)")
            let r = try Ctl.run(ctl + ["--json", "thaw", "--op-id", "slow-thaw"], in: dir)
            #expect(r.status == 0, "\(r.stderr)")
            let result = r.json?["agents"]?.arrayValue?.first?["result"]
            #expect(result?["was_frozen"] == true, "\(r.stdout)")
            #expect(result?["hooks"]?.arrayValue?.first?["name"] == "50-slow", "\(r.stdout)")
            #expect(try !isFrozen(a))
        }
    }

    @Test("an unreachable agent with --on-agent-failure fail: COMMAND does not run and the reachable guest is thawed")
    func unreachableFail() async throws {
        try await LoopLab.with { lab in
            let g = try Guests(lab, filesystems: 1)
            defer { g.stop() }
            let dir = TempDir()
            let marker = dir.file("ran")
            let r = try Ctl.run(g.addresses + ["--agent", "unix:\(dir.file("absent.sock"))", "checkpoint", "--", "touch", marker], in: dir)
            #expect(r.status == ExitCodes.agentUnreachable)
            #expect(!FileManager.default.fileExists(atPath: marker))
            #expect(try !isFrozen(g.mounts[0]))
            #expect(r.stderr.contains("no such socket"))
        }
    }

    @Test("an unreachable agent with --on-agent-failure crash-consistent: COMMAND runs while the reachable guest is frozen")
    func unreachableCrashConsistent() async throws {
        try await LoopLab.with { lab in
            let g = try Guests(lab, filesystems: 1)
            defer { g.stop() }
            let dir = TempDir()
            let absent = "unix:\(dir.file("absent.sock"))"
            let out = dir.file("env")
            let script = "\(requireFrozen(g.mounts[0])); env > '\(out)'"
            let r = try Ctl.run(g.addresses + ["--agent", absent, "checkpoint", "--on-agent-failure", "crash-consistent",
                                               "--", "sh", "-c", script], in: dir)
            #expect(r.status == 0, "\(r.stderr)")
            let env = environmentDump(try #require(contents(out)))
            #expect(env["QUIESCE_CONSISTENCY"] == "crash")
            #expect(env["QUIESCE_CRASH_CONSISTENT_AGENTS"] == absent)
            #expect(env["QUIESCE_FROZEN"] == "unix:\(g.agents[0].socketPath)=\(g.mounts[0])")
            #expect(r.stderr.contains("CRASH-CONSISTENT"))
            #expect(try !isFrozen(g.mounts[0]))
        }
    }

    @Test("a group checkpoint of 3 agents: all frozen while COMMAND runs once, all thawed after")
    func groupOfThree() async throws {
        try await LoopLab.with { lab in
            let g = try Guests(lab, filesystems: 3, agentPerFilesystem: true)
            defer { g.stop() }
            let dir = TempDir()
            let runs = dir.file("runs")
            let script = g.mounts.map(requireFrozen).joined(separator: "\n") + "\necho once >> '\(runs)'"
            let r = try Ctl.run(g.addresses + ["--json", "checkpoint", "--", "sh", "-c", script], in: dir)
            #expect(r.status == 0, "\(r.stderr)")
            #expect(contents(runs) == "once\n")
            let agents = try #require(r.json?["agents"]?.arrayValue)
            #expect(agents.count == 3)
            #expect(agents.allSatisfy { $0["frozen"] == true && $0["thaw"]?["was_frozen"] == true })
            #expect(agents.compactMap { $0["freeze"].map(FreezeResultMounts) }.flatMap { $0 }.sorted() == g.mounts.sorted())
            for mp in g.mounts { #expect(try !isFrozen(mp)) }
        }
    }
}

/// The mountpoints of a freeze result in a report.
private func FreezeResultMounts(_ json: JSON) -> [String] {
    (json["filesystems"]?.arrayValue ?? []).compactMap { $0["mountpoint"]?.stringValue }
}
