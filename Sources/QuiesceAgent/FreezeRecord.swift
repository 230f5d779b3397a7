// Crash safety: what is about to be frozen goes on record first, so a restarted agent can thaw it.
import QuiesceLinux
import QuiesceProtocol
import Synchronization

/// A small JSON file in the state directory (a tmpfs, /run/quiesce, by default) naming the
/// filesystems of the freeze in progress. Written before the first FIFREEZE, removed after the
/// last FITHAW, never touched while frozen.
///
/// Each agent process has its own record, `freeze-PID.json`, so agents that share a state dir
/// (several started by hand without --state-dir) never overwrite each other's, and recovery
/// thaws only records whose owner is no longer a running quiesced: a second agent starting up,
/// or `quiesced --recover` run by hand, can never thaw a live agent's freeze.
public struct FreezeRecord: Sendable {
    public let stateDir: String
    public let ownerPID: Int32
    public var path: String { FreezeRecord.path(stateDir: stateDir, pid: ownerPID) }

    /// The hooks directory of the agent writing the record, kept in it so that recovery ends
    /// the owed hooks from where they ran, whatever configuration the recovering run has.
    public let hooksDir: String?
    /// Which agent wrote it, when several share a state dir (quiesced.service and
    /// quiesced-qga.service share /run/quiesce): `AgentConfig.identity`. Kept so that the note
    /// recovery leaves (`EndedFreeze`) goes to the agent of the same unit.
    public let identity: String

    public init(stateDir: String, ownerPID: Int32 = CurrentProcess.id, hooksDir: String? = nil, identity: String = "") {
        self.stateDir = stateDir
        self.ownerPID = ownerPID
        self.hooksDir = hooksDir
        self.identity = identity
    }

    static func path(stateDir: String, pid: Int32) -> String { "\(stateDir)/freeze-\(pid).json" }

    /// An agent (run as root) whose state dir is not the default leaves a pointer to it in the
    /// default one (`elsewhere-PID`, holding the path), so that `quiesced --recover` run with a
    /// config changed since finds its records. Best effort; the default dir is root's (0700).
    public static func pointToStateDir(_ stateDir: String, from defaultDir: String) {
        guard stateDir != defaultDir, (try? Paths.makeDirectory(defaultDir, mode: 0o700)) != nil else { return }
        let path = "\(defaultDir)/elsewhere-\(CurrentProcess.id)"
        guard let fd = try? FD.open(path, [.writeOnly, .create, .truncate], mode: 0o600) else { return }
        _ = try? FD.writeAll(fd, Array(stateDir.utf8))
        FD.close(fd)
    }

    /// Where else `--recover` looks: the default dir, and the dirs named by pointers in it
    /// (those of agents no longer running are removed once read), without `besides`.
    public static func otherStateDirs(besides stateDir: String, default defaultDir: String) -> [String] {
        var dirs: [String] = []
        if defaultDir != stateDir && Paths.exists(defaultDir) { dirs.append(defaultDir) }
        for name in FD.directoryEntries(atPath: defaultDir) ?? [] where name.hasPrefix("elsewhere-") {
            let path = "\(defaultDir)/\(name)"
            guard let bytes = try? FD.readWholeFile(atPath: path, maxBytes: 4096) else { continue }
            let dir = String(decoding: bytes, as: UTF8.self)
            if let pid = Int32(name.dropFirst("elsewhere-".count)), !isRunningAgent(pid) { Paths.remove(path) }
            if dir.hasPrefix("/"), dir != stateDir, !dirs.contains(dir), Paths.exists(dir) { dirs.append(dir) }
        }
        return dirs
    }

    /// A freeze that ended without its host's thaw, just before the agent process went away: it
    /// thawed on a stop signal, or `quiesced --recover` (the units' ExecStopPost) thawed what a
    /// killed agent left. The next agent process reads these notes at start (`readEndedNotes`),
    /// so that the host's late thaw of that freeze is told it ended early, as the same process
    /// would have told it: above all a qemu-ga host's `guest-fsfreeze-thaw`, which names no
    /// freeze and would otherwise read `{"return": 0}` as a snapshot taken while frozen.
    public struct EndedFreeze: Sendable, Equatable {
        public var opID: String
        public var filesystems: [String]
        public var reason: ThawReason
        /// When it was thawed, wall clock, ms since the epoch.
        public var atMs: Int64
        /// The agent it belongs to (`AgentConfig.identity`): only that one takes the note.
        public var identity: String
        /// The note's file, as read by `readEndedNotes` (nil before it is written).
        public var path: String?

        public init(opID: String, filesystems: [String], reason: ThawReason, atMs: Int64 = wallClockMillis(), identity: String) {
            self.opID = opID
            self.filesystems = filesystems
            self.reason = reason
            self.atMs = atMs
            self.identity = identity
        }
    }

    /// Leaves `ended` for the next agent process in `stateDir` (`ended-PID-MS.json`, mode 0600).
    /// Best effort: a note that cannot be written costs only the late thaw's error message.
    public static func leaveEndedNote(_ ended: EndedFreeze, stateDir: String) {
        let body: JSON = ["op_id": .string(ended.opID), "filesystems": .array(ended.filesystems.map(JSON.string)),
                          "reason": .string(ended.reason.rawValue), "at_ms": .int(ended.atMs), "identity": .string(ended.identity)]
        let path = "\(stateDir)/ended-\(CurrentProcess.id)-\(ended.atMs).json"
        guard let fd = try? FD.open(path + ".tmp", [.writeOnly, .create, .truncate], mode: 0o600) else { return }
        let written = (try? FD.writeAll(fd, body.encodedLine())) != nil
        FD.close(fd)
        if written { try? Paths.rename(path + ".tmp", to: path) } else { Paths.remove(path + ".tmp") }
    }

    /// The notes `leaveEndedNote` left in `stateDir` for the agent `identity`, oldest first.
    /// They stay until the late thaw they answer has come, or a new freeze shows the host has
    /// moved on (`dropEndedNote`), so that a second restart before the host's thaw keeps them;
    /// another agent's are left to it; any a day old is dropped.
    public static func readEndedNotes(stateDir: String, identity: String) -> [EndedFreeze] {
        var notes: [EndedFreeze] = []
        for name in (FD.directoryEntries(atPath: stateDir) ?? []) where name.hasPrefix("ended-") && name.hasSuffix(".json") {
            let path = "\(stateDir)/\(name)"
            guard let o = (try? FD.readWholeFile(atPath: path, maxBytes: 1 << 20)).flatMap({ try? JSON.parse($0) }),
                  let opID = o["op_id"]?.stringValue, let reason = o["reason"]?.stringValue, let at = o["at_ms"]?.intValue else {
                Paths.remove(path)
                continue
            }
            let owner = o["identity"]?.stringValue ?? ""
            if wallClockMillis() - at > 86_400_000 {
                Paths.remove(path)
                continue
            }
            guard owner == identity else { continue }
            let filesystems = o["filesystems"]?.arrayValue?.compactMap(\.stringValue) ?? []
            var note = EndedFreeze(opID: opID, filesystems: filesystems, reason: ThawReason(rawValue: reason), atMs: at, identity: owner)
            note.path = path
            notes.append(note)
        }
        return notes.sorted { $0.atMs < $1.atMs }
    }

    /// Writes the record. `hooksOwed` names the hooks whose `freeze` succeeded (owed a `thaw` or
    /// `freeze-failed`), in order; `filesystemsFreezing` is true from just before the first
    /// FIFREEZE: recovery then ends the hooks with `thaw`, else with `freeze-failed`.
    /// `hookContext`: what the owed hooks were told at their freeze (mountpoints, the freeze's
    /// timeout), so that recovery tells their ending the same; the record's filesystems may be
    /// fewer by then (only what is still held).
    public func write(opID: String, targets: [FreezeTarget], hooksOwed: [String] = [], filesystemsFreezing: Bool = false,
                      hookContext: HookContext? = nil) throws(SystemError) {
        try? Paths.makeDirectory(stateDir, mode: 0o700)
        var body: JSON = [
            "op_id": .string(opID),
            "hooks_dir": hooksDir.map(JSON.string) ?? nil,
            "identity": .string(identity),
            "hooks_owed": .array(hooksOwed.map(JSON.string)),
            "stage": .string(filesystemsFreezing ? "filesystems" : "hooks"),
            "pid": .int(Int64(CurrentProcess.id)),
            "at_ms": .int(wallClockMillis()),
            "filesystems": .array(targets.map { t in
                ["mountpoint": .string(t.mountPoint),
                 "devices": .array(t.devices.sorted().map { .string($0.description) })]
            }),
        ]
        if let hookContext, case .object(var o) = body {
            o["hook_mounts"] = .array(hookContext.mounts.map(JSON.string))
            o["freeze_timeout_ms"] = .int(hookContext.freezeTimeoutMs)
            body = .object(o)
        }
        let bytes = body.encodedLine()
        let tmp = path + ".tmp"
        let fd = try FD.open(tmp, [.writeOnly, .create, .truncate], mode: 0o600)
        // No fsync: the record guards against the agent dying, not the machine (after a machine
        // crash nothing is frozen), and the page cache outlives the agent. An fsync would only
        // delay every freeze when the state dir is on a disk.
        do throws(SystemError) {
            try FD.writeAll(fd, bytes)
            FD.close(fd)
        } catch {
            FD.close(fd)
            throw error
        }
        try Paths.rename(tmp, to: path)
    }

    public func remove() { Paths.remove(path) }

    /// The target among `targets` whose filesystem holds the state dir (compared by st_dev),
    /// if any. A freeze of it is refused: the record is written while the freeze runs and ends,
    /// and on a frozen filesystem a write waits for the thaw (sb_start_write, fs/super.c).
    public func target(holdingStateDirIn targets: [FreezeTarget]) -> FreezeTarget? {
        guard let device = try? Stat.of(path: stateDir).device else { return nil }
        return targets.first { $0.devices.contains(device) }
    }

    /// What a record names: mountpoints with the st_dev values that identify them.
    public struct Entry: Sendable, Equatable {
        public var mountPoint: String
        public var devices: Set<DeviceNumber>
    }

    /// Reads the record at `path`, if there is one. A damaged record gives its error.
    /// A record as read back: `hookMounts` and `freezeTimeoutMs` are what the owed hooks were
    /// told at their freeze (records of earlier versions: the filesystems' mountpoints, 0).
    struct Read {
        var opID: String
        var entries: [Entry]
        var hooksOwed: [String]
        var filesystemsFreezing: Bool
        var hooksDir: String?
        var identity: String
        var hookMounts: [String]
        var freezeTimeoutMs: Int64
    }

    static func read(path: String) -> Result<Read?, ProtocolError> {
        guard let bytes = try? FD.readWholeFile(atPath: path) else { return .success(nil) }
        let text = String(decoding: bytes, as: UTF8.self)
        do {
            let json = try JSON.parse(text)
            let opID = json["op_id"]?.stringValue ?? "unknown"
            var entries: [Entry] = []
            for fs in json["filesystems"]?.arrayValue ?? [] {
                guard let mp = fs["mountpoint"]?.stringValue else { continue }
                let devs = (fs["devices"]?.arrayValue ?? []).compactMap { $0.stringValue.flatMap { DeviceNumber(parsing: $0) } }
                entries.append(Entry(mountPoint: mp, devices: Set(devs)))
            }
            let owed = (json["hooks_owed"]?.arrayValue ?? []).compactMap(\.stringValue)
            return .success(Read(opID: opID, entries: entries, hooksOwed: owed, filesystemsFreezing: json["stage"]?.stringValue != "hooks",
                                 hooksDir: json["hooks_dir"]?.stringValue, identity: json["identity"]?.stringValue ?? "",
                                 hookMounts: json["hook_mounts"]?.arrayValue?.compactMap(\.stringValue) ?? entries.map(\.mountPoint),
                                 freezeTimeoutMs: json["freeze_timeout_ms"]?.intValue ?? 0))
        } catch {
            return .failure(ProtocolError(.internal, "damaged freeze record \(path): \(error)"))
        }
    }

    /// What recovery found in a state dir.
    public struct Recovery: Sendable {
        /// Records of agents that are gone, thawed: the op id and one line per filesystem.
        public var recovered: [(opID: String, lines: [String], identity: String)] = []
        /// Hooks those agents owed an ending, per operation, with the phase to end them with:
        /// `thaw` when the filesystems had begun to freeze, else `freeze-failed`; and the hooks
        /// directory they ran from (nil in records of earlier versions).
        public var hooksOwed: [(opID: String, phase: HookPhase, names: [String], hooksDir: String?, mounts: [String], freezeTimeoutMs: Int64)] = []
        /// Pids of running agents whose records were left alone.
        public var liveOwners: [Int32] = []
    }

    /// Thaws what the records of agents that are no longer running name, and removes those
    /// records; records of running agents are left alone. Also takes the single `freeze.json`
    /// of earlier versions.
    public static func recoverAbandoned(stateDir: String) -> Recovery {
        var recovery = Recovery()
        for name in (FD.directoryEntries(atPath: stateDir) ?? []).sorted() {
            let path = "\(stateDir)/\(name)"
            var owner: Int32?
            if name.hasPrefix("freeze-") && name.hasSuffix(".json") {
                owner = Int32(name.dropFirst(7).dropLast(5))
                if owner == nil { continue }
            } else if name == "freeze.json" {
                owner = (try? FD.readWholeFile(atPath: path)).flatMap { try? JSON.parse($0) }?["pid"]?.intValue.map { Int32(truncatingIfNeeded: $0) }
            } else {
                continue
            }
            if let pid = owner, pid != CurrentProcess.id, isRunningAgent(pid) {
                recovery.liveOwners.append(pid)
                continue
            }
            if case .success(let r?) = read(path: path), !r.hooksOwed.isEmpty {
                recovery.hooksOwed.append((r.opID, r.filesystemsFreezing ? .thaw : .freezeFailed, r.hooksOwed, r.hooksDir,
                                           r.hookMounts, r.freezeTimeoutMs))
            }
            if let r = recover(path: path) { recovery.recovered.append(r) }
        }
        return recovery
    }

    /// Whether `pid` is a running quiesced: not a process that got the pid since, and not a
    /// killed agent whose parent has not reaped it yet (a zombie holds no freeze of its own).
    static func isRunningAgent(_ pid: Int32) -> Bool {
        guard pid > 0, let stat = try? FD.readWholeFile(atPath: "/proc/\(pid)/stat", maxBytes: 4096) else { return false }
        // "PID (COMM) STATE ...": COMM may contain anything, so split at the last ')'.
        guard let open = stat.firstIndex(of: UInt8(ascii: "(")), let close = stat.lastIndex(of: UInt8(ascii: ")")),
              close + 2 < stat.count else { return false }
        let comm = String(decoding: stat[(open + 1)..<close], as: UTF8.self)
        let state = stat[close + 2]
        return comm == "quiesced" && state != UInt8(ascii: "Z") && state != UInt8(ascii: "X")
    }

    /// Thaws everything one record names (FITHAW on each; EINVAL means it was not frozen).
    /// Returns one line per filesystem for the log, then removes the record; nil when the
    /// record is gone already or names no filesystem.
    static func recover(path: String) -> (opID: String, lines: [String], identity: String)? {
        let entries: [Entry]
        let opID: String
        let identity: String
        switch read(path: path) {
        case .success(nil): return nil
        case .success(let r?): opID = r.opID; entries = r.entries; identity = r.identity
        case .failure(let e): Paths.remove(path); return ("unknown", ["\(e)"], "")
        }
        // A record that names no filesystem was left during a thaw's hooks, after every FITHAW
        // had succeeded: nothing to thaw, and no freeze that ended early (only hooks owed).
        if entries.isEmpty {
            Paths.remove(path)
            return nil
        }
        var lines: [String] = []
        // Thaw in reverse freeze order: what rests on others thaws last.
        for e in entries.reversed() {
            do {
                let fd = try FilesystemOps.open(e.mountPoint, expectedDevices: e.devices)
                switch FilesystemOps.thaw(fd) {
                case nil: lines.append("\(e.mountPoint): thawed")
                case .EINVAL?: lines.append("\(e.mountPoint): was not frozen")
                case let err?: lines.append("\(e.mountPoint): FITHAW: \(err)")
                }
                FD.close(fd)
            } catch {
                lines.append("\(e.mountPoint): \(error)")
            }
        }
        Paths.remove(path)
        return (opID, lines, identity)
    }
}

/// Keeps a freeze's record naming what the freeze may hold while its waves run: before a wave,
/// what earlier waves froze and this wave's targets; a target whose FIFREEZE failed (EBUSY:
/// another party holds it) is dropped at once. Writes are serialised (a wave's FIFREEZEs return
/// on threads of their own), and end at `close()`, when the caller takes over the record. (The
/// state dir is never on a filesystem the freeze freezes: `AgentState.freeze` refuses that.)
public final class WaveRecorder: FreezeProgress {
    private struct State {
        var named: [FreezeTarget] = []
        var open = true
    }
    private let state = Mutex(State())
    private let record: FreezeRecord
    private let opID: String
    private let hooksOwed: [String]
    private let hookContext: HookContext?

    public init(record: FreezeRecord, opID: String, hooksOwed: [String], hookContext: HookContext?) {
        self.record = record
        self.opID = opID
        self.hooksOwed = hooksOwed
        self.hookContext = hookContext
    }

    public func beforeWave(frozen: [FreezeTarget], wave: [FreezeTarget]) {
        state.withLock { s in
            guard s.open else { return }
            s.named = frozen + wave
            write(s.named)
        }
    }

    public func notFrozen(_ target: FreezeTarget) {
        state.withLock { s in
            guard s.open, let i = s.named.firstIndex(where: { $0.mountPoint == target.mountPoint }) else { return }
            s.named.remove(at: i)
            write(s.named)
        }
    }

    /// Stops writing: a late FIFREEZE's failure no longer changes the record.
    public func close() { state.withLock { $0.open = false } }

    private func write(_ targets: [FreezeTarget]) {
        try? record.write(opID: opID, targets: targets, hooksOwed: hooksOwed, filesystemsFreezing: true, hookContext: hookContext)
    }
}
