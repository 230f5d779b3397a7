// The two protocols a listener may speak: ours and qemu-ga's.
import QuiesceProtocol

/// The protocol a listener speaks: our own, or qemu-ga's (for hosts that drive qemu-ga).
public enum Dialect: Sendable {
    case quiesce
    case qga

    /// How requests are cut from the stream: lines for ours; for qemu-ga's, JSON values with no
    /// newline needed between them, as qemu-ga itself parses.
    var framing: Framing {
        switch self {
        case .quiesce: .lines
        case .qga: .jsonValues
        }
    }

    /// An error that is nobody's reply (framing, limits, refusals), in this dialect.
    func errorFrame(_ error: ProtocolError, id: JSON?) -> [UInt8] {
        switch self {
        case .quiesce: Reply(id: id, error: error).frame
        case .qga: QGA.errorFrame(QGA.Failure(error), id: id)
        }
    }
}
