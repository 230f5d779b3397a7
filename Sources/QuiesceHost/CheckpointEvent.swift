// What agent sessions, the COMMAND waiter and the signal handler tell a checkpoint run.
import QuiesceProtocol

/// What happened to one agent, as the coordinator saw it.
public enum AgentStage: String, Sendable {
    /// Connecting and hello.
    case connect
    case freeze, keepalive, thaw
    /// Any other one-shot request (ping, status, filesystems, sync).
    case request
}

/// Messages from agent sessions, the command waiter and the signal thread to the coordinator.
enum CheckpointEvent: Sendable {
    case connected(Int, HelloResult, UInt64)
    case frozen(Int, FreezeResult, UInt64)
    case failed(Int, AgentStage, AgentError, UInt64)
    case keepaliveFailed(Int, AgentError, UInt64)
    case keepaliveLate(Int, AgentError, UInt64)
    /// The connection dropped while the guest should have been frozen.
    case connectionLost(Int, AgentError, UInt64)
    case agentEvent(Int, QuiesceProtocol.Event, UInt64)
    case thawed(Int, SessionEnd, UInt64)
    case childExited(UInt64)
    case signal(Int32, UInt64)

    /// The agent session the event comes from, if any.
    var agent: Int? {
        switch self {
        case .connected(let i, _, _), .frozen(let i, _, _), .failed(let i, _, _, _), .keepaliveFailed(let i, _, _),
             .keepaliveLate(let i, _, _), .connectionLost(let i, _, _), .agentEvent(let i, _, _), .thawed(let i, _, _):
            return i
        case .childExited, .signal:
            return nil
        }
    }
}
