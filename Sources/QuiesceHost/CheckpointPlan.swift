// What a checkpoint is asked to do: the agents, the limits, COMMAND, and what to do when an agent fails.
import QuiesceLinux

/// What to do when an agent cannot be reached or cannot freeze.
public enum AgentFailurePolicy: String, Sendable, CaseIterable {
    /// Thaw the others and do not run COMMAND.
    case fail
    /// Run COMMAND anyway; that guest's checkpoint is only crash-consistent, and the output says so.
    case crashConsistent = "crash-consistent"
}

/// Everything a checkpoint needs to know before it starts.
public struct CheckpointPlan: Sendable {
    /// Names the freeze on every agent; thaw and keepalive refer to it.
    public var opID: String
    public var agents: [AgentAddress]
    /// Mountpoints to freeze on every agent; nil freezes everything in each agent's scope.
    public var mounts: [String]?
    /// How long COMMAND may run while the guests are frozen. Past it, COMMAND is stopped and
    /// the guests are thawed.
    public var timeoutMs: Int64
    /// How long an agent keeps a guest frozen without hearing from us; renewed by keepalives
    /// every third of it. Bounds the freeze when quiescectl is stopped or hangs.
    public var leaseMs: Int64
    /// Between SIGTERM and SIGKILL when COMMAND must stop.
    public var killGraceMs: Int64
    public var policy: AgentFailurePolicy
    public var connectTimeoutMs: Int64
    public var replyTimeoutMs: Int64
    /// How long guests already frozen wait for the others: once the first agent is frozen, an
    /// agent that has not answered its freeze within this time counts as failed (`policy`
    /// decides), and its connection is dropped so that a late freeze thaws. One slow or hostile
    /// agent cannot keep the other guests frozen beyond this.
    public var freezeWaitMs: Int64
    /// COMMAND and its arguments, as shown (read as UTF-8).
    public var command: [String]
    /// COMMAND and its arguments as given, byte for byte: what the child gets (an argument
    /// that is not UTF-8, such as a file name, reaches it unchanged).
    public var commandArguments: [[UInt8]]
    /// Send COMMAND's standard output to our standard error (keeps --json output clean).
    public var commandStdoutToStderr: Bool
    /// The environment COMMAND inherits ("NAME=value" bytes), before the QUIESCE_* variables
    /// are added.
    public var baseEnvironment: [[UInt8]]

    public init(opID: String = CheckpointPlan.makeOpID(), agents: [AgentAddress], mounts: [String]? = nil,
                timeoutMs: Int64 = 60_000, leaseMs: Int64? = nil, killGraceMs: Int64 = 5000,
                policy: AgentFailurePolicy = .fail, connectTimeoutMs: Int64 = 5000, replyTimeoutMs: Int64 = 30_000,
                freezeWaitMs: Int64? = nil,
                command: [String], commandArguments: [[UInt8]]? = nil, commandStdoutToStderr: Bool = false,
                baseEnvironment: [[UInt8]] = []) {
        self.opID = opID
        self.agents = agents
        self.mounts = mounts
        self.timeoutMs = timeoutMs
        self.leaseMs = leaseMs ?? CheckpointPlan.defaultLease(timeoutMs: timeoutMs)
        self.killGraceMs = killGraceMs
        self.policy = policy
        self.connectTimeoutMs = connectTimeoutMs
        self.replyTimeoutMs = replyTimeoutMs
        self.freezeWaitMs = freezeWaitMs ?? CheckpointPlan.defaultFreezeWait(replyTimeoutMs: replyTimeoutMs)
        self.command = command
        self.commandArguments = commandArguments ?? command.map { Array($0.utf8) }
        self.commandStdoutToStderr = commandStdoutToStderr
        self.baseEnvironment = baseEnvironment
    }

    /// The freeze wait when none is given: the reply timeout, but at most 10 s.
    public static func defaultFreezeWait(replyTimeoutMs: Int64) -> Int64 { min(replyTimeoutMs, 10_000) }

    /// The lease when none is given: the timeout, but at most 10 s.
    public static func defaultLease(timeoutMs: Int64) -> Int64 { min(timeoutMs, 10_000) }

    /// A fresh operation id: "qc-<epoch ms>-<8 hex digits, random>", always 25 or more characters
    /// of the same shape, so ids line up in logs and sort by time.
    public static func makeOpID() -> String {
        let suffix = String(UInt32.random(in: 0...UInt32.max), radix: 16)
        return "qc-\(wallClockMillis())-\(String(repeating: "0", count: 8 - suffix.count))\(suffix)"
    }
}
