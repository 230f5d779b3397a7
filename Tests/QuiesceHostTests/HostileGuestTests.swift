// Guests that break the protocol's limits or stall on purpose, against the real quiescectl:
// thousands of bind mounts on a real agent, and in-test hostile agents beside real ones.
import Foundation
import QuiesceHost
import QuiesceLinux
import QuiesceProtocol
import QuiesceTestSupport
import Synchronization
import Testing

/// A directory path of about `length` bytes under `base` (components of at most 250 bytes).
private func deepDirectory(_ base: String, length: Int) -> String {
    var path = base
    while path.utf8.count + 251 < length { path += "/" + String(repeating: "x", count: 250) }
    let rest = length - path.utf8.count - 1
    if rest > 0 { path += "/" + String(repeating: "y", count: rest) }
    return path
}

/// Safety: every agent runs with --include limited to the lab; the hostile ones are in-test peers.
@Suite("Hostile and oversized guests", .serialized)
struct HostileGuestTests {
    // MARK: Replies the host cannot read (in-test peers)

    @Test("a freeze reply quiescectl cannot read is undone by its op id; exit 70 says the freeze failed and nothing is frozen",
          arguments: [FakeAgent.Abuse.oversized(2 << 20), .malformed])
    func unreadableFreezeReplyIsUndone(_ abuse: FakeAgent.Abuse) throws {
        let dir = TempDir()
        let agent = try FakeAgent(in: dir, .init(freezeAbuse: abuse))
        let r = try Ctl.run(["--agent", "unix:\(dir.file("fake.sock"))", "freeze", "--op-id", "hostile-1", "--timeout", "60s"], in: dir)
        #expect(r.status == ExitCodes.freezeFailed, "\(r.stderr)")
        #expect(agent.thawOps == ["hostile-1"], "thawed by its op id: \(agent.thawOps)")
        #expect(!agent.frozen)
        #expect(r.stderr.contains("was undone") && r.stderr.contains("nothing is frozen by it"), "\(r.stderr)")
    }

    @Test("a freeze that froze no filesystem is a failed freeze: COMMAND does not run (70), or runs as crash-consistent when the policy allows")
    func freezingNothingIsNoCheckpoint() throws {
        let dir = TempDir()
        let agent = try FakeAgent(in: dir, .init(mounts: []))
        let marker = dir.file("ran")
        let r = try Ctl.run(["--agent", "unix:\(dir.file("fake.sock"))", "checkpoint", "--", "touch", marker], in: dir)
        #expect(r.status == ExitCodes.freezeFailed, "\(r.stderr)")
        #expect(r.stderr.contains("froze no filesystem"), "\(r.stderr)")
        #expect(!FileManager.default.fileExists(atPath: marker), "COMMAND did not run")
        let c = try Ctl.run(["--agent", "unix:\(dir.file("fake.sock"))", "--json", "checkpoint", "--on-agent-failure", "crash-consistent",
                             "--", "sh", "-c", "echo $QUIESCE_CONSISTENCY > '\(marker)'"], in: dir)
        #expect(c.status == 0, "\(c.stderr)")
        #expect((try? String(contentsOfFile: marker, encoding: .utf8))?.hasPrefix("crash") == true)
        _ = agent
    }

    /// Whether something happened, across threads.
    final class Seen: Sendable {
        private let flag = Mutex(false)
        func saw() { flag.withLock { $0 = true } }
        var happened: Bool { flag.withLock { $0 } }
    }

    /// Serves qemu-ga's commands on `c` until it closes, one at a time as qemu-ga does: answers
    /// guest-sync(-delimited) and guest-info (qemu-ga 7.2 with the freeze commands) itself, and
    /// every other command with the `return` value `answer` gives, as JSON text. (The client's
    /// 0xFF resync byte leads its first line, read as U+FFFD.)
    static func serveQGA(_ c: PeerConnection, timeoutMs: Int32, _ answer: (String) -> String) {
        while let line = c.readLine(timeoutMs: timeoutMs) {
            let text = String(line.drop(while: { $0 == "\u{FFFD}" }))
            guard let json = try? JSON.parse(text), let cmd = json["execute"]?.stringValue else { continue }
            switch cmd {
            case "guest-sync-delimited", "guest-sync":
                c.send([0xFF])
                c.send("{\"return\": \(json["arguments"]?["id"]?.text ?? "0")}\n")
            case "guest-info":
                let names = ["guest-sync-delimited", "guest-fsfreeze-status", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
                let list = names.map { "{\"name\": \"\($0)\", \"enabled\": true}" }.joined(separator: ", ")
                c.send("{\"return\": {\"version\": \"7.2.0\", \"supported_commands\": [\(list)]}}\n")
            default:
                c.send("{\"return\": \(answer(cmd))}\n")
            }
        }
    }

    /// A qemu-ga on a Unix socket that answers freeze with `freezeAnswer` and thaw with
    /// `thawAnswer` (JSON text), and records that a thaw came.
    static func scriptedQGA(_ path: String, freezeAnswer: String, thawAnswer: String = "0", status: String = "thawed", thawed: Seen) throws -> ScriptedPeer {
        try ScriptedPeer(path: path) { c in
            serveQGA(c, timeoutMs: 10_000) { cmd in
                switch cmd {
                case "guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list": return freezeAnswer
                case "guest-fsfreeze-thaw":
                    thawed.saw()
                    return thawAnswer
                case "guest-fsfreeze-status": return "\"\(status)\""
                default: return "{}"
                }
            }
        }
    }

    /// Models what the host sees of Debian's qemu-ga with a slow fsfreeze hook: one client at a
    /// time, one command at a time (qga/main.c), and a freeze that returns only after
    /// `freezeMs` (qemu-ga runs the hook, then FIFREEZEs), reading nothing meanwhile. Records
    /// whether a thaw came after the freeze had taken hold, that is, whether the guest was left
    /// frozen. (The real qemu-ga would freeze this machine's filesystems and thaw all of them:
    /// run-qga-e2e drives it inside the guest.)
    final class SlowQGA: Sendable {
        private final class State: Sendable {
            let lock = Mutex<(begun: Bool, frozen: Bool, thawedAfterFreeze: Bool)>((false, false, false))
            func withLock<T>(_ body: (inout (begun: Bool, frozen: Bool, thawedAfterFreeze: Bool)) -> T) -> T { lock.withLock { body(&$0) } }
        }
        private let state = State()
        let peer: ScriptedPeer
        let path: String
        var begun: Bool { state.withLock { $0.begun } }
        var frozen: Bool { state.withLock { $0.frozen } }
        var thawedAfterFreeze: Bool { state.withLock { $0.thawedAfterFreeze } }

        /// `thawAnswer`: what the thaw's `return` is, as JSON text (default: the count).
        /// `thawThaws: false`: a thaw answers but leaves it frozen (a lying guest).
        init(_ path: String, freezeMs: Int, thawAnswer: String? = nil, thawThaws: Bool = true, backlog: Int32 = 64) throws {
            let state = self.state
            self.path = path
            peer = try ScriptedPeer(path: path, serial: true, backlog: backlog) { c in
                HostileGuestTests.serveQGA(c, timeoutMs: 30_000) { cmd in
                    switch cmd {
                    case "guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list":
                        state.withLock { $0.begun = true }
                        usleep(useconds_t(freezeMs * 1000))
                        state.withLock { $0.frozen = true }
                        return "1"
                    case "guest-fsfreeze-thaw":
                        let n = state.withLock { s in
                            defer { if thawThaws { s.frozen = false } }
                            if s.frozen && thawThaws { s.thawedAfterFreeze = true }
                            return s.frozen ? 1 : 0
                        }
                        return thawAnswer ?? "\(n)"
                    case "guest-fsfreeze-status":
                        return state.withLock { $0.frozen } ? "\"frozen\"" : "\"thawed\""
                    default: return "{}"
                    }
                }
            }
        }

        /// Another client asks for a freeze and leaves once it is being taken: what follows
        /// waits behind it, as behind a freeze qemu-ga is still inside.
        func freezeForAnotherClient() throws {
            let other = try Socket.connectUnix(path: path, timeoutMs: 1000)
            defer { FD.close(other) }
            try FD.writeAll(other, Array(#"{"execute":"guest-fsfreeze-freeze"}"#.utf8) + [0x0A], timeoutMs: 1000)
            for _ in 0..<500 where !state.withLock({ $0.begun }) { usleep(10_000) }
        }
    }

    /// quiesced behind QEMU's chardev, as `serial:` reaches it: the chardev serves one
    /// connection at a time, while the agent itself goes on answering during a freeze it is
    /// still taking (a slow freeze hook), `busy` to a thaw until it is done. A bound freeze
    /// ends when its connection does (the port's host side closes), as the agent's does.
    final class SlowSerialAgent: Sendable {
        struct State: Sendable { var freezing = false, frozenBy: String? = nil, ownerGone = false, endedByDisconnect: String? = nil, thaws = 0 }
        let state = LockedBox(State())
        let peer: ScriptedPeer

        init(_ path: String, freezeMs: Int) throws {
            let state = self.state
            peer = try ScriptedPeer(path: path, serial: true) { c in
                let open = LockedBox(true)  // sends from the freeze's thread only while the connection stands
                var mine: String? = nil
                let hello = HelloResult(version: 1, agent: "quiesced", agentVersion: "0.1.0", capabilities: ["keepalive"],
                                        maxFrame: 65536, maxFreezeMs: 600_000)
                while let r = c.readRequest(timeoutMs: 30_000) {
                    switch r.operation {
                    case .hello: c.send(Reply(id: r.id, result: hello.json))
                    case .freeze(let f):
                        let op = f.opID ?? "op"
                        mine = op
                        state.withLock { $0.freezing = true; $0.ownerGone = false }
                        let id = r.id
                        Threads.detach {
                            usleep(useconds_t(freezeMs * 1000))
                            let gone = state.withLock { s -> Bool in
                                s.freezing = false
                                if s.ownerGone { s.endedByDisconnect = op } else { s.frozenBy = op }
                                return s.ownerGone
                            }
                            guard !gone else { return }
                            let result = FreezeResult(opID: op, mode: f.mode,
                                                      filesystems: [FilesystemReport(mountPoint: "/data", type: "ext4", device: "254:16", source: "/dev/vdb")],
                                                      skipped: [], hooks: [], presyncUs: 0, freezeUs: 1, stallUs: 1, totalUs: 1,
                                                      timeoutMs: f.timeoutMs ?? 600_000, deadlineMs: wallClockMillis() + (f.timeoutMs ?? 600_000))
                            open.withLock { if $0 { c.send(Reply(id: id, result: result.json)) } }
                        }
                    case .thaw(let op):
                        let reply = state.withLock { s -> Reply in
                            if s.freezing { return Reply(id: r.id, error: ProtocolError(.busy, "a freeze or thaw is in progress; try again")) }
                            if let by = s.frozenBy, op == nil || op == by {
                                s.frozenBy = nil
                                s.thaws += 1
                                return Reply(id: r.id, result: ThawResult(opID: by, wasFrozen: true, filesystems: [], totalUs: 100, frozenUs: 1000).json)
                            }
                            if let op, s.endedByDisconnect == op {
                                return Reply(id: r.id, error: ProtocolError(.notFrozen, "operation \(op) was thawed by the agent (disconnect)",
                                                                            details: ["op_id": .string(op), "thawed_reason": "disconnect"]))
                            }
                            return Reply(id: r.id, result: ThawResult(opID: op, wasFrozen: false, filesystems: [], totalUs: 0, frozenUs: nil).json)
                        }
                        c.send(reply)
                    case .status:
                        let st = state.withLock { $0.frozenBy.map { StatusResult(state: .frozen, opID: $0) } ?? StatusResult(state: .thawed) }
                        c.send(Reply(id: r.id, result: st.json))
                    default: c.send(Reply(id: r.id, error: ProtocolError(.unknownOp, "not in this model")))
                    }
                }
                open.withLock { $0 = false }
                state.withLock { s in
                    guard let mine else { return }
                    if s.freezing { s.ownerGone = true }
                    if s.frozenBy == mine { s.frozenBy = nil; s.endedByDisconnect = mine }
                }
            }
        }
        var frozen: Bool { state.withLock { $0.frozenBy != nil || $0.freezing } }
    }

    /// Before: the undo opened its connection while the freeze's was still open; QEMU's
    /// chardev serves one, so the undo's hello was never answered, and the run said MAY BE
    /// FROZEN and exited 72 although the agent had thawed (trial H, F3).
    @Test("a serial: agent whose freeze reply is late: the undo closes the freeze's connection first (the chardev serves one), reaches the agent, and the run exits 70, not 72")
    func lateSerialFreezeIsUndone() throws {
        let dir = TempDir()
        let sock = dir.file("chardev.sock")
        let agent = try SlowSerialAgent(sock, freezeMs: 3000)
        defer { agent.peer.stop() }
        let marker = dir.file("ran")
        let r = try Ctl.run(["--agent", "serial:\(sock)", "--reply-timeout", "2s", "checkpoint", "--timeout", "2s", "--", "touch", marker], in: dir, timeoutMs: 30_000)
        #expect(r.status == ExitCodes.freezeFailed, "\(r.stderr)")
        #expect(r.stderr.contains("was undone") && !r.stderr.contains("MAY BE FROZEN"), "\(r.stderr)")
        #expect(!FileManager.default.fileExists(atPath: marker))
        #expect(eventually(withinMs: 5_000) { !agent.frozen })
    }

    /// Before: the undo asked guest-info first, on a second connection, while the first still
    /// held qemu-ga; qemu-ga answered neither, the thaw was never sent, and the guest stayed
    /// frozen with no deadline (trial: a group run even exited 0 under crash-consistent).
    @Test("a qemu-ga whose freeze returns after quiescectl gave up on it (a slow fsfreeze hook) is thawed as soon as it returns: undone (70) when that is within the reply timeout, else the thaw waits in its channel and the run exits 72, in a group too, and so does `quiescectl thaw`")
    func slowQGAFreezeIsThawedWhenItReturns() throws {
        let dir = TempDir()
        let marker = dir.file("ran")
        // Alone: the freeze reply is waited for 2 s, the undo's thaw reply 2 s more.
        do {
            let qga = try SlowQGA(dir.file("q1.sock"), freezeMs: 3000)
            defer { qga.peer.stop() }
            let r = try Ctl.run(["--agent", "qga:unix:\(dir.file("q1.sock"))", "--reply-timeout", "2s", "checkpoint", "--timeout", "2s",
                                 "--", "touch", marker], in: dir, timeoutMs: 30_000)
            #expect(r.status == ExitCodes.freezeFailed, "\(r.stderr)")
            #expect(r.stderr.contains("was undone: thawed 1 filesystem"), "\(r.stderr)")
            #expect(qga.thawedAfterFreeze && !qga.frozen)
            #expect(!FileManager.default.fileExists(atPath: marker))
        }
        do {
            let qga = try SlowQGA(dir.file("q2.sock"), freezeMs: 5000)
            defer { qga.peer.stop() }
            let r = try Ctl.run(["--agent", "qga:unix:\(dir.file("q2.sock"))", "--reply-timeout", "1s", "checkpoint", "--timeout", "1s",
                                 "--", "touch", marker], in: dir, timeoutMs: 30_000)
            #expect(r.status == ExitCodes.thawFailed, "\(r.stderr)")
            #expect(r.stderr.contains("the thaw was sent and waits in qemu-ga's channel"), "\(r.stderr)")
            #expect(eventually(withinMs: 10_000) { qga.thawedAfterFreeze && !qga.frozen }, "the thaw written during the freeze was carried out after it")
        }
        // `quiescectl thaw` while qemu-ga is inside a freeze another client asked for: before, it
        // waited for guest-info's answer and never sent the thaw.
        for (reply, expected) in [("1s", ExitCodes.thawFailed), ("10s", ExitCodes.success)] {
            let sock = dir.file("t-\(reply).sock")
            let qga = try SlowQGA(sock, freezeMs: 3000)
            defer { qga.peer.stop() }
            try qga.freezeForAnotherClient()
            let r = try Ctl.run(["--agent", "qga:unix:\(sock)", "--reply-timeout", reply, "thaw"], in: dir, timeoutMs: 30_000)
            #expect(r.status == expected, "reply timeout \(reply): \(r.stderr)")
            if expected == ExitCodes.success {
                #expect(r.stdout.contains("thawed 1 filesystem"), "\(r.stdout)")
            } else {
                #expect(r.stderr.contains("the thaw was sent and waits in qemu-ga's channel"), "\(r.stderr)")
            }
            #expect(eventually(withinMs: 10_000) { qga.thawedAfterFreeze && !qga.frozen }, "reply timeout \(reply): left frozen")
        }
        // A thaw answer that cannot be read: the status that confirms the thaw is asked on a
        // new connection, the thaw's closed first (before: it waited behind it, then 72).
        do {
            let sock = dir.file("garbled.sock")
            let qga = try SlowQGA(sock, freezeMs: 0, thawAnswer: "\"lots\"")
            defer { qga.peer.stop() }
            try qga.freezeForAnotherClient()
            #expect(eventually(withinMs: 5000) { qga.frozen })
            let r = try Ctl.run(["--agent", "qga:unix:\(sock)", "--reply-timeout", "3s", "thaw"], in: dir, timeoutMs: 30_000)
            #expect(r.status == 0 && r.stdout.contains("status confirms"), "\(r.stdout)\(r.stderr)")
            #expect(!qga.frozen)
            // The same in a checkpoint's own thaw (before: 72 for a thaw that had happened), which
            // without the thaw's count cannot tell whether the freeze held: 70, not vouched for.
            let ck = try Ctl.run(["--agent", "qga:unix:\(sock)", "--reply-timeout", "3s", "checkpoint", "--", "true"], in: dir, timeoutMs: 30_000)
            #expect(ck.status == ExitCodes.freezeFailed && ck.stderr.contains("status confirms")
                    && ck.stderr.contains("not shown to have held"), "\(ck.stderr)")
            #expect(!qga.frozen)
        }
        // A garbled answer from a guest still frozen: qemu-ga's status names no operation, so
        // only "thawed" confirms (before: any state did, with --op-id and in a checkpoint: exit
        // 0 with the guest frozen, trial G).
        do {
            let sock = dir.file("stays.sock")
            let qga = try SlowQGA(sock, freezeMs: 0, thawAnswer: "\"lots\"", thawThaws: false)
            defer { qga.peer.stop() }
            let ck = try Ctl.run(["--agent", "qga:unix:\(sock)", "--reply-timeout", "3s", "checkpoint", "--", "true"], in: dir, timeoutMs: 30_000)
            #expect(ck.status == ExitCodes.thawFailed && ck.stderr.contains("status says the guest is still frozen"), "\(ck.stderr)")
            let byOp = try Ctl.run(["--agent", "qga:unix:\(sock)", "--reply-timeout", "3s", "thaw", "--op-id", "some-op"], in: dir, timeoutMs: 30_000)
            #expect(byOp.status == ExitCodes.thawFailed, "\(byOp.stdout)\(byOp.stderr)")
            #expect(qga.frozen)
        }
        // In a group, with a fast guest beside it and the policy that lets COMMAND run.
        for (freezeMs, reply, expected) in [(3000, "10s", ExitCodes.success), (6000, "2s", ExitCodes.thawFailed)] {
            let fast = try FakeAgent(in: dir, name: "fast-\(freezeMs)")
            let sock = dir.file("g-\(freezeMs).sock")
            let qga = try SlowQGA(sock, freezeMs: freezeMs)
            defer { qga.peer.stop() }
            let r = try Ctl.run(["--agent", "unix:\(dir.file("fast-\(freezeMs).sock"))", "--agent", "qga:unix:\(sock)", "--reply-timeout", reply,
                                 "checkpoint", "--freeze-wait", "1s", "--on-agent-failure", "crash-consistent", "--", "true"],
                                in: dir, timeoutMs: 30_000)
            #expect(r.status == expected, "freeze \(freezeMs) ms: \(r.stderr)")
            #expect(eventually(withinMs: 10_000) { qga.thawedAfterFreeze && !qga.frozen }, "freeze \(freezeMs) ms: left frozen")
            #expect(!fast.frozen)
        }
    }

    @Test("a qemu-ga whose freeze answer is not a count of filesystems: the freeze is undone and COMMAND does not run",
          arguments: ["\"lots\"", "-5", "99999999999999999999999", "null", "1000000000"])
    func qgaFreezeAnswerMustBeACount(_ answer: String) throws {
        let dir = TempDir()
        let thawed = Seen()
        let peer = try HostileGuestTests.scriptedQGA(dir.file("qga.sock"), freezeAnswer: answer, thawed: thawed)
        defer { peer.stop() }
        let marker = dir.file("ran")
        let r = try Ctl.run(["--agent", "qga:unix:\(dir.file("qga.sock"))", "checkpoint", "--", "touch", marker], in: dir)
        #expect(r.status == ExitCodes.freezeFailed, "\(answer): \(r.stderr)")
        #expect(r.stderr.contains("not a count of frozen filesystems"), "\(r.stderr)")
        #expect(!FileManager.default.fileExists(atPath: marker), "COMMAND did not run")
        #expect(thawed.happened, "the freeze of unknown outcome was undone")
    }

    @Test("qemu-ga froze fewer of the mountpoints asked for than asked (it skips those it does not find): the freeze is undone and COMMAND does not run")
    func qgaPartialFreezeListIsNoCheckpoint() throws {
        let dir = TempDir()
        let thawed = Seen()
        let peer = try HostileGuestTests.scriptedQGA(dir.file("qga.sock"), freezeAnswer: "1", thawed: thawed)
        defer { peer.stop() }
        let marker = dir.file("ran")
        let r = try Ctl.run(["--agent", "qga:unix:\(dir.file("qga.sock"))", "checkpoint", "--mount", "/srv/a", "--mount", "/srv/b", "--", "touch", marker], in: dir)
        // Before: "filesystem-consistent", exit 0, with /srv/b never frozen.
        #expect(r.status == ExitCodes.freezeFailed, "\(r.stderr)")
        #expect(r.stderr.contains("qemu-ga froze 1 filesystem of the 2 asked for"), "\(r.stderr)")
        #expect(!FileManager.default.fileExists(atPath: marker))
        #expect(thawed.happened)
    }

    /// Before: the second signal dropped the connection and undid nothing, as for quiesced,
    /// whose bound freeze ends with the connection; qemu-ga's does not, and the run exited 73
    /// without a word of it (trial E, B1).
    @Test("two SIGTERMs while qemu-ga is still inside a slow freeze: quiescectl stops at once, but writes the thaw first, which qemu-ga carries out when its freeze returns; exit 72, MAY BE FROZEN")
    func secondSignalStillThawsQGA() throws {
        let dir = TempDir()
        let sock = dir.file("q.sock")
        let qga = try SlowQGA(sock, freezeMs: 4000)
        defer { qga.peer.stop() }
        let ctl = try Ctl(["--agent", "qga:unix:\(sock)", "checkpoint", "--", "true"], in: dir)
        #expect(eventually(withinMs: 5000) { ctl.stderrSoFar.contains("connected") })
        usleep(300_000)
        ctl.signal(SIGTERM)
        usleep(300_000)
        ctl.signal(SIGTERM)
        let r = try #require(ctl.wait(timeoutMs: 3000), "quiescectl stopped at once after the second signal")
        #expect(r.status == ExitCodes.thawFailed, "\(r.stderr)")
        #expect(r.stderr.contains("MAY BE FROZEN") && r.stderr.contains("a thaw was written without waiting"), "\(r.stderr)")
        #expect(eventually(withinMs: 10_000) { qga.thawedAfterFreeze && !qga.frozen }, "the written thaw was carried out after the freeze returned")
    }

    /// Before: after the second signal the undo still waited out its reply timeout (trial F).
    @Test("a second signal while the undo of a late qemu-ga freeze waits for its answer stops quiescectl at once; the thaw is written, exit 72")
    func secondSignalDuringUndo() throws {
        let dir = TempDir()
        let sock = dir.file("q.sock")
        let qga = try SlowQGA(sock, freezeMs: 12_000)
        defer { qga.peer.stop() }
        // The freeze's answer is waited for 5 s, then the undo's for 5 s more.
        let ctl = try Ctl(["--agent", "qga:unix:\(sock)", "--reply-timeout", "5s", "checkpoint", "--timeout", "2s", "--", "true"], in: dir)
        let start = monotonicNanos()
        usleep(6_500_000)
        ctl.signal(SIGTERM)
        usleep(300_000)
        ctl.signal(SIGTERM)
        let r = try #require(ctl.wait(timeoutMs: 20_000))
        let seconds = Double(monotonicNanos() - start) / 1e9
        #expect(seconds < 9, "stopped at once after the second signal, not at the undo's 10 s (took \(seconds) s)")
        #expect(r.status == ExitCodes.thawFailed, "\(r.stderr)")
        #expect(r.stderr.contains("stopped waiting on a second signal") && r.stderr.contains("MAY BE FROZEN"), "\(r.stderr)")
        #expect(eventually(withinMs: 15_000) { qga.thawedAfterFreeze && !qga.frozen }, "thawed when its freeze returned")
    }

    /// Before: a second signal while the undo's connect waited for room in a full backlog
    /// (qemu-ga listens with a backlog of 1) waited out that connect, up to the reply timeout (trial G).
    @Test("a second signal while the undo's connect waits for room in qemu-ga's full backlog stops quiescectl at once, exit 72")
    func secondSignalDuringUndoConnect() throws {
        let dir = TempDir()
        let sock = dir.file("q.sock")
        // Backlog 0: one waiting connection fills it.
        let qga = try SlowQGA(sock, freezeMs: 12_000, backlog: 0)
        defer { qga.peer.stop() }
        let ctl = try Ctl(["--agent", "qga:unix:\(sock)", "--reply-timeout", "5s", "checkpoint", "--timeout", "2s", "--", "true"], in: dir)
        let start = monotonicNanos()
        #expect(eventually(withinMs: 5_000) { qga.begun }, "the freeze was asked for")
        // Another client waits to be served behind the freeze and fills the backlog.
        let other = try Socket.connectUnix(path: sock, timeoutMs: 1000)
        defer { FD.close(other) }
        let probe = try? Socket.connectUnix(path: sock, timeoutMs: 100)
        if let probe { FD.close(probe) }
        let full = probe == nil
        #expect(full, "the backlog is full")
        // The freeze's reply is waited for 5 s; then the undo's connect waits up to 5 s for room.
        usleep(6_500_000)
        ctl.signal(SIGTERM)
        usleep(300_000)
        ctl.signal(SIGTERM)
        let r = try #require(ctl.wait(timeoutMs: 20_000))
        let seconds = Double(monotonicNanos() - start) / 1e9
        #expect(seconds < 9, "stopped at once after the second signal, not at the undo's connect timeout (took \(seconds) s)")
        #expect(r.status == ExitCodes.thawFailed, "\(r.stderr)")
        #expect(r.stderr.contains("stopped waiting on a second signal") && r.stderr.contains("MAY BE FROZEN"), "\(r.stderr)")
    }

    @Test("one mountpoint named three ways (again, with a trailing slash, with a doubled slash) is asked for once: qemu-ga's count of 1 is the whole freeze, not a short one")
    func repeatedMountIsAskedForOnce() throws {
        let dir = TempDir()
        let thawed = Seen()
        let peer = try HostileGuestTests.scriptedQGA(dir.file("qga.sock"), freezeAnswer: "1", thawAnswer: "1", thawed: thawed)
        defer { peer.stop() }
        let marker = dir.file("ran")
        let r = try Ctl.run(["--agent", "qga:unix:\(dir.file("qga.sock"))", "checkpoint", "--mount", "/srv/a", "--mount", "/srv/a/",
                             "--mount", "//srv//a", "--", "sh", "-c", "echo \"$QUIESCE_FROZEN\" > '\(marker)'"], in: dir)
        // Before: "qemu-ga froze 1 filesystem of the 3 asked for", exit 70.
        #expect(r.status == 0, "\(r.stderr)")
        #expect((try? String(contentsOfFile: marker, encoding: .utf8)) == "qga:unix:\(dir.file("qga.sock"))=/srv/a\n")
        #expect(thawed.happened)
    }

    @Test("a qemu-ga thaw that thawed more filesystems than the checkpoint froze (another tool's freeze): the checkpoint holds, and the run warns that a freeze not its own was ended")
    func qgaThawOfOthersFreezeIsTold() throws {
        let dir = TempDir()
        let thawed = Seen()
        let peer = try HostileGuestTests.scriptedQGA(dir.file("qga.sock"), freezeAnswer: "1", thawAnswer: "3", thawed: thawed)
        defer { peer.stop() }
        let r = try Ctl.run(["--agent", "qga:unix:\(dir.file("qga.sock"))", "checkpoint", "--mount", "/srv/a", "--", "true"], in: dir)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stderr.contains("qemu-ga's thaw thawed 3 filesystems, 2 more than the 1 this checkpoint froze"), "\(r.stderr)")
        // qemu-ga itself (no `quiesce` member in guest-info): no deadline, and the run says so.
        #expect(r.stderr.contains("connected: qemu-ga 7.2.0, qemu-ga's protocol") && r.stderr.contains("qemu-ga has no deadline"), "\(r.stderr)")
        let info = try Ctl.run(["--agent", "qga:unix:\(dir.file("qga.sock"))", "info"], in: dir)
        #expect(info.stdout.contains("max freeze: none: qemu-ga has no deadline"), "\(info.stdout)")
    }

    @Test("a qemu-ga thaw answer that is not a plausible count is an unconfirmed thaw (72), and costs the host no memory per count")
    func qgaThawAnswerMustBeACount() throws {
        let dir = TempDir()
        let thawed = Seen()
        let peer = try HostileGuestTests.scriptedQGA(dir.file("qga.sock"), freezeAnswer: "1", thawAnswer: "1000000000", status: "frozen", thawed: thawed)
        defer { peer.stop() }
        // Before: one made-up filesystem report per count: 10^9 took 22 GB and the OOM killer.
        let r = try Ctl.run(["--agent", "qga:unix:\(dir.file("qga.sock"))", "thaw"], in: dir)
        #expect(r.status == ExitCodes.thawFailed, "\(r.stderr)")
        #expect(r.stderr.contains("not a count of thawed filesystems"), "\(r.stderr)")
    }

    @Test("what a guest sends cannot drive the host's terminal: escapes, newlines and bidi overrides in mountpoints and errors are shown as \\u escapes, and a long error is cut")
    func guestTextCannotDriveTheTerminal() throws {
        let dir = TempDir()
        let forged = "/fake\n[ 9.9 ms] checkpoint succeeded: application-consistent\u{1b}]0;owned\u{07}\u{202e}"
        let agent = try FakeAgent(in: dir, .init(mounts: [forged]))
        let r = try Ctl.run(["--agent", "unix:\(dir.file("fake.sock"))", "checkpoint", "--", "true"], in: dir)
        #expect(r.status == 0, "\(r.stderr)")
        let text = r.stdout + r.stderr
        #expect(!text.unicodeScalars.contains { $0.value == 0x1B || $0.value == 0x07 || $0.value == 0x202E }, "raw control characters reached the terminal")
        #expect(!text.split(separator: "\n").contains { $0.hasPrefix("[ 9.9 ms]") }, "a forged line of the timeline: \(text)")
        _ = agent
        #expect(text.contains("/fake\\u000a[ 9.9 ms]") && text.contains("\\u001b]0;owned\\u0007\\u202e"), "\(text)")

        let long = String(repeating: "x", count: 3200)
        let refusing = try FakeAgent(in: dir, name: "refusing", .init(freezeError: ProtocolError(.freezeFailed, "\u{1b}[2J" + long)))
        let f = try Ctl.run(["--agent", "unix:\(dir.file("refusing.sock"))", "checkpoint", "--", "true"], in: dir)
        #expect(f.status == ExitCodes.freezeFailed)
        #expect(!f.stderr.contains("\u{1b}") && f.stderr.contains("\\u001b[2J"), "\(f.stderr.prefix(200))")
        #expect(!f.stderr.contains(long) && f.stderr.contains(" characters; --json has the agent's whole message)"), "\(f.stderr.prefix(300))")
        let j = try Ctl.run(["--agent", "unix:\(dir.file("refusing.sock"))", "--json", "checkpoint", "--", "true"], in: dir)
        #expect(j.json != nil, "the JSON document stays valid")
        #expect(j.stdout.contains(long), "--json keeps the agent's whole message")
        _ = refusing
    }

    @Test("durations, times and totals near Int64.max from a guest (the wire allows them) are printed, not a crash: checkpoint, freeze, status and thaw, text and --json")
    func extremeNumbersAreNoCrash() throws {
        let dir = TempDir()
        let agent = try FakeAgent(in: dir, .init(hooks: [HookReport(name: "10-db", phase: .freeze, exitCode: 0, durationUs: 5, outcome: .ok)],
                                                 mounts: ["/fake/data"], extremeNumbers: true))
        let address = ["--agent", "unix:\(dir.file("fake.sock"))"]
        // Before: Swift's overflow trap (SIGILL, exit 132) where the report formats them, with
        // every other guest of the group left frozen behind it.
        for args in [["checkpoint", "--", "true"], ["--json", "checkpoint", "--", "true"], ["freeze"], ["status"], ["thaw"], ["--json", "status"], ["info"]] {
            let r = try Ctl.run(address + args, in: dir)
            #expect(r.status != 132 && r.status < 128, "\(args): exit \(r.status) \(r.stderr.prefix(300))")
            #expect(!r.stderr.contains("Fatal error") && !r.stderr.contains("overflow"), "\(args): \(r.stderr.prefix(300))")
        }
        #expect(!agent.frozen)
    }

    @Test("a guest with mountpoint lists too long for one environment variable cannot deny COMMAND: the variables are cut to 32 KiB and QUIESCE_TRUNCATED names them")
    func longListsAreCutForCommand() throws {
        let dir = TempDir()
        let mounts = (0..<400).map { "/srv/" + String(repeating: "m", count: 500) + "\($0)" }
        let agent = try FakeAgent(in: dir, .init(mounts: mounts))
        let out = dir.file("env")
        // Before: QUIESCE_FROZEN of 200 KB passed Linux's 128 KiB per variable: E2BIG, exit 71.
        let r = try Ctl.run(["--agent", "unix:\(dir.file("fake.sock"))", "checkpoint", "--", "sh", "-c",
                             "printf '%s\\n%s\\n' \"$QUIESCE_TRUNCATED\" \"${#QUIESCE_FROZEN}\" > '\(out)'"], in: dir)
        #expect(r.status == 0, "\(r.stderr.prefix(400))")
        let lines = (contents(out) ?? "").split(separator: "\n")
        #expect(lines.first == "QUIESCE_FROZEN,QUIESCE_FROZEN_JSON", "\(lines)")
        #expect(lines.count == 2 && (Int(lines[1]) ?? .max) <= 32 << 10, "\(lines)")
        _ = agent
    }

    @Test("when the undo fails too, quiescectl says the guest may be frozen until its deadline and prints the thaw command")
    func unreadableFreezeReplyAndFailedUndo() throws {
        let dir = TempDir()
        let agent = try FakeAgent(in: dir, .init(thawError: ProtocolError(.internal, "thaw broke"), freezeAbuse: .oversized(2 << 20)))
        let address = "unix:\(dir.file("fake.sock"))"
        let r = try Ctl.run(["--agent", address, "freeze", "--op-id", "hostile-2", "--timeout", "60s"], in: dir)
        #expect(r.status == ExitCodes.freezeFailed)
        #expect(r.stderr.contains("MAY BE FROZEN for up to 1 min"), "\(r.stderr)")
        #expect(r.stderr.contains("quiescectl --agent \(address) thaw --op-id hostile-2"), "\(r.stderr)")
        #expect(agent.frozen)
    }

    @Test("a thaw whose reply cannot be read but which status confirms exits 0 and says how it was confirmed")
    func unreadableThawReplyConfirmedByStatus() throws {
        let dir = TempDir()
        let agent = try FakeAgent(in: dir, .init(thawAbuse: .oversized(2 << 20)))
        let address = "unix:\(dir.file("fake.sock"))"
        let frozen = try Ctl.run(["--agent", address, "freeze"], in: dir)
        #expect(frozen.status == 0 && agent.frozen, "\(frozen.stderr)")
        let r = try Ctl.run(["--agent", address, "thaw"], in: dir)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("status confirms nothing is frozen"), "\(r.stdout)")
        #expect(!agent.frozen)
    }

    /// Before: a checkpoint whose thaw reply could not be read, confirmed thawed by status,
    /// said "consistent" without the thaw's report, which alone tells of a filesystem that
    /// something else thawed while COMMAND ran (trial I).
    @Test("a checkpoint whose thaw reply cannot be read: thawed (confirmed by status), but not vouched for (70, crash-consistent)")
    func unreadableThawReplyIsNotVouchedFor() throws {
        let dir = TempDir()
        let agent = try FakeAgent(in: dir, .init(thawAbuse: .oversized(2 << 20)))
        let r = try Ctl.run(["--agent", "unix:\(dir.file("fake.sock"))", "--json", "checkpoint", "--", "true"], in: dir)
        #expect(r.status == ExitCodes.freezeFailed, "\(r.stderr)")
        let lost = r.json?["agents"]?.arrayValue?.first?["freeze_lost"]?.stringValue ?? ""
        #expect(lost.contains("not shown to have held until the thaw") && lost.contains("status confirms"), "\(r.stdout.prefix(1500))")
        #expect(r.json?["consistency"] == "crash", "\(r.stdout.prefix(600))")
        #expect(!agent.frozen)
    }

    // MARK: Thousands of bind mounts on a real agent

    /// 2500 bind mounts of one ext4 filesystem at ~1100-byte paths and 1200 tmpfs mounts, made
    /// in a private mount namespace that only the agent lives in (it vanishes with the agent).
    /// Unfitted, the freeze reply would hold 2500 items and about 2.8 MB: past the 1024-item
    /// limit and the 1 MiB frame limit of the host.
    @Test("2500 bind mounts and 1200 tmpfs at long paths: freeze exits 0 with the counts, status and thaw exit 0, nothing stays frozen",
          .enabled(if: canUseLoopDevices, "needs root and loop devices"))
    func thousandsOfBindMounts() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let binds = 2500, tmpfs = 1200
            let bindBase = deepDirectory("\(lab.root)/j", length: 1090)
            let tmpBase = deepDirectory("\(lab.root)/t", length: 1090)
            let setup = """
                set -e
                i=0; while [ $i -lt \(binds) ]; do mkdir -p "$B/b$i"; mount --bind "$A" "$B/b$i"; i=$((i+1)); done
                i=0; while [ $i -lt \(tmpfs) ]; do mkdir -p "$T/t$i"; mount -t tmpfs -o size=64k tmpfs "$T/t$i"; i=$((i+1)); done
                exec "$@"
                """
            let start = monotonicNanos()
            let agent = try AgentProcess(
                in: lab.root, arguments: ["--include", "\(lab.root)/*"],
                environment: ["A": a, "B": bindBase, "T": tmpBase, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"],
                launcher: ["/usr/bin/unshare", "-m", "--propagation", "private", "/bin/sh", "-c", setup, "sh"],
                startTimeoutMs: 300_000)
            defer { agent.stop() }
            print("bind-mount lab: \(binds) binds + \(tmpfs) tmpfs mounted in \(TimeSpan.human(nanoseconds: monotonicNanos() - start))")
            let dir = TempDir()
            let ctl = ["--agent", "unix:\(agent.socketPath)"]

            let plan = try Ctl.run(ctl + ["--json", "filesystems"], in: dir, timeoutMs: 60_000)
            #expect(plan.status == 0, "\(plan.stderr)")
            let planned = try #require(plan.json?["agents"]?.arrayValue?.first?["result"])
            #expect(planned["filesystems"]?.arrayValue?.first?["mounts_total"] == .int(Int64(binds)), "\(plan.stdout.prefix(400))")
            #expect(planned["skipped_total"] == .int(Int64(tmpfs)))
            #expect(planned["truncated"] == true)
            #expect(plan.stdout.utf8.count < 1 << 20)

            let t0 = monotonicNanos()
            let frozen = try Ctl.run(ctl + ["freeze", "--timeout", "120s"], in: dir, timeoutMs: 60_000)
            print("freeze of \(binds + 1) mounts: \(TimeSpan.human(nanoseconds: monotonicNanos() - t0)), exit \(frozen.status): \(frozen.stdout.split(separator: "\n").first ?? "")")
            #expect(frozen.status == 0, "\(frozen.stderr)")
            #expect(frozen.stdout.contains("frozen 1 filesystem"), "\(frozen.stdout.prefix(400))")
            #expect(frozen.stdout.contains("\(binds + 1) mountpoints with bind mounts"), "\(frozen.stdout.prefix(400))")
            #expect(frozen.stdout.contains("\(tmpfs) skipped"))
            #expect(try isFrozen(a))

            let status = try Ctl.run(ctl + ["status"], in: dir)
            #expect(status.status == 0 && status.stdout.contains("state: frozen"), "\(status.stdout)\(status.stderr)")

            let thawed = try Ctl.run(ctl + ["thaw"], in: dir, timeoutMs: 60_000)
            #expect(thawed.status == 0, "\(thawed.stderr)")
            #expect(thawed.stdout.contains("thawed 1 filesystem"), "\(thawed.stdout)")
            #expect(try !isFrozen(a))
        }
    }

    // MARK: One hostile agent in a group of real ones

    /// Two real agents on their own loop filesystems, and one in-test agent that takes the freeze
    /// but never gets its reply out (it trickles a 1 MiB reply a byte every 10 ms, or says
    /// nothing). The real guests may wait --freeze-wait (1 s) for it, no longer.
    @Test("one agent that trickles or withholds its freeze reply cannot keep the other guests frozen past --freeze-wait",
          .enabled(if: canUseLoopDevices, "needs root and loop devices"),
          arguments: ["trickle", "silent"])
    func hostileAgentInGroup(_ kind: String) async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a"), b = try lab.filesystem("b")
            let agentA = try AgentProcess(in: lab.root, name: "agentA", arguments: ["--include", a])
            let agentB = try AgentProcess(in: lab.root, name: "agentB", arguments: ["--include", b])
            defer { agentA.stop(); agentB.stop() }
            let dir = TempDir()
            let behavior: FakeAgent.Behavior = kind == "trickle"
                ? .init(freezeAbuse: .trickle(intervalMs: 10)) : .init(silentOn: .freeze)
            let hostile = try FakeAgent(in: dir, name: "hostile", behavior)
            let agents = ["--agent", "unix:\(agentA.socketPath)", "--agent", "unix:\(dir.file("hostile.sock"))",
                          "--agent", "unix:\(agentB.socketPath)"]
            let marker = dir.file("ran")

            // Policy fail: COMMAND does not run, the real guests are thawed after at most the wait.
            let start = monotonicNanos()
            let r = try Ctl.run(agents + ["--json", "checkpoint", "--freeze-wait", "1s", "--timeout", "60s",
                                          "--", "touch", marker], in: dir, timeoutMs: 30_000)
            let elapsed = monotonicNanos() - start
            #expect(r.status == ExitCodes.freezeFailed, "\(r.stderr)")
            #expect(!FileManager.default.fileExists(atPath: marker))
            let report = try #require(r.json?["agents"]?.arrayValue)
            for i in [0, 2] {
                let frozenUs = try #require(report[i]["thaw"]?["frozen_us"]?.intValue, "\(report[i])")
                print("\(kind): real agent \(i) frozen for \(frozenUs / 1000) ms (freeze-wait 1 s)")
                #expect(frozenUs < 2_500_000, "a real guest stayed frozen \(frozenUs) us")
            }
            #expect(report[1]["error"]?["message"]?.stringValue?.contains("did not freeze within 1 s") == true, "\(report[1])")
            #expect(elapsed < 10_000_000_000, "the checkpoint took \(elapsed / 1_000_000) ms")
            #expect(try !isFrozen(a) && !isFrozen(b))
            #expect(eventually(withinMs: 3000) { !hostile.frozen }, "the dropped connection thaws the hostile agent's bound freeze")

            // Crash-consistent: COMMAND runs for the real guests, which are frozen for the wait
            // plus COMMAND, not for the hostile agent's 60 s reply timeout.
            let ck = try Ctl.run(agents + ["--json", "checkpoint", "--freeze-wait", "1s", "--timeout", "60s",
                                           "--on-agent-failure", "crash-consistent", "--",
                                           "sh", "-c", "fsfreeze -f '\(a)' 2>/dev/null || fsfreeze -f '\(b)' 2>/dev/null || touch '\(marker)'"],
                                 in: dir, timeoutMs: 30_000)
            #expect(ck.status == 0, "\(ck.stderr)")
            #expect(FileManager.default.fileExists(atPath: marker), "COMMAND ran while both real guests were frozen")
            #expect(ck.json?["consistency"] == "crash" && ck.json?["crash_consistent_agents"]?.arrayValue?.count == 1)
            let frozenA = try #require(ck.json?["agents"]?.arrayValue?.first?["thaw"]?["frozen_us"]?.intValue)
            #expect(frozenA < 3_000_000, "frozen \(frozenA) us")
            #expect(try !isFrozen(a) && !isFrozen(b))
        }
    }
}
