// quiescectl over Firecracker / Cloud Hypervisor hybrid vsock, to a real quiesced.
//
// Firecracker and Cloud Hypervisor are not available here. The VMM's part is played by a small
// relay: it listens on the VM's Unix socket, answers "CONNECT <port>\n" with "OK <hostport>\n"
// as the VMMs do, then relays bytes to a real quiesced's Unix socket, as the VMM relays them
// to the guest's vsock port. Everything on either side of it is the real thing.
import Foundation
import QuiesceLinux
import QuiesceProtocol
import QuiesceTestSupport
import Testing

/// Plays the VMM's hybrid vsock endpoint in front of an agent's Unix socket.
final class HybridVsockRelay: @unchecked Sendable {
    let path: String
    let listener: Int32
    let guestPort: UInt32
    let agentSocket: String
    private(set) var refused = 0

    init(path: String, guestPort: UInt32, agentSocket: String) throws {
        self.path = path
        self.guestPort = guestPort
        self.agentSocket = agentSocket
        listener = try Socket.listenUnix(path: path, mode: 0o600)
        Thread.detachNewThread { [self] in
            while let (fd, _) = try? Socket.accept(listener) {
                Thread.detachNewThread { self.serve(fd) }
            }
        }
    }

    deinit { Socket.shutdown(listener); FD.close(listener) }

    private func serve(_ client: Int32) {
        defer { FD.close(client) }
        // The handshake line, byte by byte so nothing after it is swallowed.
        var line: [UInt8] = []
        var byte = [UInt8](repeating: 0, count: 1)
        while line.count < 64 {
            guard let n = try? byte.withUnsafeMutableBytes({ try FD.read(client, into: $0) }), n == 1 else { return }
            if byte[0] == 0x0A { break }
            line.append(byte[0])
        }
        // Like the VMMs: nothing listening on that guest port closes the connection.
        guard String(decoding: line, as: UTF8.self) == "CONNECT \(guestPort)",
              let agent = try? Socket.connectUnix(path: agentSocket, timeoutMs: 2000) else {
            refused += 1
            return
        }
        defer { FD.close(agent) }
        try? FD.writeAll(client, Array("OK 1073741824\n".utf8))
        let done = DispatchSemaphore(value: 0)
        for (from, to) in [(client, agent), (agent, client)] {
            Thread.detachNewThread {
                var buf = [UInt8](repeating: 0, count: 65536)
                while let n = try? buf.withUnsafeMutableBytes({ try FD.read(from, into: $0) }), n > 0 {
                    if (try? FD.writeAll(to, Array(buf[0..<n]), timeoutMs: 5000)) == nil { break }
                }
                Socket.shutdown(to)
                done.signal()
            }
        }
        done.wait()
        done.wait()
    }
}

/// A lab with one ext4 and a real agent serving it, reached through a VMM relay on guest port 5123.
private func withRelayedGuest(_ body: (String, AgentProcess, HybridVsockRelay, TempDir) throws -> Void) async throws {
    try await LoopLab.with { lab in
        let mp = try lab.filesystem("a")
        let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
        defer { agent.stop() }
        let relay = try HybridVsockRelay(path: "\(lab.root)/vm.vsock", guestPort: 5123, agentSocket: agent.socketPath)
        try body(mp, agent, relay, TempDir())
    }
}

@Suite("Hybrid vsock to a real agent (VMM played by an in-test relay)",
       .enabled(if: canUseLoopDevices, "needs root and loop devices"))
struct HybridVsockIntegrationTests {
    @Test("checkpoint over hvsock: COMMAND runs while the guest is frozen, thawed after; a wrong port is refused")
    func checkpointOverHybridVsock() async throws {
        try await withRelayedGuest { mp, agent, relay, dir in
            let check = "fsfreeze -f '\(mp)' 2>/dev/null && { fsfreeze -u '\(mp)'; exit 1; }; exit 0"
            let r = try Ctl.run(["--agent", "hvsock:\(relay.path):5123", "--json", "checkpoint", "--", "sh", "-c", check], in: dir)
            #expect(r.status == 0, "\(r.stderr)")
            #expect(r.json?["consistency"] == "filesystem")
            #expect(try !isFrozen(mp))

            let wrong = try Ctl.run(["--agent", "hvsock:\(relay.path):9999", "ping"], in: dir)
            #expect(wrong.status == 69, "nothing listens on guest port 9999: \(wrong.stderr)")
            #expect(relay.refused >= 1)
        }
    }

    @Test("a bound freeze over hvsock thaws when quiescectl is killed")
    func killedCoordinatorOverHybridVsock() async throws {
        try await withRelayedGuest { mp, agent, relay, dir in
            // COMMAND waits while its parent (quiescectl) lives, so it ends by itself after the kill.
            let ctl = try Ctl(["--agent", "hvsock:\(relay.path):5123", "checkpoint", "--timeout", "60s", "--",
                               "sh", "-c", "while kill -0 $PPID 2>/dev/null; do sleep 0.1; done"], in: dir)
            // Watch through the agent's status: probing with fsfreeze while the agent is freezing
            // would race its FIFREEZE. The independent probe runs once the state has settled.
            let watcher = try TestClient(path: agent.socketPath)
            #expect(eventually(withinMs: 10_000) { (try? watcher.result(["op": "status"]))?["state"] == "frozen" },
                    "frozen while COMMAND runs: \(ctl.stderrSoFar)")
            #expect(try isFrozen(mp))
            ctl.signal(SIGKILL)
            _ = ctl.wait(timeoutMs: 5000)
            #expect(eventually(withinMs: 5000) { (try? watcher.result(["op": "status"]))?["state"] == "thawed" })
            #expect(try watcher.result(["op": "status"])["last_auto_thaw"]?["reason"] == "disconnect",
                    "the relay closed the agent's side: the bound freeze thawed on disconnect")
            #expect(try !isFrozen(mp))
        }
    }
}
