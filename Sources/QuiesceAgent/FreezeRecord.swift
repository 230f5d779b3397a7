// Crash safety: what is about to be frozen goes on record first, so a restarted agent can thaw it.
#if canImport(Glibc)
import Glibc
#endif
import QuiesceLinux
import QuiesceProtocol

/// A small JSON file in the state directory (a tmpfs, /run/quiesce, by default) naming the
/// filesystems of the freeze in progress. Written before the first FIFREEZE, removed after the
/// last FITHAW, never touched while frozen.
public struct FreezeRecord: Sendable {
    public let stateDir: String
    public var path: String { stateDir + "/freeze.json" }

    public init(stateDir: String) { self.stateDir = stateDir }

    public func write(opID: String, targets: [FreezeTarget]) throws(SystemError) {
        _ = mkdir(stateDir, 0o700)
        let body: JSON = [
            "op_id": .string(opID),
            "pid": .int(Int64(getpid())),
            "at_ms": .int(wallClockMillis()),
            "filesystems": .array(targets.map { t in
                ["mountpoint": .string(t.mountPoint),
                 "devices": .array(t.devices.sorted().map { .string($0.description) })]
            }),
        ]
        var bytes = body.encoded()
        bytes.append(0x0A)
        let tmp = path + ".tmp"
        let fd = try FD.open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
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
        _ = try retryingEINTR("rename", tmp) { rename(tmp, path) }
    }

    public func remove() { _ = unlink(path) }

    /// What a record names: mountpoints with the st_dev values that identify them.
    public struct Entry: Sendable, Equatable {
        public var mountPoint: String
        public var devices: Set<DeviceNumber>
    }

    /// Reads the record, if there is one. A damaged record gives its error.
    public func read() -> Result<(opID: String, entries: [Entry])?, ProtocolError> {
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
            return .success((opID, entries))
        } catch {
            return .failure(ProtocolError(.internal, "damaged freeze record \(path): \(error)"))
        }
    }

    /// Thaws everything a record left by an earlier run names (FITHAW on each; EINVAL means it
    /// was not frozen). Returns one line per filesystem for the log, then removes the record.
    public func recover() -> (opID: String, lines: [String])? {
        let entries: [Entry]
        let opID: String
        switch read() {
        case .success(nil): return nil
        case .success(let r?): opID = r.opID; entries = r.entries
        case .failure(let e): remove(); return ("unknown", ["\(e)"])
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
        remove()
        return (opID, lines)
    }
}

/// One agent per state directory. The lock (flock on STATE_DIR/lock, released by the kernel
/// when the process dies) is held for the agent's whole life, so a second agent started by hand
/// cannot run crash recovery on a live agent's freeze (thawing it under a running checkpoint),
/// and `quiesced --recover` refuses while the agent that owns the record is alive.
public enum StateDirLock {
    public enum Failure: Error, Sendable {
        /// Another live process holds it; its pid, when it wrote one.
        case held(by: Int32?)
        case system(SystemError)
    }

    /// Takes the lock and writes our pid into it. Keep the returned descriptor open.
    public static func acquire(stateDir: String) -> Result<Int32, Failure> {
        _ = mkdir(stateDir, 0o700)
        let path = stateDir + "/lock"
        let fd: Int32
        do { fd = try FD.open(path, O_RDWR | O_CREAT, 0o600) } catch { return .failure(.system(error)) }
        if flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let e = errno
            let holder = (try? FD.readWholeFile(atPath: path, maxBytes: 64))
                .flatMap { Int32(String(decoding: $0, as: UTF8.self).trimmingASCIIWhitespace()) }
            FD.close(fd)
            return .failure(e == EWOULDBLOCK ? .held(by: holder) : .system(SystemError("flock", path, Errno(e))))
        }
        _ = ftruncate(fd, 0)
        try? FD.writeAll(fd, Array("\(getpid())\n".utf8))
        return .success(fd)
    }
}
