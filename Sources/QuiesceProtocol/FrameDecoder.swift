// Splits a byte stream into newline-delimited frames without ever holding more than one frame's bytes.

/// What the decoder found in the stream.
public enum FrameEvent: Sendable, Equatable {
    /// A complete line, without its terminating "\n" (and without a trailing "\r").
    case frame([UInt8])
    /// A line exceeded `maxFrameBytes`. Its bytes up to the next newline are discarded, then
    /// decoding resumes; a stream transport usually answers `frame-too-large` and closes.
    case tooLarge(discardedAtLeast: Int)
    /// A 0xFF byte: the peer asked to reset the parser (qemu-ga convention, useful on
    /// virtio-serial where stale partial lines can sit in the pipe). Partial input was dropped.
    case reset(droppedBytes: Int)
}

/// A streaming, bounded line splitter. Feed it bytes in any chunking; take events out.
///
/// Memory is bounded by `maxFrameBytes` plus the events of the current `feed` call: an oversized
/// line is reported once and then skipped byte by byte, never buffered.
public struct FrameDecoder: Sendable {
    public let maxFrameBytes: Int
    private var buffer: [UInt8] = []
    private var discarding = false
    private var discardedCount = 0
    private var pending: [FrameEvent] = []
    private var pendingIndex = 0

    public init(maxFrameBytes: Int = ProtocolLimits.maxFrameBytes) {
        precondition(maxFrameBytes > 0)
        self.maxFrameBytes = maxFrameBytes
    }

    /// Bytes held for an unfinished line (never more than `maxFrameBytes`).
    public var bufferedByteCount: Int { buffer.count }

    /// Appends bytes from the stream. Events become available through `next()`.
    public mutating func feed(_ bytes: some Sequence<UInt8>) {
        if pendingIndex == pending.count {
            pending.removeAll(keepingCapacity: true)
            pendingIndex = 0
        }
        for b in bytes {
            switch b {
            case 0x0A:
                if discarding {
                    discarding = false
                    discardedCount = 0
                } else {
                    if buffer.last == 0x0D { buffer.removeLast() }
                    if !buffer.isEmpty && !isBlank(buffer) { pending.append(.frame(buffer)) }
                    buffer.removeAll(keepingCapacity: true)
                }
            case 0xFF:
                let dropped = buffer.count + discardedCount
                buffer.removeAll(keepingCapacity: true)
                discarding = false
                discardedCount = 0
                pending.append(.reset(droppedBytes: dropped))
            default:
                if discarding {
                    discardedCount += 1
                } else if buffer.count == maxFrameBytes {
                    discarding = true
                    discardedCount = buffer.count + 1
                    buffer.removeAll(keepingCapacity: false)
                    pending.append(.tooLarge(discardedAtLeast: discardedCount))
                } else {
                    buffer.append(b)
                }
            }
        }
    }

    /// The next event, or nil when more bytes are needed.
    public mutating func next() -> FrameEvent? {
        guard pendingIndex < pending.count else { return nil }
        defer { pendingIndex += 1 }
        return pending[pendingIndex]
    }

    /// Drops any partial line (used when a stream transport reconnects).
    public mutating func reset() {
        buffer.removeAll(keepingCapacity: true)
        discarding = false
        discardedCount = 0
        pending.removeAll()
        pendingIndex = 0
    }

    private func isBlank(_ line: [UInt8]) -> Bool {
        line.allSatisfy { $0 == 0x20 || $0 == 0x09 || $0 == 0x0D }
    }
}

/// Limits every implementation enforces. Documented in protocol/PROTOCOL.md.
public enum ProtocolLimits {
    /// The largest frame (one JSON line, without the newline) a peer may send.
    public static let maxFrameBytes = 65_536
    /// The deepest nesting of arrays and objects accepted in a frame.
    public static let maxDepth = 16
}
