// systemd integration, spoken directly: readiness, status, watchdog, socket activation, the journal.
import QuiesceLinux

/// The service-manager protocols the agent needs, implemented on plain sockets and environment
/// variables instead of linking libsystemd: libsystemd.so.0 pulls libgcrypt, libgpg-error,
/// liblz4, liblzma, libzstd and libcap into the process, about 1.1 MB of resident pages measured
/// here (/proc/PID/smaps), for four small, stable protocols:
/// - notify: one datagram of `KEY=VALUE` lines to the AF_UNIX socket named by `$NOTIFY_SOCKET`
///   (a leading `@` means the abstract namespace) — sd_notify(3);
/// - watchdog: `$WATCHDOG_USEC`, for us only if `$WATCHDOG_PID` is unset or our pid — sd_watchdog_enabled(3);
/// - socket activation: fds from 3, `$LISTEN_FDS` of them when `$LISTEN_PID` is our pid, named by
///   `$LISTEN_FDNAMES` (colon-separated) — sd_listen_fds(3);
/// - journal: one datagram to /run/systemd/journal/socket, a field per line, `KEY=VALUE`, or for
///   a value with a newline `KEY`, newline, its length as 64-bit little-endian, the value, newline
///   (systemd's "Native Journal Protocol", systemd.io/JOURNAL_NATIVE_PROTOCOL).
public enum Systemd {
    /// Sends a notification (READY=1, STATUS=…, WATCHDOG=1, STOPPING=1). A no-op without systemd.
    public static func notify(_ state: String) {
        guard let path = environment("NOTIFY_SOCKET"), !path.isEmpty else { return }
        _ = sendDatagram(Array(state.utf8), to: path)
    }

    /// The watchdog interval in microseconds when WatchdogSec= is set for us, else nil.
    public static func watchdogMicroseconds() -> UInt64? {
        guard let value = environment("WATCHDOG_USEC"), let usec = UInt64(value), usec > 0 else { return nil }
        if let pid = environment("WATCHDOG_PID"), Int32(pid) != CurrentProcess.id { return nil }
        return usec
    }

    /// File descriptors passed by socket activation, with their FileDescriptorName= names
    /// ("unknown" when systemd gave none). The LISTEN_* variables are unset so children do not
    /// inherit them; the fds are made close-on-exec.
    public static func listenFDs() -> [(fd: Int32, name: String)] {
        defer { for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] { CurrentProcess.unsetEnvironment(v) } }
        guard let pid = environment("LISTEN_PID"), Int32(pid) == CurrentProcess.id,
              let count = environment("LISTEN_FDS").flatMap({ Int32($0) }), count > 0 else { return [] }
        let names = environment("LISTEN_FDNAMES")?.split(separator: ":", omittingEmptySubsequences: false).map(String.init) ?? []
        return (0..<count).map { i in
            let fd = SD_LISTEN_FDS_START + i
            FD.setCloseOnExec(fd)
            return (fd, Int(i) < names.count ? names[Int(i)] : "unknown")
        }
    }

    public static let SD_LISTEN_FDS_START: Int32 = 3

    /// Sends one journal entry; `fields` are `KEY=VALUE` strings. False when the journal socket
    /// did not take it (the caller then writes the line to stderr).
    static func journalSend(_ fields: [String]) -> Bool {
        sendDatagram(journalMessage(fields), to: "/run/systemd/journal/socket")
    }

    /// The native-protocol datagram for `fields` (`KEY=VALUE` strings; one without `=` is dropped).
    static func journalMessage(_ fields: [String]) -> [UInt8] {
        var message: [UInt8] = []
        for field in fields {
            let bytes = Array(field.utf8)
            guard let eq = bytes.firstIndex(of: UInt8(ascii: "=")) else { continue }
            if bytes[(eq + 1)...].contains(0x0A) {
                message += bytes[..<eq]
                message.append(0x0A)
                var length = UInt64(bytes.count - eq - 1).littleEndian
                withUnsafeBytes(of: &length) { message += $0 }
                message += bytes[(eq + 1)...]
            } else {
                message += bytes
            }
            message.append(0x0A)
        }
        return message
    }

    private static func environment(_ name: String) -> String? {
        CurrentProcess.environment(name)
    }

    /// One datagram on a fresh AF_UNIX socket; `path` starting with `@` is an abstract address.
    private static func sendDatagram(_ bytes: [UInt8], to path: String) -> Bool {
        Socket.sendDatagram(bytes, toUnixPath: path)
    }
}
