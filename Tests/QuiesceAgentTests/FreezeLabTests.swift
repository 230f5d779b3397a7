// The freeze engine through a real quiesced, on real loop filesystems this test creates.
import Foundation
import QuiesceProtocol
import QuiesceTestSupport
import Testing

@Suite("Freezing a lab of real filesystems", .enabled(if: canUseLoopDevices, "needs root and loop devices"))
struct FreezeLabTests {
    @Test("an include scope freezes exactly the lab's superblocks, once each, and thaw leaves none frozen")
    func scopeFreezesExactlyTheRightSuperblocks() async throws {
        try await LoopLab.with { lab in
            let e = try lab.filesystem("ext4", type: "ext4")
            let x = try lab.filesystem("xfs", type: "xfs")
            let b = try lab.filesystem("btrfs", type: "btrfs")
            try sh("btrfs subvolume create '\(b)/sub' >/dev/null")
            let loopOfB = try sh("findmnt -n -o SOURCE '\(b)'").trimmingCharacters(in: .whitespacesAndNewlines)
            let bsub = try lab.mount("btrfs-sub", "-o subvol=sub '\(loopOfB)'")
            try sh("mkdir -p '\(e)/dir'")
            let ebind = try lab.mount("ext4-bind", "--bind '\(e)/dir'")
            let ro = try lab.filesystem("readonly", type: "ext4", options: "ro")
            let tmp = try lab.mount("tmpfs", "-t tmpfs tmpfs")
            try lab.dirty(e, mb: 4)
            try lab.dirty(x, mb: 4)

            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
            let client = try TestClient(path: agent.socketPath)

            let plan = try client.result(["op": "filesystems"])
            #expect(Set(plan.mountPoints) == [e, x, b], "one entry per superblock: \(plan)")
            let planned = plan["filesystems"]!.arrayValue!
            let others = Dictionary(uniqueKeysWithValues: planned.map {
                ($0["mountpoint"]!.stringValue!, Set(($0["mounts"]?.arrayValue ?? []).compactMap(\.stringValue)))
            })
            #expect(others[b] == [bsub], "the btrfs subvolume mount shares the btrfs superblock")
            #expect(others[e] == [ebind], "the bind mount shares the ext4 superblock")
            let skipped = Dictionary(uniqueKeysWithValues: (plan["skipped"]?.arrayValue ?? []).map {
                ($0["mountpoint"]!.stringValue!, $0["reason"]!.stringValue!)
            })
            #expect(skipped[ro] == "read-only")
            #expect(skipped[tmp] == "pseudo")

            let frozen = try client.result(["op": "freeze", "mode": "detached", "timeout_ms": 60_000])
            #expect(Set(frozen.mountPoints) == [e, x, b])
            for mp in [e, x, b, bsub, ebind] { #expect(try isFrozen(mp), "\(mp) should be frozen") }
            #expect(try !isFrozen(ro))
            #expect(try !writeCompletes(e, withinMs: 300), "a writer blocks while frozen")
            #expect((frozen["stall_us"]?.intValue ?? -1) >= 0)
            let presyncTotal = frozen["presync_us"]?.intValue ?? -1
            for fs in frozen["filesystems"]!.arrayValue! {
                #expect(fs["freeze_us"]?.intValue != nil && fs["presync_us"]?.intValue != nil, "per-filesystem timings: \(fs)")
                // Each filesystem's syncfs time is real (4 MiB was dirty on e and x, so flushing
                // it takes time) and lies within the presync phase that contains it.
                let own = fs["presync_us"]?.intValue ?? -1
                if [e, x].contains(fs["mountpoint"]?.stringValue ?? "") {
                    #expect(own > 0, "syncfs of 4 MiB dirty data measured as no time: \(fs)")
                }
                #expect(own <= presyncTotal, "a filesystem's presync (\(own) us) exceeds the phase's (\(presyncTotal) us)")
            }

            let thawed = try client.result(["op": "thaw"])
            #expect(thawed["was_frozen"] == true)
            for mp in [e, x, b] { #expect(try !isFrozen(mp), "\(mp) should be thawed") }
            #expect(try writeCompletes(e, withinMs: 5000))
            agent.stop()
        }
    }

    @Test("presync = no: the freeze goes straight to FIFREEZE, which flushes the dirty data itself; the reply shows no presync")
    func withoutPresync() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let loop = try sh("findmnt -n -o SOURCE '\(a)'").trimmingCharacters(in: .whitespacesAndNewlines)
            func sectorsWritten() throws -> Int {
                let fields = try String(contentsOfFile: "/sys/block/\((loop as NSString).lastPathComponent)/stat", encoding: .utf8)
                    .split(separator: " ", omittingEmptySubsequences: true)
                return Int(fields[6]) ?? -1
            }
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--presync", "no"])
            defer { agent.stop() }
            let client = try TestClient(path: agent.socketPath)
            try lab.dirty(a, mb: 8)
            let before = try sectorsWritten()
            let frozen = try client.result(["op": "freeze", "mode": "detached", "timeout_ms": 60_000])
            let written = (try sectorsWritten() - before) * 512
            #expect(try isFrozen(a))
            #expect(frozen["presync_us"]?.intValue == 0, "\(frozen)")
            for fs in frozen["filesystems"]!.arrayValue! { #expect(fs["presync_us"] == nil, "no syncfs ran: \(fs)") }
            #expect(written >= 8 << 20, "the freeze wrote \(written) bytes of 8 MiB dirty: FIFREEZE must flush it")
            #expect(try client.result(["op": "thaw"])["was_frozen"] == true)
            #expect(try !isFrozen(a))
        }
    }

    @Test("a freeze whose own timeout_ms is too short for the flush says so, not that the storage is stuck; nothing stays frozen")
    func tooShortTimeoutSaysSo() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
            defer { agent.stop() }
            try lab.dirty(a, mb: 32)
            let r = try TestClient(path: agent.socketPath).call(["op": "freeze", "mode": "detached", "timeout_ms": 1])
            guard case .failure(let e) = r.outcome else { Issue.record("a 1 ms freeze of 32 MiB dirty succeeded: \(r)"); return }
            #expect(e.code == .freezeFailed)
            #expect(e.message.contains("the request's own timeout_ms") && !e.message.contains("storage is not completing"), "\(e.message)")
            try waitUntil(timeoutMs: 10_000) { try !isFrozen(a) }
        }
    }

    @Test("an explicit mount list freezes exactly those mounts; an unknown, ineligible or out-of-scope one freezes nothing")
    func explicitListFreezesExactlyThose() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let b = try lab.filesystem("b")
            let c = try lab.filesystem("c")
            let d = try lab.filesystem("d")
            let tmp = try lab.mount("tmp", "-t tmpfs tmpfs")
            // The guest's scope binds the host's explicit list: c is outside it, d excluded.
            let agent = try AgentProcess(in: lab.root, arguments: [
                "--include", "\(lab.root)/[abd]", "--include", "\(lab.root)/tmp", "--exclude", "\(lab.root)/d"])
            let client = try TestClient(path: agent.socketPath)

            let r = try client.result(["op": "freeze", "mounts": [.string(a), .string(b + "/")], "mode": "detached"])
            #expect(Set(r.mountPoints) == [a, b])
            #expect(try isFrozen(a) && isFrozen(b))
            #expect(try !isFrozen(c) && !isFrozen(d))
            _ = try client.result(["op": "thaw"])

            let cases: [(String, String, String?)] = [
                ("\(lab.root)/not-a-mount", "unknown-mount", nil), (tmp, "ineligible-mount", "pseudo"),
                (c, "ineligible-mount", "not-included"), (d, "ineligible-mount", "excluded"),
            ]
            for (bad, code, reason) in cases {
                for op in ["freeze", "filesystems", "sync"] {
                    let reply = try client.call(["op": .string(op), "mounts": [.string(a), .string(bad)]])
                    guard case .failure(let err) = reply.outcome else { Issue.record("\(op) \(bad) was accepted"); continue }
                    #expect(err.code.rawValue == code, "\(op) \(bad)")
                    #expect(err.details?["reason"]?.stringValue == reason, "\(op) \(bad)")
                }
                #expect(try !isFrozen(a) && !isFrozen(c) && !isFrozen(d), "nothing is frozen when one named mount is bad")
            }
            agent.stop()
        }
    }

    @Test("a loop-stacked filesystem freezes before its backing filesystem whatever the mount order, without deadlock")
    func loopStackNeverDeadlocks() async throws {
        try await LoopLab.with { lab in
            let back = try lab.filesystem("back", sizeMB: 256)
            let stacked = try lab.filesystem("stacked", sizeMB: 64, imageDir: back)
            // Make the backing filesystem's only mount entry come after the stacked one.
            let back2 = try lab.mount("back2", "--bind '\(back)'")
            try lab.lazyUnmount(back)
            let order = try sh("grep -n '\(lab.root)/' /proc/self/mountinfo | cut -d: -f1,2 | tr '\\n' ' '")
            let lines = try sh("cat /proc/self/mountinfo").split(separator: "\n")
            let iStacked = lines.firstIndex { $0.contains(" \(stacked) ") }!
            let iBack2 = lines.firstIndex { $0.contains(" \(back2) ") }!
            #expect(iStacked < iBack2, "mountinfo must list the stacked filesystem first: \(order)")
            try lab.dirty(stacked, mb: 8)
            try lab.dirty(back2, mb: 8)

            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
            let client = try TestClient(path: agent.socketPath)
            let plan = try client.result(["op": "filesystems"])
            #expect(plan.mountPoints == [stacked, back2], "stacked first, then what it rests on")
            let r = try client.result(["op": "freeze", "mode": "detached"], timeoutMs: 20_000)
            let waves = Dictionary(uniqueKeysWithValues: r["filesystems"]!.arrayValue!.map {
                ($0["mountpoint"]!.stringValue!, $0["wave"]!.intValue!)
            })
            #expect(waves[stacked]! < waves[back2]!)
            #expect(try isFrozen(stacked) && isFrozen(back2))
            let t = try client.result(["op": "thaw"], timeoutMs: 20_000)
            #expect(t.mountPoints == [back2, stacked], "thaw runs the waves backwards")
            #expect(try !isFrozen(stacked) && !isFrozen(back2))

            // Named explicitly, with untidy slashes, the stack must still be read and ordered.
            let untidy = stacked.replacingOccurrences(of: "/stacked", with: "//stacked/")
            let e = try client.result(["op": "freeze", "mode": "detached", "mounts": [.string(untidy), .string(back2)]], timeoutMs: 20_000)
            let explicitWaves = Dictionary(uniqueKeysWithValues: e["filesystems"]!.arrayValue!.map {
                ($0["mountpoint"]!.stringValue!, $0["wave"]!.intValue!)
            })
            #expect(explicitWaves.count == 2 && explicitWaves[back2]! > explicitWaves.filter { $0.key != back2 }.values.first!,
                    "the stacked filesystem freezes first: \(explicitWaves)")
            _ = try client.result(["op": "thaw"], timeoutMs: 20_000)
            #expect(try !isFrozen(stacked) && !isFrozen(back2))
            agent.stop()
        }
    }

    @Test("sync flushes the chosen filesystems without freezing them")
    func syncWithoutFreezing() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            try lab.dirty(a, mb: 4)
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
            let client = try TestClient(path: agent.socketPath)
            let r = try client.result(["op": "sync", "mounts": [.string(a)]])
            #expect(r.mountPoints == [a])
            #expect(r["filesystems"]?.arrayValue?.first?["sync_us"]?.intValue != nil)
            #expect(try !isFrozen(a))
            let dirty = try sh("awk '/^Dirty:/ {print $2}' /proc/meminfo")
            #expect(!dirty.isEmpty)
            agent.stop()
        }
    }

    @Test("a filesystem frozen by someone else fails the freeze distinctly and nothing stays frozen by us")
    func frozenElsewhereIsReportedAndRolledBack() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let b = try lab.filesystem("b")
            try sh("fsfreeze -f '\(b)'")
            defer { _ = try? sh("fsfreeze -u '\(b)'", allowFailure: true) }
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
            let client = try TestClient(path: agent.socketPath)
            let reply = try client.call(["op": "freeze", "mode": "detached"])
            guard case .failure(let err) = reply.outcome else { Issue.record("freeze succeeded"); return }
            #expect(err.code == .frozenElsewhere)
            #expect(err.details?["errno"] == "EBUSY")
            #expect(try !isFrozen(a), "what this operation froze is rolled back")
            #expect(try isFrozen(b), "the other party's freeze is left alone")
            let status = try client.result(["op": "status"])
            #expect(status["state"] == "thawed")
            agent.stop()
        }
    }
}
