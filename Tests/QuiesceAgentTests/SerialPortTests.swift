// The serial transport, on a pty that plays the guest's virtio-serial port.
//
// Real virtio-serial needs a guest VM (the VM end-to-end test covers it). Here socat joins a
// pty (the "port" the agent opens) to a Unix socket (the "chardev" the host connects to), for
// one host session: when the host disconnects socat exits and the pty hangs up (POLLHUP, as a
// virtio port reports it). The next session gets a new pty behind the same path, which also
// exercises the agent's reopening of a replugged port. Not the virtio driver itself.
import Foundation
import QuiesceLinux
import QuiesceProtocol
import QuiesceTestSupport
import Testing

@Suite("serial:DEVICE, on a pty standing in for virtio-serial",
       .enabled(if: canUseLoopDevices && FileManager.default.isExecutableFile(atPath: "/usr/bin/socat")))
struct SerialPortTests {
    @Test("stale bytes before a 0xFF are dropped; a bound freeze thaws when the host hangs up")
    func serialSessions() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let port = "\(lab.root)/port", chardev = "\(lab.root)/chardev.sock"
            let first = try plugSerialPort(port, chardev: chardev)
            defer { first.terminate() }
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--listen", "serial:\(port)"])
            try waitUntil(timeoutMs: 3000) { agent.log.contains("serial port \(port) open") }

            // Session 1: garbage of an earlier client, then 0xFF and a fresh hello.
            let host = try TestClient(path: chardev)
            try host.sendRaw(Array("{\"id\":\"old\",\"op\":\"pi".utf8) + [0xFF])
            let h = try host.result(["op": "hello", "version": 1])
            #expect(h["agent"] == "quiesced")
            _ = try host.result(["op": "freeze", "mode": "bound", "timeout_ms": 60_000])
            #expect(try isFrozen(a))
            host.close()
            first.waitUntilExit()
            try waitUntil(timeoutMs: 3000) { try !isFrozen(a) }

            // Session 2, on a new pty behind the same path: the agent reopens it and serves.
            let second = try plugSerialPort(port, chardev: chardev)
            defer { second.terminate() }
            let again = try TestClient(path: chardev)
            try again.sendRaw([0xFF])
            let status = try again.result(["op": "status"], timeoutMs: 10_000)
            #expect(status["last_auto_thaw"]?["reason"] == "disconnect")
            again.close()
            agent.stop()
        }
    }

    @Test("a port that appears after the agent started, and one unplugged mid-session, are served when they (re)appear")
    func portAppearsLater() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let port = "\(lab.root)/port", chardev = "\(lab.root)/chardev.sock"
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--listen", "serial:\(port)"])
            try waitUntil(timeoutMs: 3000) { agent.log.contains("waiting for it") }
            #expect(try TestClient(path: agent.socketPath).result(["op": "ping"]) == [:], "the other listeners serve meanwhile")

            let first = try plugSerialPort(port, chardev: chardev)
            defer { first.terminate() }
            let host = try TestClient(path: chardev)
            try host.sendRaw([0xFF])
            _ = try host.result(["op": "freeze", "mode": "bound", "timeout_ms": 60_000], timeoutMs: 10_000)
            #expect(try isFrozen(a))
            // Hot-unplug: the port vanishes under the session (socat killed, the pty gone).
            kill(first.processIdentifier, SIGKILL)
            first.waitUntilExit()
            try waitUntil(timeoutMs: 5000) { try !isFrozen(a) }

            let second = try plugSerialPort(port, chardev: chardev)
            defer { second.terminate() }
            let again = try TestClient(path: chardev)
            try again.sendRaw([0xFF])
            let status = try again.result(["op": "status"], timeoutMs: 10_000)
            #expect(status["state"] == "thawed" && status["last_auto_thaw"]?["reason"] == "disconnect")
            again.close()
            agent.stop()
        }
    }
}
