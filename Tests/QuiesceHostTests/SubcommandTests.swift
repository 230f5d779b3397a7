// ping, info, status, filesystems, freeze, thaw and sync through the quiescectl executable.
import Foundation
import QuiesceHost
import QuiesceProtocol
import Testing

@Suite("Subcommands with fake agents")
struct SubcommandTests {
    @Test("filesystems lists the freeze order with waves and what is skipped and why")
    func filesystems() throws {
        let dir = TempDir()
        let a = try FakeAgent(in: dir, .init(mounts: ["/srv/inner", "/srv"]))
        let r = try Ctl.run(["--agent", a.address.description, "filesystems"], in: dir)
        #expect(r.status == 0)
        let lines = r.stdout.split(separator: "\n").map(String.init)
        #expect(lines.first?.hasPrefix("freeze order (2 filesystems") == true)
        #expect(lines.contains { $0.contains("wave 0") && $0.contains("/srv/inner") })
        #expect(lines.contains { $0.contains("wave 1") && $0.contains("/srv ") })
        #expect(lines.contains { $0.contains("/proc") && $0.contains("pseudo") })
    }

    @Test("detached freeze, status and thaw, in text and JSON")
    func freezeStatusThaw() throws {
        let dir = TempDir()
        let a = try FakeAgent(in: dir)
        let addr = ["--agent", a.address.description]
        let f = try Ctl.run(addr + ["--json", "freeze", "--timeout", "5m", "--op-id", "manual-1"], in: dir)
        #expect(f.status == 0)
        #expect(f.json?["agents"]?.arrayValue?.first?["result"]?["op_id"] == "manual-1")
        #expect(f.json?["agents"]?.arrayValue?.first?["result"]?["mode"] == "detached")
        #expect(a.frozen, "a detached freeze outlives the command")
        let s = try Ctl.run(addr + ["status"], in: dir)
        #expect(s.stdout.contains("state: frozen, op manual-1"))
        let t = try Ctl.run(addr + ["thaw", "--op-id", "manual-1"], in: dir)
        #expect(t.status == 0)
        #expect(t.stdout.contains("thawed"))
        #expect(!a.frozen)
    }

    @Test("several agents: one section each; an error shows the agent's code and message")
    func severalAgentsAndErrors() throws {
        let dir = TempDir()
        let a = try FakeAgent(in: dir, name: "a")
        let b = try FakeAgent(in: dir, name: "b", .init(freezeError: ProtocolError(.ineligibleMount, "/boot is read-only")))
        let r = try Ctl.run(["--agent", a.address.description, "--agent", b.address.description, "freeze", "--mount", "/boot"], in: dir)
        #expect(r.status == ExitCodes.freezeFailed)
        #expect(r.stdout.contains("\(a.address):\n  frozen 2 filesystems"))
        #expect(r.stderr.contains("\(b.address): freeze refused: ineligible-mount: /boot is read-only"))
    }

    @Test("ping, info and sync")
    func pingInfoSync() throws {
        let dir = TempDir()
        let a = try FakeAgent(in: dir)
        let addr = ["--agent", a.address.description]
        #expect(try Ctl.run(addr + ["ping"], in: dir).stdout.hasPrefix("pong in "))
        let info = try Ctl.run(addr + ["--json", "info"], in: dir)
        #expect(info.json?["agents"]?.arrayValue?.first?["result"]?["agent"] == "fake-agent")
        #expect(try Ctl.run(addr + ["sync"], in: dir).stdout.hasPrefix("synced 0 filesystems"))
        #expect(a.log == ["hello", "ping", "hello", "hello", "sync"])
    }

    @Test("a thaw the agent refuses exits 72")
    func thawRefused() throws {
        let dir = TempDir()
        let a = try FakeAgent(in: dir, .init(thawError: ProtocolError(.thawFailed, "/srv: EIO")))
        let r = try Ctl.run(["--agent", a.address.description, "thaw"], in: dir)
        #expect(r.status == ExitCodes.thawFailed)
        #expect(r.stderr.contains("thaw-failed: /srv: EIO"))
    }
}
