// Application hooks, the Linux counterpart of VSS writers: freeze, thaw and freeze-failed phases,
// hold-style hooks that keep a session (a lock) open across the freeze, timeouts per hook.
import Logging
import QuiesceLinux
import QuiesceProtocol
import Synchronization

/// One hook file and the settings its header declares.
///
/// The header is a comment line among the file's first 10 lines (and 4 KiB):
/// `# quiesce: timeout=20s hold optional`. Words: `timeout=DURATION` (this hook's timeout
/// instead of --hook-timeout, capped at max-freeze), `hold` (hold-style), `optional` (a failing
/// freeze lets the freeze go on). An unknown word refuses the hook, so a typo never runs a hook
/// with settings it did not ask for.
public struct HookSpec: Sendable, Equatable {
    public var name: String
    public var path: String
    public var timeoutMs: Int64
    public var hold: Bool
    public var optional: Bool

    /// Parses the header from the start of a hook file. Nil settings when there is no header line.
    /// Errors name the offending word.
    public static func parseHeader(_ head: [UInt8]) -> Result<(timeoutMs: Int64?, hold: Bool, optional: Bool), HookHeaderError> {
        var timeout: Int64?
        var hold = false
        var optional = false
        let text = String(decoding: head.prefix(4096), as: UTF8.self)
        for line in text.split(separator: "\n", omittingEmptySubsequences: false).prefix(10) {
            var rest = line.drop { $0 == " " || $0 == "\t" }
            guard rest.hasPrefix("#") else { continue }
            rest = rest.dropFirst().drop { $0 == " " || $0 == "\t" }
            guard rest.hasPrefix("quiesce:") else { continue }
            for word in rest.dropFirst("quiesce:".count).split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\r" }) {
                if word == "hold" { hold = true }
                else if word == "optional" { optional = true }
                else if word.hasPrefix("timeout=") {
                    let t: TimeSpan
                    do { t = try TimeSpan(parsing: String(word.dropFirst(8))) } catch {
                        return .failure(HookHeaderError("bad timeout \"\(word.dropFirst(8))\" in its quiesce: header: \(error)"))
                    }
                    guard t.milliseconds > 0 else {
                        return .failure(HookHeaderError("bad timeout \"\(word.dropFirst(8))\" in its quiesce: header: must be longer than 0"))
                    }
                    timeout = t.milliseconds
                } else {
                    return .failure(HookHeaderError("unknown setting \"\(word)\" in its quiesce: header"))
                }
            }
        }
        return .success((timeout, hold, optional))
    }
}

public struct HookHeaderError: Error, Sendable, CustomStringConvertible {
    public var description: String
    init(_ d: String) { description = d }
}

/// Runs the hooks of a directory around a freeze.
///
/// - `freeze`: in lexical order before any filesystem freezes. A hold-style hook keeps
///   running after it writes a line `ready` on its standard output; the freeze starts once
///   every hold-style hook is ready.
/// - `thaw`: in reverse order after the filesystems thaw, to every hook whose `freeze` succeeded.
/// - `freeze-failed`: in reverse order, to every hook whose `freeze` succeeded, when the freeze
///   is abandoned (a later hook failed, a FIFREEZE failed, the requester left, the agent stops).
///
/// A one-shot hook gets the phase as its argument. A holding hook is told its ending by one
/// line on its standard input (`thaw` or `freeze-failed`), after which its standard input is
/// closed; it must finish within its timeout. At any timeout the hook's process group is killed.
/// Only root-owned files that nobody else can write, in a root-owned directory nobody else can
/// write, run; others are refused and reported.
public struct Hooks: Sendable {
    public let directory: String
    public let timeoutMs: Int64
    /// No hook may run longer than this (the agent's max-freeze).
    public let maxTimeoutMs: Int64
    let logger: Logger

    /// Bytes of each hook's output kept for the log (the reply carries the last
    /// `HookReport.maxOutputBytes` of them).
    static let outputTailBytes = 4096

    public init(directory: String, timeoutMs: Int64, maxTimeoutMs: Int64 = 600_000, logger: Logger = Logger(label: "quiesced")) {
        self.directory = directory
        self.timeoutMs = timeoutMs
        self.maxTimeoutMs = maxTimeoutMs
        self.logger = logger
    }

    /// The hooks to run, in lexical order, and the files refused with the reason (both bounded
    /// by `HookReport.maxHooks`: hooks past it are refused).
    public func list() -> (hooks: [HookSpec], refused: [RefusedHook]) {
        guard let dirStat = try? Stat.ofLink(path: directory) else { return ([], []) }  // no directory: no hooks
        if dirStat.kind == .symbolicLink {
            // Not followed: whoever can change the link would choose the hooks root runs.
            return ([], [RefusedHook(name: directory, reason: "the hooks directory is a symbolic link (not followed): name the directory itself in hooks-dir")])
        }
        if dirStat.kind != .directory {
            return ([], [RefusedHook(name: directory, reason: "the hooks directory is not a directory")])
        }
        if let why = Hooks.unsafeOwnership(dirStat) {
            return ([], [RefusedHook(name: directory, reason: "the hooks directory is \(why): no hook in it runs")])
        }
        var specs: [HookSpec] = []
        var refused: [RefusedHook] = []
        for name in (FD.directoryEntries(atPath: directory) ?? []).sorted() {
            if name.hasPrefix(".") || name.hasSuffix("~") || name.contains(".dpkg-") || name.hasSuffix(".disabled")
                || name.hasSuffix(".sample") || name == "README" { continue }
            let path = directory + "/" + name
            guard let st = try? Stat.ofLink(path: path) else { continue }
            if st.kind == .symbolicLink { refused.append(RefusedHook(name: name, reason: "a symbolic link")); continue }
            guard st.kind == .regular else {
                // Hooks are not looked for in subdirectories; a FIFO, socket or device is no hook.
                let what = st.kind == .directory ? "a directory (hooks in subdirectories do not run)" : "not a regular file"
                refused.append(RefusedHook(name: name, reason: what))
                continue
            }
            if st.permissions & 0o111 == 0 { refused.append(RefusedHook(name: name, reason: "not executable")); continue }
            if let why = Hooks.unsafeOwnership(st) { refused.append(RefusedHook(name: name, reason: why)); continue }
            let head = Hooks.readHead(path)
            switch HookSpec.parseHeader(head) {
            case .failure(let e):
                refused.append(RefusedHook(name: name, reason: e.description))
            case .success(let h):
                if specs.count >= HookReport.maxHooks {
                    refused.append(RefusedHook(name: name, reason: "more than \(HookReport.maxHooks) hooks"))
                    continue
                }
                specs.append(HookSpec(name: name, path: path, timeoutMs: min(h.timeoutMs ?? timeoutMs, maxTimeoutMs),
                                      hold: h.hold, optional: h.optional))
            }
        }
        return (specs, Array(refused.prefix(HookReport.maxHooks)))
    }

    /// Why a hook did not start, with the usual cause of ENOEXEC named.
    static func couldNotStart(_ error: SystemError) -> String {
        "could not start: \(error)" + (error.errno == .ENOEXEC ? " (a script needs a #! line naming its interpreter)" : "")
    }

    /// Why execve(2) would refuse to start this hook, or nil when it looks startable: it needs
    /// an ELF executable for this machine, or a `#!` line naming an interpreter that exists
    /// and is executable; `#!/usr/bin/env NAME` also needs NAME in PATH. The kernel ends the
    /// interpreter's name at a space or tab only (execve(2), "Interpreter scripts"; Linux's
    /// binfmt_script), so a CR of Windows line ends is part of it. A hook that cannot start
    /// fails every freeze.
    public static func startProblem(_ spec: HookSpec) -> String? {
        let head = readHead(spec.path)
        if head.starts(with: [0x7F, 0x45, 0x4C, 0x46]) { return elfProblem(head) }  // \x7fELF
        guard head.starts(with: Array("#!".utf8)) else {
            return "it has no #! line and is not an ELF executable: execve fails with ENOEXEC"
        }
        // As binfmt_script reads it: the first 256 bytes (BINPRM_BUF_SIZE); the interpreter's
        // name, ended by a space or tab; then the rest of the line as one argument, if any.
        let buffer = head.prefix(256)
        let line = buffer.dropFirst(2).prefix { $0 != 0x0A }
        let isBlank: (UInt8) -> Bool = { $0 == 0x20 || $0 == 0x09 }
        let afterBlanks = line.drop(while: isBlank)
        let name = afterBlanks.prefix { !isBlank($0) }
        guard !name.isEmpty else { return "its #! line names no interpreter" }
        if name.endIndex == buffer.endIndex && head.count > 256 {
            return "its #! interpreter's name does not end within the 256 bytes the kernel reads: execve fails with ENOEXEC"
        }
        let interpreter = String(decoding: name, as: UTF8.self)
        var argument = String(decoding: afterBlanks.dropFirst(name.count).drop(while: isBlank), as: UTF8.self)
        while let last = argument.last, last == " " || last == "\t" { argument.removeLast() }
        let crlf = line.last == 0x0D ? " (the file has Windows line ends: the interpreter's name ends in a CR)" : ""
        guard interpreter.hasPrefix("/") else { return "its #! interpreter \(interpreter) is not an absolute path" }
        if case .failure(let e) = Subprocess.locate(interpreter) {
            return "its #! interpreter \(interpreter) cannot be run (\(e.name))\(crlf)"
        }
        if interpreter.hasSuffix("/env") { return envProblem(argument, crlf: crlf) }
        return nil
    }

    /// What stops `#!/usr/bin/env ARGUMENT` from starting a program: env gets the rest of the
    /// line as one argument, so without `-S` an option or a second word is not split; and with
    /// no program named, env runs the hook itself again, for ever (env(1)).
    static func envProblem(_ argument: String, crlf: String) -> String? {
        let loops = "env names no program, so it runs the hook itself again, for ever"
        var words: [String]
        if argument.hasPrefix("-S") || argument.hasPrefix("--split-string") {
            let rest = argument.hasPrefix("-S") ? argument.dropFirst(2) : argument.drop(while: { $0 != "=" && $0 != " " }).dropFirst()
            words = rest.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init)
        } else if argument.hasPrefix("-") {
            return "env gets \"\(argument)\" as one argument (the kernel passes the rest of the #! line whole) and fails: use env -S"
        } else {
            words = argument.isEmpty ? [] : [argument]
        }
        // Options and NAME=value assignments come before the program.
        words = Array(words.drop(while: { $0.hasPrefix("-") || $0.contains("=") }))
        guard let program = words.first else { return loops }
        if case .failure(let e) = Subprocess.locate(program) {
            return "its #! line runs \(program) through env, which finds none in PATH (\(e.name))\(crlf)"
        }
        return nil
    }

    /// What makes an ELF header unrunnable here (elf(5)): a class, byte order or version that
    /// is not ELF's, a type that is not an executable or a shared object, or another machine.
    static func elfProblem(_ head: [UInt8]) -> String? {
        guard head.count >= 20, (1...2).contains(head[4]), (1...2).contains(head[5]), head[6] == 1 else {
            return "it starts like an ELF file but its header is not one: execve fails with ENOEXEC"
        }
        let little = head[5] == 1
        func u16(_ at: Int) -> UInt16 { little ? UInt16(head[at]) | UInt16(head[at + 1]) << 8 : UInt16(head[at]) << 8 | UInt16(head[at + 1]) }
        guard [2, 3].contains(u16(16)) else { return "it is an ELF file but not an executable (e_type \(u16(16))): execve fails with ENOEXEC" }
        #if arch(x86_64)
        let machine: UInt16 = 62  // EM_X86_64
        #elseif arch(arm64)
        let machine: UInt16 = 183  // EM_AARCH64
        #else
        let machine = u16(18)
        #endif
        guard u16(18) == machine else { return "it is an ELF executable for another machine (e_machine \(u16(18))): execve fails with ENOEXEC" }
        // Its program headers must be in the file: a cut copy is not (`head` is the first 4 KiB,
        // so a file shorter than that is all there).
        func u32(_ at: Int) -> UInt64 { (0..<4).reduce(0) { $0 | UInt64(head[at + (little ? $1 : 3 - $1)]) << (8 * $1) } }
        func u64(_ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(head[at + (little ? $1 : 7 - $1)]) << (8 * $1) } }
        let is64 = head[4] == 2
        guard head.count >= (is64 ? 64 : 52) else { return "it is cut short inside its ELF header: execve fails with ENOEXEC" }
        let phoff = is64 ? u64(32) : u32(28)
        let phEnd = phoff &+ UInt64(u16(is64 ? 54 : 42)) * UInt64(u16(is64 ? 56 : 44))
        if head.count < 4096 && phEnd > UInt64(head.count) {
            return "it is cut short: its program headers end at byte \(phEnd), past the file's end (\(head.count)): execve fails"
        }
        return nil
    }

    /// The first 4 KiB of a file (where the header is), empty when it cannot be read.
    static func readHead(_ path: String) -> [UInt8] {
        guard let fd = try? FD.open(path, [.readOnly, .noFollow]) else { return [] }
        defer { FD.close(fd) }
        var head = [UInt8](repeating: 0, count: 4096)
        var filled = 0
        while filled < head.count {
            let n = head.withUnsafeMutableBytes { p in
                (try? FD.read(fd, into: UnsafeMutableRawBufferPointer(rebasing: p[filled...]))) ?? 0
            }
            if n <= 0 { break }
            filled += n
        }
        return Array(head[0..<filled])
    }

    /// Why a file or directory is unsafe to trust, or nil: not owned by root, or writable by
    /// group or others.
    static func unsafeOwnership(_ st: Stat) -> String? {
        if st.uid != 0 { return "not owned by root (uid \(st.uid))" }
        if st.permissions & 0o022 != 0 { return "writable by group or others (mode \(String(st.permissions, radix: 8)))" }
        return nil
    }

    /// What the hooks of one freeze left behind: reports, the hooks owed an ending (in the order
    /// their `freeze` succeeded), and why the freeze must not go on.
    public struct FreezeOutcome: Sendable {
        public var reports: [HookReport]
        public var owed: [ActiveHook]
        public var failure: String?
    }

    /// Runs `freeze` for every hook in order. Stops at the first failing non-optional hook, or
    /// when `abandon` says the freeze is no longer wanted (checked between hooks), or when
    /// `stop` is told to (the running hook's process group is killed then, and that hook is
    /// owed an ending too); the caller then ends `owed` with `freeze-failed`. `onOwed` is told
    /// each time the owed list grows (for the crash record).
    public func runFreeze(_ specs: [HookSpec], context: HookContext,
                          abandon: @Sendable () async -> String? = { nil },
                          stop: HookStop? = nil,
                          onOwed: @Sendable ([ActiveHook]) async -> Void = { _ in },
                          onReport: @Sendable ([HookReport]) async -> Void = { _ in }) async -> FreezeOutcome {
        var out = FreezeOutcome(reports: [], owed: [], failure: nil)
        for spec in specs {
            if let why = await abandon() ?? stop?.reason {
                out.failure = why
                return out
            }
            let (report, holder) = await WorkPools.hooks.run { Hooks.runFreezeBlocking(spec, context: context, stop: stop) }
            log(report)
            out.reports.append(report)
            await onReport(out.reports)
            // Stopped while it ran: it may have done part of its work, so it is owed an
            // ending like the hooks before it (freeze-failed), and the freeze goes no further.
            if !report.succeeded, let why = stop?.reason {
                out.owed.append(ActiveHook(spec: spec, holder: nil))
                await onOwed(out.owed)
                out.failure = why
                return out
            }
            if report.succeeded {
                out.owed.append(ActiveHook(spec: spec, holder: holder))
                await onOwed(out.owed)
            } else if !spec.optional {
                out.failure = "freeze hook \(spec.name) \(report.error ?? report.effectiveOutcome.rawValue)"
                    + (report.lastOutputLine(limit: 200).map { ": \"\($0)\"" } ?? "")
                return out
            }
        }
        if let why = await abandon() ?? stop?.reason { out.failure = why }
        return out
    }

    /// Ends every owed hook with `phase` ("thaw" or "freeze-failed"), in reverse order.
    /// Failures are reported, never fatal.
    public func end(_ owed: [ActiveHook], phase: HookPhase, context: HookContext) async -> [HookReport] {
        var reports: [HookReport] = []
        for hook in owed.reversed() {
            let report = await WorkPools.hooks.run { Hooks.endBlocking(hook, phase: phase, context: context) }
            log(report)
            reports.append(report)
        }
        return reports
    }

    private func log(_ r: HookReport) {
        var meta: Logger.Metadata = ["hook": "\(r.name)", "phase": "\(r.phase)", "outcome": "\(r.effectiveOutcome.rawValue)",
                                     "duration_us": "\(r.durationUs)"]
        if let e = r.error { meta["error"] = "\(e)" }
        if !r.output.isEmpty { meta["output"] = "\(r.output)" }
        if r.succeeded { logger.info("hook \(r.name) \(r.phase): \(r.effectiveOutcome.rawValue)", metadata: meta) }
        else { logger.warning("hook \(r.name) \(r.phase): \(r.error ?? r.effectiveOutcome.rawValue)", metadata: meta) }
    }

    // MARK: - Running one hook (blocking; on a dedicated thread)

    static func environment(_ spec: HookSpec, phase: HookPhase, context: HookContext, deadlineWallMs: Int64) -> [String] {
        var env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C.UTF-8",
                   "QUIESCE_PHASE=\(phase)", "QUIESCE_OP_ID=\(context.opID)",
                   "QUIESCE_MOUNTS_JSON=\(JSON.array(context.mounts.map(JSON.string)).text)",
                   "QUIESCE_MOUNTS=\(context.mounts.joined(separator: "\n"))",
                   "QUIESCE_FREEZE_TIMEOUT_MS=\(context.freezeTimeoutMs)",
                   "QUIESCE_HOOK_TIMEOUT_MS=\(spec.timeoutMs)",
                   "QUIESCE_HOOK_DEADLINE_MS=\(deadlineWallMs)"]
        if spec.hold { env.append("QUIESCE_HOLD=1") }
        if context.recovery { env.append("QUIESCE_RECOVERY=1") }
        return env
    }

    /// `freeze` for one hook. A holding hook is returned still running, with its run. `stop`
    /// kills its process group while it runs, when the freeze is no longer wanted.
    static func runFreezeBlocking(_ spec: HookSpec, context: HookContext, stop: HookStop? = nil) -> (HookReport, HookRun?) {
        let start = monotonicNanos()
        let env = environment(spec, phase: .freeze, context: context, deadlineWallMs: wallClockMillis() + spec.timeoutMs)
        let run: HookRun
        do {
            run = try HookRun(spec: spec, arguments: [spec.path, HookPhase.freeze.rawValue], environment: env, watchReady: spec.hold)
        } catch {
            return (report(spec, .freeze, start, .failed, error: Hooks.couldNotStart(error)), nil)
        }
        if !spec.hold { run.child.closeStdin() }  // only a holding hook is told anything there
        stop?.running(run)
        defer { stop?.running(nil) }
        let deadline = start + UInt64(spec.timeoutMs) * 1_000_000
        switch run.waitReadyOrExit(deadline: deadline) {
        case .ready:
            return (report(spec, .freeze, start, .holding, output: run.outputTail()), run)
        case .exited(let status):
            if let why = stop?.reason, !status.succeeded {
                return (report(spec, .freeze, start, .failed, error: "stopped (\(status)): \(why), so its process group was killed",
                               output: run.outputTail()), nil)
            }
            return (finished(spec, .freeze, start, status, run: run), nil)
        case .timedOut:
            return (report(spec, .freeze, start, .timedOut, error: "timed out after \(TimeSpan(milliseconds: spec.timeoutMs)); its process group was killed",
                           output: run.outputTail()), nil)
        }
    }

    /// Ends one owed hook: tells a holding one to finish, runs a one-shot one with `phase`.
    static func endBlocking(_ hook: ActiveHook, phase: HookPhase, context: HookContext) -> HookReport {
        let spec = hook.spec
        let start = monotonicNanos()
        let deadline = start + UInt64(spec.timeoutMs) * 1_000_000
        if let run = hook.holder {
            if let died = run.exitedEarly() {
                // Its session (its lock) ended while it should have held it.
                return report(spec, phase, start, .lost, exitCode: died.code,
                              error: "ended while holding (\(died.status)) \(TimeSpan.human(microseconds: run.heldUs)) after it was ready: not application-consistent",
                              output: run.outputTail())
            }
            run.child.writeStdin(Array("\(phase)\n".utf8))
            run.child.closeStdin()
            switch run.waitExit(deadline: deadline) {
            case .exited(let status): return finished(spec, phase, start, status, run: run)
            case .timedOut, .ready:
                return report(spec, phase, start, .timedOut, error: "did not finish within \(TimeSpan(milliseconds: spec.timeoutMs)); its process group was killed",
                              output: run.outputTail())
            }
        }
        let env = environment(spec, phase: phase, context: context, deadlineWallMs: wallClockMillis() + spec.timeoutMs)
        let run: HookRun
        do {
            run = try HookRun(spec: spec, arguments: [spec.path, phase.rawValue], environment: env, watchReady: false)
        } catch {
            return report(spec, phase, start, .failed, error: Hooks.couldNotStart(error))
        }
        run.child.closeStdin()
        switch run.waitExit(deadline: deadline) {
        case .exited(let status): return finished(spec, phase, start, status, run: run)
        case .timedOut, .ready:
            return report(spec, phase, start, .timedOut, error: "timed out after \(TimeSpan(milliseconds: spec.timeoutMs)); its process group was killed",
                          output: run.outputTail())
        }
    }

    /// Runs `phase` for each named hook in reverse order, as one-shot runs: crash recovery's
    /// ending for hooks a dead agent owed one. Blocking.
    public func recover(names: [String], phase: HookPhase, opID: String, mounts: [String] = [], freezeTimeoutMs: Int64 = 0) -> [HookReport] {
        let (specs, refused) = list()
        let context = HookContext(opID: opID, mounts: mounts, freezeTimeoutMs: freezeTimeoutMs, recovery: true)
        var reports: [HookReport] = []
        for name in names.reversed() {
            guard let spec = specs.first(where: { $0.name == name }) else {
                // Say why: gone, or refused now (made writable by others, its owner changed...).
                let why = refused.first(where: { $0.name == name || $0.name == directory }).map { "refused: \($0.reason)" }
                    ?? "no longer a runnable hook in \(directory)"
                reports.append(HookReport(name: name, phase: phase, exitCode: nil, durationUs: 0, error: why, outcome: .failed))
                continue
            }
            var oneShot = spec
            oneShot.hold = false
            let r = Hooks.endBlocking(ActiveHook(spec: oneShot, holder: nil), phase: phase, context: context)
            log(r)
            reports.append(r)
        }
        return reports
    }

    private static func finished(_ spec: HookSpec, _ phase: HookPhase, _ start: UInt64, _ status: ExitStatus, run: HookRun) -> HookReport {
        let code: Int64? = if case .exited(let c) = status { Int64(c) } else { nil }
        if status.succeeded { return report(spec, phase, start, .ok, exitCode: 0, output: run.outputTail()) }
        var why = "\(status)"
        if spec.hold && phase == .freeze { why += " before it was ready" }
        return report(spec, phase, start, .failed, exitCode: code, error: why, output: run.outputTail())
    }

    private static func report(_ spec: HookSpec, _ phase: HookPhase, _ start: UInt64, _ outcome: HookOutcome, exitCode: Int64? = nil,
                               error: String? = nil, output: [UInt8] = []) -> HookReport {
        HookReport(name: spec.name, phase: phase, exitCode: exitCode, durationUs: Int64((monotonicNanos() - start) / 1000),
                   error: error, outcome: outcome, hold: spec.hold, optional: spec.optional,
                   output: printable(output.suffix(HookReport.maxOutputBytes)))
    }

    /// Output as text for a reply: UTF-8 (invalid bytes replaced), control characters other
    /// than newline and tab shown as "?", so the JSON escaping cannot blow up its size.
    static func printable(_ bytes: some Collection<UInt8>) -> String {
        String(decoding: bytes, as: UTF8.self).map { c -> Character in
            guard let a = c.asciiValue else { return c }
            return a < 0x20 && a != 0x0A && a != 0x09 || a == 0x7F ? "?" : c
        }.reduce(into: "") { $0.append($1) }
    }
}

/// What every hook of one operation is told.
public struct HookContext: Sendable {
    public var opID: String
    /// The mountpoints about to be frozen (or that were), in freeze order.
    public var mounts: [String]
    /// How long the filesystems stay frozen at most (the freeze's timeout).
    public var freezeTimeoutMs: Int64
    /// Run by crash recovery, not by a live freeze.
    public var recovery: Bool = false

    public init(opID: String, mounts: [String], freezeTimeoutMs: Int64, recovery: Bool = false) {
        self.opID = opID
        self.mounts = mounts
        self.freezeTimeoutMs = freezeTimeoutMs
        self.recovery = recovery
    }
}

/// Tells a freeze's hooks that the freeze is no longer wanted (its requester went away, the
/// agent stops): the freeze hook running then is killed with its process group at once, as at
/// its timeout, instead of being waited for while earlier hooks hold their applications' locks.
/// Any thread; `stop` is idempotent.
public final class HookStop: Sendable {
    private let state = Mutex<(reason: String?, run: HookRun?)>((nil, nil))

    public init() {}

    /// Why the freeze is no longer wanted, once `stop` was called.
    public var reason: String? { state.withLock { $0.reason } }

    public func stop(_ why: String) {
        let run = state.withLock { s -> HookRun? in
            guard s.reason == nil else { return nil }
            s.reason = why
            return s.run
        }
        run?.child.killGroup()
    }

    /// The hook now running (nil: none); one started after `stop` is killed at once.
    func running(_ run: HookRun?) {
        let kill = state.withLock { s -> Bool in
            s.run = run
            return run != nil && s.reason != nil
        }
        if kill { run?.child.killGroup() }
    }
}

/// A hook whose `freeze` succeeded and which is owed a `thaw` or `freeze-failed`; `holder` is
/// the still-running process of a hold-style hook.
public struct ActiveHook: Sendable {
    public var spec: HookSpec
    var holder: HookRun?

    /// The hook's report now: `holding`, or `lost` once a holding hook has ended by itself.
    func liveReport(_ freezeReport: HookReport) -> HookReport {
        guard let holder, let died = holder.exitedEarly() else { return freezeReport }
        var r = freezeReport
        r.outcome = .lost
        r.exitCode = died.code
        r.error = "ended while holding (\(died.status)): not application-consistent"
        return r
    }
}

/// One running hook process: a dedicated thread reads its output (keeping the last 4 KiB),
/// spots a `ready` line, and reaps it when its pidfd says it ended. Waiters receive events.
final class HookRun: @unchecked Sendable {
    enum Wait: Sendable {
        case ready
        case exited(ExitStatus)
        case timedOut
    }

    private struct State {
        var tail: [UInt8] = []
        var line: [UInt8] = []
        var ready = false
        var exit: ExitStatus?
        var toldToFinish = false
        var readyAt: UInt64 = 0
        var exitedAt: UInt64 = 0
    }

    let spec: HookSpec
    let child: PipedChild
    private let state = Mutex(State())
    private let events = Mailbox<Wait>()
    /// How long a holding hook held before it ended by itself, in µs (0 when it did not).
    var heldUs: Int64 {
        state.withLock { s in s.exitedAt > s.readyAt && s.readyAt > 0 ? Int64((s.exitedAt - s.readyAt) / 1000) : 0 }
    }

    init(spec: HookSpec, arguments: [String], environment: [String], watchReady: Bool) throws(SystemError) {
        self.spec = spec
        child = try PipedChild.start(arguments: arguments, environment: environment)
        let this = self
        Threads.detach(name: "hook-output") { this.monitor(watchReady: watchReady) }
    }

    private func monitor(watchReady: Bool) {
        var outputFD = child.outputFD
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            guard let ready = try? FD.poll([(outputFD, .readable), (child.pidFD, .readable)], timeoutMs: -1) else { break }
            if !ready[0].isEmpty {
                switch FD.readSome(outputFD, into: &buffer) {
                case .success(let got) where got > 0: take(Array(buffer[0..<got]), watchReady: watchReady)
                case .failure(let e) where e == .EAGAIN: break
                default: outputFD = -1  // EOF or an error: only the pidfd is left
                }
            }
            if !ready[1].isEmpty { break }
        }
        let status = child.reap()  // kills what it left in its group, so the pipe reaches EOF
        // Drain what is still in the pipe, bounded: a grandchild outside the group may keep it open.
        let drainUntil = monotonicNanos() + 200_000_000
        while outputFD >= 0, monotonicNanos() < drainUntil {
            guard let ready = try? FD.poll(outputFD, for: .readable, timeoutMs: 50), !ready.isEmpty else { continue }
            guard case .success(let got) = FD.readSome(outputFD, into: &buffer), got > 0 else { break }
            take(Array(buffer[0..<got]), watchReady: false)
        }
        state.withLock { s in
            s.exit = status
            s.exitedAt = monotonicNanos()
        }
        events.post(.exited(status))
    }

    private func take(_ bytes: [UInt8], watchReady: Bool) {
        var becameReady = false
        state.withLock { s in
            s.tail.append(contentsOf: bytes)
            if s.tail.count > Hooks.outputTailBytes { s.tail.removeFirst(s.tail.count - Hooks.outputTailBytes) }
            guard watchReady, !s.ready else { return }
            for b in bytes {
                if b == 0x0A {
                    var line = s.line
                    if line.last == 0x0D { line.removeLast() }
                    s.line = []
                    if line == Array("ready".utf8) { s.ready = true; s.readyAt = monotonicNanos(); becameReady = true; break }
                } else if s.line.count < 256 {
                    s.line.append(b)
                }
            }
        }
        if becameReady { events.post(.ready) }
    }

    func outputTail() -> [UInt8] { state.withLock { $0.tail } }

    /// The exit of a holding hook that was not told to finish: its hold ended early.
    func exitedEarly() -> (status: ExitStatus, code: Int64?)? {
        state.withLock { s in
            guard let e = s.exit, !s.toldToFinish else { return nil }
            if case .exited(let c) = e { return (e, Int64(c)) }
            return (e, nil)
        }
    }

    func waitReadyOrExit(deadline: UInt64) -> Wait {
        if let e = events.receive(deadlineNanos: deadline) { return e }
        child.killGroup()
        _ = waitExitAfterKill()
        return .timedOut
    }

    /// Waits for the end after the hook was told to finish; kills its group at the deadline.
    func waitExit(deadline: UInt64) -> Wait {
        state.withLock { $0.toldToFinish = true }
        while let e = events.receive(deadlineNanos: deadline) {
            if case .exited = e { return e }
        }
        child.killGroup()
        _ = waitExitAfterKill()
        return .timedOut
    }

    private func waitExitAfterKill() -> ExitStatus? {
        // SIGKILL is certain unless the process sits in the kernel (e.g. on a frozen filesystem).
        while let e = events.receive(timeoutMs: 5000) {
            if case .exited(let s) = e { return s }
        }
        return nil
    }
}
