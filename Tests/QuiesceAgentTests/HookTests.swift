// Hooks as writers: every phase on real loop filesystems with a real quiesced and real hook processes.
import Foundation
import QuiesceLinux
import QuiesceProtocol
import QuiesceTestSupport
import Testing

/// A hook body that appends "NAME PHASE" to `log` (one line per run) and then runs `then`.
func journaling(_ name: String, _ log: String, then: String = "exit 0") -> String {
    "echo \"\(name) $1\" >> '\(log)'\n\(then)"
}

func lines(_ path: String) -> [String] {
    ((try? String(contentsOfFile: path, encoding: .utf8)) ?? "").split(separator: "\n").map(String.init)
}

@Suite("hooks: freeze, thaw, freeze-failed, hold", .enabled(if: canUseLoopDevices, "needs root and loop devices"))
struct HookPhaseTests {
    @Test("freeze in order, thaw in reverse; the environment names the mounts exactly")
    func orderAndEnvironment() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let odd = try lab.filesystem("b \"odd\"\nline")  // a quote and a newline in the path
            let log = "\(lab.root)/phases"
            let env = "\(lab.root)/env"
            let hooks = try makeHooks(in: lab.root, [
                "10-first": journaling("10-first", log, then: "[ \"$1\" = freeze ] && printf '%s' \"$QUIESCE_MOUNTS_JSON\" > '\(env)'; exit 0"),
                "20-second": journaling("20-second", log),
            ])
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--hooks-dir", hooks])
            let c = try TestClient(path: agent.socketPath)
            let r = try c.result(["op": "freeze", "mode": "detached"])
            #expect(r["hooks"]?.arrayValue?.compactMap { $0["outcome"]?.stringValue } == ["ok", "ok"])
            #expect(try isFrozen(a))
            let t = try c.result(["op": "thaw"])
            #expect(t["hooks"]?.arrayValue?.compactMap { $0["phase"]?.stringValue } == ["thaw", "thaw"])
            #expect(lines(log) == ["10-first freeze", "20-second freeze", "20-second thaw", "10-first thaw"])
            let mounts = try JSON.parse(String(contentsOfFile: env, encoding: .utf8)).arrayValue?.compactMap(\.stringValue)
            #expect(Set(mounts ?? []) == [a, odd], "exact, whatever the paths hold")
            agent.stop()
        }
    }

    @Test("a slow thaw hook is not counted as frozen: frozen_us ends at FITHAW, and status while it runs says thawing with no countdown")
    func thawHookTimeIsNotFrozenTime() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let hooks = try makeHooks(in: lab.root, ["10-slow-thaw": "[ \"$1\" = thaw ] && sleep 1.5; exit 0"])
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--hooks-dir", hooks])
            defer { agent.stop() }
            let c = try TestClient(path: agent.socketPath)
            _ = try c.result(["op": "freeze", "mode": "detached"])
            #expect(try isFrozen(a))
            try c.sendRaw(Array("{\"id\":\"t\",\"op\":\"thaw\"}\n".utf8))
            usleep(600_000)  // FITHAW is done; the hook sleeps
            #expect(try writeCompletes(a, withinMs: 2000), "thawed while the thaw hook runs")
            let status = try TestClient(path: agent.socketPath).result(["op": "status"])
            #expect(status["state"] == "thawing", "\(status)")
            #expect(status["thawed_at_ms"]?.intValue != nil, "the filesystems are thawed, the hooks run: \(status)")
            #expect(status["remaining_ms"] == nil && status["deadline_ms"] == nil, "no auto-thaw countdown while thawing: \(status)")
            guard case .reply(let r) = try c.readMessage(timeoutMs: 10_000), case .success(let t) = r.outcome else {
                Issue.record("no thaw reply"); return
            }
            let frozenUs = t["frozen_us"]?.intValue ?? -1
            let hookUs = t["hooks"]?.arrayValue?.first?["duration_us"]?.intValue ?? -1
            #expect(hookUs >= 1_400_000, "the thaw hook ran 1.5 s: \(t)")
            #expect(frozenUs >= 0 && frozenUs < 1_000_000, "frozen for \(frozenUs) us, though FITHAW came before the 1.5 s hook")
        }
    }

    /// Before: the deadline guard stayed armed, and the freeze record stayed, until the thaw
    /// hooks were done; a thaw hook slower than the deadline plus the guard's 5 s grace had the
    /// guard FITHAW the filesystems again, ending a freeze another party had taken since, and
    /// a crash during the hooks had recovery do the same (trial H).
    @Test("while a slow thaw hook runs, neither the deadline guard nor a crash's recovery thaws again what another party froze after the thaw")
    func slowThawHookLeavesOthersFreezeAlone() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let log = "\(lab.root)/phases"
            let hooks = try makeHooks(in: lab.root, ["10-slow-thaw": journaling("10-slow-thaw", log, then: "[ \"$1\" = thaw ] && [ -z \"$QUIESCE_RECOVERY\" ] && sleep 8; exit 0")])
            let state = "\(lab.root)/shared-state"
            let args = ["--include", "\(lab.root)/*", "--hooks-dir", hooks]
            let agent = try AgentProcess(in: lab.root, arguments: args, stateDir: state)
            defer { agent.stop() }
            let c = try TestClient(path: agent.socketPath)
            _ = try c.result(["op": "freeze", "mode": "detached", "timeout_ms": 1000])
            try c.sendRaw(Array("{\"id\":\"t\",\"op\":\"thaw\"}\n".utf8))
            usleep(600_000)  // FITHAW is done; the hook sleeps 8 s, past the deadline (1 s) plus the guard's grace (5 s)
            _ = try sh("fsfreeze -f '\(a)'")  // another party's freeze
            defer { _ = try? sh("fsfreeze -u '\(a)' 2>/dev/null", allowFailure: true) }
            guard case .reply(let r) = try c.readMessage(timeoutMs: 20_000), case .success = r.outcome else {
                Issue.record("no thaw reply"); return
            }
            #expect(try isFrozen(a), "the other party's freeze still holds after the thaw hook")
            #expect(!agent.log.contains("deadline guard"), "\(agent.log)")
            _ = try sh("fsfreeze -u '\(a)'")

            // The same, with the agent killed while its thaw hook runs: recovery ends the hook
            // (thaw) and thaws nothing.
            _ = try c.result(["op": "freeze", "mode": "detached"])
            try c.sendRaw(Array("{\"id\":\"t2\",\"op\":\"thaw\"}\n".utf8))
            usleep(600_000)
            _ = try sh("fsfreeze -f '\(a)'")
            agent.signal(SIGKILL)
            _ = agent.waitForExit()
            let out = try sh("'\(buildProductsDir)/quiesced' --config /dev/null --recover --state-dir '\(state)' 2>&1; echo \"exit=$?\"")
            #expect(out.contains("exit=0") && out.contains("ended the hooks op"), "\(out)")
            #expect(!out.contains("thawed:"), "recovery thawed nothing: \(out)")
            #expect(try isFrozen(a), "the other party's freeze still holds after recovery")
            #expect(lines(log).suffix(2) == ["10-slow-thaw thaw", "10-slow-thaw thaw"], "\(lines(log))")
        }
    }

    @Test("a FIFREEZE that fails (filesystem frozen by someone else) ends the hooks with freeze-failed")
    func fifreezeFails() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let log = "\(lab.root)/phases"
            let hooks = try makeHooks(in: lab.root, ["10-db": journaling("10-db", log)])
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--hooks-dir", hooks])
            _ = try sh("fsfreeze -f '\(a)'")  // only our own lab mount
            defer { _ = try? sh("fsfreeze -u '\(a)'", allowFailure: true) }
            let reply = try TestClient(path: agent.socketPath).call(["op": "freeze"])
            _ = try sh("fsfreeze -u '\(a)'")
            #expect(reply.outcome.failureCode != nil)
            #expect(lines(log) == ["10-db freeze", "10-db freeze-failed"])
            agent.stop()
        }
    }

    /// Before: the record named every planned filesystem from the request on, and went on
    /// naming every target while the freeze-failed hooks ran, so an agent killed while a freeze
    /// hook ran, or while freeze-failed hooks ran (after a hook failed, or after the FIFREEZE of
    /// a filesystem another party had frozen failed with EBUSY), had --recover FITHAW a
    /// filesystem this freeze never froze, ending the other party's freeze (trial H, trial I S3).
    @Test("the agent killed before any FIFREEZE held (in a freeze hook, in freeze-failed after a hook failed or after EBUSY): recovery ends the owed hooks and leaves another party's freeze alone",
          arguments: ["freeze-hook", "freeze-failed-after-hook-failure", "freeze-failed-after-ebusy"])
    func crashBeforeFreezingLeavesOthersFreeze(stage: String) async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            _ = try lab.filesystem("b")
            let log = "\(lab.root)/phases"
            let slow = "[ -z \"$QUIESCE_RECOVERY\" ] && sleep 30; exit 0"
            let scripts: [String: String] = switch stage {
            case "freeze-hook": ["10-db": journaling("10-db", log, then: "[ \"$1\" = freeze ] && \(slow)")]
            case "freeze-failed-after-hook-failure": ["10-db": journaling("10-db", log, then: "[ \"$1\" = freeze-failed ] && \(slow)"),
                                                      "20-bad": journaling("20-bad", log, then: "exit 3")]
            default: ["10-db": journaling("10-db", log, then: "[ \"$1\" = freeze-failed ] && \(slow)")]
            }
            let hooks = try makeHooks(in: lab.root, scripts)
            let state = "\(lab.root)/shared-state"
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--hooks-dir", hooks], stateDir: state)
            defer { agent.stop() }
            _ = try sh("fsfreeze -f '\(a)'")  // another party's freeze, of our own lab mount
            defer { _ = try? sh("fsfreeze -u '\(a)' 2>/dev/null", allowFailure: true) }
            let c = try TestClient(path: agent.socketPath)
            try c.sendRaw(Array("{\"id\":1,\"op\":\"freeze\",\"mode\":\"detached\"}\n".utf8))
            let reached = switch stage {
            case "freeze-hook": ["10-db freeze"]
            case "freeze-failed-after-hook-failure": ["10-db freeze", "20-bad freeze", "10-db freeze-failed"]
            default: ["10-db freeze", "10-db freeze-failed"]
            }
            #expect(eventually(withinMs: 10_000) { lines(log) == reached }, "\(lines(log))")
            agent.signal(SIGKILL)
            _ = agent.waitForExit()
            let out = try sh("'\(buildProductsDir)/quiesced' --config /dev/null --recover --state-dir '\(state)' 2>&1; echo \"exit=$?\"")
            #expect(out.contains("exit=0"), "\(out)")
            #expect(!out.contains("\(a): thawed"), "\(out)")
            #expect(try isFrozen(a), "the other party's freeze holds after recovery: \(out)")
            if stage == "freeze-hook" {
                #expect(lines(log) == ["10-db freeze"], "a hook whose freeze never finished is owed nothing: \(lines(log))")
            } else {
                #expect(out.contains("ended the hooks op"), "\(out)")
                #expect(lines(log).last == "10-db freeze-failed", "\(lines(log))")
            }
        }
    }

    @Test("the requester leaving mid-freeze: the freeze is given up after the running hook, hooks get freeze-failed, nothing stays frozen")
    func requesterLeaves() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let log = "\(lab.root)/phases"
            let hooks = try makeHooks(in: lab.root, [
                // Long enough to outlast any load: the agent stops it when the requester leaves.
                "10-slow": journaling("10-slow", log, then: "[ \"$1\" = freeze ] && sleep 20; exit 0"),
                "20-next": journaling("20-next", log),
            ])
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--hooks-dir", hooks])
            let c = try TestClient(path: agent.socketPath)
            try c.sendRaw(Array("{\"id\":1,\"op\":\"freeze\",\"mode\":\"bound\"}\n".utf8))
            let probe = try TestClient(path: agent.socketPath)
            try waitUntil(timeoutMs: 1000) { try probe.result(["op": "status"])["state"] == "freezing" }
            // The hook has begun (CI, under load: the requester left before the hook's first
            // line, so the hook was stopped before it wrote it, as it should be).
            #expect(eventually(withinMs: 15_000) { lines(log) == ["10-slow freeze"] }, "\(lines(log))")
            c.close()
            try waitUntil(timeoutMs: 5000) { try probe.result(["op": "status"])["state"] == "thawed" }
            #expect(try !isFrozen(a))
            #expect(lines(log) == ["10-slow freeze", "10-slow freeze-failed"], "20-next never ran; 10-slow was ended")
            agent.stop()
        }
    }

    /// Before: the freeze reply said `holding` and a checkpoint told COMMAND
    /// QUIESCE_CONSISTENCY=application, while status already said `lost` (trial H, F5).
    @Test("a hold-style hook that says ready and exits before the filesystems freeze is lost in the freeze reply")
    func holdHookGoneBeforeTheFreezeIsLost() async throws {
        try await LoopLab.with { lab in
            _ = try lab.filesystem("a")
            let hooks = try makeHooks(in: lab.root, [
                "10-hold": "# quiesce: hold\n[ \"$1\" = freeze ] && echo ready; exit 0",
                "20-wait": "[ \"$1\" = freeze ] && sleep 0.3; exit 0",
            ])
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--hooks-dir", hooks])
            defer { agent.stop() }
            let c = try TestClient(path: agent.socketPath)
            let r = try c.result(["op": "freeze", "mode": "detached"])
            let hold = r["hooks"]?.arrayValue?.first { $0["name"] == "10-hold" }
            #expect(hold?["outcome"] == "lost", "\(r)")
            _ = try c.result(["op": "thaw"])
        }
    }

    /// Before: the freeze then failed blaming syncfs ("did not return within 0 ms ... too short
    /// for this flush") although the hooks had used up the request's timeout (trial H).
    @Test("freeze hooks slower than the request's whole timeout: the freeze fails naming the hooks, nothing is frozen, the hooks get freeze-failed")
    func hooksUsingTheWholeTimeoutAreNamed() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let log = "\(lab.root)/phases"
            let hooks = try makeHooks(in: lab.root, ["10-slow": journaling("10-slow", log, then: "[ \"$1\" = freeze ] && sleep 2; exit 0")])
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--hooks-dir", hooks])
            defer { agent.stop() }
            let reply = try TestClient(path: agent.socketPath).call(["op": "freeze", "mode": "detached", "timeout_ms": 1000], timeoutMs: 10_000)
            guard case .failure(let e) = reply.outcome else { Issue.record("the freeze succeeded: \(reply)"); return }
            #expect(e.code == .freezeFailed && e.message.contains("the freeze hooks took 2") && e.message.contains("the whole of the freeze's timeout (1 s)"), "\(e)")
            #expect(try !isFrozen(a))
            #expect(lines(log) == ["10-slow freeze", "10-slow freeze-failed"], "\(lines(log))")
        }
    }

    /// Before: the running freeze hook was waited for (up to its timeout) while an earlier
    /// hold-style hook kept its application locked for a requester that had gone (trial H, F4).
    @Test("the requester leaving while a slow freeze hook runs: that hook is killed at once and gets freeze-failed, and an earlier holding hook is released at once, not after it")
    func requesterLeavingStopsTheRunningHook() async throws {
        try await LoopLab.with { lab in
            _ = try lab.filesystem("a")
            let log = "\(lab.root)/phases"
            let hooks = try makeHooks(in: lab.root, [
                "10-hold": "# quiesce: hold\necho \"10-hold $1\" >> '\(log)'\necho ready\nread how\necho \"10-hold $how\" >> '\(log)'",
                "20-slow": journaling("20-slow", log, then: "[ \"$1\" = freeze ] && sleep 20; exit 0"),
            ])
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--hooks-dir", hooks])
            defer { agent.stop() }
            let c = try TestClient(path: agent.socketPath)
            try c.sendRaw(Array("{\"id\":1,\"op\":\"freeze\",\"mode\":\"bound\"}\n".utf8))
            #expect(eventually(withinMs: 5000) { lines(log).contains("20-slow freeze") }, "\(lines(log))")
            let left = monotonicNanos()
            c.close()
            #expect(eventually(withinMs: 10_000) { lines(log).contains("10-hold freeze-failed") }, "\(lines(log))")
            let released = Double(monotonicNanos() - left) / 1e9
            #expect(released < 3, "the holding hook was released \(released) s after the requester left, not after 20-slow's 20 s")
            #expect(lines(log) == ["10-hold freeze", "20-slow freeze", "20-slow freeze-failed", "10-hold freeze-failed"], "\(lines(log))")
        }
    }

    @Test("SIGTERM while the hooks run: the freeze is given up, the hooks get freeze-failed, the agent exits")
    func stoppingDuringHooks() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let log = "\(lab.root)/phases"
            let hooks = try makeHooks(in: lab.root, [
                "10-slow": journaling("10-slow", log, then: "[ \"$1\" = freeze ] && sleep 1; exit 0"),
                "20-next": journaling("20-next", log),
            ])
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--hooks-dir", hooks])
            let path = agent.socketPath
            let freezer = BackgroundCall { try TestClient(path: path).call(["op": "freeze", "mode": "detached"]) }
            let probe = try TestClient(path: path)
            try waitUntil(timeoutMs: 5000) { try probe.result(["op": "status"])["state"] == "freezing" }
            // "freezing" starts before the hooks do: wait for the first hook itself (it sleeps 1 s).
            try waitUntil(timeoutMs: 5000) { lines(log).contains("10-slow freeze") }
            agent.signal(SIGTERM)
            #expect(agent.waitForExit(timeoutMs: 10_000) == 0)
            // The reply was written before the agent exited; a loaded machine may take a while
            // to schedule the thread that reads it.
            let reply = try? freezer.wait(timeoutMs: 15_000)
            #expect(reply?.outcome.failureCode == .hookFailed)
            #expect(try !isFrozen(a))
            #expect(lines(log) == ["10-slow freeze", "10-slow freeze-failed"])
        }
    }

    @Test("a hanging hook is killed with its process group at its own timeout; ping and status stay prompt")
    func ownTimeout() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let pidFile = "\(lab.root)/grandchild"
            let hooks = try makeHooks(in: lab.root, [
                "10-hangs": "# quiesce: timeout=1s\nsleep 60 & echo $! > '\(pidFile)'; sleep 60",
            ])
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--hooks-dir", hooks, "--hook-timeout", "30s"])
            let path = agent.socketPath
            let t0 = Date()
            let freezer = BackgroundCall { try TestClient(path: path).call(["op": "freeze"]) }
            let probe = try TestClient(path: path)
            try waitUntil(timeoutMs: 800) { try probe.result(["op": "status"])["state"] == "freezing" }
            let p0 = Date()
            _ = try probe.result(["op": "ping"], timeoutMs: 300)
            _ = try probe.result(["op": "status"], timeoutMs: 300)
            #expect(Date().timeIntervalSince(p0) < 0.3)
            let reply = try freezer.wait(timeoutMs: 10_000)
            let took = Date().timeIntervalSince(t0)
            #expect(reply.outcome.failureCode == .hookFailed)
            #expect(took < 3, "failed at the hook's own 1 s timeout, not --hook-timeout's 30 s (took \(took) s)")
            let report = reply.outcome.failureDetails?["hooks"]?.arrayValue?.first
            #expect(report?["outcome"] == "timed-out")
            let grandchild = (try? String(contentsOfFile: pidFile, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? ""
            // Gone or a zombie (killed; reaped by whoever adopted it): never still sleeping.
            let st = (try? String(contentsOfFile: "/proc/\(grandchild)/stat", encoding: .utf8)) ?? ""
            let alive = st.split(separator: ")").last.map { $0.trimmingCharacters(in: .whitespaces).first != "Z" } ?? false
            #expect(!grandchild.isEmpty && !alive, "the hook's background child was killed too: \(st)")
            #expect(try !isFrozen(a))
            agent.stop()
        }
    }

    @Test("unsafe hooks and unsafe directories are refused, reported, never run")
    func unsafeRefused() async throws {
        try await LoopLab.with { lab in
            _ = try lab.filesystem("a")
            let ran = "\(lab.root)/ran"
            let hooks = try makeHooks(in: lab.root, [
                "10-group-writable": "touch '\(ran)'",
                "20-ok": "exit 0",
                "30-bad-header": "# quiesce: hodl\ntouch '\(ran)'",
            ])
            _ = try sh("chmod 775 '\(hooks)/10-group-writable'")
            // Neither a subdirectory (hooks in it do not run) nor a FIFO is a hook: both are named.
            _ = try sh("mkdir '\(hooks)/40-subdir' && mkfifo '\(hooks)/50-fifo'")
            _ = try makeHooks(in: lab.root, ["60-long-timeout": "# quiesce: timeout=99h\nexit 0"])
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--hooks-dir", hooks])
            let c = try TestClient(path: agent.socketPath)
            let r = try c.result(["op": "freeze", "mode": "detached"])
            let refused = r["hooks_refused"]?.arrayValue?.compactMap { $0["name"]?.stringValue }
            #expect(refused == ["10-group-writable", "30-bad-header", "40-subdir", "50-fifo", "60-long-timeout"])
            let why = r["hooks_refused"]?.arrayValue?.last?["reason"]?.stringValue ?? ""
            #expect(why.contains("longer than one day"), "says why the timeout is bad: \(why)")
            #expect(r["hooks"]?.arrayValue?.compactMap { $0["name"]?.stringValue } == ["20-ok"])
            let status = try c.result(["op": "status"])
            #expect(status["hooks_refused"]?.arrayValue?.count == 5)
            _ = try c.result(["op": "thaw"])
            #expect(!FileManager.default.fileExists(atPath: ran))

            // A directory others can write: nothing in it runs.
            _ = try sh("chmod 777 '\(hooks)'")
            let r2 = try c.result(["op": "freeze", "mode": "detached"])
            #expect(r2["hooks"]?.arrayValue?.isEmpty == true)
            #expect(r2["hooks_refused"]?.arrayValue?.first?["reason"]?.stringValue?.contains("writable by group or others") == true)
            _ = try c.result(["op": "thaw"])
            agent.stop()
        }
    }

    @Test("a failing freeze hook's error quotes the last line it printed; a script without #! is named as such")
    func failureSaysWhy() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let hooks = try makeHooks(in: lab.root, ["10-db": "echo 'connecting'\necho 'db said no' >&2\nexit 3"])
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--hooks-dir", hooks])
            defer { agent.stop() }
            let c = try TestClient(path: agent.socketPath)
            let failed = try c.call(["op": "freeze", "mode": "detached"])
            #expect(failed.outcome.failureCode == .hookFailed)
            #expect(failed.outcome.failureMessage?.hasSuffix("freeze hook 10-db exit code 3: \"db said no\"") == true, "\(failed)")
            #expect(try !isFrozen(a))
            _ = try sh("printf 'echo hi\\n' > '\(hooks)/10-db'")
            let noShebang = try c.call(["op": "freeze", "mode": "detached"])
            #expect(noShebang.outcome.failureMessage?.contains("ENOEXEC") == true, "\(noShebang)")
            #expect(noShebang.outcome.failureMessage?.contains("#! line") == true, "\(noShebang)")
            #expect(try !isFrozen(a))
        }
    }

    @Test("an optional hook that fails lets the freeze go on and says so")
    func optionalFails() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let log = "\(lab.root)/phases"
            let hooks = try makeHooks(in: lab.root, [
                "10-optional": "# quiesce: optional\n" + journaling("10-optional", log, then: "[ \"$1\" = freeze ] && { echo 'no server'; exit 4; }; exit 0"),
                "20-ok": journaling("20-ok", log),
            ])
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--hooks-dir", hooks])
            let c = try TestClient(path: agent.socketPath)
            let r = try c.result(["op": "freeze", "mode": "detached"])
            #expect(try isFrozen(a))
            let first = r["hooks"]?.arrayValue?.first
            #expect(first?["outcome"] == "failed")
            #expect(first?["optional"] == true)
            #expect(first?["output"]?.stringValue?.contains("no server") == true)
            _ = try c.result(["op": "thaw"])
            #expect(lines(log) == ["10-optional freeze", "20-ok freeze", "20-ok thaw"], "a failed hook gets no ending")
            agent.stop()
        }
    }

    @Test("a hold hook holds across the freeze and is told thaw on stdin; one that dies while frozen is reported lost")
    func holdHooks() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let log = "\(lab.root)/phases"
            let hooks = try makeHooks(in: lab.root, [
                // Holds until told: one line on stdin, then end of file.
                "10-hold": "# quiesce: hold timeout=5s\necho \"10-hold $1 $QUIESCE_HOLD\" >> '\(log)'\necho ready\n"
                    + "read line; echo \"10-hold told $line\" >> '\(log)'",
            ])
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--hooks-dir", hooks])
            let c = try TestClient(path: agent.socketPath)
            let r = try c.result(["op": "freeze", "mode": "detached"])
            #expect(r["hooks"]?.arrayValue?.first?["outcome"] == "holding")
            #expect(try isFrozen(a))
            #expect(try c.result(["op": "status"])["hooks"]?.arrayValue?.first?["outcome"] == "holding")
            let t = try c.result(["op": "thaw"])
            #expect(t["hooks"]?.arrayValue?.first?["outcome"] == "ok")
            #expect(lines(log) == ["10-hold freeze 1", "10-hold told thaw"])

            // Dies while frozen: status and the thaw reply say `lost`.
            try "#!/bin/sh\n# quiesce: hold\necho ready\nsleep 0.3\nexit 9\n".write(toFile: "\(hooks)/10-hold", atomically: true, encoding: .utf8)
            _ = try sh("chmod 755 '\(hooks)/10-hold'")
            _ = try c.result(["op": "freeze", "mode": "detached"])
            try waitUntil(timeoutMs: 2000) { try c.result(["op": "status"])["hooks"]?.arrayValue?.first?["outcome"] == "lost" }
            let t2 = try c.result(["op": "thaw"])
            let lost = t2["hooks"]?.arrayValue?.first
            #expect(lost?["outcome"] == "lost")
            #expect(lost?["exit_code"] == 9)
            agent.stop()
        }
    }

    @Test("after a crash during the freeze hooks, the restarted agent ends the hooks whose freeze succeeded with freeze-failed")
    func crashDuringHooks() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let log = "\(lab.root)/phases"
            let pidFile = "\(lab.root)/hanging-pid"
            let hooks = try makeHooks(in: lab.root, [
                "10-db": journaling("10-db", log),
                "20-hangs": journaling("20-hangs", log, then: "echo $$ > '\(pidFile)'; [ \"$1\" = freeze ] && sleep 30; exit 0"),
            ])
            defer { _ = try? sh("kill -9 -$(cat '\(pidFile)') 2>/dev/null", allowFailure: true) }  // its group, orphaned by the crash
            let state = "\(lab.root)/shared-state"
            let args = ["--include", "\(lab.root)/*", "--hooks-dir", hooks]
            let agent = try AgentProcess(in: lab.root, arguments: args, stateDir: state)
            try TestClient(path: agent.socketPath).sendRaw(Array("{\"id\":1,\"op\":\"freeze\",\"mode\":\"detached\"}\n".utf8))
            try waitUntil(timeoutMs: 3000) { lines(log).contains("20-hangs freeze") }
            agent.signal(SIGKILL)
            _ = agent.waitForExit()
            let again = try AgentProcess(in: lab.root, name: "agent2", arguments: args, stateDir: state)
            #expect(try !isFrozen(a))
            #expect(lines(log) == ["10-db freeze", "20-hangs freeze", "10-db freeze-failed"])
            again.stop()
        }
    }

    @Test("after a crash while frozen, the restarted agent thaws and ends the owed hooks with thaw")
    func crashRecoveryEndsHooks() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let log = "\(lab.root)/phases"
            let hooks = try makeHooks(in: lab.root, ["10-db": journaling("10-db", log, then: "echo \"recovery=$QUIESCE_RECOVERY\" >> '\(log)'")])
            let state = "\(lab.root)/shared-state"
            let args = ["--include", "\(lab.root)/*", "--hooks-dir", hooks]
            let agent = try AgentProcess(in: lab.root, arguments: args, stateDir: state)
            _ = try TestClient(path: agent.socketPath).result(["op": "freeze", "mode": "detached"])
            #expect(try isFrozen(a))
            agent.signal(SIGKILL)
            _ = agent.waitForExit()
            let again = try AgentProcess(in: lab.root, name: "agent2", arguments: args, stateDir: state)
            #expect(try !isFrozen(a))
            #expect(lines(log) == ["10-db freeze", "recovery=", "10-db thaw", "recovery=1"])
            again.stop()
        }
    }

    /// Before: recovery told the hooks QUIESCE_MOUNTS="" and QUIESCE_FREEZE_TIMEOUT_MS=0 (trial H, F6).
    @Test("the hooks crash recovery ends are told the mountpoints and timeout of their freeze")
    func recoveryTellsHooksTheirFreeze() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            _ = try lab.filesystem("b")
            let log = "\(lab.root)/phases"
            let hooks = try makeHooks(in: lab.root, ["10-db": "echo \"$1 recovery=$QUIESCE_RECOVERY mounts=$QUIESCE_MOUNTS timeout=$QUIESCE_FREEZE_TIMEOUT_MS\" >> '\(log)'"])
            let state = "\(lab.root)/shared-state"
            let args = ["--include", "\(lab.root)/*", "--hooks-dir", hooks]
            let agent = try AgentProcess(in: lab.root, arguments: args, stateDir: state)
            _ = try TestClient(path: agent.socketPath).result(["op": "freeze", "mode": "detached", "mounts": [.string(a)], "timeout_ms": 30000])
            agent.signal(SIGKILL)
            _ = agent.waitForExit()
            let again = try AgentProcess(in: lab.root, name: "agent2", arguments: args, stateDir: state)
            defer { again.stop() }
            #expect(try !isFrozen(a))
            #expect(lines(log) == ["freeze recovery= mounts=\(a) timeout=30000", "thaw recovery=1 mounts=\(a) timeout=30000"], "\(lines(log))")
        }
    }

    @Test("quiesced --recover without the agent's --hooks-dir still ends the owed hooks: the record names their directory")
    func recoverByHandEndsHooksFromTheRecord() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let log = "\(lab.root)/phases"
            let hooks = try makeHooks(in: lab.root, ["10-db": journaling("10-db", log, then: "echo \"recovery=$QUIESCE_RECOVERY\" >> '\(log)'")])
            let state = "\(lab.root)/shared-state"
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--hooks-dir", hooks], stateDir: state)
            _ = try TestClient(path: agent.socketPath).result(["op": "freeze", "mode": "detached"])
            #expect(try isFrozen(a))
            agent.signal(SIGKILL)
            _ = agent.waitForExit()
            // What the unit's ExecStopPost, or an administrator, runs: no hooks-dir given.
            let out = try sh("'\(buildProductsDir)/quiesced' --config /dev/null --recover --state-dir '\(state)' 2>&1; echo \"exit=$?\"")
            #expect(out.contains("exit=0"), "\(out)")
            #expect(try !isFrozen(a))
            #expect(lines(log) == ["10-db freeze", "recovery=", "10-db thaw", "recovery=1"], "\(out)")
            #expect(!out.contains("no hooks-dir"), "\(out)")

            // A hook made unsafe meanwhile is not run, and recovery says why.
            let again = try AgentProcess(in: lab.root, name: "agent2", arguments: ["--include", "\(lab.root)/*", "--hooks-dir", hooks], stateDir: state)
            _ = try TestClient(path: again.socketPath).result(["op": "freeze", "mode": "detached"])
            again.signal(SIGKILL)
            _ = again.waitForExit()
            _ = try sh("chmod 777 '\(hooks)/10-db'")
            let refused = try sh("'\(buildProductsDir)/quiesced' --config /dev/null --recover --state-dir '\(state)' 2>&1")
            #expect(try !isFrozen(a))
            #expect(refused.contains("10-db thaw failed (refused: writable by group or others"), "\(refused)")
            #expect(lines(log).count == 6, "the unsafe hook did not run: \(lines(log))")
        }
    }
}
