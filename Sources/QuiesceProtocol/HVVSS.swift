// Hyper-V's VSS channel as the Linux hv_utils driver presents it on /dev/vmbus/hv_vss.
//
// Facts from the kernel tree (read, not copied): include/uapi/linux/hyperv.h (struct hv_vss_msg,
// the operation numbers, HV_S_OK / HV_E_FAIL), drivers/hv/hv_snapshot.c (what the driver sends
// and how long it waits) and tools/hv/hv_vss_daemon.c (the stock daemon).
//
//   daemon → driver   12 bytes: operation 129 (VSS_OP_REGISTER1), the rest zero
//   driver → daemon    4 bytes: the driver's answer to REGISTER1 (a u32, 129 today)
//   driver → daemon   12 bytes per request: byte 0 the operation, bytes 1-7 reserved,
//                     bytes 8-11 a u32 of flags
//   daemon → driver   the same 12 bytes, with bytes 0-3 replaced by an int error (HV_S_OK or
//                     HV_E_FAIL), in the guest's byte order
//
// `struct hv_vss_msg` is packed: a union of the 8-byte header `{u8 operation; u8 reserved[7]}`
// with `int error` (so the error overlays the operation and three reserved bytes), then a union
// of two `{u32 flags}`: 12 bytes in all. Each read of the device returns exactly one message;
// `HVVSS.Decoder` also copes with a byte stream (a pty standing in for the driver in tests).

public enum HVVSS {
    /// `sizeof(struct hv_vss_msg)`.
    public static let messageSize = 12
    /// The size of the driver's answer to `VSS_OP_REGISTER1`.
    public static let versionSize = 4
    /// `VSS_OP_REGISTER1`: "daemon code with full handshake support" (the driver answers with a version).
    public static let register1: UInt8 = 129
    /// `HV_S_OK`.
    public static let ok: Int32 = 0
    /// `HV_E_FAIL` (0x80004005), as the `int error` field holds it.
    public static let fail = Int32(bitPattern: 0x8000_4005)

    /// `enum hv_vss_op`. The driver hands the daemon only HOT_BACKUP, FREEZE and THAW; it
    /// answers the others itself.
    public enum Operation: UInt8, Sendable, CaseIterable {
        case create = 0, delete, hotBackup, getDMInfo, buComplete, freeze, thaw, autoRecover

        public var name: String {
            switch self {
            case .create: "CREATE"
            case .delete: "DELETE"
            case .hotBackup: "HOT_BACKUP"
            case .getDMInfo: "GET_DM_INFO"
            case .buComplete: "BU_COMPLETE"
            case .freeze: "FREEZE"
            case .thaw: "THAW"
            case .autoRecover: "AUTO_RECOVER"
            }
        }
    }

    /// One 12-byte message as read from the driver.
    public struct Message: Sendable, Equatable {
        /// The 12 bytes as read.
        public var bytes: [UInt8]

        public init?(_ bytes: some Collection<UInt8>) {
            guard bytes.count == HVVSS.messageSize else { return nil }
            self.bytes = Array(bytes)
        }

        /// A message as the driver builds it: the operation, everything else zero.
        public init(operation: UInt8, flags: UInt32 = 0) {
            bytes = [UInt8](repeating: 0, count: HVVSS.messageSize)
            bytes[0] = operation
            withUnsafeBytes(of: flags) { for i in 0..<4 { bytes[8 + i] = $0[i] } }
        }

        /// Byte 0, `vss_hdr.operation`.
        public var operationCode: UInt8 { bytes[0] }
        /// The operation, nil when this agent does not know the number.
        public var operation: Operation? { Operation(rawValue: operationCode) }
        /// Bytes 8-11, `vss_cf.flags` / `dm_info.flags`, in the guest's byte order.
        public var flags: UInt32 { bytes[8..<12].withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) } }
        /// Bytes 0-3 read as the `int error` of the union (what an answer carries).
        public var error: Int32 { bytes[0..<4].withUnsafeBytes { $0.loadUnaligned(as: Int32.self) } }

        /// The answer: the same 12 bytes with the `error` union member set (the way the stock
        /// daemon answers: it writes the error into the message it read and sends it back).
        public func answer(_ error: Int32) -> [UInt8] {
            var out = bytes
            withUnsafeBytes(of: error) { for i in 0..<4 { out[i] = $0[i] } }
            return out
        }
    }

    /// The registration the daemon writes first.
    public static var registerMessage: [UInt8] { Message(operation: register1).bytes }

    /// What the driver sent, in order.
    public enum Input: Sendable, Equatable {
        /// The 4-byte answer to REGISTER1 (a u32 in the guest's byte order).
        case version(UInt32)
        case message(Message)
    }

    /// Splits what the device returns into the version answer and then 12-byte messages. The
    /// real device returns one whole message per read; a stream (pty) may split or join them.
    /// Holds at most one message's bytes.
    public struct Decoder: Sendable {
        private var buffer: [UInt8] = []
        private var registered = false

        public init() {}

        /// Bytes held for an unfinished message.
        public var bufferedByteCount: Int { buffer.count }

        public mutating func feed(_ bytes: some Sequence<UInt8>) { buffer.append(contentsOf: bytes) }

        /// The next complete input, or nil when more bytes are needed.
        public mutating func next() -> Input? {
            if !registered {
                guard buffer.count >= HVVSS.versionSize else { return nil }
                let v = buffer[0..<4].withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) }
                buffer.removeFirst(4)
                registered = true
                return .version(v)
            }
            guard buffer.count >= HVVSS.messageSize, let m = Message(buffer[0..<HVVSS.messageSize]) else { return nil }
            buffer.removeFirst(HVVSS.messageSize)
            return .message(m)
        }
    }
}
