// The freeze plan: which filesystems to freeze, through which mount, and in which order.
// Pure: it takes parsed mountinfo and block topology and does no I/O, so every rule is
// testable with fixtures.
import QuiesceLinux
import QuiesceProtocol

// MARK: - Scope

/// Which mounts "freeze everything" considers, by mount point and filesystem type.
///
/// Patterns are fnmatch(3) globs matched *without* `FNM_PATHNAME`, so `*` also matches "/":
/// `/lab/*` matches `/lab/a` and `/lab/a/b` (but not `/lab` itself). Type patterns are globs
/// too (`fuse.*`). When `include` (or `includeTypes`) is non-empty, only mounts matching one
/// of its patterns are eligible; `exclude` and `excludeTypes` win over any include.
///
/// The scope selects *mounts*. A filesystem is frozen when any of its mounts is selected, so
/// excluding one bind mount of a filesystem that is also mounted elsewhere in scope does not
/// keep it from being frozen (the plan says so in `skipped`).
public struct FreezeScope: Sendable, Equatable {
    /// Mount point globs; empty means every mount point.
    public var include: [String] = []
    /// Mount point globs never frozen through.
    public var exclude: [String] = []
    /// Filesystem type globs; empty means every type.
    public var includeTypes: [String] = []
    /// Filesystem type globs never frozen through.
    public var excludeTypes: [String] = []

    public init(include: [String] = [], exclude: [String] = [], includeTypes: [String] = [], excludeTypes: [String] = []) {
        self.include = include
        self.exclude = exclude
        self.includeTypes = includeTypes
        self.excludeTypes = excludeTypes
    }

    /// True when an include scope is given (`include` or `includeTypes`).
    public var hasIncludeScope: Bool { !include.isEmpty || !includeTypes.isEmpty }

    /// Whether the include lists admit this mount (true when they are empty).
    public func isIncluded(mountPoint: String, fsType: String) -> Bool {
        (include.isEmpty || include.contains { Self.glob($0, matches: mountPoint) })
            && (includeTypes.isEmpty || includeTypes.contains { Self.glob($0, matches: fsType) })
    }

    /// The first exclude pattern that matches this mount ("type tmpfs" style for type patterns), or nil.
    public func exclusion(mountPoint: String, fsType: String) -> String? {
        if let pattern = exclude.first(where: { Self.glob($0, matches: mountPoint) }) { return pattern }
        if let pattern = excludeTypes.first(where: { Self.glob($0, matches: fsType) }) { return "type \(pattern)" }
        return nil
    }

    /// fnmatch(3) with no flags: `*` and `?` match "/" too.
    static func glob(_ pattern: String, matches string: String) -> Bool {
        Glob.matches(pattern, string)
    }
}

// MARK: - Plan values

/// One superblock to freeze.
public struct PlannedFilesystem: Sendable, Equatable {
    /// The mount opened to issue FIFREEZE/FITHAW.
    public var mountPoint: String
    /// Every other mountpoint of the same superblock (bind mounts, other btrfs subvolumes), in
    /// mountinfo order, in scope or not: a freeze is of the superblock, so all of them freeze
    /// with it. Mounts covered by a later mount at the same path are left out (no path reaches
    /// them), unless asked for by name.
    public var otherMountPoints: [String]
    /// Filesystem type of the opened mount.
    public var fsType: String
    /// Source of the opened mount ("/dev/vda1").
    public var source: String
    /// The real block device: the mountinfo `major:minor`, or for btrfs (and any major-0
    /// filesystem with a block-device source) the resolved device of its source.
    public var device: DeviceNumber
    /// Every mountinfo `major:minor` of this superblock's mounts: the `st_dev` values `stat`
    /// reports for it (several for btrfs subvolumes). Lets the engine check that the fd it
    /// opened is really this filesystem.
    public var mountDevices: Set<DeviceNumber>
    /// Freeze wave: every filesystem of wave N is frozen before any of wave N+1; thaw runs
    /// the waves in reverse.
    public var wave: Int
    /// Mount points of the planned filesystems this one rests on (through loop devices,
    /// device-mapper, md or partitions, transitively), sorted. They are in later waves.
    public var dependsOn: [String]

    public init(
        mountPoint: String, otherMountPoints: [String] = [], fsType: String, source: String,
        device: DeviceNumber, mountDevices: Set<DeviceNumber>, wave: Int = 0, dependsOn: [String] = []
    ) {
        self.mountPoint = mountPoint
        self.otherMountPoints = otherMountPoints
        self.fsType = fsType
        self.source = source
        self.device = device
        self.mountDevices = mountDevices
        self.wave = wave
        self.dependsOn = dependsOn
    }
}

/// A mount the plan leaves out, and why.
public struct SkippedMount: Sendable, Equatable {
    public var mountPoint: String
    public var fsType: String
    public var reason: SkipReason
    /// A sentence for humans ("tmpfs has no block device to freeze").
    public var detail: String

    public init(mountPoint: String, fsType: String, reason: SkipReason, detail: String) {
        self.mountPoint = mountPoint
        self.fsType = fsType
        self.reason = reason
        self.detail = detail
    }
}

/// Why no plan could be made.
public struct PlanError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Kind: Sendable {
        /// An explicitly requested path is not a mount point.
        case unknownMount
        /// An explicitly requested mount point cannot be frozen (pseudo, network, read-only, no device).
        case ineligibleMount
        /// Planned filesystems rest on each other in a loop (impossible on a sane system).
        case cycle
    }

    public var kind: Kind
    /// The mount point concerned (for a cycle: the first, in sort order, of those in it).
    public var mountPoint: String
    /// A complete sentence for humans.
    public var message: String
    /// For `ineligibleMount`: why (pseudo, network, read-only, excluded, not-included…).
    public var reason: SkipReason?

    public init(kind: Kind, mountPoint: String, message: String, reason: SkipReason? = nil) {
        self.kind = kind
        self.mountPoint = mountPoint
        self.message = message
        self.reason = reason
    }

    public var description: String { message }
}

// MARK: - The plan

/// Filesystems to freeze, in waves, and the mounts left out.
///
/// Filesystems in one wave do not rest on each other and may be frozen in parallel. A
/// filesystem that rests on another (a filesystem image on a loop device whose backing file
/// lives on the other, or a device-mapper/md/partition chain from the other's devices) is in
/// an earlier wave: freezing the lower one first would make the upper one's freeze write into
/// a frozen filesystem and deadlock. Thaw runs the waves in reverse.
///
/// There is one entry per superblock (bind mounts and btrfs subvolumes share one), keyed by
/// its real block device. It is opened through the first mount in scope whose root is "/",
/// else the first in scope in mountinfo order, skipping mounts covered by a later mount at
/// the same path (a path lookup would reach the covering one). When every mount in scope is
/// covered, any other uncovered mount of the same superblock is used; failing that the
/// mounts are skipped as `shadowed`.
public struct FreezePlan: Sendable, Equatable {
    /// Waves in freeze order; each sorted by mount point.
    public var waves: [[PlannedFilesystem]]
    /// Mounts left out, in mountinfo order.
    ///
    /// Listing rules, to keep the report readable:
    /// - With an include scope (`include` or `includeTypes`), mounts outside it are not listed at all.
    /// - Pseudo, network, no-device and read-only filesystems are listed once per superblock
    ///   (their first mount in scope), not once per mount.
    /// - Excluded mounts are listed each; when their filesystem is frozen anyway through
    ///   another mount in scope, the detail says so.
    /// - Covered mounts are listed as `shadowed` (or `duplicate` when covered by the same
    ///   filesystem); when their filesystem is frozen through another mount, the detail says so.
    /// - In explicit mode nothing is listed: only the requested mounts are considered.
    public var skipped: [SkippedMount]

    public init(waves: [[PlannedFilesystem]], skipped: [SkippedMount] = []) {
        self.waves = waves
        self.skipped = skipped
    }

    /// Every planned filesystem in freeze order (thaw in reverse).
    public var freezeOrder: [PlannedFilesystem] { waves.flatMap { $0 } }

    /// Filesystem types that have no storage of their own to make consistent, or cannot be
    /// written, or must not be frozen (FUSE: the daemon serving it would block). Matched on
    /// the type and on its base before a "." (`fuse.sshfs` → `fuse`).
    public static let pseudoFilesystemTypes: Set<String> = [
        "tmpfs", "ramfs", "rootfs", "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2",
        "securityfs", "debugfs", "tracefs", "configfs", "pstore", "bpf", "mqueue", "hugetlbfs",
        "autofs", "binfmt_misc", "fusectl", "efivarfs", "overlay", "aufs", "squashfs", "erofs",
        "cramfs", "romfs", "iso9660", "nsfs", "rpc_pipefs", "nfsd", "selinuxfs", "smackfs",
        "fuse", "fuseblk", "xenfs", "usbfs", "devfs",
    ]

    /// Network and host-shared filesystem types: the guest cannot freeze the storage behind them.
    public static let networkFilesystemTypes: Set<String> = [
        "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "9p", "virtiofs", "afs",
        "lustre", "gfs2", "ocfs2", "ncpfs", "coda", "beegfs", "gpfs", "orangefs", "pvfs2",
        "vboxsf", "vmhgfs", "davfs", "dlm",
    ]

    /// Whether files of this type are served by a process the guest cannot vouch for (a FUSE
    /// daemon, a network server): opening a path on it waits for that server.
    public static func servedFilesystem(_ fsType: String) -> Bool {
        let base = fsType.split(separator: ".", maxSplits: 1).first.map(String.init) ?? fsType
        return base == "fuse" || base == "fuseblk" || networkFilesystemTypes.contains(fsType) || networkFilesystemTypes.contains(base)
    }

    /// Builds the plan.
    ///
    /// - Parameters:
    ///   - mounts: /proc/self/mountinfo, in its order.
    ///   - topology: what the block devices rest on (`BlockTopology.read`).
    ///   - scope: which mounts are eligible. It binds explicit lists too: the guest's admin
    ///     sets the scope, and a host naming a mount outside it (or excluded) gets an error,
    ///     never a freeze.
    ///   - explicitMounts: when non-nil, exactly these mount points (trailing slashes are
    ///     ignored). A path that is not a mount point, or a mount that cannot be frozen or is
    ///     out of scope, is an error; two mount points of one filesystem give one entry opened
    ///     through the first.
    ///   - resolveDevice: the real block device of a major-0 mount (btrfs), usually
    ///     `BlockTopology.blockDevice(ofSource: $0.source)`. Only asked for major-0 mounts of
    ///     types that are neither pseudo nor network.
    public static func make(
        mounts: [MountEntry], topology: BlockTopology, scope: FreezeScope,
        explicitMounts: [String]? = nil, resolveDevice: (MountEntry) -> DeviceNumber? = { _ in nil }
    ) throws(PlanError) -> FreezePlan {
        let table = MountTable(mounts: mounts, resolveDevice: resolveDevice)
        let selection: Selection
        if let explicitMounts {
            selection = try table.selectExplicit(explicitMounts, scope: scope)
        } else {
            selection = table.selectInScope(scope)
        }
        return try table.arrange(selection, topology: topology)
    }
}

extension FreezePlan {
    /// How explicit mountpoints are compared: trailing and repeated slashes dropped; "/" stays "/".
    static func normalise(_ path: String) -> String {
        let components = path.split(separator: "/")
        guard path.hasPrefix("/") else { return components.joined(separator: "/") }
        return "/" + components.joined(separator: "/")
    }
}

// MARK: - Implementation

/// A planned superblock before ordering.
private struct Selected {
    var key: DeviceNumber
    var opened: Int
    var others: [Int]
}

private struct Selection {
    var planned: [Selected]
    var skipped: [SkippedMount]
}

/// The mounts with what the plan needs to know about each, and their superblocks.
private struct MountTable {
    struct Superblock {
        /// The real block device, nil when it has none.
        var device: DeviceNumber?
        /// Indices into `mounts`, in mountinfo order.
        var mounts: [Int]
        var mountDevices: Set<DeviceNumber>
    }

    let mounts: [MountEntry]
    /// Why each mount cannot be frozen whatever the scope, with a detail sentence; nil if it can.
    let ineligible: [(reason: SkipReason, detail: String)?]
    /// Superblock key of each mount: its real device, else its mountinfo device.
    let key: [DeviceNumber]
    /// For each mount covered by a later mount at the same path: the index of the visible one.
    let coveredBy: [Int?]
    var superblocks: [DeviceNumber: Superblock] = [:]
    /// Superblock keys in order of first appearance.
    var superblockOrder: [DeviceNumber] = []

    init(mounts: [MountEntry], resolveDevice: (MountEntry) -> DeviceNumber?) {
        self.mounts = mounts
        var ineligible: [(reason: SkipReason, detail: String)?] = []
        var key: [DeviceNumber] = []
        var realDevices: [DeviceNumber?] = []
        for m in mounts {
            let kind = Self.kind(of: m.fsType)
            var real: DeviceNumber? = m.device.major != 0 ? m.device : nil
            if real == nil, kind == nil, let resolved = resolveDevice(m), resolved.major != 0 { real = resolved }
            realDevices.append(real)
            key.append(real ?? m.device)
            switch kind {
            case .pseudo?:
                ineligible.append((.pseudo, Self.pseudoDetail(m.fsType)))
            case .network?:
                ineligible.append((.network, "\(m.fsType) is a network filesystem; the guest cannot freeze its storage"))
            default:
                if real == nil {
                    ineligible.append((.noDevice, "\(m.fsType) from \(m.source.isEmpty ? "(no source)" : m.source) has no block device"))
                } else if m.isReadOnlySuperblock {
                    ineligible.append((.readOnly, "the \(m.fsType) filesystem is read-only; nothing to flush"))
                } else {
                    ineligible.append(nil)
                }
            }
        }
        self.ineligible = ineligible
        self.key = key
        self.coveredBy = Self.coverage(mounts)
        for (index, m) in mounts.enumerated() {
            let k = key[index]
            if superblocks[k] == nil {
                superblocks[k] = Superblock(device: realDevices[index], mounts: [], mountDevices: [])
                superblockOrder.append(k)
            }
            superblocks[k]!.mounts.append(index)
            superblocks[k]!.mountDevices.insert(m.device)
        }
    }

    private static func kind(of fsType: String) -> SkipReason? {
        let base = fsType.split(separator: ".", maxSplits: 1).first.map(String.init) ?? fsType
        if FreezePlan.pseudoFilesystemTypes.contains(fsType) || FreezePlan.pseudoFilesystemTypes.contains(base) {
            return .pseudo
        }
        if FreezePlan.networkFilesystemTypes.contains(fsType) || FreezePlan.networkFilesystemTypes.contains(base) {
            return .network
        }
        return nil
    }

    private static func pseudoDetail(_ fsType: String) -> String {
        if fsType == "fuse" || fsType == "fuseblk" || fsType.hasPrefix("fuse.") {
            return "\(fsType) is served by a userspace daemon that a freeze could block"
        }
        return switch fsType {
        case "squashfs", "erofs", "cramfs", "romfs", "iso9660":
            "\(fsType) cannot be written; there is nothing to freeze"
        case "overlay", "aufs":
            "\(fsType) writes through to the filesystems under it, which are frozen on their own"
        default:
            "\(fsType) is a pseudo filesystem with no storage to freeze"
        }
    }

    /// For mounts stacked at the same path, which one a path lookup reaches. A mount covers
    /// another at the same path when it is mounted on it (its parent), or, when neither is the
    /// other's parent, when it comes later in mountinfo.
    private static func coverage(_ mounts: [MountEntry]) -> [Int?] {
        var byPath: [String: [Int]] = [:]
        for (index, m) in mounts.enumerated() { byPath[m.mountPoint, default: []].append(index) }
        func covers(_ upper: Int, _ lower: Int) -> Bool {
            if mounts[upper].parentID == mounts[lower].mountID { return true }
            if mounts[lower].parentID == mounts[upper].mountID { return false }
            return upper > lower
        }
        var result = [Int?](repeating: nil, count: mounts.count)
        for (_, stack) in byPath where stack.count > 1 {
            let visible = stack.filter { i in !stack.contains { j in j != i && covers(j, i) } }
            let top = visible.last ?? stack.last!
            for i in stack where i != top && !visible.contains(i) { result[i] = top }
        }
        return result
    }

    /// The mount to open among candidates: the first whose root is "/", else the first.
    private func preferred(_ candidates: [Int]) -> Int? {
        candidates.first { mounts[$0].root == "/" } ?? candidates.first
    }

    // MARK: Selection

    func selectInScope(_ scope: FreezeScope) -> Selection {
        var skipped: [(index: Int, SkippedMount)] = []
        var listedIneligible = Set<DeviceNumber>()
        var excluded: [(index: Int, detail: String)] = []
        var candidates: [DeviceNumber: [Int]] = [:]
        var candidateOrder: [DeviceNumber] = []
        let excludedFilesystems = excludedSuperblocks(scope)

        for (index, m) in mounts.enumerated() {
            guard scope.isIncluded(mountPoint: m.mountPoint, fsType: m.fsType) else { continue }
            if let (reason, detail) = ineligible[index] {
                if listedIneligible.insert(key[index]).inserted {
                    skipped.append((index, SkippedMount(mountPoint: m.mountPoint, fsType: m.fsType, reason: reason, detail: detail)))
                }
            } else if let pattern = scope.exclusion(mountPoint: m.mountPoint, fsType: m.fsType) {
                excluded.append((index, "excluded by \(pattern)"))
            } else if let (other, pattern) = excludedFilesystems[key[index]] {
                excluded.append((index, "its filesystem is also mounted at \(mounts[other].mountPoint), which is excluded by \(pattern): a freeze through this mount would freeze that one too"))
            } else {
                if candidates[key[index]] == nil { candidateOrder.append(key[index]) }
                candidates[key[index], default: []].append(index)
            }
        }

        var planned: [Selected] = []
        var openedThrough: [DeviceNumber: String] = [:]
        for k in candidateOrder {
            let inScope = candidates[k]!
            let visible = inScope.filter { coveredBy[$0] == nil }
            // All in-scope mounts covered: open it through any visible mount of the superblock.
            let fallback = visible.isEmpty ? superblocks[k]!.mounts.filter { coveredBy[$0] == nil } : []
            guard let opened = preferred(visible.isEmpty ? fallback : visible) else {
                for i in inScope {
                    let top = mounts[coveredBy[i]!]
                    skipped.append((i, SkippedMount(
                        mountPoint: mounts[i].mountPoint, fsType: mounts[i].fsType, reason: .shadowed,
                        detail: "covered by a later \(top.fsType) mount at the same path, and no other mount of this filesystem is reachable")))
                }
                continue
            }
            planned.append(Selected(key: k, opened: opened, others: visible.filter { $0 != opened }))
            openedThrough[k] = mounts[opened].mountPoint
            for i in inScope where coveredBy[i] != nil {
                let top = coveredBy[i]!
                let sameFilesystem = key[top] == k
                skipped.append((i, SkippedMount(
                    mountPoint: mounts[i].mountPoint, fsType: mounts[i].fsType,
                    reason: sameFilesystem ? .duplicate : .shadowed,
                    detail: (sameFilesystem
                        ? "mounted again over itself at the same path"
                        : "covered by a later \(mounts[top].fsType) mount at the same path")
                        + "; its filesystem is frozen through \(mounts[opened].mountPoint)")))
            }
        }

        for (index, detail) in excluded {
            let m = mounts[index]
            skipped.append((index, SkippedMount(mountPoint: m.mountPoint, fsType: m.fsType, reason: .excluded, detail: detail)))
        }

        // Stable by mountinfo order.
        let ordered = skipped.enumerated().sorted { ($0.element.index, $0.offset) < ($1.element.index, $1.offset) }
        return Selection(planned: planned, skipped: ordered.map { $0.element.1 })
    }

    /// The filesystems an exclusion reaches, with the first mount (mountinfo order) that
    /// matches it and the pattern. A freeze is of the superblock, so excluding any mount of a
    /// filesystem (a bind mount of it outside the include scope too) keeps the whole filesystem
    /// from being frozen: quiesced.conf's "never frozen" holds for every path it is mounted at.
    func excludedSuperblocks(_ scope: FreezeScope) -> [DeviceNumber: (index: Int, pattern: String)] {
        var out: [DeviceNumber: (index: Int, pattern: String)] = [:]
        for (index, m) in mounts.enumerated() where out[key[index]] == nil {
            if let pattern = scope.exclusion(mountPoint: m.mountPoint, fsType: m.fsType) { out[key[index]] = (index, pattern) }
        }
        return out
    }

    func selectExplicit(_ paths: [String], scope: FreezeScope) throws(PlanError) -> Selection {
        var planned: [Selected] = []
        var seenPaths = Set<String>()
        let excludedFilesystems = excludedSuperblocks(scope)
        for raw in paths {
            let path = FreezePlan.normalise(raw)
            guard seenPaths.insert(path).inserted else { continue }
            let atPath = mounts.indices.filter { mounts[$0].mountPoint == path }
            guard let index = atPath.last(where: { coveredBy[$0] == nil }) ?? atPath.last else {
                throw PlanError(kind: .unknownMount, mountPoint: path, message: "\(raw) is not a mount point")
            }
            let m = mounts[index]
            if let (reason, detail) = ineligible[index] {
                throw PlanError(kind: .ineligibleMount, mountPoint: path,
                                message: "cannot freeze \(path) (\(reason.rawValue)): \(detail)", reason: reason)
            }
            guard scope.isIncluded(mountPoint: m.mountPoint, fsType: m.fsType) else {
                throw PlanError(kind: .ineligibleMount, mountPoint: path,
                                message: "cannot freeze \(path) (not-included): outside the agent's configured include scope",
                                reason: .notIncluded)
            }
            if let pattern = scope.exclusion(mountPoint: m.mountPoint, fsType: m.fsType) {
                throw PlanError(kind: .ineligibleMount, mountPoint: path,
                                message: "cannot freeze \(path) (excluded): excluded by \(pattern) in the agent's configuration",
                                reason: .excluded)
            }
            if let (other, pattern) = excludedFilesystems[key[index]] {
                throw PlanError(kind: .ineligibleMount, mountPoint: path,
                                message: "cannot freeze \(path) (excluded): its filesystem is also mounted at \(mounts[other].mountPoint), which is excluded by \(pattern) in the agent's configuration",
                                reason: .excluded)
            }
            if let existing = planned.firstIndex(where: { $0.key == key[index] }) {
                planned[existing].others.append(index)
            } else {
                planned.append(Selected(key: key[index], opened: index, others: []))
            }
        }
        return Selection(planned: planned, skipped: [])
    }

    // MARK: Ordering

    /// The mountpoints other than `opened` at which a superblock is reachable (its mounts not
    /// covered by a later mount), and the `asked` ones, once each, in mountinfo order.
    private func otherMountPoints(of sb: Superblock, opened: Int, asked: [Int]) -> [String] {
        let openedPath = mounts[opened].mountPoint
        var seen: Set<String> = [openedPath]
        return sb.mounts.filter { i in i != opened && (coveredBy[i] == nil || asked.contains(i)) }
            .map { mounts[$0].mountPoint }
            .filter { seen.insert($0).inserted }
    }

    /// The superblock keys that the superblock `start` rests on: walk from its device through
    /// `lower`, its external log or journal devices, and loop backing filesystems (found by the
    /// backing file's mount ID, else by its st_dev among mountinfo devices), through any mounted
    /// superblock, planned or not. A backing file in an overlay leads on to the filesystem of
    /// the overlay's upper directory, where its writes land. The files an nbd device's server
    /// writes into count like a loop device's backing file.
    private func restsOn(_ start: DeviceNumber, topology: BlockTopology, byDevice: [DeviceNumber: DeviceNumber],
                         byMountDevice: [DeviceNumber: DeviceNumber], byMountID: [Int: Int]) -> Set<DeviceNumber> {
        guard let origin = superblocks[start]?.device else { return [] }
        func superblock(at location: BlockTopology.PathLocation) -> DeviceNumber? {
            location.mountID.flatMap { byMountID[$0] }.map { key[$0] } ?? byMountDevice[location.device]
        }
        var result = Set<DeviceNumber>()
        var pending = [origin]
        var seen = Set<DeviceNumber>()
        while let device = pending.popLast() {
            guard seen.insert(device).inserted else { continue }
            if device != origin, let holder = byDevice[device] { result.insert(holder) }
            pending.append(contentsOf: topology.lower[device] ?? [])
            pending.append(contentsOf: topology.externalDevices[device] ?? [])
            // A file the device writes into: a loop device's backing file, an nbd server's files.
            func holding(_ holderKey: DeviceNumber?, fileDevice: DeviceNumber) {
                if var holder = holderKey {
                    // Through overlays (each at most once) to a filesystem with a device.
                    while result.insert(holder).inserted, superblocks[holder]?.device == nil,
                          let upper = topology.overlayUpper[holder].flatMap(superblock(at:)) {
                        holder = upper
                    }
                    if let next = superblocks[holder]?.device { pending.append(next) }
                } else if fileDevice.major != 0 {
                    // The holding filesystem is not visible here; its device may still lead further.
                    pending.append(fileDevice)
                }
            }
            let backingMount = topology.loopBackingMount[device].flatMap { byMountID[$0] }
            if let backing = topology.loopBacking[device] ?? backingMount.map({ mounts[$0].device }) {
                // The mount the backing file's path leads to is exact (btrfs subvolumes have
                // st_dev values mountinfo does not show); else match st_dev against mountinfo.
                holding(backingMount.map({ key[$0] }) ?? byMountDevice[backing], fileDevice: backing)
            }
            for file in topology.servedFiles[device] ?? [] {
                holding(superblock(at: file), fileDevice: file.device)
            }
        }
        return result
    }

    func arrange(_ selection: Selection, topology: BlockTopology) throws(PlanError) -> FreezePlan {
        var byDevice: [DeviceNumber: DeviceNumber] = [:]
        var byMountDevice: [DeviceNumber: DeviceNumber] = [:]
        for k in superblockOrder {
            let sb = superblocks[k]!
            if let device = sb.device { byDevice[device] = k }
            for d in sb.mountDevices where byMountDevice[d] == nil { byMountDevice[d] = k }
        }

        var byMountID: [Int: Int] = [:]
        for (index, m) in mounts.enumerated() where byMountID[m.mountID] == nil { byMountID[m.mountID] = index }

        let plannedKeys = Set(selection.planned.map(\.key))
        var deps: [DeviceNumber: Set<DeviceNumber>] = [:]
        var restingOnCount: [DeviceNumber: Int] = [:]
        for p in selection.planned {
            let below = restsOn(p.key, topology: topology, byDevice: byDevice,
                                byMountDevice: byMountDevice, byMountID: byMountID)
            if below.contains(p.key) {
                let mp = mounts[p.opened].mountPoint
                throw PlanError(kind: .cycle, mountPoint: mp, message: "\(mp) rests on itself through its loop and block devices")
            }
            deps[p.key] = below.intersection(plannedKeys)
            for g in deps[p.key]! { restingOnCount[g, default: 0] += 1 }
        }

        // Layer: wave 0 holds what nothing planned rests on; each next wave what only earlier ones rested on.
        var waveOf: [DeviceNumber: Int] = [:]
        var remaining = selection.planned.map(\.key)
        var wave = 0
        while !remaining.isEmpty {
            let ready = remaining.filter { (restingOnCount[$0] ?? 0) == 0 }
            if ready.isEmpty {
                let names = remaining.map { k in mounts[selection.planned.first { $0.key == k }!.opened].mountPoint }.sorted()
                throw PlanError(kind: .cycle, mountPoint: names[0],
                                message: "filesystems rest on each other in a cycle: \(names.joined(separator: ", "))")
            }
            for k in ready {
                waveOf[k] = wave
                for g in deps[k]! { restingOnCount[g]! -= 1 }
            }
            let readySet = Set(ready)
            remaining.removeAll { readySet.contains($0) }
            wave += 1
        }

        let openedMountPoint = Dictionary(uniqueKeysWithValues: selection.planned.map { ($0.key, mounts[$0.opened].mountPoint) })
        var waves = [[PlannedFilesystem]](repeating: [], count: wave)
        for p in selection.planned {
            let m = mounts[p.opened]
            let sb = superblocks[p.key]!
            waves[waveOf[p.key]!].append(PlannedFilesystem(
                mountPoint: m.mountPoint,
                otherMountPoints: otherMountPoints(of: sb, opened: p.opened, asked: p.others),
                fsType: m.fsType,
                source: m.source,
                device: sb.device ?? m.device,
                mountDevices: sb.mountDevices,
                wave: waveOf[p.key]!,
                dependsOn: deps[p.key]!.map { openedMountPoint[$0]! }.sorted()))
        }
        for i in waves.indices { waves[i].sort { $0.mountPoint < $1.mountPoint } }
        return FreezePlan(waves: waves, skipped: selection.skipped)
    }
}
