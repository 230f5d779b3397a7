// Freeze and thaw hooks: executables in a directory, run in lexical order with a timeout.
#if canImport(Glibc)
import Glibc
#endif
import QuiesceLinux
import QuiesceProtocol

/// Runs the hooks of a directory around a freeze: each executable with the argument `freeze`
/// in lexical order before the filesystems freeze, and with `thaw` in reverse order after they
/// thaw. A hook that fails or outlives its timeout fails the freeze, and the hooks that already
/// ran get their `thaw`. Only root-owned files that nobody else can write are run.
public struct Hooks: Sendable {
    public let directory: String
    public let timeoutMs: Int64

    public init(directory: String, timeoutMs: Int64) {
        self.directory = directory
        self.timeoutMs = timeoutMs
    }

    /// The hooks to run, in lexical order, and the files passed over with the reason.
    public func list() -> (hooks: [String], ignored: [(String, String)]) {
        var names: [String] = []
        var ignored: [(String, String)] = []
        for name in FD.directoryEntries(atPath: directory) ?? [] {
            if name.hasPrefix(".") || name.hasSuffix("~") || name.contains(".dpkg-") || name.hasSuffix(".disabled")
                || name.hasSuffix(".sample") || name == "README" { continue }
            var st = stat()
            guard stat(directory + "/" + name, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { continue }
            if st.st_mode & 0o111 == 0 { ignored.append((name, "not executable")); continue }
            if st.st_uid != 0 { ignored.append((name, "not owned by root")); continue }
            if st.st_mode & 0o022 != 0 { ignored.append((name, "writable by group or others")); continue }
            names.append(name)
        }
        return (names.sorted(), ignored)
    }

    public struct FreezeOutcome: Sendable {
        public var reports: [HookReport]
        /// Hooks whose `freeze` succeeded (they get a `thaw`).
        public var ran: [String]
        public var failure: String?
    }

    public func runFreeze(opID: String) async -> FreezeOutcome {
        let (names, _) = list()
        var reports: [HookReport] = []
        var ran: [String] = []
        for name in names {
            let report = await run(name, phase: "freeze", opID: opID)
            reports.append(report)
            if report.error != nil {
                return FreezeOutcome(reports: reports, ran: ran, failure: "freeze hook \(name): \(report.error!)")
            }
            ran.append(name)
        }
        return FreezeOutcome(reports: reports, ran: ran, failure: nil)
    }

    /// Runs `thaw` for the named hooks in reverse order; failures are reported, never fatal.
    public func runThaw(opID: String, names: [String]) async -> [HookReport] {
        var reports: [HookReport] = []
        for name in names.reversed() { reports.append(await run(name, phase: "thaw", opID: opID)) }
        return reports
    }

    private func run(_ name: String, phase: String, opID: String) async -> HookReport {
        let path = directory + "/" + name
        let timeout = timeoutMs
        return await Threads.run {
            let start = monotonicNanos()
            let env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                       "QUIESCE_PHASE=\(phase)", "QUIESCE_OP_ID=\(opID)"]
            do {
                let pid = try Subprocess.spawn(arguments: [path, phase], environment: env, newProcessGroup: true)
                let (status, timedOut) = Subprocess.wait(pid, timeoutMs: timeout)
                let us = micros(since: start)
                if timedOut {
                    return HookReport(name: name, phase: phase, exitCode: nil, durationUs: us,
                                      error: "timed out after \(TimeSpan(milliseconds: timeout)) and was stopped")
                }
                switch status {
                case .exited(0): return HookReport(name: name, phase: phase, exitCode: 0, durationUs: us)
                case .exited(let c): return HookReport(name: name, phase: phase, exitCode: Int64(c), durationUs: us, error: "\(status)")
                case .signaled: return HookReport(name: name, phase: phase, exitCode: nil, durationUs: us, error: "\(status)")
                }
            } catch {
                return HookReport(name: name, phase: phase, exitCode: nil, durationUs: micros(since: start), error: "\(error)")
            }
        }
    }
}
