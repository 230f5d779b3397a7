// Where an agent listens, as written on the command line: unix:, vsock:, hvsock:, serial: or qga:unix:.
import QuiesceLinux
import QuiesceProtocol

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
    /// qemu-guest-agent's port behind the Unix socket of a QEMU chardev: spoken to in qemu-ga's
    /// own protocol, with what that protocol can do (no deadline). qemu-ga itself, or quiesced
    /// on qemu-ga's port, which says so in guest-info.
    case qga(path: String)

    /// The forms accepted, for help texts and error messages.
    public static let forms = TransportAddress.forms(for: .connect)

    /// Parses `unix:PATH`, `vsock:CID:PORT`, `hvsock:UDS_PATH:PORT`, `serial:PATH` or `qga:unix:PATH`
    /// (also `qga+unix:PATH`, `qga:serial:PATH`, `qga+serial:PATH`: qemu-ga behind a chardev's
    /// socket), with the parser both sides share (`TransportAddress`).
    public init(parsing text: String) throws(AddressParseError) {
        let parsed = try TransportAddress(parsing: text, for: .connect)
        switch parsed.transport {
        case .unix(let path), .serial(let path):
            if parsed.speaksQGA { self = .qga(path: path) }
            else if case .unix = parsed.transport { self = .unix(path: path) }
            else { self = .serial(path: path) }
        case .vsock(let cid?, let port):
            self = .vsock(cid: cid, port: port)
        case .hybridVsock(let path, let port):
            self = .hybridVsock(path: path, port: port)
        case .vsock(nil, _), .hvVSS:
            // TransportAddress refuses these for `.connect`.
            throw AddressParseError(text: text, reason: "expected \(AgentAddress.forms)", role: .connect)
        }
    }

    /// The canonical text form, which parses back to the same address.
    /// The agent is spoken to in qemu-ga's protocol (`qga:`): qemu-ga itself, or quiesced on
    /// qemu-ga's port.
    public var speaksQGA: Bool { if case .qga = self { true } else { false } }

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

    /// What tells two addresses of the same agent apart from two agents: the socket's file
    /// (device and inode, by stat(2) following links) with the port for hybrid vsock, so that
    /// two spellings of one path, or a link to it, compare equal; the text form otherwise (a
    /// socket that does not exist yet, vsock).
    public var identity: String {
        guard let path = socketPath, let st = try? Stat.of(path: path) else { return description }
        let port: String = if case .hybridVsock(_, let p) = self { ":\(p)" } else { "" }
        return "socket:\(st.device.major):\(st.device.minor):\(st.inode)\(port)"
    }

    /// The Unix socket path the connection starts with, if any.
    public var socketPath: String? {
        switch self {
        case .unix(let p), .serial(let p), .hybridVsock(let p, _), .qga(let p): p
        case .vsock: nil
        }
    }
}
