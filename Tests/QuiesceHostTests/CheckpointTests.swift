// The checkpoint bracket through the real quiescectl executable, against fake agents on real sockets.
import Foundation
import QuiesceHost
import QuiesceLinux
import QuiesceProtocol
import QuiesceTestSupport
import Testing

private func agentArgs(_ agents: [FakeAgent]) -> [String] { agents.flatMap { ["--agent", $0.address.description] } }

@Suite("Checkpoint with fake agents")
struct CheckpointTests {
    @Test("COMMAND learns the outcome from QUIESCE_* variables")
    func environmentForCommand() throws {
        let dir = TempDir()
        let withHooks = try FakeAgent(in: dir, name: "db", .init(
            hooks: [HookReport(name: "10-postgres", phase: .freeze, exitCode: 0, durationUs: 5000)], mounts: ["/srv/db", "/"]))
        let plain = try FakeAgent(in: dir, name: "web", .init(mounts: ["/var/www"]))
        let out = dir.file("env.txt")
        let r = try Ctl.run(agentArgs([withHooks, plain]) + ["checkpoint", "--op-id", "op-env-1", "--", "sh", "-c", "env > '\(out)'"], in: dir)
        #expect(r.status == 0, "\(r.stderr)")
        let env = environmentDump(try #require(contents(out)))
        #expect(env["QUIESCE_CONSISTENCY"] == "filesystem", "the weakest of application and filesystem")
        #expect(env["QUIESCE_OP_ID"] == "op-env-1")
        #expect(env["QUIESCE_AGENTS"] == "\(withHooks.address);\(plain.address)")
        #expect(env["QUIESCE_FROZEN"] == "\(withHooks.address)=/srv/db,/;\(plain.address)=/var/www")
        #expect(env["QUIESCE_CRASH_CONSISTENT_AGENTS"] == "")
        #expect(env["QUIESCE_AGENT_CONSISTENCY"] == "\(withHooks.address)=application;\(plain.address)=filesystem")
        let deadline = try #require(env["QUIESCE_DEADLINE_MS"].flatMap { Int64($0) })
        #expect(abs(deadline - (wallClockMillis() + 60_000)) < 30_000)
        #expect(!withHooks.frozen && !plain.frozen)
        #expect(withHooks.log == ["hello", "freeze", "thaw"])
    }

    @Test("an agent flooding events cannot grow the report: 32 are listed, the rest counted")
    func eventFlood() throws {
        let dir = TempDir()
        let a = try FakeAgent(in: dir, .init(eventsAfterFreeze: 20_000))
        let r = try Ctl.run(agentArgs([a]) + ["--json", "checkpoint", "--", "sleep", "0.3"], in: dir)
        #expect(r.status == 0, "\(r.stderr)")
        let doc = try JSON.parse(r.stdout)
        let agent = try #require(doc["agents"]?.arrayValue?.first)
        #expect(agent["events"]?.arrayValue?.count == AgentReport.maxListedEvents)
        #expect(agent["events_not_listed"]?.intValue == Int64(20_000 - AgentReport.maxListedEvents))
        #expect((doc["timeline"]?.arrayValue?.count ?? 0) < AgentReport.maxListedEvents + 12, "the timeline stays short")
        #expect(!a.frozen)
    }

    @Test("application-consistent when every agent's freeze hooks ran")
    func applicationConsistent() throws {
        let dir = TempDir()
        let a = try FakeAgent(in: dir, .init(hooks: [HookReport(name: "db", phase: .freeze, exitCode: 0, durationUs: 10)]))
        let out = dir.file("c.txt")
        let r = try Ctl.run(agentArgs([a]) + ["checkpoint", "--", "sh", "-c", "echo $QUIESCE_CONSISTENCY > '\(out)'"], in: dir)
        #expect(r.status == 0)
        #expect(contents(out) == "application\n")
        #expect(r.stderr.contains("checkpoint succeeded: application-consistent"))
    }

    @Test("on-agent-failure crash-consistent: COMMAND runs and the output says the checkpoint is crash-consistent")
    func crashConsistentPolicy() throws {
        let dir = TempDir()
        let good = try FakeAgent(in: dir)
        let missing = "unix:\(dir.file("gone.sock"))"
        let out = dir.file("env.txt")
        let r = try Ctl.run(agentArgs([good]) + ["--agent", missing, "checkpoint", "--on-agent-failure", "crash-consistent",
                                                 "--", "sh", "-c", "env > '\(out)'"], in: dir)
        #expect(r.status == ExitCodes.success, "the policy allowed it: \(r.stderr)")
        let env = environmentDump(try #require(contents(out), "COMMAND ran"))
        #expect(env["QUIESCE_CONSISTENCY"] == "crash")
        #expect(env["QUIESCE_CRASH_CONSISTENT_AGENTS"] == missing)
        #expect(env["QUIESCE_FROZEN"] == "\(good.address)=/fake/data,/fake/var")
        #expect(r.stderr.contains("only CRASH-CONSISTENT for \(missing)"))
        #expect(good.log == ["hello", "freeze", "thaw"], "the reachable guest was frozen for COMMAND and thawed")
    }

    @Test("on-agent-failure fail: COMMAND does not run, the others are thawed, exit 69")
    func failPolicy() throws {
        let dir = TempDir()
        let good = try FakeAgent(in: dir)
        let marker = dir.file("ran")
        let r = try Ctl.run(agentArgs([good]) + ["--agent", "unix:\(dir.file("gone.sock"))", "checkpoint", "--", "touch", marker], in: dir)
        #expect(r.status == ExitCodes.agentUnreachable)
        #expect(!FileManager.default.fileExists(atPath: marker))
        #expect(good.log == ["hello", "freeze", "thaw"])
        #expect(!good.frozen)
        #expect(r.stderr.contains("no such socket: \(dir.file("gone.sock"))"))
    }

    @Test("a refused freeze shows the agent's code and message and exits 70")
    func freezeRefused() throws {
        let dir = TempDir()
        let a = try FakeAgent(in: dir, .init(freezeError: ProtocolError(.frozenElsewhere, "/srv is already frozen by someone else")))
        let marker = dir.file("ran")
        let r = try Ctl.run(agentArgs([a]) + ["checkpoint", "--", "touch", marker], in: dir)
        #expect(r.status == ExitCodes.freezeFailed)
        #expect(r.stderr.contains("frozen-elsewhere: /srv is already frozen by someone else"))
        #expect(!FileManager.default.fileExists(atPath: marker))
    }

    @Test("a failing COMMAND is reported with its own exit code, the guest is thawed, exit 71; --json keeps stdout for the document")
    func commandFails() throws {
        let dir = TempDir()
        let a = try FakeAgent(in: dir)
        let r = try Ctl.run(agentArgs([a]) + ["--json", "checkpoint", "--", "sh", "-c", "echo from-command; exit 7"], in: dir)
        #expect(r.status == ExitCodes.commandFailed)
        let doc = try #require(r.json, "stdout is exactly one JSON document: \(r.stdout)")
        #expect(doc["outcome"] == "command-failed")
        #expect(doc["exit_code"] == .int(Int64(ExitCodes.commandFailed)))
        #expect(doc["command"]?["exit_code"] == 7)
        #expect(doc["consistency"] == "filesystem")
        #expect(r.stderr.contains("from-command"), "COMMAND's stdout goes to stderr under --json")
        let agent = try #require(doc["agents"]?.arrayValue?.first)
        #expect(agent["frozen"] == true)
        #expect(agent["freeze"]?["stall_us"] == 1500)
        #expect(agent["thaw"]?["was_frozen"] == true)
        let events = (doc["timeline"]?.arrayValue ?? []).compactMap { $0["event"]?.stringValue }
        #expect(events.starts(with: ["start", "connected", "frozen", "command-started", "command-failed", "thaw", "thawed", "done"]), "\(events)")
        #expect(!a.frozen)
    }

    @Test("a failed thaw exits 72 and says a guest may still be frozen")
    func thawFails() throws {
        let dir = TempDir()
        let a = try FakeAgent(in: dir, .init(thawError: ProtocolError(.thawFailed, "/srv: EIO")))
        let r = try Ctl.run(agentArgs([a]) + ["checkpoint", "--", "true"], in: dir)
        #expect(r.status == ExitCodes.thawFailed)
        #expect(r.stderr.contains("THAW FAILED"))
        #expect(r.stderr.contains("thaw-failed: /srv: EIO"))
    }

    @Test("SIGINT or SIGTERM to quiescectl is forwarded to COMMAND, the guests are thawed, exit 73", arguments: [SIGINT, SIGTERM])
    func interrupted(sig: Int32) throws {
        let dir = TempDir()
        let a = try FakeAgent(in: dir)
        let ready = dir.file("ready"), got = dir.file("got")
        let script = "trap 'echo signalled > \(got); exit 9' INT TERM; touch \(ready); while :; do sleep 0.05; done"
        let ctl = try Ctl(agentArgs([a]) + ["checkpoint", "--", "sh", "-c", script], in: dir)
        #expect(eventually(withinMs: 10_000) { FileManager.default.fileExists(atPath: ready) })
        #expect(a.frozen)
        ctl.signal(sig)
        let r = try #require(ctl.wait(timeoutMs: 10_000))
        #expect(r.status == ExitCodes.interrupted, "\(r.stderr)")
        #expect(contents(got) == "signalled\n", "COMMAND got the signal")
        #expect(!a.frozen)
        #expect(a.thawReasons == ["request"], "thawed by quiescectl, not by the connection dropping")
        #expect(r.stderr.contains("interrupted by \(Signals.name(sig))"))
    }

    @Test("signals whose default would end quiescectl (QUIT, XCPU, PWR, ALRM) interrupt it cleanly: COMMAND gets SIGTERM, the guests are thawed, exit 73; USR1 and USR2 are ignored",
          arguments: [SIGQUIT, SIGXCPU, SIGPWR, SIGALRM])
    func otherSignalsInterruptCleanly(sig: Int32) throws {
        let dir = TempDir()
        let a = try FakeAgent(in: dir)
        let ready = dir.file("ready"), got = dir.file("got")
        let script = "trap 'echo TERM > \(got); exit 9' TERM; touch \(ready); while :; do sleep 0.05; done"
        let ctl = try Ctl(agentArgs([a]) + ["checkpoint", "--", "sh", "-c", script], in: dir)
        #expect(eventually(withinMs: 10_000) { FileManager.default.fileExists(atPath: ready) })
        ctl.signal(SIGUSR1)
        ctl.signal(SIGUSR2)
        usleep(300_000)
        #expect(a.frozen, "USR1 and USR2 change nothing")
        #expect(ctl.wait(timeoutMs: 10) == nil, "quiescectl survives USR1 and USR2")
        ctl.signal(sig)
        let r = try #require(ctl.wait(timeoutMs: 10_000))
        #expect(r.status == ExitCodes.interrupted, "\(Signals.name(sig)): \(r.status) \(r.stderr)")
        #expect(contents(got) == "TERM\n", "COMMAND was stopped with SIGTERM")
        #expect(!a.frozen)
        #expect(a.thawReasons == ["request"], "thawed by quiescectl, not by the connection dropping")
    }

    @Test("quiescectl killed with SIGKILL while COMMAND runs: COMMAND gets SIGTERM from the kernel, and the agent thaws on the lost connection")
    func killedCoordinatorStopsCommand() throws {
        let dir = TempDir()
        let a = try FakeAgent(in: dir)
        let ready = dir.file("ready"), got = dir.file("got")
        let script = "trap 'echo TERM > \(got); exit 9' TERM; echo $$ > \(ready); while :; do sleep 0.05; done"
        let ctl = try Ctl(agentArgs([a]) + ["checkpoint", "--", "sh", "-c", script], in: dir)
        #expect(eventually(withinMs: 10_000) { contents(ready)?.hasSuffix("\n") == true })
        // Whatever happens, the test leaves no COMMAND behind.
        defer { if let pid = Int32((contents(ready) ?? "").trimmingCharacters(in: .whitespacesAndNewlines)) { kill(pid, SIGKILL) } }
        ctl.signal(SIGKILL)
        _ = ctl.wait(timeoutMs: 10_000)
        // Before: COMMAND, in a process group of its own, went on copying a guest that the
        // agent had already thawed for the dropped connection.
        #expect(eventually(withinMs: 5000) { contents(got) == "TERM\n" }, "COMMAND was stopped with SIGTERM")
        #expect(eventually(withinMs: 5000) { !a.frozen })
        #expect(a.thawReasons == ["disconnect"])
    }

    @Test("SIGINT while agents are still freezing: COMMAND does not run, what froze is thawed, exit 73")
    func interruptedWhileFreezing() throws {
        let dir = TempDir()
        let slow = try FakeAgent(in: dir, .init(freezeDelayMs: 1500))
        let marker = dir.file("ran")
        let ctl = try Ctl(agentArgs([slow]) + ["checkpoint", "--", "touch", marker], in: dir)
        #expect(eventually(withinMs: 5000) { slow.log.contains("freeze") })
        ctl.signal(SIGINT)
        let r = try #require(ctl.wait(timeoutMs: 10_000))
        #expect(r.status == ExitCodes.interrupted, "\(r.stderr)")
        #expect(!FileManager.default.fileExists(atPath: marker))
        #expect(slow.log == ["hello", "freeze", "thaw"])
        #expect(!slow.frozen)
    }

    @Test("the connection drops while COMMAND runs: quiescectl notices at once, reconnects to confirm the thaw, and reports the lost freeze (70)")
    func connectionDrops() throws {
        let dir = TempDir()
        let a = try FakeAgent(in: dir, .init(dropAfterFreezeMs: 200))
        // A 3 s lease: no keepalive goes out before the drop, so the watch is what notices it.
        let r = try Ctl.run(agentArgs([a]) + ["--json", "checkpoint", "--lease", "3s", "--", "sleep", "1"], in: dir)
        #expect(r.status == ExitCodes.freezeFailed, "\(r.stderr)")
        #expect(a.thawReasons == ["disconnect"])
        #expect(a.log.suffix(2) == ["hello", "thaw"], "a new connection asks for the thaw: \(a.log)")
        let agent = try #require(r.json?["agents"]?.arrayValue?.first)
        #expect(agent["freeze_lost"]?.stringValue?.contains("the connection dropped") == true)
        #expect(agent["thaw_error"] == nil)
        // Seen while COMMAND ran (the drop comes 200 ms into a 1 s COMMAND), not at the thaw.
        let lostAt = try #require(r.timelineMs("connection-lost")), doneAt = try #require(r.timelineMs("command-done"))
        #expect(lostAt < doneAt - 400, "lost at \(lostAt) ms, COMMAND done at \(doneAt) ms")
    }

    @Test("a COMMAND that outlives --timeout gets SIGTERM, then SIGKILL; the guest is thawed at the deadline; exit 71")
    func deadline() throws {
        let dir = TempDir()
        let a = try FakeAgent(in: dir)
        let r = try Ctl.run(agentArgs([a]) + ["--json", "checkpoint", "--timeout", "1s", "--kill-grace", "500ms", "--",
                                              "sh", "-c", "trap '' TERM; while :; do sleep 0.05; done"], in: dir, timeoutMs: 20_000)
        #expect(r.status == ExitCodes.commandFailed)
        let doc = try #require(r.json)
        #expect(doc["command"]?["stopped_by"] == "deadline")
        #expect(doc["command"]?["signal"] == "SIGKILL")
        let deadlineAt = try #require(r.timelineMs("deadline")), thawedAt = try #require(r.timelineMs("thawed")), killAt = try #require(r.timelineMs("kill"))
        #expect(thawedAt < killAt, "the guest is thawed at the deadline, not after the grace period")
        #expect(killAt - deadlineAt >= 450)
        #expect(!a.frozen)
    }

    @Test("keepalives renew the lease while COMMAND runs, from a thread COMMAND does not block")
    func keepalives() throws {
        let dir = TempDir()
        let a = try FakeAgent(in: dir)
        let r = try Ctl.run(agentArgs([a]) + ["checkpoint", "--timeout", "30s", "--lease", "600ms", "--", "sleep", "2"], in: dir)
        #expect(r.status == 0, "\(r.stderr)")
        let times = a.keepaliveTimes
        #expect(times.count >= 6, "one every 200 ms for 2 s: \(times.count)")
        let gaps = zip(times.dropFirst(), times).map { Double($0 - $1) / 1e6 }
        #expect(gaps.allSatisfy { $0 < 450 }, "no gap near the 600 ms lease: \(gaps)")
        #expect(a.keepaliveTimeouts.allSatisfy { ($0 ?? 0) > 0 && ($0 ?? 0) <= 600 })
    }

    @Test("32 agents are asked to freeze all at once: none answers until every one has been asked")
    func groupFreezesInParallel() throws {
        // Each fake agent holds its freeze reply until all 32 have received their freeze request,
        // so a coordinator that froze them one after another could never finish. (How fast 32 real
        // agents freeze compared to one is measured by bench/group-bench, not here.)
        let dir = TempDir()
        let barrier = Barrier(parties: 32)
        let agents = try (0..<32).map { try FakeAgent(in: dir, name: "g\($0)", .init(freezeBarrier: barrier)) }
        let runs = dir.file("runs")
        let group = try Ctl.run(agentArgs(agents) + ["--json", "--reply-timeout", "20s", "checkpoint", "--", "sh", "-c", "echo once >> '\(runs)'"], in: dir)
        #expect(group.status == 0, "\(group.stderr)")
        let doc = try #require(group.json)
        #expect((doc["agents"]?.arrayValue ?? []).compactMap { $0["frozen_ms"]?.doubleValue }.count == 32)
        #expect(contents(runs) == "once\n", "COMMAND runs once for the whole group")
        #expect(agents.allSatisfy { !$0.frozen && $0.log == ["hello", "freeze", "thaw"] })
    }

    @Test("one agent of a group refuses: the others are thawed and COMMAND does not run")
    func groupOneRefuses() throws {
        let dir = TempDir()
        let ok1 = try FakeAgent(in: dir, name: "ok1"), ok2 = try FakeAgent(in: dir, name: "ok2")
        let bad = try FakeAgent(in: dir, name: "bad", .init(freezeError: ProtocolError(.freezeFailed, "/data: EIO")))
        let marker = dir.file("ran")
        let r = try Ctl.run(agentArgs([ok1, bad, ok2]) + ["checkpoint", "--", "touch", marker], in: dir)
        #expect(r.status == ExitCodes.freezeFailed)
        #expect(!FileManager.default.fileExists(atPath: marker))
        #expect(ok1.log == ["hello", "freeze", "thaw"] && ok2.log == ["hello", "freeze", "thaw"])
        #expect(r.stderr.contains("\(bad.address): cannot freeze: freeze refused: freeze-failed: /data: EIO"))
    }

    @Test("usage errors exit 64 and name the flag", arguments: [
        (["checkpoint", "--", "true"], "--agent is required"),
        (["--agent", "tcp:1:2", "ping"], "--agent <ADDR>"),
        (["--agent", "unix:/x", "--reply-timeout", "soon", "ping"], "--reply-timeout <D>"),
        (["--agent", "unix:/x", "checkpoint"], "missing COMMAND"),
        (["--agent", "unix:/x", "checkpoint", "--timeout", "5s", "--lease", "10s", "--", "true"], "--lease (10s) must not be longer than --timeout (5s)"),
        (["--agent", "unix:/x", "checkpoint", "--on-agent-failure", "maybe", "--", "true"], "--on-agent-failure"),
        (["--agent", "unix:/x", "checkpoint", "--timeout", "0", "--", "true"], "--timeout must be longer than 0"),
        (["--agent", "unix:/x", "--agent", "vsock:3:5", "--agent", "unix:/x", "checkpoint", "--", "true"], "--agent unix:/x is given twice"),
        (["--agent", "unix:/x", "checkpoint", "--", "no-such-command-here"], "COMMAND not found: no-such-command-here (nothing was frozen)"),
        (["--agent", "unix:/x", "thaw", "--op-id", ""], "--op-id must be 1 to 128 bytes"),
        (["--agent", "qga:unix:/x", "freeze", "--timeout", "3s"], "--timeout cannot be kept by qga:unix:/x: qemu-ga's protocol has no deadline"),
        (["--agent", "unix:/x", "freeze", "--mount", ""], "--mount \"\" is not a mountpoint"),
        (["--agent", "unix:/x", "freeze", "--mount", "data"], "--mount \"data\" is not a mountpoint"),
        (["--agent", "unix:/x", "sync", "--mount", "data"], "--mount \"data\" is not a mountpoint"),
        (["--agent", "unix:/x", "freeze", "--mount", "/srv/a/.."], "--mount \"/srv/a/..\" has a . or .. component"),
        (["--agent", "unix:/x", "checkpoint", "--mount", "/./srv", "--", "true"], "--mount \"/./srv\" has a . or .. component"),
        (["--agent", "unix:/x", "freeze", "--mount", "/" + String(repeating: "x", count: 5000)], "--mount is 5001 bytes long: a mountpoint is at most 4095"),
        (["--agent", "unix:/x", "freeze", "--mount", "/" + String(repeating: "x", count: 4095)], "--mount is 4096 bytes long"),
        (["--agent", "unix:/x", "filesystems", "--mount", "./x"], "is not a mountpoint"),
        (["--agent", "unix:/x", "checkpoint", "--mount", "srv", "--", "true"], "--mount \"srv\" is not a mountpoint"),
        (["--agent", "unix:/x", "checkpoint", "--", "/tmp"], "COMMAND /tmp is not an executable file (EACCES)"),
    ])
    func usageErrors(arguments: [String], message: String) throws {
        let r = try Ctl.run(arguments, in: TempDir())
        #expect(r.status == ExitCodes.usage)
        #expect(r.stderr.contains(message), "\(r.stderr)")
    }

    @Test("one agent's socket under two spellings, or through a link, is the same agent: usage error, nothing frozen")
    func sameSocketTwoSpellings() throws {
        let dir = TempDir()
        let path = dir.file("q.sock")
        let fd = try Socket.listenUnix(path: path)
        defer { FD.close(fd) }
        _ = try sh("mkdir '\(dir.path)/sub' && ln -s '\(path)' '\(dir.path)/link.sock'")
        for other in ["unix:\(dir.path)/sub/../q.sock", "unix:\(dir.path)/link.sock", "qga:unix:\(dir.path)//q.sock"] {
            let r = try Ctl.run(["--agent", "unix:\(path)", "--agent", other, "checkpoint", "--", "true"], in: dir)
            #expect(r.status == ExitCodes.usage, "\(other): \(r.stderr)")
            #expect(r.stderr.contains("are the same agent (the same socket)"), "\(r.stderr)")
        }
        // Two different sockets are two agents (the run then fails to reach them: not a usage error).
        let fd2 = try Socket.listenUnix(path: dir.file("r.sock"))
        defer { FD.close(fd2) }
        let r = try Ctl.run(["--agent", "unix:\(path)", "--agent", "unix:\(dir.file("r.sock"))", "--connect-timeout", "1s",
                             "--reply-timeout", "1s", "checkpoint", "--", "true"], in: dir)
        #expect(r.status != ExitCodes.usage, "\(r.stderr)")
    }

    @Test("--help documents the exit codes and the environment")
    func help() throws {
        let r = try Ctl.run(["checkpoint", "--help"], in: TempDir())
        #expect(r.status == 0)
        for (code, _) in ExitCodes.table { #expect(r.stdout.contains("  \(code) ")) }
        for (name, _) in CommandEnvironment.documentation { #expect(r.stdout.contains(name)) }
    }
}

@Suite("Consistency and the COMMAND environment")
struct EnvironmentTests {
    func freeze(hooks: [HookReport]) -> FreezeResult {
        FreezeResult(opID: "op", mode: .bound, filesystems: [FilesystemReport(mountPoint: "/a", type: "ext4", device: "7:0", source: "/dev/loop0")],
                     skipped: [], hooks: hooks, presyncUs: 0, freezeUs: 0, stallUs: 0, totalUs: 0, timeoutMs: 1, deadlineMs: 1)
    }

    @Test("application needs freeze hooks that all succeeded")
    func consistencyRules() {
        #expect(Consistency.of(nil) == .crash)
        #expect(Consistency.of(freeze(hooks: [])) == .filesystem)
        #expect(Consistency.of(freeze(hooks: [HookReport(name: "db", phase: .freeze, exitCode: 0, durationUs: 1)])) == .application)
        #expect(Consistency.of(freeze(hooks: [HookReport(name: "db", phase: .freeze, exitCode: 1, durationUs: 1)])) == .filesystem)
        #expect(Consistency.of(freeze(hooks: [HookReport(name: "db", phase: .freeze, exitCode: nil, durationUs: 1, error: "timed out")])) == .filesystem)
        #expect(Consistency.crash < .filesystem && Consistency.filesystem < .application)
    }

    @Test("variables for a mixed group, and merging into an environment")
    func variables() throws {
        var a = AgentReport(address: .vsock(cid: 42, port: 5123))
        a.freeze = freeze(hooks: [HookReport(name: "db", phase: .freeze, exitCode: 0, durationUs: 1)])
        var b = AgentReport(address: .unix(path: "/run/b.sock"))
        b.failure = AgentFailure(stage: .connect, error: AgentError(.unreachable, "no such socket: /run/b.sock"))
        let vars = Dictionary(uniqueKeysWithValues: CommandEnvironment.make(opID: "op-1", agents: [a, b], deadlineWallMs: 1234))
        #expect(vars["QUIESCE_CONSISTENCY"] == "crash")
        #expect(vars["QUIESCE_AGENTS"] == "vsock:42:5123;unix:/run/b.sock")
        #expect(vars["QUIESCE_FROZEN"] == "vsock:42:5123=/a")
        #expect(vars["QUIESCE_CRASH_CONSISTENT_AGENTS"] == "unix:/run/b.sock")
        #expect(vars["QUIESCE_AGENT_CONSISTENCY"] == "vsock:42:5123=application;unix:/run/b.sock=crash")
        #expect(vars["QUIESCE_DEADLINE_MS"] == "1234")
        #expect(vars["QUIESCE_OP_ID"] == "op-1")
        let exact = try JSON.parse(try #require(vars["QUIESCE_FROZEN_JSON"]))
        #expect(exact == ["vsock:42:5123": ["consistency": "application", "frozen": ["/a"], "hooks_not_held": []],
                          "unix:/run/b.sock": ["consistency": "crash", "frozen": [], "hooks_not_held": []]])
        #expect(vars["QUIESCE_HOOKS_NOT_HELD"] == "")
        let merged = CommandEnvironment.merge(base: ["PATH=/bin", "QUIESCE_OP_ID=stale", "HOME=/root"], [("QUIESCE_OP_ID", "op-1")])
        #expect(merged == ["PATH=/bin", "HOME=/root", "QUIESCE_OP_ID=op-1"])
    }

    @Test("--op-id with a control character is a usage error: the agent would refuse it, and it reaches the guest's hooks")
    func opIDWithControlCharacterIsRefused() throws {
        let dir = TempDir()
        let agent = try FakeAgent(in: dir)
        let r = try Ctl.run(["--agent", agent.address.description, "checkpoint", "--op-id", "snap\u{1b}[2J", "--", "true"], in: dir)
        #expect(r.status == ExitCodes.usage && r.stderr.contains("--op-id must not contain control characters (it has U+001B)"), "\(r.stderr)")
        #expect(agent.thawReasons.isEmpty && !agent.frozen)
    }

    /// Before: the run exited 0 with its report lost (trial H, F8).
    @Test("output that cannot be written (standard output or error on /dev/full) turns a success into 74; a failure keeps its code; a closed standard error is /dev/null")
    func lostOutputIsNotSuccess() throws {
        let dir = TempDir()
        let agent = try FakeAgent(in: dir)
        let ctl = "'\(Ctl.path)' --agent '\(agent.address)'"
        let out = try sh("""
            \(ctl) --json checkpoint -- true > /dev/full; echo "json=$?"
            \(ctl) checkpoint -- true 2>/dev/full; echo "timeline=$?"
            \(ctl) checkpoint -- true 2>&-; echo "closed=$?"
            \(ctl) status > /dev/full; echo "status=$?"
            \(ctl) checkpoint -- false 2>/dev/full; echo "failed=$?"
            \(ctl) --json checkpoint -- true > /dev/null; echo "fine=$?"
            for p in '\(Ctl.path)' '\(buildProductsDir)/quiesced'; do for f in --help --version; do
                "$p" $f > /dev/full 2>/dev/null; echo "${p##*/}$f=$?"; done; done
            """)
        #expect(out.contains("json=74") && out.contains("timeline=74") && out.contains("status=74"), "\(out)")
        // --help and --version are all output: lost, they fail too (before: 0; trial I, L5).
        for line in ["quiescectl--help=74", "quiescectl--version=74", "quiesced--help=74", "quiesced--version=74"] {
            #expect(out.contains(line), "\(out)")
        }
        // Closed on purpose: /dev/null takes its place, so the agent's socket cannot become
        // descriptor 2 and get the timeline as frames; the run succeeds.
        #expect(out.contains("closed=0"), "\(out)")
        #expect(out.contains("failed=71") && out.contains("fine=0"), "\(out)")
    }

    /// Before: a COMMAND that started its copy in the background and exited was followed by
    /// the thaw and "checkpoint succeeded", with the copy still running (trial H, F9).
    @Test("a COMMAND that exits leaving processes running in its process group: the run warns that they run on after the thaw")
    func commandLeavingProcessesIsWarned() throws {
        let dir = TempDir()
        let agent = try FakeAgent(in: dir)
        let r = try Ctl.run(["--agent", agent.address.description, "checkpoint", "--", "sh", "-c", "sleep 1 >/dev/null 2>&1 & exit 0"], in: dir)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stderr.contains("WARNING: COMMAND exited but left processes running in its process group"), "\(r.stderr)")
        let j = try Ctl.run(["--agent", agent.address.description, "--json", "checkpoint", "--", "sh", "-c", "sleep 1 >/dev/null 2>&1 & exit 0"], in: dir)
        #expect(j.json?["command"]?["left_running"] == true, "\(j.stdout)")
        let waited = try Ctl.run(["--agent", agent.address.description, "checkpoint", "--", "sh", "-c", "sleep 0.2 & wait"], in: dir)
        #expect(waited.status == 0 && !waited.stderr.contains("left processes running"), "\(waited.stderr)")
    }

    /// Before: Swift reads argv and environ as UTF-8, so a byte that is not (a Latin-1 file
    /// name) reached COMMAND as U+FFFD: `cp $'caf\xe9'` copied another file's name (trial E).
    @Test("COMMAND gets its arguments and environment byte for byte, UTF-8 or not; an option that is not UTF-8 (--mount) is a usage error, not a different mountpoint")
    func commandBytesPassUnchanged() throws {
        let dir = TempDir()
        let agent = try FakeAgent(in: dir)
        let script = dir.file("run.sh")
        try """
            #!/bin/bash
            export LATIN=$'z\\xe9'
            '\(Ctl.path)' --agent '\(agent.address)' checkpoint -- sh -c 'printf "%s|%s" "$1" "$LATIN" > "$2"' x $'caf\\xe9' '\(dir.file("got"))' 2> '\(dir.file("timeline"))'
            echo "checkpoint=$?"
            # The timeline prints COMMAND so that bash, reading it, passes the same bytes.
            line=$(sed -n 's/.*running \\(.*\\) (pid [0-9]*)$/\\1/p' '\(dir.file("timeline"))')
            eval "set -- $line" && printf '%s' "$5" > '\(dir.file("reread"))'
            '\(Ctl.path)' --agent '\(agent.address)' checkpoint --mount $'/srv/caf\\xe9' -- true 2>&1
            echo "mount=$?"
            # A program whose name is not UTF-8, by path and through a PATH entry that is not.
            # (chmod: an in-test peer's Socket.listenUnix narrows the process's umask around its bind, and cp may run then.)
            mkdir $'\(dir.path)/bin\\xe9' && cp /bin/true $'\(dir.path)/bin\\xe9/pr\\xe9g' && chmod 755 $'\(dir.path)/bin\\xe9' $'\(dir.path)/bin\\xe9/pr\\xe9g'
            '\(Ctl.path)' --agent '\(agent.address)' checkpoint -- $'\(dir.path)/bin\\xe9/pr\\xe9g' >/dev/null 2>&1
            echo "by-path=$?"
            PATH=$'\(dir.path)/bin\\xe9':$PATH '\(Ctl.path)' --agent '\(agent.address)' checkpoint -- $'pr\\xe9g' >/dev/null 2>&1
            echo "by-PATH=$?"
            """.write(toFile: script, atomically: true, encoding: .utf8)
        let out = try sh("bash '\(script)'")
        #expect(out.contains("checkpoint=0") && out.contains("mount=64"), "\(out)")
        #expect(out.contains("by-path=0") && out.contains("by-PATH=0"), "a program named by bytes that are not UTF-8 runs: \(out)")
        #expect(out.contains("argument 5 (/srv/caf\\xe9) is not UTF-8"), "\(out)")
        let got = try #require(FileManager.default.contents(atPath: dir.file("got")))
        #expect(Array(got) == Array("caf".utf8) + [0xE9, UInt8(ascii: "|"), UInt8(ascii: "z"), 0xE9], "\(Array(got))")
        let timeline = try String(contentsOfFile: dir.file("timeline"), encoding: .utf8)
        #expect(timeline.contains(" x $'caf\\xe9' "), "\(timeline)")
        let reread = try #require(FileManager.default.contents(atPath: dir.file("reread")))
        #expect(Array(reread) == Array("caf".utf8) + [0xE9], "the timeline's COMMAND, read by bash, gives back the argument: \(Array(reread))")
    }
}

extension CheckpointTests {
    /// Before: an argument with a character the terminal output escapes (U+202E, U+0085) was
    /// printed inside single quotes as the text `\u202e`, which bash reads back as six other
    /// characters (trial I, L2).
    @Test("the timeline's COMMAND, read back by bash, is the same arguments also with bidirectional controls, C1 controls and separators",
          arguments: ["\u{202E}RLO", "next\u{0085}line", "para\u{2029}graph", "caf\u{E9} 'q'", "\u{2066}iso\u{2069}", "mark\u{200F}\u{061C}"])
    func timelineQuotesWhatTheTerminalActsOn(arg: String) throws {
        let dir = TempDir()
        let agent = try FakeAgent(in: dir)
        let r = try Ctl.run(["--agent", agent.address.description, "checkpoint", "--", "true", arg], in: dir)
        #expect(r.status == 0, "\(r.stderr)")
        let line = try #require(r.stderr.split(separator: "\n").first { $0.contains(" running ") }.map(String.init), "\(r.stderr)")
        #expect(!line.unicodeScalars.contains { terminalActsOn($0.value) }, "\(line)")
        let quoted = try #require(line.firstRange(of: " running ").map { String(line[$0.upperBound...]) })
        let command = String(quoted[..<(quoted.range(of: " (pid ", options: .backwards)?.lowerBound ?? quoted.endIndex)])
        try command.write(toFile: dir.file("command"), atomically: true, encoding: .utf8)
        // In the C locale too (cron, ssh without LANG): bash reads `\u` escapes as text there.
        _ = try sh("LC_ALL=C bash -c 'out=\"$1\"; eval \"set -- $(cat \"$0\")\"; printf %s \"$2\" > \"$out\"' '\(dir.file("command"))' '\(dir.file("reread"))'")
        let reread = try #require(FileManager.default.contents(atPath: dir.file("reread")))
        #expect(Array(reread) == Array(arg.utf8), "\(command) read back as \(Array(reread))")
    }
}

@Suite("Checkpoint: a late agent in a group")
struct FreezeWaitTests {
    @Test("an agent that never answers its freeze holds the group only --freeze-wait; it is then undone by op id")
    func silentAgentIsGivenUpOn() throws {
        let dir = TempDir()
        let good = try FakeAgent(in: dir, name: "good")
        let silent = try FakeAgent(in: dir, name: "silent", .init(silentOn: .freeze))
        let marker = dir.file("ran")
        let start = monotonicNanos()
        let r = try Ctl.run(["--agent", "unix:\(dir.file("good.sock"))", "--agent", "unix:\(dir.file("silent.sock"))",
                             "--json", "checkpoint", "--freeze-wait", "500ms", "--op-id", "group-1", "--", "touch", marker], in: dir)
        let elapsed = monotonicNanos() - start
        #expect(r.status == ExitCodes.freezeFailed, "\(r.stderr)")
        #expect(elapsed < 5_000_000_000, "took \(elapsed / 1_000_000) ms; the freeze reply timeout is 60 s")
        #expect(!FileManager.default.fileExists(atPath: marker))
        #expect(!good.frozen && good.thawReasons == ["request"])
        #expect(silent.thawOps == ["group-1"], "the given-up agent is asked to thaw that op: \(silent.thawOps)")
        let events = r.json?["timeline"]?.arrayValue?.compactMap { $0["event"]?.stringValue } ?? []
        #expect(events.contains("gave-up"), "\(events)")
    }
}
