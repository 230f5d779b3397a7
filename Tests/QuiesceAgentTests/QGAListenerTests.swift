// qga+unix: and qga+serial: listeners, driven the way libvirt and Proxmox drive qemu-ga.
//
// libvirt and Proxmox themselves are not installed here: these tests send the byte sequences
// they send (libvirt: guest-sync with a random id before commands; Proxmox: guest-sync-delimited,
// then each command on a fresh connection) and check the replies those clients parse.
import Foundation
import QuiesceLinux
import QuiesceProtocol
import QuiesceTestSupport
import Testing

/// A line-oriented qemu-ga client over a Unix socket (a QEMU chardev in real life).
final class QGAClient {
    let fd: Int32
    private var buffer: [UInt8] = []

    init(path: String) throws {
        _ = ignoreSIGPIPE
        fd = try Socket.connectUnix(path: path, timeoutMs: 2000)
    }

    deinit { FD.close(fd) }

    func send(_ line: String) throws { try FD.writeAll(fd, Array((line + "\n").utf8), timeoutMs: 2000) }

    /// The next reply line; with `delimited`, everything up to a 0xFF is skipped first.
    func reply(delimited: Bool = false, timeoutMs: Int32 = 10_000) throws -> JSON {
        try JSON.parse(replyLine(delimited: delimited, timeoutMs: timeoutMs))
    }

    /// The next reply line's bytes, without its newline.
    func replyLine(delimited: Bool = false, timeoutMs: Int32 = 10_000) throws -> [UInt8] {
        var sawDelimiter = !delimited
        while true {
            if !sawDelimiter, let ff = buffer.firstIndex(of: 0xFF) {
                buffer.removeSubrange(...ff)
                sawDelimiter = true
            }
            if sawDelimiter, let nl = buffer.firstIndex(of: 0x0A) {
                let line = Array(buffer[..<nl])
                buffer.removeSubrange(...nl)
                return line
            }
            guard try !FD.poll(fd, for: .readable, timeoutMs: timeoutMs).isEmpty else {
                throw LabError("no reply within \(timeoutMs) ms")
            }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n = try chunk.withUnsafeMutableBytes { try FD.read(fd, into: $0) }
            guard n > 0 else { throw LabError("the agent closed the connection") }
            buffer += chunk[..<n]
        }
    }

    func call(_ line: String, delimited: Bool = false) throws -> JSON {
        try send(line)
        return try reply(delimited: delimited)
    }
}

@Suite("qemu-ga dialect listeners", .enabled(if: canUseLoopDevices))
struct QGAListenerTests {
    @Test("libvirt's way over qga+unix: guest-sync, freeze a list, status, thaw; errors in qemu-ga's form, in order")
    func libvirtSequence() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let b = try lab.filesystem("b")
            let qga = "\(lab.root)/qga.sock"
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--listen", "qga+unix:\(qga)"])
            let c = try QGAClient(path: qga)
            #expect(try c.call(#"{"execute":"guest-sync", "arguments":{"id":8675309123}}"#) == ["return": 8_675_309_123])
            #expect(try c.call(#"{"execute":"guest-fsfreeze-status"}"#) == ["return": "thawed"])
            #expect(try c.call(#"{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":["\#(a)"]}}"#) == ["return": 1])
            #expect(try isFrozen(a) && !isFrozen(b))
            #expect(try c.call(#"{"execute":"guest-fsfreeze-status"}"#) == ["return": "frozen"])
            // One freeze across both dialects: our protocol sees it, with who asked.
            let status = try TestClient(path: agent.socketPath).result(["op": "status"])
            #expect(status["state"] == "frozen" && status["mode"] == "detached")
            #expect(status["requested_by"]?.stringValue?.hasPrefix("unix uid=0") == true)
            let again = try c.call(#"{"execute":"guest-fsfreeze-freeze"}"#)
            #expect(again["error"]?["class"] == "GenericError")
            #expect(again["error"]?["desc"]?.stringValue?.hasPrefix("already-frozen") == true)
            #expect(try c.call(#"{"execute":"guest-fsfreeze-thaw"}"#) == ["return": 1])
            #expect(try !isFrozen(a))
            #expect(try c.call(#"{"execute":"guest-fsfreeze-thaw"}"#) == ["return": 0], "thawing when thawed answers 0")

            // Refusals keep their place in the reply order; the connection survives them.
            try c.send(#"{"execute":"guest-exec","arguments":{"path":"/bin/sh"},"id":1}"#)
            try c.send("not json")
            try c.send(#"{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":["/"]},"id":3}"#)
            try c.send(#"{"execute":"guest-ping","id":4}"#)
            let r1 = try c.reply(), r2 = try c.reply(), r3 = try c.reply(), r4 = try c.reply()
            #expect(r1["error"]?["class"] == "CommandNotFound" && r1["id"] == 1)
            #expect(r2["error"]?["class"] == "GenericError")
            #expect(r3["error"]?["desc"]?.stringValue?.contains("not-included") == true && r3["id"] == 3,
                    "the guest's scope binds qemu-ga's freeze list too: \(r3)")
            #expect(r4 == ["return": [:], "id": 4])
            let info = try c.call(#"{"execute":"guest-info"}"#)
            let names = info["return"]?["supported_commands"]?.arrayValue?.compactMap { $0["name"]?.stringValue } ?? []
            #expect(names.contains("guest-fsfreeze-freeze-list") && names.contains("guest-sync-delimited"))
            agent.stop()
        }
    }

    @Test("connections sending unfinished commands of up to 16 MiB share 32 MiB: the next is refused busy and closed, the agent's memory stays bounded, and it serves the rest")
    func largeCommandsShareOneBudget() async throws {
        try await LoopLab.with { lab in
            let qga = "\(lab.root)/qga.sock"
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--listen", "qga+unix:\(qga)"])
            // 15 MiB of a command whose end never comes.
            let head = Array(#"{"execute":"guest-file-write","arguments":{"handle":1,"buf-b64":""#.utf8)
            let partial = head + [UInt8](repeating: 0x41, count: 15 << 20)
            var held: [QGAClient] = []
            var refused: [JSON] = []
            for _ in 0..<12 {
                let c = try QGAClient(path: qga)
                try? FD.writeAll(c.fd, partial, timeoutMs: 30_000)
                if let reply = try? c.reply(timeoutMs: 2000) { refused.append(reply) } else { held.append(c) }
            }
            // Two 15 MiB commands fit in 32 MiB; every later one is refused, saying why.
            #expect(held.count == 2 && refused.count == 10, "held \(held.count), refused \(refused.count)")
            #expect(refused.allSatisfy { $0["error"]?["desc"]?.stringValue?.hasPrefix("busy: the agent already holds") == true }, "\(refused.first.map { "\($0)" } ?? "")")
            let rssKiB = Int(try sh("awk '/VmRSS/ {print $2}' /proc/\(agent.pid)/status").trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
            // Before: every connection held its 15 MiB (about 200 MB for these 12).
            #expect(rssKiB < 80 << 10, "RSS \(rssKiB) KiB")
            // The agent still answers, and a connection that gives its command up frees its share.
            #expect(try QGAClient(path: qga).call(#"{"execute":"guest-ping"}"#) == ["return": [:]])
            held.removeAll()
            let late = try QGAClient(path: qga)
            try? FD.writeAll(late.fd, partial, timeoutMs: 30_000)
            #expect((try? late.reply(timeoutMs: 1000)) == nil, "room again once the holders closed")
            #expect(agent.log.contains("qemu-ga command over 64 KiB refused"), "\(agent.log)")
        }
    }

    @Test("Proxmox's way: guest-sync-delimited, and a freeze that outlives its connection until thaw or --max-freeze")
    func proxmoxSequence() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let b = try lab.filesystem("b", type: "xfs")
            let qga = "\(lab.root)/qga.sock"
            let agent = try AgentProcess(in: lab.root, arguments: [
                "--include", "\(lab.root)/*", "--listen", "qga+unix:\(qga)", "--max-freeze", "3s"])
            func command(_ line: String) throws -> JSON {
                let c = try QGAClient(path: qga)  // Proxmox connects for each command
                try c.send(#"{"execute":"guest-sync-delimited","arguments":{"id":5151}}"#)
                #expect(try c.reply(delimited: true) == ["return": 5151])
                return try c.call(line)
            }
            #expect(try command(#"{"execute":"guest-ping"}"#) == ["return": [:]])
            #expect(try command(#"{"execute":"guest-fsfreeze-freeze"}"#) == ["return": 2])
            #expect(try isFrozen(a) && isFrozen(b), "still frozen after the connection closed")
            #expect(try command(#"{"execute":"guest-fsfreeze-thaw"}"#) == ["return": 2])
            #expect(try !isFrozen(a) && !isFrozen(b))

            // qemu-ga would stay frozen for good if the host never thawed; we thaw at --max-freeze.
            #expect(try command(#"{"execute":"guest-fsfreeze-freeze"}"#) == ["return": 2])
            try waitUntil(timeoutMs: 5000) { try !isFrozen(a) && !isFrozen(b) }
            let status = try TestClient(path: agent.socketPath).result(["op": "status"])
            #expect(status["last_auto_thaw"]?["reason"] == "deadline")
            // The host's late thaw fails, saying when and why, so it does not call its snapshot
            // quiesced (qemu-ga would answer 0); asked again, it is an ordinary thaw of nothing.
            let late = try command(#"{"execute":"guest-fsfreeze-thaw"}"#)
            let desc = late["error"]?["desc"]?.stringValue ?? ""
            #expect(late["error"]?["class"] == "GenericError")
            #expect(desc.hasPrefix("not-frozen: operation ") && desc.contains("was thawed by the agent before this thaw")
                    && desc.contains("because its deadline passed (3000 ms"), "\(late)")
            #expect(try command(#"{"execute":"guest-fsfreeze-thaw"}"#) == ["return": 0])
            agent.stop()
        }
    }

    @Test("commands sent back to back with no newline (older Proxmox, scripts) are each answered, in order")
    func noNewlines() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let qga = "\(lab.root)/qga.sock"
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--listen", "qga+unix:\(qga)"])
            let c = try QGAClient(path: qga)
            // Older Proxmox: sync-delimited and the command in one write, neither ending in a newline.
            try FD.writeAll(c.fd, Array(#"{"execute":"guest-sync-delimited","arguments":{"id":77}}{"execute":"guest-fsfreeze-freeze"}"#.utf8))
            #expect(try c.reply(delimited: true) == ["return": 77])
            #expect(try c.reply() == ["return": 1])
            #expect(try isFrozen(a))
            // A brace inside a string, escaped quotes, and a command split over two writes.
            let bytes = Array(#"{"execute":"guest-ping","id":"}\"{ ["}{"execute":"guest-fsfreeze-status"}{"execute":"guest-fsfreeze-thaw"}"#.utf8)
            try FD.writeAll(c.fd, Array(bytes[..<20]))
            usleep(50_000)
            try FD.writeAll(c.fd, Array(bytes[20...]))
            #expect(try c.reply() == ["return": [:], "id": "}\"{ ["], "the id with braces and a quote in it is echoed whole")
            #expect(try c.reply() == ["return": "frozen"])
            #expect(try c.reply() == ["return": 1])
            #expect(try !isFrozen(a))
            // Junk between objects gets an error and does not eat the next command.
            try FD.writeAll(c.fd, Array(#"nonsense{"execute":"guest-ping"}"#.utf8))
            #expect(try c.reply()["error"] != nil)
            #expect(try c.reply() == ["return": [:]])
            agent.stop()
        }
    }

    /// Before: commands 17 to 21 were refused busy at once, ahead of the freeze's answer, which
    /// a host sending no ids reads as its freeze's (trial E, B6).
    @Test("40 commands pipelined without ids, a slow freeze first: every answer comes in its turn (the agent stops reading while 16 wait), none is refused")
    func pipelinedCommandsAnswerInOrder() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let hooks = try makeHooks(in: lab.root, ["10-slow": "[ \"$1\" = freeze ] && sleep 1; exit 0"])
            let qga = "\(lab.root)/qga.sock"
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--listen", "qga+unix:\(qga)", "--hooks-dir", hooks])
            defer { agent.stop() }
            let c = try QGAClient(path: qga)
            var lines = [#"{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":["\#(a)"]}}"#]
            lines += Array(repeating: #"{"execute":"guest-fsfreeze-status"}"#, count: 38)
            lines.append(#"{"execute":"guest-fsfreeze-thaw"}"#)
            try FD.writeAll(c.fd, Array(lines.joined(separator: "\n").utf8) + [0x0A], timeoutMs: 5000)
            #expect(try c.reply() == ["return": 1], "the freeze's answer comes first")
            for i in 1...38 {
                let r = try c.reply()
                #expect(r == ["return": "frozen"], "status \(i): \(r)")
            }
            #expect(try c.reply() == ["return": 1], "the thaw comes last")
            #expect(try !isFrozen(a))
        }
    }

    @Test("an agent killed under a qemu-ga freeze and restarted: the host's late guest-fsfreeze-thaw fails once, saying the agent restarted")
    func lateThawAfterRestart() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let qga = "\(lab.root)/qga.sock"
            let args = ["--include", "\(lab.root)/*", "--listen", "qga+unix:\(qga)"]
            let agent = try AgentProcess(in: lab.root, arguments: args)
            #expect(try QGAClient(path: qga).call(#"{"execute":"guest-fsfreeze-freeze"}"#) == ["return": 1])
            agent.signal(SIGKILL)
            _ = agent.waitForExit()
            let again = try AgentProcess(in: lab.root, arguments: args, stateDir: agent.stateDir)
            defer { again.stop() }
            #expect(try !isFrozen(a), "start-up recovery thawed it")
            let c = try QGAClient(path: qga)
            let late = try c.call(#"{"execute":"guest-fsfreeze-thaw"}"#)
            #expect(late["error"]?["class"] == "GenericError", "libvirt must not record this snapshot as quiesced: \(late)")
            #expect(late["error"]?["desc"]?.stringValue?.contains("restarted") == true, "\(late)")
            #expect(try c.call(#"{"execute":"guest-fsfreeze-thaw"}"#) == ["return": 0], "told once")
        }
    }

    @Test("under systemd the thaw comes from ExecStopPost=quiesced --recover, or from a stop (SIGTERM): the next agent still fails the host's late guest-fsfreeze-thaw once, and only the agent it belongs to")
    func lateThawAfterRecoverOrStop() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let qga = "\(lab.root)/qga.sock"
            let state = "\(lab.root)/shared-state"
            let args = ["--include", "\(lab.root)/*", "--listen", "qga+unix:\(qga)"]
            // Killed, then the unit's ExecStopPost: the records are thawed before the restart.
            let agent = try AgentProcess(in: lab.root, arguments: args, stateDir: state)
            #expect(try QGAClient(path: qga).call(#"{"execute":"guest-fsfreeze-freeze"}"#) == ["return": 1])
            agent.signal(SIGKILL)
            _ = agent.waitForExit()
            _ = try sh("'\(buildProductsDir)/quiesced' --config /dev/null --recover --state-dir '\(state)' 2>&1")
            #expect(try !isFrozen(a))
            // Another agent sharing the state dir (quiesced.service beside quiesced-qga) starts
            // first: the note is not its own.
            let other = try AgentProcess(in: lab.root, name: "other", arguments: ["--include", "\(lab.root)/*"], stateDir: state)
            #expect(try TestClient(path: other.socketPath).result(["op": "status"])["last_auto_thaw"] == nil)
            other.stop()
            // Restarted twice before the host's thaw comes (a crash loop, an upgrade's stop and
            // start): the note is kept until the thaw it answers has been told.
            let between = try AgentProcess(in: lab.root, arguments: args, stateDir: state)
            between.signal(SIGKILL)
            _ = between.waitForExit()
            // Before: the restarted agent knew nothing, and answered {"return": 0}.
            var again = try AgentProcess(in: lab.root, arguments: args, stateDir: state)  // the same unit: the same listeners
            var late = try QGAClient(path: qga).call(#"{"execute":"guest-fsfreeze-thaw"}"#)
            #expect(late["error"]?["class"] == "GenericError" && late["error"]?["desc"]?.stringValue?.contains("restarted") == true, "\(late)")
            #expect(try QGAClient(path: qga).call(#"{"execute":"guest-fsfreeze-thaw"}"#) == ["return": 0], "told once")

            // Stopped (apt install --reinstall, systemctl restart): it thaws on SIGTERM and exits.
            #expect(try QGAClient(path: qga).call(#"{"execute":"guest-fsfreeze-freeze"}"#) == ["return": 1])
            again.signal(SIGTERM)
            #expect(again.waitForExit() == 0)
            #expect(try !isFrozen(a))
            again = try AgentProcess(in: lab.root, arguments: args, stateDir: state)
            late = try QGAClient(path: qga).call(#"{"execute":"guest-fsfreeze-thaw"}"#)
            #expect(late["error"]?["class"] == "GenericError" && late["error"]?["desc"]?.stringValue?.contains("the agent was stopped") == true, "\(late)")
            again.stop()
        }
    }

    @Test("qga+serial: on a pty port: resync with 0xFF and guest-sync-delimited; a freeze survives the host's hang-up")
    func serialPort() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let port = "\(lab.root)/port", chardev = "\(lab.root)/chardev.sock"
            let first = try plugSerialPort(port, chardev: chardev)
            defer { first.terminate() }
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--listen", "qga+serial:\(port)"])
            try waitUntil(timeoutMs: 3000) { agent.log.contains("serial port \(port) open") }
            var host: QGAClient? = try QGAClient(path: chardev)
            try FD.writeAll(host!.fd, Array(#"{"execute":"guest-pi"#.utf8) + [0xFF], timeoutMs: 2000)  // stale half-command, then reset
            try host!.send(#"{"execute":"guest-sync-delimited","arguments":{"id":77}}"#)
            #expect(try host!.reply(delimited: true, timeoutMs: 10_000) == ["return": 77])
            #expect(try host!.call(#"{"execute":"guest-fsfreeze-freeze"}"#) == ["return": 1])
            host = nil
            first.waitUntilExit()
            usleep(300_000)
            #expect(try isFrozen(a), "a qemu-ga freeze is not bound to the host's session")

            let second = try plugSerialPort(port, chardev: chardev)
            defer { second.terminate() }
            let again = try QGAClient(path: chardev)
            try again.send(#"{"execute":"guest-sync-delimited","arguments":{"id":78}}"#)
            #expect(try again.reply(delimited: true, timeoutMs: 10_000) == ["return": 78])
            #expect(try again.call(#"{"execute":"guest-fsfreeze-thaw"}"#) == ["return": 1])
            #expect(try !isFrozen(a))
            agent.stop()
        }
    }
}
