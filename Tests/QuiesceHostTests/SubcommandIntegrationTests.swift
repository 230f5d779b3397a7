// quiescectl's simple subcommands against a real quiesced on real loop filesystems this test creates.
import Foundation
import QuiesceProtocol
import QuiesceHost
import QuiesceTestSupport
import Testing

/// Safety: the agent runs with --include limited to the lab, so nothing else can freeze.
@Suite("quiescectl freeze, thaw, filesystems and sync against a real agent",
       .enabled(if: canUseLoopDevices, "needs root and loop devices"))
struct SubcommandIntegrationTests {
    @Test("`quiescectl freeze` freezes exactly the lab's superblocks; `quiescectl thaw` leaves nothing frozen")
    func freezeThawWholeScope() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let b = try lab.filesystem("b", type: "xfs")
            let bind = try lab.mount("a-bind", "--bind '\(a)'")
            let tmp = try lab.mount("tmp", "-t tmpfs tmpfs")
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
            defer { agent.stop() }
            let dir = TempDir()
            let ctl = ["--agent", "unix:\(agent.socketPath)"]

            let plan = try Ctl.run(ctl + ["--json", "filesystems"], in: dir)
            #expect(plan.status == 0, "\(plan.stderr)")
            let text = try Ctl.run(ctl + ["filesystems"], in: dir)
            #expect(text.stdout.contains(a) && text.stdout.contains(b) && text.stdout.contains(tmp), "skipped mounts are shown with why")

            let frozen = try Ctl.run(ctl + ["freeze", "--timeout", "60s"], in: dir)
            #expect(frozen.status == 0, "\(frozen.stderr)")
            #expect(try isFrozen(a) && isFrozen(b) && isFrozen(bind))
            let status = try Ctl.run(ctl + ["--json", "status"], in: dir)
            #expect(status.stdout.contains("\"frozen\""), "\(status.stdout)")

            let thawed = try Ctl.run(ctl + ["thaw"], in: dir)
            #expect(thawed.status == 0, "\(thawed.stderr)")
            #expect(try !isFrozen(a) && !isFrozen(b))
        }
    }

    @Test("the thaw command freeze prints works as pasted; thaw --op-id of an operation that holds nothing exits 70, of one while another holds the freeze 72; a refused peer exits 70")
    func thawHintsAndExitCodes() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
            defer { agent.stop() }
            let dir = TempDir()
            let ctl = ["--agent", "unix:\(agent.socketPath)"]
            let nothing = try Ctl.run(ctl + ["thaw", "--op-id", "nosuch"], in: dir)
            #expect(nothing.status == ExitCodes.freezeFailed, "nothing is frozen: not a failed thaw (\(nothing.status)): \(nothing.stderr)")

            let frozen = try Ctl.run(ctl + ["freeze", "--op-id", "held op", "--timeout", "60s"], in: dir)
            #expect(frozen.status == 0, "\(frozen.stderr)")
            let other = try Ctl.run(ctl + ["thaw", "--op-id", "other"], in: dir)
            #expect(other.status == ExitCodes.thawFailed, "the guest stays frozen by another operation: \(other.stderr)")
            #expect(try isFrozen(a))
            // The printed command, run by a shell as a user would paste it.
            let hint = try #require(frozen.stdout.split(separator: "\n").first { $0.contains("unless thawed: ") })
            let command = String(hint[hint.range(of: "unless thawed: ")!.upperBound...])
            #expect(command.hasPrefix("quiescectl --agent unix:"), "\(command)")
            let pasted = try sh("PATH='\(buildProductsDir)':$PATH \(command) >/dev/null 2>&1; echo $?")
            #expect(pasted.trimmingCharacters(in: .whitespacesAndNewlines) == "0", "\(command)")
            #expect(try !isFrozen(a))

            let picky = try AgentProcess(in: lab.root, name: "picky", arguments: ["--include", "\(lab.root)/*", "--allow-uid", "4242"])
            defer { picky.stop() }
            let refused = try Ctl.run(["--agent", "unix:\(picky.socketPath)", "status"], in: dir)
            #expect(refused.status == ExitCodes.freezeFailed, "reached and refused, not unreachable: \(refused.stderr)")
            #expect(refused.stderr.contains("allow-uid"), "\(refused.stderr)")
        }
    }

    @Test("`quiescectl freeze --mount A --mount B` freezes exactly A and B")
    func freezeExplicitMounts() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let b = try lab.filesystem("b")
            let c = try lab.filesystem("c")
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
            defer { agent.stop() }
            let dir = TempDir()
            let ctl = ["--agent", "unix:\(agent.socketPath)"]
            let r = try Ctl.run(ctl + ["freeze", "--mount", a, "--mount", b, "--timeout", "60s"], in: dir)
            #expect(r.status == 0, "\(r.stderr)")
            #expect(try isFrozen(a) && isFrozen(b))
            #expect(try !isFrozen(c))
            #expect(try Ctl.run(ctl + ["thaw"], in: dir).status == 0)
            #expect(try !isFrozen(a) && !isFrozen(b))

            let bad = try Ctl.run(ctl + ["freeze", "--mount", a, "--mount", "\(lab.root)/nowhere"], in: dir)
            #expect(bad.status == 70)
            #expect(bad.stdout.contains("unknown-mount") || bad.stderr.contains("unknown-mount"), "\(bad.stdout)\(bad.stderr)")
            #expect(try !isFrozen(a), "a bad mount in the list freezes nothing")
        }
    }

    // The real qemu-ga is driven in the guest VM test (scripts/vm/run-guest-test): on this
    // machine it would freeze everything it sees. Here the peer is quiesced's own qga+unix:
    // listener, whose include scope keeps every freeze inside the lab.
    @Test("--agent qga:unix: speaks qemu-ga's protocol: info, status, freeze --mount, thaw, checkpoint; filesystems refused")
    func qgaAgent() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let b = try lab.filesystem("b")
            let qga = "\(lab.root)/qga.sock"
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--listen", "qga+unix:\(qga)"])
            defer { agent.stop() }
            let dir = TempDir()
            let ctl = ["--agent", "qga:unix:\(qga)"]
            let info = try Ctl.run(ctl + ["info"], in: dir)
            // The agent on qemu-ga's port is quiesced, and says so in guest-info.
            #expect(info.status == 0 && info.stdout.contains("agent: quiesced") && info.stdout.contains("freeze-list"), "\(info.stdout)\(info.stderr)")

            let frozen = try Ctl.run(ctl + ["freeze", "--mount", a], in: dir)
            #expect(frozen.status == 0 && frozen.stdout.contains("frozen 1 filesystem (\(a))"), "\(frozen.stdout)\(frozen.stderr)")
            #expect(try isFrozen(a) && !isFrozen(b))
            // Frozen, the agent lists guest-fsfreeze-freeze disabled, as qemu-ga does: info,
            // status and thaw must still work (a frozen guest must never be out of reach).
            let infoFrozen = try Ctl.run(ctl + ["info"], in: dir)
            #expect(infoFrozen.status == 0, "\(infoFrozen.stdout)\(infoFrozen.stderr)")
            #expect(try Ctl.run(ctl + ["--json", "status"], in: dir).stdout.contains("\"state\":\"frozen\""))
            #expect(try Ctl.run(ctl + ["thaw"], in: dir).status == 0)
            #expect(try !isFrozen(a))

            let marker = dir.file("ran")
            let ck = try Ctl.run(ctl + ["checkpoint", "--", "sh", "-c", "fsfreeze -f '\(a)' 2>/dev/null || touch '\(marker)'"], in: dir)
            #expect(ck.status == 0, "\(ck.stderr)")
            #expect(FileManager.default.fileExists(atPath: marker), "COMMAND ran while qemu-ga's freeze held (a second FIFREEZE failed)")
            // quiesced thaws at its max-freeze: the warning for qemu-ga itself does not apply
            // (HostileGuestTests.qgaThawOfOthersFreezeIsTold has it for qemu-ga).
            #expect(!ck.stderr.contains("qemu-ga has no deadline"), "\(ck.stderr)")
            #expect(try !isFrozen(a) && !isFrozen(b))

            let fs = try Ctl.run(ctl + ["filesystems"], in: dir)
            #expect(fs.status == 70 && fs.stderr.contains("qemu-ga cannot do filesystems"), "\(fs.stderr)")
        }
    }

    @Test("checkpoint through qemu-ga's dialect whose freeze the agent's deadline ended: exit 70, the freeze did not hold, nothing frozen (not 72)")
    func qgaDeadlineDuringCommand() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let qga = "\(lab.root)/qga.sock"
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--listen", "qga+unix:\(qga)", "--max-freeze", "1s"])
            defer { agent.stop() }
            let r = try Ctl.run(["--agent", "qga:unix:\(qga)", "checkpoint", "--", "sleep", "2.5"], in: TempDir())
            #expect(r.status == 70, "exit 70: the freeze did not hold. \(r.stderr)")
            #expect(r.stderr.contains("the freeze did not hold") && r.stderr.contains("deadline"), "\(r.stderr)")
            #expect(!r.stderr.contains("THAW FAILED"), "\(r.stderr)")
            #expect(try !isFrozen(a))
        }
    }

    @Test("`quiescectl sync` flushes without freezing")
    func syncWithoutFreezing() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            try lab.dirty(a, mb: 2)
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*"])
            defer { agent.stop() }
            let r = try Ctl.run(["--agent", "unix:\(agent.socketPath)", "sync", "--mount", a], in: TempDir())
            #expect(r.status == 0, "\(r.stderr)")
            #expect(r.stdout.contains("synced 1 filesystem"))
            #expect(try !isFrozen(a))
        }
    }
}
