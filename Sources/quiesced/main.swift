// quiesced: the guest agent. Parses flags and config, recovers from a crash, serves until SIGTERM.
import CQuiesceExecutor
import Logging
import QuiesceAgent
import QuiesceLinux
import QuiesceProtocol

// Descriptors 0-2 open before anything else opens one: a listener on a closed fd 2 would get
// the log written into it.
CurrentProcess.openClosedStandardDescriptors()
// Every asynchronous signal is blocked before any thread exists, so that every thread inherits
// that mask: a SIGTERM (or SIGINT, SIGQUIT, SIGUSR1, ...) can then only be taken by the main
// thread's sigwait below, which thaws first, and never kills the agent through another thread
// while the guest is frozen. (Threads.spawn and the executor's workers inherit the mask.)
Signals.blockAsynchronous()
// Fault signals cannot stay blocked; sent with kill(1), they are turned into a SIGTERM.
Signals.stopOnSentFaultSignals()
// Swift concurrency's global executor on two threads of our own that sleep on a condition
// variable: libdispatch's default one wakes the agent once a second forever (its workqueue
// monitor). Before any task exists.
_ = qs_install_global_executor(2)
// One malloc arena: glibc gives each thread that allocates an arena of its own (up to 8 per
// core), and a freeze runs a thread per filesystem, so the pages those arenas touched stayed
// resident after every freeze. The agent's allocations are few and small.
CurrentProcess.limitMallocArenas(1)

let usage = """
USAGE: quiesced [--listen ADDR]... [--config FILE] [options]
       quiesced --recover [--state-dir DIR]
       quiesced --check-config [--config FILE] [options]

The Quiesce guest agent. On request from the host it syncs and freezes this machine's
filesystems (FIFREEZE), runs application hooks around the freeze, reports what it froze and
how long it took, and thaws them again. It never leaves the guest frozen: every freeze has a
deadline, a freeze bound to a connection thaws when the connection closes, SIGTERM thaws
before exiting, and a restarted agent thaws what a crashed one left frozen.

ADDR is unix:PATH, vsock:PORT (any CID), vsock:CID:PORT or serial:DEVICE (a virtio-serial
port such as /dev/virtio-ports/org.quiesce.agent.0). qga+unix:PATH and qga+serial:DEVICE speak
qemu-ga's protocol instead, for hosts that drive qemu-guest-agent (libvirt, Proxmox).
hv-vss:DEVICE (hv-vss: alone is /dev/vmbus/hv_vss) answers Hyper-V's backup requests from the
kernel's hv_utils driver in place of hv_vss_daemon (Hyper-V and Azure guests). Without
--listen, the config file's listen lines, socket activation, or unix:/run/quiesce/quiesced.sock
are used.
DURATION is 500ms, 30s, 5m, 1h or plain seconds.

OPTIONS:
  --config FILE           settings file (default /etc/quiesce/quiesced.conf; flags override it)
\(AgentConfig.keys.map { "  --\($0.key) \($0.value)".padding(26) + $0.help }.joined(separator: "\n"))
  --recover               thaw what a crashed agent left frozen and exit: the records in the
                          state dir and in /run/quiesce; a config file that is not valid
                          does not stop it (state-dir, hooks-dir and hook-timeout are taken
                          from it where they are valid)
  --check-config          validate the configuration and exit
  --version               print the version
  -h, --help              show this help

Every setting can also be written in the config file as `key = value` (one per line, # comments).
"""

extension String {
    /// Pads to `width` columns, keeping two spaces before the help (help2man needs them); a longer
    /// option gets its help on the next line, indented to `width`.
    func padding(_ width: Int) -> String {
        count <= width - 2 ? self + String(repeating: " ", count: width - count)
                      : self + "\n" + String(repeating: " ", count: width)
    }
}

/// Paths and config values may hold control characters (legal in a file name): every message
/// is shown escaped, one line, never sent to the terminal as they are.
func fail(_ message: String, code: Int32 = 2) -> Never {
    let line = "quiesced: \(OneLine.escaped(message))\n"
    FD.writeOnce(FD.standardError, Array(line.utf8))
    CurrentProcess.exit(code)
}

/// Writes `text` and a newline to standard output and exits 0, or 74 (sysexits.h EX_IOERR) when
/// it cannot be written (a full disk, a closed pipe): --help and --version, whose text is the
/// whole point, as in GNU's tools.
func printOrFail(_ text: String) -> Never {
    do { try FD.writeAll(1, Array((text + "\n").utf8)) } catch {
        fail("cannot write to standard output: \(error)", code: 74)
    }
    CurrentProcess.exit(0)
}

/// A warning before logging starts (--check-config, --recover's salvage), escaped like `fail`'s.
func warn(_ message: String) {
    FD.writeOnce(FD.standardError, Array("quiesced: warning: \(OneLine.escaped(message))\n".utf8))
}

// MARK: - Flags and config

var flags: [(key: String, value: String)] = []
var configPath = AgentConfig.defaultConfigPath
var configExplicit = false
var recoverOnly = false
var checkOnly = false
let valued = Set(AgentConfig.keys.map(\.key))
var args = CommandLine.arguments.dropFirst()
while let arg = args.popFirst() {
    switch arg {
    case "-h", "--help": printOrFail(usage)
    case "--version": printOrFail("quiesced \(QuiesceRelease.version) (protocol \(ProtocolVersion.current))")
    case "--recover": recoverOnly = true
    case "--check-config": checkOnly = true
    default:
        guard arg.hasPrefix("--") else { fail("unexpected argument \"\(arg)\" (see --help)") }
        var key = String(arg.dropFirst(2))
        var value: String
        if let eq = key.firstIndex(of: "=") {
            value = String(key[key.index(after: eq)...])
            key = String(key[..<eq])
        } else {
            guard key == "config" || valued.contains(key) else { fail("unknown option --\(key) (see --help)") }
            guard let next = args.popFirst() else { fail("--\(key) needs a value") }
            value = next
        }
        if key == "config" {
            configPath = value
            configExplicit = true
        } else if valued.contains(key) {
            flags.append((key, value))
        } else {
            fail("unknown option --\(key) (see --help)")
        }
    }
}

// Run as root, the agent takes its scope, listeners and hooks directory from the file: one that
// someone else can write (or owns) hands them the choice of what root freezes and who may ask.
// Refused like an unsafe hook; /dev/null and other non-regular files are not settings anyone
// keeps, and are taken as they are.
var configUnsafe: String?
if CurrentProcess.effectiveUID == 0, let st = try? Stat.of(path: configPath), st.kind == .regular {
    if st.permissions & 0o022 != 0 {
        configUnsafe = "config file \(configPath) is writable by group or others (mode \(String(st.permissions, radix: 8))): make it 0644 or stricter"
    } else if st.uid != 0 {
        configUnsafe = "config file \(configPath) is owned by uid \(st.uid), not root: chown root it"
    }
}

var config = AgentConfig()
do {
    if let configUnsafe { throw ConfigError(configUnsafe) }
    if Paths.exists(configPath) || configExplicit {
        let bytes: [UInt8]
        do { bytes = try FD.readWholeFile(atPath: configPath, maxBytes: 1 << 20) } catch {
            if error.errno == .EFBIG { throw ConfigError("config file \(configPath) is larger than 1 MiB: not a config file?") }
            throw ConfigError("cannot read config file \(configPath): \(error.errno)")
        }
        guard let text = String(validating: bytes, as: UTF8.self) else { throw ConfigError("\(configPath): not UTF-8 text") }
        try config.load(file: configPath, text: text)
    }
    var replacing = Set<String>()
    for (k, v) in flags { try config.apply(key: k, value: v, replacing: &replacing) }
    try config.validate()
} catch {
    guard recoverOnly else { fail("\(error)") }
    // A broken config must not keep a guest frozen: recovery (ExecStopPost of the units) takes
    // what it needs from the file and the flags where it can, and the defaults otherwise.
    config = AgentConfig()
    var skipped: [String] = []
    // Read leniently (a stray non-UTF-8 byte costs only its line); a file others can write is
    // not read at all: it could point recovery at records (and hooks) of their choosing.
    if configUnsafe == nil, let bytes = try? FD.readWholeFile(atPath: configPath, maxBytes: 1 << 20) {
        skipped = config.salvage(file: configPath, text: String(decoding: bytes, as: UTF8.self), keys: AgentConfig.recoveryKeys)
    }
    var replacing = Set<String>()
    for (k, v) in flags where AgentConfig.recoveryKeys.contains(k) {
        do throws(ConfigError) { try config.apply(key: k, value: v, replacing: &replacing) } catch { skipped.append("--\(k): \(error.message)") }
    }
    warn("the configuration is not valid (\(error)); recovering anyway with state-dir \(config.stateDir)\(skipped.isEmpty ? "" : "; also skipped: " + skipped.joined(separator: "; "))")
}
if checkOnly {
    if let st = try? Stat.of(path: config.stateDir), st.kind != .directory {
        fail("state-dir \(config.stateDir): not a directory")
    }
    let listen = config.listen.isEmpty
        ? "unix:\(config.stateDir)/quiesced.sock (default, unless socket-activated)"
        : config.listen.map(\.description).joined(separator: " ")
    var scope = config.scope.include.isEmpty && config.scope.includeTypes.isEmpty ? "every eligible filesystem" : "include \((config.scope.include + config.scope.includeTypes.map { "type " + $0 }).joined(separator: " "))"
    if !config.scope.exclude.isEmpty || !config.scope.excludeTypes.isEmpty {
        scope += ", exclude \((config.scope.exclude + config.scope.excludeTypes.map { "type " + $0 }).joined(separator: " "))"
    }
    var hooksSummary = "no hooks-dir"
    if let dir = config.hooksDir {
        // The same look at the directory as every freeze takes: a hook refused there (writable
        // by others, a symlink, a bad header) is refused at every freeze until it is fixed.
        let (hooks, refused) = Hooks(directory: dir, timeoutMs: config.hookTimeoutMs, maxTimeoutMs: config.maxFreezeMs).list()
        if !Paths.exists(dir) && refused.isEmpty {
            warn("hooks-dir \(dir) does not exist: freezes run no hooks until it does")
        }
        for r in refused {
            let what = r.name == dir ? "hooks-dir \(dir): \(r.reason)" : "hook \(r.name) in \(dir) is refused at every freeze: \(r.reason)"
            warn(what)
        }
        for hook in hooks {
            guard let why = Hooks.startProblem(hook) else { continue }
            warn("hook \(hook.name) in \(dir) cannot start, so every freeze fails: \(why)")
        }
        hooksSummary = "hooks \(hooks.isEmpty ? "none" : hooks.map(\.name).joined(separator: " ")) in \(dir)\(refused.isEmpty ? "" : " (\(refused.count) refused)")"
    }
    // What the scope selects on this system now: a scope that selects nothing (include and
    // exclude that cancel out, a type that is not mounted) freezes nothing at every freeze.
    // On a thread, waited for 5 s: the postinst runs this, and a stat of a mountpoint below a
    // hung network filesystem must not hang dpkg.
    let planned = Mailbox<Result<(targets: [FreezeTarget], skipped: [SkippedReport]), ProtocolError>>()
    let scopeToPlan = config.scope
    Threads.detach { planned.post(Result { () throws(ProtocolError) in try Discovery(scope: scopeToPlan).plan() }) }
    if case .success(let plan)? = planned.receive(timeoutMs: 5000) {
        if plan.targets.isEmpty {
            warn("the scope selects no filesystem on this system now: a freeze would freeze nothing\(plan.skipped.isEmpty ? "" : " (\(plan.skipped.count) mounts skipped, e.g. \(plan.skipped[0].mountPoint): \(plan.skipped[0].reason.rawValue))")")
        } else {
            scope += " (selects \(plan.targets.count) filesystem\(plan.targets.count == 1 ? "" : "s") now: \(plan.targets.prefix(8).map(\.mountPoint).joined(separator: " "))\(plan.targets.count > 8 ? " ..." : ""))"
        }
        if let inside = FreezeRecord(stateDir: config.stateDir).target(holdingStateDirIn: plan.targets) {
            warn("state-dir \(config.stateDir) is on \(inside.mountPoint), which a freeze of this scope would freeze: such freezes are refused (the crash-safety record cannot be written while it is frozen); put state-dir on a tmpfs (the default, /run/quiesce)")
        }
    }
    if config.freezeStepTimeoutMs > config.maxFreezeMs {
        warn("freeze-step-timeout \(TimeSpan(milliseconds: config.freezeStepTimeoutMs)) is longer than max-freeze \(TimeSpan(milliseconds: config.maxFreezeMs)): a freeze wave that long would outlast the freeze it makes")
    }
    print(OneLine.escaped("configuration OK: listen \(listen); scope: \(scope); max-freeze \(TimeSpan(milliseconds: config.maxFreezeMs)); freeze-step-timeout \(TimeSpan(milliseconds: config.freezeStepTimeoutMs)); presync \(config.presync ? "yes" : "no"); \(hooksSummary)"))
    CurrentProcess.exit(0)
}

// MARK: - Logging, signals, crash recovery

LoggingSystem.bootstrap { AgentLogHandler(label: $0) }
var logger = Logger(label: "quiesced")

// Signals are taken synchronously by this thread (sigwait), so block them before any thread
// starts. SIGIO is sent to the serial-port threads (F_SETOWN_EX) and taken with sigtimedwait:
// keep it blocked everywhere, so a stray one can never take its default action (terminate).
// Taken by this thread (sigwait): those whose default action would end the process stop it
// cleanly, thawing first; SIGHUP, SIGUSR1 and SIGUSR2 are logged and otherwise ignored.
let awaitedSignals = Signals.stopping + Signals.informational
Signals.ignore(Signals.pipe)

// Crash recovery: thaw what the records of agents that are gone name. Records of agents still
// running (sharing this state dir) are theirs to thaw: a second agent, or --recover by hand,
// must never thaw a live agent's freeze under a running checkpoint.
/// The mountpoints of recovery's lines ("/data: thawed").
func mountPoints(_ lines: [String]) -> [String] {
    lines.compactMap { $0.split(separator: ":", maxSplits: 1).first.map(String.init) }
}
var recovery = FreezeRecord.recoverAbandoned(stateDir: config.stateDir)
// --recover also looks where the dead agent kept its records if that is not where the config
// says now (the config was changed while it ran): the default state dir, and the state dirs
// that agents running elsewhere left pointers to in it.
var searchedStateDirs = [config.stateDir]
if recoverOnly {
    for dir in FreezeRecord.otherStateDirs(besides: config.stateDir, default: AgentConfig.defaultStateDir) {
        searchedStateDirs.append(dir)
        let other = FreezeRecord.recoverAbandoned(stateDir: dir)
        recovery.recovered += other.recovered
        recovery.hooksOwed += other.hooksOwed
        recovery.liveOwners += other.liveOwners
    }
} else if CurrentProcess.effectiveUID == 0 && CurrentProcess.environment("INVOCATION_ID") != nil {
    // A systemd service (INVOCATION_ID): the case of a unit's ExecStopPost=quiesced --recover.
    FreezeRecord.pointToStateDir(config.stateDir, from: AgentConfig.defaultStateDir)
}
for r in recovery.recovered {
    logger.warning("found a freeze record left by an earlier run (op \(r.opID)); thawed: \(r.lines.joined(separator: "; "))",
                   metadata: ["op_id": "\(r.opID)"])
}
// Hooks a dead agent owed an ending get it now, after the thaw above (every hook that got
// `freeze` gets exactly one of `thaw` or `freeze-failed`).
// They run from the directory the record names (where they got `freeze`), so a recovery run
// with other settings (`quiesced --recover` without the agent's --hooks-dir) still ends them;
// Hooks checks that directory and each hook as at any freeze (root-owned, not writable by others).
for owed in recovery.hooksOwed {
    guard let dir = owed.hooksDir ?? config.hooksDir else {
        logger.error("op \(owed.opID) owed hooks \(owed.names.joined(separator: ", ")) a \(owed.phase), but its record names no hooks directory and no hooks-dir is configured")
        continue
    }
    let hooks = Hooks(directory: dir, timeoutMs: config.hookTimeoutMs, maxTimeoutMs: config.maxFreezeMs, logger: logger)
    let reports = hooks.recover(names: owed.names, phase: owed.phase, opID: owed.opID, mounts: owed.mounts, freezeTimeoutMs: owed.freezeTimeoutMs)
    logger.warning("ended the hooks op \(owed.opID) owed: \(reports.map { "\($0.name) \($0.phase) \($0.effectiveOutcome.rawValue)\($0.succeeded ? "" : $0.error.map { " (\($0))" } ?? "")" }.joined(separator: ", "))",
                   metadata: ["op_id": "\(owed.opID)"])
}
for pid in recovery.liveOwners {
    logger.notice("state dir \(config.stateDir) is also used by the running quiesced pid \(pid); its freeze record is left to it")
}
if recoverOnly && recovery.recovered.isEmpty && !recovery.liveOwners.isEmpty {
    logger.notice("nothing to recover: the agents using \(config.stateDir) are running and thaw their own freezes")
} else if recoverOnly && recovery.recovered.isEmpty && recovery.hooksOwed.isEmpty {
    // Said, so that a run that found nothing is not mistaken for one that looked nowhere.
    logger.notice("nothing to recover: no freeze record in \(searchedStateDirs.joined(separator: ", "))")
}
if recoverOnly {
    // The agent that starts next (the unit's restart) owes the host of each the truth.
    for r in recovery.recovered {
        FreezeRecord.leaveEndedNote(.init(opID: r.opID, filesystems: mountPoints(r.lines), reason: .restart, identity: r.identity),
                                    stateDir: config.stateDir)
    }
    CurrentProcess.exit(0)
}
// The state dir must take the freeze records: an agent that cannot write one refuses every
// freeze, so it must not start and tell systemd it is ready. Probed by writing a file there,
// after recovery: a state dir on a filesystem the dead agent left frozen takes no write (it
// would block in the kernel until a thaw) until recovery has thawed it.
do throws(SystemError) {
    try Paths.makeDirectory(config.stateDir, mode: 0o700)
    let probe = "\(config.stateDir)/.probe-\(CurrentProcess.id)"
    FD.close(try FD.open(probe, [.writeOnly, .create, .truncate], mode: 0o600))
    Paths.remove(probe)
} catch {
    fail("state-dir \(config.stateDir): cannot keep freeze records there: \(error)", code: 1)
}
if CurrentProcess.effectiveUID != 0 { logger.warning("not running as root: freezing needs CAP_SYS_ADMIN") }
if let dir = config.hooksDir, !Paths.exists(dir) {
    logger.warning("hooks-dir \(dir) does not exist: freezes run no hooks until it does")
}

// MARK: - Listeners

let server = Server(config: config, logger: logger)
let state = AgentState(config: config, logger: logger,
                       broadcast: { [server] event, except in server.broadcast(event, except: except) },
                       reportStatus: { Systemd.notify("STATUS=\($0)") },
                       statusCountdown: CurrentProcess.environment("NOTIFY_SOCKET") != nil,
                       // What start-up recovery thawed is reported as promised (reason restart).
                       recovered: recovery.recovered.map { r in (r.opID, mountPoints(r.lines)) },
                       // What the last process ended as it stopped, or --recover thawed after it.
                       endedEarlier: FreezeRecord.readEndedNotes(stateDir: config.stateDir, identity: config.identity))
server.state = state

var unixPaths: [String] = []
let activated = Systemd.listenFDs()
for (fd, name) in activated {
    // FileDescriptorName=qga (or qga-…) in the .socket unit: that one speaks qemu-ga's dialect.
    let dialect: Dialect = name == "qga" || name.hasPrefix("qga-") ? .qga : .quiesce
    if (try? Stat.of(fd: fd))?.kind == .characterDevice {
        logger.info("socket activation: serving character device fd \(fd) (\(name)) as a serial port")
        server.serve(serialDevice: "/proc/self/fd/\(fd)", dialect: dialect)
    } else {
        logger.info("socket activation: listening on fd \(fd) (\(name))")
        server.serve(listener: fd, name: name, dialect: dialect)
    }
}
if config.listen.isEmpty && activated.isEmpty {
    config.listen = [.unix(path: config.stateDir + "/quiesced.sock")]
}
var listening = Set<String>()
for address in config.listen {
    guard listening.insert(address.description).inserted else {
        logger.notice("\(address) is listed twice; listening once")
        continue
    }
    do {
        switch address {
        case .unix(let path), .qgaUnix(let path):
            // Root alone: mode 0600. When allow-uid names other users, they must be able to
            // connect at all: 0666, and admission (SO_PEERCRED against allow-uid) refuses the rest.
            let others = config.allowedUIDs.contains { $0 != 0 }
            server.serve(listener: try Socket.listenUnix(path: path, mode: others ? 0o666 : 0o600), name: address.description,
                         dialect: address.dialect)
            if others {
                let uids = config.allowedUIDs.sorted().map(String.init).joined(separator: " ")
                logger.info("\(address): mode 0666; peers admitted by uid (allow-uid \(uids))")
                if let dir = try? Stat.of(path: Paths.parent(path)), dir.permissions & 0o001 == 0 {
                    logger.warning("\(address): its directory \(Paths.parent(path)) is not searchable by other users: allow-uid \(uids) cannot reach the socket")
                }
            }
            unixPaths.append(path)
        case .vsock(let cid, let port):
            server.serve(listener: try Socket.listenVsock(cid: cid ?? UInt32.max, port: port), name: address.description)
        case .serial(let device), .qgaSerial(let device):
            server.serve(serialDevice: device, dialect: address.dialect)
        case .hvVSS(let device):
            server.serve(hvVSSDevice: device)
        }
        logger.info("listening on \(address)")
    } catch {
        fail("cannot listen on \(address): \(error)", code: 1)
    }
}

Systemd.notify("READY=1\nSTATUS=thawed")

if let usec = Systemd.watchdogMicroseconds() {
    // The watchdog proves the state actor answers, not merely that the process exists. This is
    // the one periodic wakeup of an idle agent, and only under systemd with WatchdogSec= set
    // ($WATCHDOG_USEC): a ping every WatchdogSec/2 is what the service manager asks for. Without
    // a watchdog there is no timer at all.
    Task.detached {
        while true {
            _ = await state.status()
            Systemd.notify("WATCHDOG=1")
            await AsyncSleep.nanoseconds(usec * 1000 / 2)
        }
    }
}

// MARK: - Wait for a stop signal

var stopping = false
while true {
    guard let received = Signals.waitWithSender(awaitedSignals) else { continue }
    let sig = received.signal
    if sig == Signals.hangUp {
        logger.notice("\(received.description): configuration is read at start; restart the service to apply changes")
        continue
    }
    if Signals.informational.contains(sig) {
        logger.notice("\(received.description) ignored: it has no meaning for quiesced (SIGTERM stops it)")
        continue
    }
    if stopping { continue }
    stopping = true
    logger.info("stopping on \(received.description)")
    Systemd.notify("STOPPING=1")
    let paths = unixPaths
    Task.detached {
        await state.shutdown()
        server.drainOutput(timeoutMs: 5000)  // only while replies are queued; a loaded guest may need more than 1 s
        for p in paths { Paths.remove(p) }
        LogGate.shared.release()
        CurrentProcess.exit(0)
    }
}
