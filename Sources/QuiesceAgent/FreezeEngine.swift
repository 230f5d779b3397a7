// Executes a freeze plan: presync in parallel, freeze wave by wave (each wave in parallel), thaw in reverse.
import QuiesceLinux
import QuiesceProtocol
import Synchronization

/// One filesystem the engine may freeze: where to open it, how to recognise it, and its wave.
public struct FreezeTarget: Sendable, Equatable {
    /// Static facts reported back (mountpoint, type, device, source, other mounts, wave, depends_on).
    public var report: FilesystemReport
    /// st_dev values that identify this superblock through its mountpoint.
    public var devices: Set<DeviceNumber>
    public var wave: Int
    public var mountPoint: String { report.mountPoint }

    public init(report: FilesystemReport, devices: Set<DeviceNumber>, wave: Int) {
        self.report = report
        self.devices = devices
        self.wave = wave
    }
}

/// What to do when a filesystem is already frozen by someone else (FIFREEZE answers EBUSY).
public enum FrozenElsewherePolicy: String, Sendable {
    /// Fail the whole freeze and roll back (default: a snapshot then would not be what was asked).
    case fail
    /// Leave it alone, report it as skipped, freeze the rest.
    case skip
}

/// Filesystems this agent holds frozen, with the open fds the thaw will use.
public struct HeldFreeze: Sendable, Equatable {
    public struct Entry: Sendable, Equatable {
        public var target: FreezeTarget
        public var fd: Int32
        /// An earlier FITHAW of this entry failed: an EINVAL now may be that thaw's own doing.
        public var retried = false
    }
    /// In freeze order.
    public var entries: [Entry]
    public var isEmpty: Bool { entries.isEmpty }
    public var mountPoints: [String] { entries.map(\.target.mountPoint) }
}

/// A freeze that succeeded.
public struct FreezeOutcome: Sendable {
    public var held: HeldFreeze
    /// In freeze order, with presync and freeze timings.
    public var filesystems: [FilesystemReport]
    public var skipped: [SkippedReport]
    public var presyncUs: Int64
    /// How many parallel syncfs passes the presync made (PresyncConvergence).
    public var presyncPasses: Int
    public var freezeUs: Int64
    public var stallUs: Int64
}

/// When the presync makes another parallel `syncfs` pass before freezing.
///
/// Writers that keep writing during the presync dirty data again, and FIFREEZE then flushes that
/// while they are blocked: the stall grows with what is dirty when the freeze starts. After a
/// pass, what is still dirty (`remaining`: Dirty + Writeback of /proc/meminfo, an upper bound for
/// these filesystems since it counts the whole system) is what the next pass would flush, and a
/// pass takes about as long as what it flushes. But writers go on dirtying while the next pass
/// runs: what they dirtied during this one (`dirtied`: /proc/vmstat nr_dirtied, clean pages that
/// turned dirty, system-wide) tells how fast. So another pass runs only when both are clearly
/// less than what this pass flushed (`max(remaining, dirtied) <= shrinkRatio * flushed`), each
/// pass then shortening the next and the freeze's own flush. It stops when:
/// - at most `floorBytesPerFilesystem` per filesystem remains (the freeze's own flush is then
///   small next to its fixed cost, ~24-40 ms per FIFREEZE measured here);
/// - the remainder did not shrink enough: writers dirty data about as fast as the storage writes
///   it, and more passes would only lengthen the freeze (streaming writers measured here
///   re-dirty a 64 MiB region in ~40 ms, a pass takes hundreds of ms);
/// - `maxPasses` passes were made, or the time budget is spent: `maxConvergeNanos`, and never
///   more than half the freeze's step budget (the presync as a whole must stay within one step).
public struct PresyncConvergence: Sendable {
    public static let floorBytesPerFilesystem: UInt64 = 1 << 20
    public static let shrinkRatio = 0.5
    public static let maxPasses = 5
    public static let maxConvergeNanos: UInt64 = 1_000_000_000

    public private(set) var passes = 0
    private let floor: UInt64
    private let until: UInt64

    /// - Parameters: `filesystems` being synced; `start` of the presync (monotonic ns); the
    ///   freeze's `budget`.
    public init(filesystems: Int, start: UInt64, budget: FreezeBudget) {
        floor = UInt64(max(1, filesystems)) * Self.floorBytesPerFilesystem
        until = min(budget.deadline, start &+ min(Self.maxConvergeNanos, budget.stepNanos / 2))
    }

    /// Records a finished pass that wrote `flushed` bytes, left `remaining` bytes dirty, while
    /// `dirtied` bytes were dirtied (nil: unknown, which ends the presync); true when another
    /// pass should run.
    public mutating func anotherPass(flushed: UInt64?, remaining: UInt64?, dirtied: UInt64? = 0, now: UInt64) -> Bool {
        passes += 1
        guard let remaining, let flushed, let dirtied else { return false }
        if remaining <= floor || passes >= Self.maxPasses || now >= until { return false }
        return Double(max(remaining, dirtied)) <= Double(flushed) * Self.shrinkRatio
    }
}

/// A freeze that failed: the error to reply with, and what was done (all rolled back).
public struct FreezeFailure: Error, Sendable {
    public var error: ProtocolError
    public var filesystems: [FilesystemReport]
    /// Mountpoints this freeze may still hold after its rollback: a FIFREEZE that did not
    /// return (it may still complete) and filesystems the rollback could not thaw. Every other
    /// target is thawed again or was never frozen by it (another party's freeze, EBUSY).
    public var mayHold: [String] = []
}

/// A thaw: per-filesystem reports, and whatever could not be thawed (kept for a retry).
public struct ThawOutcome: Sendable {
    public var filesystems: [FilesystemReport]
    public var remaining: HeldFreeze
    public var totalUs: Int64
    public var errors: [String] { filesystems.compactMap { fs in fs.error.map { "\(fs.mountPoint): \($0)" } } }
}

/// How long the kernel side of a freeze may take before it is abandoned and rolled back.
///
/// A FIFREEZE cannot be interrupted: when the filesystem's storage stops completing writes,
/// or when it rests on a filesystem this freeze already froze through a dependency the plan
/// could not see, it blocks in the kernel for as long as that lasts. The budget bounds how
/// long the engine waits for it, so the guest is never held frozen past it.
public struct FreezeBudget: Sendable {
    /// The longest the presync, or one wave of FIFREEZE calls, may take, in nanoseconds.
    public var stepNanos: UInt64
    /// Monotonic nanoseconds (`monotonicNanos()`) after which no step is waited for: the
    /// freeze's own deadline.
    public var deadline: UInt64
    /// True when `stepNanos` is the request's own timeout (shorter than freeze-step-timeout): a
    /// step cut short then says so, rather than blaming the storage.
    public var setByRequest: Bool

    public init(stepNanos: UInt64, deadline: UInt64, setByRequest: Bool = false) {
        self.stepNanos = stepNanos
        self.deadline = deadline
        self.setByRequest = setByRequest
    }

    /// Unbounded (tests of other behaviour).
    public static let unbounded = FreezeBudget(stepNanos: .max / 2, deadline: .max)

    /// When a step starting now must be done by.
    func stepDeadline() -> UInt64 {
        let now = monotonicNanos()
        return min(deadline, now > UInt64.max - stepNanos ? .max : now + stepNanos)
    }
}

/// Kernel calls that a freeze gave up waiting for and that have not returned yet. Shared by
/// every operation of one engine: a later freeze of the same filesystem is refused at once
/// (it would block behind the first), and `status` lists them.
public final class StuckCalls: Sendable {
    struct Entry: Sendable {
        var report: StuckCallReport
        var devices: Set<DeviceNumber>
    }
    private let entries = Mutex<[UInt64: Entry]>([:])
    private let nextToken = Atomic<UInt64>(0)

    public init() {}

    func add(_ target: FreezeTarget, call: String, opID: String, sinceMs: Int64) -> UInt64 {
        let token = nextToken.add(1, ordering: .relaxed).newValue
        let entry = Entry(report: StuckCallReport(mountPoint: target.mountPoint, call: call, opID: opID, sinceMs: sinceMs),
                          devices: target.devices)
        entries.withLock { $0[token] = entry }
        return token
    }

    func remove(_ token: UInt64) {
        _ = entries.withLock { $0.removeValue(forKey: token) }
    }

    /// Every call still blocked, oldest first.
    public var current: [StuckCallReport] {
        entries.withLock { $0.sorted { $0.key < $1.key }.map(\.value.report) }
    }

    /// The superblocks (`st_dev` values) that blocked calls are on: reading their devices
    /// could block too.
    public var devices: Set<DeviceNumber> {
        entries.withLock { $0.values.reduce(into: Set<DeviceNumber>()) { $0.formUnion($1.devices) } }
    }

    /// The blocked call on the same superblock as `target`, if any.
    func blocking(_ target: FreezeTarget) -> StuckCallReport? {
        entries.withLock { e in
            e.sorted { $0.key < $1.key }.first { !$0.value.devices.isDisjoint(with: target.devices) }?.value.report
        }
    }
}

/// What a freeze tells as its waves run, on its threads (the freeze record follows it).
public protocol FreezeProgress: Sendable {
    /// Just before a wave's FIFREEZEs: the targets frozen in earlier waves, and this wave's,
    /// each in freeze order.
    func beforeWave(frozen: [FreezeTarget], wave: [FreezeTarget])
    /// A FIFREEZE of `target` returned an error: this freeze does not hold it (EBUSY: another
    /// party does).
    func notFrozen(_ target: FreezeTarget)
}

/// Runs the kernel side of freeze, thaw and sync. Every blocking call runs on dedicated threads,
/// never on the Swift concurrency pool, so `ping` and `status` stay answerable during a freeze.
public struct FreezeEngine: Sendable {
    public var onFrozenElsewhere: FrozenElsewherePolicy
    /// Whether freezes presync (the `presync` setting); false goes straight to the waves.
    public var presync: Bool
    /// Calls of abandoned freezes still blocked in the kernel.
    public let stuck = StuckCalls()
    /// Where FIFREEZE, FITHAW and syncfs go: the real kernel, or a fake in tests.
    public let kernel: any FilesystemKernel
    /// The threads a `sync` request's syncfs calls run on (bounded: many connections asking
    /// for a sync at once must not start a thread per filesystem each).
    let syncPool: BlockingPool

    public init(onFrozenElsewhere: FrozenElsewherePolicy = .fail, presync: Bool = true,
                kernel: any FilesystemKernel = LinuxFilesystemKernel(), syncPool: BlockingPool = WorkPools.sync) {
        self.onFrozenElsewhere = onFrozenElsewhere
        self.presync = presync
        self.kernel = kernel
        self.syncPool = syncPool
    }

    /// Freezes `targets`. In `explicit` mode every target must freeze; in scope mode filesystems
    /// that cannot freeze (EOPNOTSUPP) or that vanished are skipped and reported.
    ///
    /// The presync and each wave must finish within `budget`. When one does not, the freeze is
    /// abandoned: everything already frozen is thawed (which also releases a FIFREEZE blocked
    /// behind it), the failure names the filesystems whose call did not return, and such a
    /// call, when it does return, thaws what it froze on its own thread. Nothing stays frozen.
    ///
    /// `progress` hears, on the freeze's threads, of each wave just before its FIFREEZEs and of
    /// each FIFREEZE that failed: the freeze record follows it (`WaveRecorder`), so that a
    /// crash's recovery FITHAWs only filesystems this freeze may hold, never one that another
    /// party froze while the hooks or the presync ran, or whose FIFREEZE of ours failed.
    public func freeze(_ targets: [FreezeTarget], explicit: Bool, opID: String = "",
                       budget: FreezeBudget = .unbounded, progress: (any FreezeProgress)? = nil) async -> Result<FreezeOutcome, FreezeFailure> {
        let run = FreezeRun(targets: targets, explicit: explicit, policy: onFrozenElsewhere, presync: presync, opID: opID,
                            budget: budget, stuck: stuck, kernel: kernel, progress: progress)
        return await Threads.run { run.execute() }
    }

    /// Thaws in reverse waves, each wave in parallel. Best effort: a failure never stops the rest.
    /// A filesystem that was not frozen any more (EINVAL) counts as thawed.
    public func thaw(_ held: HeldFreeze) async -> ThawOutcome {
        let kernel = self.kernel
        return await Threads.run { Self.thawBlocking(held, kernel: kernel) }
    }

    /// syncfs on every target, in parallel on the sync pool's threads, without freezing.
    public func sync(_ targets: [FreezeTarget]) async -> (filesystems: [FilesystemReport], totalUs: Int64) {
        let start = monotonicNanos()
        let kernel = self.kernel, pool = syncPool
        let reports = await withTaskGroup(of: (Int, FilesystemReport).self) { group in
            for (i, target) in targets.enumerated() {
                group.addTask {
                    await pool.run {
                        var r = target.report
                        let t = monotonicNanos()
                        do {
                            let fd = try kernel.open(target.mountPoint, expectedDevices: target.devices)
                            if let e = kernel.syncfs(fd) { r.error = "syncfs: \(e)" }
                            kernel.close(fd)
                        } catch {
                            r.error = "\(error)"
                        }
                        r.syncUs = micros(since: t)
                        return (i, r)
                    }
                }
            }
            var out = [FilesystemReport?](repeating: nil, count: targets.count)
            for await (i, r) in group { out[i] = r }
            return out.map { $0! }
        }
        return (reports, micros(since: start))
    }

    // MARK: - Blocking implementation

    static func thawBlocking(_ held: HeldFreeze, kernel: any FilesystemKernel) -> ThawOutcome {
        let start = monotonicNanos()
        var reports: [Int: FilesystemReport] = [:]
        var remaining: [HeldFreeze.Entry] = []
        let byWave = Dictionary(grouping: held.entries.indices, by: { held.entries[$0].target.wave })
        for wave in byWave.keys.sorted(by: >) {
            let members = byWave[wave]!
            let results = Threads.parallelMap(members.count) { k -> (UInt64, Errno?) in
                let t = monotonicNanos()
                let e = kernel.thaw(held.entries[members[k]].fd)
                return (monotonicNanos() - t, e)
            }
            for (k, (ns, e)) in results.enumerated() {
                let entry = held.entries[members[k]]
                var r = entry.target.report
                r.thawUs = Int64(ns / 1000)
                if let e, e != .EINVAL {
                    r.error = "FITHAW: \(e)"
                    var again = entry
                    again.retried = true
                    remaining.append(again)
                } else {
                    // EINVAL: not frozen any more. This freeze's fd kept it mounted, so someone
                    // else thawed it (FITHAW from another process) while it was held.
                    if e == .EINVAL && !entry.retried { r.thawedElsewhere = true }
                    kernel.close(entry.fd)
                }
                reports[members[k]] = r
            }
        }
        // Report in thaw order (reverse waves).
        let order = byWave.keys.sorted(by: >).flatMap { byWave[$0]! }
        return ThawOutcome(filesystems: order.map { reports[$0]! }, remaining: HeldFreeze(entries: remaining),
                           totalUs: micros(since: start))
    }

    static func details(_ t: FreezeTarget, _ errno: Errno) -> JSONObject {
        ["mountpoint": .string(t.mountPoint), "errno": .string(errno.name)]
    }
}

/// One freeze operation on its dedicated thread: open, presync, waves, and the rollback.
private struct FreezeRun: Sendable {
    let targets: [FreezeTarget]
    let explicit: Bool
    let policy: FrozenElsewherePolicy
    let presync: Bool
    let opID: String
    let budget: FreezeBudget
    let stuck: StuckCalls
    let kernel: any FilesystemKernel
    let progress: (any FreezeProgress)?

    /// What one FIFREEZE did.
    struct Call: Sendable {
        var start: UInt64
        var end: UInt64
        var error: Errno?
    }

    func execute() -> Result<FreezeOutcome, FreezeFailure> {
        var reports = targets.map(\.report)
        var skipped: [SkippedReport] = []
        var fds = [Int32?](repeating: nil, count: targets.count)
        /// Targets whose fd belongs to an abandoned call's thread (it closes it when the call returns).
        var abandoned = Set<Int>()

        func closeAll(except keep: Set<Int> = []) {
            for (i, fd) in fds.enumerated() where !keep.contains(i) && !abandoned.contains(i) { if let fd { kernel.close(fd) } }
        }

        // A call of an earlier, abandoned freeze still blocked on one of these superblocks:
        // another FIFREEZE would only queue behind it.
        for (i, t) in targets.enumerated() {
            if let blocked = stuck.blocking(t) {
                reports[i].error = "\(blocked.call) of operation \(blocked.opID) has not returned"
                let seconds = max(0, (wallClockMillis() - blocked.sinceMs) / 1000)
                return .failure(FreezeFailure(
                    error: ProtocolError(.freezeFailed,
                                         "\(t.mountPoint): the \(blocked.call) of operation \(blocked.opID) has been blocked in the kernel for \(seconds) s (its storage is not completing writes); nothing was frozen",
                                         details: ["mountpoint": .string(t.mountPoint), "errno": .string(Errno.EBUSY.name),
                                                   "stuck": .array([.object(blocked.json)])]),
                    filesystems: reports))
            }
        }

        // Open every mountpoint first: nothing is frozen yet, so a failure costs nothing.
        for (i, t) in targets.enumerated() {
            do {
                fds[i] = try kernel.open(t.mountPoint, expectedDevices: t.devices)
            } catch {
                if explicit {
                    closeAll()
                    reports[i].error = "\(error)"
                    return .failure(FreezeFailure(
                        error: ProtocolError(.freezeFailed, "\(error)", details: FreezeEngine.details(t, error.errno)),
                        filesystems: reports))
                }
                skipped.append(SkippedReport(mountPoint: t.mountPoint, type: t.report.type, reason: .vanished, detail: "\(error)"))
            }
        }

        // Presync: flush every filesystem in parallel while writers still run. A syncfs that
        // does not return within the budget means storage that is not completing writes: give
        // up before anything is frozen (a FIFREEZE would block on the same flush, with writers stalled).
        // Writers keep dirtying data during a pass, and FIFREEZE flushes that with them blocked,
        // so passes repeat while each still flushes clearly less than the one before
        // (PresyncConvergence), within a time budget; then the freeze.
        let opened = fds
        let presyncStart = monotonicNanos()
        let syncable = presync ? targets.indices.filter { opened[$0] != nil } : []
        var convergence = PresyncConvergence(filesystems: syncable.count, start: presyncStart, budget: budget)
        let devices = Set(syncable.flatMap { targets[$0].devices })
        let before = syncable.isEmpty ? WritebackSample(written: nil, dirty: nil, dirtied: nil) : kernel.writeback(of: devices)
        var writtenBefore = before.written
        var dirtiedBefore = before.dirtied
        presyncLoop: while !syncable.isEmpty {
            let presync = bounded(syncable, call: "syncfs") { i -> Call in
                // Arguments evaluate left to right: take the end time after the syncfs returns.
                let t = monotonicNanos()
                let e = kernel.syncfs(opened[i]!)
                return Call(start: t, end: monotonicNanos(), error: e)
            } late: { _, _ in }  // the fd stays with this operation: a late syncfs leaves nothing to undo
            for (i, r) in presync.finished {
                reports[i].presyncUs = (reports[i].presyncUs ?? 0) + Int64((r.end - r.start) / 1000)
                if let e = r.error { reports[i].error = "presync: syncfs: \(e)" }
            }
            if !presync.unfinished.isEmpty {
                closeAll()
                return .failure(timedOut(presync.unfinished, call: "syncfs", rolledBack: [], couldNotThaw: [], reports: &reports))
            }
            if presync.finished.contains(where: { $0.1.error != nil }) { break presyncLoop }
            // What this pass wrote to the filesystems' block devices (sysfs counters; nil for
            // devices without them, e.g. btrfs), and what is still dirty now.
            let after = kernel.writeback(of: devices)
            let writtenAfter = after.written
            let remaining = after.dirty
            let dirtiedAfter = after.dirtied
            var flushed: UInt64?, dirtied: UInt64?
            if let a = writtenAfter, let b = writtenBefore { flushed = a >= b ? a - b : 0 }
            if let a = dirtiedAfter, let b = dirtiedBefore { dirtied = a >= b ? a - b : 0 }
            writtenBefore = writtenAfter
            dirtiedBefore = dirtiedAfter
            guard convergence.anotherPass(flushed: flushed, remaining: remaining, dirtied: dirtied, now: monotonicNanos())
            else { break presyncLoop }
        }
        let presyncUs = syncable.isEmpty ? 0 : micros(since: presyncStart)
        let presyncPasses = convergence.passes

        // Freeze wave by wave; each wave in parallel, within the budget.
        let freezeStart = monotonicNanos()
        var frozen: [Int] = []  // indexes into targets, in freeze order
        var firstStart: UInt64 = .max
        var lastEnd: UInt64 = 0
        let waves = Dictionary(grouping: targets.indices.filter { fds[$0] != nil }, by: { targets[$0].wave })
        for wave in waves.keys.sorted() {
            let members = waves[wave]!
            progress?.beforeWave(frozen: frozen.map { targets[$0] }, wave: members.map { targets[$0] })
            let progress = self.progress, all = self.targets
            let results = bounded(members, call: "FIFREEZE") { i -> Call in
                let s = monotonicNanos()
                let e = kernel.freeze(opened[i]!)
                let call = Call(start: s, end: monotonicNanos(), error: e)
                if e != nil { progress?.notFrozen(all[i]) }
                return call
            } late: { i, call in
                // Abandoned: this freeze was rolled back while the call was blocked. Undo what it did.
                if call.error == nil { _ = kernel.thaw(opened[i]!) }
                kernel.close(opened[i]!)
            }
            abandoned.formUnion(results.unfinished)
            var failure: (index: Int, errno: Errno)?
            for (i, r) in results.finished {
                reports[i].freezeUs = Int64((r.end - r.start) / 1000)
                if let e = r.error {
                    if e == .EOPNOTSUPP && !explicit {
                        skipped.append(SkippedReport(mountPoint: targets[i].mountPoint, type: targets[i].report.type,
                                                     reason: .unsupported, detail: "FIFREEZE: \(e)"))
                        continue
                    }
                    if e == .EBUSY && policy == .skip {
                        skipped.append(SkippedReport(mountPoint: targets[i].mountPoint, type: targets[i].report.type,
                                                     reason: .frozenElsewhere, detail: "FIFREEZE: \(e)"))
                        continue
                    }
                    reports[i].error = "FIFREEZE: \(e)"
                    if failure == nil { failure = (i, e) }
                    continue
                }
                frozen.append(i)
                firstStart = min(firstStart, r.start)
                lastEnd = max(lastEnd, r.end)
                reports[i].frozenAtUs = Int64((r.end - freezeStart) / 1000)
            }
            if failure != nil || !results.unfinished.isEmpty {
                // Roll back everything this operation froze, in reverse order. Thawing also
                // releases a FIFREEZE that was blocked behind one of them; its thread then thaws
                // its own filesystem.
                let held = HeldFreeze(entries: frozen.map { HeldFreeze.Entry(target: targets[$0], fd: fds[$0]!) })
                let rollback = FreezeEngine.thawBlocking(held, kernel: kernel)
                // thawBlocking closed the fds it thawed; one it could not thaw stays open, as before.
                closeAll(except: Set(frozen))
                let rolledBack = rollback.filesystems.filter { $0.error == nil }.map(\.mountPoint)
                let mayHold = results.unfinished.map { targets[$0].mountPoint }
                    + rollback.filesystems.filter { $0.error != nil }.map(\.mountPoint)
                var failed = !results.unfinished.isEmpty
                    ? timedOut(results.unfinished, call: "FIFREEZE", rolledBack: rolledBack, couldNotThaw: rollback.errors, reports: &reports)
                    : refused(failure!.index, failure!.errno, rolledBack: rolledBack, couldNotThaw: rollback.errors, reports: reports)
                failed.mayHold = mayHold
                return .failure(failed)
            }
        }
        let freezeUs = micros(since: freezeStart)
        let stallUs = frozen.isEmpty ? 0 : Int64((lastEnd - firstStart) / 1000)
        // Close the fds of targets that were skipped; keep the frozen ones for the thaw.
        closeAll(except: Set(frozen))
        let held = HeldFreeze(entries: frozen.map { HeldFreeze.Entry(target: targets[$0], fd: fds[$0]!) })
        return .success(FreezeOutcome(
            held: held, filesystems: frozen.map { reports[$0] }, skipped: skipped,
            presyncUs: presyncUs, presyncPasses: presyncPasses, freezeUs: freezeUs, stallUs: stallUs))
    }

    /// Runs `call` on each target in parallel until the step's deadline. A call still blocked
    /// then is registered as stuck until it returns, and `late` runs on its thread when it does.
    private func bounded(
        _ indexes: [Int], call name: String, _ call: @escaping @Sendable (Int) -> Call,
        late: @escaping @Sendable (Int, Call) -> Void
    ) -> (finished: [(Int, Call)], unfinished: [Int]) {
        // Per call: registered as stuck (with its token), or returned after it was abandoned.
        // One lock orders the two, whichever comes first.
        enum Late: Sendable { case registered(UInt64), returned }
        let late_ = Mutex<[Int: Late]>([:])
        let targets = self.targets, opID = self.opID, stuck = self.stuck
        let sinceMs = wallClockMillis()
        let results = Threads.parallelMap(indexes.count, until: budget.stepDeadline()) { k in
            call(indexes[k])
        } late: { k, result in
            late(indexes[k], result)
            late_.withLock { state in
                if case .registered(let token)? = state[k] { stuck.remove(token) } else { state[k] = .returned }
            }
        }
        var finished: [(Int, Call)] = []
        var unfinished: [Int] = []
        for (k, r) in results.enumerated() {
            guard let r else {
                unfinished.append(indexes[k])
                late_.withLock { state in
                    if state[k] == nil { state[k] = .registered(stuck.add(targets[indexes[k]], call: name, opID: opID, sinceMs: sinceMs)) }
                }
                continue
            }
            finished.append((indexes[k], r))
        }
        return (finished, unfinished)
    }

    /// The failure for a step that did not finish within its budget.
    private func timedOut(_ unfinished: [Int], call: String, rolledBack: [String], couldNotThaw: [String],
                          reports: inout [FilesystemReport]) -> FreezeFailure {
        let names = unfinished.map { targets[$0].mountPoint }
        let budgetMs = budget.stepNanos / 1_000_000
        for i in unfinished { reports[i].error = "\(call) did not return within \(budgetMs) ms" }
        var message = "\(call) of \(names.joined(separator: ", ")) did not return within \(budgetMs) ms"
            + (budget.setByRequest
                ? " (the request's own timeout_ms: too short for this flush; ask for a longer one)"
                : " (its storage is not completing writes, or it rests on a filesystem frozen before it)")
            + "; the freeze was abandoned"
        if !rolledBack.isEmpty { message += "; thawed again: \(rolledBack.joined(separator: ", "))" }
        if call == "FIFREEZE" { message += "; a FIFREEZE that returns later is thawed at once" }
        if !couldNotThaw.isEmpty { message += "; COULD NOT THAW: \(couldNotThaw.joined(separator: "; "))" }
        var d = FreezeEngine.details(targets[unfinished[0]], .ETIMEDOUT)
        d["stuck"] = .array(names.map(JSON.string))
        d["rolled_back"] = .array(rolledBack.map(JSON.string))
        return FreezeFailure(error: ProtocolError(.freezeFailed, message, details: d), filesystems: reports)
    }

    /// The failure for a FIFREEZE that answered with an error.
    private func refused(_ index: Int, _ errno: Errno, rolledBack: [String], couldNotThaw: [String],
                         reports: [FilesystemReport]) -> FreezeFailure {
        let t = targets[index]
        let code: ErrorCode
        var message: String
        switch errno {
        case .EBUSY:
            code = .frozenElsewhere
            message = "\(t.mountPoint) is already frozen by someone else (FIFREEZE: \(errno))"
        case .EPERM, .EACCES:
            code = .permissionDenied
            message = "freeze \(t.mountPoint): \(errno); the agent needs CAP_SYS_ADMIN"
        case .EOPNOTSUPP:
            code = .ineligibleMount
            message = "\(t.mountPoint) (\(t.report.type)) cannot be frozen (FIFREEZE: \(errno))"
        default:
            code = .freezeFailed
            message = "freeze \(t.mountPoint): \(errno)"
        }
        if !rolledBack.isEmpty { message += "; thawed again: \(rolledBack.joined(separator: ", "))" }
        if !couldNotThaw.isEmpty { message += "; COULD NOT THAW: \(couldNotThaw.joined(separator: "; "))" }
        var d = FreezeEngine.details(t, errno)
        if code == .ineligibleMount { d["reason"] = "unsupported" }
        d["rolled_back"] = .array(rolledBack.map(JSON.string))
        return FreezeFailure(error: ProtocolError(code, message, details: d), filesystems: reports)
    }
}

/// Microseconds elapsed since a monotonic timestamp.
func micros(since start: UInt64) -> Int64 { Int64((monotonicNanos() - start) / 1000) }
