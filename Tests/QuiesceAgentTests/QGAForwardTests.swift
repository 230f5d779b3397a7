// qga-forward: quiesced on qemu-ga's port, with Debian's real qemu-ga behind it on a private socket.
//
// Safety: the private qemu-ga runs with every command that could touch this machine blocked (the
// fsfreeze commands, shutdown and suspend, fstrim, exec, set-time, set-vcpus, memory blocks,
// passwords and ssh keys); quiesced freezes only the lab's loop filesystems (--include LAB/*).
import Foundation
import Synchronization
import QuiesceLinux
import QuiesceProtocol
import QuiesceTestSupport
import Testing

private let qemuGA = "/usr/sbin/qemu-ga"

/// Commands the private qemu-ga refuses in these tests: the freeze (it is quiesced's) and
/// everything that would act on the host running the tests.
private let blockedOnHost = [
    "guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list", "guest-fsfreeze-thaw", "guest-fsfreeze-status",
    "guest-shutdown", "guest-suspend-disk", "guest-suspend-ram", "guest-suspend-hybrid", "guest-fstrim",
    "guest-exec", "guest-set-time", "guest-set-vcpus", "guest-set-memory-blocks", "guest-set-user-password",
    "guest-ssh-add-authorized-keys", "guest-ssh-remove-authorized-keys",
]

/// Debian's qemu-ga listening on a Unix socket in the lab, its state and pid file in the lab too.
private final class PrivateQemuGA {
    let process = Process()
    let socket: String

    init(lab: String) throws {
        socket = "\(lab)/qemu-ga.sock"
        try FileManager.default.createDirectory(atPath: "\(lab)/qemu-ga-state", withIntermediateDirectories: true)
        process.executableURL = URL(fileURLWithPath: qemuGA)
        process.arguments = ["-m", "unix-listen", "-p", socket, "-t", "\(lab)/qemu-ga-state", "-f", "\(lab)/qemu-ga.pid",
                             "-b", blockedOnHost.joined(separator: ",")]
        guard FileManager.default.createFile(atPath: "\(lab)/qemu-ga.log", contents: nil) else { throw LabError("cannot create \(lab)/qemu-ga.log") }
        let log = FileHandle(forWritingAtPath: "\(lab)/qemu-ga.log")!
        process.standardOutput = log
        process.standardError = log
        try process.run()
        for _ in 0..<300 where (try? Socket.connectUnix(path: socket, timeoutMs: 100)).map({ FD.close($0) }) == nil {
            usleep(10_000)
        }
    }

    /// One command straight to qemu-ga, on a connection of its own (qemu-ga serves one client
    /// at a time, so a connection kept open would hold up quiesced's), as its raw reply line.
    func call(_ line: String) throws -> [UInt8] {
        let c = try QGAClient(path: socket)
        try c.send(line)
        return try c.replyLine()
    }

    /// SIGKILL: the test process blocks SIGTERM, and a child inherits that mask.
    func stop() {
        guard process.isRunning else { return }
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    deinit { stop() }
}

private func names(_ info: JSON) -> [String] {
    info["return"]?["supported_commands"]?.arrayValue?.compactMap { $0["name"]?.stringValue } ?? []
}

private func enabled(_ info: JSON, _ name: String) -> Bool? {
    info["return"]?["supported_commands"]?.arrayValue?.first { $0["name"]?.stringValue == name }?["enabled"]?.boolValue
}

/// What a host notices of `guest-network-get-interfaces`: names, hardware and IP addresses
/// (the counters move between two calls).
private func interfaces(_ reply: JSON) -> [String] {
    (reply["return"]?.arrayValue ?? []).map { i in
        let ips = (i["ip-addresses"]?.arrayValue ?? []).compactMap { $0["ip-address"]?.stringValue }.sorted()
        return "\(i["name"]?.stringValue ?? "?") \(i["hardware-address"]?.stringValue ?? "-") \(ips)"
    }
}

@Suite("qemu-ga commands passed on to a private qemu-ga",
       .enabled(if: canUseLoopDevices && FileManager.default.isExecutableFile(atPath: qemuGA)))
struct QGAForwardTests {
    @Test("libvirt's and Proxmox's everyday commands answer exactly as qemu-ga answers them; guest-info lists both agents' commands")
    func sameAnswersAsQemuGA() async throws {
        try await LoopLab.with { lab in
            _ = try lab.filesystem("a")
            let forwarding = try ForwardingAgent(lab: lab.root)
            defer { forwarding.stop() }
            let ga = forwarding.qemuGA
            let qga = forwarding.socket

            // libvirt: one connection, guest-sync once, then commands without ids.
            let c = try QGAClient(path: qga)
            #expect(try c.call(#"{"execute":"guest-sync","arguments":{"id":1717171717}}"#) == ["return": 1_717_171_717])
            for command in ["guest-get-osinfo", "guest-get-host-name", "guest-get-vcpus", "guest-get-timezone"] {
                let theirs = try ga.call(#"{"execute":"\#(command)"}"#)
                try c.send(#"{"execute":"\#(command)"}"#)
                let ours = try c.replyLine()
                #expect(ours == theirs, "\(command): relayed byte for byte")
                #expect(try JSON.parse(ours)["return"] != nil, "\(command): \(String(decoding: ours, as: UTF8.self))")
            }
            let nics = try c.call(#"{"execute":"guest-network-get-interfaces"}"#)
            #expect(interfaces(nics) == interfaces(try JSON.parse(ga.call(#"{"execute":"guest-network-get-interfaces"}"#))))
            #expect(interfaces(nics).contains { $0.hasPrefix("lo ") && $0.contains("127.0.0.1") })
            let now = Int64(Date().timeIntervalSince1970 * 1e9)
            let time = try c.call(#"{"execute":"guest-get-time","id":"t"}"#)
            #expect(time["id"] == "t", "the host's id comes back, as qemu-ga echoes it")
            #expect(abs((time["return"]?.intValue ?? 0) - now) < 5_000_000_000, "\(time)")
            // qemu-ga's own errors come back as qemu-ga words them.
            #expect(try c.call(#"{"execute":"guest-shutdown"}"#)["error"]?["desc"] == "Command guest-shutdown has been disabled")
            let unknown = try c.call(#"{"execute":"guest-no-such-command","id":9}"#)
            #expect(unknown == ["id": 9, "error": ["class": "CommandNotFound", "desc": "The command guest-no-such-command has not been found"]])

            // Proxmox: a fresh connection and guest-sync-delimited before every command.
            for command in ["guest-get-host-name", "guest-network-get-interfaces", "guest-ping"] {
                let p = try QGAClient(path: qga)
                try p.send(#"{"execute":"guest-sync-delimited","arguments":{"id":4242}}"#)
                #expect(try p.reply(delimited: true) == ["return": 4242])
                #expect(try p.call(#"{"execute":"\#(command)"}"#)["return"] != nil, "\(command)")
            }

            // guest-info: ours, then each of qemu-ga's once; the freeze commands are ours and enabled.
            let info = try c.call(#"{"execute":"guest-info"}"#)
            let listed = names(info)
            let theirs = names(try JSON.parse(ga.call(#"{"execute":"guest-info"}"#)))
            #expect(Set(listed) == Set(theirs).union(QGA.CommandName.allCases.map(\.rawValue)))
            #expect(listed.count == Set(listed).count, "each command listed once")
            #expect(enabled(info, "guest-fsfreeze-freeze-list") == true && enabled(info, "guest-get-fsinfo") == true)
            #expect(enabled(info, "guest-shutdown") == false, "disabled in the private qemu-ga, so disabled here")
        }
    }

    @Test("while frozen: read-only commands still answer, writing ones are refused as qemu-ga refuses them, freeze stays ours")
    func whileFrozen() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let forwarding = try ForwardingAgent(lab: lab.root)
            defer { forwarding.stop() }
            let qga = forwarding.socket
            let c = try QGAClient(path: qga)
            let opened = try c.call(#"{"execute":"guest-file-open","arguments":{"path":"\#(a)/note","mode":"w"}}"#)
            let handle = try #require(opened["return"]?.intValue, "\(opened)")
            #expect(try c.call(#"{"execute":"guest-fsfreeze-freeze"}"#) == ["return": 1])
            #expect(try isFrozen(a))
            #expect(try c.call(#"{"execute":"guest-get-host-name"}"#)["return"]?["host-name"] != nil)
            #expect(try c.call(#"{"execute":"guest-get-fsinfo"}"#)["return"]?.arrayValue != nil)
            let write = try c.call(#"{"execute":"guest-file-write","arguments":{"handle":\#(handle),"buf-b64":"aGVsbG8K"}}"#)
            #expect(write["error"]?["class"] == "CommandNotFound")
            #expect(write["error"]?["desc"]?.stringValue?.hasPrefix("Command guest-file-write has been disabled: the agent is in frozen state") == true,
                    "\(write)")
            let info = try c.call(#"{"execute":"guest-info"}"#)
            #expect(enabled(info, "guest-file-write") == false && enabled(info, "guest-get-time") == true)
            #expect(enabled(info, "guest-fsfreeze-freeze") == false && enabled(info, "guest-fsfreeze-thaw") == true,
                    "frozen, the freeze is listed disabled and the thaw enabled, as qemu-ga lists them")
            #expect(try c.call(#"{"execute":"guest-fsfreeze-status"}"#) == ["return": "frozen"])
            #expect(try c.call(#"{"execute":"guest-fsfreeze-thaw"}"#) == ["return": 1])
            #expect(try !isFrozen(a))
            #expect(try c.call(#"{"execute":"guest-file-write","arguments":{"handle":\#(handle),"buf-b64":"aGVsbG8K"}}"#)["return"]?["count"] == 6)
            #expect(try c.call(#"{"execute":"guest-file-close","arguments":{"handle":\#(handle)}}"#) == ["return": [:]])
            #expect(try String(contentsOfFile: "\(a)/note", encoding: .utf8) == "hello\n")
        }
    }

    @Test("a 1 MiB guest-file-write (a 1.4 MiB command) goes through quiesced as it goes to qemu-ga; past 16 MiB a clear error")
    func largeCommands() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let forwarding = try ForwardingAgent(lab: lab.root)
            defer { forwarding.stop() }
            let ga = forwarding.qemuGA
            let qga = forwarding.socket
            var generator = SystemRandomNumberGenerator()
            let data = (0..<(1 << 20)).map { _ in UInt8.random(in: 0...255, using: &generator) }
            let b64 = Data(data).base64EncodedString()
            /// open, write, close on one connection; the write's reply as sent.
            func write(_ path: String, call: (String) throws -> [UInt8]) throws -> [UInt8] {
                let opened = try JSON.parse(call(#"{"execute":"guest-file-open","arguments":{"path":"\#(path)","mode":"w"}}"#))
                let handle = try #require(opened["return"]?.intValue, "\(opened)")
                let reply = try call(#"{"execute":"guest-file-write","arguments":{"handle":\#(handle),"buf-b64":"\#(b64)"}}"#)
                #expect(try JSON.parse(call(#"{"execute":"guest-file-close","arguments":{"handle":\#(handle)}}"#)) == ["return": [:]])
                return reply
            }
            // qemu-ga serves one client at a time: this connection is closed before quiesced's.
            var direct: QGAClient? = try QGAClient(path: ga.socket)
            let theirs = try write("\(a)/direct") { try direct!.send($0); return try direct!.replyLine() }
            direct = nil
            let c = try QGAClient(path: qga)
            let ours = try write("\(a)/forwarded") { try c.send($0); return try c.replyLine(timeoutMs: 30_000) }
            #expect(ours == theirs, "relayed as qemu-ga answers: \(String(decoding: ours, as: UTF8.self))")
            #expect(try JSON.parse(ours) == ["return": ["count": 1_048_576, "eof": false]])
            #expect(FileManager.default.contents(atPath: "\(a)/forwarded") == Data(data))

            // Behind a command still in flight, a large one is refused (busy), in its turn: a
            // connection holds at most one large frame queued.
            kill(ga.process.processIdentifier, SIGSTOP)
            try c.send(#"{"execute":"guest-get-host-name"}"#)
            try c.send(#"{"execute":"guest-file-write","arguments":{"handle":1,"buf-b64":"\#(b64)"}}"#)
            usleep(500_000)
            kill(ga.process.processIdentifier, SIGCONT)
            #expect(try c.reply(timeoutMs: 30_000)["return"]?["host-name"] != nil)
            let busy = try c.reply(timeoutMs: 30_000)
            #expect(busy["error"]?["desc"]?.stringValue?.hasPrefix("busy: a command over 64 KiB") == true, "\(busy)")

            // Past maxQGAFrameBytes: frame-too-large, naming the limit, and the stream closes.
            let big = try QGAClient(path: qga)
            let oversized = Array(#"{"execute":"guest-file-write","arguments":{"handle":1,"buf-b64":""#.utf8)
                + [UInt8](repeating: 0x41, count: ProtocolLimits.maxQGAFrameBytes) + Array(#""}}"#.utf8) + [0x0A]
            try? FD.writeAll(big.fd, oversized, timeoutMs: 30_000)
            let refused = try big.reply(timeoutMs: 30_000)
            #expect(refused["error"]?["desc"]?.stringValue?.hasPrefix("frame-too-large: frame exceeds \(ProtocolLimits.maxQGAFrameBytes) bytes") == true,
                    "\(refused)")
        }
    }

    @Test("a qemu-ga stuck on the frozen filesystem costs a forwarded command 5 s and never holds up ping, status or thaw")
    func stuckQemuGA() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let forwarding = try ForwardingAgent(lab: lab.root)
            defer { forwarding.stop() }
            let ga = forwarding.qemuGA
            let qga = forwarding.socket
            let c = try QGAClient(path: qga)
            #expect(try c.call(#"{"execute":"guest-fsfreeze-freeze"}"#) == ["return": 1])
            // Something else (not through quiesced) has qemu-ga create a file on the frozen
            // filesystem: qemu-ga, single-threaded, blocks in open() until the thaw.
            var other: QGAClient? = try QGAClient(path: ga.socket)
            try other!.send(#"{"execute":"guest-file-open","arguments":{"path":"\#(a)/blocked","mode":"w"}}"#)
            usleep(300_000)

            let start = Date()
            let stuck = try c.call(#"{"execute":"guest-get-time"}"#)
            let waited = Date().timeIntervalSince(start)
            let desc = stuck["error"]?["desc"]?.stringValue ?? ""
            #expect(desc.contains("qga-forward") && desc.contains(ga.socket) && desc.contains("did not answer within 5000 ms"), "\(stuck)")
            #expect(waited > 4.5 && waited < 8, "bounded by the frozen timeout: \(waited) s")

            // Meanwhile another host connection is answered at once.
            let host = try QGAClient(path: qga)
            try host.send(#"{"execute":"guest-get-time"}"#)  // will wait for qemu-ga
            let second = try QGAClient(path: qga)
            let t0 = Date()
            #expect(try second.call(#"{"execute":"guest-ping"}"#) == ["return": [:]])
            #expect(try second.call(#"{"execute":"guest-fsfreeze-status"}"#) == ["return": "frozen"])
            #expect(try second.call(#"{"execute":"guest-fsfreeze-thaw"}"#) == ["return": 1])
            #expect(Date().timeIntervalSince(t0) < 2, "ping, status and thaw did not wait for qemu-ga")
            #expect(try !isFrozen(a))
            // Thawed, qemu-ga finishes the open it was stuck in and serves again.
            #expect(try other!.reply(timeoutMs: 10_000)["return"]?.intValue != nil)
            other = nil
            _ = try host.reply(timeoutMs: 10_000)
            #expect(try c.call(#"{"execute":"guest-get-host-name"}"#)["return"]?["host-name"] != nil)
        }
    }

    @Test("without its qemu-ga: forwarded commands fail naming the missing forwarder; sync, info and the freeze still work")
    func forwarderAbsent() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let ga = try PrivateQemuGA(lab: lab.root)
            let qga = "\(lab.root)/qga.sock"
            let agent = try AgentProcess(in: lab.root, arguments: [
                "--include", "\(lab.root)/*", "--listen", "qga+unix:\(qga)", "--qga-forward", "unix:\(ga.socket)"])
            try waitForSocket(qga)
            defer { agent.stop() }
            let c = try QGAClient(path: qga)
            #expect(try c.call(#"{"execute":"guest-get-host-name"}"#)["return"] != nil)
            ga.stop()  // qemu-ga dies

            let gone = try c.call(#"{"execute":"guest-get-host-name","id":3}"#)
            #expect(gone["id"] == 3 && gone["error"]?["class"] == "GenericError")
            let desc = gone["error"]?["desc"]?.stringValue ?? ""
            #expect(desc.hasPrefix("guest-get-host-name is passed on to qemu-guest-agent at unix:\(ga.socket) (qga-forward), which failed: not reachable"),
                    "\(gone)")
            #expect(agent.log.contains("qemu-ga command guest-get-host-name passed on to unix:\(ga.socket)"))
            let info = try c.call(#"{"execute":"guest-info"}"#)
            #expect(Set(names(info)) == Set(QGA.CommandName.allCases.map(\.rawValue)), "only our own commands: \(names(info))")
            #expect(try c.call(#"{"execute":"guest-sync","arguments":{"id":12}}"#) == ["return": 12])
            #expect(try c.call(#"{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":["\#(a)"]}}"#) == ["return": 1])
            #expect(try isFrozen(a))
            #expect(try c.call(#"{"execute":"guest-fsfreeze-thaw"}"#) == ["return": 1])

            // Not configured at all: today's CommandNotFound.
            let plain = try AgentProcess(in: lab.root, name: "plain", arguments: [
                "--include", "\(lab.root)/*", "--listen", "qga+unix:\(lab.root)/plain-qga.sock"])
            defer { plain.stop() }
            try waitForSocket("\(lab.root)/plain-qga.sock")
            let p = try QGAClient(path: "\(lab.root)/plain-qga.sock")
            #expect(try p.call(#"{"execute":"guest-get-host-name"}"#)["error"]?["class"] == "CommandNotFound")
        }
    }

    // A stand-in, because the real command cannot run here: qemu-ga's guest-shutdown would power
    // off this machine. The stand-in answers as qemu-ga does (guest-sync echoes; a
    // success-response:false command that succeeds answers nothing) and leaves a stale line
    // before its first answer, as a previous client's unread reply would be.
    @Test("a command that answers nothing when it succeeds (guest-shutdown) gets no reply; a stale line is skipped by the private resync")
    func noResponseCommand() async throws {
        try await LoopLab.with { lab in
            let path = "\(lab.root)/stand-in.sock"
            let listener = try Socket.listenUnix(path: path)
            defer { FD.close(listener) }
            let seen = Mutex<[String]>([])
            Threads.detach {
                while let (fd, _) = try? Socket.accept(listener) {
                    var decoder = FrameDecoder()
                    try? FD.writeAll(fd, Array(#"{"return": "stale"}"#.utf8) + [0x0A])
                    var buf = [UInt8](repeating: 0, count: 4096)
                    reading: while let n = try? buf.withUnsafeMutableBytes({ try FD.read(fd, into: $0) }), n > 0 {
                        decoder.feed(buf[..<n])
                        while case .frame(let f)? = decoder.next() {
                            guard let o = try? JSON.parse(f), let name = o["execute"]?.stringValue else { continue }
                            seen.withLock { $0.append(name) }
                            var reply: JSON? = nil
                            if name == "guest-sync" {
                                var r: JSONObject = ["return": o["arguments"]?["id"] ?? .null]
                                if let id = o["id"] { r["id"] = id }
                                reply = .object(r)
                            } else if name != "guest-shutdown" {
                                reply = ["return": "done"]
                            }
                            if let reply { try? FD.writeAll(fd, reply.encoded() + [0x0A]) }
                        }
                    }
                    FD.close(fd)
                }
            }
            let qga = "\(lab.root)/qga.sock"
            let agent = try AgentProcess(in: lab.root, arguments: [
                "--include", "\(lab.root)/*", "--listen", "qga+unix:\(qga)", "--qga-forward", "unix:\(path)"])
            try waitForSocket(qga)
            defer { agent.stop() }
            let c = try QGAClient(path: qga)
            try c.send(#"{"execute":"guest-shutdown","arguments":{"mode":"powerdown"}}"#)
            try c.send(#"{"execute":"guest-get-users","id":2}"#)
            #expect(try c.reply() == ["return": "done"], "the next reply is the next command's: guest-shutdown answered nothing")
            #expect(seen.withLock { $0 } == ["guest-sync", "guest-shutdown", "guest-sync", "guest-sync", "guest-get-users", "guest-sync"])
        }
    }
}

/// quiesced on a qga+unix socket of the lab, forwarding to a private qemu-ga of its own (the
/// packaged arrangement), scoped to the lab. `stop()` ends both, quiesced first.
private struct ForwardingAgent {
    let qemuGA: PrivateQemuGA
    let agent: AgentProcess
    /// quiesced's qga+unix socket.
    let socket: String

    init(lab root: String) throws {
        qemuGA = try PrivateQemuGA(lab: root)
        socket = "\(root)/qga.sock"
        do {
            agent = try AgentProcess(in: root, arguments: [
                "--include", "\(root)/*", "--listen", "qga+unix:\(socket)", "--qga-forward", "unix:\(qemuGA.socket)"])
            try waitForSocket(socket)
        } catch {
            qemuGA.stop()
            throw error
        }
    }

    func stop() {
        agent.stop()
        qemuGA.stop()
    }
}
