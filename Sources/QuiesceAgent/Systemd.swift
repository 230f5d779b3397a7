// systemd integration through libsystemd: readiness, status, watchdog, socket activation.
#if canImport(Glibc)
import Glibc
#endif
import CSystemd

public enum Systemd {
    /// Sends a notification (READY=1, STATUS=…, WATCHDOG=1, STOPPING=1). A no-op without systemd.
    public static func notify(_ state: String) {
        _ = sd_notify(0, state)
    }

    /// The watchdog interval in microseconds when WatchdogSec= is set for us, else nil.
    public static func watchdogMicroseconds() -> UInt64? {
        var usec: UInt64 = 0
        return sd_watchdog_enabled(0, &usec) > 0 && usec > 0 ? usec : nil
    }

    /// File descriptors passed by socket activation, with their FileDescriptorName= names.
    /// The LISTEN_* variables are unset so children do not inherit them.
    public static func listenFDs() -> [(fd: Int32, name: String)] {
        var names: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?
        let n = sd_listen_fds_with_names(1, &names)
        guard n > 0 else { return [] }
        var out: [(Int32, String)] = []
        for i in 0..<Int(n) {
            var name = "fd\(i)"
            if let names, let p = names[i] {
                name = String(cString: p)
                free(p)
            }
            out.append((SD_LISTEN_FDS_START + Int32(i), name))
        }
        if let names { free(names) }
        return out
    }

    public static let SD_LISTEN_FDS_START: Int32 = 3
}
