// Blocking work that is not a freeze wave runs on small bounded pools: no number of connections
// or queued requests makes the agent start a thread per request.
import Foundation
@testable import QuiesceAgent
import QuiesceLinux
import QuiesceProtocol
import QuiesceTestSupport
import Synchronization
import Testing

/// An atomic counter a closure can capture.
final class Counter: Sendable {
    let value: Atomic<Int>
    init(_ v: Int = 0) { value = Atomic(v) }
}

@Suite("Bounded work")
struct BoundedWorkTests {
    /// Threads of process `pid` now (entries of /proc/PID/task).
    static func threads(of pid: Int32) -> Int { FD.directoryEntries(atPath: "/proc/\(pid)/task")?.count ?? 0 }

    @Test("16 connections with 16 queued filesystems requests each: every request answered, the agent's threads stay bounded")
    func manyPlansFewThreads() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("bounded-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // An include scope that matches nothing here: `filesystems` only reads and plans.
        let agent = try AgentProcess(in: dir, arguments: ["--include", "\(dir)/none/*", "--allow-uid", "\(getuid())"])
        defer { agent.stop() }
        let clients = try (0..<16).map { _ in try TestClient(path: agent.socketPath) }
        for c in clients { _ = try c.result(["op": "ping"]) }
        // Let the sessions settle, then take the baseline: the sessions' own reader and writer
        // threads are in it.
        try await Task.sleep(nanoseconds: 200_000_000)
        let baseline = Self.threads(of: agent.pid)

        let peak = Counter(baseline)
        let sampling = Counter(1)
        let pid = agent.pid
        let sampler = Threads.spawn(name: "task-sampler") {
            while sampling.value.load(ordering: .relaxed) == 1 {
                let n = Self.threads(of: pid)
                if n > peak.value.load(ordering: .relaxed) { peak.value.store(n, ordering: .relaxed) }
                Threads.sleep(milliseconds: 1)
            }
        }
        for (k, c) in clients.enumerated() {
            var burst: [UInt8] = []
            for i in 0..<16 { burst += Array("{\"id\":\(k * 100 + i),\"op\":\"filesystems\"}\n".utf8) }
            try c.sendRaw(burst)
        }
        var answered = 0
        var failures: [String] = []
        for c in clients {
            var ids = Set<JSON>()
            while ids.count < 16 {
                guard case .reply(let r) = try c.readMessage(timeoutMs: 20_000), let id = r.id else { continue }
                #expect(ids.insert(id).inserted, "one reply per request")
                if case .failure(let e) = r.outcome { failures.append("\(e.code): \(e.message)") }
                if case .success(let o) = r.outcome, o["filesystems"]?.arrayValue != nil { answered += 1 }
            }
        }
        sampling.value.store(0, ordering: .relaxed)
        Threads.join(sampler)

        #expect(failures.count == 0, "every request gets its answer, none is turned away: \(failures.prefix(3))")
        #expect(answered == 256)
        // The planning pool has 2 threads; the sleep timer may start once (the plan's deadline).
        // A thread per plan would add up to 256 here.
        let added = peak.value.load(ordering: .relaxed) - baseline
        #expect(added <= WorkPools.planning.maxThreads + 2, "threads: \(baseline) before the burst, peak \(baseline + added)")
    }

    @Test("a pool runs every job, never more than its threads at once, and lets them all end when idle")
    func poolBoundsItsThreads() async throws {
        let pool = BlockingPool(name: "test", maxThreads: 3)
        let running = Counter()
        let mostAtOnce = Counter()
        let results = await withTaskGroup(of: Int.self) { group in
            for i in 0..<40 {
                group.addTask {
                    await pool.run {
                        let now = running.value.add(1, ordering: .relaxed).newValue
                        while true {
                            let seen = mostAtOnce.value.load(ordering: .relaxed)
                            if now <= seen || mostAtOnce.value.compareExchange(expected: seen, desired: now, ordering: .relaxed).exchanged { break }
                        }
                        Threads.sleep(milliseconds: 5)
                        running.value.subtract(1, ordering: .relaxed)
                        return i
                    }
                }
            }
            return await group.reduce(into: []) { $0.append($1) }
        }
        #expect(results.sorted() == Array(0..<40))
        #expect(mostAtOnce.value.load(ordering: .relaxed) == 3)
        var idle = false
        for _ in 0..<100 where !idle {
            idle = pool.threadCount == 0
            if !idle { Threads.sleep(milliseconds: 10) }
        }
        #expect(idle, "an idle pool keeps no thread")
    }

    @Test("a job given up at its deadline while still queued never runs, and its caller is answered at the deadline")
    func poolDeadline() async throws {
        let pool = BlockingPool(name: "test", maxThreads: 1)
        let release = Mailbox<Void>()
        let ran = Counter()
        let started = Mailbox<Void>()
        let first = Mailbox<Int>()
        // Submitted from this thread (no task to schedule): it holds the pool's one thread.
        pool.submit { started.post(()); _ = release.receive(); ran.value.add(1, ordering: .relaxed); first.post(1) }
        #expect(started.receive(timeoutMs: 60_000) != nil, "the first job holds the pool's one thread")
        let queued = await pool.run(until: monotonicNanos() + 200_000_000) { ran.value.add(10, ordering: .relaxed); return 2 }
        #expect(queued == nil, "the caller is answered at its deadline, the job still queued")
        release.post(())
        #expect(first.receive(timeoutMs: 60_000) == 1)
        #expect(await pool.run(until: monotonicNanos() + 60_000_000_000) { 3 } == 3)
        #expect(ran.value.load(ordering: .relaxed) == 1, "the job given up while queued must not run")
    }
}
