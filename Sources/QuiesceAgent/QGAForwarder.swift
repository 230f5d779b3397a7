// Passes the qemu-ga commands quiesced does not answer itself to a real qemu-ga on a private Unix socket.
import QuiesceLinux
import QuiesceProtocol

/// A qemu-ga listening on a private Unix socket (`qemu-ga -m unix-listen -p PATH -b
/// guest-fsfreeze-freeze,guest-fsfreeze-freeze-list,guest-fsfreeze-thaw,guest-fsfreeze-status`),
/// to which the qga listeners pass every command they do not implement (`qga-forward`), relaying
/// its reply bytes unchanged. The host's own `guest-sync`, `guest-sync-delimited` and 0xFF are
/// handled at our end; the freeze commands never reach it.
///
/// Each command gets a connection of its own, on a thread of its own, bounded by a deadline:
/// `guest-sync` with a tagged id, the command, and a second tagged `guest-sync`. Lines before the
/// first sync's reply are skipped (the private connection's own resync); the line after it is
/// the command's reply, unless it is the second sync's reply: the command answered nothing
/// (`guest-shutdown` and the suspends answer only when they fail). qemu-ga serves one client at
/// a time, so concurrent commands queue in its listen backlog, each within its own deadline. A
/// command stuck in qemu-ga (a write to a frozen filesystem) costs its caller the timeout and
/// nothing else: freeze, thaw, ping and status never go through here.
public struct QGAForwarder: Sendable {
    /// The private qemu-ga's socket.
    public let path: String
    /// How long one forwarded command may take, connect to reply, in milliseconds.
    public let timeoutMs: Int64

    /// The largest reply relayed, in bytes: qemu-ga returns up to 16 MiB of a command's output
    /// base64-encoded in `guest-exec-status` (about 21.4 MiB); anything larger fails the command.
    public static let maxReplyBytes = 24 << 20
    /// While the guest is frozen a forwarded (read-only) command gets at most this long, in
    /// milliseconds, so that a qemu-ga stuck behind the freeze delays the host's thaw on the same
    /// connection by no more than that.
    public static let frozenTimeoutMs: Int64 = 5000
    /// How long `guest-info` waits for the private qemu-ga's command list, in milliseconds.
    public static let infoTimeoutMs: Int64 = 3000

    public init(path: String, timeoutMs: Int64) {
        self.path = path
        self.timeoutMs = timeoutMs
    }

    /// What came back for one forwarded command.
    public enum Outcome: Sendable, Equatable {
        /// qemu-ga's reply line, newline included, to relay as it is.
        case reply([UInt8])
        /// The command answered nothing, as a `success-response: false` command does when it succeeds.
        case noReply
        /// Nothing usable came back; the reason, for the host and the log.
        case failed(String)
    }

    /// Forwards one command frame (a single JSON object, as the host sent it). Blocks for at
    /// most `timeoutMs`: call it on a thread of its own.
    public func call(frame: [UInt8], name: String, timeoutMs: Int64) -> Outcome {
        let deadline = monotonicNanos() + UInt64(max(timeoutMs, 1)) * 1_000_000
        let fd: Int32
        do {
            fd = try Socket.connectUnix(path: path, timeoutMs: QGAForwarder.remainingMs(deadline))
        } catch {
            return .failed("not reachable (\(error))")
        }
        defer { FD.close(fd) }
        // /run/quiesce is root's; a socket there served by anyone else is not our qemu-ga.
        if case .unix(_, let uid, _) = Socket.peer(of: fd), uid != 0, uid != CurrentProcess.effectiveUID {
            return .failed("the socket is served by uid \(uid), not root")
        }
        FD.setNonBlocking(fd, true)
        let first = QGA.privateSync(Int64.random(in: 1...(Int64.max >> 1)))
        let last = QGA.privateSync(Int64.random(in: 1...(Int64.max >> 1)))
        var out = first.frame + frame
        out.append(0x0A)
        out += last.frame
        do {
            try FD.writeAll(fd, out, timeoutMs: QGAForwarder.remainingMs(deadline))
        } catch {
            return .failed("sending \(name) failed (\(error))")
        }
        var reader = LineReader(fd: fd, limit: QGAForwarder.maxReplyBytes, deadline: deadline)
        resync: while true {
            switch reader.next() {
            case .line(let line):
                if QGA.isSyncReply(line, tag: first.tag) { break resync }
                // Not ours (left by an earlier client): skipped, as a resync does.
            case .end: return .failed("it closed the connection before answering guest-sync")
            case .timeout: return .failed("\(name) did not answer within \(timeoutMs) ms (qemu-ga is busy or stuck)")
            case .tooLong: return .failed("it sent a line longer than \(QGAForwarder.maxReplyBytes) bytes")
            case .error(let e): return .failed("reading failed (\(e))")
            }
        }
        switch reader.next() {
        case .line(let line):
            if QGA.isSyncReply(line, tag: last.tag) { return .noReply }
            guard !line.contains(0xFF) else { return .failed("its reply to \(name) is not JSON text (byte 0xFF)") }
            // Read the second sync's answer too (it follows at once), so that qemu-ga never
            // writes to a socket we closed; its absence changes nothing.
            var tail = LineReader(fd: fd, limit: 256, deadline: min(deadline, monotonicNanos() + 500_000_000), buffered: reader.rest)
            _ = tail.next()
            return .reply(line + [0x0A])
        case .end:
            return QGA.noResponseCommands.contains(name) ? .noReply : .failed("it closed the connection without answering \(name)")
        case .timeout:
            return .failed("\(name) did not answer within \(timeoutMs) ms (qemu-ga is busy or stuck)")
        case .tooLong:
            return .failed("its reply to \(name) exceeds \(QGAForwarder.maxReplyBytes) bytes")
        case .error(let e):
            return .failed("reading the reply to \(name) failed (\(e))")
        }
    }

    /// The private qemu-ga's command list (its `guest-info`), or nil when it does not answer
    /// within `infoTimeoutMs`.
    public func commands() -> [QGA.ForwardedCommand]? {
        guard case .reply(let line) = call(frame: Array(#"{"execute":"guest-info"}"#.utf8), name: "guest-info",
                                           timeoutMs: QGAForwarder.infoTimeoutMs),
              let reply = try? JSON.parse(line.dropLast(), maxDepth: 8) else { return nil }
        return QGA.forwardedCommands(fromInfoReply: reply)
    }

    static func remainingMs(_ deadline: UInt64) -> Int32 {
        let now = monotonicNanos()
        return now >= deadline ? 0 : Int32(min((deadline - now + 999_999) / 1_000_000, UInt64(Int32.max)))
    }
}

/// Newline-terminated lines from a non-blocking descriptor, within a deadline and a line limit.
private struct LineReader {
    enum Event {
        case line([UInt8])
        case end
        case timeout
        case tooLong
        case error(SystemError)
    }

    let fd: Int32
    let limit: Int
    let deadline: UInt64
    private var buffer: [UInt8]
    /// Bytes of `buffer` already searched for a newline.
    private var scanned = 0

    init(fd: Int32, limit: Int, deadline: UInt64, buffered: [UInt8] = []) {
        self.fd = fd
        self.limit = limit
        self.deadline = deadline
        buffer = buffered
    }

    /// What was read beyond the last line returned.
    var rest: [UInt8] { buffer }

    mutating func next() -> Event {
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            if let nl = buffer[scanned...].firstIndex(of: 0x0A) {
                let line = Array(buffer[..<nl])
                buffer.removeSubrange(...nl)
                scanned = 0
                return .line(line)
            }
            scanned = buffer.count
            if buffer.count > limit { return .tooLong }
            let wait = QGAForwarder.remainingMs(deadline)
            guard wait > 0 else { return .timeout }
            do {
                guard try !FD.poll(fd, for: .readable, timeoutMs: wait).isEmpty else { return .timeout }
            } catch {
                return .error(error)
            }
            switch FD.readSome(fd, into: &chunk) {
            case .success(0): return .end
            case .success(let n): buffer += chunk[..<n]
            case .failure(let e) where e == .EAGAIN || e == .EINTR: continue
            case .failure(let e): return .error(SystemError("read", "unix \(fd)", e))
            }
        }
    }
}
