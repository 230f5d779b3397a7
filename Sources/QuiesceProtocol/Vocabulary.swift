// The open sets of words the wire carries besides error codes: skip reasons, hook phases, thaw reasons.

/// Why a mount was passed over (`reason` in a skipped-mount report, and in `ineligible-mount`
/// details). Extensible like `ErrorCode`: a reason this version does not define decodes as
/// itself, so a newer agent's reasons reach the user unchanged. `SkipReason.all` is the set
/// protocol version 1 defines (PROTOCOL.md section 5).
public struct SkipReason: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: String
    public init(rawValue: String) { self.rawValue = rawValue }
    public var description: String { rawValue }

    /// A filesystem with no storage of its own, or that cannot be written (tmpfs, proc, overlay, squashfs, FUSE…).
    public static let pseudo = SkipReason(rawValue: "pseudo")
    /// A network or host-shared filesystem (nfs, cifs, 9p, virtiofs…): the guest cannot make it consistent.
    public static let network = SkipReason(rawValue: "network")
    /// The superblock is read-only: nothing to flush.
    public static let readOnly = SkipReason(rawValue: "read-only")
    /// Matched an exclude pattern of the scope.
    public static let excluded = SkipReason(rawValue: "excluded")
    /// Outside an include scope. Scope plans do not list such mounts; an explicit list naming one is refused with it.
    public static let notIncluded = SkipReason(rawValue: "not-included")
    /// Has no block device (major 0 and no block-device source).
    public static let noDevice = SkipReason(rawValue: "no-device")
    /// Covered by a later mount of another filesystem at the same path, so it cannot be opened by path.
    public static let shadowed = SkipReason(rawValue: "shadowed")
    /// Covered by a later mount of the same filesystem at the same path (mounted twice over itself).
    public static let duplicate = SkipReason(rawValue: "duplicate")
    /// `FIFREEZE` answered `EOPNOTSUPP`: the filesystem cannot freeze.
    public static let unsupported = SkipReason(rawValue: "unsupported")
    /// Unmounted (or replaced by another filesystem) between planning and freezing.
    public static let vanished = SkipReason(rawValue: "vanished")
    /// `FIFREEZE` answered `EBUSY`: someone else holds it frozen, and the agent's policy is to skip such filesystems.
    public static let frozenElsewhere = SkipReason(rawValue: "frozen-elsewhere")

    /// Every reason protocol version 1 defines.
    public static let all: [SkipReason] = [
        .pseudo, .network, .readOnly, .excluded, .notIncluded, .noDevice, .shadowed, .duplicate,
        .unsupported, .vanished, .frozenElsewhere,
    ]
}

/// When a hook ran (`phase` in a hook report, `QUIESCE_PHASE` in the hook's environment, the
/// hook's first argument). Extensible: an unknown phase decodes as itself. `HookPhase.all` is
/// the set protocol version 1 defines; packaging/hooks.d/README is the hook's side of it.
public struct HookPhase: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: String
    public init(rawValue: String) { self.rawValue = rawValue }
    public var description: String { rawValue }

    /// Before the filesystems freeze: the hook makes its application consistent (or takes a lock and holds it).
    public static let freeze = HookPhase(rawValue: "freeze")
    /// After the filesystems thawed: the hook lets its application go on.
    public static let thaw = HookPhase(rawValue: "thaw")
    /// The freeze did not happen or was given up after this hook's `freeze`: it undoes what it did.
    public static let freezeFailed = HookPhase(rawValue: "freeze-failed")

    /// Every phase protocol version 1 defines.
    public static let all: [HookPhase] = [.freeze, .thaw, .freezeFailed]
}

/// Why the agent thawed (`reason` of the `thawed` event and of `last_auto_thaw`, `thawed_reason`
/// in a `not-frozen` error's details). Extensible: an unknown reason decodes as itself.
/// `ThawReason.all` is the set protocol version 1 defines (PROTOCOL.md section 7).
public struct ThawReason: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: String
    public init(rawValue: String) { self.rawValue = rawValue }
    public var description: String { rawValue }

    /// A `thaw` request ended the freeze.
    public static let request = ThawReason(rawValue: "request")
    /// The freeze reached its deadline.
    public static let deadline = ThawReason(rawValue: "deadline")
    /// The connection (or device session) that held a `bound` freeze closed.
    public static let disconnect = ThawReason(rawValue: "disconnect")
    /// The agent got SIGTERM or SIGINT and thawed before stopping.
    public static let signal = ThawReason(rawValue: "signal")
    /// A new agent process found a freeze its predecessor left and thawed it.
    public static let restart = ThawReason(rawValue: "restart")

    /// Every reason protocol version 1 defines.
    public static let all: [ThawReason] = [.request, .deadline, .disconnect, .signal, .restart]
}
