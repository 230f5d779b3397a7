// Waiting for a device path to appear, change or go away through inotify, instead of polling it.
#if canImport(Glibc)
import Glibc
#endif

/// An inotify watch on the directory that holds a path (or, while that directory is missing, on
/// its nearest existing ancestor). It reports changes there, so a listener can wait for a
/// virtio-serial port to be plugged or unplugged without waking up on a timer.
///
/// Changes to other entries of the same directory wake it too (udev adds and removes entries of
/// `/dev/virtio-ports` only on hotplug): callers re-check their path after every wake.
public final class PathWatch: @unchecked Sendable {
    /// The inotify descriptor (non-blocking, close-on-exec).
    public let fd: Int32
    /// The directory watched.
    public let directory: String

    /// Errors: inotify_init1 / inotify_add_watch failures (EMFILE, ENOSPC when the inotify
    /// watch limit is reached, ENOENT when not even `/` exists).
    public init(near path: String) throws(SystemError) {
        fd = inotify_init1(Int32(IN_NONBLOCK | IN_CLOEXEC))
        guard fd >= 0 else { throw SystemError("inotify_init1", path, Errno(errno)) }
        var dir = Paths.parent(path)
        let mask = UInt32(IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF)
        while inotify_add_watch(fd, dir, mask) < 0 {
            let e = errno
            guard e == ENOENT || e == ENOTDIR, dir != "/" else {
                Glibc.close(fd)
                throw SystemError("inotify_add_watch", dir, Errno(e))
            }
            dir = Paths.parent(dir)
        }
        directory = dir
    }

    deinit { Glibc.close(fd) }

    /// Reads every pending event without blocking; true when there was at least one.
    @discardableResult
    public func drain() -> Bool {
        var buffer = [UInt8](repeating: 0, count: 4096)
        var any = false
        while true {
            let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n > 0 { any = true; continue }
            if n < 0 && errno == EINTR { continue }
            return any
        }
    }

    /// Blocks until something changes in the watched directory (no timeout), then drains.
    public func waitForChange() {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        while poll(&p, 1, -1) < 0 && errno == EINTR {}
        drain()
    }

    /// Blocks until `path` exists (returns at once if it does). Wakes only on changes in the
    /// directory that would hold it or in the ancestor being watched while that is missing.
    public static func waitUntilExists(_ path: String) throws(SystemError) {
        while access(path, F_OK) != 0 {
            let watch = try PathWatch(near: path)
            // Checked again after the watch exists: a path created in between is not missed.
            if access(path, F_OK) == 0 { return }
            watch.waitForChange()
        }
    }
}
