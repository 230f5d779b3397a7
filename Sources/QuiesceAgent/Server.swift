// The agent's listeners and sessions: what every listener shares (the session table, the state actor, hello).
import QuiesceLinux
import QuiesceProtocol
import Logging
import Synchronization

/// The agent's listeners and the sessions they admitted: accepting and admission
/// (`Admission.swift`), virtio-serial ports (`SerialPortListener.swift`), Hyper-V's VSS device
/// (`HVVSSService.swift`); each session's pipeline is a `ClientSession`.
///
/// Each session has a thread that reads and decodes; `hello`, `ping`, `status` and
/// `filesystems` are answered at once, while freeze, thaw, sync and keepalive run in order per
/// session. Replies and events are queued to a per-session writer thread (callers never
/// block), so a peer that stops reading cannot stall the agent; it is cut off at 1 MiB unread.
public final class Server: Sendable {
    let config: AgentConfig
    let logger: Logger
    /// How long a connection must have been idle (nothing sent either way, nothing unanswered,
    /// no bound freeze) before a new connection past max-connections may close it, in ns.
    static let idleToClose: UInt64 = 30_000_000_000

    /// Every admitted session, by id (admission counts them against `max-connections`).
    let connections = Mutex<[ConnectionID: ClientSession]>([:])
    let nextID = Atomic<UInt64>(1)
    private let stateBox = Mutex<AgentState?>(nil)
    /// The private qemu-ga that qga listeners pass unknown commands to (`qga-forward`).
    let qgaForwarder: QGAForwarder?
    /// Set by `drainOutput`: from then on a session's writer reports each time it has written
    /// everything queued, or was cut off, through `outputDrained`.
    let draining = Atomic<Bool>(false)
    /// Refused connections are logged at most once a second, with how many went unlogged.
    let refusalLog = LogThrottle(intervalNanos: 1_000_000_000)
    let outputDrained = Mailbox<Void>()
    /// What socket connections of qemu-ga's dialect may hold at once of commands over 64 KiB,
    /// being read or waiting their turn (only the part over 64 KiB counts). Each may be up to
    /// `ProtocolLimits.maxQGAFrameBytes`; without a shared bound, 32 connections sending 16 MiB
    /// commands held about 580 MB. Serial sessions, one per port and the host's own channel,
    /// are not counted against it.
    let largeCommands = ByteBudget(capacity: Server.largeCommandBytes)
    /// Twice the largest command: one connection's command being read and the one before it
    /// waiting its turn, or two connections' commands.
    static let largeCommandBytes = 2 * ProtocolLimits.maxQGAFrameBytes

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

    /// Sends an event to every connection that completed `hello`, except `except` (a requester
    /// that gets the reply instead).
    public func broadcast(_ event: Event, except: ConnectionID? = nil) {
        let targets = connections.withLock { Array($0.values) }
        for c in targets where c.helloDone && c.id != except { c.send(event.frame) }
    }

    /// Waits (up to `timeoutMs`) until every connection has written what is queued for it, so
    /// that the last replies and events (a `thawed` with reason `signal`) go out before exit.
    /// Sleeps on the writers' reports (`outputDrained`), with no polling.
    public func drainOutput(timeoutMs: Int64) {
        let deadline = monotonicNanos() + UInt64(max(0, timeoutMs)) * 1_000_000
        draining.store(true, ordering: .sequentiallyConsistent)
        while connections.withLock({ $0.values.contains { $0.hasQueuedOutput } }) {
            if outputDrained.receive(deadlineNanos: deadline) == nil { return }
        }
    }

    /// Called by a session's writer when it has nothing left queued (written or cut off).
    func sessionOutputDrained() {
        if draining.load(ordering: .sequentiallyConsistent) { outputDrained.post(()) }
    }

    // MARK: - Requests

    func remove(_ conn: ClientSession) {
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
                                    agentVersion: QuiesceRelease.version, capabilities: Server.capabilities,
                                    maxFrame: Int64(ProtocolLimits.maxFrameBytes), maxFreezeMs: config.maxFreezeMs))
    }

    static let capabilities = ["events", "freeze-list", "bound-freeze", "detached-freeze", "keepalive", "sync",
                               "op-id-replay", "parallel-freeze", "stacking-order", "hooks"]
}

/// Lets a repeated log line through at most once per interval, counting what it held back.
final class LogThrottle: Sendable {
    private let intervalNanos: UInt64
    private let state = Mutex<(last: UInt64, held: Int)>((0, 0))

    init(intervalNanos: UInt64) { self.intervalNanos = intervalNanos }

    /// Nil to stay quiet; else how many occurrences were held back since the last line logged.
    func note(now: UInt64) -> Int? {
        state.withLock { s in
            if s.last != 0 && now &- s.last < intervalNanos {
                s.held += 1
                return nil
            }
            let held = s.held
            s = (now, 0)
            return held
        }
    }
}

/// A count of bytes shared by threads, never above `capacity`.
final class ByteBudget: Sendable {
    let capacity: Int
    private let used = Atomic<Int>(0)

    init(capacity: Int) { self.capacity = capacity }

    /// Takes `bytes` if they fit; false (nothing taken) if not.
    func reserve(_ bytes: Int) -> Bool {
        guard bytes > 0 else { return true }
        var current = used.load(ordering: .relaxed)
        while true {
            guard current + bytes <= capacity else { return false }
            let (done, seen) = used.compareExchange(expected: current, desired: current + bytes, ordering: .relaxed)
            if done { return true }
            current = seen
        }
    }

    /// Gives back what `reserve` took.
    func release(_ bytes: Int) {
        if bytes > 0 { used.subtract(bytes, ordering: .relaxed) }
    }

    /// Bytes taken now.
    var inUse: Int { used.load(ordering: .relaxed) }
}
