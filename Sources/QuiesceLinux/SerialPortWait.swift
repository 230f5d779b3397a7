// Waiting for a host on a virtio-serial port without a timer: SIGIO from the port and from an
// inotify watch on its directory, taken with sigtimedwait on the waiting thread.
#if canImport(Glibc)
import Glibc
#endif
import CQuiesceShims

/// Lets the thread that serves a virtio-serial port sleep until the host connects, bytes come,
/// or the port is unplugged or replaced, costing no wakeup while the port is idle.
///
/// The kernel sends SIGIO when the host connects to the chardev (qemu-ga waits the same way);
/// the port's fd and an inotify watch on its directory are set (F_SETOWN_EX, O_ASYNC) to signal
/// the thread that creates this value, so it must be created and used on one thread, with SIGIO
/// blocked in every thread (`Signals.block([Signals.io])` at start). Without signal-driven I/O
/// (fcntl refused) it falls back to sleeps that back off from 20 ms to 250 ms.
public final class SerialPortWait {
    public let fd: Int32
    public let path: String
    private let asyncIO: Bool
    private let watch: PathWatch?
    private let watched: Bool
    private var backoffUs: UInt32 = 20_000

    /// Wires SIGIO for `fd` (the open port at `path`) and for a watch on its directory to the
    /// calling thread.
    public init(fd: Int32, path: String) {
        self.fd = fd
        self.path = path
        asyncIO = qs_async_to_this_thread(fd) == 0
        watch = try? PathWatch(near: path)
        watched = watch.map { qs_async_to_this_thread($0.fd) == 0 } ?? false
    }

    /// Sleeps until SIGIO (the host connected or sent bytes, or the port's directory changed), or
    /// for at most 100 ms while `holdingBytes` (the caller must drop stale bytes on time), or 1 s
    /// when no directory watch could be set up. Returns false when the path no longer names the
    /// open device (unplugged, replaced): the caller reopens it.
    public func waitForHost(holdingBytes: Bool) -> Bool {
        if asyncIO {
            var sigio = Signals.set([SIGIO])
            let signalled: Int32
            if !holdingBytes && watched {
                signalled = sigtimedwait(&sigio, nil, nil)
            } else {
                var timeout = holdingBytes ? timespec(tv_sec: 0, tv_nsec: 100_000_000) : timespec(tv_sec: 1, tv_nsec: 0)
                signalled = sigtimedwait(&sigio, nil, &timeout)
            }
            let timedOut = signalled < 0 && errno == EAGAIN
            if timedOut && !SerialPortWait.isSameDevice(fd: fd, path: path) { return false }
            if watch?.drain() == true && !SerialPortWait.isSameDevice(fd: fd, path: path) { return false }
        } else {
            usleep(backoffUs)
            backoffUs = min(backoffUs * 2, 250_000)
            if backoffUs == 250_000 && !SerialPortWait.isSameDevice(fd: fd, path: path) { return false }
        }
        return true
    }

    /// Whether `path` still names the device open on `fd` (same st_dev, inode and st_rdev).
    public static func isSameDevice(fd: Int32, path: String) -> Bool {
        guard let open = try? Stat.of(fd: fd), let named = try? Stat.of(path: path) else { return false }
        return open.isSameFile(as: named)
    }
}
