// Splits a byte stream into frames (newline-delimited lines, or back-to-back JSON values for
// qemu-ga's dialect) without ever holding more than one frame's bytes.

/// What the decoder found in the stream.
public enum FrameEvent: Sendable, Equatable {
    /// A complete line, without its terminating "\n" (and without a trailing "\r").
    case frame([UInt8])
    /// A frame exceeded `maxFrameBytes`. Its bytes up to the next newline (with `.jsonValues`:
    /// up to the end of that JSON value) are discarded, then decoding resumes; a stream
    /// transport usually answers `frame-too-large` and closes.
    case tooLarge(discardedAtLeast: Int)
    /// A 0xFF byte: the peer asked to reset the parser (qemu-ga convention, useful on
    /// virtio-serial where stale partial lines can sit in the pipe). Partial input was dropped.
    case reset(droppedBytes: Int)
}

/// How a byte stream is cut into frames.
public enum Framing: Sendable, Equatable {
    /// One frame per line (our protocol; section 2 of PROTOCOL.md).
    case lines
    /// One frame per top-level JSON value, with or without whitespace or newlines between them:
    /// how qemu-ga reads its channel (older Proxmox releases and hand-written scripts send
    /// objects back to back). Braces and brackets inside strings, and escaped quotes, do not
    /// count. Anything else at the top level (a number, a stray `}`, bytes that are no JSON)
    /// runs to the end of its line or to the next `{` or `[`, and is a frame of its own that
    /// then fails to decode as a command: one error per such run, as with line framing.
    case jsonValues

    /// The largest frame a peer may send with this framing: `ProtocolLimits.maxFrameBytes` for
    /// our lines, `ProtocolLimits.maxQGAFrameBytes` for qemu-ga's dialect.
    public var maxFrameBytes: Int {
        switch self {
        case .lines: ProtocolLimits.maxFrameBytes
        case .jsonValues: ProtocolLimits.maxQGAFrameBytes
        }
    }
}

/// A streaming, bounded frame splitter. Feed it bytes in any chunking; take events out.
///
/// Memory is bounded by `maxFrameBytes` plus the events of the current `feed` call: an oversized
/// frame is reported once and then skipped byte by byte, never buffered.
public struct FrameDecoder: Sendable {
    public let maxFrameBytes: Int
    public let framing: Framing
    private var buffer: [UInt8] = []
    private var discarding = false
    private var discardedCount = 0
    private var pending: [FrameEvent] = []
    private var pendingIndex = 0
    // `.jsonValues` state: nesting depth, inside a string, after a backslash in a string, inside
    // a top-level scalar (number, literal, or bytes that are no JSON).
    private var depth = 0
    private var inString = false
    private var escaped = false
    private var inScalar = false

    /// `maxFrameBytes`: the largest frame taken; by default `framing.maxFrameBytes` (64 KiB for
    /// lines, 16 MiB for qemu-ga's JSON values).
    public init(maxFrameBytes: Int? = nil, framing: Framing = .lines) {
        let limit = maxFrameBytes ?? framing.maxFrameBytes
        precondition(limit > 0)
        self.maxFrameBytes = limit
        self.framing = framing
    }

    /// Bytes held for an unfinished line (never more than `maxFrameBytes`).
    public var bufferedByteCount: Int { buffer.count }

    /// Appends bytes from the stream. Events become available through `next()`.
    public mutating func feed(_ bytes: some Sequence<UInt8>) {
        if pendingIndex == pending.count {
            pending.removeAll(keepingCapacity: true)
            pendingIndex = 0
        }
        if framing == .jsonValues {
            for b in bytes { feedValueByte(b) }
            return
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
                resetOnMarker()
            default:
                append(b)
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
        resetValueState()
    }

    private mutating func resetValueState() {
        depth = 0
        inString = false
        escaped = false
        inScalar = false
    }

    /// One byte of a `.jsonValues` stream.
    private mutating func feedValueByte(_ b: UInt8) {
        if b == 0xFF {
            // Never valid in JSON text: qemu-ga's lexer resets on it, and so do we, anywhere.
            resetValueState()
            resetOnMarker()
            return
        }
        let isSpace = b == 0x20 || b == 0x09 || b == 0x0A || b == 0x0D
        var ends = false      // this byte completes a frame (kept in it)
        var endsBefore = false  // a top-level scalar ended just before this byte
        var keep = true       // the byte belongs to a frame
        if inString {
            if escaped { escaped = false }
            else if b == 0x5C { escaped = true }
            else if b == 0x22 { inString = false; ends = depth == 0 }
        } else if inScalar {
            switch b {
            case 0x7B, 0x5B:  // { [ start a value
                endsBefore = true
                depth = 1
            case 0x0A:
                endsBefore = true
                keep = false
            default: break
            }
        } else {
            switch b {
            case 0x22: inString = true
            case 0x7B, 0x5B: depth += 1
            case 0x7D where depth > 0, 0x5D where depth > 0:  // (a `where` binds only its own pattern)
                depth -= 1
                ends = depth == 0
            case _ where isSpace:
                keep = depth > 0
            default:
                if depth == 0 { inScalar = true }
            }
        }
        if endsBefore {
            inScalar = false
            finishValue()
        }
        guard keep else { return }
        append(b)
        if ends { finishValue() }
    }

    /// 0xFF: drop whatever was buffered or being skipped, and say how much.
    private mutating func resetOnMarker() {
        let dropped = buffer.count + discardedCount
        buffer.removeAll(keepingCapacity: true)
        discarding = false
        discardedCount = 0
        pending.append(.reset(droppedBytes: dropped))
    }

    /// One byte of the frame being read, or of an oversized one being skipped (reported once).
    private mutating func append(_ b: UInt8) {
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

    /// The value being read is complete: emit it, or end the skipping of an oversized one.
    private mutating func finishValue() {
        while let last = buffer.last, last == 0x20 || last == 0x09 || last == 0x0D { buffer.removeLast() }
        if discarding {
            discarding = false
            discardedCount = 0
        } else if !buffer.isEmpty {
            pending.append(.frame(buffer))
        }
        buffer.removeAll(keepingCapacity: true)
    }

    private func isBlank(_ line: [UInt8]) -> Bool {
        line.allSatisfy { $0 == 0x20 || $0 == 0x09 || $0 == 0x0D }
    }
}

/// Limits every implementation enforces. Documented in protocol/PROTOCOL.md.
public enum ProtocolLimits {
    /// The largest frame (one JSON line, without the newline) a peer may send.
    public static let maxFrameBytes = 65_536
    /// How long an `op_id` may be, in UTF-8 bytes (PROTOCOL.md section 6.5): never empty, which
    /// would hold a freeze under no name.
    public static let opIDBytes = 1...128
    /// The largest command a host may send in qemu-ga's dialect (`qga+` listeners), in bytes.
    /// qemu-ga's own parser takes a message of up to 64 MiB of tokens (`MAX_TOKEN_SIZE` in
    /// qemu's qobject/json-streamer.c), and hosts do send more than 64 KiB: a `guest-file-write`
    /// carries its data base64-encoded in the command (Proxmox's `qm guest file-write` takes up to
    /// 60 KiB, about 80 KiB of JSON). 16 MiB carries a 12 MiB write, while a connection holds at
    /// most one such frame being read and one queued (PROTOCOL.md section 12).
    public static let maxQGAFrameBytes = 16 << 20
    /// The deepest nesting of arrays and objects accepted in a frame.
    public static let maxDepth = 16
    /// How long a frame may take to arrive on a stream transport once its first byte has, in
    /// milliseconds (PROTOCOL.md section 8.2). A peer that starts frames and never finishes
    /// them would otherwise hold a connection slot (and, for qemu-ga's dialect, up to 16 MiB)
    /// for ever; an idle connection between frames is not limited.
    public static let frameCompletionMs: Int64 = 30_000
}
