// What a peer of a real quiesced sees: thawed events, op_id rules, a half-closed peer's cost, stderr logs.
import Foundation
import QuiesceAgent
import QuiesceLinux
import QuiesceProtocol
import QuiesceTestSupport
import Testing

@Suite("what a peer of quiesced sees", .enabled(if: canUseLoopDevices, "needs root and loop devices"))
struct AgentPeerTests {
    @Test("a thaw by request: every other hello'd connection gets thawed with reason request; the requester gets its reply only")
    func requestThawEvent() async throws {
        try await LoopLab.with { lab in
            _ = try lab.filesystem("a")
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
            let watcher = try TestClient(path: agent.socketPath)
            _ = try watcher.result(["op": "hello", "version": 1])
            let requester = try TestClient(path: agent.socketPath)
            _ = try requester.result(["op": "hello", "version": 1])
            _ = try requester.result(["op": "freeze", "mode": "detached", "op_id": "op-asked"])
            let thaw = try requester.result(["op": "thaw", "op_id": "op-asked"])
            #expect(thaw["was_frozen"] == true)
            let event = try watcher.waitForEvent("thawed", timeoutMs: 3000)
            #expect(event.fields["reason"] == "request")
            #expect(event.fields["op_id"] == "op-asked")
            // A ping answered after the thaw proves whatever the agent queued before it has arrived.
            _ = try requester.result(["op": "ping"])
            #expect(!requester.events.contains { $0.name == "thawed" }, "the requester has the reply; no event")
            #expect(try requester.result(["op": "status"])["last_auto_thaw"] == nil, "a requested thaw is no auto-thaw")
            agent.stop()
        }
    }

    @Test("an empty op_id is refused with bad-request naming the 1 to 128 byte rule, on every op that takes one", arguments: ["freeze", "thaw", "keepalive"])
    func emptyOpID(op: String) async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
            let c = try TestClient(path: agent.socketPath)
            if op != "freeze" { _ = try c.result(["op": "freeze", "mode": "detached", "op_id": "held"]) }
            for opID: JSON in ["", .string(String(repeating: "x", count: 129))] {
                let r = try c.call(["op": .string(op), "op_id": opID, "mode": "detached"])
                guard case .failure(let e) = r.outcome else { Issue.record("\(op) with op_id \(opID) accepted: \(r)"); continue }
                #expect(e.code == .badRequest)
                #expect(e.message.contains("1 to 128 bytes"), "\(e.message)")
            }
            let status = try c.result(["op": "status"])
            let holder: JSON? = op == "freeze" ? .none : .string("held")
            #expect(status["op_id"] == holder, "nothing was done under the refused name")
            #expect(try isFrozen(a) == (op != "freeze"))
            if op != "freeze" { _ = try c.result(["op": "thaw", "op_id": "held"]) }
            agent.stop()
        }
    }

    @Test("a half-closed peer whose freeze is still running costs the agent no periodic wakeups, and gets its reply")
    func halfClosedPeerSleeps() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let hooks = try makeHooks(in: lab.root, ["10-slow": "[ \"$1\" = freeze ] && sleep 2; exit 0"])
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--hooks-dir", hooks])
            let peer = try TestClient(path: agent.socketPath)
            try peer.sendRaw(Array("{\"id\":1,\"op\":\"freeze\",\"mode\":\"detached\",\"op_id\":\"half\"}\n".utf8))
            Socket.shutdownWrite(peer.fd)  // as `printf ... | socat - UNIX-CONNECT:...` does
            usleep(300_000)  // the agent has read EOF and the hook sleeps
            let before = try contextSwitches(of: agent.pid)
            usleep(1_200_000)
            let switches = try contextSwitches(of: agent.pid) - before
            // Polling every 2 ms made ~600 here; sleeping on the request's completion makes a few.
            #expect(switches < 60, "\(switches) context switches in 1.2 s while waiting")
            guard case .reply(let r) = try peer.readMessage(timeoutMs: 10_000) else { Issue.record("no reply"); return }
            #expect(r.id == .int(1))
            if case .success(let o) = r.outcome { #expect(o["op_id"] == "half") } else { Issue.record("freeze failed: \(r)") }
            #expect(try isFrozen(a))
            _ = try TestClient(path: agent.socketPath).result(["op": "thaw", "op_id": "half"])
            #expect(try !isFrozen(a))
            agent.stop()
        }
    }

    /// Before: a peer that began a frame and never ended it held its connection slot for
    /// ever, so max-connections such peers locked every other local client out (trial).
    @Test("a frame left unfinished for 30 s, or no frame in the 30 s after connecting, closes the connection with bad-request (both dialects), which frees the slot; an idle connection between frames stays")
    func unfinishedFrameClosesTheConnection() async throws {
        try await LoopLab.with { lab in
            let qga = "\(lab.root)/qga.sock"
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--max-connections", "4", "--listen", "qga+unix:\(qga)"])
            defer { agent.stop() }
            try waitForSocket(qga)
            // Each peer is known to hold a slot (it was answered) before it starts its frame:
            // the agent's start-up probe may still hold one for a moment.
            func admitted(_ path: String, ping: String, answer: String) throws -> TestClient {
                for _ in 0..<100 {
                    let c = try TestClient(path: path)
                    try c.sendRaw(Array((ping + "\n").utf8))
                    var buffer = [UInt8](repeating: 0, count: 4096)
                    if try !FD.poll(c.fd, for: .readable, timeoutMs: 5000).isEmpty, case .success(let n) = FD.readSome(c.fd, into: &buffer),
                       String(decoding: buffer[0..<n], as: UTF8.self).contains(answer) { return c }
                    usleep(20_000)
                }
                throw LabError("not admitted: \(path)")
            }
            let idle = try admitted(agent.socketPath, ping: #"{"op":"ping","id":0}"#, answer: #""ok":true"#)
            let slow = try admitted(agent.socketPath, ping: #"{"op":"ping","id":0}"#, answer: #""ok":true"#)
            try slow.sendRaw(Array(#"{"op":"ping","id":1"#.utf8))
            let slowQGA = try admitted(qga, ping: #"{"execute":"guest-ping"}"#, answer: #""return""#)
            try slowQGA.sendRaw(Array(#"{"execute":"guest-ping""#.utf8))
            // A peer that connects and says nothing (once admitted: nothing came back at once).
            let silent = try TestClient(path: agent.socketPath)
            #expect(try FD.poll(silent.fd, for: .readable, timeoutMs: 300).isEmpty, "the silent peer was admitted")
            let start = monotonicNanos()
            // The four slots are taken: a fifth peer is refused.
            let refused = try TestClient(path: agent.socketPath)
            #expect(try refused.call(["op": "ping"]).outcome.failureCode == .busy, "a fifth peer was refused")
            // Each slow peer gets its answer and then the end of the connection.
            let answer = String(decoding: try slow.readAll(timeoutMs: 45_000), as: UTF8.self)
            let waited = (monotonicNanos() - start) / 1_000_000
            #expect(answer.contains("\"code\":\"bad-request\"") && answer.contains("a frame begun 30 s ago is still unfinished"), "\(answer)")
            #expect(waited >= 28_000 && waited < 45_000, "closed after \(waited) ms")
            let silentAnswer = String(decoding: try silent.readAll(timeoutMs: 15_000), as: UTF8.self)
            #expect(silentAnswer.contains("no frame in the 30 s since the connection was made"), "\(silentAnswer)")
            let qgaAnswer = String(decoding: try slowQGA.readAll(timeoutMs: 15_000), as: UTF8.self)
            #expect(qgaAnswer.contains("GenericError") && qgaAnswer.contains("still unfinished"), "\(qgaAnswer)")
            // The slots are free again, and the idle connection was left alone.
            #expect(throws: Never.self) { _ = try TestClient(path: agent.socketPath).result(["op": "ping"]) }
            #expect(try idle.result(["op": "status"])["state"] == "thawed")
            #expect(agent.log.contains("a frame left unfinished for 30 s: connection closed"))
        }
    }

    /// Before: max-connections peers that said one thing and then nothing locked every other
    /// local client out for as long as they stayed (trial E, B5).
    @Test("past max-connections, a new peer is admitted by closing the connection idle longest (30 s, nothing unanswered), never the one holding a bound freeze")
    func idleConnectionMakesRoom() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--max-connections", "2"])
            defer { agent.stop() }
            // The holder's freeze is bound to its connection, which is idle from here on too.
            let holder = try TestClient(path: agent.socketPath)
            _ = try holder.result(["op": "freeze", "mode": "bound", "timeout_ms": 120_000])
            let idle = try TestClient(path: agent.socketPath)
            _ = try idle.result(["op": "ping"])
            // Full, and nobody idle long enough yet: refused.
            let early = try TestClient(path: agent.socketPath)
            #expect(try early.call(["op": "ping"]).outcome.failureCode == .busy, "refused past max-connections")
            usleep(31_000_000)
            // Now the idle one makes room; the holder, idle as long, keeps its freeze.
            let late = try TestClient(path: agent.socketPath)
            #expect(throws: Never.self) { _ = try late.result(["op": "ping"]) }
            let told = String(decoding: try idle.readAll(timeoutMs: 5000), as: UTF8.self)
            #expect(told.contains("\"code\":\"busy\"") && told.contains("to make room for a new one"), "\(told)")
            #expect(try isFrozen(a))
            #expect(try holder.result(["op": "status"])["state"] == "frozen")
            _ = try holder.result(["op": "thaw"])
            #expect(try !isFrozen(a))
            #expect(agent.log.contains("to make room: 2 connections (max-connections) were open"))
        }
    }

    @Test("a storm of connections past max-connections costs a bounded number of threads and log lines, and the admitted peers go on")
    func refusalStormIsBounded() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--max-connections", "2"])
            defer { agent.stop() }
            let admitted = try TestClient(path: agent.socketPath)
            _ = try admitted.result(["op": "freeze", "mode": "bound"])
            let second = try TestClient(path: agent.socketPath)
            _ = try second.result(["op": "ping"])
            // 400 connections held open without reading: each is refused busy.
            var storm: [Int32] = []
            defer { storm.forEach { FD.close($0) } }
            var mostThreads = 0
            for i in 0..<400 {
                if let fd = try? Socket.connectUnix(path: agent.socketPath, timeoutMs: 1000) { storm.append(fd) }
                if i % 50 == 0 { mostThreads = max(mostThreads, try FileManager.default.contentsOfDirectory(atPath: "/proc/\(agent.pid)/task").count) }
            }
            mostThreads = max(mostThreads, try FileManager.default.contentsOfDirectory(atPath: "/proc/\(agent.pid)/task").count)
            // A thread per refused connection made 410 here.
            #expect(mostThreads < 40, "\(mostThreads) threads during the storm")
            #expect(try admitted.result(["op": "status"])["state"] == "frozen", "the admitted peers are served")
            #expect(try isFrozen(a))
            _ = try admitted.result(["op": "thaw"])
            let logged = agent.log.components(separatedBy: "refused connection").count - 1
            #expect(logged >= 1 && logged <= 10, "\(logged) log lines for 400 refusals")
        }
    }

    @Test("a peer's op_id with a newline and control bytes is refused and cannot forge or split stderr log lines; logged text is escaped")
    func logLinesCannotBeForged() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            var environment = ProcessInfo.processInfo.environment
            environment["JOURNAL_STREAM"] = nil
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"], environment: environment)
            let c = try TestClient(path: agent.socketPath)
            let forged = "x\nquiesced: info: thawed FAKE\r\u{1b}[2J\t\u{7f}"
            // An op_id reaches hooks and logs: one with control characters is refused (trial H).
            let refused = try c.call(["op": "freeze", "mode": "detached", "op_id": .string(forged)])
            #expect(refused.outcome.failureCode == .badRequest, "\(refused)")
            #expect(try !isFrozen(a))

            _ = try c.result(["op": "freeze", "mode": "detached", "op_id": "fine"])
            _ = try c.result(["op": "thaw", "op_id": "fine"])
            agent.stop()
            let log = agent.log
            let lines = log.split(separator: "\n", omittingEmptySubsequences: false)
            #expect(!lines.contains { $0.hasPrefix("quiesced: info: thawed FAKE") }, "a forged line: \(log)")
            #expect(!log.contains("\u{1b}") && !log.contains("\r") && !log.contains("\u{7f}"), "raw control bytes: \(log)")
            #expect(lines.contains { $0.hasPrefix("quiesced: info: thawed") && $0.contains("op_id=fine") }, "the real thawed line: \(log)")
            // What else reaches a log line (hook output, mountpoints from mountinfo) is written
            // through the same escaping.
            #expect(OneLine.escaped(forged) == "x\\nquiesced: info: thawed FAKE\\r\\x1b[2J\\t\\x7f")
        }
    }
}
