// What a peer of a real quiesced sees: thawed events, op_id rules, a half-closed peer's cost, stderr logs.
import Foundation
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
}
