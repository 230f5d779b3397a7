// How much a flush wrote, per block device (sysfs) or system-wide dirty data (/proc/meminfo).
#if canImport(Glibc)
import Glibc
#endif

/// Counters that tell whether another `syncfs` pass before a freeze still pays.
public enum WritebackStats {
    /// Bytes written to a block device since boot: field 7 ("write sectors", 512-byte units,
    /// Documentation/block/stat.rst) of `/sys/dev/block/MAJ:MIN/stat`, times 512. Nil when the
    /// device has no such file (an anonymous device: btrfs, tmpfs, overlay).
    public static func bytesWritten(_ device: DeviceNumber) -> UInt64? {
        guard let bytes = try? FD.readWholeFile(atPath: "/sys/dev/block/\(device.major):\(device.minor)/stat", maxBytes: 4096)
        else { return nil }
        let fields = String(decoding: bytes, as: UTF8.self).split(whereSeparator: { $0 == " " || $0 == "\n" })
        guard fields.count >= 7, let sectors = UInt64(fields[6]) else { return nil }
        return sectors * 512
    }

    /// Bytes of page cache that turned dirty since boot, system-wide: `nr_dirtied` (pages) of
    /// `/proc/vmstat`, times the page size. A page written again while still dirty does not
    /// count; one written again after a flush cleaned it does. Nil if unreadable.
    public static func bytesDirtied() -> UInt64? {
        guard let bytes = try? FD.readWholeFile(atPath: "/proc/vmstat", maxBytes: 1 << 16) else { return nil }
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") where line.hasPrefix("nr_dirtied ") {
            return UInt64(line.dropFirst("nr_dirtied ".count)).map { $0 * UInt64(sysconf(Int32(_SC_PAGESIZE))) }
        }
        return nil
    }

    /// Dirty plus Writeback from `/proc/meminfo`, in bytes: page-cache data not yet on storage,
    /// system-wide (proc(5)). Nil if unreadable.
    public static func dirtyBytes() -> UInt64? {
        guard let bytes = try? FD.readWholeFile(atPath: "/proc/meminfo", maxBytes: 1 << 16) else { return nil }
        var total: UInt64 = 0
        var found = 0
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n")
        where line.hasPrefix("Dirty:") || line.hasPrefix("Writeback:") {
            let parts = line.split(separator: " ", omittingEmptySubsequences: true)
            if parts.count >= 2, let kib = UInt64(parts[1]) { total += kib * 1024; found += 1 }
        }
        return found == 2 ? total : nil
    }
}
