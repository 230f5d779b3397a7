// Connecting and talking to agents over each transport, against in-test peers on real sockets.
import Foundation
@testable import QuiesceHost
@testable import QuiesceLinux
import QuiesceProtocol
import QuiesceTestSupport
import Testing

private let hello = HelloResult(version: 1, agent: "peer", agentVersion: "1.0", capabilities: ["keepalive"],
                                maxFrame: 65536, maxFreezeMs: 600_000)

/// Answers hello and status like an agent, for as long as the connection lasts.
private func answerRequests(_ c: PeerConnection) {
    while let r = c.readRequest() {
        switch r.operation {
        case .hello: c.send(Reply(id: r.id, result: hello.json))
        case .status: c.send(Reply(id: r.id, result: StatusResult(state: .thawed).json))
        default: c.send(Reply(id: r.id, error: ProtocolError(.unknownOp, "not in this test")))
        }
    }
}

// Firecracker and Cloud Hypervisor are not available on this machine: these peers play the
// VMM's part of hybrid vsock (a Unix socket, "CONNECT <port>\n" answered by "OK <hostport>\n").
@Suite("Hybrid vsock (Firecracker / Cloud Hypervisor handshake)")
struct HybridVsockTests {
    @Test("CONNECT <port> is sent, OK <hostport> accepted, then the protocol runs on the stream")
    func handshakeThenProtocol() throws {
        let dir = TempDir()
        let seen = LockedBox<String?>(nil)
        let peer = try ScriptedPeer(path: dir.file("vm.sock")) { c in
            seen.set(c.readLine())
            // The OK line and an early event arrive in one write: the client must keep the extra bytes.
            c.send("OK 1073741824\n" + Event.thawed(opID: "old", reason: .deadline, atMs: 1, filesystems: []).json.text + "\n")
            answerRequests(c)
        }
        let client = try AgentClient.connect(.hybridVsock(path: peer.path, port: 5123), connectTimeoutMs: 2000, replyTimeoutMs: 2000)
        defer { client.close() }
        #expect(seen.get() == "CONNECT 5123")
        #expect(client.hello == hello)
        #expect(try client.status().state == .thawed)
        #expect(client.events.map(\.name) == ["thawed"], "bytes after the OK line belong to the protocol stream")
    }

    @Test("a VM that closes after CONNECT means no agent listens on that guest port")
    func closedAfterConnect() throws {
        let dir = TempDir()
        let peer = try ScriptedPeer(path: dir.file("vm.sock")) { c in _ = c.readLine() }
        #expect {
            _ = try AgentClient.connect(.hybridVsock(path: peer.path, port: 5123), connectTimeoutMs: 2000, replyTimeoutMs: 2000)
        } throws: { error in
            let e = error as! AgentError
            return e.code == .unreachable && e.message.contains("no agent listening on port 5123 in the guest behind \(peer.path)")
        }
    }

    @Test("an answer other than OK is a protocol error that quotes it")
    func wrongAnswer() throws {
        let dir = TempDir()
        let peer = try ScriptedPeer(path: dir.file("vm.sock")) { c in
            _ = c.readLine()
            c.send("HTTP/1.1 400 Bad Request\r\n\r\n")
        }
        #expect {
            _ = try AgentClient.connect(.hybridVsock(path: peer.path, port: 7), connectTimeoutMs: 2000, replyTimeoutMs: 2000)
        } throws: { error in
            let e = error as! AgentError
            return e.code == .protocolViolation && e.message.contains("HTTP/1.1 400 Bad Request") && e.message.contains("CONNECT 7")
        }
    }

    @Test("a VM that never answers CONNECT times out within the connect timeout")
    func silentVMM() throws {
        let dir = TempDir()
        let peer = try ScriptedPeer(path: dir.file("vm.sock")) { c in _ = c.readLine(); usleep(3_000_000) }
        let t0 = monotonicNanos()
        #expect {
            _ = try AgentClient.connect(.hybridVsock(path: peer.path, port: 9), connectTimeoutMs: 300, replyTimeoutMs: 2000)
        } throws: { error in
            let e = error as! AgentError
            return e.code == .timeout && e.message.contains("no answer to CONNECT within 300 ms")
        }
        #expect(monotonicNanos() - t0 < 2_000_000_000)
    }

    @Test("quiescectl info works through hybrid vsock")
    func cliThroughHybridVsock() throws {
        let dir = TempDir()
        let peer = try ScriptedPeer(path: dir.file("vm.sock")) { c in
            guard c.readLine() == "CONNECT 52" else { return }
            c.send("OK 99\n")
            answerRequests(c)
        }
        let r = try Ctl.run(["--agent", "hvsock:\(peer.path):52", "info"], in: dir)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("agent: peer 1.0"))
        #expect(r.stdout.contains("capabilities: keepalive"))
    }
}

@Suite("Serial (virtio-serial chardev) resynchronisation")
struct SerialResyncTests {
    @Test("stale garbage and a stale reply with another id are skipped until the reply to our hello")
    func skipsStaleBytes() throws {
        let dir = TempDir()
        let resets = LockedBox(0)
        let peer = try ScriptedPeer(path: dir.file("chardev.sock")) { c in
            // What an earlier client left in the pipe, there before we say anything.
            c.send("ult\":{\"state\":\"frozen\"}}\n")
            c.send(Reply(id: .string("qc-earlier-client-7"), result: StatusResult(state: .frozen, opID: "old").json))
            c.send([0x00, 0x01, 0x02, 0x0A])
            c.send("{\"id\":\"qc-earlier-client-8\",\"ok\":tr")
            guard let r = c.readRequest() else { return }
            resets.set(c.resets)
            guard case .hello = r.operation else { return }
            // The stale partial line is glued in front of the real reply: the client salvages it.
            c.send(Reply(id: r.id, result: hello.json))
            answerRequests(c)
        }
        let client = try AgentClient.connect(.serial(path: peer.path), connectTimeoutMs: 2000, replyTimeoutMs: 3000)
        defer { client.close() }
        #expect(resets.get() >= 1, "a 0xFF byte goes before hello to reset the agent's parser")
        #expect(client.hello == hello)
        #expect(client.discardedFrames >= 2)
        #expect(try client.status().state == .thawed, "requests after the resync get their own replies")
    }

    @Test("a hello lost in the agent's garbage is sent again with a new id")
    func resendsHello() throws {
        let dir = TempDir()
        let hellos = LockedBox(0)
        let peer = try ScriptedPeer(path: dir.file("chardev.sock")) { c in
            var first = true
            while let r = c.readRequest() {
                guard case .hello = r.operation else { continue }
                hellos.set(hellos.get() + 1)
                if first { first = false; continue }  // as if the first request had been garbled
                c.send(Reply(id: r.id, result: hello.json))
                answerRequests(c)
                return
            }
        }
        let client = try AgentClient.connect(.serial(path: peer.path), connectTimeoutMs: 2000, replyTimeoutMs: 5000)
        defer { client.close() }
        #expect(client.hello == hello)
        #expect(hellos.get() == 2)
    }

    @Test("quiescectl status over serial after stale bytes")
    func cliOverSerial() throws {
        let dir = TempDir()
        let peer = try ScriptedPeer(path: dir.file("chardev.sock")) { c in
            c.send(Reply(id: .string("stale"), result: StatusResult(state: .frozen, opID: "stale-op").json))
            answerRequests(c)
        }
        let r = try Ctl.run(["--agent", "serial:\(peer.path)", "status"], in: dir)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("state: thawed"))
    }
}

@Suite("Unreachable agents")
struct UnreachableTests {
    @Test("no socket file")
    func noSocketFile() {
        let dir = TempDir()
        let path = dir.file("missing.sock")
        #expect {
            _ = try AgentClient.connect(.unix(path: path), connectTimeoutMs: 1000, replyTimeoutMs: 1000)
        } throws: { error in
            let e = error as! AgentError
            return e.code == .unreachable && e.message == "no such socket: \(path)"
        }
    }

    @Test("a socket file nobody listens on")
    func socketWithoutListener() throws {
        let dir = TempDir()
        let path = dir.file("stale.sock")
        FD.close(try Socket.listenUnix(path: path))
        #expect {
            _ = try AgentClient.connect(.unix(path: path), connectTimeoutMs: 1000, replyTimeoutMs: 1000)
        } throws: { error in
            let e = error as! AgentError
            return e.code == .unreachable && e.message == "no agent listening on unix socket \(path) (connection refused)"
        }
    }

    @Test("a file that is not a socket")
    func notASocket() throws {
        let dir = TempDir()
        let path = dir.file("plain")
        _ = FileManager.default.createFile(atPath: path, contents: Data())
        #expect {
            _ = try AgentClient.connect(.serial(path: path), connectTimeoutMs: 1000, replyTimeoutMs: 1000)
        } throws: { error in
            (error as! AgentError).message == "not a socket: \(path)"
        }
    }

    @Test("a listener that never answers: the reply timeout says so")
    func silentListener() throws {
        let dir = TempDir()
        let peer = try ScriptedPeer(path: dir.file("silent.sock")) { c in while c.readRequest(timeoutMs: 5000) != nil {} }
        let t0 = monotonicNanos()
        #expect {
            _ = try AgentClient.connect(.unix(path: peer.path), connectTimeoutMs: 1000, replyTimeoutMs: 400)
        } throws: { error in
            let e = error as! AgentError
            return e.code == .timeout && e.message.hasPrefix("guest did not answer hello within 400 ms")
        }
        let elapsed = monotonicNanos() - t0
        #expect(elapsed >= 350_000_000 && elapsed < 3_000_000_000)
    }

    @Test("a peer that speaks something else is named, not waited for")
    func notTheProtocol() throws {
        let dir = TempDir()
        let peer = try ScriptedPeer(path: dir.file("ssh.sock")) { c in
            c.send("SSH-2.0-OpenSSH_9.2p1\r\n")
            _ = c.readRequest(timeoutMs: 3000)
        }
        #expect {
            _ = try AgentClient.connect(.unix(path: peer.path), connectTimeoutMs: 1000, replyTimeoutMs: 3000)
        } throws: { error in
            let e = error as! AgentError
            return e.code == .protocolViolation && e.message.contains("does not speak the quiesce protocol") && e.message.contains("SSH-2.0")
        }
    }

    @Test("an agent that floods events keeps only the last few in memory, and its reply still arrives")
    func eventFlood() throws {
        let dir = TempDir()
        let peer = try ScriptedPeer(path: dir.file("flood.sock")) { c in
            guard let r = c.readRequest() else { return }
            let thawed = Event.thawed(opID: "x", reason: .deadline, atMs: 0, filesystems: []).frame
            var burst: [UInt8] = []
            for _ in 0..<1000 { burst += thawed }
            for _ in 0..<50 { c.send(burst) }  // 50,000 events before the reply
            c.send(Reply(id: r.id, result: hello.json))
            _ = c.readRequest(timeoutMs: 3000)
        }
        let client = try AgentClient.connect(.unix(path: peer.path), connectTimeoutMs: 1000, replyTimeoutMs: 10_000)
        #expect(client.hello?.agent == "peer")
        #expect(client.events.count == AgentClient.maxKeptEvents)
        #expect(client.droppedEvents == 50_000 - AgentClient.maxKeptEvents)
    }

    @Test("an agent that sends an endless line is cut off at the frame limit, not buffered")
    func endlessLine() throws {
        let dir = TempDir()
        let peer = try ScriptedPeer(path: dir.file("endless.sock")) { c in
            guard c.readRequest() != nil else { return }
            let chunk = [UInt8](repeating: 0x61, count: 65536)
            for _ in 0..<64 { c.send(chunk) }  // 4 MiB and no newline
        }
        #expect {
            _ = try AgentClient.connect(.unix(path: peer.path), connectTimeoutMs: 1000, replyTimeoutMs: 5000)
        } throws: { error in
            let e = error as! AgentError
            return e.code == .protocolViolation && e.message.contains("frame larger than")
        }
    }

    @Test("an agent of another protocol version is refused")
    func otherVersion() throws {
        let dir = TempDir()
        let peer = try ScriptedPeer(path: dir.file("v2.sock")) { c in
            guard let r = c.readRequest() else { return }
            var h = hello
            h.version = 2
            c.send(Reply(id: r.id, result: h.json))
        }
        #expect {
            _ = try AgentClient.connect(.unix(path: peer.path), connectTimeoutMs: 1000, replyTimeoutMs: 1000)
        } throws: { error in
            let e = error as! AgentError
            return e.code == .incompatible && e.message.contains("speaks protocol version 2")
        }
    }

    // No test here connects to a vsock CID: on a machine that is itself a guest (like CI), the
    // kernel hands such connections to the machine's own hypervisor. The guard below prevents it.
    @Test("vsock is refused before connecting when no local transport serves the CID")
    func vsockWithoutTransport() throws {
        let none: (String) -> Bool = { _ in false }
        #expect(Connection.vsockRefusal(cid: 1, exists: none)?.contains("needs the vsock_loopback module") == true)
        #expect(Connection.vsockRefusal(cid: 42, exists: none)?.contains("no /dev/vhost-vsock") == true)
        #expect(Connection.vsockRefusal(cid: 1, exists: { $0 == "/sys/module/vsock_loopback" }) == nil)
        #expect(Connection.vsockRefusal(cid: 42, exists: { $0 == "/dev/vhost-vsock" }) == nil)
        guard !FileManager.default.fileExists(atPath: "/dev/vhost-vsock"), !FileManager.default.fileExists(atPath: "/sys/module/vhost_vsock") else { return }
        let r = try Ctl.run(["--agent", "vsock:42:5123", "ping"], in: TempDir())
        #expect(r.status == ExitCodes.agentUnreachable)
        #expect(r.stderr.contains("no guest is reachable by vsock from this machine"))
    }

    @Test("quiescectl reports each unreachable agent and exits 69", arguments: [false, true])
    func cliUnreachable(json: Bool) throws {
        let dir = TempDir()
        let missing = dir.file("missing.sock")
        let r = try Ctl.run(["--agent", "unix:\(missing)"] + (json ? ["--json"] : []) + ["ping"], in: dir)
        #expect(r.status == ExitCodes.agentUnreachable)
        if json {
            let doc = try #require(r.json)
            #expect(doc["ok"] == false)
            #expect(doc["agents"]?.arrayValue?.first?["error"]?["message"]?.stringValue == "no such socket: \(missing)")
        } else {
            #expect(r.stderr.contains("unix:\(missing): no such socket: \(missing)"))
        }
    }
}

/// A value shared with a peer thread.
final class LockedBox<T: Sendable>: @unchecked Sendable {
    private var value: T
    private let lock = NSLock()
    init(_ v: T) { value = v }
    func get() -> T { lock.withLock { value } }
    func set(_ v: T) { lock.withLock { value = v } }
    func withLock<R>(_ body: (inout T) -> R) -> R { lock.withLock { body(&value) } }
}

/// The `Umask:` line of a thread's /proc status ("0022"), for `/proc/thread-self` or "PID/task/TID".
private func umaskOf(_ thread: String) -> String? {
    let status = (try? String(contentsOfFile: "/proc/\(thread)/status", encoding: .utf8)) ?? ""
    return status.split(separator: "\n").first { $0.hasPrefix("Umask:") }.map { $0.dropFirst(6).trimmingCharacters(in: .whitespaces) }
}

@Suite("Unix listeners and the umask")
struct UnixListenerUmaskTests {
    /// Before: listenUnix narrowed the umask of the whole process around its bind, so a file
    /// another thread created meanwhile lost permission bits (a test's copied hook lost its x
    /// bit, and --check-config called it not executable).
    @Test("a Unix listener is created with its mode while the umask the process's other threads see stays as it was")
    func bindDoesNotNarrowOtherThreadsUmask() throws {
        let caller = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/thread-self")
        let before = try #require(umaskOf(caller))
        let seen = Socket.withThreadUmask(0o077) { (inside: umaskOf("thread-self"), caller: umaskOf(caller)) }
        #expect(seen.inside == "0077", "the bind's own thread has the narrow umask: \(seen)")
        #expect(seen.caller == before, "the other threads keep theirs: \(seen), before \(before)")
        #expect(umaskOf(caller) == before)

        let dir = TempDir()
        let fd = try Socket.listenUnix(path: dir.file("l.sock"), mode: 0o600)
        defer { FD.close(fd) }
        let st = try Stat.of(path: dir.file("l.sock"))
        #expect(st.permissions & 0o777 == 0o600, "mode \(String(st.permissions & 0o777, radix: 8))")
    }
}
