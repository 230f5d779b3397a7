// Agent addresses and durations as written on the command line, and the op ids quiescectl makes.
import QuiesceProtocol
import QuiesceHost
import Testing

@Suite("Agent addresses")
struct AgentAddressTests {
    @Test("every form parses and prints back the same", arguments: [
        ("unix:/run/quiesce/quiesced.sock", AgentAddress.unix(path: "/run/quiesce/quiesced.sock")),
        ("unix:relative/agent.sock", .unix(path: "relative/agent.sock")),
        ("unix:/path:with:colons", .unix(path: "/path:with:colons")),
        ("vsock:42:5123", .vsock(cid: 42, port: 5123)),
        ("vsock:1:5123", .vsock(cid: 1, port: 5123)),
        ("vsock:4294967294:4294967294", .vsock(cid: 4_294_967_294, port: 4_294_967_294)),
        ("hvsock:/run/fc/vm1/v.sock:5123", .hybridVsock(path: "/run/fc/vm1/v.sock", port: 5123)),
        ("hvsock:/odd:path/v.sock:52", .hybridVsock(path: "/odd:path/v.sock", port: 52)),
        ("serial:/run/vm1/qga.sock", .serial(path: "/run/vm1/qga.sock")),
        ("qga:unix:/run/vm1/qga.sock", .qga(path: "/run/vm1/qga.sock")),
    ])
    func parsesEveryForm(text: String, expected: AgentAddress) throws {
        let a = try AgentAddress(parsing: text)
        #expect(a == expected)
        #expect(a.description == text)
        #expect(try AgentAddress(parsing: a.description) == a)
    }

    @Test("the agent's spellings of qemu-ga's forms name the same address", arguments: [
        "qga+unix:/run/vm1/qga.sock", "qga+serial:/run/vm1/qga.sock", "qga:serial:/run/vm1/qga.sock",
    ])
    func agentSpellingsOfQGA(text: String) throws {
        #expect(try AgentAddress(parsing: text) == .qga(path: "/run/vm1/qga.sock"))
    }

    @Test("bad addresses are refused with a reason that says what is wrong", arguments: [
        ("", "expected unix:PATH"),
        ("/run/agent.sock", "expected unix:PATH, vsock:CID:PORT, hvsock:UDS_PATH:PORT, serial:PATH or qga:unix:PATH"),
        ("qga:vsock:3:5123", "expected qga:unix:PATH"),
        ("qga:unix:", "the socket path is empty"),
        ("tcp:1.2.3.4:80", "unknown kind \"tcp\""),
        ("unix:", "the socket path is empty"),
        ("serial:", "the socket path is empty"),
        ("vsock:42", "expected vsock:CID:PORT"),
        ("vsock:42:5123:7", "expected vsock:CID:PORT"),
        ("vsock:x:5123", "the CID \"x\" is not a number"),
        ("vsock:42:-1", "the port \"-1\" is not a number"),
        ("vsock:42:99999999999", "the port \"99999999999\" is not a number"),
        ("vsock:2:5123", "CID 2 is the host itself"),
        ("vsock:0:5123", "CID 0 is the hypervisor"),
        ("vsock:4294967295:5123", "means \"any\""),
        ("hvsock:/run/v.sock", "expected hvsock:UDS_PATH:PORT"),
        ("hvsock::5123", "the socket path is empty"),
        ("hvsock:/run/v.sock:port", "the port \"port\" is not a number"),
        ("unix:/" + String(repeating: "x", count: 120), "longer than 107 bytes"),
    ])
    func refusesBadAddresses(text: String, reason: String) {
        #expect {
            _ = try AgentAddress(parsing: text)
        } throws: { error in
            let e = error as! AddressParseError
            return e.description.contains(reason) && e.description.contains("is not an agent address")
        }
    }
}

@Suite("Durations")
struct DurationTests {
    @Test("units and plain seconds", arguments: [
        ("500ms", Int64(500)), ("30s", 30_000), ("5m", 300_000), ("1h", 3_600_000), ("30", 30_000),
        ("1.5s", 1500), ("0.5", 500), ("2.5m", 150_000), (" 10s ", 10_000), ("0", 0), ("0ms", 0),
        ("1ms", 1), ("24h", 86_400_000),
    ])
    func parses(text: String, ms: Int64) throws {
        #expect(try TimeSpan(parsing: text).milliseconds == ms)
    }

    @Test("malformed durations are refused with the reason", arguments: [
        ("", "it is empty"), ("s", "use a number"), ("5x", "use a number"), ("-5s", "use a number"),
        ("1.2.3s", "use a number"), (".5s", "use a number"), ("5.s", "use a number"), ("5 min", "use a number"),
        ("1e3", "use a number"), ("25h", "longer than one day"), ("0.1ms", "shorter than 1 ms"), ("ms", "use a number"),
        // Beyond Int64 and beyond Double (found by fuzz/run: these trapped instead of being refused).
        ("9999999999999999", "longer than one day"), ("99999999999999999999h", "longer than one day"),
        (String(repeating: "9", count: 400), "longer than one day"), ("86400000.6ms", "longer than one day"),
    ])
    func refuses(text: String, reason: String) {
        #expect {
            _ = try TimeSpan(parsing: text)
        } throws: { error in
            let e = error as! TimeSpanParseError
            return e.description.contains(reason) && e.description.contains("is not a duration")
        }
    }

    @Test("the canonical form parses back to the same value", arguments: [Int64(0), 1, 500, 1000, 1500, 30_000, 90_000, 300_000, 3_600_000, 5_400_000])
    func roundTrips(ms: Int64) throws {
        let t = TimeSpan(milliseconds: ms)
        #expect(try TimeSpan(parsing: t.description) == t)
    }

    @Test("human forms for messages")
    func human() {
        #expect(TimeSpan.seconds(5).human == "5 s")
        #expect(TimeSpan.milliseconds(500).human == "500 ms")
        #expect(TimeSpan.milliseconds(1500).human == "1.5 s")
        #expect(TimeSpan.seconds(150).human == "2 min 30 s")
        #expect(TimeSpan.seconds(300).human == "5 min")
        #expect(TimeSpan.human(microseconds: 420) == "0.42 ms")
        #expect(TimeSpan.human(microseconds: 6200) == "6.2 ms")
        #expect(TimeSpan.human(microseconds: 62_000) == "62 ms")
        #expect(TimeSpan.human(microseconds: 2_060_000) == "2.06 s")
        #expect(TimeSpan.human(microseconds: 12_340_000) == "12.3 s")
    }
}

@Suite("Operation ids")
struct OperationIDTests {
    @Test("a generated op id is qc-<epoch ms>-<8 hex digits>, also when the random part is small")
    func generatedShape() {
        let ids = (0..<2000).map { _ in CheckpointPlan.makeOpID() }
        for id in ids {
            let parts = id.split(separator: "-")
            #expect(parts.count == 3 && parts[0] == "qc" && Int64(parts[1]) != nil, "\(id)")
            #expect(parts.last.map { $0.count == 8 && $0.allSatisfy(\.isHexDigit) } == true, "\(id)")
        }
        #expect(Set(ids).count == ids.count)
    }
}
