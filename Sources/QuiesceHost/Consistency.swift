// How good a guest's checkpoint is (crash, filesystem, application), judged from its freeze and thaw.
import QuiesceProtocol

/// How good a checkpoint of a guest is.
public enum Consistency: String, Sendable, CaseIterable, Comparable {
    /// Not quiesced: like pulling the power cord (journal replay on restore, page cache lost).
    case crash
    /// Filesystems synced and frozen.
    case filesystem
    /// Frozen, and freeze hooks told applications (databases) to flush first.
    case application

    private var rank: Int {
        switch self {
        case .crash: 0
        case .filesystem: 1
        case .application: 2
        }
    }

    public static func < (a: Consistency, b: Consistency) -> Bool { a.rank < b.rank }

    /// The consistency a freeze gives: application when freeze hooks ran and every one
    /// succeeded or holds (an optional hook that failed leaves its application only
    /// filesystem-consistent), lowered to filesystem when the thaw says a holding hook ended
    /// while frozen (`lost`).
    public static func of(_ freeze: FreezeResult?, thaw: ThawResult? = nil) -> Consistency {
        guard let freeze else { return .crash }
        let hooks = freeze.hooks.filter(\.isFreezePhase)
        if !hooks.isEmpty && notHeld(freeze, thaw: thaw).isEmpty { return .application }  // a refused hook counts against
        return .filesystem
    }

    /// The hooks that did not keep their application consistent through the snapshot, one
    /// "NAME: why" each: a hook file the agent refused to run (its application was not asked),
    /// a freeze hook that failed (optional) and a holding hook that ended while frozen.
    public static func notHeld(_ freeze: FreezeResult, thaw: ThawResult? = nil) -> [String] {
        var out: [String] = freeze.hooksRefused.map { "\($0.name): refused (\($0.reason))" }
        for h in freeze.hooks where h.isFreezePhase && !h.succeeded {
            out.append("\(h.name): \(h.error ?? h.effectiveOutcome.rawValue)\(h.optional ? " (optional)" : "")")
        }
        for h in thaw?.hooks ?? [] where h.effectiveOutcome == .lost {
            out.append("\(h.name): \(h.error ?? "ended while holding")")
        }
        return out
    }

    /// "application-consistent".
    public var adjective: String { "\(rawValue)-consistent" }
}
