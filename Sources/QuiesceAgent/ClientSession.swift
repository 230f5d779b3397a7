// One peer session's pipeline: read and decode, dispatch, queue replies and events to its writer.
import QuiesceLinux
import QuiesceProtocol
import Synchronization

/// One peer's session with the agent: a socket connection, or one host's visit on a serial port.
/// Its pipeline: a reader thread decodes frames and dispatches them (quick answers at once,
/// freeze/thaw/sync/keepalive in order on a worker task), and a writer thread sends the queued
/// replies and events. (The host's `Connection` is the coordinator's side of a link.)
final class ClientSession: Sendable {
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
    private let queue: AsyncStream<(work: Work, held: Int)>.Continuation
    private let stream: AsyncStream<(work: Work, held: Int)>
    /// Bytes of `server.largeCommands` held for the command being read (used by the reader
    /// thread only; atomic to keep the class Sendable).
    private let readingHeld = Atomic<Int>(0)
    /// Queued freeze/thaw/sync/keepalive requests (bounded per connection).
    private let inFlight = Atomic<Int>(0)
    /// Every request not yet answered, fast or queued.
    private let outstanding = Atomic<Int>(0)
    static let maxInFlight = 16
    /// Requests of any kind not yet answered on one connection (status and filesystems included).
    static let maxOutstanding = 64
    /// Signalled when the last outstanding request is answered or the peer is cut off: a session
    /// that has stopped reading sleeps on it until then, with no timer (nil: no descriptor left).
    private let wake: Wakeup?
    /// qemu-ga's dialect: signalled when a queued command is answered (or the peer is cut off),
    /// so that a reader whose connection has `maxInFlight` queued can take the next one in turn.
    private let slotFreed: Wakeup?
    /// When the peer last sent a frame or was last sent one (monotonic ns): how long it has
    /// been idle, for making room past max-connections (`Server.idleToClose`).
    private let lastActivity = Atomic<UInt64>(monotonicNanos())
    /// False once a stream session has closed `fd` (`closeDescriptor`).
    private let descriptorOpen = Mutex<Bool>(true)

    init(id: ConnectionID, fd: Int32, peer: Peer, server: Server, isStream: Bool, dialect: Dialect = .quiesce) {
        self.id = id
        self.fd = fd
        self.peer = peer
        self.server = server
        self.isStream = isStream
        self.dialect = dialect
        wake = try? Wakeup()
        slotFreed = dialect == .qga ? try? Wakeup() : nil
        (stream, queue) = AsyncStream.makeStream(of: (work: Work, held: Int).self)
    }

    var helloDone: Bool { hello.load(ordering: .relaxed) }

    /// Queues one frame for the writer thread. Never blocks: replies come from Swift tasks and
    /// events from the state actor, which a peer that stops reading must not be able to stall.
    /// A peer whose unread backlog passes 1 MiB is cut off.
    func send(_ frame: [UInt8]) {
        lastActivity.store(monotonicNanos(), ordering: .relaxed)
        guard !dead.load(ordering: .relaxed) else { return }
        // The limit is on what is already waiting: one large reply (a forwarded qemu-ga reply
        // may be up to QGAForwarder.maxReplyBytes) is queued when the peer has read the rest.
        if queuedBytes.add(frame.count, ordering: .relaxed).oldValue >= ClientSession.maxQueuedBytes {
            cutOff(stoppedReading: "its unread replies and events passed \(ClientSession.maxQueuedBytes >> 20) MiB")
            return
        }
        outbox.post(frame)
    }

    /// Frames queued or being written (false once the peer is cut off).
    var hasQueuedOutput: Bool { !dead.load(ordering: .sequentiallyConsistent) && queuedBytes.load(ordering: .sequentiallyConsistent) > 0 }

    /// Stops writing to the peer. `stoppedReading` says why when the peer is alive but not
    /// reading (logged); nil when it is gone (a write failed: EPIPE, ECONNRESET).
    private func cutOff(stoppedReading: String? = nil) {
        if !dead.exchange(true, ordering: .sequentiallyConsistent) {
            if let why = stoppedReading {
                server.logger.warning("peer cut off: it stopped reading (\(why))", metadata: ["peer": "\(peer)", "connection": "\(id)"])
            }
            if isStream { Socket.shutdown(fd) }
        }
        wake?.signal()
        slotFreed?.signal()
        server.sessionOutputDrained()
    }

    /// Nanoseconds since the peer last sent or was sent a frame, when it could be closed to
    /// make room: a stream connection with no request unanswered; nil otherwise. (Whether it
    /// holds a bound freeze is the state's to say: `AgentState.boundConnection`.)
    func idleNanos(now: UInt64) -> UInt64? {
        guard isStream, outstanding.load(ordering: .relaxed) == 0, !dead.load(ordering: .relaxed) else { return nil }
        let last = lastActivity.load(ordering: .relaxed)
        return now > last ? now - last : 0
    }

    /// Closes an idle connection to make room for a new one: tells the peer why, stops reading
    /// (the read loop ends as at the peer's EOF), and the session then finishes as usual.
    func closeToMakeRoom(idleNs: UInt64, maxConnections: Int) {
        server.logger.notice("closed a connection idle for \(TimeSpan.human(milliseconds: Int64(idleNs / 1_000_000))) to make room: \(maxConnections) connections (max-connections) were open",
                             metadata: ["peer": "\(peer)", "connection": "\(id)"])
        send(dialect.errorFrame(ProtocolError(.busy, "closing this connection, idle for \(idleNs / 1_000_000_000) s, to make room for a new one: max-connections (\(maxConnections)) are open"), id: nil))
        // The session may have ended meanwhile, and its descriptor's number been reused.
        descriptorOpen.withLock { open in if open { Socket.shutdownRead(fd) } }
    }

    /// Rate-limited requests are logged once per session (the peer hears each one).
    private let loggedRateLimit = Atomic<Bool>(false)
    /// Likewise frames too large (a serial session skips them and goes on).
    private let loggedTooLarge = Atomic<Bool>(false)

    /// One request answered (its reply queued).
    private func answered() {
        if outstanding.subtract(1, ordering: .relaxed).newValue == 0 { wake?.signal() }
    }

    /// Starts the thread that writes queued frames in order, each within the send timeout; nil
    /// when no thread can be started (a pids or process limit).
    private func startWriter() -> JoinableThread? {
        Threads.trySpawn(name: "writer-\(id)") { [self] in
            while let item = outbox.receive(), let frame = item {
                if !dead.load(ordering: .relaxed) {
                    // A serial port may still say hung up just after a host connected: 1 s grace.
                    do { try FD.writeAll(fd, frame, timeoutMs: 5000, hangupGraceMs: isStream ? 0 : 1000) } catch {
                        cutOff(stoppedReading: (error as? SystemError)?.errno == .ETIMEDOUT ? "a write blocked for 5 s" : nil)
                    }
                }
                if queuedBytes.subtract(frame.count, ordering: .sequentiallyConsistent).newValue == 0
                    || dead.load(ordering: .relaxed) {
                    server.sessionOutputDrained()
                }
            }
        }
    }

    /// Lets the writer flush what is queued, then stops it.
    private func stopWriter(_ writer: JoinableThread) {
        outbox.post(nil)
        Threads.join(writer)
    }

    private func startWorker() {
        let state = server.state
        let context = RequestContext(connection: id, peer: peer)
        let stream = self.stream
        Task { [self] in
            for await (work, held) in stream {
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
                server.largeCommands.release(held)
                inFlight.subtract(1, ordering: .relaxed)
                slotFreed?.signal()
                answered()
            }
        }
    }

    /// Reads and serves a socket until the peer closes it or breaks the framing.
    func runStream() {
        guard let wake, let writer = startWriter() else {
            let why = wake == nil ? "no descriptor" : "no thread"
            FD.writeOnce(fd, dialect.errorFrame(ProtocolError(.internal, "the agent has \(why) left for this connection"), id: nil))
            finish()
            closeDescriptor()
            return
        }
        startWorker()
        var decoder = FrameDecoder(framing: dialect.framing)
        var limiter = RateLimiter(rate: server.config.rateLimit, burst: server.config.rateBurst)
        var buffer = [UInt8](repeating: 0, count: 16384)
        // When the frame being read began (its first byte arrived), or, before the first frame,
        // when the connection was accepted: that frame must be complete within
        // `ProtocolLimits.frameCompletionMs`. Between frames the read waits without a timeout.
        var frameBegun: UInt64? = monotonicNanos()
        var framesRead = false
        reading: while true {
            if let begun = frameBegun {
                let left = Int64(begun) + ProtocolLimits.frameCompletionMs * 1_000_000 - Int64(monotonicNanos())
                let ready = left <= 0 ? [] : (try? FD.poll(fd, for: .readable, timeoutMs: Int32(min((left + 999_999) / 1_000_000, Int64(Int32.max))))) ?? [.error]
                if ready.isEmpty {
                    let seconds = ProtocolLimits.frameCompletionMs / 1000
                    let held = decoder.bufferedByteCount
                    let what = held > 0 ? "a frame begun \(seconds) s ago is still unfinished (\(held) bytes, no end)"
                        : "no frame in the \(seconds) s since the connection was made"
                    server.logger.warning("\(held > 0 ? "a frame left unfinished" : "a connection silent") for \(seconds) s: connection closed",
                                          metadata: ["peer": "\(peer)", "connection": "\(id)", "bytes_held": "\(held)"])
                    send(dialect.errorFrame(ProtocolError(.badRequest, "\(what); closing the connection"), id: nil))
                    break reading
                }
            }
            guard case .success(let n) = FD.readSome(fd, into: &buffer), n > 0 else { break }
            decoder.feed(buffer[0..<n])
            while let event = decoder.next() {
                if case .frame = event { framesRead = true }
                if !handle(event, limiter: &limiter) { break reading }
            }
            if decoder.bufferedByteCount > 0 {
                if frameBegun == nil { frameBegun = monotonicNanos() }
            } else if framesRead {
                frameBegun = nil
            }
            guard holdCommandBeingRead(bufferedBytes: decoder.bufferedByteCount) else {
                let inUse = server.largeCommands.inUse >> 20
                server.logger.warning("qemu-ga command over 64 KiB refused: other connections hold \(inUse) MiB of such commands (at most \(Server.largeCommandBytes >> 20) MiB); connection closed",
                                      metadata: ["peer": "\(peer)", "connection": "\(id)"])
                send(dialect.errorFrame(ProtocolError(.busy, "the agent already holds \(inUse) MiB of commands over 64 KiB from other connections (at most \(Server.largeCommandBytes >> 20) MiB); closing the connection, try again"), id: nil))
                break reading
            }
        }
        server.largeCommands.release(readingHeld.exchange(0, ordering: .relaxed))
        // The peer may only have closed its sending side (`echo … | socat`): answer what it
        // asked before closing. A peer that is really gone fails the write and is cut off.
        // It sleeps until the last answer is queued, or the peer hangs up for good: POLLHUP
        // (both directions shut) means it is really gone, not half-closed; the state is told
        // at once, so a freeze being taken for it is given up (its hooks get freeze-failed).
        queue.finish()
        var toldGone = false
        while outstanding.load(ordering: .relaxed) > 0 && !dead.load(ordering: .relaxed) {
            // Only hang-up and errors are asked of the socket: its EOF stays readable.
            guard let ready = try? FD.poll([(toldGone ? -1 : fd, []), (wake.fd, .readable)], timeoutMs: -1) else { break }
            if !toldGone, !ready[0].isDisjoint(with: [.hangUp, .error]) {
                toldGone = true
                let state = server.state, id = self.id
                Task { await state.connectionClosed(id) }
            }
            if ready[1].contains(.readable) { wake.clear() }
        }
        finish()
        stopWriter(writer)
        closeDescriptor()
    }

    /// Shuts down and closes a stream session's socket, once: after this `fd` may name another
    /// file, so another thread (`closeToMakeRoom`) acts on it only under the same lock.
    private func closeDescriptor() {
        descriptorOpen.withLock { open in
            guard open else { return }
            open = false
            Socket.shutdown(fd)
            FD.close(fd)
        }
    }

    /// Serves one host session on a serial port. Returns true when the device itself failed.
    /// `first`: bytes this host sent just before its connected notice, handled first.
    func runSerialSession(first: [UInt8] = []) -> Bool {
        guard let writer = startWriter() else {
            server.logger.error("serial port session: no thread can be started for it (a pids or process limit is reached)")
            finish()
            return true  // reopened after a pause, like a failed device
        }
        startWorker()
        var decoder = FrameDecoder(framing: dialect.framing)
        var limiter = RateLimiter(rate: server.config.rateLimit, burst: server.config.rateBurst)
        decoder.feed(first[...])
        while let event = decoder.next() { _ = handle(event, limiter: &limiter) }
        var buffer = [UInt8](repeating: 0, count: 16384)
        var deviceGone = false
        session: while true {
            guard let ev = try? FD.poll(fd, for: .readable, timeoutMs: -1) else { deviceGone = true; break }
            if !ev.isDisjoint(with: [.invalid, .error]) { deviceGone = true; break }
            if !ev.contains(.readable) && ev.contains(.hangUp) { break }  // host went away
            switch FD.readSome(fd, into: &buffer) {
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
        while let wake, outstanding.load(ordering: .relaxed) > 0 && !dead.load(ordering: .relaxed) {
            let now = monotonicNanos()
            guard now < drainUntil else { break }
            let left = Int32((drainUntil - now + 999_999) / 1_000_000)
            if (try? FD.poll(wake.fd, for: .readable, timeoutMs: left))?.contains(.readable) == true { wake.clear() }
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
            if !loggedTooLarge.exchange(true, ordering: .relaxed) {
                server.logger.warning("frame larger than \(dialect.framing.maxFrameBytes) bytes\(isStream ? ": connection closed" : ": skipped (logged once per session)")",
                                      metadata: ["peer": "\(peer)", "connection": "\(id)"])
            }
            let refusal = dialect.errorFrame(ProtocolError(.frameTooLarge,
                "frame exceeds \(dialect.framing.maxFrameBytes) bytes\(isStream ? "; closing the connection" : "; skipped to the next \(dialect == .qga ? "command" : "line")")",
                details: ["max_frame": .int(Int64(dialect.framing.maxFrameBytes))]), id: nil)
            if dialect == .qga { _ = enqueueInOrder(.answer(refusal)) } else { send(refusal) }
            return !isStream
        case .frame(let bytes):
            lastActivity.store(monotonicNanos(), ordering: .relaxed)
            // A thaw is never rate-limited: refusing one would leave the guest frozen until the
            // deadline because a peer sent too much before it (trial F). Decoded once, here.
            if dialect == .qga {
                let decoded = QGA.decode(frame: bytes)
                let thaw = if case .success(let d) = decoded, d.command == .fsfreezeThaw { true } else { false }
                guard thaw || limiter.allow(now: monotonicNanos()) else {
                    let id = switch decoded { case .success(let d): d.id; case .failure(let r): r.id }
                    // qemu-ga's dialect answers in order, refusals too (a reply may carry no id).
                    _ = enqueueInOrder(.answer(rateLimited(id: id)))
                    return true
                }
                dispatchQGA(bytes, decoded)
                return true
            }
            let decoded = Request.decode(frame: bytes)
            let thaw = if case .success(let r) = decoded, case .thaw = r.operation { true } else { false }
            guard thaw || limiter.allow(now: monotonicNanos()) else {
                let id = switch decoded { case .success(let r): r.id; case .failure(let e): e.id }
                send(rateLimited(id: id))
                return true
            }
            switch decoded {
            case .failure(let e):
                send(Reply(id: e.id, error: e.error).frame)
            case .success(let request):
                dispatch(request)
            }
            return true
        }
    }

    /// The refusal of a request over the rate limit (logged once per connection), with the
    /// request's id when it could be read (PROTOCOL.md section 3.2).
    private func rateLimited(id requestID: JSON?) -> [UInt8] {
        if !loggedRateLimit.exchange(true, ordering: .relaxed) {
            server.logger.warning("peer rate-limited: more than \(server.config.rateLimit) requests per second (logged once per connection)",
                                  metadata: ["peer": "\(peer)", "connection": "\(id)"])
        }
        return dialect.errorFrame(ProtocolError(.rateLimited, "more than \(server.config.rateLimit) requests per second"), id: requestID)
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
            guard outstanding.add(1, ordering: .relaxed).newValue <= ClientSession.maxOutstanding else {
                outstanding.subtract(1, ordering: .relaxed)
                send(Reply(id: request.id, error: ProtocolError(.busy, "too many requests in flight on this connection")).frame)
                return
            }
            let state = server.state
            let context = RequestContext(connection: id, peer: peer)
            Task { [self] in
                send(await state.handle(request, context: context).frame)
                answered()
            }
        case .freeze, .thaw, .sync, .keepalive:
            guard enqueue(.request(request)) else {
                send(Reply(id: request.id, error: ProtocolError(.busy, "too many requests in flight on this connection")).frame)
                return
            }
        }
    }

    /// Queues work for the in-order worker; false when this connection already has
    /// `maxInFlight` queued. `held`: bytes of `server.largeCommands` the work holds, given back
    /// once it is answered (by the caller when this returns false).
    fileprivate func enqueue(_ work: Work, held: Int = 0) -> Bool {
        guard inFlight.add(1, ordering: .relaxed).newValue <= ClientSession.maxInFlight else {
            inFlight.subtract(1, ordering: .relaxed)
            return false
        }
        outstanding.add(1, ordering: .relaxed)
        queue.yield((work, held))
        return true
    }

    /// Keeps `readingHeld` equal to what the unfinished command in the decoder holds over
    /// 64 KiB (stream sessions; a serial session is not counted). False when that no longer
    /// fits in `server.largeCommands`.
    fileprivate func holdCommandBeingRead(bufferedBytes: Int) -> Bool {
        let need = max(0, bufferedBytes - ProtocolLimits.maxFrameBytes)
        let held = readingHeld.load(ordering: .relaxed)
        if need > held {
            guard server.largeCommands.reserve(need - held) else { return false }
        } else {
            server.largeCommands.release(held - need)
        }
        readingHeld.store(need, ordering: .relaxed)
        return true
    }

    /// Moves what a complete command over 64 KiB holds from `readingHeld` to the command
    /// itself (a stream session), taking what the reading had not reserved yet. Returns the
    /// bytes it holds, or nil when they do not fit.
    fileprivate func holdCompleteCommand(_ bytes: Int) -> Int? {
        guard isStream else { return 0 }
        let excess = max(0, bytes - ProtocolLimits.maxFrameBytes)
        let moved = min(readingHeld.load(ordering: .relaxed), excess)
        readingHeld.subtract(moved, ordering: .relaxed)
        guard server.largeCommands.reserve(excess - moved) else {
            server.largeCommands.release(moved)
            return nil
        }
        return excess
    }
}

extension ClientSession {
    /// qemu-ga answers strictly in order, one command at a time, and so do we: refusals too
    /// wait their turn. The queue per connection is bounded like our own freeze/thaw queue.
    fileprivate func dispatchQGA(_ bytes: [UInt8], _ decoded: Result<QGA.Decoded, QGA.Refusal>) {
        // A command over 64 KiB (up to maxQGAFrameBytes) is taken only with nothing ahead of it, so
        // a connection holds at most one such frame queued besides the one being read.
        guard let held = holdCompleteCommand(bytes.count) else {
            let busy = Dialect.qga.errorFrame(ProtocolError(.busy, "the agent already holds \(server.largeCommands.inUse >> 20) MiB of commands over 64 KiB from other connections; try again"), id: nil)
            _ = enqueueInOrder(.answer(busy))
            return
        }
        if bytes.count > ProtocolLimits.maxFrameBytes && inFlight.load(ordering: .relaxed) > 0 {
            server.largeCommands.release(held)
            let busy = Dialect.qga.errorFrame(ProtocolError(.busy, "a command over 64 KiB is taken only when the commands before it are answered"), id: nil)
            _ = enqueueInOrder(.answer(busy))
            return
        }
        let work: Work
        switch decoded {
        case .failure(let refusal) where refusal.unknownCommand != nil && server.qgaForwarder != nil:
            work = .forward(name: refusal.unknownCommand!, frame: bytes, id: refusal.id)
        case .failure(let refusal):
            work = .answer(QGA.errorFrame(refusal.failure, id: refusal.id))
        case .success(let decoded):
            work = .qga(decoded.command, id: decoded.id)
        }
        if !enqueueInOrder(work, held: held) { server.largeCommands.release(held) }
    }

    /// Queues qemu-ga work in its turn. With `maxInFlight` commands already queued it waits for
    /// one to be answered, so the reader stops taking commands and the rest wait in the socket,
    /// as with qemu-ga, which reads the next command only after answering the last. (Answering
    /// busy at once instead put that refusal ahead of replies owed before it, and a host that
    /// sends no ids took it for its freeze's answer while the freeze held: trial E.) False when
    /// the peer has been cut off meanwhile: the work is dropped.
    fileprivate func enqueueInOrder(_ work: Work, held: Int = 0) -> Bool {
        while !enqueue(work, held: held) {
            guard let slotFreed, !dead.load(ordering: .sequentiallyConsistent) else { return false }
            _ = try? FD.poll(slotFreed.fd, for: .readable, timeoutMs: -1)
            slotFreed.clear()
        }
        return true
    }
}
