// Opening a byte stream to an agent: Unix, vsock, hybrid vsock (CONNECT handshake) or a serial chardev.
import QuiesceLinux
import QuiesceProtocol
import Synchronization

/// A connected byte stream to one agent. One thread reads and writes; any thread may `shutdown`
/// it to wake that thread.
public final class Connection: Sendable {
    public let address: AgentAddress
    private let fd: Int32
    /// False once closed, so `shutdown` from another thread never touches a reused descriptor.
    private let open = Mutex(true)
    /// Bytes that arrived with the hybrid vsock handshake reply and belong to the protocol stream.
    let handshakeLeftover: [UInt8]

    init(address: AgentAddress, fd: Int32, leftover: [UInt8] = []) {
        self.address = address
        self.fd = fd
        handshakeLeftover = leftover
    }

    deinit { close() }

    /// Connects to `address` within `timeoutMs`, including the hybrid vsock handshake.
    /// The serial resynchronisation needs the protocol and happens in `AgentClient.connect`.
    /// `interrupted` ends a wait for room in a Unix listener's full backlog (qemu-ga's is 1)
    /// early, as `unreachable`.
    public static func open(_ address: AgentAddress, timeoutMs: Int64, interrupted: () -> Bool = { false }) throws(AgentError) -> Connection {
        let start = monotonicNanos()
        let wait = Int32(clamping: timeoutMs)
        switch address {
        case .unix(let path), .serial(let path), .qga(let path):
            let fd = try connectUnix(path, address: address, timeoutMs: wait, interrupted: interrupted)
            return Connection(address: address, fd: fd)
        case .vsock(let cid, let port):
            if let refusal = vsockRefusal(cid: cid) { throw AgentError(.unreachable, refusal) }
            do {
                let fd = try Socket.connectVsock(cid: cid, port: port, timeoutMs: wait)
                return Connection(address: address, fd: fd)
            } catch {
                throw vsockError(error, cid: cid, port: port, timeoutMs: timeoutMs)
            }
        case .hybridVsock(let path, let port):
            let fd = try connectUnix(path, address: address, timeoutMs: wait, interrupted: interrupted)
            do throws(AgentError) {
                let leftover = try hybridHandshake(fd: fd, path: path, port: port,
                                                   deadline: start + UInt64(max(0, timeoutMs)) * 1_000_000,
                                                   timeoutMs: timeoutMs)
                return Connection(address: address, fd: fd, leftover: leftover)
            } catch {
                FD.close(fd)
                throw error
            }
        }
    }

    private static func connectUnix(_ path: String, address: AgentAddress, timeoutMs: Int32, interrupted: () -> Bool) throws(AgentError) -> Int32 {
        do {
            return try Socket.connectUnix(path: path, timeoutMs: timeoutMs, interrupted: interrupted)
        } catch {
            let e = error.errno
            switch e {
            case .ENOENT:
                throw AgentError(.unreachable, "no such socket: \(path)", errno: e)
            case .ECONNREFUSED:
                if let st = try? Stat.of(path: path), st.kind != .socket {
                    throw AgentError(.unreachable, "not a socket: \(path)", errno: e)
                }
                throw AgentError(.unreachable, "no agent listening on \(address.spoken) (connection refused)", errno: e)
            case .EACCES, .EPERM:
                throw AgentError(.unreachable, "permission denied: \(path)", errno: e)
            case .ECANCELED:
                throw AgentError(.unreachable, "stopped connecting to \(address.spoken), whose backlog was full (it had not taken the connection)", errno: e)
            case .ETIMEDOUT:
                throw AgentError(.timeout, "\(address.spoken) did not accept the connection within \(TimeSpan(milliseconds: Int64(timeoutMs)).human)", errno: e)
            default:
                throw AgentError(.unreachable, "cannot connect to \(address.spoken): \(e)", errno: e)
            }
        }
    }

    /// The kernel sends a vsock connection that no local transport serves to this machine's own
    /// hypervisor (the guest-to-host transport): CID 1 without vsock_loopback, any guest CID
    /// without vhost_vsock. That is never the agent we want, so refuse before connecting.
    static func vsockRefusal(cid: UInt32, exists: (String) -> Bool = fileExists) -> String? {
        if cid == 1 {
            guard exists("/sys/module/vsock_loopback") else {
                return "vsock CID 1 (local loopback) needs the vsock_loopback module; without it the kernel would send the connection to this machine's hypervisor"
            }
        } else if !exists("/dev/vhost-vsock") && !exists("/sys/module/vhost_vsock") {
            return "no guest is reachable by vsock from this machine (no /dev/vhost-vsock: load vhost_vsock); for Firecracker or Cloud Hypervisor use hvsock:UDS_PATH:PORT"
        }
        return nil
    }

    static func fileExists(_ path: String) -> Bool { (try? Stat.of(path: path)) != nil }

    private static func vsockError(_ error: SystemError, cid: UInt32, port: UInt32, timeoutMs: Int64) -> AgentError {
        let e = error.errno
        if error.operation == "socket" {
            return AgentError(.unreachable, "vsock is not available on this machine (\(e.name)): load the vhost_vsock module", errno: e)
        }
        switch e {
        case .ECONNREFUSED, .ECONNRESET:
            return AgentError(.unreachable, "no agent listening on vsock \(cid):\(port)", errno: e)
        case .ETIMEDOUT:
            return AgentError(.timeout, "no agent answered on vsock \(cid):\(port) within \(TimeSpan(milliseconds: timeoutMs).human)", errno: e)
        case .ENODEV, .EHOSTUNREACH, .ENETUNREACH, .EADDRNOTAVAIL:
            return AgentError(.unreachable, "no guest with vsock CID \(cid) (\(e.name))", errno: e)
        default:
            return AgentError(.unreachable, "cannot connect to vsock \(cid):\(port): \(e)", errno: e)
        }
    }

    /// Firecracker / Cloud Hypervisor: send `CONNECT <port>\n`, expect `OK <hostport>\n`.
    /// Returns any bytes received after that line.
    static func hybridHandshake(fd: Int32, path: String, port: UInt32, deadline: UInt64, timeoutMs: Int64) throws(AgentError) -> [UInt8] {
        let subject = "hybrid vsock \(path) port \(port)"
        do {
            try Socket.sendAll(fd, Array("CONNECT \(port)\n".utf8), timeoutMs: Int32(clamping: timeoutMs))
        } catch {
            throw AgentError(.unreachable, "\(subject): cannot send CONNECT: \(error.errno)", errno: error.errno)
        }
        var line: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 256)
        while true {
            let now = monotonicNanos()
            let remaining = now >= deadline ? 0 : Int32(clamping: (deadline - now + 999_999) / 1_000_000)
            let ready: PollEvents
            do { ready = try FD.poll(fd, for: .readable, timeoutMs: remaining) } catch {
                throw AgentError(.unreachable, "\(subject): \(error.errno)", errno: error.errno)
            }
            if ready.isEmpty {
                throw AgentError(.timeout, "\(subject): no answer to CONNECT within \(TimeSpan(milliseconds: timeoutMs).human)")
            }
            let n: Int
            do { n = try readSome(fd, into: &chunk) } catch {
                if error.errno == .ECONNRESET { n = 0 } else {
                    throw AgentError(.unreachable, "\(subject): \(error.errno)", errno: error.errno)
                }
            }
            if n == 0 {
                throw AgentError(.unreachable, "no agent listening on port \(port) in the guest behind \(path) (the VM closed the connection after CONNECT)")
            }
            line.append(contentsOf: chunk[0..<n])
            if let nl = line.firstIndex(of: 0x0A) {
                var text = String(decoding: line[..<nl], as: UTF8.self)
                if text.hasSuffix("\r") { text.removeLast() }
                let leftover = Array(line[(nl + 1)...])
                let parts = text.split(separator: " ")
                guard parts.count == 2, parts[0] == "OK", UInt32(parts[1]) != nil else {
                    throw AgentError(.protocolViolation, "\(path) answered \"\(printable(text))\" to CONNECT \(port): expected \"OK <port>\" (is it a Firecracker or Cloud Hypervisor vsock socket?)")
                }
                return leftover
            }
            if line.count > 128 {
                throw AgentError(.protocolViolation, "\(path) answered CONNECT \(port) with a long line that is not \"OK <port>\": \"\(printable(String(decoding: line.prefix(60), as: UTF8.self)))…\"")
            }
        }
    }

    // MARK: - I/O for the owning thread

    enum Received {
        case data([UInt8])
        case timeout
        case closed
    }

    /// Reads what is available, waiting until the monotonic `deadline`.
    func receive(deadline: UInt64) throws(AgentError) -> Received {
        var buffer = [UInt8](repeating: 0, count: 16_384)
        while true {
            let now = monotonicNanos()
            let remaining = now >= deadline ? 0 : Int32(clamping: (deadline - now + 999_999) / 1_000_000)
            let ready: PollEvents
            do { ready = try FD.poll(fd, for: .readable, timeoutMs: remaining) } catch {
                throw AgentError(.disconnected, "connection to \(address.spoken) failed: \(error.errno)", errno: error.errno)
            }
            if ready.isEmpty { return .timeout }
            if ready.contains(.invalid) { return .closed }
            do {
                let n = try readSome(fd, into: &buffer)
                if n == 0 { return .closed }
                return .data(Array(buffer[0..<n]))
            } catch {
                switch error.errno {
                case .EAGAIN: continue
                case .ECONNRESET, .EPIPE, .ENOTCONN, .EBADF: return .closed
                default: throw AgentError(.disconnected, "connection to \(address.spoken) failed: \(error.errno)", errno: error.errno)
                }
            }
        }
    }

    /// What ended `waitForIncoming`.
    struct Readiness {
        /// The agent sent bytes or closed the connection (or polling it failed): `receive` says which.
        var incoming: Bool
        /// `wake` was signalled.
        var woken: Bool
    }

    /// Sleeps until the agent sends something or closes the connection, `wake` is signalled,
    /// or the monotonic `deadline` passes (both false then), without reading: one poll(2) on the
    /// socket and the eventfd, with no timer in between. `watching` false waits for `wake` and
    /// the deadline only (a connection already known to be lost would be ready at once).
    func waitForIncoming(watching: Bool, or wake: Wakeup, deadline: UInt64) -> Readiness {
        let now = monotonicNanos()
        let timeoutMs = now >= deadline ? 0 : Int32(clamping: (deadline - now + 999_999) / 1_000_000)
        let socket = open.withLock { $0 } && watching ? fd : -1
        guard let ready = try? FD.poll([(fd: socket, events: .readable), (fd: wake.fd, events: .readable)], timeoutMs: timeoutMs)
        else { return Readiness(incoming: watching, woken: false) }
        return Readiness(incoming: !ready[0].isEmpty, woken: !ready[1].isEmpty)
    }

    /// Sends bytes; `timeoutMs` bounds the wait for an agent that stopped reading.
    func send(_ bytes: [UInt8], timeoutMs: Int64) throws(AgentError) {
        do {
            try Socket.sendAll(fd, bytes, timeoutMs: Int32(clamping: timeoutMs))
        } catch {
            switch error.errno {
            case .ETIMEDOUT:
                throw AgentError(.timeout, "\(address.spoken) stopped reading (send blocked for \(TimeSpan(milliseconds: timeoutMs).human))", errno: error.errno)
            default:
                throw AgentError(.disconnected, "connection to \(address.spoken) dropped (\(error.errno.name))", errno: error.errno)
            }
        }
    }

    /// Wakes a thread blocked reading or writing this connection; the agent sees it close.
    /// Safe from any thread, and after `close`.
    public func shutdown() {
        open.withLock { isOpen in
            if isOpen { Socket.shutdown(fd) }
        }
    }

    /// Closes the descriptor (once).
    public func close() {
        open.withLock { isOpen in
            if isOpen {
                isOpen = false
                FD.close(fd)
            }
        }
    }
}

/// One read into `buffer`; 0 at end of stream.
private func readSome(_ fd: Int32, into buffer: inout [UInt8]) throws(SystemError) -> Int {
    var result: Result<Int, SystemError> = .success(0)
    buffer.withUnsafeMutableBytes { b in
        do throws(SystemError) { result = .success(try FD.read(fd, into: b)) } catch { result = .failure(error) }
    }
    return try result.get()
}

/// A short, printable rendering of untrusted text for error messages.
func printable(_ s: String, limit: Int = 60) -> String {
    var out = ""
    for u in s.unicodeScalars {
        if out.count >= limit { out += "…"; break }
        out += (u.value < 0x20 || u.value == 0x7F) ? "." : String(u)
    }
    return out
}
