// What can go wrong talking to an agent, in words an operator can act on.
import QuiesceLinux
import QuiesceProtocol

/// An error reaching or talking to an agent: a `code` to branch on, a message that names the
/// address, and the agent's own error when it answered with one.
public struct AgentError: Error, Sendable, CustomStringConvertible {
    /// The kind of failure. Extensible: compare with the static members.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Value: String, Hashable, Sendable {
            case unreachable, timeout, disconnected, protocolViolation = "protocol", incompatible, refused
        }
        private let value: Value
        private init(_ value: Value) { self.value = value }

        /// Nothing answers at the address (no socket, connection refused, no such guest).
        public static let unreachable = Code(.unreachable)
        /// The agent did not answer in time.
        public static let timeout = Code(.timeout)
        /// The connection dropped.
        public static let disconnected = Code(.disconnected)
        /// The peer sent something that is not the quiesce protocol.
        public static let protocolViolation = Code(.protocolViolation)
        /// The agent speaks a protocol version this tool cannot.
        public static let incompatible = Code(.incompatible)
        /// The agent answered with an error (see `remote`).
        public static let refused = Code(.refused)

        public var description: String { value.rawValue }
    }

    public let code: Code
    public let message: String
    /// The agent's error reply, for `.refused`.
    public let remote: ProtocolError?
    /// The system error underneath, if any.
    public let errno: Errno?
    /// A freeze whose outcome was unknown and whose undo failed: the guest may still be frozen.
    /// A checkpoint counts it as a thaw it could not confirm (exit 72), not a plain failed freeze.
    public var mayBeFrozen = false
    /// A thaw written to qemu-ga whose answer did not come in time: it waits in qemu-ga's
    /// channel and is carried out in its turn (after a freeze qemu-ga is still inside).
    public var thawQueued = false

    /// The longest `message` kept, in characters, when it carries an agent's error (`remote`):
    /// that text is the guest's to choose, and a timeline repeats it. The report's JSON keeps
    /// the agent's whole message. Messages of our own (the thaw command to run) are never cut.
    public static let maxMessageCharacters = 600

    public init(_ code: Code, _ message: String, remote: ProtocolError? = nil, errno: Errno? = nil) {
        self.code = code
        self.message = remote == nil || message.count <= AgentError.maxMessageCharacters ? message
            : String(message.prefix(AgentError.maxMessageCharacters)) + "… (\(message.count) characters; --json has the agent's whole message)"
        self.remote = remote
        self.errno = errno
    }

    public var description: String { message }

    /// The JSON form used in reports: code, message, and the agent's error code and details.
    public var json: JSON {
        var o: JSONObject = ["kind": .string(code.description), "message": .string(message)]
        if let remote {
            o["code"] = .string(remote.code.rawValue)
            o["agent_message"] = .string(remote.message)
            if let d = remote.details { o["details"] = .object(d) }
        }
        if let errno { o["errno"] = .string(errno.name) }
        return .object(o)
    }
}
