// Waiting without timers (AsyncSleep, DeadlineGuard's condition variable) and the presync's stop rule.
import Foundation
@testable import QuiesceAgent
import QuiesceLinux
import QuiesceProtocol
import QuiesceTestSupport
import Synchronization
import Testing

@Suite("Waiting on events and deadlines")
struct WaitingTests {
    @Test("AsyncSleep sleeps until its deadline, and a cancelled sleep returns at once")
    func asyncSleep() async throws {
        let t0 = monotonicNanos()
        await AsyncSleep.nanoseconds(150_000_000)
        let slept = monotonicNanos() - t0
        // Only a lower bound: the other suites block the test process's cooperative threads, so
        // how soon a woken task runs again is theirs to decide (the agent runs on its own executor).
        #expect(slept >= 150_000_000, "slept \(slept / 1_000_000) ms for 150 ms")

        let sleeper = Task { () -> UInt64 in
            let s = monotonicNanos()
            await AsyncSleep.nanoseconds(30_000_000_000)
            return monotonicNanos() - s
        }
        try await Task.sleep(nanoseconds: 100_000_000)
        sleeper.cancel()
        let cancelledAfter = await sleeper.value
        #expect(cancelledAfter < 25_000_000_000, "a cancelled 30 s sleep returned after \(cancelledAfter / 1_000_000) ms")

        // Many sleeps at once wake in deadline order.
        final class Order: Sendable { let woke = Mutex<[Int]>([]) }
        let order = Order()
        await withTaskGroup(of: Void.self) { g in
            for i in [3, 1, 2] {
                g.addTask {
                    await AsyncSleep.nanoseconds(UInt64(i) * 150_000_000)
                    order.woke.withLock { $0.append(i) }
                }
            }
        }
        #expect(order.woke.withLock { $0 } == [1, 2, 3])
    }

    @Test("a device that cannot be opened is retried after 1 s, then twice as long each time up to a minute, and afresh after an open")
    func retryBackoff() {
        var retry = RetryBackoff()
        var delays: [Int] = []
        for _ in 0..<9 { delays.append(retry.take()) }
        #expect(delays == [1000, 2000, 4000, 8000, 16_000, 32_000, 60_000, 60_000, 60_000])
        retry.reset()
        #expect(retry.take() == 1000)
        var odd = RetryBackoff(first: 0, ceiling: -5)
        #expect(odd.take() == 1 && odd.take() == 1, "a non-positive delay would spin: clamped to 1 ms")
    }

    @Test("wall-clock instants in messages read as UTC times, to the millisecond, before and after the epoch")
    func utcTimestamps() {
        #expect(utcTimestamp(millis: 0) == "1970-01-01 00:00:00.000 UTC")
        #expect(utcTimestamp(millis: 1_796_043_008_869) == "2026-11-30 12:50:08.869 UTC")
        #expect(utcTimestamp(millis: 1_796_043_008_009) == "2026-11-30 12:50:08.009 UTC")
        #expect(utcTimestamp(millis: -1) == "1969-12-31 23:59:59.999 UTC")
    }

    @Test("presync: another pass only while it will flush at most half of the last one, within budget")
    func presyncConvergence() {
        let mib: UInt64 = 1 << 20
        let budget = FreezeBudget(stepNanos: 10_000_000_000, deadline: .max)
        // Light load: after the first pass almost nothing is dirty: freeze now.
        var light = PresyncConvergence(filesystems: 16, start: 0, budget: budget)
        do { let again = light.anotherPass(flushed: 128 * mib, remaining: 4 * mib, now: 60_000_000); #expect(!again) }
        #expect(light.passes == 1)
        // Moderate writers: the remainder shrinks geometrically: passes until it is small.
        var moderate = PresyncConvergence(filesystems: 4, start: 0, budget: budget)
        do { let again = moderate.anotherPass(flushed: 256 * mib, remaining: 60 * mib, now: 200_000_000); #expect(again) }
        do { let again = moderate.anotherPass(flushed: 60 * mib, remaining: 15 * mib, now: 260_000_000); #expect(again) }
        do { let again = moderate.anotherPass(flushed: 15 * mib, remaining: 3 * mib, now: 280_000_000); #expect(!again, "3 MiB <= 4 x 1 MiB floor") }
        // Streaming writers re-dirty everything during a pass: no second pass, whether the
        // remainder at the end of the pass already shows it or only the pages dirtied during it.
        var streaming = PresyncConvergence(filesystems: 8, start: 0, budget: budget)
        do { let again = streaming.anotherPass(flushed: 512 * mib, remaining: 500 * mib, now: 200_000_000); #expect(!again) }
        var sweeping = PresyncConvergence(filesystems: 8, start: 0, budget: budget)
        do { let again = sweeping.anotherPass(flushed: 512 * mib, remaining: 100 * mib, dirtied: 900 * mib, now: 200_000_000); #expect(!again) }
        // The time budget: never past 1 s, nor past half the step budget.
        var late = PresyncConvergence(filesystems: 1, start: 0, budget: budget)
        do { let again = late.anotherPass(flushed: 256 * mib, remaining: 10 * mib, now: 1_000_000_000); #expect(!again) }
        var tight = PresyncConvergence(filesystems: 1, start: 0, budget: FreezeBudget(stepNanos: 400_000_000, deadline: .max))
        do { let again = tight.anotherPass(flushed: 256 * mib, remaining: 10 * mib, now: 200_000_000); #expect(!again) }
        // Unknown counters: no extra pass (the old behaviour).
        var unknown = PresyncConvergence(filesystems: 1, start: 0, budget: budget)
        do { let again = unknown.anotherPass(flushed: nil, remaining: 10 * mib, now: 1); #expect(!again) }
        // At most maxPasses.
        var many = PresyncConvergence(filesystems: 1, start: 0, budget: budget)
        var flushed = 1 << 40 as UInt64
        while many.anotherPass(flushed: flushed, remaining: flushed / 4, now: 1) { flushed /= 4 }
        #expect(many.passes == PresyncConvergence.maxPasses)
    }
}

@Suite("The deadline guard's wait", .enabled(if: canUseLoopDevices, "needs root and loop devices"))
struct DeadlineGuardWaitTests {
    @Test("extending the deadline moves the guard's wake: it thaws at the new deadline, not the old one")
    func extendMovesTheWake() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let fired = Mutex<Int>(0)
            let guardian = DeadlineGuard(graceMs: 50) { _, _ in fired.withLock { $0 += 1 } }
            let fd = try FilesystemOps.open(a)
            defer { FD.close(fd) }
            #expect(FilesystemOps.freeze(fd) == nil)
            let target = FreezeTarget(report: FilesystemReport(mountPoint: a, type: "ext4", device: "", source: ""), devices: [], wave: 0)
            let start = monotonicNanos()
            guardian.arm(opID: "extended", held: HeldFreeze(entries: [.init(target: target, fd: fd)]), deadline: start + 200_000_000)
            guardian.extend(to: start + 1_200_000_000)
            usleep(700_000)
            #expect(try isFrozen(a), "still frozen 700 ms in: the old deadline (200 ms) was replaced")
            try waitUntil(timeoutMs: 3000) { try !isFrozen(a) }
            let at = monotonicNanos() - start
            #expect(at >= 1_200_000_000, "thawed after \(at / 1_000_000) ms, the deadline was 1200 ms")
            #expect(fired.withLock { $0 } == 1)
        }
    }
}

@Suite("systemd's journal protocol, spoken without libsystemd")
struct JournalProtocolTests {
    @Test("a field per line; a value with a newline goes as KEY, newline, 64-bit LE length, value, newline")
    func nativeProtocol() {
        let m = Systemd.journalMessage(["MESSAGE=two\nlines", "PRIORITY=6", "junk"])
        var expected = Array("MESSAGE\n".utf8)
        expected += [9, 0, 0, 0, 0, 0, 0, 0]
        expected += Array("two\nlines\n".utf8)
        expected += Array("PRIORITY=6\n".utf8)
        #expect(m == expected)
    }
}
