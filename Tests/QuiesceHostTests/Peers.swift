// In-test peers on real Unix sockets: scripted byte-level peers and a small fake agent.
import Foundation
import QuiesceHost
import QuiesceLinux
import QuiesceProtocol
import QuiesceTestSupport
import Synchronization

/// A private temporary directory, removed when the value goes away.
final class TempDir: @unchecked Sendable {
    let path: String

    init() {
        var template = Array("/tmp/qh-XXXXXX".utf8CString)
        path = String(cString: mkdtemp(&template)!)
    }

    deinit { _ = try? sh("rm -rf '\(path)'", allowFailure: true) }

    func file(_ name: String) -> String { "\(path)/\(name)" }
}

/// One accepted connection, seen from the peer's side.
final class PeerConnection: @unchecked Sendable {
    let fd: Int32
    private var pending: [UInt8] = []
    private var decoder = FrameDecoder()
    /// 0xFF bytes received (serial resync requests).
    private(set) var resets = 0

    init(fd: Int32) { self.fd = fd }

    private func fill(timeoutMs: Int32) -> Bool {
        guard let ready = try? FD.poll(fd, for: .readable, timeoutMs: timeoutMs), !ready.isEmpty else { return false }
        var buf = [UInt8](repeating: 0, count: 65536)
        guard let n = try? buf.withUnsafeMutableBytes({ try FD.read(fd, into: $0) }), n > 0 else { return false }
        pending += buf[0..<n]
        return true
    }

    /// A raw line (without "\n"), e.g. the hybrid vsock CONNECT; nil on EOF or timeout.
    func readLine(timeoutMs: Int32 = 5000) -> String? {
        while true {
            if let nl = pending.firstIndex(of: 0x0A) {
                let line = String(decoding: pending[..<nl], as: UTF8.self)
                pending.removeFirst(nl + 1)
                return line
            }
            if !fill(timeoutMs: timeoutMs) { return nil }
        }
    }

    /// The next request frame; nil on EOF or timeout. Counts 0xFF resets on the way.
    func readRequest(timeoutMs: Int32 = 5000) -> Request? {
        while true {
            if !pending.isEmpty {
                decoder.feed(pending)
                pending.removeAll()
            }
            while let e = decoder.next() {
                switch e {
                case .reset: resets += 1
                case .tooLarge: continue
                case .frame(let bytes):
                    if case .success(let r) = Request.decode(frame: bytes) { return r }
                }
            }
            if !fill(timeoutMs: timeoutMs) { return nil }
        }
    }

    func send(_ bytes: [UInt8]) { try? FD.writeAll(fd, bytes, timeoutMs: 2000) }
    func send(_ text: String) { send(Array(text.utf8)) }
    func send(_ reply: Reply) { send(reply.frame) }
    func send(_ event: Event) { send(event.frame) }
}

/// A Unix-socket listener that runs `script` for each connection on a thread of its own.
final class ScriptedPeer: @unchecked Sendable {
    let path: String
    private let listener: Int32

    /// `serial`: one client at a time, as qemu-ga serves them (qga/main.c): the next connection
    /// is accepted only when the script is done with the last one. `backlog`: listen(2)'s; a
    /// Unix listener holds one connection more than it before connect(2) fails with EAGAIN.
    init(path: String, serial: Bool = false, backlog: Int32 = 64, _ script: @escaping @Sendable (PeerConnection) -> Void) throws {
        _ = ignoreSIGPIPE  // a script may write on after the client under test has hung up
        self.path = path
        listener = try Socket.listenUnix(path: path, mode: 0o600, backlog: backlog)
        let fd = listener
        Threads.detach {
            while let (conn, _) = try? Socket.accept(fd) {
                let serve: @Sendable () -> Void = {
                    script(PeerConnection(fd: conn))
                    FD.close(conn)
                }
                if serial { serve() } else { Threads.detach(serve) }
            }
        }
    }

    /// Stops accepting (the socket file stays until the temp dir goes).
    func stop() { Socket.shutdown(listener) }

    deinit { stop() }
}

/// A fake quiesced speaking protocol version 1 with canned results, recording what it was asked.
/// It mirrors the real agent's rule that a bound freeze thaws when its connection closes.
final class FakeAgent: @unchecked Sendable {
    struct Behavior: Sendable {
        var freezeDelayMs: Int = 0
        var freezeError: ProtocolError? = nil
        var thawError: ProtocolError? = nil
        var hooks: [HookReport] = []
        var mounts = ["/fake/data", "/fake/var"]
        /// Do not answer this operation at all.
        var silentOn: OperationName? = nil
        var version: Int64 = 1
        /// Close the connection this long after answering a freeze (a crashed agent or a lost link).
        var dropAfterFreezeMs: Int? = nil
        /// Answer a freeze only once every agent sharing this barrier has received its own.
        var freezeBarrier: Barrier? = nil
        /// Push this many (meaningless) events right after answering a freeze: a flooding agent.
        var eventsAfterFreeze = 0
        /// Take the freeze (or the thaw) but answer with this instead of a valid reply: a broken
        /// or hostile agent.
        var freezeAbuse: Abuse? = nil
        var thawAbuse: Abuse? = nil
        /// Every duration and total in the freeze and thaw replies (keys ending in _us or
        /// _total), and every time in status replies (_ms), is sent as Int64.max - 7, which the
        /// wire allows: a hostile agent.
        var extremeNumbers = false
    }

    /// `frame` with the numbers `extremeNumbers` names replaced: durations (`_us`) and totals
    /// in freeze and thaw replies (their timeout and deadline are checked against the request
    /// and refused), times (`_ms`) in status replies.
    static func extreme(_ frame: [UInt8], keys: String = "_us|_total") -> [UInt8] {
        let text = String(decoding: frame, as: UTF8.self)
        let pattern = try! NSRegularExpression(pattern: #"("[a-z_]+("# + keys + #")":)-?[0-9]+"#)
        let out = pattern.stringByReplacingMatches(in: text, range: NSRange(text.startIndex..., in: text), withTemplate: "$1\(Int64.max - 7)")
        return Array(out.utf8)
    }

    enum Abuse: Sendable {
        /// A success reply line of this many bytes (past the client's 1 MiB frame limit when large).
        case oversized(Int)
        /// A 1 MiB reply written one byte every `intervalMs`, until the client hangs up.
        case trickle(intervalMs: Int)
        /// A frame that is not valid JSON (a duplicate key).
        case malformed

        func send(on c: PeerConnection, id: JSON?) {
            let head = Array(#"{"id":\#((id ?? .null).text),"ok":true,"result":{"op_id":"x","pad":""#.utf8)
            switch self {
            case .oversized(let n):
                c.send(head + [UInt8](repeating: UInt8(ascii: "a"), count: max(0, n - head.count - 4)) + Array("\"}}\n".utf8))
            case .trickle(let ms):
                for b in head + [UInt8](repeating: UInt8(ascii: "a"), count: 1 << 20) {
                    guard (try? FD.writeAll(c.fd, [b], timeoutMs: 1000)) != nil else { return }
                    usleep(UInt32(ms) * 1000)
                }
            case .malformed:
                c.send(#"{"id":\#((id ?? .null).text),"ok":true,"ok":true,"result":{}}"# + "\n")
            }
        }
    }

    private struct State {
        var log: [String] = []
        var keepalives: [Int64?] = []
        var frozenBy: String? = nil
        var thawReasons: [String] = []
        var keepaliveTimes: [UInt64] = []
        var thawOps: [String?] = []
    }

    private final class Shared: Sendable {
        let state = Mutex(State())
    }

    let peer: ScriptedPeer
    var address: AgentAddress { .unix(path: peer.path) }
    private let shared = Shared()

    init(path: String, _ behavior: Behavior = Behavior()) throws {
        let shared = self.shared
        peer = try ScriptedPeer(path: path) { c in FakeAgent.serve(c, behavior, shared) }
    }

    var log: [String] { shared.state.withLock { $0.log } }
    var frozen: Bool { shared.state.withLock { $0.frozenBy != nil } }
    var thawReasons: [String] { shared.state.withLock { $0.thawReasons } }
    var keepaliveTimeouts: [Int64?] { shared.state.withLock { $0.keepalives } }
    var keepaliveTimes: [UInt64] { shared.state.withLock { $0.keepaliveTimes } }
    /// The op_id of each thaw request, in order (nil: a thaw of anything).
    var thawOps: [String?] { shared.state.withLock { $0.thawOps } }

    private static func serve(_ c: PeerConnection, _ b: Behavior, _ shared: Shared) {
        var boundOp: String?
        defer {
            if let op = boundOp {
                shared.state.withLock { s in
                    if s.frozenBy == op { s.frozenBy = nil; s.thawReasons.append("disconnect") }
                }
            }
        }
        while let r = c.readRequest(timeoutMs: 60_000) {
            shared.state.withLock { $0.log.append(r.operation.name.rawValue) }
            if r.operation.name == b.silentOn { continue }
            switch r.operation {
            case .hello:
                c.send(Reply(id: r.id, result: HelloResult(version: b.version, agent: "fake-agent", agentVersion: "9.9",
                                                           capabilities: ["keepalive"], maxFrame: 65536,
                                                           maxFreezeMs: b.extremeNumbers ? Int64.max - 7 : 600_000).json))
            case .ping:
                c.send(Reply(id: r.id, result: [:]))
            case .status:
                let s = shared.state.withLock { $0.frozenBy }
                let status = Reply(id: r.id, result: StatusResult(state: s == nil ? .thawed : .frozen, opID: s, sinceMs: wallClockMillis(),
                                                                  remainingMs: s == nil ? nil : 1000).json).frame
                c.send(b.extremeNumbers ? extreme(status, keys: "_ms") : status)
            case .filesystems:
                c.send(Reply(id: r.id, result: FilesystemsResult(filesystems: b.mounts.enumerated().map {
                    FilesystemReport(mountPoint: $0.element, type: "ext4", device: "7:\($0.offset)", source: "/dev/loop\($0.offset)", wave: Int64($0.offset))
                }, skipped: [SkippedReport(mountPoint: "/proc", type: "proc", reason: .pseudo)]).json))
            case .freeze(let f):
                if b.freezeDelayMs > 0 { usleep(UInt32(b.freezeDelayMs) * 1000) }
                if let barrier = b.freezeBarrier, !barrier.arriveAndWait(timeoutMs: 10_000) {
                    return  // the coordinator did not ask everyone at once: never answer
                }
                if let e = b.freezeError { c.send(Reply(id: r.id, error: e)); continue }
                let op = f.opID ?? "fake-op"
                shared.state.withLock { $0.frozenBy = op }
                if f.mode == .bound { boundOp = op }
                if let abuse = b.freezeAbuse { abuse.send(on: c, id: r.id); continue }
                let result = FreezeResult(
                    opID: op, mode: f.mode,
                    filesystems: b.mounts.map { FilesystemReport(mountPoint: $0, type: "ext4", device: "7:0", source: "/dev/loop0") },
                    skipped: [], hooks: b.hooks, presyncUs: 1000, freezeUs: 2000, stallUs: 1500, totalUs: 3000,
                    timeoutMs: f.timeoutMs ?? 600_000, deadlineMs: wallClockMillis() + (f.timeoutMs ?? 600_000))
                c.send(b.extremeNumbers ? extreme(Reply(id: r.id, result: result.json).frame) : Reply(id: r.id, result: result.json).frame)
                if b.eventsAfterFreeze > 0 {
                    let noise = Event(name: "noise", fields: ["n": .int(1)]).frame
                    c.send(Array([[UInt8]](repeating: noise, count: b.eventsAfterFreeze).joined()))
                }
                if let ms = b.dropAfterFreezeMs {
                    usleep(UInt32(ms) * 1000)
                    return
                }
            case .keepalive(let op, let t):
                let frozenBy = shared.state.withLock { s in
                    s.keepalives.append(t)
                    s.keepaliveTimes.append(monotonicNanos())
                    return s.frozenBy
                }
                if frozenBy == nil || (op != nil && op != frozenBy) {
                    c.send(Reply(id: r.id, error: ProtocolError(.notFrozen, "nothing is frozen")))
                } else {
                    c.send(Reply(id: r.id, result: ["op_id": .string(frozenBy!), "remaining_ms": .int(t ?? 0)]))
                }
            case .thaw(let op):
                if let e = b.thawError { c.send(Reply(id: r.id, error: e)); continue }
                shared.state.withLock { $0.thawOps.append(op) }
                let was = shared.state.withLock { s -> Bool in
                    guard let by = s.frozenBy, op == nil || op == by else { return false }
                    s.frozenBy = nil
                    s.thawReasons.append("request")
                    return true
                }
                if was { boundOp = nil }
                if let abuse = b.thawAbuse { abuse.send(on: c, id: r.id); continue }
                let thawed = Reply(id: r.id, result: ThawResult(opID: op, wasFrozen: was, filesystems: [], totalUs: 500, frozenUs: was ? 10_000 : nil).json).frame
                c.send(b.extremeNumbers ? extreme(thawed) : thawed)
            case .sync:
                c.send(Reply(id: r.id, result: SyncResult(filesystems: [], totalUs: 100).json))
            }
        }
    }
}

extension FakeAgent {
    convenience init(in dir: TempDir, name: String = "fake", _ behavior: Behavior = Behavior()) throws {
        try self.init(path: dir.file("\(name).sock"), behavior)
    }
}

/// Lets N parties wait until all have arrived (or a timeout passes).
final class Barrier: @unchecked Sendable {
    private let condition = NSCondition()
    private let parties: Int
    private var arrived = 0

    init(parties: Int) { self.parties = parties }

    /// True when all parties arrived within the timeout.
    func arriveAndWait(timeoutMs: Int) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        arrived += 1
        if arrived >= parties { condition.broadcast(); return true }
        let deadline = Date().addingTimeInterval(Double(timeoutMs) / 1000)
        while arrived < parties {
            if !condition.wait(until: deadline) { return arrived >= parties }
        }
        return true
    }
}
