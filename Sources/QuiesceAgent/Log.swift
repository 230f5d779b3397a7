// Logging: swift-log front end; the journal (structured fields) under systemd, stderr otherwise.
// While filesystems are frozen, log lines are held in memory and written after the thaw.
import QuiesceLinux
import QuiesceProtocol
import Logging
import Synchronization

/// Holds log output while a freeze is in place: the journal or a console could sit on a frozen
/// filesystem, and the agent must never block on, or write to, a frozen filesystem.
public final class LogGate: Sendable {
    public static let shared = LogGate()
    static let capacity = 2000

    private struct State {
        var holding = false
        var held: [@Sendable () -> Void] = []
        var dropped = 0
    }
    private let state = Mutex(State())

    /// Starts holding output.
    public func hold() { state.withLock { $0.holding = true } }

    /// Emits (in order) whatever was held and stops holding.
    public func release() {
        let (lines, dropped) = state.withLock { s -> ([@Sendable () -> Void], Int) in
            s.holding = false
            defer { s.held = []; s.dropped = 0 }
            return (s.held, s.dropped)
        }
        for emit in lines { emit() }
        if dropped > 0 {
            AgentLogHandler.write(level: .warning, message: "\(dropped) log lines dropped while frozen", metadata: [:], label: "quiesced")
        }
    }

    /// Runs `emit` now, or later if output is held.
    func submit(_ emit: @escaping @Sendable () -> Void) {
        let now = state.withLock { s -> Bool in
            guard s.holding else { return true }
            if s.held.count < LogGate.capacity { s.held.append(emit) } else { s.dropped += 1 }
            return false
        }
        if now { emit() }
    }
}

/// A swift-log handler writing to the systemd journal with structured fields
/// (QUIESCE_OP_ID, QUIESCE_PEER, …) when the journal is our stderr, else plain lines to stderr.
public struct AgentLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    public var logLevel: Logger.Level = .info
    let label: String

    public init(label: String) { self.label = label }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    /// systemd sets JOURNAL_STREAM when stderr is connected to the journal.
    static let useJournal: Bool = CurrentProcess.environment("JOURNAL_STREAM") != nil

    /// The service unit this process runs in ("quiesced.service"), from /proc/self/cgroup, or
    /// nil. Each journal entry names it as OBJECT_SYSTEMD_UNIT=, which `journalctl -u` and
    /// `systemctl status` also match for root's messages (sd-journal's add_matches_for_unit):
    /// journald attributes an entry to a unit by the sender's cgroup, which it can no longer
    /// read when the sender has exited, as the agent does right after flushing the lines it
    /// held while / was frozen ("stopping", "thawed").
    static let serviceUnit: String? = {
        guard let bytes = try? FD.readWholeFile(atPath: "/proc/self/cgroup", maxBytes: 1 << 16) else { return nil }
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") {
            // "0::/system.slice/quiesced.service" (cgroup v2) or "1:name=systemd:/system.slice/..." (v1).
            guard let path = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false).last else { continue }
            if let unit = path.split(separator: "/").last(where: { $0.hasSuffix(".service") }) { return String(unit) }
        }
        return nil
    }()

    public func log(event: LogEvent) {
        var merged = metadata
        if let extra = event.metadata { merged.merge(extra) { $1 } }
        let message = "\(event.message)"
        let level = event.level
        let flat = merged.mapValues { "\($0)" }
        let label = self.label
        let at = wallClockMillis()
        LogGate.shared.submit {
            // Held back while / was frozen: the journal stamps a line when it is written, so the
            // line says when it happened (a 2-minute freeze read as 10 ms between "frozen" and
            // "thawed" otherwise).
            let held = wallClockMillis() - at
            let text = held >= 1000 ? "\(message) (held \(TimeSpan.human(milliseconds: held)) while frozen; logged at \(utcTimestamp(millis: at)))" : message
            AgentLogHandler.write(level: level, message: text, metadata: flat, label: label)
        }
    }

    static func write(level: Logger.Level, message: String, metadata: [String: String], label: String) {
        if useJournal {
            var fields = ["MESSAGE=\(message)", "PRIORITY=\(priority(level))", "SYSLOG_IDENTIFIER=quiesced"]
            if let unit = serviceUnit { fields.append("OBJECT_SYSTEMD_UNIT=\(unit)") }
            for (k, v) in metadata.sorted(by: { $0.key < $1.key }) {
                fields.append("QUIESCE_\(k.uppercased().map { $0.isLetter || $0.isNumber ? $0 : "_" }.reduce("") { $0 + String($1) })=\(v)")
            }
            if Systemd.journalSend(fields) { return }
        }
        do {
            let meta = metadata.sorted(by: { $0.key < $1.key }).map { "\(OneLine.escaped($0.key))=\(OneLine.escaped($0.value))" }.joined(separator: " ")
            let line = "quiesced: \(level): \(OneLine.escaped(message))\(meta.isEmpty ? "" : " " + meta)\n"
            FD.writeOnce(FD.standardError, Array(line.utf8))
        }
    }

    static func priority(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: 7
        case .info: 6
        case .notice: 5
        case .warning: 4
        case .error: 3
        case .critical: 2
        }
    }
}

/// Text the agent writes as one line of stderr (a log line, a start-up error, the
/// `--check-config` summary). A peer's or a file's value (an op_id, a path, a config value with
/// a CR from Windows) must not start a line of its own or drive the terminal.
public enum OneLine {
    /// `text` with backslash as `\\`; `\n`, `\r`, `\t` as their C escapes; other C0 controls
    /// and DEL as `\xHH`; C1 controls (U+0080-U+009F) as `\u{HH}`. Text without any of them is
    /// returned as it is.
    public static func escaped(_ text: String) -> String {
        guard text.unicodeScalars.contains(where: { $0.value < 0x20 || (0x7F...0x9F).contains($0.value) || $0 == "\\" }) else {
            return text
        }
        var out = ""
        for scalar in text.unicodeScalars {
            switch scalar.value {
            case 0x5C: out += "\\\\"
            case 0x0A: out += "\\n"
            case 0x0D: out += "\\r"
            case 0x09: out += "\\t"
            case 0..<0x20, 0x7F: out += "\\x" + hex(scalar.value)
            case 0x80...0x9F: out += "\\u{" + hex(scalar.value) + "}"
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out
    }

    private static func hex(_ v: UInt32) -> String {
        let digits = Array("0123456789abcdef")
        return String([digits[Int(v >> 4) & 0xF], digits[Int(v) & 0xF]])
    }
}
