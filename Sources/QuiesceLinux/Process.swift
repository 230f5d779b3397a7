// Child processes and signals: the POSIX pieces both executables need.
#if canImport(Glibc)
import Glibc
#endif
import CQuiesceShims

/// How a child process ended.
public enum ExitStatus: Sendable, Equatable, CustomStringConvertible {
    case exited(Int32)
    case signaled(Int32)

    /// Decodes a `waitpid` status word (WIFEXITED / WTERMSIG are C macros Swift cannot see).
    public init(waitStatus s: Int32) {
        if s & 0x7F == 0 {
            self = .exited((s >> 8) & 0xFF)
        } else {
            self = .signaled(s & 0x7F)
        }
    }

    public var succeeded: Bool { self == .exited(0) }

    /// The shell's convention: the exit code, or 128 + the signal number.
    public var shellCode: Int32 {
        switch self {
        case .exited(let c): c
        case .signaled(let s): 128 + s
        }
    }

    public var description: String {
        switch self {
        case .exited(let c): "exit code \(c)"
        case .signaled(let s): "killed by \(Signals.name(s))"
        }
    }
}

/// Signal masks, dispositions and delivery.
public enum Signals {
    /// SIGTERM: a service manager's stop.
    public static let terminate = SIGTERM
    /// SIGINT: Ctrl-C.
    public static let interrupt = SIGINT
    /// SIGHUP.
    public static let hangUp = SIGHUP
    /// SIGPIPE: a write to a closed pipe or socket.
    public static let pipe = SIGPIPE
    /// SIGIO: signal-driven I/O (the serial ports, `SerialPortWait`).
    public static let io = SIGIO
    /// SIGUSR1 and SIGUSR2: no meaning to Quiesce's programs.
    public static let userDefined1 = SIGUSR1
    public static let userDefined2 = SIGUSR2

    /// "SIGTERM" for 15, "signal N" for numbers without a common name.
    public static func name(_ sig: Int32) -> String {
        switch sig {
        case SIGHUP: "SIGHUP"
        case SIGINT: "SIGINT"
        case SIGQUIT: "SIGQUIT"
        case SIGILL: "SIGILL"
        case SIGABRT: "SIGABRT"
        case SIGBUS: "SIGBUS"
        case SIGFPE: "SIGFPE"
        case SIGKILL: "SIGKILL"
        case SIGUSR1: "SIGUSR1"
        case SIGSEGV: "SIGSEGV"
        case SIGUSR2: "SIGUSR2"
        case SIGPIPE: "SIGPIPE"
        case SIGALRM: "SIGALRM"
        case SIGTERM: "SIGTERM"
        case SIGCHLD: "SIGCHLD"
        case SIGCONT: "SIGCONT"
        case SIGSTOP: "SIGSTOP"
        case SIGTSTP: "SIGTSTP"
        case SIGVTALRM: "SIGVTALRM"
        case SIGPROF: "SIGPROF"
        case SIGXCPU: "SIGXCPU"
        case SIGXFSZ: "SIGXFSZ"
        case SIGPWR: "SIGPWR"
        default: "signal \(sig)"
        }
    }

    /// Every signal but the synchronous faults (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP,
    /// SIGABRT, SIGSYS), which must reach the thread that caused them.
    public static var asynchronous: sigset_t {
        var s = sigset_t()
        sigfillset(&s)
        for fault in [SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGABRT, SIGSYS] { sigdelset(&s, fault) }
        return s
    }

    /// Signals whose default action ends the process and that a daemon should rather take as a
    /// request to stop cleanly (signal(7)): SIGTERM, SIGINT, SIGQUIT, SIGALRM, SIGVTALRM,
    /// SIGPROF, SIGXCPU, SIGXFSZ, SIGPWR.
    public static let stopping: [Int32] = [SIGTERM, SIGINT, SIGQUIT, SIGALRM, SIGVTALRM, SIGPROF, SIGXCPU, SIGXFSZ, SIGPWR]
    /// Signals whose default action ends the process but that mean nothing to a daemon unless
    /// it gives them a meaning: SIGHUP (a reload), SIGUSR1, SIGUSR2.
    public static let informational: [Int32] = [SIGHUP, SIGUSR1, SIGUSR2]

    /// Makes a fault signal sent by another process (`kill -SEGV`, `kill -ABRT`) a SIGTERM to
    /// this process, so that it stops cleanly instead of dying of it; a real fault, or this
    /// process's own abort(), keeps its earlier action (qs_stop_on_sent_fault_signals).
    public static func stopOnSentFaultSignals() { _ = qs_stop_on_sent_fault_signals() }

    /// Sets the calling thread's mask to every asynchronous signal (`asynchronous`), and only
    /// those: fault signals a parent left blocked (a mask survives execve) are unblocked, so
    /// that a real fault is never held pending and one sent with kill(1) reaches its handler.
    public static func blockAsynchronous() {
        var s = asynchronous
        pthread_sigmask(SIG_SETMASK, &s, nil)
    }

    static func set(_ signals: [Int32]) -> sigset_t {
        var s = sigset_t()
        sigemptyset(&s)
        for sig in signals { sigaddset(&s, sig) }
        return s
    }

    /// Blocks `signals` in the calling thread; threads it creates afterwards inherit the mask.
    /// Call it on the main thread before starting any thread, then collect them with `wait`.
    public static func block(_ signals: [Int32]) {
        var s = set(signals)
        pthread_sigmask(SIG_BLOCK, &s, nil)
    }

    /// Unblocks `signals` in the calling thread.
    public static func unblock(_ signals: [Int32]) {
        var s = set(signals)
        pthread_sigmask(SIG_UNBLOCK, &s, nil)
    }

    /// Ignores a signal process-wide (e.g. SIGPIPE, so a write to a closed socket fails with EPIPE).
    public static func ignore(_ sig: Int32) {
        _ = signal(sig, SIG_IGN)
    }

    /// Waits for one of `signals`, which must be blocked in every thread; returns its number.
    public static func wait(_ signals: [Int32]) -> Int32 {
        var s = set(signals)
        var sig: Int32 = 0
        while true {
            let rc = sigwait(&s, &sig)
            if rc == 0 { return sig }
            if rc != EINTR { return -1 }
        }
    }

    /// A signal taken by `waitWithSender`.
    public struct Received: Sendable {
        /// The signal as delivered.
        public var signal: Int32
        /// The process that sent it (kill(2), sigqueue(3), tgkill(2)); nil when the kernel raised
        /// it (SIGXCPU at a CPU limit, SIGPIPE).
        public var sender: pid_t?
        /// For a SIGTERM that `stopOnSentFaultSignals` made of a fault signal sent from outside:
        /// that fault signal (`sender` is then who sent it).
        public var forwardedFault: Int32?

        /// "SIGTERM from pid 1 (systemd)", "SIGSEGV from pid 812 (kill)", "SIGXCPU from the kernel":
        /// the command name read from /proc/PID/comm while the sender still exists.
        public var description: String {
            let name = Signals.name(forwardedFault ?? signal)
            guard let sender else { return "\(name) from the kernel" }
            let comm = (try? FD.readWholeFile(atPath: "/proc/\(sender)/comm", maxBytes: 64))
                .map { $0.prefix { $0 != 0x0A } }
                .flatMap { String(validating: $0, as: UTF8.self) }
            return "\(name) from pid \(sender)" + (comm.map { " (\($0))" } ?? "")
        }
    }

    /// Waits for one of `signals`, which must be blocked in every thread (sigwaitinfo(2)), and
    /// says who sent it. Returns nil only if the wait itself fails.
    public static func waitWithSender(_ signals: [Int32]) -> Received? {
        var s = set(signals)
        var sender: Int32 = -1
        var fault: Int32 = 0
        let sig = qs_sigwait_sender(&s, &sender, &fault)
        guard sig > 0 else { return nil }
        return Received(signal: sig, sender: sender >= 0 ? sender : nil, forwardedFault: fault > 0 ? fault : nil)
    }

    /// Sends `sig` to a process, or to its whole process group.
    public static func send(_ sig: Int32, to pid: pid_t, group: Bool = false) throws(SystemError) {
        let target = group ? -pid : pid
        _ = try retryingEINTR("kill", "\(group ? "process group" : "process") \(pid)") { kill(target, sig) }
    }
}

/// Starting and reaping child processes with posix_spawn.
public enum Subprocess {
    /// The process's environment as its bytes ("NAME=value" each, without the NUL): a value
    /// that is not UTF-8 stays as it is, where `currentEnvironment` would replace its bytes.
    public static func currentEnvironmentBytes() -> [[UInt8]] {
        var out: [[UInt8]] = []
        var p = environ
        while let entry = p.pointee {
            out.append(cStringBytes(entry))
            p += 1
        }
        return out
    }

    /// This process's environment as "NAME=value" strings (read as UTF-8).
    public static func currentEnvironment() -> [String] {
        var out: [String] = []
        var p = environ
        while let entry = p.pointee {
            out.append(String(cString: entry))
            p += 1
        }
        return out
    }

    /// Why `program` could not be started, or nil when it can: found (in PATH when it has no
    /// slash, as `spawn` searches), a regular file, executable by us. ENOENT when nowhere,
    /// EACCES when found but not an executable file. Lets a caller refuse a COMMAND before it
    /// freezes anything; `spawn` still reports what happens at the real start.
    public static func cannotRun(_ program: String, searchPath: String? = getenv("PATH").map { String(cString: $0) }) -> Errno? {
        cannotRun(Array(program.utf8), searchPath: searchPath.map { Array($0.utf8) })
    }

    /// `cannotRun` for a program named by bytes, UTF-8 or not, searched in PATH's bytes.
    public static func cannotRun(_ program: [UInt8], searchPath: [UInt8]? = rawPATH()) -> Errno? {
        if case .failure(let e) = locate(program, searchPath: searchPath) { return e }
        return nil
    }

    /// The file `program` names: itself when it has a slash, else the first executable regular
    /// file of that name in `searchPath`'s directories (an empty entry is the current
    /// directory; no PATH: /usr/local/bin:/usr/bin:/bin), as execvp(3) searches. Errors as
    /// `cannotRun`.
    public static func locate(_ program: String, searchPath: String? = getenv("PATH").map { String(cString: $0) }) -> Result<String, Errno> {
        locate(Array(program.utf8), searchPath: searchPath.map { Array($0.utf8) }).map { String(decoding: $0, as: UTF8.self) }
    }

    /// `locate` by bytes: a file name or PATH entry that is not UTF-8 is found as it is.
    public static func locate(_ program: [UInt8], searchPath: [UInt8]? = rawPATH()) -> Result<[UInt8], Errno> {
        func check(_ candidate: [UInt8]) -> Errno? {
            (candidate + [0]).withUnsafeBufferPointer { b -> Errno? in
                let path = UnsafeRawPointer(b.baseAddress!).assumingMemoryBound(to: CChar.self)
                var st = stat()
                guard stat(path, &st) == 0 else { return Errno(errno) }
                guard (st.st_mode & S_IFMT) == S_IFREG, access(path, X_OK) == 0 else { return .EACCES }
                return nil
            }
        }
        let slash = UInt8(ascii: "/")
        guard !program.isEmpty, !program.contains(0) else { return .failure(.ENOENT) }
        if program.contains(slash) { return check(program).map { .failure($0) } ?? .success(program) }
        var found: Errno = .ENOENT
        let dirs = (searchPath ?? Array("/usr/local/bin:/usr/bin:/bin".utf8)).split(separator: UInt8(ascii: ":"), omittingEmptySubsequences: false)
        for dir in dirs {
            let candidate = (dir.isEmpty ? [UInt8(ascii: ".")] : Array(dir)) + [slash] + program
            let e = check(candidate)
            if e == nil { return .success(candidate) }
            if e == .EACCES { found = .EACCES }
        }
        return .failure(found)
    }

    /// PATH's bytes, nil when it is not set.
    public static func rawPATH() -> [UInt8]? {
        guard let p = getenv("PATH") else { return nil }
        return cStringBytes(p)
    }

    /// The bytes of a NUL-terminated C string, without the NUL, whatever their encoding (argv,
    /// environ and PATH hold bytes, not necessarily UTF-8).
    public static func cStringBytes(_ p: UnsafePointer<CChar>) -> [UInt8] {
        Array(UnsafeBufferPointer(start: UnsafeRawPointer(p).assumingMemoryBound(to: UInt8.self), count: strlen(p)))
    }

    /// Starts `arguments[0]` (searched in PATH when it has no slash) with `arguments` and
    /// `environment`. The child gets default signal dispositions and an empty signal mask whatever
    /// the parent blocked or ignored. With `newProcessGroup` it leads a process group of its own,
    /// so a terminal's Ctrl-C reaches only the parent, which decides what to forward.
    /// With `stdoutToStderr` the child's standard output is the parent's standard error.
    /// With `parentDeathSignal` the kernel sends the child that signal when the calling thread
    /// ends, even when the parent dies of SIGKILL (prctl(2) PR_SET_PDEATHSIG): call it from a
    /// thread that lives as long as it watches the child. Errors: the execve(2)/posix_spawn(3)
    /// errno (ENOENT, EACCES, ENOEXEC...).
    public static func spawn(arguments: [String], environment: [String], newProcessGroup: Bool = true,
                             stdoutToStderr: Bool = false, parentDeathSignal: Int32? = nil) throws(SystemError) -> pid_t {
        try spawn(argumentBytes: arguments.map { Array($0.utf8) }, environmentBytes: environment.map { Array($0.utf8) },
                  newProcessGroup: newProcessGroup, stdoutToStderr: stdoutToStderr, parentDeathSignal: parentDeathSignal)
    }

    /// `spawn` with the arguments and environment as bytes, passed to the child exactly (a
    /// file name that is not UTF-8, say); the program, `argumentBytes[0]`, is looked for by
    /// its bytes too, in PATH's bytes.
    public static func spawn(argumentBytes: [[UInt8]], environmentBytes: [[UInt8]], newProcessGroup: Bool = true,
                             stdoutToStderr: Bool = false, parentDeathSignal: Int32? = nil) throws(SystemError) -> pid_t {
        let arguments = argumentBytes, environment = environmentBytes
        guard let first = arguments.first, !first.isEmpty else {
            throw SystemError("spawn", "(empty command)", .EINVAL)
        }
        let program = String(decoding: first, as: UTF8.self)
        if let parentDeathSignal {
            // Searched here rather than with execvpe(3), which would run a script without a #!
            // line through /bin/sh, where posix_spawnp(3) and execve(2) fail with ENOEXEC.
            let path: [UInt8]
            switch locate(first) {
            case .success(let found): path = found
            case .failure(let e): throw SystemError("spawn", program, e)
            }
            var pid: pid_t = 0
            let rc = withCArrays(arguments, environment) { argv, envp in
                (path + [0]).withUnsafeBufferPointer { p in
                    qs_spawn_tied(UnsafeRawPointer(p.baseAddress!).assumingMemoryBound(to: CChar.self), argv, envp,
                                  newProcessGroup ? 1 : 0, stdoutToStderr ? 1 : 0, parentDeathSignal, &pid)
                }
            }
            guard rc == 0 else { throw SystemError("spawn", program, Errno(rc)) }
            return pid
        }
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }

        var flags = Int32(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF)
        if newProcessGroup {
            flags |= Int32(POSIX_SPAWN_SETPGROUP)
            posix_spawnattr_setpgroup(&attr, 0)
        }
        posix_spawnattr_setflags(&attr, Int16(flags))
        resetSignals(&attr)
        if stdoutToStderr { posix_spawn_file_actions_adddup2(&actions, 2, 1) }

        var pid: pid_t = 0
        // argv[0] is the program's name as given, byte for byte.
        let rc = withCArrays(arguments, environment) { argv, envp in
            first.contains(UInt8(ascii: "/"))
                ? posix_spawn(&pid, argv[0]!, &actions, &attr, argv, envp)
                : posix_spawnp(&pid, argv[0]!, &actions, &attr, argv, envp)
        }
        guard rc == 0 else { throw SystemError("spawn", program, Errno(rc)) }
        return pid
    }

    /// Waits (blocking) until the child ends but leaves it unreaped (a zombie), so its pid and
    /// process group cannot be reused while another thread may still signal them. Reap it
    /// afterwards with `wait`, which then returns at once.
    public static func waitUntilExited(_ pid: pid_t) throws(SystemError) {
        var info = siginfo_t()
        _ = try retryingEINTR("waitid", "process \(pid)") { waitid(P_PID, id_t(pid), &info, WEXITED | WNOWAIT) }
    }

    /// Waits for the child; after `timeoutMs` sends SIGTERM to its process group (it must lead
    /// one), and SIGKILL after `graceMs` more. Blocks the calling thread: use a dedicated thread.
    /// The wait is `poll` on a pidfd (Linux 5.3+) with the next deadline as its timeout, so it
    /// wakes only when the child ends or a deadline is due; with no pidfd (ENOSYS) it falls
    /// back to a plain blocking `waitpid` when there is no deadline, else to short sleeps.
    public static func wait(_ pid: pid_t, timeoutMs: Int64?, graceMs: Int64 = 2000) -> (status: ExitStatus, timedOut: Bool) {
        let start = monotonicNanos()
        let pidFD = qs_pidfd_open(pid)
        defer { if pidFD >= 0 { FD.close(pidFD) } }
        var status: Int32 = 0
        var terminatedAt: UInt64?
        while true {
            let rc = waitpid(pid, &status, timeoutMs == nil && pidFD < 0 ? 0 : WNOHANG)
            if rc == pid { return (ExitStatus(waitStatus: status), terminatedAt != nil) }
            if rc < 0 && errno != EINTR { return (.exited(-1), terminatedAt != nil) }
            var nextDeadline: UInt64?
            if let timeoutMs {
                let now = monotonicNanos()
                if terminatedAt == nil && now - start >= UInt64(timeoutMs) * 1_000_000 {
                    _ = kill(-pid, SIGTERM)
                    terminatedAt = now
                } else if let t = terminatedAt, now - t >= UInt64(graceMs) * 1_000_000 {
                    _ = kill(-pid, SIGKILL)
                }
                nextDeadline = terminatedAt.map { $0 + UInt64(graceMs) * 1_000_000 } ?? start + UInt64(timeoutMs) * 1_000_000
                if let d = nextDeadline, d <= now { nextDeadline = nil }  // SIGKILL sent: only the exit is left
            }
            if pidFD >= 0 {
                let waitMs = nextDeadline.map { Int32(clamping: ($0 - monotonicNanos()) / 1_000_000 + 1) } ?? -1
                var p = pollfd(fd: pidFD, events: Int16(POLLIN), revents: 0)
                _ = poll(&p, 1, waitMs)
            } else if rc == 0 {
                usleep(20_000)
            }
        }
    }

    /// Waits (blocking) until the child ends and reaps it.
    public static func wait(_ pid: pid_t) throws(SystemError) -> ExitStatus {
        var status: Int32 = 0
        _ = try retryingEINTR("waitpid", "process \(pid)") { waitpid(pid, &status, 0) }
        return ExitStatus(waitStatus: status)
    }
}

/// Gives a child spawned with `attr` (which must set POSIX_SPAWN_SETSIGMASK and
/// POSIX_SPAWN_SETSIGDEF) an empty signal mask and the default action for every signal the
/// parent may block or ignore (the agent's SIGIO for serial ports among them): a child must
/// not inherit what the parent uses for itself.
func resetSignals(_ attr: inout posix_spawnattr_t) {
    var empty = sigset_t()
    sigemptyset(&empty)
    posix_spawnattr_setsigmask(&attr, &empty)
    var defaults = Signals.set([SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE, SIGCHLD, SIGUSR1, SIGUSR2, SIGALRM, SIGIO])
    posix_spawnattr_setsigdefault(&attr, &defaults)
}

/// Runs `body` with `arguments` and `environment` as NULL-terminated C string arrays, as
/// posix_spawn(3) takes them, freed afterwards.
func withCArrays<T>(_ arguments: [String], _ environment: [String],
                    _ body: ([UnsafeMutablePointer<CChar>?], [UnsafeMutablePointer<CChar>?]) -> T) -> T {
    withCArrays(arguments.map { Array($0.utf8) }, environment.map { Array($0.utf8) }, body)
}

/// The same with each string given as its bytes (no NUL inside).
func withCArrays<T>(_ arguments: [[UInt8]], _ environment: [[UInt8]],
                    _ body: ([UnsafeMutablePointer<CChar>?], [UnsafeMutablePointer<CChar>?]) -> T) -> T {
    func cString(_ bytes: [UInt8]) -> UnsafeMutablePointer<CChar> {
        let p = UnsafeMutablePointer<CChar>.allocate(capacity: bytes.count + 1)
        for (i, b) in bytes.enumerated() { p[i] = CChar(bitPattern: b) }
        p[bytes.count] = 0
        return p
    }
    let argv: [UnsafeMutablePointer<CChar>?] = arguments.map(cString) + [nil]
    let envp: [UnsafeMutablePointer<CChar>?] = environment.map(cString) + [nil]
    defer {
        for p in argv { p?.deallocate() }
        for p in envp { p?.deallocate() }
    }
    return body(argv, envp)
}
