// A descriptor one thread signals and another polls alongside others: eventfd(2).
#if canImport(Glibc)
import Glibc
#endif
import CQuiesceShims

/// An eventfd a thread can `poll` together with a socket, so it sleeps until either the socket
/// or another thread (`signal()`) has something for it, with no timer. Signals before the wait
/// are not lost: the descriptor stays readable until `clear()`.
public final class Wakeup: Sendable {
    /// The descriptor to poll for `.readable`.
    public let fd: Int32

    /// Throws `SystemError` ("eventfd", EMFILE/ENFILE/ENOMEM) when no descriptor can be made.
    public init() throws(SystemError) {
        let fd = qs_eventfd()
        guard fd >= 0 else { throw SystemError("eventfd", "wakeup", Errno.current) }
        self.fd = fd
    }

    deinit { FD.close(fd) }

    /// Makes `fd` readable. Never blocks (the counter cannot overflow in practice).
    public func signal() {
        var one: UInt64 = 1
        _ = withUnsafeBytes(of: &one) { Glibc.write(fd, $0.baseAddress, 8) }
    }

    /// Consumes the signals so far; `fd` is not readable until the next `signal()`.
    public func clear() {
        var count: UInt64 = 0
        _ = withUnsafeMutableBytes(of: &count) { Glibc.read(fd, $0.baseAddress, 8) }
    }
}
