// The QUIESCE_* variables COMMAND receives: what each guest's checkpoint is worth and what was frozen.
import QuiesceProtocol

/// The QUIESCE_* variables COMMAND receives.
public enum CommandEnvironment {
    /// Every variable name, with what it means, for --help.
    public static let documentation: [(name: String, meaning: String)] = [
        ("QUIESCE_CONSISTENCY", "application, filesystem or crash: the weakest over all agents (application: frozen after freeze hooks succeeded; filesystem: frozen without hooks; crash: some agent could not freeze)"),
        ("QUIESCE_OP_ID", "the operation id of this checkpoint's freeze on every agent"),
        ("QUIESCE_AGENTS", "every agent address, separated by ';'"),
        ("QUIESCE_FROZEN", "per frozen agent, ADDR=MOUNT,MOUNT,... separated by ';' (mountpoints in freeze order)"),
        ("QUIESCE_CRASH_CONSISTENT_AGENTS", "agents that could not freeze (only with --on-agent-failure crash-consistent), separated by ';'; empty when none"),
        ("QUIESCE_AGENT_CONSISTENCY", "per agent, ADDR=application|filesystem|crash separated by ';'"),
        ("QUIESCE_DEADLINE_MS", "wall-clock time (ms since the epoch) at which COMMAND is stopped and the guests thawed"),
        ("QUIESCE_HOOKS_NOT_HELD", "per agent, ADDR=HOOK,HOOK for the hooks that did not make it application-consistent (an optional hook that failed, a hook file the agent refused to run), separated by ';'; empty when none"),
        ("QUIESCE_FROZEN_JSON", "the same facts, exact whatever the paths contain: {\"ADDR\": {\"consistency\": C, \"frozen\": [MOUNT, ...], \"hooks_not_held\": [\"HOOK: why\", ...]}, ...}"),
        ("QUIESCE_TRUNCATED", "the variables above cut to 32 KiB (guests with very many mountpoints; Linux takes at most 128 KiB per variable), separated by ','; empty when none. A cut list ends in ';…' or ',…'; a cut QUIESCE_FROZEN_JSON is {} (the report of quiescectl --json has everything)"),
    ]

    /// The longest value of one variable, in bytes. Linux refuses to start a program with a
    /// variable over 128 KiB (MAX_ARG_STRLEN, include/uapi/linux/binfmts.h: E2BIG), and guests
    /// choose their mountpoints: without a cut, one guest's list denied COMMAND to the group.
    public static let maxValueBytes = 32 << 10

    /// `value` cut to `maxValueBytes` at its last separator (';' or ',') before the limit, with
    /// '…' after it; nil when it fits.
    static func cut(_ value: String) -> String? {
        guard value.utf8.count > maxValueBytes else { return nil }
        var bytes = Array(value.utf8.prefix(maxValueBytes - 3))
        if let sep = bytes.lastIndex(where: { $0 == UInt8(ascii: ";") || $0 == UInt8(ascii: ",") }) { bytes = Array(bytes[...sep]) }
        return String(decoding: bytes, as: UTF8.self) + "…"
    }

    public static func overallConsistency(_ agents: [AgentReport]) -> Consistency {
        agents.map { $0.failure == nil ? Consistency.of($0.freeze) : .crash }.min() ?? .crash
    }

    /// The variables for COMMAND, in the documented order.
    public static func make(opID: String, agents: [AgentReport], deadlineWallMs: Int64) -> [(String, String)] {
        let frozen = agents.filter { $0.freeze != nil && $0.failure == nil }
        let crash = agents.filter { $0.failure != nil || $0.freeze == nil }
        var truncated: [String] = []
        let vars: [(String, String)] = [
            ("QUIESCE_CONSISTENCY", overallConsistency(agents).rawValue),
            ("QUIESCE_OP_ID", opID),
            ("QUIESCE_AGENTS", agents.map(\.address.description).joined(separator: ";")),
            ("QUIESCE_FROZEN", frozen.map { "\($0.address)=\($0.freeze!.filesystems.map(\.mountPoint).joined(separator: ","))" }.joined(separator: ";")),
            ("QUIESCE_CRASH_CONSISTENT_AGENTS", crash.map(\.address.description).joined(separator: ";")),
            ("QUIESCE_AGENT_CONSISTENCY", agents.map { "\($0.address)=\(($0.failure == nil ? Consistency.of($0.freeze) : .crash).rawValue)" }.joined(separator: ";")),
            ("QUIESCE_DEADLINE_MS", String(deadlineWallMs)),
            ("QUIESCE_HOOKS_NOT_HELD", frozen.compactMap { a -> String? in
                let names = a.freeze!.hooksRefused.map(\.name)
                    + a.freeze!.hooks.filter { $0.isFreezePhase && !$0.succeeded }.map(\.name)
                return names.isEmpty ? nil : "\(a.address)=\(names.joined(separator: ","))"
            }.joined(separator: ";")),
            ("QUIESCE_FROZEN_JSON", frozenJSON(agents)),
        ].map { name, value in
            guard let short = cut(value) else { return (name, value) }
            truncated.append(name)
            // JSON cut in the middle is no JSON: an empty object says "see the report".
            return (name, name == "QUIESCE_FROZEN_JSON" ? "{}" : short)
        }
        return vars + [("QUIESCE_TRUNCATED", truncated.joined(separator: ","))]
    }

    /// QUIESCE_FROZEN_JSON: per agent, its consistency and frozen mountpoints, exact whatever
    /// characters the paths contain (QUIESCE_FROZEN's ';' ',' '=' separators cannot be).
    static func frozenJSON(_ agents: [AgentReport]) -> String {
        var o = JSONObject()
        for a in agents {
            let frozen = a.failure == nil ? (a.freeze?.filesystems.map(\.mountPoint) ?? []) : []
            let consistency = (a.failure == nil ? Consistency.of(a.freeze) : .crash).rawValue
            let notHeld = a.failure == nil ? (a.freeze.map { Consistency.notHeld($0) } ?? []) : []
            o[a.address.description] = ["consistency": .string(consistency), "frozen": .array(frozen.map(JSON.string)),
                                        "hooks_not_held": .array(notHeld.map(JSON.string))]
        }
        return JSON.object(o).text
    }

    /// `base` with every QUIESCE_* variable replaced by `vars`.
    public static func merge(base: [String], _ vars: [(String, String)]) -> [String] {
        merge(base: base.map { Array($0.utf8) }, vars).map { String(decoding: $0, as: UTF8.self) }
    }

    /// `base` ("NAME=value" bytes, as the environment holds them: other variables keep their
    /// bytes, UTF-8 or not) with every variable named in `vars` replaced by it.
    public static func merge(base: [[UInt8]], _ vars: [(String, String)]) -> [[UInt8]] {
        let names = Set(vars.map { Array($0.0.utf8) })
        let kept = base.filter { entry in
            guard let eq = entry.firstIndex(of: UInt8(ascii: "=")) else { return true }
            return !names.contains(Array(entry[..<eq]))
        }
        return kept + vars.map { Array("\($0.0)=\($0.1)".utf8) }
    }
}
