// Real loop-mounted filesystems for tests, created under a temporary directory and always cleaned up.
import Foundation
import QuiesceLinux

/// Runs a shell command; returns stdout, throws with stderr when it fails.
@discardableResult
public func sh(_ command: String, allowFailure: Bool = false) throws -> String {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/bin/sh")
    p.arguments = ["-c", command]
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    let data = out.fileHandleForReading.readDataToEndOfFile()
    let errData = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    let stdout = String(decoding: data, as: UTF8.self)
    if p.terminationStatus != 0 && !allowFailure {
        throw LabError("`\(command)` failed (\(p.terminationStatus)): \(String(decoding: errData, as: UTF8.self))")
    }
    return stdout
}

public struct LabError: Error, CustomStringConvertible {
    public let description: String
    public init(_ d: String) { description = d }
}

/// Whether this process may build loop filesystems (root, loop devices, mkfs).
public let canUseLoopDevices: Bool = {
    getuid() == 0 && FileManager.default.fileExists(atPath: "/dev/loop-control")
        && FileManager.default.isExecutableFile(atPath: "/sbin/mkfs.ext4")
}()

/// Whether a journald answers on its socket. A socket file alone proves nothing: one left in
/// /run by a journald that has since exited refuses connections.
public let journaldIsRunning: Bool = {
    let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    let path = Array("/run/systemd/journal/socket".utf8CString)
    withUnsafeMutableBytes(of: &addr.sun_path) { dst in
        path.withUnsafeBytes { src in dst.copyMemory(from: src) }
    }
    let ok = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
        }
    }
    return ok == 0
}()

/// Set by .ci/run: tests that need a service CI starts must then run, not skip.
public let runningUnderCI: Bool = ProcessInfo.processInfo.environment["QUIESCE_CI"] == "1"

/// A directory of loop-mounted filesystems made for one test. Safety: tests freeze only these.
///
/// Use `LoopLab.with { lab in … }`: cleanup (thaw, unmount, detach, remove) runs on every path,
/// also when the body throws.
public final class LoopLab: @unchecked Sendable {
    public let root: String
    private var mountPoints: [String] = []
    private var loopDevices: [String] = []
    private let lock = NSLock()

    public init() throws {
        var template = Array("/tmp/quiesce-lab-XXXXXX".utf8CString)
        guard let p = mkdtemp(&template) else { throw LabError("mkdtemp failed") }
        root = String(cString: p)
    }

    public static func with<T>(_ body: (LoopLab) async throws -> T) async throws -> T {
        let lab = try LoopLab()
        do {
            let r = try await body(lab)
            lab.cleanup()
            return r
        } catch {
            lab.cleanup()
            throw error
        }
    }

    /// Makes a sparse image, a filesystem on it, a loop device, and mounts it at root/name.
    /// xfs needs at least 300 MB.
    @discardableResult
    public func filesystem(_ name: String, type: String = "ext4", sizeMB: Int? = nil, imageDir: String? = nil,
                           options: String? = nil) throws -> String {
        let size = sizeMB ?? (type == "xfs" ? 320 : type == "btrfs" ? 128 : 64)
        let image = "\(imageDir ?? root)/\(name).img"
        let mp = "\(root)/\(name)"
        try sh("truncate -s \(size)M '\(image)'")
        switch type {
        case "ext4": try sh("mkfs.ext4 -q -F '\(image)'")
        case "xfs": try sh("mkfs.xfs -q -f '\(image)'")
        case "btrfs": try sh("mkfs.btrfs -q -f '\(image)'")
        default: throw LabError("unknown type \(type)")
        }
        let loop = try sh("losetup --find --show '\(image)'").trimmingCharacters(in: .whitespacesAndNewlines)
        track(loop: loop)
        try sh("mkdir -p '\(mp)'")
        try sh("mount \(options.map { "-o \($0) " } ?? "")'\(loop)' '\(mp)'")
        track(mount: mp)
        return mp
    }

    /// Mounts something with arbitrary `mount` arguments at root/name (bind, tmpfs, subvol...).
    @discardableResult
    public func mount(_ name: String, _ arguments: String) throws -> String {
        let mp = "\(root)/\(name)"
        try sh("mkdir -p '\(mp)' && mount \(arguments) '\(mp)'")
        track(mount: mp)
        return mp
    }

    /// Attaches an image file to a free loop device, detached again at cleanup. Returns "/dev/loopN".
    public func attach(_ image: String) throws -> String {
        let loop = try sh("losetup --find --show '\(image)'").trimmingCharacters(in: .whitespacesAndNewlines)
        track(loop: loop)
        return loop
    }

    /// Lazily unmounts one of the lab's mounts (used to reorder mountinfo).
    public func lazyUnmount(_ mp: String) throws {
        try sh("umount -l '\(mp)'")
        lock.withLock { mountPoints.removeAll { $0 == mp } }
    }

    /// Writes `mb` MiB of data that stays dirty in the page cache (no sync).
    public func dirty(_ mp: String, mb: Int, file: String = "dirty.bin") throws {
        try sh("dd if=/dev/urandom of='\(mp)/\(file)' bs=1M count=\(mb) status=none")
    }

    /// Registers a mount made outside this lab's helpers (a FUSE server) for cleanup.
    public func track(mount: String) { lock.withLock { mountPoints.append(mount) } }
    /// Registers a loop device for cleanup.
    public func track(loop: String) { lock.withLock { loopDevices.append(loop) } }

    /// Thaws, unmounts (reverse order, lazily if busy), detaches and removes everything.
    public func cleanup() {
        let (mps, loops) = lock.withLock { (mountPoints, loopDevices) }
        // Processes a test started on this lab (agents, bridges) name its unique directory.
        // Run pkill directly: through `sh -c` it would match (and kill) that shell too.
        let pkill = Process()
        pkill.executableURL = URL(fileURLWithPath: "/usr/bin/pkill")
        pkill.arguments = ["-KILL", "-f", "--", "\(root)/"]
        if (try? pkill.run()) != nil { pkill.waitUntilExit() }
        for mp in mps.reversed() { _ = try? sh("fsfreeze -u '\(mp)' 2>/dev/null", allowFailure: true) }
        for mp in mps.reversed() { _ = try? sh("umount '\(mp)' 2>/dev/null || umount -l '\(mp)'", allowFailure: true) }
        // Anything else still mounted below root (e.g. a mount made by a test directly).
        _ = try? sh("findmnt -rn -o TARGET | grep '^\(root)/' | sort -r | xargs -r -n1 umount -l", allowFailure: true)
        for loop in loops.reversed() { _ = try? sh("losetup -d '\(loop)' 2>/dev/null", allowFailure: true) }
        _ = try? sh("rm -rf '\(root)'", allowFailure: true)
        lock.withLock { mountPoints = []; loopDevices = [] }
    }
}

/// Context switches (voluntary + nonvoluntary) of every thread of `pid`, from /proc/PID/task/*/status.
public func contextSwitches(of pid: Int32) throws -> Int {
    var total = 0
    for task in try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task") {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/task/\(task)/status", encoding: .utf8) else { continue }
        for line in status.split(separator: "\n") where line.contains("ctxt_switches:") {
            total += Int(line.split(separator: ":")[1].trimmingCharacters(in: .whitespaces)) ?? 0
        }
    }
    return total
}

/// Judges frozen state without our code: a second FIFREEZE (fsfreeze -f) answers EBUSY when the
/// filesystem is frozen. When it was not frozen, the probe's own freeze is undone at once.
public func isFrozen(_ mountPoint: String) throws -> Bool {
    let out = try sh("if fsfreeze -f '\(mountPoint)' 2>/tmp/fsfreeze.err.$$; then fsfreeze -u '\(mountPoint)'; echo thawed; "
                     + "elif grep -q 'busy' /tmp/fsfreeze.err.$$; then echo frozen; else cat /tmp/fsfreeze.err.$$; fi; rm -f /tmp/fsfreeze.err.$$")
    let s = out.trimmingCharacters(in: .whitespacesAndNewlines)
    guard s == "frozen" || s == "thawed" else { throw LabError("fsfreeze probe on \(mountPoint): \(s)") }
    return s == "frozen"
}

/// Whether a write from another process completes within `ms` (it blocks on a frozen filesystem).
/// The writer runs in the background: a process blocked on a frozen filesystem cannot be killed
/// (it sleeps uninterruptibly), so waiting for it would wait for the thaw.
public func writeCompletes(_ mountPoint: String, withinMs ms: Int) throws -> Bool {
    // The marker lives beside the mount (in the lab's directory, removed with the lab): a write
    // that was blocked completes after the thaw and would otherwise leave it behind.
    let marker = URL(fileURLWithPath: mountPoint).deletingLastPathComponent().path + "/.write-probe-\(UUID().uuidString)"
    // Not through `sh()`: Foundation would wait for the blocked writer to close its output pipe.
    _ = try Subprocess.spawn(arguments: ["/bin/sh", "-c", "echo probe > '\(mountPoint)/probe.txt' && touch '\(marker)'"],
                             environment: ["PATH=/usr/bin:/bin"])
    let deadline = Date().addingTimeInterval(Double(ms) / 1000)
    while Date() < deadline {
        if FileManager.default.fileExists(atPath: marker) {
            try? FileManager.default.removeItem(atPath: marker)
            return true
        }
        usleep(10_000)
    }
    return false
}

/// Plugs a stand-in virtio-serial port (real ones need a guest VM): a pty linked at `port`,
/// joined by socat to a Unix socket at `chardev` (where the host connects) for one host session.
/// A chardev socket left by an earlier session is removed first.
public func plugSerialPort(_ port: String, chardev: String) throws -> Process {
    try? FileManager.default.removeItem(atPath: chardev)
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/socat")
    p.arguments = ["PTY,link=\(port),raw,echo=0", "UNIX-LISTEN:\(chardev)"]
    p.standardError = FileHandle.nullDevice
    try p.run()
    for _ in 0..<300 where !FileManager.default.fileExists(atPath: chardev) { usleep(10_000) }
    guard FileManager.default.fileExists(atPath: chardev) else {
        p.terminate()
        throw LabError("socat did not create \(chardev) within 3 s")
    }
    return p
}

/// Writes root-owned 0755 hook scripts (`#!/bin/sh`, then each body) into root/`name` and
/// returns its path.
public func makeHooks(in root: String, _ scripts: [String: String], name: String = "hooks.d") throws -> String {
    let dir = "\(root)/\(name)"
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    try sh("chmod 755 '\(dir)'")
    for (name, body) in scripts {
        let path = "\(dir)/\(name)"
        try "#!/bin/sh\n\(body)\n".write(toFile: path, atomically: true, encoding: .utf8)
        try sh("chmod 755 '\(path)'")
    }
    return dir
}

/// Waits until `condition` holds, polling every 20 ms with a blocking sleep (not `Task.sleep`,
/// which a busy suite can starve); false on timeout.
public func eventually(withinMs ms: Int, _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = monotonicNanos() + UInt64(ms) * 1_000_000
    repeat {
        if try condition() { return true }
        usleep(20_000)
    } while monotonicNanos() < deadline
    return try condition()
}
