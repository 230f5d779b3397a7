// quiesced as a daemon: deadlines, disconnects, crashes, signals, hostile peers, systemd. Real processes.
import Foundation
import QuiesceLinux
import QuiesceProtocol
import QuiesceTestSupport
import Testing

@Suite("quiesced never leaves a guest frozen", .enabled(if: canUseLoopDevices, "needs root and loop devices"))
struct NeverLeftFrozenTests {
    @Test("a freeze with a 2 s timeout is writable again within 3 s without any thaw request")
    func deadlineThawsByItself() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
            let watcher = try TestClient(path: agent.socketPath)
            _ = try watcher.result(["op": "hello", "version": 1])
            let client = try TestClient(path: agent.socketPath)
            let start = Date()
            let r = try client.result(["op": "freeze", "mode": "detached", "timeout_ms": 2000])
            #expect(r["timeout_ms"] == 2000)
            #expect(try isFrozen(a))
            let event = try watcher.waitForEvent("thawed", timeoutMs: 3000)
            #expect(event.fields["reason"] == "deadline")
            #expect(try writeCompletes(a, withinMs: 3000 - Int(Date().timeIntervalSince(start) * 1000)))
            let status = try client.result(["op": "status"])
            #expect(status["state"] == "thawed")
            #expect(status["last_auto_thaw"]?["reason"] == "deadline")

            // The requester's late thaw, naming its operation, is told the freeze ended early:
            // its snapshot was not quiesced throughout. A thaw naming no operation stays idempotent.
            let late = try client.call(["op": "thaw", "op_id": r["op_id"]!])
            guard case .failure(let e) = late.outcome else { Issue.record("late thaw succeeded: \(late)"); return }
            #expect(e.code == .notFrozen)
            #expect(e.message.contains("was thawed by the agent before this thaw") && e.message.contains("because its deadline passed"), "\(e.message)")
            #expect(e.details?["op_id"] == r["op_id"] && e.details?["thawed_reason"] == "deadline")
            if case .int(let at)? = e.details?["thawed_at_ms"], case .int(let evAt)? = event.fields["at_ms"] {
                #expect(abs(at - evAt) < 1000, "the time the thawed event gave")
            } else {
                Issue.record("no thawed_at_ms: \(String(describing: e.details))")
            }
            let plain = try client.result(["op": "thaw"])
            #expect(plain["was_frozen"] == false)
            // A repeated thaw of an operation the requester thawed itself stays a success.
            let again = try client.result(["op": "freeze", "mode": "detached", "timeout_ms": 60_000])
            _ = try client.result(["op": "thaw", "op_id": again["op_id"]!])
            #expect(try client.result(["op": "thaw", "op_id": again["op_id"]!])["was_frozen"] == false)
            agent.stop()
        }
    }

    @Test("max-freeze caps the requested timeout, and keepalive pushes the deadline")
    func maxFreezeAndKeepalive() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--max-freeze", "1500ms"])
            let client = try TestClient(path: agent.socketPath)
            let r = try client.result(["op": "freeze", "mode": "detached", "timeout_ms": 3_600_000])
            #expect(r["timeout_ms"] == 1500, "the requested hour is capped by --max-freeze")
            for _ in 0..<3 {
                usleep(800_000)
                _ = try client.result(["op": "keepalive", "op_id": r["op_id"]!])
            }
            #expect(try isFrozen(a), "2.4 s after a 1.5 s freeze, keepalives kept it frozen")
            usleep(2_000_000)
            #expect(try !isFrozen(a), "without keepalives the deadline thaws it")
            let k = try client.call(["op": "keepalive"])
            #expect(k.outcome.failureCode == .notFrozen)
            agent.stop()
        }
    }

    @Test("a bound freeze thaws when its connection closes; a detached one does not")
    func boundFreezeThawsOnDisconnect() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
            var client: TestClient? = try TestClient(path: agent.socketPath)
            _ = try client!.result(["op": "freeze", "mode": "bound", "timeout_ms": 60_000])
            #expect(try isFrozen(a))
            client = nil  // closes the socket
            try waitUntil(timeoutMs: 2000) { try !isFrozen(a) }
            let other = try TestClient(path: agent.socketPath)
            #expect(try other.result(["op": "status"])["last_auto_thaw"]?["reason"] == "disconnect")

            var detached: TestClient? = try TestClient(path: agent.socketPath)
            _ = try detached!.result(["op": "freeze", "mode": "detached", "timeout_ms": 60_000])
            detached = nil
            usleep(300_000)
            #expect(try isFrozen(a), "a detached freeze outlives its connection")
            #expect(try other.result(["op": "thaw"])["was_frozen"] == true)
            agent.stop()
        }
    }

    @Test("kill -9 while frozen, then a restart, leaves everything thawed")
    func crashWhileFrozenIsRecoveredOnRestart() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let b = try lab.filesystem("b")
            let args = ["--include", "\(lab.root)/*"]
            let agent = try AgentProcess(in: lab.root, arguments: args)
            let client = try TestClient(path: agent.socketPath)
            _ = try client.result(["op": "freeze", "mode": "detached", "timeout_ms": 600_000, "op_id": "k9"])
            agent.signal(SIGKILL)
            _ = agent.waitForExit()
            #expect(try isFrozen(a) && isFrozen(b), "a crash leaves the freeze in place: only FITHAW undoes it")
            #expect(FileManager.default.fileExists(atPath: agent.stateDir + "/freeze-\(agent.pid).json"))
            let again = try AgentProcess(in: lab.root, arguments: args, stateDir: agent.stateDir)
            #expect(try !isFrozen(a) && !isFrozen(b))
            #expect(again.log.contains("found a freeze record"))
            #expect(!FileManager.default.fileExists(atPath: agent.stateDir + "/freeze-\(agent.pid).json"))
            // The host learns what happened, as PROTOCOL.md section 7 promises.
            let after = try TestClient(path: again.socketPath)
            let status = try after.result(["op": "status"])
            #expect(status["last_auto_thaw"]?["reason"] == "restart" && status["last_auto_thaw"]?["op_id"] == "k9", "\(status)")
            #expect(Set(status["last_auto_thaw"]?["filesystems"]?.arrayValue?.compactMap(\.stringValue) ?? []) == [a, b])
            let late = try after.call(["op": "thaw", "op_id": "k9"])
            guard case .failure(let err) = late.outcome else { Issue.record("a late thaw of k9 succeeded"); return }
            #expect(err.code == .notFrozen && err.details?["thawed_reason"] == "restart", "\(err)")
            again.stop()
        }
    }

    /// A write to a frozen filesystem waits for the thaw: a freeze of the filesystem holding
    /// the state dir could not keep its crash-safety record (trial K: a hang with the guest
    /// frozen past its deadline, and a record naming another party's freeze).
    @Test("a freeze that would freeze the state dir's filesystem is refused, saying why and what to change; nothing is frozen, and --check-config warns")
    func stateDirInsideTheFreezeIsRefused() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let b = try lab.filesystem("b")
            let state = "\(a)/state"
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"], stateDir: state)
            defer { agent.stop() }
            let client = try TestClient(path: agent.socketPath)
            let refused = try client.call(["op": "freeze", "mode": "detached"])
            guard case .failure(let err) = refused.outcome else { Issue.record("a freeze of the state dir's filesystem was taken"); return }
            #expect(err.code == .freezeFailed && err.message.contains("state-dir \(state) is on \(a)") && err.message.contains("tmpfs"), "\(err)")
            #expect(try !isFrozen(a) && !isFrozen(b))
            #expect(try client.result(["op": "status"])["state"] == "thawed")
            // A freeze that leaves it out is taken as ever.
            _ = try client.result(["op": "freeze", "mode": "detached", "mounts": [.string(b)]])
            #expect(try isFrozen(b) && !isFrozen(a))
            _ = try client.result(["op": "thaw"])
            let check = try sh("'\(buildProductsDir)/quiesced' --config /dev/null --check-config --state-dir '\(state)' --include '\(lab.root)/*' 2>&1")
            #expect(check.contains("state-dir \(state) is on \(a)"), "\(check)")
        }
    }

    /// Trial J: in one wave, another party's freeze of b made our FIFREEZE of b fail with
    /// EBUSY while our FIFREEZE of c (a loop filesystem on a, which the other party also froze)
    /// was stuck flushing; the record kept naming b, so --recover after a kill -9 ended the
    /// other party's freeze of b.
    @Test("a FIFREEZE that fails with EBUSY beside one that is stuck leaves the record at once: a kill -9 then, and --recover, keep the other party's freeze")
    func ebusyBesideAStuckFreezeIsNotRecovered() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let b = try lab.filesystem("b")
            let c = try lab.filesystem("c", sizeMB: 48, imageDir: a)  // its image lives on a
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--presync", "no"])
            try lab.dirty(c, mb: 8)  // c's FIFREEZE must write into a
            // The other party, on our own lab mounts. Thawed again on every path: a first, so that
            // c's stuck FIFREEZE can return.
            _ = try sh("fsfreeze -f '\(b)' && fsfreeze -f '\(a)'")
            defer { _ = try? sh("fsfreeze -u '\(a)' 2>/dev/null; sleep 0.5; fsfreeze -u '\(c)' 2>/dev/null; fsfreeze -u '\(b)' 2>/dev/null", allowFailure: true) }
            let client = try TestClient(path: agent.socketPath)
            try client.sendRaw(Array("{\"id\":1,\"op\":\"freeze\",\"mode\":\"detached\",\"timeout_ms\":60000}\n".utf8))
            let path = "\(agent.stateDir)/freeze-\(agent.pid).json"
            func named() -> [String] {
                let record = (try? String(contentsOfFile: path, encoding: .utf8)).flatMap { try? JSON.parse($0) }
                return record?["filesystems"]?.arrayValue?.compactMap { $0["mountpoint"]?.stringValue } ?? []
            }
            #expect(eventually(withinMs: 10_000) { named() == [c] },
                    "the record names c, whose FIFREEZE is stuck, and not b, whose FIFREEZE failed: \(named())")
            agent.signal(SIGKILL)
            _ = try sh("fsfreeze -u '\(a)'")  // the other party ends its freeze of a only
            _ = agent.waitForExit()
            let out = try sh("timeout 20 '\(buildProductsDir)/quiesced' --config /dev/null --recover --state-dir '\(agent.stateDir)' 2>&1; echo \"exit=$?\"")
            #expect(out.contains("exit=0") && !out.contains("\(b): thawed"), "\(out)")
            #expect(try isFrozen(b), "the other party's freeze of b holds after recovery: \(out)")
            #expect(try !isFrozen(c), "\(out)")
        }
    }

    @Test("quiesced --recover thaws what a killed agent left frozen (systemd ExecStopPost)")
    func recoverCommandThaws() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
            _ = try TestClient(path: agent.socketPath).result(["op": "freeze", "mode": "detached"])
            agent.signal(SIGKILL)
            _ = agent.waitForExit()
            #expect(try isFrozen(a))
            try sh("'\(buildProductsDir)/quiesced' --config /dev/null --recover --state-dir '\(agent.stateDir)' 2>/dev/null")
            #expect(try !isFrozen(a))
            // A second run finds nothing, and says where it looked (before: not a word).
            let again = try sh("'\(buildProductsDir)/quiesced' --config /dev/null --recover --state-dir '\(agent.stateDir)' 2>&1")
            // (It also looks in /run/quiesce, where another test's killed agent may have left one.)
            #expect(again.contains("nothing to recover: no freeze record in \(agent.stateDir)") || again.contains("found a freeze record"), "\(again)")
        }
    }

    @Test("agents sharing a state dir keep their own records: a second agent or --recover never thaws a live agent's freeze")
    func secondAgentCannotInterfere() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let b = try lab.filesystem("b")
            let first = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/a"])
            _ = try TestClient(path: first.socketPath).result(["op": "freeze", "mode": "detached", "timeout_ms": 60_000])
            // Same state dir, own socket: it starts, leaves the live agent's record alone, and
            // its own freeze (of b) has its own record.
            let second = try AgentProcess(in: lab.root, name: "second", arguments: ["--include", "\(lab.root)/b"], stateDir: first.stateDir)
            #expect(second.log.contains("also used by the running quiesced pid \(first.pid)"), "\(second.log)")
            #expect(try isFrozen(a), "the first agent's freeze still holds")
            _ = try TestClient(path: second.socketPath).result(["op": "freeze", "mode": "detached", "timeout_ms": 60_000])
            #expect(FileManager.default.fileExists(atPath: "\(first.stateDir)/freeze-\(first.pid).json"))
            #expect(FileManager.default.fileExists(atPath: "\(first.stateDir)/freeze-\(second.pid).json"))
            let q = "'\(buildProductsDir)/quiesced' --config /dev/null"
            let recover = try sh("\(q) --recover --state-dir '\(first.stateDir)' 2>&1; echo \"exit=$?\"")
            #expect(recover.contains("nothing to recover") && recover.hasSuffix("exit=0\n"), "\(recover)")
            #expect(try isFrozen(a) && isFrozen(b), "--recover leaves running agents' freezes alone")
            // A killed agent's record is recovered, the live one's is not.
            second.signal(SIGKILL)
            _ = second.waitForExit()
            _ = try sh("\(q) --recover --state-dir '\(first.stateDir)' 2>&1")
            #expect(try !isFrozen(b) && isFrozen(a))
            // Own state dir, same socket path: refused, and the live agent keeps its socket.
            let path = try sh("\(q) --listen unix:\(first.socketPath) --state-dir '\(lab.root)/other-state' 2>&1; echo \"exit=$?\"")
            #expect(path.contains("another process is listening on it") && path.hasSuffix("exit=1\n"), "\(path)")
            _ = try TestClient(path: first.socketPath).result(["op": "thaw"])
            #expect(try !isFrozen(a))
            first.stop()
        }
    }

    @Test("signals in quick succession while frozen (HUP then TERM, INT twice, QUIT, USR1 and USR2 before TERM) never kill the agent before it thaws",
          arguments: [[SIGHUP, SIGTERM], [SIGINT, SIGINT], [SIGUSR1, SIGUSR2, SIGTERM], [SIGQUIT], [SIGXCPU],
                      // Fault signals sent with kill(1) cannot be blocked: they become a SIGTERM.
                      [SIGSEGV], [SIGABRT], [SIGTRAP], [SIGBUS]])
    func signalBurstsWhileFrozenThawFirst(signals: [Int32]) async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let b = try lab.filesystem("b", type: "xfs")
            // Repeated: a signal used to kill the agent only when it reached a thread that had
            // not blocked it (the executor's, the sleep timer's, a plan's), which is a matter of luck.
            for round in 0..<3 {
                let agent = try AgentProcess(in: lab.root, name: "agent\(round)", arguments: ["--include", "\(lab.root)/*"])
                _ = try TestClient(path: agent.socketPath).result(["op": "freeze", "mode": "detached"])
                for sig in signals { agent.signal(sig) }
                let status = agent.waitForExit(timeoutMs: 10_000)
                #expect(status == 0, "round \(round): \(signals.map(Signals.name)) ended the agent with \(String(describing: status))")
                #expect(try !isFrozen(a) && !isFrozen(b), "round \(round): thawed before exiting")
                // The log names the signal that stopped it (a fault signal by its own name, not
                // the SIGTERM it was turned into) and who sent it: this test process.
                let stopper = signals.first { ![SIGHUP, SIGUSR1, SIGUSR2].contains($0) }!
                #expect(agent.log.contains("stopping on \(Signals.name(stopper)) from pid \(getpid())"), "\(agent.log)")
            }
            // USR1 and USR2 alone mean nothing: the agent goes on holding its freeze.
            let agent = try AgentProcess(in: lab.root, name: "agent-usr", arguments: ["--include", "\(lab.root)/*"])
            let c = try TestClient(path: agent.socketPath)
            _ = try c.result(["op": "freeze", "mode": "detached"])
            agent.signal(SIGUSR1)
            agent.signal(SIGUSR2)
            usleep(1_200_000)
            #expect(try c.result(["op": "status"])["state"] == "frozen")
            agent.signal(SIGTERM)
            #expect(agent.waitForExit(timeoutMs: 10_000) == 0)
            #expect(try !isFrozen(a) && !isFrozen(b))
            // Logged once thawed: lines are held back while the guest is frozen.
            #expect(agent.log.contains("SIGUSR1 from pid \(getpid())") && agent.log.contains("SIGUSR2 from pid \(getpid())") && agent.log.contains(") ignored: it has no meaning"), "\(agent.log)")
            // Held back while frozen, they say when they happened.
            #expect(agent.log.split(separator: "\n").contains { $0.contains("SIGUSR1 from pid") && $0.contains(" while frozen; logged at 20") }, "\(agent.log)")
        }
    }

    @Test("quiesced --recover thaws what a killed agent left frozen although the config file was broken meanwhile, and finds a record in the default state dir after the config moved it")
    func recoverDespiteConfigChanges() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let conf = "\(lab.root)/quiesced.conf"
            let state = "\(lab.root)/state-x"
            /// An agent that takes a detached freeze and is killed under it, leaving its record.
            func killedUnderFreeze(_ name: String, stateDir: String, environment: [String: String]? = nil) throws {
                let agent = try AgentProcess(in: lab.root, name: name, arguments: ["--include", "\(lab.root)/*"],
                                             environment: environment, stateDir: stateDir)
                _ = try TestClient(path: agent.socketPath).result(["op": "freeze", "mode": "detached"])
                agent.signal(SIGKILL)
                _ = agent.waitForExit()
            }
            /// What the units' ExecStopPost runs, with `config` as the file by then.
            func recover(withConfig config: String) throws -> String {
                try config.write(toFile: conf, atomically: true, encoding: .utf8)
                return try sh("'\(buildProductsDir)/quiesced' --config '\(conf)' --recover 2>&1; echo \"exit=$?\"")
            }

            try killedUnderFreeze("agent", stateDir: state)
            #expect(try isFrozen(a))
            // Edited while the agent ran: a line the agent would refuse at start.
            let broken = "state-dir = \(state)\nmax-freeze = 10 minutes\ninclude = \(lab.root)/*\n"
            // Before: --recover (the units' ExecStopPost) refused the file too and thawed nothing.
            let out = try recover(withConfig: broken)
            #expect(try sh("'\(buildProductsDir)/quiesced' --config '\(conf)' --check-config 2>&1; echo \"exit=$?\"").hasSuffix("exit=2\n"))
            #expect(out.hasSuffix("exit=0\n") && out.contains("recovering anyway with state-dir \(state)") && out.contains("max-freeze"), "\(out)")
            #expect(try !isFrozen(a))

            // The agent wrote its record in the default state dir (the units', AgentConfig's
            // defaultStateDir); the config names another one by the time it is recovered.
            try killedUnderFreeze("agent-default", stateDir: "/run/quiesce")
            let moved = try recover(withConfig: "state-dir = \(lab.root)/moved\n")
            // (Another test's --recover, which also looks in /run/quiesce, may have been first.)
            #expect(moved.hasSuffix("exit=0\n"), "\(moved)")
            #expect(try !isFrozen(a))

            // Under systemd an agent whose state dir is neither leaves a pointer to it there:
            // the config moved from one custom dir to another is recovered from too.
            try killedUnderFreeze("agent-far", stateDir: "\(lab.root)/state-far",
                                  environment: ["INVOCATION_ID": "0123456789abcdef0123456789abcdef", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"])
            let pointed = try recover(withConfig: "state-dir = \(lab.root)/elsewhere-again\n")
            #expect(pointed.hasSuffix("exit=0\n"), "\(pointed)")
            #expect(try !isFrozen(a), "recovered through the pointer: \(pointed)")
        }
    }

    @Test("SIGTERM or SIGINT while frozen thaws, then exits cleanly", arguments: [SIGTERM, SIGINT])
    func stopSignalWhileFrozenThawsFirst(signal: Int32) async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
            let client = try TestClient(path: agent.socketPath)
            _ = try client.result(["op": "hello", "version": 1])
            _ = try client.result(["op": "freeze", "mode": "detached"])
            agent.signal(signal)
            #expect(agent.waitForExit(timeoutMs: 10_000) == 0)
            #expect(try !isFrozen(a))
            #expect(!FileManager.default.fileExists(atPath: agent.socketPath), "the socket file is removed")
            let event = try? client.waitForEvent("thawed", timeoutMs: 1000)
            #expect(event?.fields["reason"] == "signal")
        }
    }

    @Test("SIGTERM in the middle of a freeze lets it finish, thaws it, and exits: nothing stays frozen")
    func stopSignalDuringFreeze() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let hooks = try makeHooks(in: lab.root, ["10-slow": "[ \"$1\" = freeze ] && sleep 1.5; exit 0"])
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--hooks-dir", hooks])
            let path = agent.socketPath
            let freezer = BackgroundCall { try TestClient(path: path).call(["op": "freeze", "mode": "detached"]) }
            let probe = try TestClient(path: path)
            try waitUntil(timeoutMs: 1500) { try probe.result(["op": "status"])["state"] == "freezing" }
            agent.signal(SIGTERM)
            #expect(agent.waitForExit(timeoutMs: 15_000) == 0)
            #expect(try !isFrozen(a))
            _ = try? freezer.wait(timeoutMs: 1000)
            #expect(agent.log.contains("reason=signal") || !agent.log.contains("frozen filesystems"), "\(agent.log)")
        }
    }

    @Test("ping and status are answered at once while a slow freeze hook runs")
    func pingAndStatusDuringSlowFreeze() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let hooks = try makeHooks(in: lab.root, ["10-slow": "sleep 2"])
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--hooks-dir", hooks])
            let path = agent.socketPath
            // A real thread, not a Task: tests block the (2-thread) cooperative pool with socket calls.
            let freezer = BackgroundCall { try TestClient(path: path).result(["op": "freeze", "mode": "detached"]) }
            let probe = try TestClient(path: agent.socketPath)
            try waitUntil(timeoutMs: 1800) { try probe.result(["op": "status"])["state"] == "freezing" }
            // The hook sleeps 2 s: ping and status must not wait for it.
            let t0 = Date()
            _ = try probe.result(["op": "ping"], timeoutMs: 500)
            let status = try probe.result(["op": "status"], timeoutMs: 500)
            #expect(Date().timeIntervalSince(t0) < 0.5, "answered without waiting for the freeze")
            #expect(status["state"] == "freezing")
            #expect(status["op_id"] != nil)
            let frozen = try freezer.wait(timeoutMs: 10_000)
            #expect(frozen["hooks"]?.arrayValue?.count == 1)
            #expect(try isFrozen(a))
            _ = try probe.result(["op": "thaw"])
            agent.stop()
        }
    }

    @Test("a failing freeze hook fails the freeze, freezes nothing, and ends the hooks that ran with freeze-failed")
    func failingHookFreezesNothing() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let marker = "\(lab.root)/thawed-by-10"
            let hooks = try makeHooks(in: lab.root, [
                "10-ok": "[ \"$1\" = freeze-failed ] && touch '\(marker)'; exit 0",
                "20-fails": "[ \"$1\" = freeze ] && exit 3; exit 0",
            ])
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--hooks-dir", hooks])
            let reply = try TestClient(path: agent.socketPath).call(["op": "freeze"])
            #expect(reply.outcome.failureCode == .hookFailed)
            #expect(try !isFrozen(a))
            #expect(FileManager.default.fileExists(atPath: marker), "10-ok got its freeze-failed")
            agent.stop()
        }
    }

    @Test("a hook that outlives --hook-timeout is stopped and fails the freeze")
    func hookTimeout() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let hooks = try makeHooks(in: lab.root, ["10-hangs": "sleep 30"])
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--hooks-dir", hooks, "--hook-timeout", "500ms"])
            let t0 = Date()
            let reply = try TestClient(path: agent.socketPath).call(["op": "freeze"])
            #expect(reply.outcome.failureCode == .hookFailed)
            #expect(Date().timeIntervalSince(t0) < 5)
            #expect(try !isFrozen(a))
            agent.stop()
        }
    }
}

@Suite("quiesced keeps serving whatever a peer sends", .enabled(if: canUseLoopDevices, "needs root and loop devices"))
struct HostilePeerTests {
    @Test("a 1 MiB line without a newline gets frame-too-large and only that connection closes")
    func oversizedLine() async throws {
        try await LoopLab.with { lab in
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
            let bystander = try TestClient(path: agent.socketPath)
            let bad = try TestClient(path: agent.socketPath)
            try? bad.sendRaw([UInt8](repeating: UInt8(ascii: "a"), count: 1 << 20))
            guard case .reply(let r) = try bad.readMessage(timeoutMs: 5000) else { Issue.record("no reply"); return }
            #expect(r.outcome.failureCode == .frameTooLarge)
            if case .failure(let e) = r.outcome { #expect(e.details?["max_frame"] == 65536, "PROTOCOL.md section 8.1") }
            #expect(bad.isClosedByPeer(timeoutMs: 2000))
            _ = try bystander.result(["op": "ping"])
            _ = try TestClient(path: agent.socketPath).result(["op": "ping"])
            #expect(agent.log.contains("frame larger than 65536 bytes: connection closed"), "the agent's log says so: \(agent.log)")
            agent.stop()
        }
    }

    @Test("garbage, malformed JSON, deep nesting and unknown ops get errors and the connection survives")
    func garbageKeepsTheConnection() async throws {
        try await LoopLab.with { lab in
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
            let c = try TestClient(path: agent.socketPath)
            let frames: [([UInt8], ErrorCode)] = [
                ([0x00, 0x01, 0xFE, 0x80, 0x0A], .badRequest),
                (Array("{\"op\":\n".utf8), .badRequest),
                (Array((String(repeating: "[", count: 100) + String(repeating: "]", count: 100) + "\n").utf8), .badRequest),
                (Array("{\"id\":7,\"op\":\"format-disk\"}\n".utf8), .unknownOp),
                (Array("{\"id\":8,\"op\":\"freeze\",\"timeout_ms\":\"soon\"}\n".utf8), .badRequest),
                (Array("[1,2,3]\n".utf8), .badRequest),
            ]
            for (bytes, code) in frames {
                try c.sendRaw(bytes)
                guard case .reply(let r) = try c.readMessage(timeoutMs: 3000) else { Issue.record("no reply"); continue }
                #expect(r.outcome.failureCode == code, "for \(bytes.prefix(20))")
            }
            _ = try c.result(["op": "ping"])
            #expect(try c.result(["op": "status"])["state"] == "thawed")
            agent.stop()
        }
    }

    @Test("memory stays flat under a flood of garbage and oversized lines")
    func memoryStaysFlat() async throws {
        try await LoopLab.with { lab in
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
            func rssKB() throws -> Int {
                Int(try sh("awk '/VmRSS/ {print $2}' /proc/\(agent.pid)/status").trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
            }
            // Warm up the paths once, then measure.
            for _ in 0..<2 {
                let c = try TestClient(path: agent.socketPath)
                try? c.sendRaw([UInt8](repeating: 0x41, count: 200_000))
            }
            usleep(200_000)
            let before = try rssKB()
            for i in 0..<40 {
                let c = try TestClient(path: agent.socketPath)
                if i % 2 == 0 {
                    try? c.sendRaw([UInt8](repeating: 0x42, count: 2 << 20))
                } else {
                    var junk: [UInt8] = []
                    for _ in 0..<2000 { junk += Array("{\"op\":\"nope\",\"x\":[1,2,{\"y\":\"z\"}]}\n".utf8) }
                    try? c.sendRaw(junk)
                }
                _ = c.isClosedByPeer(timeoutMs: 50)
            }
            usleep(300_000)
            let after = try rssKB()
            #expect(after - before < 4096, "RSS grew from \(before) kB to \(after) kB")
            _ = try TestClient(path: agent.socketPath).result(["op": "ping"])
            agent.stop()
        }
    }

    @Test("a peer that never reads its replies is cut off and cannot stall anyone else")
    func nonReadingPeerCannotStallOthers() async throws {
        try await LoopLab.with { lab in
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
            let path = agent.socketPath
            // The hog pipelines status requests (each answered, if only with rate-limited) and
            // reads nothing, until its socket buffer and the agent's 1 MiB backlog are full.
            let hog = BackgroundCall { () -> Bool in
                let c = try TestClient(path: path)
                var frames: [UInt8] = []
                for i in 0..<200 { frames += Array("{\"id\":\(i),\"op\":\"status\",\"pad\":\"\(String(repeating: "x", count: 200))\"}\n".utf8) }
                for _ in 0..<2000 {
                    do { try c.sendRaw(frames) } catch { return true }  // cut off: EPIPE / ECONNRESET
                }
                return false
            }
            let bystander = try TestClient(path: path)
            for _ in 0..<20 {
                let t0 = Date()
                _ = try bystander.result(["op": "status"], timeoutMs: 2000)
                #expect(Date().timeIntervalSince(t0) < 1.0, "answered promptly while the hog floods")
                usleep(50_000)
            }
            #expect(try hog.wait(timeoutMs: 60_000), "the hog was cut off")
            _ = try TestClient(path: path).result(["op": "ping"])
            agent.stop()
        }
    }

    @Test("pipelined requests get one reply each, answered or busy: a peer cannot start unbounded work")
    func pipelinedRequestsAreBounded() async throws {
        try await LoopLab.with { lab in
            _ = try lab.filesystem("a")
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
            let c = try TestClient(path: agent.socketPath)
            var burst: [UInt8] = []
            for i in 0..<100 { burst += Array("{\"id\":\(5000 + i),\"op\":\"filesystems\"}\n".utf8) }
            try c.sendRaw(burst)
            var ids = Set<JSON>()
            while ids.count < 100 {
                guard case .reply(let r) = try c.readMessage(timeoutMs: 5000), let id = r.id else { continue }
                #expect(!ids.contains(id), "one reply per request")
                ids.insert(id)
                if case .failure(let e) = r.outcome { #expect(e.code == .busy, "\(e)") }
            }
            let threads = try sh("ls /proc/\(agent.pid)/task | wc -l").trimmingCharacters(in: .whitespacesAndNewlines)
            #expect((Int(threads) ?? 999) < 100, "threads after the burst: \(threads)")
            // 101 requests exceed the rate burst (100) when the burst is answered within 20 ms:
            // let one token refill (50/s) so that the ping tests serving, not the rate limit.
            usleep(40_000)
            _ = try c.result(["op": "ping"])
            agent.stop()
        }
    }

    @Test("a peer over the rate limit is told so and keeps its connection")
    func rateLimit() async throws {
        try await LoopLab.with { lab in
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
            let c = try TestClient(path: agent.socketPath)
            var flood: [UInt8] = []
            for i in 0..<300 { flood += Array("{\"id\":\(1000 + i),\"op\":\"\(i % 2 == 0 ? "ping" : "status")\"}\n".utf8) }
            try c.sendRaw(flood)
            var limited = 0, answered = 0
            var ids: Set<JSON> = []
            while limited + answered < 300 {
                guard case .reply(let r) = try c.readMessage(timeoutMs: 3000) else { continue }
                if r.outcome.failureCode == .rateLimited { limited += 1 } else { answered += 1 }
                ids.insert(r.id ?? .null)
            }
            #expect(answered >= 100 && limited > 0, "answered \(answered), limited \(limited)")
            // Every request was answered under its own id, refused ones too (PROTOCOL.md section 3.2).
            #expect(ids == Set((0..<300).map { JSON.int(Int64(1000 + $0)) }), "ids: \(ids.count) distinct, null: \(ids.contains(.null))")
            usleep(1_000_000)
            _ = try c.result(["op": "ping"])
            let logged = agent.log.components(separatedBy: "peer rate-limited").count - 1
            #expect(logged == 1, "logged once for \(limited) refusals: \(logged)")
            agent.stop()
        }
    }

    /// Before: a thaw behind a flood was refused rate-limited like the flood, and the guest
    /// stayed frozen until the deadline (trial F).
    @Test("a thaw is never rate-limited: sent behind 300 pings, in either dialect, it thaws")
    func thawIsNeverRateLimited() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let qga = "\(lab.root)/qga.sock"
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--listen", "qga+unix:\(qga)"])
            defer { agent.stop() }
            let c = try TestClient(path: agent.socketPath)
            _ = try c.result(["op": "freeze", "mode": "detached", "timeout_ms": 120_000])
            var flood: [UInt8] = []
            for i in 0..<300 { flood += Array("{\"id\":\(i),\"op\":\"ping\"}\n".utf8) }
            try c.sendRaw(flood + Array(#"{"id":"the-thaw","op":"thaw"}"#.utf8) + [0x0A])
            var thawReply: Reply?
            while thawReply == nil {
                guard case .reply(let r) = try c.readMessage(timeoutMs: 5000) else { continue }
                if r.id == "the-thaw" { thawReply = r }
            }
            if case .failure(let e) = thawReply!.outcome { Issue.record("the thaw was refused: \(e.code): \(e.message)") }
            #expect(try !isFrozen(a))
            // qemu-ga's dialect: freeze, 300 pings and the thaw in one write, no ids.
            try waitForSocket(qga)
            let q = try QGAClient(path: qga)
            var lines = [#"{"execute":"guest-fsfreeze-freeze"}"#] + Array(repeating: #"{"execute":"guest-ping"}"#, count: 300)
            lines.append(#"{"execute":"guest-fsfreeze-thaw"}"#)
            try FD.writeAll(q.fd, Array(lines.joined(separator: "\n").utf8) + [0x0A], timeoutMs: 5000)
            #expect(try q.reply() == ["return": 1])
            for _ in 0..<300 { _ = try q.reply() }
            #expect(try q.reply() == ["return": 1], "the thaw's answer: the one filesystem it thawed")
            #expect(try !isFrozen(a))
        }
    }

    @Test("connections beyond --max-connections are refused with busy; the others are served")
    func connectionCap() async throws {
        try await LoopLab.with { lab in
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--max-connections", "3"])
            // AgentProcess's own readiness probe has closed by now; hold three.
            usleep(100_000)
            let held = try (0..<3).map { _ in try TestClient(path: agent.socketPath) }
            for c in held { _ = try c.result(["op": "ping"]) }
            let extra = try TestClient(path: agent.socketPath)
            guard case .reply(let r) = try extra.readMessage(timeoutMs: 2000) else { Issue.record("no reply"); return }
            #expect(r.outcome.failureCode == .busy)
            #expect(extra.isClosedByPeer(timeoutMs: 1000))
            _ = try held[0].result(["op": "ping"])
            agent.stop()
        }
    }

    @Test("a non-root peer is refused: the socket is 0600, and SO_PEERCRED is checked")
    func nonRootPeerIsRefused() async throws {
        try await LoopLab.with { lab in
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
            let mode = try sh("stat -c %a '\(agent.socketPath)'").trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(mode == "600")
            try sh("chmod 755 '\(lab.root)'")
            let denied = try sh("echo '{\"id\":1,\"op\":\"ping\"}' | setpriv --reuid=65534 --regid=65534 --clear-groups socat -t 2 - UNIX-CONNECT:'\(agent.socketPath)' 2>&1",
                                allowFailure: true)
            #expect(denied.contains("Permission denied"), "the socket's mode keeps others out: \(denied)")
            try sh("chmod 666 '\(agent.socketPath)'")
            let refused = try sh("echo '{\"id\":1,\"op\":\"ping\"}' | setpriv --reuid=65534 --regid=65534 --clear-groups socat -t 2 - UNIX-CONNECT:'\(agent.socketPath)' 2>&1",
                                 allowFailure: true)
            #expect(refused.contains("permission-denied"), "the peer check refuses uid 65534: \(refused)")
            #expect(!refused.contains("\"ok\":true"))
            _ = try TestClient(path: agent.socketPath).result(["op": "ping"])
            agent.stop()
        }
    }
}

@Suite("One state machine", .enabled(if: canUseLoopDevices, "needs root and loop devices"))
struct StateMachineTests {
    @Test("a repeated freeze with the same op_id returns the first result; another op_id is refused")
    func idempotentFreeze() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
            let c = try TestClient(path: agent.socketPath)
            let first = try c.result(["op": "freeze", "op_id": "backup-42", "mode": "detached"])
            let again = try TestClient(path: agent.socketPath).result(["op": "freeze", "op_id": "backup-42", "mode": "detached"])
            #expect(again["replayed"] == true)
            #expect(again["deadline_ms"] == first["deadline_ms"] && again.mountPoints == first.mountPoints)
            // The same id with another request is not a retry: refused, not answered with the first result.
            let otherMounts = try c.call(["op": "freeze", "op_id": "backup-42", "mode": "detached", "mounts": [.string(a)]])
            #expect(otherMounts.outcome.failureCode == .badRequest)
            #expect(try c.call(["op": "freeze", "op_id": "backup-42"]).outcome.failureCode == .badRequest, "another mode")
            let other = try c.call(["op": "freeze", "op_id": "backup-43"])
            #expect(other.outcome.failureCode == .alreadyFrozen)
            #expect(try c.call(["op": "sync"]).outcome.failureCode == .busy, "no sync while frozen")
            #expect(try c.call(["op": "thaw", "op_id": "backup-43"]).outcome.failureCode == .notFrozen)
            let status = try c.result(["op": "status"])
            #expect(status["state"] == "frozen" && status["op_id"] == "backup-42")
            #expect(status["requested_by"]?.stringValue?.hasPrefix("unix uid=0") == true)
            #expect(status.mountPoints == [a])
            #expect(try c.result(["op": "thaw", "op_id": "backup-42"])["was_frozen"] == true)
            #expect(try c.result(["op": "thaw", "op_id": "backup-42"])["was_frozen"] == false, "thaw is idempotent")
            #expect(try c.call(["op": "freeze", "op_id": "backup-42"]).outcome.failureCode == .badRequest,
                    "an ended operation's id is not reused")
            agent.stop()
        }
    }

    @Test("hello negotiates the version; too old a version is refused")
    func helloVersions() async throws {
        try await LoopLab.with { lab in
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
            let c = try TestClient(path: agent.socketPath)
            let h = try c.result(["op": "hello", "version": 7, "client": "future"])
            #expect(h["version"] == 1 && h["agent"] == "quiesced")
            #expect(try c.call(["op": "hello", "version": 0]).outcome.failureCode == .unsupportedVersion)
            agent.stop()
        }
    }
}

@Suite("systemd and configuration")
struct SystemdAndConfigTests {
    @Test("Type=notify: READY=1 once listening, STATUS= follows the state, WATCHDOG=1 when asked, STOPPING=1 on SIGTERM",
          .enabled(if: canUseLoopDevices))
    func notifySocket() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let notifyPath = "\(lab.root)/notify.sock"
            let notify = try NotifyListener(path: notifyPath)
            var env = ProcessInfo.processInfo.environment
            env["NOTIFY_SOCKET"] = notifyPath
            env["WATCHDOG_USEC"] = "400000"
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"], environment: env)
            #expect(try notify.waitFor("READY=1", timeoutMs: 3000))
            #expect(try notify.waitFor("WATCHDOG=1", timeoutMs: 2000), "fed at half of WatchdogSec")
            _ = try TestClient(path: agent.socketPath).result(["op": "freeze", "mode": "detached", "timeout_ms": 60_000])
            #expect(try notify.waitFor("STATUS=frozen: 1 filesystems, auto-thaw in 59 s", timeoutMs: 3000))
            #expect(try notify.waitFor("STATUS=frozen: 1 filesystems, auto-thaw in 57 s", timeoutMs: 4000), "the countdown is live")
            _ = a
            agent.signal(SIGTERM)
            #expect(try notify.waitFor("STOPPING=1", timeoutMs: 3000))
            #expect(agent.waitForExit() == 0)
        }
    }

    @Test("under systemd, logs go to the journal with structured fields (op id, peer, durations)",
          .enabled(if: canUseLoopDevices && (journaldIsRunning || runningUnderCI),
                   "needs a running journald (.ci/run starts one, and under CI this test never skips)"))
    func journalFields() async throws {
        try await LoopLab.with { lab in
            _ = try lab.filesystem("a")
            var env = ProcessInfo.processInfo.environment
            env["JOURNAL_STREAM"] = "0:0"  // what systemd sets when stderr is the journal
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"], environment: env)
            let opID = "journal-\(UUID().uuidString.prefix(8))"
            let c = try TestClient(path: agent.socketPath)
            _ = try c.result(["op": "freeze", "mode": "detached", "op_id": .string(opID)])
            _ = try c.result(["op": "thaw"])
            agent.stop()
            var entries: [JSON] = []
            try waitUntil(timeoutMs: 5000) {
                entries = try sh("journalctl -o json --no-pager QUIESCE_OP_ID=\(opID)").split(separator: "\n").compactMap { try? JSON.parse(String($0)) }
                return entries.count >= 3
            }
            let messages = entries.compactMap { $0["MESSAGE"]?.stringValue }
            #expect(messages.contains("freeze requested") && messages.contains("frozen") && messages.contains("thawed"))
            let frozen = entries.first { $0["MESSAGE"] == "frozen" }
            #expect(frozen?["QUIESCE_STALL_US"] != nil && frozen?["SYSLOG_IDENTIFIER"] == "quiesced")
            #expect(entries.first { $0["MESSAGE"] == "freeze requested" }?["QUIESCE_PEER"]?.stringValue?.hasPrefix("unix uid=0") == true)
            #expect(entries.first { $0["MESSAGE"] == "thawed" }?["QUIESCE_REASON"] == "request")
        }
    }

    @Test("socket activation: a listening socket handed over by systemd is served")
    func socketActivation() async throws {
        try await LoopLab.with { lab in
            let sock = "\(lab.root)/activated.sock"
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/bin/systemd-socket-activate")
            p.arguments = ["-l", sock, "--fdname=quiesce", "\(buildProductsDir)/quiesced", "--config", "/dev/null",
                           "--state-dir", "\(lab.root)/state", "--include", "\(lab.root)/*"]
            p.standardError = FileHandle.nullDevice
            try p.run()
            defer { p.terminate(); p.waitUntilExit() }
            try waitUntil(timeoutMs: 5000) { FileManager.default.fileExists(atPath: sock) }
            let h = try TestClient(path: sock).result(["op": "hello", "version": 1])
            #expect(h["agent"] == "quiesced")
        }
    }

    @Test("a bad config file is refused at start with the file, line and reason")
    func badConfigFile() throws {
        let dir = NSTemporaryDirectory() + "quiesce-config-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let cases = [
            ("listen = unix:/run/q.sock\nmax-freeze = forever\n", "line 2", "not a duration"),
            ("# ok\nlisten = tcp:1234\n", "line 2", "unknown kind"),
            ("frobnicate = yes\n", "line 1", "unknown setting"),
            ("listen\n", "line 1", "expected \"key = value\""),
            ("presync = sometimes\n", "line 1", "presync: \"sometimes\" is not yes or no"),
            // A setting twice is a mistake, also in a file with CRLF line ends; lists add up.
            ("listen = vsock:1\r\nmax-freeze = 2m\r\nlisten = vsock:2\r\nmax-freeze = 3m\r\n", "line 4", "max-freeze is already set on line 2: keep one"),
            // A control character in a value is shown escaped: the error stays one line.
            ("listen = unix:/run/a\u{0}b\n", "line 1", "unix:/run/a\\x00b"),
            ("max-freeze = 2\u{1b}[2Jm\n", "line 1", "2\\x1b[2Jm"),
            // A backslash the file holds is doubled, so it cannot pass for an escape.
            ("max-freeze = 2\\x1b[2Jm\n", "line 1", "2\\\\x1b[2Jm"),
            ("include = /srv/a\u{0}b\n", "line 1", "include: \"/srv/a\\x00b\" contains a control character"),
            // Past the range: said so, not "not a non-negative integer" (trial H).
            ("max-connections = 99999999999\n", "line 1", "max-connections: 99999999999 is out of range (at most 4294967295)"),
        ]
        for (text, line, reason) in cases {
            let path = dir + "/quiesced.conf"
            try text.write(toFile: path, atomically: true, encoding: .utf8)
            let out = try sh("'\(buildProductsDir)/quiesced' --config '\(path)' --check-config 2>&1; echo \"exit=$?\"")
            #expect(out.contains("\(path):\(line.dropFirst(5))") && out.contains(reason) && out.contains("exit=2"), "\(out)")
            #expect(out.split(separator: "\n").count == 2 && !out.contains("\r"), "one line, then exit=: \(out)")
        }
        // A file others can write would let them choose what root freezes: refused, like a hook.
        let open = dir + "/open.conf"
        try "max-freeze = 2m\n".write(toFile: open, atomically: true, encoding: .utf8)
        _ = try sh("chmod 666 '\(open)'")
        let refused = try sh("'\(buildProductsDir)/quiesced' --config '\(open)' --check-config 2>&1; echo \"exit=$?\"")
        #expect(refused.contains("is writable by group or others (mode 666)") && refused.hasSuffix("exit=2\n"), "\(refused)")
        let crlf = dir + "/crlf.conf"
        try "listen = vsock:5123\r\nmax-freeze = 2m\r\n".write(toFile: crlf, atomically: true, encoding: .utf8)
        let crlfOK = try sh("'\(buildProductsDir)/quiesced' --config '\(crlf)' --check-config 2>&1")
        #expect(crlfOK.contains("vsock:5123") && crlfOK.contains("max-freeze 2m"), "CRLF line ends: \(crlfOK)")
        // A byte order mark (some Windows editors write one) is skipped, as systemd does;
        // before: unknown setting "\u{feff}max-freeze" (trial H).
        let bom = dir + "/bom.conf"
        try "\u{FEFF}max-freeze = 2m\n".write(toFile: bom, atomically: true, encoding: .utf8)
        let bomOK = try sh("'\(buildProductsDir)/quiesced' --config '\(bom)' --check-config 2>&1; echo \"exit=$?\"")
        #expect(bomOK.contains("max-freeze 2m") && bomOK.hasSuffix("exit=0\n"), "\(bomOK)")
        // A scope that selects nothing here (include and exclude cancelling out) is said, not
        // "configuration OK" alone (trial H); the exit stays 0 (the postinst relies on it).
        let nothing = try sh("'\(buildProductsDir)/quiesced' --config /dev/null --include '\(dir)/*' --exclude '\(dir)/*' --check-config 2>&1; echo \"exit=$?\"")
        #expect(nothing.contains("the scope selects no filesystem on this system now") && nothing.hasSuffix("exit=0\n"), "\(nothing)")
        let noHooks = try sh("'\(buildProductsDir)/quiesced' --config /dev/null --hooks-dir '\(dir)/no-such-hooks' --check-config 2>&1; echo \"exit=$?\"")
        #expect(noHooks.contains("hooks-dir \(dir)/no-such-hooks does not exist") && noHooks.contains("exit=0"), "\(noHooks)")
        // Hooks a freeze would refuse are named now, not first at a freeze (before: "configuration OK").
        let hooksDir = dir + "/hooks"
        _ = try sh("""
            mkdir -m 755 '\(hooksDir)' && printf '#!/bin/sh\\nexit 0\\n' > '\(hooksDir)/10-good' && chmod 755 '\(hooksDir)/10-good'
            cp '\(hooksDir)/10-good' '\(hooksDir)/20-open' && chmod 777 '\(hooksDir)/20-open' && ln -s 10-good '\(hooksDir)/30-link'
            ln -s hooks '\(dir)/hooks-link'
            printf 'echo no interpreter line\\n' > '\(hooksDir)/40-noshebang' && chmod 755 '\(hooksDir)/40-noshebang'
            printf '#!/no/such/shell\\nexit 0\\n' > '\(hooksDir)/41-badinterp' && chmod 755 '\(hooksDir)/41-badinterp'
            printf '#!/bin/sh\\r\\nexit 0\\r\\n' > '\(hooksDir)/42-crlf' && chmod 755 '\(hooksDir)/42-crlf'
            printf '#!/usr/bin/env no-such-interpreter\\n' > '\(hooksDir)/43-env' && chmod 755 '\(hooksDir)/43-env'
            printf '\\177ELF garbage' > '\(hooksDir)/44-fake-elf' && chmod 755 '\(hooksDir)/44-fake-elf'
            cp /bin/true '\(hooksDir)/45-elf' && printf '#!/usr/bin/env sh\\nexit 0\\n' > '\(hooksDir)/46-env-sh' && chmod 755 '\(hooksDir)/46-env-sh'
            printf '#!/usr/bin/env\\n' > '\(hooksDir)/47-env-alone'; printf '#!/usr/bin/env -i sh\\n' > '\(hooksDir)/48-env-opt'
            printf '#!/usr/bin/env -S nosuch -e\\n' > '\(hooksDir)/49-env-S-missing'; printf '#!/usr/bin/env -S sh -e\\n' > '\(hooksDir)/50-env-S-sh'
            head -c 64 /bin/true > '\(hooksDir)/51-cut-elf'; printf "#!%0300d/bin/sh\\n" 0 | tr 0 / > '\(hooksDir)/52-long'
            chmod 755 '\(hooksDir)'/4[7-9]-* '\(hooksDir)'/5[0-2]-*
            """)
        let hooked = try sh("'\(buildProductsDir)/quiesced' --config /dev/null --hooks-dir '\(hooksDir)' --check-config 2>&1; echo \"exit=$?\"")
        #expect(hooked.contains("hook 20-open in \(hooksDir) is refused at every freeze: writable by group or others")
                && hooked.contains("hook 30-link in \(hooksDir) is refused at every freeze: a symbolic link"), "\(hooked)")
        #expect(hooked.contains("configuration OK") && hooked.contains("hooks 10-good 40-noshebang 41-badinterp 42-crlf 43-env 44-fake-elf 45-elf 46-env-sh 47-env-alone 48-env-opt 49-env-S-missing 50-env-S-sh 51-cut-elf 52-long in \(hooksDir) (2 refused)") && hooked.hasSuffix("exit=0\n"), "\(hooked)")
        // env as the kernel starts it: the rest of the #! line is one argument (trial G).
        for (hook, why) in [("47-env-alone", "env names no program, so it runs the hook itself again, for ever"),
                            ("48-env-opt", "env gets \"-i sh\" as one argument"),
                            ("49-env-S-missing", "runs nosuch through env, which finds none in PATH"),
                            ("51-cut-elf", "it is cut short"),
                            ("52-long", "does not end within the 256 bytes the kernel reads")] {
            #expect(hooked.contains("hook \(hook) in \(hooksDir) cannot start, so every freeze fails: ") && hooked.contains(why), "\(hook): \(hooked)")
        }
        #expect(!hooked.contains("50-env-S-sh in \(hooksDir) cannot start"), "\(hooked)")
        #expect(hooked.contains("hook 42-crlf in \(hooksDir) cannot start, so every freeze fails: its #! interpreter /bin/sh\\r cannot be run (ENOENT) (the file has Windows line ends")
                && hooked.contains("hook 43-env in \(hooksDir) cannot start, so every freeze fails: its #! line runs no-such-interpreter through env, which finds none in PATH")
                && hooked.contains("hook 44-fake-elf in \(hooksDir) cannot start, so every freeze fails: it starts like an ELF file but its header is not one"), "\(hooked)")
        #expect(!hooked.contains("45-elf in \(hooksDir) cannot start") && !hooked.contains("46-env-sh in \(hooksDir) cannot start"), "\(hooked)")
        // Listed, since a freeze runs them, but they cannot start, which fails every freeze.
        #expect(hooked.contains("hook 40-noshebang in \(hooksDir) cannot start, so every freeze fails: it has no #! line and is not an ELF executable")
                && hooked.contains("hook 41-badinterp in \(hooksDir) cannot start, so every freeze fails: its #! interpreter /no/such/shell cannot be run"), "\(hooked)")
        #expect(!hooked.contains("hook 10-good in \(hooksDir) cannot start"), "\(hooked)")
        let linked = try sh("'\(buildProductsDir)/quiesced' --config /dev/null --hooks-dir '\(dir)/hooks-link' --check-config 2>&1")
        #expect(linked.contains("hooks-dir \(dir)/hooks-link: the hooks directory is a symbolic link (not followed)") && linked.contains("hooks none"), "\(linked)")
        let good = dir + "/good.conf"
        try "listen = vsock:5123\ninclude = /srv/*\nmax-freeze = 2m   # two minutes\nthaw-on-disconnect = no\npresync = off\n# listen = unix:/commented\nlisten = unix:/run/a#b.sock\n".write(toFile: good, atomically: true, encoding: .utf8)
        let ok = try sh("'\(buildProductsDir)/quiesced' --config '\(good)' --check-config")
        #expect(ok.contains("vsock:5123") && ok.contains("2m") && ok.contains("presync no"), "\(ok)")
        #expect(ok.contains("unix:/run/a#b.sock") && !ok.contains("/commented"), "a # inside a value is part of it: \(ok)")
        let flagWins = try sh("'\(buildProductsDir)/quiesced' --config '\(good)' --listen unix:/tmp/x.sock --check-config")
        #expect(flagWins.contains("unix:/tmp/x.sock") && !flagWins.contains("vsock:5123"), "a flag replaces the file's list")
        // A state dir that cannot take the freeze records: refused at start, not at every freeze.
        let notADir = dir + "/state-file"
        try "".write(toFile: notADir, atomically: true, encoding: .utf8)
        let checked = try sh("'\(buildProductsDir)/quiesced' --config /dev/null --state-dir '\(notADir)' --check-config 2>&1; echo \"exit=$?\"")
        #expect(checked.contains("state-dir \(notADir): not a directory") && checked.contains("exit=2"), "\(checked)")
        let started = try sh("'\(buildProductsDir)/quiesced' --config /dev/null --state-dir '\(notADir)' --listen unix:\(dir)/s.sock 2>&1; echo \"exit=$?\"")
        #expect(started.contains("cannot keep freeze records there") && started.contains("ENOTDIR") && started.contains("exit=1"), "\(started)")
    }

    @Test("--version names the release, and --help keeps each option's text apart (help2man makes quiesced(8) from it)")
    func helpAndVersion() throws {
        let version = try sh("'\(buildProductsDir)/quiesced' --version")
        #expect(version == "quiesced \(QuiesceRelease.version) (protocol \(ProtocolVersion.current))\n")
        let lines = try sh("'\(buildProductsDir)/quiesced' --help").split(separator: "\n", omittingEmptySubsequences: false)
        #expect(lines.first?.hasPrefix("USAGE: quiesced ") == true)
        let options = Array(lines.drop(while: { $0 != "OPTIONS:" }).dropFirst().prefix(while: { !$0.isEmpty }))
        #expect(options.count >= 20, "\(options)")
        for (i, line) in options.enumerated() where line.hasPrefix("  -") {
            // Either "  --flag VALUE  help" or the help alone on the next, indented line.
            let apart = line.dropFirst(2).contains("  ")
                || (i + 1 < options.count && options[i + 1].hasPrefix(String(repeating: " ", count: 20)))
            #expect(apart, "\(line)")
        }
    }

    @Test("bad flags are refused with exit 2 and a message naming the flag and the problem",
          arguments: [
              ("--frobnicate", "unknown option --frobnicate"),
              ("--frobnicate=1", "unknown option --frobnicate"),
              ("--max-freeze", "--max-freeze needs a value"),
              ("--max-freeze 0", "max-freeze: must be longer than 0"),
              ("--listen vsock:abc", "port \"abc\" is not a number"),
              ("--listen tcp:1", "unknown kind \"tcp\""),
              ("--listen qga+serial:ttyS1", "the device path must be absolute"),
              ("--listen hv-vss:hv_vss", "the device path must be absolute"),
              ("stray", "unexpected argument \"stray\""),
              ("--include data/*", "never matches: mountpoints are absolute paths"),
              ("--listen unix:/tmp/q.sock --listen qga+unix:/tmp//q.sock", "both use path /tmp/q.sock: give each listener its own"),
              ("--listen vsock:5123 --listen vsock:3:5123", "both use vsock port 5123"),
              ("--max-freeze 1ms", "max-freeze: at least 1s"),
              ("--include '/srv/[ab'", "unclosed [ at offset 5"),
              ("--exclude '/srv/x\\'", "ends with a lone backslash"),
              ("--include-type 'ext4 xfs'", "is not a filesystem type name"),
          ])
    func badFlags(flags: String, message: String) throws {
        let out = try sh("'\(buildProductsDir)/quiesced' --config /dev/null --check-config \(flags) 2>&1; echo \"exit=$?\"")
        #expect(out.contains(message) && out.hasSuffix("exit=2\n"), "\(out)")
    }

    @Test("scope globs: well-formed bracket expressions and classes pass and match as fnmatch(3) does; typos are named")
    func scopeGlobs() throws {
        for (pattern, example) in [("/srv/*", "/srv/a"), ("/srv/[!a]*", "/srv/b1"), ("/data/[[:digit:]]*", "/data/7x"),
                                   ("/x/[]]", "/x/]"), ("/x/[^]a]", "/x/b"), ("/lit/\\[", "/lit/["), ("*", "/")] {
            #expect(Glob.problem(in: pattern) == nil, "\(pattern)")
            #expect(Glob.matches(pattern, example), "\(pattern) should match \(example)")
        }
        #expect(Glob.problem(in: "/srv/[ab") == "unclosed [ at offset 5 (write \\[ for a literal bracket)")
        #expect(Glob.problem(in: "/a/[[:digit:]") != nil, "a class does not close its bracket expression")
        #expect(Glob.problem(in: "/a\\") == "ends with a lone backslash")
        // fnmatch(3) matches nothing with these; each is named.
        #expect(Glob.problem(in: "/srv/[[:bogus:]]")?.hasPrefix("unknown character class [:bogus:]") == true)
        #expect(Glob.problem(in: "/srv/[z-a]")?.hasPrefix("empty range z-a") == true)
        #expect(!Glob.matches("/srv/[z-a]", "/srv/m") && !Glob.matches("/srv/[z-a]", "/srv/z"), "glibc: a reversed range matches nothing")
        for good in ["/srv/[a-z]", "/srv/[-a]", "/srv/[a-]", "/srv/[!a-c]x", "/srv/[\\]]", "/srv/[[:upper:][:digit:]]"] {
            #expect(Glob.problem(in: good) == nil, "\(good)")
        }
        let ok = try sh("'\(buildProductsDir)/quiesced' --config /dev/null --include '/data/[[:digit:]]*' --check-config 2>&1; echo \"exit=$?\"")
        #expect(ok.hasSuffix("exit=0\n") && ok.contains("/data/[[:digit:]]*"), "\(ok)")
    }

    @Test("allow-uid for another user opens the unix socket to that user only: mode 0666 with admission by SO_PEERCRED",
          .enabled(if: getuid() == 0, "needs root to act as other users"))
    func allowUIDReachesOtherUsers() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("allowuid-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // A hello as `uid`, through setpriv(1) and Debian's python3 (root's may be elsewhere):
        // the first reply line, or the connect error.
        let script = "\(dir)/hello.py"
        try """
            import socket, sys
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(sys.argv[1])
            except OSError as e:
                print("connect:", e.strerror)
                sys.exit()
            s.sendall(b'{"id":1,"op":"hello","version":1}\\n')
            print(s.makefile().readline().strip())
            """.write(toFile: script, atomically: true, encoding: .utf8)
        // Readable by the other users whatever the umask: listenUnix (a fake agent in another
        // suite of this process) narrows the process's umask for a moment while it binds.
        try FileManager.default.setAttributes([.posixPermissions: 0o644], ofItemAtPath: script)
        func hello(as uid: Int, socket: String) throws -> String {
            try sh("setpriv --reuid=\(uid) --regid=\(uid) --clear-groups /usr/bin/python3 '\(script)' '\(socket)' 2>&1")
        }
        let agent = try AgentProcess(in: dir, arguments: ["--include", "\(dir)/none/*", "--allow-uid", "0", "--allow-uid", "65534"])
        defer { agent.stop() }
        #expect(try Stat.of(path: agent.socketPath).permissions & 0o777 == 0o666)
        #expect(try hello(as: 65534, socket: agent.socketPath).contains("\"agent\":\"quiesced\""), "the allowed user is answered")
        let refused = try hello(as: 65533, socket: agent.socketPath)
        #expect(!refused.contains("\"agent\":\"quiesced\""), "another user is refused: \(refused)")
        agent.stop()

        let rootOnly = try AgentProcess(in: dir, arguments: ["--include", "\(dir)/none/*"])
        defer { rootOnly.stop() }
        #expect(try Stat.of(path: rootOnly.socketPath).permissions & 0o777 == 0o600)
        #expect(try hello(as: 65534, socket: rootOnly.socketPath).contains("connect: Permission denied"))
    }

    @Test("vsock: the agent binds and listens (connecting is tested inside a guest VM)",
          .enabled(if: FileManager.default.fileExists(atPath: "/dev/vsock")))
    func vsockListen() async throws {
        try await LoopLab.with { lab in
            let port = 20_000 + Int.random(in: 0..<10_000)
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--listen", "vsock:\(port)"])
            try waitUntil(timeoutMs: 3000) { agent.log.contains("listening on vsock:\(port)") }
            let listening = try sh("ss -H -l --vsock 2>/dev/null | grep -c ':\(port)' || true")
            #expect(listening.trimmingCharacters(in: .whitespacesAndNewlines) != "0" || agent.log.contains("listening on vsock:\(port)"))
            agent.stop()
        }
    }
}

// MARK: - Helpers

/// Runs a blocking call on its own thread; `wait` gives its result.
final class BackgroundCall<T>: @unchecked Sendable {
    private let done = DispatchSemaphore(value: 0)
    private var result: Result<T, Error>?

    init(_ body: @escaping @Sendable () throws -> T) {
        Thread.detachNewThread { [self] in
            result = Result { try body() }
            done.signal()
        }
    }

    func wait(timeoutMs: Int) throws -> T {
        guard done.wait(timeout: .now() + .milliseconds(timeoutMs)) == .success, let result else {
            throw LabError("background call did not finish within \(timeoutMs) ms")
        }
        return try result.get()
    }
}

/// Polls `condition` until it holds or the time is up (then records an issue).
func waitUntil(timeoutMs: Int, sourceLocation: SourceLocation = #_sourceLocation, _ condition: () throws -> Bool) throws {
    let deadline = Date().addingTimeInterval(Double(timeoutMs) / 1000)
    while Date() < deadline {
        if try condition() { return }
        usleep(20_000)
    }
    Issue.record("condition not met within \(timeoutMs) ms", sourceLocation: sourceLocation)
}

/// Plays systemd's part for Type=notify: a datagram socket at NOTIFY_SOCKET.
final class NotifyListener {
    let fd: Int32
    var received: [String] = []

    init(path: String) throws {
        fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            let bytes = Array(path.utf8)
            for (i, b) in bytes.enumerated() { p[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { throw LabError("bind \(path): \(errno)") }
    }

    deinit { Glibc.close(fd) }

    func waitFor(_ prefix: String, timeoutMs: Int32) throws -> Bool {
        let deadline = Date().addingTimeInterval(Double(timeoutMs) / 1000)
        while Date() < deadline {
            if received.contains(where: { $0.split(separator: "\n").contains { $0.hasPrefix(prefix) } }) { return true }
            guard try !FD.poll(fd, for: .readable, timeoutMs: 100).isEmpty else { continue }
            var buf = [UInt8](repeating: 0, count: 4096)
            let n = recv(fd, &buf, buf.count, 0)
            if n > 0 { received.append(String(decoding: buf[0..<n], as: UTF8.self)) }
        }
        return false
    }
}

extension Result where Failure == ProtocolError {
    var failureCode: ErrorCode? { if case .failure(let e) = self { return e.code }; return nil }
    var failureDetails: JSONObject? { if case .failure(let e) = self { return e.details }; return nil }
    var failureMessage: String? { if case .failure(let e) = self { return e.message }; return nil }
}

@Suite("Concurrent requests", .enabled(if: canUseLoopDevices, "needs root and loop devices"))
struct ConcurrentRequestTests {
    @Test("freezes racing from several connections: exactly one operation freezes; the same op_id replays it")
    func racingFreezes() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
            let path = agent.socketPath
            let calls = (0..<8).map { i in
                BackgroundCall { try TestClient(path: path).call(["op": "freeze", "mode": "detached", "op_id": .string(i < 4 ? "same" : "other-\(i)")]) }
            }
            let replies = try calls.map { try $0.wait(timeoutMs: 20_000) }
            let winners = replies.compactMap { r -> String? in
                if case .success(let o) = r.outcome, o["replayed"] == false { return o["op_id"]?.stringValue }
                return nil
            }
            #expect(winners.count == 1, "exactly one freeze is taken: \(replies)")
            for r in replies {
                switch r.outcome {
                case .success(let o): #expect(o["op_id"]?.stringValue == winners.first)
                case .failure(let e): #expect([ErrorCode.alreadyFrozen, .busy].contains(e.code), "\(e)")
                }
            }
            #expect(try isFrozen(a))
            _ = try TestClient(path: path).result(["op": "thaw"])
            #expect(try !isFrozen(a))
            agent.stop()
        }
    }
}
