// The one address parser both sides use: every form for each side, and bad input.
import QuiesceProtocol
import Testing

@Suite("Transport addresses")
struct TransportAddressTests {
    typealias T = TransportAddress

    @Test("the agent's listen forms", arguments: [
        ("unix:/run/quiesce/quiesced.sock", T(transport: .unix(path: "/run/quiesce/quiesced.sock"))),
        ("vsock:5123", T(transport: .vsock(cid: nil, port: 5123))),
        ("vsock:4294967295:5123", T(transport: .vsock(cid: UInt32.max, port: 5123))),
        ("vsock:1:5123", T(transport: .vsock(cid: 1, port: 5123))),
        ("serial:/dev/virtio-ports/org.quiesce.agent.0", T(transport: .serial(path: "/dev/virtio-ports/org.quiesce.agent.0"))),
        ("qga+serial:/dev/virtio-ports/org.qemu.guest_agent.0",
         T(transport: .serial(path: "/dev/virtio-ports/org.qemu.guest_agent.0"), speaksQGA: true)),
        ("qga:serial:/dev/virtio-ports/org.qemu.guest_agent.0",
         T(transport: .serial(path: "/dev/virtio-ports/org.qemu.guest_agent.0"), speaksQGA: true)),
        ("qga+unix:/run/qga.sock", T(transport: .unix(path: "/run/qga.sock"), speaksQGA: true)),
        ("qga:unix:/run/qga.sock", T(transport: .unix(path: "/run/qga.sock"), speaksQGA: true)),
        ("hv-vss", T(transport: .hvVSS(device: nil))),
        ("hv-vss:", T(transport: .hvVSS(device: nil))),
        ("hv-vss:/tmp/hv", T(transport: .hvVSS(device: "/tmp/hv"))),
    ])
    func listenForms(text: String, expected: TransportAddress) throws {
        #expect(try TransportAddress(parsing: text, for: .listen) == expected)
    }

    @Test("the host's connect forms", arguments: [
        ("unix:relative/agent.sock", T(transport: .unix(path: "relative/agent.sock"))),
        ("unix:/path:with:colons", T(transport: .unix(path: "/path:with:colons"))),
        ("vsock:42:5123", T(transport: .vsock(cid: 42, port: 5123))),
        ("vsock:4294967294:4294967294", T(transport: .vsock(cid: 4_294_967_294, port: 4_294_967_294))),
        ("hvsock:/odd:path/v.sock:52", T(transport: .hybridVsock(path: "/odd:path/v.sock", port: 52))),
        ("serial:vm1/agent.sock", T(transport: .serial(path: "vm1/agent.sock"))),
        ("qga:unix:/run/vm1/qga.sock", T(transport: .unix(path: "/run/vm1/qga.sock"), speaksQGA: true)),
        ("qga+unix:/run/vm1/qga.sock", T(transport: .unix(path: "/run/vm1/qga.sock"), speaksQGA: true)),
        ("qga:serial:/run/vm1/qga.sock", T(transport: .serial(path: "/run/vm1/qga.sock"), speaksQGA: true)),
        ("qga+serial:/run/vm1/qga.sock", T(transport: .serial(path: "/run/vm1/qga.sock"), speaksQGA: true)),
    ])
    func connectForms(text: String, expected: TransportAddress) throws {
        #expect(try TransportAddress(parsing: text, for: .connect) == expected)
    }

    @Test("bad addresses are refused saying what is wrong, in the side's words", arguments: [
        ("", AddressRole.listen, "listen address \"\": expected unix:PATH, vsock:PORT"),
        ("/run/q.sock", .connect, "\"/run/q.sock\" is not an agent address: expected unix:PATH, vsock:CID:PORT"),
        ("tcp:1", .listen, "unknown kind \"tcp\""),
        ("unix:", .listen, "the socket path is empty"),
        ("unix:run/q.sock", .listen, "the socket path must be absolute"),
        ("serial:ttyS1", .listen, "the device path must be absolute"),
        ("qga+serial:ttyS1", .listen, "the device path must be absolute"),
        ("hv-vss:hv_vss", .listen, "the device path must be absolute"),
        ("unix:/a\u{0}b", .connect, "contains a NUL byte"),
        ("unix:/" + String(repeating: "x", count: 107), .listen, "longer than 107 bytes"),
        ("unix:/" + String(repeating: "x", count: 107), .connect, "longer than 107 bytes"),
        ("vsock:abc", .listen, "the port \"abc\" is not a number"),
        ("vsock:+5", .listen, "the port \"+5\" is not a number"),
        ("vsock:1:2:3", .listen, "expected vsock:PORT or vsock:CID:PORT"),
        ("vsock:5123", .connect, "expected vsock:CID:PORT"),
        ("vsock:2:5123", .connect, "CID 2 is the host itself"),
        ("vsock:0:5123", .connect, "CID 0 is the hypervisor"),
        ("vsock:4294967295:5123", .connect, "means \"any\""),
        ("hvsock:/run/v.sock:5", .listen, "in the guest, listen on vsock:PORT"),
        ("hvsock:/run/v.sock", .connect, "expected hvsock:UDS_PATH:PORT"),
        ("hv-vss", .connect, "not an address the host can connect to"),
        ("hv-vss:/dev/x", .connect, "not an address the host can connect to"),
        ("qga:vsock:3:5123", .connect, "expected qga:unix:PATH"),
        ("qga:vsock:5123", .listen, "expected qga+unix:PATH or qga+serial:DEVICE"),
        ("qga:unix:", .connect, "the socket path is empty"),
        ("qga+vsock:5", .listen, "unknown kind \"qga+vsock\""),
        ("vsock:4294967295", .listen, "VMADDR_PORT_ANY"),
        ("vsock:3:4294967295", .connect, "VMADDR_PORT_ANY"),
        ("hvsock:/run/v.sock:4294967295", .connect, "VMADDR_PORT_ANY"),
        ("vsock:2:5123", .listen, "CID 2 is the host's, not this guest's"),
        ("vsock:0:5123", .listen, "CID 0 is the hypervisor's"),
    ])
    func refusesBadInput(text: String, role: AddressRole, message: String) {
        #expect {
            _ = try TransportAddress(parsing: text, for: role)
        } throws: { error in
            let e = error as! AddressParseError
            return e.text == text && e.role == role && e.description.contains(message)
        }
    }
}
