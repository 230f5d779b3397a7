// The closed set of error codes that travel on the wire, and the error value that carries one.

/// A wire error code. A struct rather than an enum so new codes do not break callers;
/// `ErrorCode.all` is the set this protocol version defines.
public struct ErrorCode: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: String
    public init(rawValue: String) { self.rawValue = rawValue }
    public var description: String { rawValue }

    /// The frame is valid JSON but not a valid request (missing or mistyped field), or not JSON.
    public static let badRequest = ErrorCode(rawValue: "bad-request")
    /// The frame exceeded the maximum frame size.
    public static let frameTooLarge = ErrorCode(rawValue: "frame-too-large")
    /// The operation name is not one this agent knows.
    public static let unknownOp = ErrorCode(rawValue: "unknown-op")
    /// `hello` asked for a protocol version this agent cannot speak.
    public static let unsupportedVersion = ErrorCode(rawValue: "unsupported-version")
    /// Another freeze or thaw is in progress, or the state forbids the operation now.
    public static let busy = ErrorCode(rawValue: "busy")
    /// A freeze was asked while frozen by a different operation.
    public static let alreadyFrozen = ErrorCode(rawValue: "already-frozen")
    /// The operation needs a freeze (keepalive, thaw of a named operation) and there is none.
    public static let notFrozen = ErrorCode(rawValue: "not-frozen")
    /// A named mountpoint is not a mountpoint.
    public static let unknownMount = ErrorCode(rawValue: "unknown-mount")
    /// A named mountpoint cannot be frozen (pseudo, network, read-only, unsupported).
    public static let ineligibleMount = ErrorCode(rawValue: "ineligible-mount")
    /// A filesystem refused to freeze; everything this operation froze was thawed again.
    public static let freezeFailed = ErrorCode(rawValue: "freeze-failed")
    /// A filesystem was already frozen by someone else (EBUSY); nothing stays frozen by us.
    public static let frozenElsewhere = ErrorCode(rawValue: "frozen-elsewhere")
    /// At least one filesystem failed to thaw (every other one was still thawed).
    public static let thawFailed = ErrorCode(rawValue: "thaw-failed")
    /// syncfs reported an error.
    public static let syncFailed = ErrorCode(rawValue: "sync-failed")
    /// A freeze hook failed or timed out; the freeze was not taken.
    public static let hookFailed = ErrorCode(rawValue: "hook-failed")
    /// The agent lacks the privilege (CAP_SYS_ADMIN), or the peer is not allowed.
    public static let permissionDenied = ErrorCode(rawValue: "permission-denied")
    /// The peer sent requests faster than allowed.
    public static let rateLimited = ErrorCode(rawValue: "rate-limited")
    /// The agent is stopping.
    public static let shuttingDown = ErrorCode(rawValue: "shutting-down")
    /// A bug or an unexpected condition in the agent.
    public static let `internal` = ErrorCode(rawValue: "internal")

    /// Every code protocol version 1 defines.
    public static let all: [ErrorCode] = [
        .badRequest, .frameTooLarge, .unknownOp, .unsupportedVersion, .busy, .alreadyFrozen, .notFrozen,
        .unknownMount, .ineligibleMount, .freezeFailed, .frozenElsewhere, .thawFailed, .syncFailed,
        .hookFailed, .permissionDenied, .rateLimited, .shuttingDown, .internal,
    ]
}

/// An error reply: a code, a human message, and optional structured details
/// (e.g. the mountpoint and errno name that made a freeze fail).
public struct ProtocolError: Error, Sendable, Equatable, CustomStringConvertible {
    public var code: ErrorCode
    public var message: String
    public var details: JSONObject?

    public init(_ code: ErrorCode, _ message: String, details: JSONObject? = nil) {
        self.code = code
        self.message = message
        self.details = details
    }

    public var description: String { "\(code): \(message)" }

    public var json: JSON {
        var o: JSONObject = ["code": .string(code.rawValue), "message": .string(message)]
        if let details { o["details"] = .object(details) }
        return .object(o)
    }

    public init(json: JSON) throws(ProtocolError) {
        guard let code = json["code"]?.stringValue, let message = json["message"]?.stringValue else {
            throw ProtocolError(.badRequest, "error object needs \"code\" and \"message\" strings")
        }
        self.init(ErrorCode(rawValue: code), message, details: json["details"]?.objectValue)
    }
}
