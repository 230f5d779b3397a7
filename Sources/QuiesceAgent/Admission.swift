// Accepting and admitting stream connections (Unix, vsock): peer rules, the connection limit, refusals.
import QuiesceLinux
import QuiesceProtocol
import Logging
import Synchronization

extension Server {
    /// Serves a listening stream socket (Unix or vsock) on a thread of its own.
    public func serve(listener fd: Int32, name: String, dialect: Dialect = .quiesce) {
        Threads.detach(name: "accept") { [self] in
            var failures = 0
            while true {
                let accepted: (fd: Int32, peer: Peer)
                do {
                    accepted = try Socket.accept(fd)
                    failures = 0
                } catch {
                    failures += 1
                    if failures == 1 || failures % 100 == 0 { logger.warning("accept on \(name): \(error)") }
                    Threads.sleep(milliseconds: 50)  // EMFILE and friends: back off instead of spinning
                    continue
                }
                admit(fd: accepted.fd, peer: accepted.peer, listener: name, dialect: dialect)
            }
        }
    }

    private func admit(fd: Int32, peer: Peer, listener: String, dialect: Dialect) {
        Socket.setSendTimeout(fd, milliseconds: 5000)
        if let refusal = refusal(for: peer) {
            if let more = refusalLog.note(now: monotonicNanos()) {
                logger.warning("refused connection", metadata: ["peer": "\(peer)", "listener": "\(listener)", "reason": "\(refusal)",
                                                                "refused_since_last_line": "\(more)"])
            }
            Server.refuse(fd, dialect.errorFrame(ProtocolError(.permissionDenied, refusal), id: nil))
            return
        }
        let id = nextID.add(1, ordering: .relaxed).oldValue
        let conn = ClientSession(id: id, fd: fd, peer: peer, server: self, isStream: true, dialect: dialect)
        var madeRoom: (session: ClientSession, idleNs: UInt64)?
        let admitted = connections.withLock { table -> Bool in
            if table.count >= config.maxConnections {
                // Full: close the connection idle longest, if any has been idle long enough,
                // has nothing unanswered and holds no bound freeze, so that peers which connect
                // and then say nothing cannot lock every other client out.
                let now = monotonicNanos()
                let bound = state.boundConnection.withLock { $0 }
                let idle = table.values.compactMap { s in
                    s.id == bound ? nil : s.idleNanos(now: now).flatMap { $0 >= Server.idleToClose ? (s, $0) : nil }
                }
                guard let victim = idle.max(by: { $0.1 < $1.1 }) else { return false }
                table.removeValue(forKey: victim.0.id)
                madeRoom = victim
            }
            table[id] = conn
            return true
        }
        if let (victim, idleNs) = madeRoom { victim.closeToMakeRoom(idleNs: idleNs, maxConnections: config.maxConnections) }
        guard admitted else {
            if let more = refusalLog.note(now: monotonicNanos()) {
                logger.warning("refused connection: too many connections", metadata: ["peer": "\(peer)", "listener": "\(listener)",
                                                                                     "max_connections": "\(config.maxConnections)",
                                                                                     "refused_since_last_line": "\(more)"])
            }
            Server.refuse(fd, dialect.errorFrame(ProtocolError(.busy, "too many connections (\(config.maxConnections))"), id: nil))
            return
        }
        guard Threads.tryDetach(name: "session-\(id)", { conn.runStream() }) else {
            connections.withLock { _ = $0.removeValue(forKey: id) }
            if let more = refusalLog.note(now: monotonicNanos()) {
                logger.error("refused connection: no thread can be started for it (a pids or process limit is reached)",
                             metadata: ["refused_since_last_line": "\(more)"])
            }
            Server.refuse(fd, dialect.errorFrame(ProtocolError(.busy, "the agent cannot start a thread for this connection now"), id: nil))
            return
        }
    }

    /// Tells a refused peer why, then closes so that it can still read the reason: our side is
    /// shut down first and what the peer sent is drained briefly (closing with unread input
    /// would reset the connection under it). Off the accept thread, bounded to 250 ms.
    ///
    /// At most `maxDrainingRefusals` such drains run at once: a storm of connections (a peer
    /// that is not allowed, or past max-connections) is then closed at once instead, so that it
    /// cannot make the agent start a thread per connection.
    static func refuse(_ fd: Int32, _ errorFrame: [UInt8]) {
        try? FD.writeAll(fd, errorFrame, timeoutMs: 1000)
        Socket.shutdownWrite(fd)
        guard drainingRefusals.add(1, ordering: .relaxed).oldValue < maxDrainingRefusals else {
            drainingRefusals.subtract(1, ordering: .relaxed)
            FD.close(fd)
            return
        }
        let started = Threads.tryDetach(name: "refuse") {
            let deadline = monotonicNanos() + 250_000_000
            var scratch = [UInt8](repeating: 0, count: 4096)
            while monotonicNanos() < deadline {
                let left = Int32((deadline &- monotonicNanos()) / 1_000_000) + 1
                guard let ev = try? FD.poll(fd, for: .readable, timeoutMs: max(1, left)), !ev.isEmpty else { continue }
                guard case .success(let n) = FD.readSome(fd, into: &scratch), n > 0 else { break }
            }
            FD.close(fd)
            drainingRefusals.subtract(1, ordering: .relaxed)
        }
        if !started {
            drainingRefusals.subtract(1, ordering: .relaxed)
            FD.close(fd)
        }
    }

    static let maxDrainingRefusals = 8
    static let drainingRefusals = Atomic<Int>(0)

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
}
