// Executes a freeze plan: presync in parallel, freeze wave by wave (each wave in parallel), thaw in reverse.
import QuiesceLinux
import QuiesceProtocol

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
    public var freezeUs: Int64
    public var stallUs: Int64
}

/// A freeze that failed: the error to reply with, and what was done (all rolled back).
public struct FreezeFailure: Error, Sendable {
    public var error: ProtocolError
    public var filesystems: [FilesystemReport]
}

/// A thaw: per-filesystem reports, and whatever could not be thawed (kept for a retry).
public struct ThawOutcome: Sendable {
    public var filesystems: [FilesystemReport]
    public var remaining: HeldFreeze
    public var totalUs: Int64
    public var errors: [String] { filesystems.compactMap { fs in fs.error.map { "\(fs.mountPoint): \($0)" } } }
}

/// Runs the kernel side of freeze, thaw and sync. Every blocking call runs on dedicated threads,
/// never on the Swift concurrency pool, so `ping` and `status` stay answerable during a freeze.
public struct FreezeEngine: Sendable {
    public var onFrozenElsewhere: FrozenElsewherePolicy

    public init(onFrozenElsewhere: FrozenElsewherePolicy = .fail) {
        self.onFrozenElsewhere = onFrozenElsewhere
    }

    /// Freezes `targets`. In `explicit` mode every target must freeze; in scope mode filesystems
    /// that cannot freeze (EOPNOTSUPP) or that vanished are skipped and reported.
    public func freeze(_ targets: [FreezeTarget], explicit: Bool) async -> Result<FreezeOutcome, FreezeFailure> {
        let policy = onFrozenElsewhere
        return await Threads.run { Self.freezeBlocking(targets, explicit: explicit, policy: policy) }
    }

    /// Thaws in reverse waves, each wave in parallel. Best effort: a failure never stops the rest.
    /// A filesystem that was not frozen any more (EINVAL) counts as thawed.
    public func thaw(_ held: HeldFreeze) async -> ThawOutcome {
        await Threads.run { Self.thawBlocking(held) }
    }

    /// syncfs on every target in parallel, without freezing.
    public func sync(_ targets: [FreezeTarget]) async -> (filesystems: [FilesystemReport], totalUs: Int64) {
        await Threads.run {
            let start = monotonicNanos()
            let reports = Threads.parallelMap(targets.count) { i -> FilesystemReport in
                var r = targets[i].report
                let t = monotonicNanos()
                do {
                    let fd = try FilesystemOps.open(targets[i].mountPoint, expectedDevices: targets[i].devices)
                    if let e = FilesystemOps.syncfs(fd) { r.error = "syncfs: \(e)" }
                    FD.close(fd)
                } catch {
                    r.error = "\(error)"
                }
                r.syncUs = micros(since: t)
                return r
            }
            return (reports, micros(since: start))
        }
    }

    // MARK: - Blocking implementation

    private static func freezeBlocking(_ targets: [FreezeTarget], explicit: Bool, policy: FrozenElsewherePolicy)
        -> Result<FreezeOutcome, FreezeFailure>
    {
        var reports = targets.map(\.report)
        var skipped: [SkippedReport] = []
        var fds = [Int32?](repeating: nil, count: targets.count)

        func closeAll() { for fd in fds { if let fd { FD.close(fd) } } }

        // Open every mountpoint first: nothing is frozen yet, so a failure costs nothing.
        for (i, t) in targets.enumerated() {
            do {
                fds[i] = try FilesystemOps.open(t.mountPoint, expectedDevices: t.devices)
            } catch {
                if explicit {
                    closeAll()
                    reports[i].error = "\(error)"
                    return .failure(FreezeFailure(
                        error: ProtocolError(.freezeFailed, "\(error)", details: details(t, error.errno)),
                        filesystems: reports))
                }
                skipped.append(SkippedReport(mountPoint: t.mountPoint, type: t.report.type, reason: "vanished", detail: "\(error)"))
            }
        }

        // Presync: flush every filesystem in parallel while writers still run.
        let opened = fds
        let presyncStart = monotonicNanos()
        let presync = Threads.parallelMap(targets.count) { i -> (Int64, Errno?) in
            guard let fd = opened[i] else { return (0, nil) }
            let t = monotonicNanos()
            let e = FilesystemOps.syncfs(fd)
            return (micros(since: t), e)
        }
        let presyncUs = micros(since: presyncStart)
        for (i, (us, e)) in presync.enumerated() where fds[i] != nil {
            reports[i].presyncUs = us
            if let e { reports[i].error = "presync: syncfs: \(e)" }
        }

        // Freeze wave by wave; each wave in parallel.
        let freezeStart = monotonicNanos()
        var frozen: [Int] = []  // indexes into targets, in freeze order
        var firstStart: UInt64 = .max
        var lastEnd: UInt64 = 0
        let waves = Dictionary(grouping: targets.indices.filter { fds[$0] != nil }, by: { targets[$0].wave })
        for wave in waves.keys.sorted() {
            let members = waves[wave]!
            let results = Threads.parallelMap(members.count) { k -> (start: UInt64, end: UInt64, error: Errno?) in
                let i = members[k]
                let s = monotonicNanos()
                let e = FilesystemOps.freeze(opened[i]!)
                return (s, monotonicNanos(), e)
            }
            var failure: (index: Int, errno: Errno)?
            for (k, r) in results.enumerated() {
                let i = members[k]
                reports[i].freezeUs = Int64((r.end - r.start) / 1000)
                if let e = r.error {
                    if e == .EOPNOTSUPP && !explicit {
                        skipped.append(SkippedReport(mountPoint: targets[i].mountPoint, type: targets[i].report.type,
                                                     reason: "unsupported", detail: "FIFREEZE: \(e)"))
                        continue
                    }
                    if e == .EBUSY && policy == .skip {
                        skipped.append(SkippedReport(mountPoint: targets[i].mountPoint, type: targets[i].report.type,
                                                     reason: "frozen-elsewhere", detail: "FIFREEZE: \(e)"))
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
            if let failure {
                // Roll back everything this operation froze, in reverse order.
                let held = HeldFreeze(entries: frozen.map { HeldFreeze.Entry(target: targets[$0], fd: fds[$0]!) })
                let rollback = thawBlocking(held)
                for fd in fds { if let fd, !held.entries.contains(where: { $0.fd == fd }) { FD.close(fd) } }
                let t = targets[failure.index]
                let code: ErrorCode
                var message: String
                switch failure.errno {
                case .EBUSY:
                    code = .frozenElsewhere
                    message = "\(t.mountPoint) is already frozen by someone else (FIFREEZE: \(failure.errno))"
                case .EPERM, .EACCES:
                    code = .permissionDenied
                    message = "freeze \(t.mountPoint): \(failure.errno); the agent needs CAP_SYS_ADMIN"
                case .EOPNOTSUPP:
                    code = .ineligibleMount
                    message = "\(t.mountPoint) (\(t.report.type)) cannot be frozen (FIFREEZE: \(failure.errno))"
                default:
                    code = .freezeFailed
                    message = "freeze \(t.mountPoint): \(failure.errno)"
                }
                let rolledBack = rollback.filesystems.map(\.mountPoint)
                if !rolledBack.isEmpty { message += "; thawed again: \(rolledBack.joined(separator: ", "))" }
                if !rollback.remaining.isEmpty {
                    message += "; COULD NOT THAW: \(rollback.errors.joined(separator: "; "))"
                }
                var d = details(t, failure.errno)
                if code == .ineligibleMount { d["reason"] = "unsupported" }
                d["rolled_back"] = .array(rolledBack.map(JSON.string))
                return .failure(FreezeFailure(error: ProtocolError(code, message, details: d), filesystems: reports))
            }
        }
        let freezeUs = micros(since: freezeStart)
        let stallUs = frozen.isEmpty ? 0 : Int64((lastEnd - firstStart) / 1000)
        // Close the fds of targets that were skipped; keep the frozen ones for the thaw.
        let frozenSet = Set(frozen)
        for (i, fd) in fds.enumerated() where !frozenSet.contains(i) { if let fd { FD.close(fd) } }
        let held = HeldFreeze(entries: frozen.map { HeldFreeze.Entry(target: targets[$0], fd: fds[$0]!) })
        return .success(FreezeOutcome(
            held: held, filesystems: frozen.map { reports[$0] }, skipped: skipped,
            presyncUs: presyncUs, freezeUs: freezeUs, stallUs: stallUs))
    }

    static func thawBlocking(_ held: HeldFreeze) -> ThawOutcome {
        let start = monotonicNanos()
        var reports: [Int: FilesystemReport] = [:]
        var remaining: [HeldFreeze.Entry] = []
        let byWave = Dictionary(grouping: held.entries.indices, by: { held.entries[$0].target.wave })
        for wave in byWave.keys.sorted(by: >) {
            let members = byWave[wave]!
            let results = Threads.parallelMap(members.count) { k -> (UInt64, Errno?) in
                let t = monotonicNanos()
                let e = FilesystemOps.thaw(held.entries[members[k]].fd)
                return (monotonicNanos() - t, e)
            }
            for (k, (ns, e)) in results.enumerated() {
                let entry = held.entries[members[k]]
                var r = entry.target.report
                r.thawUs = Int64(ns / 1000)
                if let e, e != .EINVAL {
                    r.error = "FITHAW: \(e)"
                    remaining.append(entry)
                } else {
                    FD.close(entry.fd)
                }
                reports[members[k]] = r
            }
        }
        // Report in thaw order (reverse waves).
        let order = byWave.keys.sorted(by: >).flatMap { byWave[$0]! }
        return ThawOutcome(filesystems: order.map { reports[$0]! }, remaining: HeldFreeze(entries: remaining),
                           totalUs: micros(since: start))
    }

    private static func details(_ t: FreezeTarget, _ errno: Errno) -> JSONObject {
        ["mountpoint": .string(t.mountPoint), "errno": .string(errno.name)]
    }
}

/// Microseconds elapsed since a monotonic timestamp.
func micros(since start: UInt64) -> Int64 { Int64((monotonicNanos() - start) / 1000) }
