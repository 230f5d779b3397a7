// Real quiesced processes and a minimal blocking protocol client for tests.
import Foundation
import QuiesceLinux
import QuiesceProtocol

/// The directory holding the built executables (next to the test bundle).
public let buildProductsDir: String = {
    let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    var dir = URL(fileURLWithPath: exe).deletingLastPathComponent()
    // The test binary may live inside a .xctest bundle directory.
    while dir.path != "/" && !FileManager.default.fileExists(atPath: dir.appendingPathComponent("quiesced").path) {
        dir = dir.deletingLastPathComponent()
    }
    return dir.path
}()

/// A quiesced process serving a lab, with its socket and state directory inside the lab.
public final class AgentProcess: @unchecked Sendable {
    public let process = Process()
    public let socketPath: String
    public let stateDir: String
    public let logPath: String

    /// Starts quiesced with `--listen unix:<dir>/agent.sock --state-dir <dir>/state` plus `arguments`
    /// (tests always add an include scope or explicit mounts), and waits until it answers.
    /// `launcher`, when given, runs first and is handed quiesced's path and arguments (e.g.
    /// `unshare -m ... sh -c 'SETUP; exec "$@"' sh`); `startTimeoutMs` bounds the wait.
    public init(in dir: String, name: String = "agent", arguments: [String], environment: [String: String]? = nil,
                stateDir: String? = nil, launcher: [String] = [], startTimeoutMs: Int = 10_000) throws {
        socketPath = "\(dir)/\(name).sock"
        self.stateDir = stateDir ?? "\(dir)/\(name)-state"
        logPath = "\(dir)/\(name).log"
        guard FileManager.default.createFile(atPath: logPath, contents: nil),
              let log = FileHandle(forWritingAtPath: logPath) else { throw LabError("cannot create the agent's log \(logPath)") }
        let agentArguments = ["--config", "/dev/null", "--listen", "unix:\(socketPath)", "--state-dir", self.stateDir] + arguments
        if let first = launcher.first {
            process.executableURL = URL(fileURLWithPath: first)
            process.arguments = Array(launcher.dropFirst()) + ["\(buildProductsDir)/quiesced"] + agentArguments
        } else {
            process.executableURL = URL(fileURLWithPath: "\(buildProductsDir)/quiesced")
            process.arguments = agentArguments
        }
        if let environment { process.environment = environment }
        process.standardError = log
        process.standardOutput = log
        try process.run()
        try waitUntilAnswering(timeoutMs: startTimeoutMs)
    }

    public func waitUntilAnswering(timeoutMs: Int = 10_000) throws {
        let deadline = Date().addingTimeInterval(Double(timeoutMs) / 1000)
        while Date() < deadline {
            if let c = try? TestClient(path: socketPath), (try? c.call(["op": "ping"])) != nil { return }
            if !process.isRunning { throw LabError("quiesced exited: \(log)") }
            usleep(20_000)
        }
        throw LabError("quiesced did not answer within \(timeoutMs) ms: \(log)")
    }

    public var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }
    public var pid: Int32 { process.processIdentifier }

    /// Only while it runs: a reaped pid may be another process by now.
    public func signal(_ sig: Int32) { if process.isRunning { kill(process.processIdentifier, sig) } }

    /// Waits for exit; returns the status, or nil on timeout.
    public func waitForExit(timeoutMs: Int = 10_000) -> Int32? {
        let deadline = Date().addingTimeInterval(Double(timeoutMs) / 1000)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        return process.isRunning ? nil : process.terminationStatus
    }

    public func stop() {
        if process.isRunning {
            process.terminate()
            if waitForExit(timeoutMs: 5000) == nil { signal(SIGKILL); _ = waitForExit() }
        }
    }

    deinit { stop() }
}

/// Waits up to 3 s for a socket file, or throws. The agent creates its listeners one after
/// another: a second listener's socket (qga+unix:) may come a moment after the one
/// AgentProcess waits for.
public func waitForSocket(_ path: String) throws {
    for _ in 0..<300 where !FileManager.default.fileExists(atPath: path) { usleep(10_000) }
    guard FileManager.default.fileExists(atPath: path) else { throw LabError("no socket at \(path) within 3 s") }
}

/// Writes to a peer that has gone (the agent, or a client under test) fail with EPIPE instead
/// of killing the test process.
public let ignoreSIGPIPE: Void = { signal(SIGPIPE, SIG_IGN) }()

/// A blocking line-protocol client: send a request, read frames until the reply with its id.
public final class TestClient: @unchecked Sendable {
    public let fd: Int32
    private var decoder = FrameDecoder(maxFrameBytes: 1 << 20)
    private var nextID: Int64 = 1
    public private(set) var events: [Event] = []

    public init(path: String, timeoutMs: Int32 = 2000) throws {
        _ = ignoreSIGPIPE
        fd = try Socket.connectUnix(path: path, timeoutMs: timeoutMs)
    }

    deinit { FD.close(fd) }

    public func close() { Socket.shutdown(fd) }

    public func sendRaw(_ bytes: [UInt8]) throws { try FD.writeAll(fd, bytes, timeoutMs: 5000) }

    /// The raw bytes the agent sends until it closes the connection; throws when it has not
    /// closed it within `timeoutMs`.
    public func readAll(timeoutMs: Int32) throws -> [UInt8] {
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        let end = monotonicNanos() + UInt64(timeoutMs) * 1_000_000
        while true {
            let now = monotonicNanos()
            guard now < end else { throw LabError("the connection is still open after \(timeoutMs) ms (\(out.count) bytes read)") }
            if try FD.poll(fd, for: .readable, timeoutMs: Int32((end - now) / 1_000_000 + 1)).isEmpty { continue }
            switch FD.readSome(fd, into: &buffer) {
            case .success(0): return out
            case .success(let n): out += buffer[0..<n]
            case .failure(let e) where e == .ECONNRESET: return out
            case .failure(let e): throw LabError("read: \(e)")
            }
        }
    }

    /// Sends `request` (an object without id; one is added) and returns the matching reply.
    public func call(_ request: JSON, timeoutMs: Int32 = 30_000) throws -> Reply {
        guard case .object(var o) = request else { throw LabError("request must be an object") }
        let id = nextID
        nextID += 1
        o["id"] = .int(id)
        var frame = JSON.object(o).encoded()
        frame.append(0x0A)
        try sendRaw(frame)
        while true {
            switch try readMessage(timeoutMs: timeoutMs) {
            case .reply(let r) where r.id == .int(id) || r.id == nil: return r
            case .reply: continue
            case .event(let e): events.append(e)
            }
        }
    }

    /// The result object of a successful call, or a thrown error naming the agent's error.
    public func result(_ request: JSON, timeoutMs: Int32 = 30_000) throws -> JSONObject {
        let r = try call(request, timeoutMs: timeoutMs)
        switch r.outcome {
        case .success(let o): return o
        case .failure(let e): throw LabError("agent error \(e.code): \(e.message)")
        }
    }

    /// Reads the next message (reply or event).
    public func readMessage(timeoutMs: Int32) throws -> AgentMessage {
        while true {
            if let ev = decoder.next() {
                guard case .frame(let bytes) = ev else { continue }
                return try AgentMessage.decode(frame: bytes)
            }
            let ready = try FD.poll(fd, for: .readable, timeoutMs: timeoutMs)
            if ready.isEmpty { throw LabError("no message within \(timeoutMs) ms") }
            var buf = [UInt8](repeating: 0, count: 65536)
            let n = try buf.withUnsafeMutableBytes { try FD.read(fd, into: $0) }
            if n == 0 { throw LabError("connection closed by the agent") }
            decoder.feed(buf[0..<n])
        }
    }

    /// Takes whatever the agent has sent so far without waiting, decoded. Throws when a frame
    /// is not a valid reply or event; `closed` is true once the agent has closed the connection.
    public func drain() throws -> (messages: [AgentMessage], closed: Bool) {
        let (frames, closed) = try drainFrames()
        return (try frames.map { try AgentMessage.decode(frame: $0) }, closed)
    }

    /// Takes whatever complete lines the agent has sent so far, without waiting and without
    /// decoding them (qemu-ga's dialect, too). A 0xFF before a line (guest-sync-delimited) is
    /// skipped; a line over the decoder's limit throws.
    public func drainFrames() throws -> (frames: [[UInt8]], closed: Bool) {
        var frames: [[UInt8]] = []
        var closed = false
        var buf = [UInt8](repeating: 0, count: 65536)
        while !closed, let ready = try? FD.poll(fd, for: .readable, timeoutMs: 0), !ready.isEmpty {
            guard let n = try? buf.withUnsafeMutableBytes({ try FD.read(fd, into: $0) }), n > 0 else { closed = true; break }
            decoder.feed(buf[0..<n])
        }
        while let ev = decoder.next() {
            switch ev {
            case .frame(let bytes): frames.append(bytes)
            case .reset: continue
            case .tooLarge: throw LabError("the agent sent a line over the decoder's limit")
            }
        }
        return (frames, closed)
    }

    /// Waits for an event with the given name (events seen during calls count too).
    public func waitForEvent(_ name: String, timeoutMs: Int32) throws -> Event {
        if let i = events.firstIndex(where: { $0.name == name }) { return events.remove(at: i) }
        let deadline = Date().addingTimeInterval(Double(timeoutMs) / 1000)
        while Date() < deadline {
            let left = Int32(max(1, deadline.timeIntervalSinceNow * 1000))
            if case .event(let e) = try readMessage(timeoutMs: left), e.name == name { return e }
        }
        throw LabError("no \(name) event within \(timeoutMs) ms")
    }

    /// True when the agent closed the connection (EOF) within `timeoutMs`.
    public func isClosedByPeer(timeoutMs: Int32) -> Bool {
        let deadline = Date().addingTimeInterval(Double(timeoutMs) / 1000)
        var buf = [UInt8](repeating: 0, count: 65536)
        while Date() < deadline {
            guard let ready = try? FD.poll(fd, for: .readable, timeoutMs: 100) else { return true }
            if ready.isEmpty { continue }
            guard let n = try? buf.withUnsafeMutableBytes({ try FD.read(fd, into: $0) }) else { return true }
            if n == 0 { return true }
        }
        return false
    }
}

extension JSONObject {
    /// Mountpoints of the "filesystems" array of a result.
    public var mountPoints: [String] {
        (self["filesystems"]?.arrayValue ?? []).compactMap { $0["mountpoint"]?.stringValue ?? $0.stringValue }
    }
}
