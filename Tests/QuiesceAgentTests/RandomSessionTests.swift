// Seeded random sessions against a real agent on a lab: valid, mangled and hostile requests
// from several connections at once, with random hang-ups. Whatever the mix, every line the
// agent sends is a valid reply or event, no request meets an internal error, the agent keeps
// serving, and nothing stays frozen once the (short) maximum freeze has passed.
import Foundation
import QuiesceLinux
import QuiesceProtocol
import QuiesceTestSupport
import Testing

@Suite("Random hostile sessions", .enabled(if: canUseLoopDevices))
struct RandomSessionTests {
    @Test("random requests from many connections: well-formed replies, no internal error, nothing left frozen",
          arguments: [(UInt64(1), false), (2, false), (0xC0FFEE, false), (3, true), (0xBEEF, true)])
    func randomSessions(seed: UInt64, qga: Bool) async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let b = try lab.filesystem("b", type: "xfs")
            let tmp = try lab.mount("tmp", "-t tmpfs tmpfs")
            // Safety: every path a request names is in the lab; nothing else can be frozen.
            let paths = [a, b, b + "/", a + "//", tmp, "\(lab.root)/nowhere", lab.root, "", "relative"]
            // With `qga`, the sessions speak qemu-ga's dialect to a qga+unix: listener instead.
            let qgaPath = "\(lab.root)/qga.sock"
            let agent = try AgentProcess(in: lab.root, arguments: [
                "--include", "\(lab.root)/*", "--max-freeze", "2s", "--max-connections", "6", "--listen", "qga+unix:\(qgaPath)"])
            let target = qga ? qgaPath : agent.socketPath
            var rng = SplitMix64(state: seed)
            var clients: [TestClient] = []
            var sent = 0, replies = 0, freezes = 0, internalErrors: [String] = []

            func take(_ c: TestClient) throws -> Bool {
                if qga {
                    let (frames, closed) = try c.drainFrames()
                    for frame in frames {
                        guard case .object(let o) = try JSON.parse(frame), (o["return"] != nil) != (o["error"] != nil) else {
                            Issue.record("not a qemu-ga reply: \(String(decoding: frame, as: UTF8.self))")
                            continue
                        }
                        replies += 1
                        if o["error"]?["desc"]?.stringValue?.hasPrefix("internal") == true { internalErrors.append("\(o)") }
                        if let n = o["return"]?.intValue, n > 0, n < 100 { freezes += 1 }  // a freeze or thaw count
                    }
                    return closed
                }
                let (messages, closed) = try c.drain()
                for case .reply(let r) in messages {
                    replies += 1
                    switch r.outcome {
                    case .failure(let e) where e.code == .internal: internalErrors.append(e.message)
                    case .success(let o) where o["stall_us"] != nil: freezes += 1
                    default: break
                    }
                }
                return closed
            }

            let end = monotonicNanos() + 4_000_000_000
            while monotonicNanos() < end {
                if clients.isEmpty || (clients.count < 8 && rng.chance(0.08)) {
                    // Beyond --max-connections the agent answers busy and closes: that is fine.
                    if let c = try? TestClient(path: target) { clients.append(c) }
                    continue
                }
                let i = Int.random(in: 0..<clients.count, using: &rng)
                try? clients[i].sendRaw(qga ? Self.randomQGAFrame(&rng, paths: paths) : Self.randomFrame(&rng, paths: paths))
                sent += 1
                if rng.chance(0.03) {
                    _ = try take(clients[i])
                    clients.remove(at: i)  // hang up (deinit closes the socket)
                }
                var open: [TestClient] = []
                for c in clients where try !take(c) { open.append(c) }
                clients = open
                usleep(UInt32.random(in: 0..<3000, using: &rng))
            }
            clients.removeAll()

            #expect(internalErrors.isEmpty, "internal errors: \(internalErrors)")
            #expect(sent > 300 && replies > 100 && freezes > 3, "sent \(sent), answered \(replies), froze \(freezes) times")
            // Every freeze is capped at 2 s and bound freezes thaw on hang-up.
            try waitUntil(timeoutMs: 5000) { try !isFrozen(a) && !isFrozen(b) }
            let status = try TestClient(path: agent.socketPath).result(["op": "status"])
            #expect(status["state"] == "thawed")
            #expect(kill(agent.pid, 0) == 0, "the agent is still running")
            agent.stop()
        }
    }

    /// One line of qemu-ga's dialect: a random command with random (often wrong) arguments.
    static func randomQGAFrame(_ rng: inout SplitMix64, paths: [String]) -> [UInt8] {
        let names = QGA.CommandName.allCases.map(\.rawValue) + ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw", "guest-exec", "nope"]
        var o: JSONObject = ["execute": .string(names.randomElement(using: &rng)!)]
        if rng.chance(0.5) { o["id"] = .int(Int64.random(in: 0..<1000, using: &rng)) }
        var args: JSONObject = [:]
        if rng.chance(0.8) { args["id"] = rng.chance(0.9) ? .int(Int64.random(in: 0..<1_000_000, using: &rng)) : "x" }
        if rng.chance(0.5) {
            args["mountpoints"] = rng.chance(0.8)
                ? .array((0..<Int.random(in: 0...2, using: &rng)).map { _ in .string(paths.randomElement(using: &rng)!) })
                : .int(1)
        }
        if !args.keys.isEmpty || rng.chance(0.1) { o["arguments"] = rng.chance(0.95) ? .object(args) : .array([]) }
        var line = JSON.object(o).encoded()
        if rng.chance(0.05) { line = Array(line.prefix(Int.random(in: 0..<line.count, using: &rng))) }
        if rng.chance(0.05) { line = [0xFF] + line }
        return line + [0x0A]
    }

    /// One line: a request of a random op with random (often wrong) fields, sometimes mangled.
    static func randomFrame(_ rng: inout SplitMix64, paths: [String]) -> [UInt8] {
        let ops = ["hello", "ping", "status", "filesystems", "freeze", "freeze", "thaw", "sync", "keepalive", "extend", "nope"]
        var o: JSONObject = ["op": .string(ops.randomElement(using: &rng)!), "id": .int(Int64.random(in: 0..<100, using: &rng))]
        func some(_ values: [JSON]) -> JSON { values.randomElement(using: &rng)! }
        let mountLists: [JSON] = [
            .array([]), .array([.string(paths.randomElement(using: &rng)!)]),
            .array([.string(paths.randomElement(using: &rng)!), .string(paths.randomElement(using: &rng)!)]),
            .string(paths[0]), .int(3), .null,
        ]
        if rng.chance(0.5) { o["mounts"] = some(mountLists) }
        if rng.chance(0.6) { o["timeout_ms"] = some([.int(1), .int(40), .int(300), .int(1500), .int(-1), .int(1 << 40), .string("5"), .double(2.5)]) }
        if rng.chance(0.5) { o["mode"] = some([.string("bound"), .string("detached"), .string("both"), .int(1)]) }
        if rng.chance(0.4) { o["op_id"] = some([.string("a"), .string("b"), .string(""), .string(String(repeating: "x", count: 200)), .int(7)]) }
        if rng.chance(0.2) { o["version"] = some([.int(1), .int(0), .int(99), .string("1")]) }
        if rng.chance(0.1) { o["id"] = some([.null, .double(1.5), .array([]), .string(String(repeating: "i", count: 300))]) }
        var line = JSON.object(o).encoded()
        switch Double.random(in: 0..<1, using: &rng) {
        case ..<0.05: line = Array(line.prefix(Int.random(in: 0..<line.count, using: &rng)))   // cut short
        case ..<0.08: line = [0xFF] + line                                                      // resync byte
        case ..<0.10: line[Int.random(in: 0..<line.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
        case ..<0.11: line = [UInt8](repeating: 0x7B, count: 70_000)                            // oversized
        default: break
        }
        return line + [0x0A]
    }
}
