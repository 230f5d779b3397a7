// Where an agent listens, as written on the command line: unix:, vsock:, hvsock:, serial: or qga:unix:.

/// The address of one guest agent.
public enum AgentAddress: Sendable, Hashable, CustomStringConvertible {
    /// A Unix stream socket the agent listens on (e.g. a socket shared into a container or VM).
    case unix(path: String)
    /// AF_VSOCK: the guest's context id and the agent's port.
    case vsock(cid: UInt32, port: UInt32)
    /// Firecracker / Cloud Hypervisor hybrid vsock: the VM's Unix socket on the host and the
    /// guest port to ask for with `CONNECT <port>`.
    case hybridVsock(path: String, port: UInt32)
    /// The host end of a virtio-serial port: the Unix socket of a QEMU chardev. There is no
    /// connection boundary, so the client resynchronises before use.
    case serial(path: String)
    /// qemu-guest-agent (qemu-ga), not quiesced, behind the Unix socket of a QEMU chardev:
    /// spoken to in qemu-ga's own protocol, with what that protocol can do (no deadline).
    case qga(path: String)

    /// The forms accepted, for help texts and error messages.
    public static let forms = "unix:PATH, vsock:CID:PORT, hvsock:UDS_PATH:PORT, serial:PATH or qga:unix:PATH"

    /// Parses `unix:PATH`, `vsock:CID:PORT`, `hvsock:UDS_PATH:PORT`, `serial:PATH` or `qga:unix:PATH`.
    public init(parsing text: String) throws(AddressParseError) {
        guard let colon = text.firstIndex(of: ":") else {
            throw AddressParseError(text: text, reason: "expected \(AgentAddress.forms)")
        }
        let kind = String(text[..<colon])
        let rest = String(text[text.index(after: colon)...])
        switch kind {
        case "unix":
            self = .unix(path: try AgentAddress.socketPath(rest, in: text))
        case "serial":
            self = .serial(path: try AgentAddress.socketPath(rest, in: text))
        case "qga":
            guard rest.hasPrefix("unix:") else {
                throw AddressParseError(text: text, reason: "expected qga:unix:PATH, the Unix socket of qemu-ga's chardev")
            }
            self = .qga(path: try AgentAddress.socketPath(String(rest.dropFirst(5)), in: text))
        case "vsock":
            let parts = rest.split(separator: ":", omittingEmptySubsequences: false)
            guard parts.count == 2 else {
                throw AddressParseError(text: text, reason: "expected vsock:CID:PORT, e.g. vsock:42:5123")
            }
            let cid = try AgentAddress.number(String(parts[0]), what: "CID", in: text)
            let port = try AgentAddress.number(String(parts[1]), what: "port", in: text)
            switch cid {
            case 0:
                throw AddressParseError(text: text, reason: "CID 0 is the hypervisor, not a guest; a guest's CID is 3 or more")
            case 2:
                throw AddressParseError(text: text, reason: "CID 2 is the host itself, not a guest; a guest's CID is 3 or more (1 is local loopback)")
            case UInt32.max:
                throw AddressParseError(text: text, reason: "CID \(cid) means \"any\" and cannot be connected to")
            default:
                break
            }
            self = .vsock(cid: cid, port: port)
        case "hvsock":
            guard let last = rest.lastIndex(of: ":") else {
                throw AddressParseError(text: text, reason: "expected hvsock:UDS_PATH:PORT, e.g. hvsock:/run/vm1/vsock.sock:5123")
            }
            let path = try AgentAddress.socketPath(String(rest[..<last]), in: text)
            let port = try AgentAddress.number(String(rest[rest.index(after: last)...]), what: "port", in: text)
            self = .hybridVsock(path: path, port: port)
        default:
            throw AddressParseError(text: text, reason: "unknown kind \"\(kind)\": expected \(AgentAddress.forms)")
        }
    }

    /// The canonical text form, which parses back to the same address.
    public var description: String {
        switch self {
        case .unix(let path): "unix:\(path)"
        case .vsock(let cid, let port): "vsock:\(cid):\(port)"
        case .hybridVsock(let path, let port): "hvsock:\(path):\(port)"
        case .serial(let path): "serial:\(path)"
        case .qga(let path): "qga:unix:\(path)"
        }
    }

    /// How messages name the address: "unix socket /run/q.sock", "vsock 42:5123".
    public var spoken: String {
        switch self {
        case .unix(let path): "unix socket \(path)"
        case .vsock(let cid, let port): "vsock \(cid):\(port)"
        case .hybridVsock(let path, let port): "hybrid vsock \(path) port \(port)"
        case .serial(let path): "serial port socket \(path)"
        case .qga(let path): "qemu-ga at \(path)"
        }
    }

    /// The Unix socket path the connection starts with, if any.
    public var socketPath: String? {
        switch self {
        case .unix(let p), .serial(let p), .hybridVsock(let p, _), .qga(let p): p
        case .vsock: nil
        }
    }

    private static func socketPath(_ path: String, in text: String) throws(AddressParseError) -> String {
        guard !path.isEmpty else { throw AddressParseError(text: text, reason: "the socket path is empty") }
        guard !path.utf8.contains(0) else { throw AddressParseError(text: text, reason: "the socket path contains a NUL byte") }
        guard path.utf8.count <= 107 else {
            throw AddressParseError(text: text, reason: "the socket path is longer than 107 bytes, the limit of a Unix socket address")
        }
        return path
    }

    private static func number(_ s: String, what: String, in text: String) throws(AddressParseError) -> UInt32 {
        guard !s.isEmpty, s.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }), let n = UInt32(s) else {
            throw AddressParseError(text: text, reason: "the \(what) \"\(s)\" is not a number from 0 to \(UInt32.max)")
        }
        return n
    }
}

/// Why an agent address could not be read.
public struct AddressParseError: Error, Sendable, Equatable, CustomStringConvertible {
    public let text: String
    public let reason: String
    public var description: String { "\"\(text)\" is not an agent address: \(reason)" }
}
