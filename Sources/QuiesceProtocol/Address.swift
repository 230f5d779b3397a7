// Agent addresses as written on a command line or in a config file: one parser for both sides.

/// Which end of a connection an address is written for: the agent listens on it, the host
/// connects to it. Some forms make sense on one side only (`vsock:PORT` and `hv-vss:` listen,
/// `hvsock:` connects) and the agent wants absolute paths.
public enum AddressRole: Sendable, Hashable {
    case listen
    case connect
}

/// An address parsed but not yet bound to either side's types: a transport and whether qemu-ga's
/// protocol is spoken on it instead of this one. Pure text work, no system calls.
///
/// Forms (PROTOCOL.md section 1): `unix:PATH`, `vsock:PORT` (listen, any CID), `vsock:CID:PORT`,
/// `serial:PATH`, `hvsock:UDS_PATH:PORT` (connect), `hv-vss[:DEVICE]` (listen), and qemu-ga's
/// dialect on a Unix socket or serial port, spelt `qga+unix:PATH` / `qga+serial:PATH` or
/// `qga:unix:PATH` / `qga:serial:PATH` alike.
public struct TransportAddress: Sendable, Hashable {
    public enum Transport: Sendable, Hashable {
        /// A Unix stream socket.
        case unix(path: String)
        /// AF_VSOCK; `cid` nil means any (`VMADDR_CID_ANY`, listen only).
        case vsock(cid: UInt32?, port: UInt32)
        /// Firecracker / Cloud Hypervisor hybrid vsock: the VM's Unix socket and the guest port.
        case hybridVsock(path: String, port: UInt32)
        /// A virtio-serial port: the port device in the guest, the QEMU chardev's Unix socket on the host.
        case serial(path: String)
        /// The Hyper-V VSS channel of hv_utils; nil means the driver's default device.
        case hvVSS(device: String?)
    }

    public var transport: Transport
    /// qemu-ga's protocol is spoken on the transport (libvirt, Proxmox), not this one.
    public var speaksQGA: Bool

    public init(transport: Transport, speaksQGA: Bool = false) {
        self.transport = transport
        self.speaksQGA = speaksQGA
    }

    /// The longest Unix socket path: `sun_path` holds 108 bytes on Linux, one of them the NUL.
    public static let unixPathMax = 107

    /// The forms a side accepts, for help texts and error messages.
    public static func forms(for role: AddressRole) -> String {
        switch role {
        case .listen: "unix:PATH, vsock:PORT, vsock:CID:PORT, serial:DEVICE, qga+unix:PATH, qga+serial:DEVICE or hv-vss:DEVICE"
        case .connect: "unix:PATH, vsock:CID:PORT, hvsock:UDS_PATH:PORT, serial:PATH or qga:unix:PATH"
        }
    }

    /// Parses `text` for `role`.
    /// - Throws: `AddressParseError` naming the text and what is wrong with it: an unknown kind,
    ///   an empty, relative (listen) or over-long socket path, a number out of range, a vsock CID
    ///   no guest can have (connect: 0, 2, 4294967295), or a form the other side uses.
    public init(parsing text: String, for role: AddressRole) throws(AddressParseError) {
        func bad(_ reason: String) -> AddressParseError { AddressParseError(text: text, reason: reason, role: role) }
        if text == "hv-vss" { self = try TransportAddress.hvVSS(rest: "", role: role, bad) ; return }
        guard let colon = text.firstIndex(of: ":") else { throw bad("expected \(TransportAddress.forms(for: role))") }
        var kind = String(text[..<colon])
        var rest = String(text[text.index(after: colon)...])
        var qga = false
        if kind == "qga" {
            // The host's spelling, qga:unix:PATH; qga+unix:PATH is the same address.
            let inner = rest.firstIndex(of: ":")
            let innerKind = inner.map { String(rest[..<$0]) }
            guard let inner, innerKind == "unix" || innerKind == "serial" else {
                throw bad(role == .connect
                    ? "expected qga:unix:PATH, the Unix socket of qemu-ga's chardev"
                    : "expected qga+unix:PATH or qga+serial:DEVICE (also written qga:unix:, qga:serial:)")
            }
            kind = String(rest[..<inner])
            rest = String(rest[rest.index(after: inner)...])
            qga = true
        } else if kind == "qga+unix" || kind == "qga+serial" {
            kind = String(kind.dropFirst(4))
            qga = true
        }
        switch kind {
        case "unix":
            self.init(transport: .unix(path: try TransportAddress.path(rest, socket: true, role: role, bad)), speaksQGA: qga)
        case "serial":
            // In the guest a port device; on the host the Unix socket of the port's chardev.
            self.init(transport: .serial(path: try TransportAddress.path(rest, socket: role == .connect, role: role, bad)), speaksQGA: qga)
        case "vsock":
            let parts = rest.split(separator: ":", omittingEmptySubsequences: false)
            switch (parts.count, role) {
            case (1, .listen):
                self.init(transport: .vsock(cid: nil, port: try TransportAddress.vsockPort(parts[0], bad)))
            case (2, _):
                let cid = try TransportAddress.number(parts[0], "CID", bad)
                let port = try TransportAddress.vsockPort(parts[1], bad)
                if role == .listen {
                    // The agent binds a local CID: its own, any (4294967295) or local loopback (1).
                    switch cid {
                    case 0, 2: throw bad("CID \(cid) is the \(cid == 0 ? "hypervisor's" : "host's"), not this guest's; listen on vsock:PORT (any CID) or vsock:OWN_CID:PORT")
                    default: break
                    }
                } else {
                    switch cid {
                    case 0: throw bad("CID 0 is the hypervisor, not a guest; a guest's CID is 3 or more")
                    case 2: throw bad("CID 2 is the host itself, not a guest; a guest's CID is 3 or more (1 is local loopback)")
                    case UInt32.max: throw bad("CID \(cid) means \"any\" and cannot be connected to")
                    default: break
                    }
                }
                self.init(transport: .vsock(cid: cid, port: port))
            default:
                throw bad(role == .connect ? "expected vsock:CID:PORT, e.g. vsock:42:5123" : "expected vsock:PORT or vsock:CID:PORT")
            }
        case "hvsock":
            guard role == .connect else {
                throw bad("hvsock: is the host's end of hybrid vsock; in the guest, listen on vsock:PORT")
            }
            guard let last = rest.lastIndex(of: ":") else {
                throw bad("expected hvsock:UDS_PATH:PORT, e.g. hvsock:/run/vm1/vsock.sock:5123")
            }
            let path = try TransportAddress.path(String(rest[..<last]), socket: true, role: role, bad)
            let port = try TransportAddress.vsockPort(rest[rest.index(after: last)...], bad)
            self.init(transport: .hybridVsock(path: path, port: port))
        case "hv-vss":
            self = try TransportAddress.hvVSS(rest: rest, role: role, bad)
        default:
            throw bad("unknown kind \"\(kind)\": expected \(TransportAddress.forms(for: role))")
        }
    }

    private static func hvVSS(rest: String, role: AddressRole, _ bad: (String) -> AddressParseError) throws(AddressParseError) -> TransportAddress {
        guard role == .listen else {
            throw bad("hv-vss is the guest's Hyper-V VSS channel, not an address the host can connect to")
        }
        if rest.isEmpty { return TransportAddress(transport: .hvVSS(device: nil)) }
        return TransportAddress(transport: .hvVSS(device: try path(rest, socket: false, role: role, bad)))
    }

    /// A path: not empty, no NUL; absolute where the agent listens; a socket's within `unixPathMax`.
    private static func path(_ path: String, socket: Bool, role: AddressRole,
                             _ bad: (String) -> AddressParseError) throws(AddressParseError) -> String {
        let what = socket ? "socket path" : "device path"
        guard !path.isEmpty else { throw bad("the \(what) is empty") }
        guard !path.utf8.contains(0) else { throw bad("the \(what) contains a NUL byte") }
        if role == .listen && !path.hasPrefix("/") { throw bad("the \(what) must be absolute") }
        if socket && path.utf8.count > unixPathMax {
            throw bad("the socket path is longer than \(unixPathMax) bytes, the limit of a Unix socket address")
        }
        return path
    }

    /// A vsock port: a number below 4294967295, which is VMADDR_PORT_ANY (linux/vm_sockets.h):
    /// bound, the kernel would pick a random port no host could know; connected, it names none.
    private static func vsockPort(_ s: Substring, _ bad: (String) -> AddressParseError) throws(AddressParseError) -> UInt32 {
        let port = try number(s, "port", bad)
        guard port != UInt32.max else {
            throw bad("port \(port) is VMADDR_PORT_ANY (\"any port\"), not a port a host can reach; pick one, e.g. 5123")
        }
        return port
    }

    /// A decimal number from 0 to 4294967295, digits only (no sign, no spaces).
    private static func number(_ s: Substring, _ what: String, _ bad: (String) -> AddressParseError) throws(AddressParseError) -> UInt32 {
        guard !s.isEmpty, s.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }), let n = UInt32(s) else {
            throw bad("the \(what) \"\(s)\" is not a number from 0 to \(UInt32.max)")
        }
        return n
    }
}

/// Why an address could not be read: the text, what is wrong with it, and for which side.
public struct AddressParseError: Error, Sendable, Equatable, CustomStringConvertible {
    public let text: String
    public let reason: String
    public let role: AddressRole

    public init(text: String, reason: String, role: AddressRole) {
        self.text = text
        self.reason = reason
        self.role = role
    }

    /// "\"tcp:1\" is not an agent address: …" (connect), "listen address \"tcp:1\": …" (listen).
    public var description: String {
        switch role {
        case .connect: "\"\(text)\" is not an agent address: \(reason)"
        case .listen: "listen address \"\(text)\": \(reason)"
        }
    }
}
