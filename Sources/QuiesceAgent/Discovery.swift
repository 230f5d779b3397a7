// From the live system (mountinfo, sysfs) to an ordered list of freeze targets.
import QuiesceLinux
import QuiesceProtocol

/// st_dev of a path, as the kernel reports it to stat().
func statDevice(_ path: String) -> DeviceNumber? {
    (try? Stat.of(path: path))?.device
}

/// Reads what is mounted and how block devices stack, and plans a freeze within a scope.
public struct Discovery: Sendable {

    public var scope: FreezeScope
    public var mountInfoPath: String

    public init(scope: FreezeScope, mountInfoPath: String = "/proc/self/mountinfo") {
        self.scope = scope
        self.mountInfoPath = mountInfoPath
    }

    /// The plan as engine targets in freeze order, plus what was passed over (scope mode only:
    /// an explicit list reports nothing skipped).
    /// `explicitMounts` asks for exactly those mountpoints; the scope binds them too: one outside
    /// the include scope or excluded is `ineligible-mount` with the reason, a path that is not a
    /// mountpoint `unknown-mount` (see `FreezePlan.make`).
    ///
    /// `avoiding` names filesystems (`st_dev`) whose block devices must not be read: those with
    /// a FIFREEZE or syncfs still blocked in the kernel, where a read of the superblock would
    /// block behind the same stuck I/O.
    public func plan(explicitMounts: [String]? = nil, avoiding stuck: Set<DeviceNumber> = []) throws(ProtocolError)
        -> (targets: [FreezeTarget], skipped: [SkippedReport])
    {
        let mounts: [MountEntry]
        do {
            mounts = try MountInfo.read(path: mountInfoPath)
        } catch {
            throw ProtocolError(.internal, "cannot read \(mountInfoPath): \(error)")
        }
        let resolve: (MountEntry) -> DeviceNumber? = { BlockTopology.blockDevice(ofSource: $0.source) }
        func device(_ m: MountEntry) -> DeviceNumber? {
            if m.device.major != 0 { return m.device }
            return m.source.hasPrefix("/dev/") ? resolve(m) : nil
        }
        // Read the stacking only beneath the filesystems that may be planned: on a host with many
        // block devices, a scoped agent should not walk sysfs for all of them on every freeze.
        let candidates: [MountEntry]
        if let explicitMounts {
            let wanted = Set(explicitMounts.map(FreezePlan.normalise))
            candidates = mounts.filter { wanted.contains($0.mountPoint) }
        } else {
            candidates = mounts.filter {
                scope.isIncluded(mountPoint: $0.mountPoint, fsType: $0.fsType)
                    && scope.exclusion(mountPoint: $0.mountPoint, fsType: $0.fsType) == nil
            }
        }
        // An external log or journal device is written by its filesystem's freeze: walk from it too.
        var external: [DeviceNumber: [DeviceNumber]] = [:]
        for m in candidates where !stuck.contains(m.device) {
            guard let d = device(m), external[d] == nil, !stuck.contains(d) else { continue }
            let more = BlockTopology.externalDevices(of: m, device: d)
            if !more.isEmpty { external[d] = more }
        }
        var starts = Set(candidates.compactMap(device)).union(external.values.joined())
        var overlayUpper: [DeviceNumber: BlockTopology.PathLocation] = [:]
        // Touching a file on a FUSE or network filesystem waits for its server, which may never
        // answer: find such paths by mountpoint prefix alone.
        let served = ServedMounts(mounts)
        var topology = BlockTopology.read(startingFrom: starts.sorted(), servedMount: served.containing)
        // Mount IDs are unique in mountinfo; the walk below looks them up often.
        let byMountID = Dictionary(mounts.map { ($0.mountID, $0) }, uniquingKeysWith: { first, _ in first })
        // A loop image (or an nbd server's file) on a btrfs (anonymous st_dev) is matched by mount
        // ID: walk on beneath that filesystem's real device too. A loop image in an overlay is
        // written through to the overlay's upper directory: walk on beneath that directory's
        // filesystem. Repeat until nothing new turns up.
        while true {
            var more = Set<DeviceNumber>()
            let servedFileMounts = topology.servedFiles.values.joined().compactMap(\.mountID)
            for id in Set(topology.loopBackingMount.values).union(servedFileMounts) {
                guard let m = byMountID[id] else { continue }
                if let d = device(m) { more.insert(d) }
                if overlayUpper[m.device] == nil, let dir = BlockTopology.overlayUpperDirectory(m), served.containing(dir) == nil,
                   let upper = BlockTopology.location(ofPath: dir) {
                    overlayUpper[m.device] = upper
                    let holder = upper.mountID.flatMap { byMountID[$0] }
                        ?? mounts.first { $0.device == upper.device }
                    if let d = holder.flatMap(device) { more.insert(d) }
                }
            }
            more.subtract(starts)
            if more.isEmpty { break }
            starts.formUnion(more)
            topology = BlockTopology.read(startingFrom: starts.sorted(), servedMount: served.containing)
        }
        topology.externalDevices = external
        topology.overlayUpper = overlayUpper
        let plan: FreezePlan
        do {
            plan = try FreezePlan.make(mounts: mounts, topology: topology, scope: scope,
                                       explicitMounts: explicitMounts, resolveDevice: resolve)
        } catch {
            switch error.kind {
            case .unknownMount:
                throw ProtocolError(.unknownMount, error.message, details: ["mountpoint": .string(error.mountPoint)])
            case .ineligibleMount:
                var details: JSONObject = ["mountpoint": .string(error.mountPoint)]
                if let reason = error.reason { details["reason"] = .string(reason.rawValue) }
                throw ProtocolError(.ineligibleMount, error.message, details: details)
            case .cycle:
                throw ProtocolError(.internal, error.message)
            }
        }
        let targets = plan.freezeOrder.map { fs in
            var report = FilesystemReport(mountPoint: fs.mountPoint, type: fs.fsType, device: fs.device.description,
                                          source: fs.source, otherMounts: fs.otherMountPoints, wave: Int64(fs.wave),
                                          dependsOn: fs.dependsOn)
            report.error = nil
            // stat() of a btrfs mount gives a per-subvolume anonymous device that mountinfo does
            // not show: accept both as this superblock's identity.
            var identity = fs.mountDevices
            // Only paths in scope: `otherMountPoints` names the superblock's mounts outside it
            // too, whose paths may lie below a filesystem the scope keeps the agent out of.
            for mp in [fs.mountPoint] + fs.otherMountPoints where mp == fs.mountPoint || scope.isIncluded(mountPoint: mp, fsType: fs.fsType) {
                if let d = statDevice(mp) { identity.insert(d) }
            }
            return FreezeTarget(report: report, devices: identity, wave: fs.wave)
        }
        let skipped = plan.skipped.map {
            SkippedReport(mountPoint: $0.mountPoint, type: $0.fsType, reason: $0.reason, detail: $0.detail)
        }
        return (targets, skipped)
    }
}

/// Which mount a path lies under, by the longest mountpoint that prefixes it (no syscall), when
/// that mount is served by a process: FUSE or a network filesystem.
struct ServedMounts {
    private let byMountPoint: [String: MountEntry]
    private let any: Bool

    init(_ mounts: [MountEntry]) {
        var map: [String: MountEntry] = [:]
        for m in mounts { map[m.mountPoint] = m }  // the last mount at a path is the visible one
        byMountPoint = map
        any = mounts.contains { FreezePlan.servedFilesystem($0.fsType) }
    }

    func containing(_ path: String) -> BlockTopology.PathLocation? {
        guard any, path.hasPrefix("/") else { return nil }
        var candidate = FreezePlan.normalise(path)
        while true {
            if let m = byMountPoint[candidate] {
                return FreezePlan.servedFilesystem(m.fsType) ? BlockTopology.PathLocation(device: m.device, mountID: m.mountID) : nil
            }
            guard candidate != "/", let slash = candidate.lastIndex(of: "/") else { return nil }
            candidate = slash == candidate.startIndex ? "/" : String(candidate[..<slash])
        }
    }
}
