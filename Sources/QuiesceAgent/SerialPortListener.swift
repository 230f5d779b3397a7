// Serving a virtio-serial port: one byte stream with no connection boundaries, each host visit a session.
import QuiesceLinux
import QuiesceProtocol
import Logging

extension Server {
    /// Serves a virtio-serial port: one byte stream with no connection boundaries. The host
    /// "connects" when poll stops reporting POLLHUP; each such session is a connection of its own
    /// (a freeze bound to it thaws when the host goes away). The device may appear later and go away.
    public func serve(serialDevice path: String, dialect: Dialect = .quiesce) {
        Threads.detach(name: "serial-port") { [self] in
            var announcedMissing = false
            var retry = RetryBackoff()
            while true {
                let fd: Int32
                do {
                    fd = try FD.openCharacterDevice(path, [.readWrite, .noControllingTerminal, .nonBlocking])
                    announcedMissing = false
                    retry.reset()
                } catch {
                    if !announcedMissing { logger.warning("serial port \(path): \(error); waiting for it") }
                    announcedMissing = true
                    // A missing port is waited for through inotify (no timer); other errors back
                    // off from 1 s to 1 min (RetryBackoff).
                    if !Paths.exists(path), (try? PathWatch.waitUntilExists(path)) != nil { continue }
                    retry.sleep()
                    continue
                }
                logger.info("serial port \(path) open")
                serveSerialSessions(fd: fd, path: path, dialect: dialect)
                FD.close(fd)
                logger.warning("serial port \(path) went away; reopening")
                Threads.sleep(milliseconds: 500)
            }
        }
    }

    private func serveSerialSessions(fd: Int32, path: String, dialect: Dialect) {
        while true {
            // Wait for the host: POLLHUP means nobody is connected to the chardev right now. The
            // kernel sends SIGIO when the host connects; a port that was unplugged or replugged
            // (the path then names another device) is noticed through a watch on its directory
            // (`SerialPortWait`). An idle port costs no wakeup.
            let waiter = SerialPortWait(fd: fd, path: path)
            // Bytes that came while no host was connected, and since when.
            var held: [UInt8] = []
            var heldSince: UInt64 = 0
            while true {
                // While bytes are held, poll with a timeout: the host that sent them may send
                // nothing more until it is answered, so its session must start when POLLHUP
                // clears, with no new POLLIN (Proxmox connects for each command and waits).
                guard let ev = try? FD.poll(fd, for: .readable, timeoutMs: held.isEmpty ? -1 : 50) else { return }
                if !ev.isDisjoint(with: [.invalid, .error]) { return }
                if !ev.contains(.hangUp) && !held.isEmpty { break }
                // No host: the port polls POLLIN|POLLHUP and reads 0 at once. A session starts when
                // POLLHUP clears (SIGIO comes then). A new host's first bytes may arrive just before
                // its connected notice: they are read and held for the session. Bytes that no
                // session claims within 500 ms of their arrival were left by a host that has gone
                // and must not run as requests of the next one: they are dropped. (The clock
                // starts when bytes arrive, not when the port went idle: a new host's first
                // request must never be mistaken for an old one's.)
                if !ev.contains(.hangUp) && ev.contains(.readable) { break }
                if ev.contains(.readable) && ev.contains(.hangUp) {
                    if FD.readAvailable(fd, into: &held, limit: ProtocolLimits.maxFrameBytes * 2) > 0 && heldSince == 0 {
                        heldSince = monotonicNanos()
                    }
                    if !held.isEmpty && monotonicNanos() - heldSince > 500_000_000 {
                        logger.warning("serial port \(path): dropped \(held.count) bytes left by a host that went away")
                        held = []
                        heldSince = 0
                    }
                }
                // While bytes are held, wake often enough to drop them on time.
                guard waiter.waitForHost(holdingBytes: !held.isEmpty) else { return }
            }
            let id = nextID.add(1, ordering: .relaxed).oldValue
            let conn = ClientSession(id: id, fd: fd, peer: .serial(path: path), server: self, isStream: false, dialect: dialect)
            connections.withLock { $0[id] = conn }
            let deviceGone = conn.runSerialSession(first: held)
            if deviceGone || !SerialPortWait.isSameDevice(fd: fd, path: path) { return }
        }
    }
}
