// Listeners and connections: bytes in, frames through the decoder, requests to the state actor, replies out.
#if canImport(Glibc)
import Glibc
#endif
import CQuiesceShims
import QuiesceLinux
import QuiesceProtocol
import Logging
import Synchronization

/// The agent's version, reported by `hello`.
public let agentVersion = QuiesceRelease.version

/// Accepts connections on every listener, enforces limits and peer rules, and routes requests.
///
/// Each connection has a thread that reads and decodes; `hello`, `ping`, `status` and
/// `filesystems` are answered at once, while freeze, thaw, sync and keepalive run in order per
/// connection. Replies and events are queued to a per-connection writer thread (callers never
/// block), so a peer that stops reading cannot stall the agent; it is cut off at 1 MiB unread.
public final class Server: Sendable {
    let config: AgentConfig
    let logger: Logger
    private let connections = Mutex<[ConnectionID: Connection]>([:])
    let nextID = Atomic<UInt64>(1)
    private let stateBox = Mutex<AgentState?>(nil)
    /// The private qemu-ga that qga listeners pass unknown commands to (`qga-forward`).
    let qgaForwarder: QGAForwarder?

    public init(config: AgentConfig, logger: Logger) {
        self.config = config
        self.logger = logger
        qgaForwarder = config.qgaForward.map { QGAForwarder(path: $0, timeoutMs: config.qgaForwardTimeoutMs) }
    }

    /// The state actor; set once before listening.
    public var state: AgentState {
        get { stateBox.withLock { $0! } }
        set { stateBox.withLock { $0 = newValue } }
    }

    /// Sends an event to every connection that completed `hello`.
    public func broadcast(_ event: Event) {
        let targets = connections.withLock { Array($0.values) }
        for c in targets where c.helloDone { c.send(event.frame) }
    }

    /// Waits (up to `timeoutMs`) until every connection has written what is queued for it, so
    /// that the last replies and events (a `thawed` with reason `signal`) go out before exit.
    public func drainOutput(timeoutMs: Int64) {
        let deadline = monotonicNanos() + UInt64(timeoutMs) * 1_000_000
        while monotonicNanos() < deadline {
            let pending = connections.withLock { $0.values.contains { $0.hasQueuedOutput } }
            if !pending { return }
            usleep(2000)
        }
    }

    // MARK: - Listeners

    /// Serves a listening stream socket (Unix or vsock) on a thread of its own.
    public func serve(listener fd: Int32, name: String, dialect: Dialect = .quiesce) {
        Threads.detach { [self] in
            var failures = 0
            while true {
                let accepted: (fd: Int32, peer: Peer)
                do {
                    accepted = try Socket.accept(fd)
                    failures = 0
                } catch {
                    failures += 1
                    if failures == 1 || failures % 100 == 0 { logger.warning("accept on \(name): \(error)") }
                    usleep(50_000)  // EMFILE and friends: back off instead of spinning
                    continue
                }
                admit(fd: accepted.fd, peer: accepted.peer, listener: name, dialect: dialect)
            }
        }
    }

    private func admit(fd: Int32, peer: Peer, listener: String, dialect: Dialect) {
        Socket.setSendTimeout(fd, milliseconds: 5000)
        if let refusal = refusal(for: peer) {
            logger.warning("refused connection", metadata: ["peer": "\(peer)", "listener": "\(listener)", "reason": "\(refusal)"])
            Server.refuse(fd, dialect.errorFrame(ProtocolError(.permissionDenied, refusal), id: nil))
            return
        }
        let id = nextID.add(1, ordering: .relaxed).oldValue
        let conn = Connection(id: id, fd: fd, peer: peer, server: self, isStream: true, dialect: dialect)
        let admitted = connections.withLock { table -> Bool in
            guard table.count < config.maxConnections else { return false }
            table[id] = conn
            return true
        }
        guard admitted else {
            Server.refuse(fd, dialect.errorFrame(ProtocolError(.busy, "too many connections (\(config.maxConnections))"), id: nil))
            return
        }
        Threads.detach { conn.runStream() }
    }

    /// Tells a refused peer why, then closes so that it can still read the reason: our side is
    /// shut down first and what the peer sent is drained briefly (closing with unread input
    /// would reset the connection under it). Off the accept thread, bounded to 250 ms.
    static func refuse(_ fd: Int32, _ errorFrame: [UInt8]) {
        try? FD.writeAll(fd, errorFrame, timeoutMs: 1000)
        _ = Glibc.shutdown(fd, Int32(SHUT_WR))
        Threads.detach {
            let deadline = monotonicNanos() + 250_000_000
            var scratch = [UInt8](repeating: 0, count: 4096)
            while monotonicNanos() < deadline {
                guard let ev = try? FD.poll(fd, events: Int16(POLLIN), timeoutMs: 50), ev != 0 else { continue }
                let r = scratch.withUnsafeMutableBytes { p in syscallResult { Glibc.read(fd, p.baseAddress, p.count) } }
                guard case .success(let n) = r, n > 0 else { break }
            }
            FD.close(fd)
        }
    }

    /// Why a peer may not connect, or nil when it may.
    func refusal(for peer: Peer) -> String? {
        switch peer {
        case .unix(_, let uid, _):
            return config.allowedUIDs.contains(uid) ? nil : "uid \(uid) is not allowed (allow-uid)"
        case .vsock(let cid, _):
            return config.allowedVsockCIDs.contains(cid) ? nil : "vsock CID \(cid) is not allowed (allow-vsock-cid)"
        case .serial, .hvVSS:
            return nil
        case .unknown:
            return "unknown peer"
        }
    }

    /// Serves a virtio-serial port: one byte stream with no connection boundaries. The host
    /// "connects" when poll stops reporting POLLHUP; each such session is a connection of its own
    /// (a freeze bound to it thaws when the host goes away). The device may appear later and go away.
    public func serve(serialDevice path: String, dialect: Dialect = .quiesce) {
        Threads.detach { [self] in
            var announcedMissing = false
            while true {
                let fd: Int32
                do {
                    fd = try FD.openCharacterDevice(path, O_RDWR | O_NOCTTY | O_NONBLOCK)
                    announcedMissing = false
                } catch {
                    if !announcedMissing { logger.warning("serial port \(path): \(error); waiting for it") }
                    announcedMissing = true
                    // A missing port is waited for through inotify (no timer); other errors back off.
                    if access(path, F_OK) != 0, (try? PathWatch.waitUntilExists(path)) != nil { continue }
                    usleep(1_000_000)
                    continue
                }
                logger.info("serial port \(path) open")
                serveSerialSessions(fd: fd, path: path, dialect: dialect)
                FD.close(fd)
                logger.warning("serial port \(path) went away; reopening")
                usleep(500_000)
            }
        }
    }

    private func serveSerialSessions(fd: Int32, path: String, dialect: Dialect) {
        while true {
            // Wait for the host: POLLHUP means nobody is connected to the chardev right now. The
            // kernel sends SIGIO when the host connects (qemu-ga waits the same way). A port that
            // was unplugged or replugged (the path then names another device) is noticed through
            // an inotify watch on its directory, which sends SIGIO to this thread too; only without
            // that watch does a 1 s timeout stand in for it. An idle port costs no wakeup.
            let asyncIO = qs_async_to_this_thread(fd) == 0
            let watch = try? PathWatch(near: path)
            let watched = watch.map { qs_async_to_this_thread($0.fd) == 0 } ?? false
            var sigio = sigset_t()
            sigemptyset(&sigio)
            sigaddset(&sigio, SIGIO)
            var backoffUs: UInt32 = 20_000
            // Bytes that came while no host was connected, and since when.
            var held: [UInt8] = []
            var heldSince: UInt64 = 0
            while true {
                // While bytes are held, poll with a timeout: the host that sent them may send
                // nothing more until it is answered, so its session must start when POLLHUP
                // clears, with no new POLLIN (Proxmox connects for each command and waits).
                guard let ev = try? FD.poll(fd, events: Int16(POLLIN), timeoutMs: held.isEmpty ? -1 : 50) else { return }
                if ev & Int16(POLLNVAL | POLLERR) != 0 { return }
                if ev & Int16(POLLHUP) == 0 && !held.isEmpty { break }
                // No host: the port polls POLLIN|POLLHUP and reads 0 at once. A session starts when
                // POLLHUP clears (SIGIO comes then). A new host's first bytes may arrive just before
                // its connected notice: they are read and held for the session. Bytes that no
                // session claims within 500 ms of their arrival were left by a host that has gone
                // and must not run as requests of the next one: they are dropped. (The clock
                // starts when bytes arrive, not when the port went idle: a new host's first
                // request must never be mistaken for an old one's.)
                if ev & Int16(POLLHUP) == 0 && ev & Int16(POLLIN) != 0 { break }
                if ev & Int16(POLLIN) != 0 && ev & Int16(POLLHUP) != 0 {
                    if Server.readAvailable(fd, into: &held, limit: ProtocolLimits.maxFrameBytes * 2) > 0 && heldSince == 0 {
                        heldSince = monotonicNanos()
                    }
                    if !held.isEmpty && monotonicNanos() - heldSince > 500_000_000 {
                        logger.warning("serial port \(path): dropped \(held.count) bytes left by a host that went away")
                        held = []
                        heldSince = 0
                    }
                }
                if asyncIO {
                    // While bytes are held, wake often enough to drop them on time.
                    var timeout = held.isEmpty ? timespec(tv_sec: 1, tv_nsec: 0) : timespec(tv_sec: 0, tv_nsec: 100_000_000)
                    let signalled = held.isEmpty && watched ? sigtimedwait(&sigio, nil, nil) : sigtimedwait(&sigio, nil, &timeout)
                    if signalled < 0 && errno == EAGAIN && !Server.isSameDevice(fd: fd, path: path) {
                        return
                    }
                    if watch?.drain() == true && !Server.isSameDevice(fd: fd, path: path) { return }
                } else {
                    usleep(backoffUs)
                    backoffUs = min(backoffUs * 2, 250_000)
                    if backoffUs == 250_000 && !Server.isSameDevice(fd: fd, path: path) { return }
                }
            }
            let id = nextID.add(1, ordering: .relaxed).oldValue
            let conn = Connection(id: id, fd: fd, peer: .serial(path: path), server: self, isStream: false, dialect: dialect)
            connections.withLock { $0[id] = conn }
            let deviceGone = conn.runSerialSession(first: held)
            if deviceGone || !Server.isSameDevice(fd: fd, path: path) { return }
        }
    }

    /// Appends what is queued on a non-blocking fd to `held`, keeping at most `limit` bytes
    /// (the newest); returns how many bytes were read.
    static func readAvailable(_ fd: Int32, into held: inout [UInt8], limit: Int) -> Int {
        var total = 0
        var scratch = [UInt8](repeating: 0, count: 4096)
        while true {
            let r = scratch.withUnsafeMutableBytes { p in syscallResult { Glibc.read(fd, p.baseAddress, p.count) } }
            guard case .success(let n) = r, n > 0 else { break }
            total += n
            held += scratch[0..<n]
        }
        if held.count > limit { held.removeFirst(held.count - limit) }
        return total
    }

    /// Whether `path` still names the device open on `fd`.
    static func isSameDevice(fd: Int32, path: String) -> Bool {
        var a = stat(), b = stat()
        guard fstat(fd, &a) == 0, stat(path, &b) == 0 else { return false }
        return a.st_rdev == b.st_rdev && a.st_ino == b.st_ino && a.st_dev == b.st_dev
    }

    // MARK: - Requests

    func remove(_ conn: Connection) {
        connections.withLock { _ = $0.removeValue(forKey: conn.id) }
        let state = self.state
        Task { await state.connectionClosed(conn.id) }
    }

    func helloResult(clientVersion: Int64) -> Result<HelloResult, ProtocolError> {
        guard clientVersion >= ProtocolVersion.oldestSupported else {
            return .failure(ProtocolError(.unsupportedVersion,
                "protocol version \(clientVersion) is not supported (this agent speaks \(ProtocolVersion.oldestSupported) to \(ProtocolVersion.current))"))
        }
        return .success(HelloResult(version: min(clientVersion, ProtocolVersion.current), agent: "quiesced",
                                    agentVersion: agentVersion, capabilities: Server.capabilities,
                                    maxFrame: Int64(ProtocolLimits.maxFrameBytes), maxFreezeMs: config.maxFreezeMs))
    }

    static let capabilities = ["events", "freeze-list", "bound-freeze", "detached-freeze", "keepalive", "sync",
                               "op-id-replay", "parallel-freeze", "stacking-order", "hooks"]
}

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
        case .qga: QGA.errorFrame(QGA.Failure("\(error.code): \(error.message)"), id: id)
        }
    }
}

/// One peer session: a socket connection, or one host session on a serial port.
final class Connection: Sendable {
    /// Work for the connection's worker task, answered in order.
    enum Work: Sendable {
        case request(Request)
        case qga(QGA.Command, id: JSON?)
        /// An answer made already (a refused qemu-ga command), sent in its turn.
        case answer([UInt8])
        /// A qemu-ga command for the private qemu-ga (`qga-forward`): the frame as the host sent it.
        case forward(name: String, frame: [UInt8], id: JSON?)
    }

    let id: ConnectionID
    let fd: Int32
    let peer: Peer
    let isStream: Bool
    let dialect: Dialect
    unowned let server: Server
    /// Frames for the writer thread; nil tells it to stop. Callers never block on the peer.
    private let outbox = Mailbox<[UInt8]?>()
    private let queuedBytes = Atomic<Int>(0)
    /// Set once the peer is cut off (stopped reading, or a write failed): later frames are dropped.
    private let dead = Atomic<Bool>(false)
    static let maxQueuedBytes = 1 << 20
    private let hello = Atomic<Bool>(false)
    private let queue: AsyncStream<Work>.Continuation
    private let stream: AsyncStream<Work>
    /// Queued freeze/thaw/sync/keepalive requests (bounded per connection).
    private let inFlight = Atomic<Int>(0)
    /// Every request not yet answered, fast or queued.
    private let outstanding = Atomic<Int>(0)
    static let maxInFlight = 16
    /// Requests of any kind not yet answered on one connection (status and filesystems included).
    static let maxOutstanding = 64

    init(id: ConnectionID, fd: Int32, peer: Peer, server: Server, isStream: Bool, dialect: Dialect = .quiesce) {
        self.id = id
        self.fd = fd
        self.peer = peer
        self.server = server
        self.isStream = isStream
        self.dialect = dialect
        (stream, queue) = AsyncStream.makeStream(of: Work.self)
    }

    var helloDone: Bool { hello.load(ordering: .relaxed) }

    /// Queues one frame for the writer thread. Never blocks: replies come from Swift tasks and
    /// events from the state actor, which a peer that stops reading must not be able to stall.
    /// A peer whose unread backlog passes 1 MiB is cut off.
    func send(_ frame: [UInt8]) {
        guard !dead.load(ordering: .relaxed) else { return }
        // The limit is on what is already waiting: one large reply (a forwarded qemu-ga reply
        // may be up to QGAForwarder.maxReplyBytes) is queued when the peer has read the rest.
        if queuedBytes.add(frame.count, ordering: .relaxed).oldValue >= Connection.maxQueuedBytes {
            cutOff()
            return
        }
        outbox.post(frame)
    }

    /// Frames queued or being written (false once the peer is cut off).
    var hasQueuedOutput: Bool { !dead.load(ordering: .relaxed) && queuedBytes.load(ordering: .relaxed) > 0 }

    private func cutOff() {
        if !dead.exchange(true, ordering: .relaxed), isStream { Socket.shutdown(fd) }
    }

    /// Starts the thread that writes queued frames in order, each within the send timeout.
    private func startWriter() -> pthread_t {
        Threads.spawn { [self] in
            while let item = outbox.receive(), let frame = item {
                if !dead.load(ordering: .relaxed) {
                    do { try FD.writeAll(fd, frame, timeoutMs: 5000) } catch { cutOff() }
                }
                queuedBytes.subtract(frame.count, ordering: .relaxed)
            }
        }
    }

    /// Lets the writer flush what is queued, then stops it.
    private func stopWriter(_ writer: pthread_t) {
        outbox.post(nil)
        Threads.join(writer)
    }

    private func startWorker() {
        let state = server.state
        let context = RequestContext(connection: id, peer: peer)
        let stream = self.stream
        Task { [self] in
            for await work in stream {
                switch work {
                case .request(let request):
                    send(await state.handle(request, context: context).frame)
                case .qga(let command, let id):
                    send(await QGAService.execute(command, id: id, state: state, context: context, forwarder: server.qgaForwarder))
                case .forward(let name, let frame, let id):
                    guard let forwarder = server.qgaForwarder else { break }
                    let logger = server.logger
                    let reply = await QGAService.forward(frame, name: name, id: id, forwarder: forwarder, state: state) { why in
                        logger.warning("qemu-ga command \(name) passed on to unix:\(forwarder.path): \(why)")
                    }
                    if let reply { send(reply) }
                case .answer(let bytes):
                    send(bytes)
                }
                inFlight.subtract(1, ordering: .relaxed)
                outstanding.subtract(1, ordering: .relaxed)
            }
        }
    }

    /// Reads and serves a socket until the peer closes it or breaks the framing.
    func runStream() {
        let writer = startWriter()
        startWorker()
        var decoder = FrameDecoder(framing: dialect.framing)
        var limiter = RateLimiter(rate: server.config.rateLimit, burst: server.config.rateBurst)
        var buffer = [UInt8](repeating: 0, count: 16384)
        reading: while true {
            let r = buffer.withUnsafeMutableBytes { p in syscallResult { Glibc.read(fd, p.baseAddress, p.count) } }
            guard case .success(let n) = r, n > 0 else { break }
            decoder.feed(buffer[0..<n])
            while let event = decoder.next() {
                if !handle(event, limiter: &limiter) { break reading }
            }
        }
        // The peer may only have closed its sending side (`echo … | socat`): answer what it
        // asked before closing. A peer that is really gone fails the write and is cut off.
        queue.finish()
        var toldGone = false
        while outstanding.load(ordering: .relaxed) > 0 && !dead.load(ordering: .relaxed) {
            // POLLHUP (both directions shut): the peer is really gone, not half-closed. Tell the
            // state now, so a freeze being taken for it is given up (its hooks get freeze-failed).
            if !toldGone, let ev = try? FD.poll(fd, events: Int16(POLLIN), timeoutMs: 0), ev & Int16(POLLHUP) != 0 {
                toldGone = true
                let state = server.state, id = self.id
                Task { await state.connectionClosed(id) }
            }
            usleep(2000)
        }
        finish()
        stopWriter(writer)
        Socket.shutdown(fd)
        FD.close(fd)
    }

    /// Serves one host session on a serial port. Returns true when the device itself failed.
    /// `first`: bytes this host sent just before its connected notice, handled first.
    func runSerialSession(first: [UInt8] = []) -> Bool {
        let writer = startWriter()
        startWorker()
        var decoder = FrameDecoder(framing: dialect.framing)
        var limiter = RateLimiter(rate: server.config.rateLimit, burst: server.config.rateBurst)
        decoder.feed(first[...])
        while let event = decoder.next() { _ = handle(event, limiter: &limiter) }
        var buffer = [UInt8](repeating: 0, count: 16384)
        var deviceGone = false
        session: while true {
            guard let ev = try? FD.poll(fd, events: Int16(POLLIN), timeoutMs: -1) else { deviceGone = true; break }
            if ev & Int16(POLLNVAL | POLLERR) != 0 { deviceGone = true; break }
            if ev & Int16(POLLIN) == 0 && ev & Int16(POLLHUP) != 0 { break }  // host went away
            let r = buffer.withUnsafeMutableBytes { p in syscallResult { Glibc.read(fd, p.baseAddress, p.count) } }
            switch r {
            case .success(0): break session  // host disconnected (virtio-serial reads 0 then)
            case .success(let n):
                decoder.feed(buffer[0..<n])
                while let event = decoder.next() { _ = handle(event, limiter: &limiter) }
            case .failure(let e) where e == .EAGAIN: continue
            case .failure: deviceGone = true; break session
            }
        }
        // A host that reconnects at once may have had its first command read by this session
        // just before the hang-up showed: give quick answers (a guest-sync) up to 1 s to be
        // written, as a stream connection answers a half-closed peer, instead of stopping the
        // writer under them. A reply to a gone host fails its write and is dropped.
        queue.finish()
        let drainUntil = monotonicNanos() + 1_000_000_000
        while outstanding.load(ordering: .relaxed) > 0 && !dead.load(ordering: .relaxed) && monotonicNanos() < drainUntil {
            usleep(2000)
        }
        finish()
        stopWriter(writer)
        return deviceGone
    }

    private func finish() {
        queue.finish()
        server.remove(self)
    }

    /// Handles one decoder event. Returns false when the connection must close.
    private func handle(_ event: FrameEvent, limiter: inout RateLimiter) -> Bool {
        switch event {
        case .reset:
            return true
        case .tooLarge:
            send(dialect.errorFrame(ProtocolError(.frameTooLarge,
                "frame exceeds \(dialect.framing.maxFrameBytes) bytes\(isStream ? "; closing the connection" : "; skipped to the next \(dialect == .qga ? "command" : "line")")"), id: nil))
            return !isStream
        case .frame(let bytes):
            guard limiter.allow(now: monotonicNanos()) else {
                send(dialect.errorFrame(ProtocolError(.rateLimited, "more than \(server.config.rateLimit) requests per second"), id: nil))
                return true
            }
            if dialect == .qga {
                dispatchQGA(bytes)
                return true
            }
            switch Request.decode(frame: bytes) {
            case .failure(let e):
                send(Reply(id: e.id, error: e.error).frame)
            case .success(let request):
                dispatch(request)
            }
            return true
        }
    }

    private func dispatch(_ request: Request) {
        switch request.operation {
        case .hello(let version, _, _):
            switch server.helloResult(clientVersion: version) {
            case .success(let r):
                hello.store(true, ordering: .relaxed)
                send(Reply(id: request.id, result: r.json).frame)
            case .failure(let e):
                send(Reply(id: request.id, error: e).frame)
            }
        case .ping:
            send(Reply(id: request.id, result: [:]).frame)
        case .status, .filesystems:
            // Answered at once, never queued behind a freeze on this connection; bounded so that
            // a pipelining peer cannot start unbounded concurrent work.
            guard outstanding.add(1, ordering: .relaxed).newValue <= Connection.maxOutstanding else {
                outstanding.subtract(1, ordering: .relaxed)
                send(Reply(id: request.id, error: ProtocolError(.busy, "too many requests in flight on this connection")).frame)
                return
            }
            let state = server.state
            let context = RequestContext(connection: id, peer: peer)
            Task { [self] in
                send(await state.handle(request, context: context).frame)
                outstanding.subtract(1, ordering: .relaxed)
            }
        case .freeze, .thaw, .sync, .keepalive:
            guard enqueue(.request(request)) else {
                send(Reply(id: request.id, error: ProtocolError(.busy, "too many requests in flight on this connection")).frame)
                return
            }
        }
    }

    /// Queues work for the in-order worker; false when this connection already has
    /// `maxInFlight` queued.
    fileprivate func enqueue(_ work: Work) -> Bool {
        guard inFlight.add(1, ordering: .relaxed).newValue <= Connection.maxInFlight else {
            inFlight.subtract(1, ordering: .relaxed)
            return false
        }
        outstanding.add(1, ordering: .relaxed)
        queue.yield(work)
        return true
    }
}

extension Connection {
    /// qemu-ga answers strictly in order, one command at a time, and so do we: refusals too
    /// wait their turn. The queue per connection is bounded like our own freeze/thaw queue.
    fileprivate func dispatchQGA(_ bytes: [UInt8]) {
        // A command over 64 KiB (up to maxQGAFrameBytes) is taken only with nothing ahead of it, so
        // a connection holds at most one such frame queued besides the one being read.
        if bytes.count > ProtocolLimits.maxFrameBytes && inFlight.load(ordering: .relaxed) > 0 {
            let busy = Dialect.qga.errorFrame(ProtocolError(.busy, "a command over 64 KiB is taken only when the commands before it are answered"), id: nil)
            if !enqueue(.answer(busy)) { send(busy) }
            return
        }
        let work: Work
        let id: JSON?
        switch QGA.decode(frame: bytes) {
        case .failure(let refusal) where refusal.unknownCommand != nil && server.qgaForwarder != nil:
            work = .forward(name: refusal.unknownCommand!, frame: bytes, id: refusal.id)
            id = refusal.id
        case .failure(let refusal):
            work = .answer(QGA.errorFrame(refusal.failure, id: refusal.id))
            id = refusal.id
        case .success(let decoded):
            work = .qga(decoded.command, id: decoded.id)
            id = decoded.id
        }
        if !enqueue(work) {
            send(Dialect.qga.errorFrame(ProtocolError(.busy, "too many commands in flight on this connection"), id: id))
        }
    }
}

/// A token bucket: `rate` requests per second sustained, `burst` at once.
struct RateLimiter {
    let rate: Double
    let burst: Double
    var tokens: Double
    var last: UInt64 = 0

    init(rate: Int, burst: Int) {
        self.rate = Double(rate)
        self.burst = Double(burst)
        tokens = Double(burst)
    }

    mutating func allow(now: UInt64) -> Bool {
        if last != 0 { tokens = min(burst, tokens + Double(now - last) / 1e9 * rate) }
        last = now
        guard tokens >= 1 else { return false }
        tokens -= 1
        return true
    }
}
