// quiescectl: the host-side coordinator that freezes guests around a checkpoint command.
import ArgumentParser
import QuiesceHost
import QuiesceLinux
import QuiesceProtocol
import Synchronization

struct Quiescectl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "quiescectl",
        abstract: "Freeze and thaw the filesystems of Linux guests around a host-side checkpoint.",
        discussion: """
        quiescectl talks to quiesced, the agent inside each guest. Its main job is
        `checkpoint`: freeze the guests' filesystems (after the agents' freeze hooks
        flush applications), run a snapshot COMMAND on the host, and thaw, whatever
        happens. Several --agent are handled in parallel.

        ADDRESSES
          unix:PATH             a Unix socket the agent listens on
          vsock:CID:PORT        AF_VSOCK; a guest's CID is 3 or more (2 is the host)
          hvsock:UDS_PATH:PORT  Firecracker / Cloud Hypervisor hybrid vsock: the VM's
                                Unix socket; quiescectl sends "CONNECT PORT\\n" and
                                expects "OK ...\\n" before speaking the protocol
          serial:PATH           the Unix socket of a QEMU chardev behind a
                                virtio-serial port; quiescectl resynchronises first
                                (a 0xFF byte, then hello with a fresh id)
          qga:unix:PATH         a guest running qemu-guest-agent instead of quiesced
                                (the chardev socket of its port): spoken to in
                                qemu-ga's protocol. ping, info, status, freeze, thaw
                                and checkpoint work; qemu-ga has no deadline, so a
                                killed quiescectl leaves such a guest frozen

        DURATIONS
          500ms, 30s, 1.5s, 5m, 1h, or plain seconds (30).

        EXIT CODES
        \(exitCodeTable)

        EXAMPLES
          quiescectl --agent vsock:42:5123 info
          quiescectl --agent unix:/run/vm1/quiesce.sock filesystems
          quiescectl --agent vsock:42:5123 --agent vsock:43:5123 \\
              checkpoint --timeout 2m -- ./snapshot.sh
        """,
        version: QuiesceRelease.version,
        subcommands: [Ping.self, Info.self, Status.self, Filesystems.self, Freeze.self, Thaw.self, Sync.self, Checkpoint.self]
    )

    @OptionGroup var global: GlobalOptions
}

/// The exit code table, wrapped for --help.
let exitCodeTable = ExitCodes.table.map { entry in
    var lines: [String] = []
    var line = "  " + String(entry.code) + String(repeating: " ", count: 4 - String(entry.code).count)
    for word in entry.meaning.split(separator: " ") {
        if line.count + word.count + 1 > 78 {
            lines.append(line)
            line = String(repeating: " ", count: 6)
        }
        line += (line.hasSuffix(" ") ? "" : " ") + word
    }
    lines.append(line)
    return lines.joined(separator: "\n")
}.joined(separator: "\n")

/// The COMMAND environment, wrapped for --help.
let environmentTable = CommandEnvironment.documentation.map { entry in
    var lines = ["  " + entry.name]
    var line = "      "
    for word in entry.meaning.split(separator: " ") {
        if line.count + word.count + 1 > 78 {
            lines.append(line)
            line = "      "
        }
        line += (line.hasSuffix(" ") ? "" : " ") + word
    }
    lines.append(line)
    return lines.joined(separator: "\n")
}.joined(separator: "\n")

// MARK: - Shared options

struct GlobalOptions: ParsableArguments {
    @Option(name: .customLong("agent"),
            help: ArgumentHelp("An agent to talk to (repeatable): unix:PATH, vsock:CID:PORT, hvsock:UDS_PATH:PORT, serial:PATH or qga:unix:PATH.",
                               valueName: "ADDR"),
            transform: { (text: String) throws -> AgentAddress in
                do { return try AgentAddress(parsing: text) } catch { throw ValidationError("\(error)") }
            })
    var agents: [AgentAddress] = []

    @Flag(help: "Print one JSON document on standard output instead of text.")
    var json = false

    @Option(help: ArgumentHelp("How long to wait for a connection to be accepted (default: 5s).", valueName: "D"),
            transform: { try duration($0, flag: "--connect-timeout") })
    var connectTimeout = TimeSpan.seconds(5)

    @Option(help: ArgumentHelp("How long to wait for an agent's reply (default: 30s; a freeze may take up to checkpoint --timeout; a thaw is waited for past it while the agent's status says its thaw hooks are still running, up to 10 min).", valueName: "D"),
            transform: { try duration($0, flag: "--reply-timeout") })
    var replyTimeout = TimeSpan.seconds(30)

    func validate() throws {
        guard connectTimeout.milliseconds > 0 else { throw ValidationError("--connect-timeout must be longer than 0") }
        guard replyTimeout.milliseconds > 0 else { throw ValidationError("--reply-timeout must be longer than 0") }
        var seen = [String: AgentAddress]()
        for agent in agents {
            // The same agent twice would be frozen once and thawed twice: a confusing lost freeze.
            // Sockets are compared by the file they name, so unix:/p/q.sock and unix:/p/../p/q.sock
            // (or a symbolic link to it) are the same agent.
            if let first = seen.updateValue(agent, forKey: agent.identity) {
                throw ValidationError(first.description == agent.description
                    ? "--agent \(agent) is given twice: name each guest once"
                    : "--agent \(first) and --agent \(agent) are the same agent (the same socket): name each guest once")
            }
        }
    }

    /// The agents, or a usage error naming the flag when there is none.
    /// Runs `body` against every --agent in parallel, with the connect and reply timeouts given.
    func callAgents<Value: Sendable>(stage: AgentStage = .request, qgaHandshake: Bool = true,
                                     _ body: @escaping @Sendable (AgentClient) throws(AgentError) -> Value) throws -> [AgentCall<Value>] {
        AgentCalls.run(try requireAgents(), connectTimeoutMs: connectTimeout.milliseconds,
                       replyTimeoutMs: replyTimeout.milliseconds, stage: stage, qgaHandshake: qgaHandshake, body)
    }

    func requireAgents() throws -> [AgentAddress] {
        guard !agents.isEmpty else {
            throw ValidationError("--agent is required: say which agent to talk to, e.g. --agent vsock:42:5123 or --agent unix:/run/quiesce/quiesced.sock")
        }
        return agents
    }
}

func duration(_ text: String, flag: String) throws -> TimeSpan {
    do { return try TimeSpan(parsing: text) } catch { throw ValidationError("\(error)") }
}

/// --mount values as sent: spelled as mountinfo spells a mountpoint (no repeated or trailing
/// slash, which is lexical only: no symlink or `..` is resolved), each once, in the order given;
/// nil for none (every eligible filesystem). A mountpoint named twice is asked for once: qemu-ga
/// counts what it froze, and a repeat read as a freeze short of what was asked.
func mountList(_ mounts: [String]) -> [String]? {
    var seen = Set<String>()
    let list = mounts.map { m in
        let parts = m.split(separator: "/", omittingEmptySubsequences: true)
        return "/" + parts.joined(separator: "/")
    }.filter { seen.insert($0).inserted }
    return list.isEmpty ? nil : list
}

/// --mount values: mountpoints as the guest's /proc/self/mountinfo shows them, so absolute,
/// with no `.` or `..` component (mountinfo has none, and `..` cannot be resolved here, on the
/// host), and at most 4095 bytes (PATH_MAX, 4096 in linux/limits.h, counts the NUL).
func checkMounts(_ mounts: [String]) throws {
    for m in mounts where m.isEmpty || !m.hasPrefix("/") || m.utf8.contains(0) {
        throw ValidationError("--mount \"\(m)\" is not a mountpoint: give the absolute path the guest mounts it at, e.g. --mount /var/lib/mysql")
    }
    for m in mounts where m.split(separator: "/").contains(where: { $0 == "." || $0 == ".." }) {
        throw ValidationError("--mount \"\(m)\" has a . or .. component: give the mountpoint as the guest's mountinfo spells it, e.g. --mount /var/lib/mysql")
    }
    for m in mounts where m.utf8.count > 4095 {
        throw ValidationError("--mount is \(m.utf8.count) bytes long: a mountpoint is at most 4095 (PATH_MAX, 4096, counts the NUL)")
    }
}

/// --op-id: as long as the agent takes it (`ProtocolLimits.opIDBytes`, 1 to 128 bytes).
func checkOpID(_ id: String?) throws {
    let r = ProtocolLimits.opIDBytes
    if let id, !r.contains(id.utf8.count) { throw ValidationError("--op-id must be \(r.lowerBound) to \(r.upperBound) bytes") }
    if let id, let c = OpID.controlCharacter(in: id) { throw ValidationError("--op-id must not contain control characters (it has U+\(c))") }
}

extension AgentFailurePolicy: ExpressibleByArgument {}

// MARK: - Output

enum Output {
    /// Unbuffered, so lines keep their order with COMMAND's output on the same descriptors.
    /// One line each: what a guest sent (mountpoints, messages, hook output) cannot move the
    /// cursor, set the title or forge a line of ours (`Output.terminalSafe`).
    static func out(_ s: String) { write(1, s) }

    static func err(_ s: String) { write(2, s) }

    /// Some output could not be written (a full disk, a closed pipe): the report the run
    /// printed is lost, so a run that otherwise succeeded exits `ExitCodes.outputLost`.
    static let lost = Atomic<Bool>(false)

    private static func write(_ fd: Int32, _ s: String) {
        do { try FD.writeAll(fd, Array((terminalSafe(s) + "\n").utf8)) } catch { lost.store(true, ordering: .relaxed) }
    }

    /// `code`, or `ExitCodes.outputLost` when it is 0 and some output was lost.
    static func exitCode(_ code: Int32) -> Int32 { code == 0 && lost.load(ordering: .relaxed) ? ExitCodes.outputLost : code }

    /// `s` with the characters a terminal acts on (`terminalActsOn`) written as `\uXXXX`. The
    /// same spelling is a valid JSON escape, so a JSON document stays valid.
    static func terminalSafe(_ s: String) -> String {
        let acted = terminalActsOn
        guard s.unicodeScalars.contains(where: { acted($0.value) }) else { return s }
        var out = String.UnicodeScalarView()
        for u in s.unicodeScalars {
            if acted(u.value) {
                let hex = String(u.value, radix: 16)
                out.append(contentsOf: ("\\u" + String(repeating: "0", count: 4 - hex.count) + hex).unicodeScalars)
            } else {
                out.append(u)
            }
        }
        return String(out)
    }

    /// Prints each agent's lines (indented under a header when there are several agents) or its
    /// error on standard error; or the JSON document. Then exits with the right code.
    static func finish<V>(_ command: String, _ calls: [AgentCall<V>], json: Bool,
                          refusedCode: Int32 = ExitCodes.freezeFailed,
                          result: (V) -> JSON, lines: (AgentCall<V>, V) -> [String]) throws {
        let code = AgentCalls.exitCode(calls, refused: refusedCode)
        if json {
            out(AgentCalls.json(command, calls, exitCode: code, result: result).text)
        } else {
            let many = calls.count > 1
            for c in calls {
                switch c.outcome {
                case .success(let v):
                    let ls = lines(c, v)
                    if many {
                        out("\(c.address):")
                        for l in ls { out("  " + l) }
                    } else {
                        for l in ls { out(l) }
                    }
                case .failure(let e):
                    err("quiescectl: \(c.address): \(e.message)")
                }
            }
        }
        let final = exitCode(code)
        if final != 0 { throw ExitCode(final) }
    }
}

// MARK: - Subcommands

struct Ping: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Check that each agent answers.")
    @ParentCommand var root: Quiescectl

    func run() throws {
        let g = root.global
        let calls = try g.callAgents { c throws(AgentError) in try c.ping() }
        try Output.finish("ping", calls, json: g.json, result: { .object($0) }) { c, _ in
            ["pong in \(TimeSpan.human(nanoseconds: c.requestNs)) (\(TimeSpan.human(nanoseconds: c.elapsedNs)) with connect and hello)"]
        }
    }
}

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show each agent's version, protocol version and capabilities (from hello).")
    @ParentCommand var root: Quiescectl

    func run() throws {
        let g = root.global
        let calls = try g.callAgents { c throws(AgentError) in c.hello! }
        try Output.finish("info", calls, json: g.json, result: { .object($0.json) }) { c, h in
            Describe.info(h, qga: c.address.speaksQGA)
        }
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show whether each guest is frozen, by which operation, and until when.")
    @ParentCommand var root: Quiescectl

    func run() throws {
        let g = root.global
        let calls = try g.callAgents { c throws(AgentError) in try c.status() }
        try Output.finish("status", calls, json: g.json, result: { .object($0.json) }) { _, s in
            Describe.status(s, nowWallMs: wallClockMillis())
        }
    }
}

struct Filesystems: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show what a freeze would touch, in order (waves, dependencies), and what it skips and why.")
    @ParentCommand var root: Quiescectl

    @Option(name: .customLong("mount"), help: ArgumentHelp("Preview freezing only this mountpoint (repeatable).", valueName: "M"))
    var mounts: [String] = []

    func validate() throws { try checkMounts(mounts) }

    func run() throws {
        let g = root.global
        let m = mountList(mounts)
        let calls = try g.callAgents { c throws(AgentError) in try c.filesystems(mounts: m) }
        try Output.finish("filesystems", calls, json: g.json, result: { .object($0.json) }) { _, r in Describe.filesystems(r) }
    }
}

struct Freeze: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Freeze each guest until `thaw` or the deadline (detached: the freeze outlives this command).",
        discussion: "Prefer `checkpoint`, which thaws whatever happens. A detached freeze lasts until `quiescectl thaw` or until its timeout, after which the agent thaws by itself.")
    @ParentCommand var root: Quiescectl

    @Option(name: .customLong("mount"), help: ArgumentHelp("Freeze only this mountpoint (repeatable; default: every eligible filesystem in the agent's scope).", valueName: "M"))
    var mounts: [String] = []

    @Option(help: ArgumentHelp("Thaw by itself after this long (default: the agent's maximum).", valueName: "D"),
            transform: { try duration($0, flag: "--timeout") })
    var timeout: TimeSpan?

    @Option(name: .customLong("op-id"), help: ArgumentHelp("Name the operation (default: a fresh id); thaw --op-id uses it.", valueName: "ID"))
    var opID: String?

    func validate() throws {
        if let t = timeout, t.milliseconds == 0 { throw ValidationError("--timeout must be longer than 0") }
        if timeout != nil, let qga = root.global.agents.first(where: \.speaksQGA) {
            // qemu-ga's protocol carries no deadline: the timeout could not be honoured.
            throw ValidationError("--timeout cannot be kept by \(qga): qemu-ga's protocol has no deadline, so its freeze holds until a thaw (quiesced on qemu-ga's port ends it at its own max-freeze); use checkpoint, which always thaws")
        }
        try checkOpID(opID)
        try checkMounts(mounts)
    }

    func run() throws {
        let g = root.global
        let request = FreezeRequest(mounts: mountList(mounts), timeoutMs: timeout?.milliseconds,
                                    opID: opID ?? CheckpointPlan.makeOpID(), mode: .detached)
        let replyMs = max(g.replyTimeout.milliseconds, min(timeout?.milliseconds ?? 0, 300_000))
        let calls = try g.callAgents(stage: .freeze) { c throws(AgentError) in
            // A reply that cannot be read leaves the outcome unknown: undo the freeze by its op id.
            try c.freezeOrUndo(request, replyTimeoutMs: replyMs)
        }
        try Output.finish("freeze", calls, json: g.json, result: { .object($0.json) }) { call, r in
            Describe.freeze(r, agent: call.address, nowWallMs: wallClockMillis())
        }
    }
}

struct Thaw: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Thaw each guest (only the freeze named by --op-id, if given).")
    @ParentCommand var root: Quiescectl

    @Option(name: .customLong("op-id"), help: ArgumentHelp("Thaw only if this operation holds the freeze.", valueName: "ID"))
    var opID: String?

    func validate() throws { try checkOpID(opID) }

    func run() throws {
        let g = root.global
        let op = opID
        // qemu-ga without guest-info first: it answers nothing while inside a freeze, and the
        // thaw then waits in its channel for the freeze to return (AgentClient.connect).
        let calls = try g.callAgents(stage: .thaw, qgaHandshake: false) { c throws(AgentError) in
            try c.thawConfirmed(opID: op)
        }
        // The named operation holds no freeze, and none is held by another (`frozen_by`): nothing
        // is left frozen, so this is a refusal (70), not a thaw that failed (72).
        let nothingFrozen = calls.allSatisfy { c in
            guard case .failure(let e) = c.outcome else { return true }
            return e.remote?.code == .notFrozen && e.remote?.details?["frozen_by"] == nil
        }
        try Output.finish("thaw", calls, json: g.json, refusedCode: nothingFrozen ? ExitCodes.freezeFailed : ExitCodes.thawFailed,
                          result: { $0.json }) { _, t in
            if let r = t.result { return Describe.thaw(r) }
            return ["thawed: \(t.confirmation ?? "")"]
        }
    }
}

struct Sync: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Flush each guest's filesystems (syncfs) without freezing them.")
    @ParentCommand var root: Quiescectl

    @Option(name: .customLong("mount"), help: ArgumentHelp("Sync only this mountpoint (repeatable).", valueName: "M"))
    var mounts: [String] = []

    func validate() throws { try checkMounts(mounts) }

    func run() throws {
        let g = root.global
        let m = mountList(mounts)
        let calls = try g.callAgents { c throws(AgentError) in try c.sync(mounts: m) }
        try Output.finish("sync", calls, json: g.json, result: { .object($0.json) }) { _, r in Describe.sync(r) }
    }
}

struct Checkpoint: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Freeze every agent, run COMMAND while frozen, thaw whatever happens.",
        usage: "quiescectl --agent ADDR [--agent ADDR]... [--json] checkpoint [--mount M]... [--timeout D] [--lease D] [--on-agent-failure fail|crash-consistent] -- COMMAND [ARG]...",
        discussion: """
        All agents connect and freeze in parallel: each freeze is "bound" to its
        connection and named by one operation id. COMMAND runs once, when every agent
        has answered; then all are thawed in parallel.

        Thaw is guaranteed: when COMMAND fails; when it outlives --timeout (it gets
        SIGTERM, SIGKILL after --kill-grace, and the checkpoint fails); on SIGINT,
        SIGTERM or SIGHUP to quiescectl (forwarded to COMMAND first; a second one stops
        waiting); and when the connection drops, the agent thaws a bound freeze by
        itself. While COMMAND runs, quiescectl renews the freeze every --lease/3, so a
        long snapshot is not cut short, yet a stopped or killed quiescectl cannot keep
        a guest frozen longer than the lease.

        ENVIRONMENT
        The thaw follows COMMAND's exit, so COMMAND must wait for what it starts (a
        warning names processes left running in its process group).
        COMMAND runs in its own process group with quiescectl's environment plus:
        \(environmentTable)

        OUTPUT
        The timeline (connected, frozen with the writer-stall window per guest,
        COMMAND's exit code, thawed, with times) and a summary go to standard error,
        so COMMAND's standard output stays its own. With --json, one JSON document
        goes to standard output and COMMAND's standard output goes to standard error.

        EXIT CODES
        \(exitCodeTable)
        """)

    @ParentCommand var root: Quiescectl

    @Option(name: .customLong("mount"), help: ArgumentHelp("Freeze only this mountpoint on every agent (repeatable; default: every eligible filesystem in each agent's scope).", valueName: "M"))
    var mounts: [String] = []

    @Option(help: ArgumentHelp("How long COMMAND may run while the guests are frozen (default: 60s).", valueName: "D"),
            transform: { try duration($0, flag: "--timeout") })
    var timeout = TimeSpan.seconds(60)

    @Option(help: ArgumentHelp("How long an agent keeps its guest frozen without hearing from quiescectl (default: --timeout, at most 10s).", valueName: "D"),
            transform: { try duration($0, flag: "--lease") })
    var lease: TimeSpan?

    @Option(help: ArgumentHelp("Time between SIGTERM and SIGKILL when COMMAND must stop (default: 5s).", valueName: "D"),
            transform: { try duration($0, flag: "--kill-grace") })
    var killGrace = TimeSpan.seconds(5)

    @Option(name: .customLong("on-agent-failure"),
            help: ArgumentHelp("When an agent cannot be reached or cannot freeze: fail (thaw the others, do not run COMMAND) or crash-consistent (run COMMAND anyway and say that guest's checkpoint is only crash-consistent).",
                               valueName: "fail|crash-consistent"))
    var onAgentFailure = AgentFailurePolicy.fail

    @Option(name: .customLong("op-id"), help: ArgumentHelp("Name the operation (default: a fresh id).", valueName: "ID"))
    var opID: String?

    @Option(name: .customLong("freeze-wait"),
            help: ArgumentHelp("Once one guest is frozen, how long it waits for the others to freeze (default: --reply-timeout, at most 10s). A guest not frozen by then counts as failed (--on-agent-failure decides) and its connection is dropped, so one slow guest cannot keep the others frozen.", valueName: "D"),
            transform: { try duration($0, flag: "--freeze-wait") })
    var freezeWait: TimeSpan?

    @Argument(parsing: .postTerminator, help: ArgumentHelp("The checkpoint command and its arguments, after --.", valueName: "COMMAND"))
    var command: [String] = []

    func validate() throws {
        guard !command.isEmpty else {
            throw ValidationError("missing COMMAND: write it after --, e.g. quiescectl --agent vsock:42:5123 checkpoint -- ./snapshot.sh")
        }
        guard timeout.milliseconds > 0 else { throw ValidationError("--timeout must be longer than 0") }
        if let lease {
            guard lease.milliseconds >= 300 else { throw ValidationError("--lease must be at least 300ms") }
            guard lease <= timeout else { throw ValidationError("--lease (\(lease)) must not be longer than --timeout (\(timeout))") }
        }
        try checkOpID(opID)
        try checkMounts(mounts)
        if let w = freezeWait, w.milliseconds == 0 { throw ValidationError("--freeze-wait must be longer than 0") }
        // Refuse a COMMAND that cannot run before any guest is frozen for it.
        // By its bytes, as it will be started: a name or PATH entry that is not UTF-8 counts.
        if let e = Subprocess.cannotRun(RawArguments.command(as: command)[0]) {
            throw ValidationError(e == .ENOENT
                ? "COMMAND not found: \(command[0]) (nothing was frozen)"
                : "COMMAND \(command[0]) is not an executable file (\(e.name)); nothing was frozen")
        }
    }

    func run() throws {
        let g = root.global
        let agents = try g.requireAgents()
        // Before any thread exists, every asynchronous signal is blocked (threads inherit the
        // mask; COMMAND is started with a clean one), and one thread collects them (sigwait):
        // a signal whose default action would end quiescectl (SIGINT, SIGTERM, SIGHUP, SIGQUIT,
        // SIGXCPU, ...) interrupts the checkpoint, which stops COMMAND and thaws; SIGUSR1 and
        // SIGUSR2 are ignored. None of them can end quiescectl with the guests frozen.
        Signals.blockAsynchronous()
        let ignored = [Signals.userDefined1, Signals.userDefined2]
        let handled = Signals.stopping + [Signals.hangUp] + ignored
        // A closed stdout or stderr must not kill us before the guests are thawed.
        Signals.ignore(Signals.pipe)
        let json = g.json
        let plan = CheckpointPlan(
            opID: opID ?? CheckpointPlan.makeOpID(), agents: agents, mounts: mountList(mounts),
            timeoutMs: timeout.milliseconds, leaseMs: lease?.milliseconds, killGraceMs: killGrace.milliseconds,
            policy: onAgentFailure, connectTimeoutMs: g.connectTimeout.milliseconds, replyTimeoutMs: g.replyTimeout.milliseconds,
            freezeWaitMs: freezeWait?.milliseconds, command: command, commandArguments: RawArguments.command(as: command),
            commandStdoutToStderr: json, baseEnvironment: Subprocess.currentEnvironmentBytes())
        let checkpoint = QuiesceHost.Checkpoint(plan: plan) { entry in
            if !json { entry.humanLines.forEach(Output.err) }
        }
        Threads.detach {
            while true {
                let sig = Signals.wait(handled)
                if sig > 0 && !ignored.contains(sig) { checkpoint.interrupt(signal: sig) }
            }
        }
        let report = checkpoint.run()
        if json { Output.out(report.json.text) }
        let code = Output.exitCode(report.exitCode)
        if code != 0 { throw ExitCode(code) }
    }
}

/// The command line as the kernel gave it (bytes), where Swift's `CommandLine.arguments` and so
/// ArgumentParser see each argument decoded as UTF-8, a byte that is not UTF-8 made U+FFFD.
enum RawArguments {
    static let all: [[UInt8]] = (0..<Int(CommandLine.argc)).map { i in
        CommandLine.unsafeArgv[i].map { Subprocess.cStringBytes($0) } ?? []
    }

    /// COMMAND's arguments as given: the end of argv after a `--`, when it reads as `command`
    /// (ArgumentParser's copy); else `command` itself.
    static func command(as command: [String]) -> [[UInt8]] {
        let tail = Array(all.suffix(command.count))
        guard all.count > command.count, all[all.count - command.count - 1] == Array("--".utf8),
              zip(tail, command).allSatisfy({ String(decoding: $0, as: UTF8.self) == $1 }) else {
            return command.map { Array($0.utf8) }
        }
        return tail
    }

    /// A usage error for an argument before `--` that is not UTF-8: options and mountpoints
    /// travel as JSON text, and a replaced byte would name another mountpoint (or two as one).
    /// COMMAND's arguments, after `--`, are passed on as they are.
    static func refuseNonUTF8Options() {
        for (i, arg) in all.enumerated().dropFirst() {
            if arg == Array("--".utf8) { return }
            if String(validating: arg, as: UTF8.self) == nil {
                let shown = arg.map { $0 < 0x80 && $0 >= 0x20 ? String(UnicodeScalar($0)) : "\\x" + ($0 < 0x10 ? "0" : "") + String($0, radix: 16) }.joined()
                Output.err("Error: argument \(i) (\(shown)) is not UTF-8: options and mountpoints are sent as UTF-8 text (COMMAND's arguments after -- are passed on byte for byte)")
                CurrentProcess.exit(ExitCodes.usage)
            }
        }
    }
}

CurrentProcess.openClosedStandardDescriptors()
RawArguments.refuseNonUTF8Options()
do {
    var command = try Quiescectl.parseAsRoot()
    try command.run()
} catch {
    // --help and --version: their text is the output, and one that cannot be written (a full
    // disk, a closed pipe) is an error, as in GNU's tools (before: exit 0 with nothing written).
    if Quiescectl.exitCode(for: error) == .success {
        let text = Quiescectl.fullMessage(for: error)
        do { try FD.writeAll(1, Array((text.hasSuffix("\n") ? text : text + "\n").utf8)) } catch {
            Output.err("quiescectl: cannot write to standard output: \(error)")
            CurrentProcess.exit(ExitCodes.outputLost)
        }
        CurrentProcess.exit(0)
    }
    Quiescectl.exit(withError: error)
}
