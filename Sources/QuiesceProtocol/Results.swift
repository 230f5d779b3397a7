// Typed results of each operation. The agent encodes them, the coordinator decodes them.

/// A value with a JSON object form. Decoding is lenient about unknown fields (they are ignored)
/// and strict about the types of known ones.
public protocol WireObject: Sendable {
    var json: JSONObject { get }
    init(json: JSONObject) throws(ProtocolError)
}

extension Fields {
    func required<T>(_ key: String, _ value: T?) throws(ProtocolError) -> T {
        guard let value else { throw ProtocolError(.badRequest, "missing \"\(key)\"") }
        return value
    }

    /// `KEY_total`: the full length of the list `KEY` when the agent cut it to a sample
    /// (ReplyBudget); nil when the list is complete.
    func total(_ key: String) throws(ProtocolError) -> Int64? { try int(key + "_total") }

    func objects<T: WireObject>(_ key: String, as: T.Type) throws(ProtocolError) -> [T] {
        guard let v = object[key], !v.isNull else { return [] }
        guard let items = v.arrayValue else { throw ProtocolError(.badRequest, "\"\(key)\" must be an array") }
        var out: [T] = []
        for item in items {
            guard let o = item.objectValue else { throw ProtocolError(.badRequest, "\"\(key)\" must hold objects") }
            out.append(try T(json: o))
        }
        return out
    }
}

extension JSONObject {
    mutating func set(_ key: String, _ value: String?) { if let value { self[key] = .string(value) } }
    mutating func set(_ key: String, _ value: Int64?) { if let value { self[key] = .int(value) } }
    mutating func set(_ key: String, _ value: [String]) { self[key] = .array(value.map(JSON.string)) }
    mutating func set<T: WireObject>(_ key: String, _ value: [T]) { self[key] = .array(value.map { .object($0.json) }) }
    /// `KEY_total` after a list, when the list is a sample.
    mutating func setTotal(_ key: String, _ total: Int64?) { set(key + "_total", total) }
    mutating func setTruncated(_ truncated: Bool) { if truncated { self["truncated"] = true } }
}

/// One filesystem (one superblock) in a plan, a freeze, a thaw or a sync, with the timings of
/// whatever was done to it. Durations are microseconds.
public struct FilesystemReport: WireObject, Equatable {
    public var mountPoint: String
    public var type: String
    /// The block device, "major:minor".
    public var device: String
    public var source: String
    /// Other mountpoints of the same superblock (bind mounts, btrfs subvolumes); a sample of
    /// them when `otherMountsTotal` is set.
    public var otherMounts: [String]
    /// How many other mountpoints there are, when `otherMounts` holds only the first of them.
    public var otherMountsTotal: Int64?
    /// The dependency wave: wave 0 freezes first, thaw runs the waves backwards.
    public var wave: Int64?
    /// Mountpoints of filesystems this one is stacked on (frozen after it, thawed before it).
    public var dependsOn: [String]
    /// How many filesystems this one depends on, when `dependsOn` is a sample.
    public var dependsOnTotal: Int64?
    public var presyncUs: Int64?
    public var freezeUs: Int64?
    /// When this filesystem was frozen, counted from the start of the freeze phase.
    public var frozenAtUs: Int64?
    public var thawUs: Int64?
    public var syncUs: Int64?
    /// What went wrong with this filesystem, e.g. "EIO: Input/output error".
    public var error: String?
    /// True when the thaw's FITHAW found this filesystem no longer frozen (EINVAL): something
    /// else thawed it while the freeze held it (`fsfreeze -u`, qemu-ga's thaw of every mount),
    /// so a copy taken after that moment was not quiesced. Nil otherwise.
    public var thawedElsewhere: Bool?

    /// How many mountpoints this superblock has in all: its own and every other one.
    /// Saturating: `mounts_total` comes from the agent and may be anything up to Int64.max.
    public var mountCount: Int64 {
        let (sum, overflow) = (otherMountsTotal ?? Int64(otherMounts.count)).addingReportingOverflow(1)
        return overflow ? Int64.max : sum
    }

    public init(mountPoint: String, type: String, device: String, source: String, otherMounts: [String] = [],
                wave: Int64? = nil, dependsOn: [String] = []) {
        self.mountPoint = mountPoint
        self.type = type
        self.device = device
        self.source = source
        self.otherMounts = otherMounts
        self.wave = wave
        self.dependsOn = dependsOn
    }

    public var json: JSONObject {
        var o = JSONObject()
        o.set("mountpoint", mountPoint)
        o.set("type", type)
        o.set("device", device)
        o.set("source", source)
        if !otherMounts.isEmpty || otherMountsTotal != nil { o.set("mounts", otherMounts) }
        o.setTotal("mounts", otherMountsTotal)
        o.set("wave", wave)
        if !dependsOn.isEmpty || dependsOnTotal != nil { o.set("depends_on", dependsOn) }
        o.setTotal("depends_on", dependsOnTotal)
        o.set("presync_us", presyncUs)
        o.set("freeze_us", freezeUs)
        o.set("frozen_at_us", frozenAtUs)
        o.set("thaw_us", thawUs)
        o.set("sync_us", syncUs)
        o.set("error", error)
        if thawedElsewhere == true { o["thawed_elsewhere"] = true }
        return o
    }

    public init(json: JSONObject) throws(ProtocolError) {
        let f = Fields(object: json)
        mountPoint = try f.required("mountpoint", try f.string("mountpoint"))
        type = try f.string("type") ?? ""
        device = try f.string("device") ?? ""
        source = try f.string("source") ?? ""
        otherMounts = try f.strings("mounts") ?? []
        otherMountsTotal = try f.total("mounts")
        wave = try f.int("wave")
        dependsOn = try f.strings("depends_on") ?? []
        dependsOnTotal = try f.total("depends_on")
        presyncUs = try f.int("presync_us")
        freezeUs = try f.int("freeze_us")
        frozenAtUs = try f.int("frozen_at_us")
        thawUs = try f.int("thaw_us")
        syncUs = try f.int("sync_us")
        error = try f.string("error")
        thawedElsewhere = try f.bool("thawed_elsewhere").flatMap { $0 ? true : nil }
    }
}

/// A mount that was passed over, and why (`SkipReason`).
public struct SkippedReport: WireObject, Equatable {
    public var mountPoint: String
    public var type: String
    public var reason: SkipReason
    public var detail: String

    public init(mountPoint: String, type: String, reason: SkipReason, detail: String = "") {
        self.mountPoint = mountPoint
        self.type = type
        self.reason = reason
        self.detail = detail
    }

    public var json: JSONObject {
        var o: JSONObject = ["mountpoint": .string(mountPoint), "type": .string(type), "reason": .string(reason.rawValue)]
        if !detail.isEmpty { o["detail"] = .string(detail) }
        return o
    }

    public init(json: JSONObject) throws(ProtocolError) {
        let f = Fields(object: json)
        mountPoint = try f.required("mountpoint", try f.string("mountpoint"))
        type = try f.string("type") ?? ""
        reason = SkipReason(rawValue: try f.string("reason") ?? "")
        detail = try f.string("detail") ?? ""
    }
}

/// What became of one hook run (`outcome` in a hook report).
public enum HookOutcome: String, Sendable, CaseIterable {
    /// Exited 0.
    case ok
    /// A hold-style hook said `ready` and keeps running (its lock is held) until told to finish.
    case holding
    /// Exited non-zero, was killed by a signal, or could not start.
    case failed
    /// Outlived its timeout; its whole process group was killed.
    case timedOut = "timed-out"
    /// A hold-style hook ended before it was told to finish: whatever it held (a lock) was
    /// gone for part of the freeze, so the snapshot is not application-consistent for it.
    case lost
}

/// One hook run around a freeze. Hook reports are bounded: `output` is at most
/// `HookReport.maxOutputBytes` bytes (the end of what the hook wrote, stdout and stderr
/// together), and a reply carries at most `HookReport.maxHooks` hooks per phase.
public struct HookReport: WireObject, Equatable {
    public static let maxOutputBytes = 512
    public static let maxHooks = 16

    /// The last non-blank line of `output`, trimmed and cut to `limit` characters (with "…"),
    /// for a message saying why the hook failed; nil when it printed nothing.
    public func lastOutputLine(limit: Int) -> String? {
        guard let line = output.split(separator: "\n").last(where: { !$0.allSatisfy(\.isWhitespace) }) else { return nil }
        let text = String(line).trimmingASCIIWhitespace()
        return text.count > limit ? String(text.prefix(limit)) + "…" : text
    }

    public var name: String
    /// Empty from agents that did not report it (their reports were all of the freeze phase).
    public var phase: HookPhase
    public var exitCode: Int64?
    public var durationUs: Int64
    public var error: String?
    /// Nil from agents before hook outcomes were reported: derive it from `error` and `exitCode`.
    public var outcome: HookOutcome?
    /// Declared hold-style in its header.
    public var hold: Bool
    /// Declared optional: its failure lets the freeze go on, filesystem-consistent for it.
    public var optional: Bool
    /// The end of the hook's output (UTF-8, invalid bytes replaced), empty when none.
    public var output: String

    public init(name: String, phase: HookPhase, exitCode: Int64?, durationUs: Int64, error: String? = nil,
                outcome: HookOutcome? = nil, hold: Bool = false, optional: Bool = false, output: String = "") {
        self.name = name
        self.phase = phase
        self.exitCode = exitCode
        self.durationUs = durationUs
        self.error = error
        self.outcome = outcome
        self.hold = hold
        self.optional = optional
        self.output = output
    }

    /// The outcome, derived for agents that do not report one.
    public var effectiveOutcome: HookOutcome {
        outcome ?? (error == nil && (exitCode ?? 0) == 0 ? .ok : .failed)
    }

    /// Whether this run belongs to the freeze phase (agents that named no phase ran only that one).
    public var isFreezePhase: Bool { phase == .freeze || phase.rawValue.isEmpty }

    /// Whether this run kept its application consistent: ok, or holding.
    public var succeeded: Bool { effectiveOutcome == .ok || effectiveOutcome == .holding }

    public var json: JSONObject {
        var o: JSONObject = ["name": .string(name), "phase": .string(phase.rawValue), "duration_us": .int(durationUs)]
        o.set("outcome", outcome?.rawValue)
        o.set("exit_code", exitCode)
        o.set("error", error)
        if hold { o["hold"] = .bool(true) }
        if optional { o["optional"] = .bool(true) }
        if !output.isEmpty { o["output"] = .string(output) }
        return o
    }

    public init(json: JSONObject) throws(ProtocolError) {
        let f = Fields(object: json)
        name = try f.required("name", try f.string("name"))
        phase = HookPhase(rawValue: try f.string("phase") ?? "")
        exitCode = try f.int("exit_code", min: Int64.min)
        durationUs = try f.int("duration_us") ?? 0
        error = try f.string("error")
        outcome = (try f.string("outcome")).flatMap(HookOutcome.init(rawValue:))
        hold = try f.bool("hold") ?? false
        optional = try f.bool("optional") ?? false
        output = try f.string("output") ?? ""
    }
}

/// A file in the hooks directory that the agent refused to run, with the reason.
public struct RefusedHook: WireObject, Equatable {
    public var name: String
    public var reason: String

    public init(name: String, reason: String) {
        self.name = name
        self.reason = reason
    }

    public var json: JSONObject { ["name": .string(name), "reason": .string(reason)] }

    public init(json: JSONObject) throws(ProtocolError) {
        let f = Fields(object: json)
        name = try f.required("name", try f.string("name"))
        reason = try f.string("reason") ?? ""
    }
}

/// `hello`'s result: who the agent is and what it can do.
public struct HelloResult: WireObject, Equatable {
    public var version: Int64
    public var agent: String
    public var agentVersion: String
    public var capabilities: [String]
    public var maxFrame: Int64
    public var maxFreezeMs: Int64

    public init(version: Int64, agent: String, agentVersion: String, capabilities: [String], maxFrame: Int64, maxFreezeMs: Int64) {
        self.version = version
        self.agent = agent
        self.agentVersion = agentVersion
        self.capabilities = capabilities
        self.maxFrame = maxFrame
        self.maxFreezeMs = maxFreezeMs
    }

    public var json: JSONObject {
        var o = JSONObject()
        o.set("version", version)
        o.set("agent", agent)
        o.set("agent_version", agentVersion)
        o.set("capabilities", capabilities)
        o.set("max_frame", maxFrame)
        o.set("max_freeze_ms", maxFreezeMs)
        return o
    }

    public init(json: JSONObject) throws(ProtocolError) {
        let f = Fields(object: json)
        version = try f.required("version", try f.int("version"))
        agent = try f.string("agent") ?? ""
        agentVersion = try f.string("agent_version") ?? ""
        capabilities = try f.strings("capabilities") ?? []
        maxFrame = try f.int("max_frame") ?? Int64(ProtocolLimits.maxFrameBytes)
        maxFreezeMs = try f.int("max_freeze_ms") ?? 0
    }
}

/// `filesystems`' result: what a freeze would touch, in freeze order, and what it passes over.
public struct FilesystemsResult: WireObject, Equatable {
    public var filesystems: [FilesystemReport]
    public var skipped: [SkippedReport]
    /// Full counts when the lists are samples (`truncated`).
    public var filesystemsTotal: Int64?
    public var skippedTotal: Int64?
    /// The agent cut some list of this result to fit the protocol's limits.
    public var truncated = false

    public init(filesystems: [FilesystemReport], skipped: [SkippedReport]) {
        self.filesystems = filesystems
        self.skipped = skipped
    }

    public var json: JSONObject {
        var o = JSONObject()
        o.set("filesystems", filesystems)
        o.setTotal("filesystems", filesystemsTotal)
        o.set("skipped", skipped)
        o.setTotal("skipped", skippedTotal)
        o.setTruncated(truncated)
        return o
    }

    public init(json: JSONObject) throws(ProtocolError) {
        let f = Fields(object: json)
        filesystems = try f.objects("filesystems", as: FilesystemReport.self)
        filesystemsTotal = try f.total("filesystems")
        skipped = try f.objects("skipped", as: SkippedReport.self)
        skippedTotal = try f.total("skipped")
        truncated = try f.bool("truncated") ?? false
    }
}

/// `freeze`'s result. `stallUs` is the writer-stall window: from the moment the first
/// filesystem began to freeze (its writers start to block) until the last one was frozen.
public struct FreezeResult: WireObject, Equatable {
    public var opID: String
    public var mode: FreezeMode
    /// In freeze order.
    public var filesystems: [FilesystemReport]
    public var skipped: [SkippedReport]
    public var hooks: [HookReport]
    /// Hook files that were not run (unsafe ownership or mode, bad header), at most `HookReport.maxHooks`.
    public var hooksRefused: [RefusedHook]
    public var presyncUs: Int64
    public var freezeUs: Int64
    public var stallUs: Int64
    public var totalUs: Int64
    public var timeoutMs: Int64
    /// Wall-clock time (ms since the epoch) at which the agent thaws by itself.
    public var deadlineMs: Int64
    /// True when this reply repeats the result of an earlier request with the same op_id.
    public var replayed: Bool
    /// Full counts when the lists are samples (`truncated`).
    public var filesystemsTotal: Int64?
    public var skippedTotal: Int64?
    public var hooksTotal: Int64?
    /// The agent cut some list of this result to fit the protocol's limits.
    public var truncated = false

    /// How many filesystems (superblocks) were frozen, also when `filesystems` is a sample.
    public var filesystemCount: Int64 { filesystemsTotal ?? Int64(filesystems.count) }
    /// How many mountpoints the frozen filesystems have in all, as far as this result tells
    /// (bind mounts included; a lower bound when `filesystems` itself is a sample).
    public var mountCount: Int64 {
        filesystems.reduce(0) { total, fs in
            let (sum, overflow) = total.addingReportingOverflow(fs.mountCount)
            return overflow ? Int64.max : sum
        }
    }

    public init(opID: String, mode: FreezeMode, filesystems: [FilesystemReport], skipped: [SkippedReport],
                hooks: [HookReport], presyncUs: Int64, freezeUs: Int64, stallUs: Int64, totalUs: Int64,
                timeoutMs: Int64, deadlineMs: Int64, replayed: Bool = false, hooksRefused: [RefusedHook] = []) {
        self.opID = opID
        self.hooksRefused = hooksRefused
        self.mode = mode
        self.filesystems = filesystems
        self.skipped = skipped
        self.hooks = hooks
        self.presyncUs = presyncUs
        self.freezeUs = freezeUs
        self.stallUs = stallUs
        self.totalUs = totalUs
        self.timeoutMs = timeoutMs
        self.deadlineMs = deadlineMs
        self.replayed = replayed
    }

    public var json: JSONObject {
        var o = JSONObject()
        o.set("op_id", opID)
        o.set("mode", mode.rawValue)
        o.set("filesystems", filesystems)
        o.setTotal("filesystems", filesystemsTotal)
        o.set("skipped", skipped)
        o.setTotal("skipped", skippedTotal)
        o.set("hooks", hooks)
        o.setTotal("hooks", hooksTotal)
        if !hooksRefused.isEmpty { o.set("hooks_refused", hooksRefused) }
        o.set("presync_us", presyncUs)
        o.set("freeze_us", freezeUs)
        o.set("stall_us", stallUs)
        o.set("total_us", totalUs)
        o.set("timeout_ms", timeoutMs)
        o.set("deadline_ms", deadlineMs)
        o["replayed"] = .bool(replayed)
        o.setTruncated(truncated)
        return o
    }

    public init(json: JSONObject) throws(ProtocolError) {
        let f = Fields(object: json)
        opID = try f.required("op_id", try f.string("op_id"))
        mode = FreezeMode(rawValue: try f.string("mode") ?? "") ?? .bound
        filesystems = try f.objects("filesystems", as: FilesystemReport.self)
        filesystemsTotal = try f.total("filesystems")
        skipped = try f.objects("skipped", as: SkippedReport.self)
        skippedTotal = try f.total("skipped")
        hooks = try f.objects("hooks", as: HookReport.self)
        hooksTotal = try f.total("hooks")
        hooksRefused = try f.objects("hooks_refused", as: RefusedHook.self)
        presyncUs = try f.int("presync_us") ?? 0
        freezeUs = try f.int("freeze_us") ?? 0
        stallUs = try f.int("stall_us") ?? 0
        totalUs = try f.int("total_us") ?? 0
        timeoutMs = try f.int("timeout_ms") ?? 0
        deadlineMs = try f.int("deadline_ms") ?? 0
        replayed = try f.bool("replayed") ?? false
        truncated = try f.bool("truncated") ?? false
    }
}

/// `thaw`'s result. Thaw is idempotent: thawing a thawed agent succeeds with `wasFrozen` false.
public struct ThawResult: WireObject, Equatable {
    public var opID: String?
    public var wasFrozen: Bool
    public var filesystems: [FilesystemReport]
    public var hooks: [HookReport]
    public var totalUs: Int64
    /// How long the filesystems were frozen.
    public var frozenUs: Int64?
    /// Full counts when the lists are samples (`truncated`).
    public var filesystemsTotal: Int64?
    public var hooksTotal: Int64?
    /// The agent cut some list of this result to fit the protocol's limits.
    public var truncated = false

    /// How many filesystems were thawed, also when `filesystems` is a sample.
    public var filesystemCount: Int64 { filesystemsTotal ?? Int64(filesystems.count) }

    public init(opID: String?, wasFrozen: Bool, filesystems: [FilesystemReport], hooks: [HookReport] = [],
                totalUs: Int64, frozenUs: Int64?) {
        self.opID = opID
        self.wasFrozen = wasFrozen
        self.filesystems = filesystems
        self.hooks = hooks
        self.totalUs = totalUs
        self.frozenUs = frozenUs
    }

    public var json: JSONObject {
        var o = JSONObject()
        o.set("op_id", opID)
        o["was_frozen"] = .bool(wasFrozen)
        o.set("filesystems", filesystems)
        o.setTotal("filesystems", filesystemsTotal)
        if !hooks.isEmpty || hooksTotal != nil { o.set("hooks", hooks) }
        o.setTotal("hooks", hooksTotal)
        o.set("total_us", totalUs)
        o.set("frozen_us", frozenUs)
        o.setTruncated(truncated)
        return o
    }

    public init(json: JSONObject) throws(ProtocolError) {
        let f = Fields(object: json)
        opID = try f.string("op_id")
        wasFrozen = try f.bool("was_frozen") ?? false
        filesystems = try f.objects("filesystems", as: FilesystemReport.self)
        filesystemsTotal = try f.total("filesystems")
        hooks = try f.objects("hooks", as: HookReport.self)
        hooksTotal = try f.total("hooks")
        totalUs = try f.int("total_us") ?? 0
        frozenUs = try f.int("frozen_us")
        truncated = try f.bool("truncated") ?? false
    }
}

/// `sync`'s result.
public struct SyncResult: WireObject, Equatable {
    public var filesystems: [FilesystemReport]
    public var totalUs: Int64
    /// The full count when `filesystems` is a sample (`truncated`).
    public var filesystemsTotal: Int64?
    /// The agent cut some list of this result to fit the protocol's limits.
    public var truncated = false

    public init(filesystems: [FilesystemReport], totalUs: Int64) {
        self.filesystems = filesystems
        self.totalUs = totalUs
    }

    public var json: JSONObject {
        var o = JSONObject()
        o.set("filesystems", filesystems)
        o.setTotal("filesystems", filesystemsTotal)
        o.set("total_us", totalUs)
        o.setTruncated(truncated)
        return o
    }

    public init(json: JSONObject) throws(ProtocolError) {
        let f = Fields(object: json)
        filesystems = try f.objects("filesystems", as: FilesystemReport.self)
        filesystemsTotal = try f.total("filesystems")
        totalUs = try f.int("total_us") ?? 0
        truncated = try f.bool("truncated") ?? false
    }
}

/// The agent's state as `status` reports it.
public enum AgentStateName: String, Sendable, CaseIterable {
    case thawed, freezing, frozen, thawing
}

/// The last time the agent thawed on its own (deadline, disconnect, signal, restart).
public struct AutoThawReport: WireObject, Equatable {
    public var reason: ThawReason
    public var opID: String
    public var atMs: Int64
    public var filesystems: [String]
    /// The full count when `filesystems` is a sample.
    public var filesystemsTotal: Int64?

    public init(reason: ThawReason, opID: String, atMs: Int64, filesystems: [String]) {
        self.reason = reason
        self.opID = opID
        self.atMs = atMs
        self.filesystems = filesystems
    }

    public var json: JSONObject {
        var o = JSONObject()
        o.set("reason", reason.rawValue)
        o.set("op_id", opID)
        o.set("at_ms", atMs)
        o.set("filesystems", filesystems)
        o.setTotal("filesystems", filesystemsTotal)
        return o
    }

    public init(json: JSONObject) throws(ProtocolError) {
        let f = Fields(object: json)
        reason = ThawReason(rawValue: try f.string("reason") ?? "")
        opID = try f.string("op_id") ?? ""
        atMs = try f.int("at_ms") ?? 0
        filesystems = try f.strings("filesystems") ?? []
        filesystemsTotal = try f.total("filesystems")
    }
}

/// A kernel call that a freeze gave up waiting for and that has not returned yet: a FIFREEZE
/// or syncfs blocked in the kernel, because the filesystem's storage stopped completing writes
/// or because it rests on a filesystem that was frozen before it. When it returns, the agent
/// thaws what it froze at once.
public struct StuckCallReport: WireObject, Equatable {
    public var mountPoint: String
    /// "FIFREEZE" or "syncfs".
    public var call: String
    /// The operation that made the call.
    public var opID: String
    /// Wall-clock ms since the epoch when the call was made.
    public var sinceMs: Int64

    public init(mountPoint: String, call: String, opID: String, sinceMs: Int64) {
        self.mountPoint = mountPoint
        self.call = call
        self.opID = opID
        self.sinceMs = sinceMs
    }

    public var json: JSONObject {
        ["mountpoint": .string(mountPoint), "call": .string(call), "op_id": .string(opID), "since_ms": .int(sinceMs)]
    }

    public init(json: JSONObject) throws(ProtocolError) {
        let f = Fields(object: json)
        mountPoint = try f.required("mountpoint", try f.string("mountpoint"))
        call = try f.string("call") ?? ""
        opID = try f.string("op_id") ?? ""
        sinceMs = try f.int("since_ms") ?? 0
    }
}

/// `status`'s result.
public struct StatusResult: WireObject, Equatable {
    public var state: AgentStateName
    public var opID: String?
    public var mode: FreezeMode?
    /// Mountpoints frozen (or being frozen / thawed), in freeze order.
    public var filesystems: [String]
    public var sinceMs: Int64?
    public var deadlineMs: Int64?
    public var remainingMs: Int64?
    /// The peer that asked for the current freeze, e.g. "unix uid=0 pid=812" or "vsock cid=2".
    public var requestedBy: String?
    public var lastAutoThaw: AutoThawReport?
    /// Kernel calls of abandoned freezes still blocked (omitted on the wire when none).
    public var stuck: [StuckCallReport]
    /// The full count when `filesystems` is a sample (`truncated`).
    public var filesystemsTotal: Int64?
    /// The agent cut some list of this result to fit the protocol's limits.
    public var truncated = false
    /// The current freeze's hooks (freeze phase; a holding hook that has died shows `lost`).
    public var hooks: [HookReport]
    /// Hook files the agent refuses to run, as of the last look at the hooks directory.
    public var hooksRefused: [RefusedHook]
    /// While `thawing`: wall-clock time (ms since the epoch) at which every filesystem was
    /// thawed (the last FITHAW returned) and the thaw hooks began; nil before that.
    public var thawedAtMs: Int64?

    public init(state: AgentStateName, opID: String? = nil, mode: FreezeMode? = nil, filesystems: [String] = [],
                sinceMs: Int64? = nil, deadlineMs: Int64? = nil, remainingMs: Int64? = nil,
                requestedBy: String? = nil, lastAutoThaw: AutoThawReport? = nil,
                hooks: [HookReport] = [], hooksRefused: [RefusedHook] = [], stuck: [StuckCallReport] = [],
                thawedAtMs: Int64? = nil) {
        self.state = state
        self.thawedAtMs = thawedAtMs
        self.hooks = hooks
        self.hooksRefused = hooksRefused
        self.opID = opID
        self.mode = mode
        self.filesystems = filesystems
        self.sinceMs = sinceMs
        self.deadlineMs = deadlineMs
        self.remainingMs = remainingMs
        self.requestedBy = requestedBy
        self.lastAutoThaw = lastAutoThaw
        self.stuck = stuck
    }

    public var json: JSONObject {
        var o = JSONObject()
        o.set("state", state.rawValue)
        o.set("op_id", opID)
        o.set("mode", mode?.rawValue)
        o.set("filesystems", filesystems)
        o.setTotal("filesystems", filesystemsTotal)
        o.set("since_ms", sinceMs)
        o.set("deadline_ms", deadlineMs)
        o.set("remaining_ms", remainingMs)
        o.set("requested_by", requestedBy)
        if let lastAutoThaw { o["last_auto_thaw"] = .object(lastAutoThaw.json) }
        if !stuck.isEmpty { o.set("stuck", stuck) }
        o.setTruncated(truncated)
        if !hooks.isEmpty { o.set("hooks", hooks) }
        if !hooksRefused.isEmpty { o.set("hooks_refused", hooksRefused) }
        o.set("thawed_at_ms", thawedAtMs)
        return o
    }

    public init(json: JSONObject) throws(ProtocolError) {
        let f = Fields(object: json)
        let s = try f.required("state", try f.string("state"))
        guard let state = AgentStateName(rawValue: s) else { throw ProtocolError(.badRequest, "unknown state \"\(s)\"") }
        self.state = state
        opID = try f.string("op_id")
        mode = (try f.string("mode")).flatMap(FreezeMode.init(rawValue:))
        filesystems = try f.strings("filesystems") ?? []
        filesystemsTotal = try f.total("filesystems")
        sinceMs = try f.int("since_ms")
        deadlineMs = try f.int("deadline_ms")
        remainingMs = try f.int("remaining_ms", min: Int64.min)
        requestedBy = try f.string("requested_by")
        if let o = json["last_auto_thaw"]?.objectValue { lastAutoThaw = try AutoThawReport(json: o) }
        stuck = try f.objects("stuck", as: StuckCallReport.self)
        truncated = try f.bool("truncated") ?? false
        hooks = try f.objects("hooks", as: HookReport.self)
        hooksRefused = try f.objects("hooks_refused", as: RefusedHook.self)
        thawedAtMs = try f.int("thawed_at_ms")
    }
}
