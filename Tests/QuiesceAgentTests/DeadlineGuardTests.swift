// The deadline guard thaws by itself when the state actor misses a deadline.
import Foundation
@testable import QuiesceAgent
import QuiesceLinux
import QuiesceProtocol
import QuiesceTestSupport
import Synchronization
import Testing

@Suite("The deadline guard", .enabled(if: canUseLoopDevices, "needs root and loop devices"))
struct DeadlineGuardTests {
    @Test("a freeze nobody thaws is thawed by the guard shortly after its deadline")
    func guardThawsAMissedDeadline() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let fired = Mutex<[String]>([])
            let guardian = DeadlineGuard(graceMs: 100) { _, mounts in fired.withLock { $0 = mounts } }
            let fd = try FilesystemOps.open(a)
            defer { FD.close(fd) }
            #expect(FilesystemOps.freeze(fd) == nil)
            let target = FreezeTarget(report: FilesystemReport(mountPoint: a, type: "ext4", device: "", source: ""), devices: [], wave: 0)
            guardian.arm(opID: "wedged", held: HeldFreeze(entries: [.init(target: target, fd: fd)]),
                         deadline: monotonicNanos() + 200_000_000)
            #expect(try isFrozen(a))
            try waitUntil(timeoutMs: 2000) { try !isFrozen(a) }
            #expect(fired.withLock { $0 } == [a])
        }
    }

    @Test("a disarmed guard does nothing")
    func disarmedGuardDoesNothing() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let guardian = DeadlineGuard(graceMs: 0) { _, _ in }
            let fd = try FilesystemOps.open(a)
            defer { FD.close(fd) }
            #expect(FilesystemOps.freeze(fd) == nil)
            let target = FreezeTarget(report: FilesystemReport(mountPoint: a, type: "ext4", device: "", source: ""), devices: [], wave: 0)
            guardian.arm(opID: "normal", held: HeldFreeze(entries: [.init(target: target, fd: fd)]), deadline: monotonicNanos() + 300_000_000)
            guardian.disarm()
            usleep(700_000)
            #expect(try isFrozen(a), "the guard must not thaw a freeze it was told is over")
            #expect(FilesystemOps.thaw(fd) == nil)
        }
    }
}
