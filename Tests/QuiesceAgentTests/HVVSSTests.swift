// hv-vss:DEVICE against a stand-in for the kernel's hv_utils driver, on real loop filesystems.
//
// No Hyper-V host runs here. The stand-in plays the driver's side of /dev/vmbus/hv_vss byte for
// byte (include/uapi/linux/hyperv.h, drivers/hv/hv_snapshot.c): it expects the 12-byte
// VSS_OP_REGISTER1 message, answers the 4-byte version, then sends one 12-byte request at a time
// and waits for its 12-byte answer before the next, as the driver does. The device is a pty in
// raw mode behind a symlink (as udev would name it); unplugging closes the pty, which the agent
// sees as a hang-up, and plugging points the symlink at a new pty. Not the driver itself.
import Foundation
import QuiesceAgent
import QuiesceLinux
import QuiesceProtocol
import QuiesceTestSupport
import Testing

// Glibc's pty calls are hidden from Swift's Glibc module (they need _XOPEN_SOURCE); their C
// signatures are plain ints and a char pointer.
@_silgen_name("posix_openpt") private func c_posix_openpt(_ flags: Int32) -> Int32
@_silgen_name("grantpt") private func c_grantpt(_ fd: Int32) -> Int32
@_silgen_name("unlockpt") private func c_unlockpt(_ fd: Int32) -> Int32
@_silgen_name("ptsname") private func c_ptsname(_ fd: Int32) -> UnsafeMutablePointer<CChar>?

/// The kernel's side of /dev/vmbus/hv_vss, played on a pty.
final class HVVSSDriverStandIn {
    let link: String
    private let master: Int32
    private let slave: Int32
    private var closed = false

    init(link: String) throws {
        self.link = link
        master = c_posix_openpt(O_RDWR | O_NOCTTY)
        guard master >= 0, c_grantpt(master) == 0, c_unlockpt(master) == 0, let name = c_ptsname(master) else {
            throw LabError("cannot make a pty: errno \(errno)")
        }
        let slavePath = String(cString: name)
        // Held open by the stand-in for the pty's life, so that its raw mode stays and the
        // master never reads EIO while the agent has not opened the device yet.
        slave = open(slavePath, O_RDWR | O_NOCTTY)
        guard slave >= 0 else { throw LabError("cannot open \(slavePath): errno \(errno)") }
        var t = termios()
        tcgetattr(slave, &t)
        cfmakeraw(&t)
        tcsetattr(slave, TCSANOW, &t)
        unlink(link)
        guard symlink(slavePath, link) == 0 else { throw LabError("symlink \(link): errno \(errno)") }
    }

    /// Reads exactly `count` bytes from the agent within `timeoutMs`.
    func read(_ count: Int, timeoutMs: Int = 10_000) throws -> [UInt8] {
        var out: [UInt8] = []
        let deadline = monotonicNanos() + UInt64(timeoutMs) * 1_000_000
        while out.count < count {
            let now = monotonicNanos()
            guard now < deadline else { throw LabError("the agent sent \(out) and then nothing within \(timeoutMs) ms") }
            let ev = try FD.poll(master, for: .readable, timeoutMs: Int32((deadline - now) / 1_000_000) + 1)
            guard ev.contains(.readable) else { continue }
            var buf = [UInt8](repeating: 0, count: count - out.count)
            let n = try buf.withUnsafeMutableBytes { try FD.read(master, into: $0) }
            out += buf[0..<n]
        }
        return out
    }

    /// Nothing more from the agent for `ms`.
    func silent(forMs ms: Int32) throws -> Bool {
        !(try FD.poll(master, for: .readable, timeoutMs: ms).contains(.readable))
    }

    /// Takes the agent's registration and answers with the driver's version (VSS_OP_REGISTER1).
    func register(timeoutMs: Int = 10_000) throws -> [UInt8] {
        let registration = try read(12, timeoutMs: timeoutMs)
        var version = UInt32(129)
        try FD.writeAll(master, withUnsafeBytes(of: &version) { Array($0) })
        return registration
    }

    /// Sends one request as the driver builds it and returns the agent's 12-byte answer.
    func request(_ operation: UInt8, flags: UInt32 = 0, timeoutMs: Int = 20_000) throws -> (error: UInt32, bytes: [UInt8], sent: [UInt8]) {
        let sent = HVVSS.Message(operation: operation, flags: flags).bytes
        try FD.writeAll(master, sent)
        let answer = try read(12, timeoutMs: timeoutMs)
        let error = answer[0..<4].withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) }
        return (error, answer, sent)
    }

    /// The device goes away: the agent's end hangs up.
    func unplug() {
        guard !closed else { return }
        closed = true
        unlink(link)
        FD.close(master)
        FD.close(slave)
    }

    deinit { unplug() }
}

private let hvOK: UInt32 = 0
private let hvFail: UInt32 = 0x8000_4005
private let freezeOp: UInt8 = 5, thawOp: UInt8 = 6, hotBackupOp: UInt8 = 2

@Suite("hv-vss listen addresses")
struct HVVSSAddressTests {
    @Test("hv-vss: and hv-vss alone name /dev/vmbus/hv_vss; hv-vss:PATH names PATH")
    func parse() throws {
        #expect(try ListenAddress(parsing: "hv-vss:") == .hvVSS(device: "/dev/vmbus/hv_vss"))
        #expect(try ListenAddress(parsing: "hv-vss") == .hvVSS(device: "/dev/vmbus/hv_vss"))
        #expect(try ListenAddress(parsing: "hv-vss:/tmp/x").description == "hv-vss:/tmp/x")
        let out = try sh("'\(buildProductsDir)/quiesced' --config /dev/null --listen hv-vss: --check-config")
        #expect(out.contains("listen hv-vss:/dev/vmbus/hv_vss"), "\(out)")
    }
}

@Suite("hv-vss:DEVICE, against a stand-in for the hv_utils driver", .enabled(if: canUseLoopDevices, "needs root and loop devices"))
struct HVVSSTests {
    @Test("registers with VSS_OP_REGISTER1; HOT_BACKUP, FREEZE and THAW are answered per the driver's protocol; an unknown operation gets HV_E_FAIL")
    func registerFreezeThaw() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a"), b = try lab.filesystem("b", type: "xfs")
            let device = "\(lab.root)/hv_vss"
            let driver = try HVVSSDriverStandIn(link: device)
            defer { driver.unplug() }
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--listen", "hv-vss:\(device)"])
            defer { agent.stop() }

            #expect(try driver.register() == [129, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
            try waitUntil(timeoutMs: 3000) { agent.log.contains("registered with the hv_utils driver") }

            let hot = try driver.request(hotBackupOp)
            #expect(hot.error == hvOK && hot.bytes[4...] == hot.sent[4...], "HOT_BACKUP: supported, the rest of the message echoed")

            let start = monotonicNanos()
            let frozen = try driver.request(freezeOp)
            let freezeMs = (monotonicNanos() - start) / 1_000_000
            #expect(frozen.error == hvOK)
            #expect(freezeMs < 10_000, "answered well inside the driver's wait (\(freezeMs) ms)")
            #expect(try isFrozen(a) && isFrozen(b))
            let status = try TestClient(path: agent.socketPath).result(["op": "status"])
            #expect(status["state"] == "frozen" && status["mode"] == "bound")
            #expect(status["requested_by"]?.stringValue?.hasPrefix("hv-vss ") == true)

            let thawed = try driver.request(thawOp)
            #expect(thawed.error == hvOK)
            #expect(try !isFrozen(a) && !isFrozen(b))

            for op: UInt8 in [3, 0, 7, 200] {
                let unknown = try driver.request(op, flags: 0x5)
                #expect(unknown.error == hvFail, "operation \(op)")
                #expect(unknown.bytes[4...] == unknown.sent[4...])
            }
            #expect(agent.log.contains("GET_DM_INFO is not handled here: answered HV_E_FAIL"))
            #expect(agent.log.contains("operation 200 is not handled here"))

            // A THAW with no FREEZE of ours before it (the agent restarted mid-backup): we held
            // nothing for the host, so it is told the snapshot was not quiesced by us.
            #expect(try driver.request(thawOp).error == hvFail)
            #expect(agent.log.contains("THAW with no FREEZE of this agent before it"))
            #expect(try !isFrozen(a))

            // A second FREEZE before the THAW: the guest is frozen as asked (OK), and the one
            // THAW that follows thaws it; nothing waits for the deadline.
            #expect(try driver.request(freezeOp).error == hvOK)
            #expect(try driver.request(freezeOp).error == hvOK)
            #expect(try isFrozen(a))
            #expect(try driver.request(thawOp).error == hvOK)
            #expect(try !isFrozen(a) && !isFrozen(b))
            // (The log is held while frozen, so the warning shows after the thaw.)
            try waitUntil(timeoutMs: 3000) { agent.log.contains("FREEZE while this device's freeze still holds") }
            #expect(try driver.silent(forMs: 200), "one answer per request")
        }
    }

    @Test("a FREEZE the host never thaws is thawed at --max-freeze, and the late THAW is answered HV_E_FAIL saying why")
    func freezeWithoutThaw() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let device = "\(lab.root)/hv_vss"
            let driver = try HVVSSDriverStandIn(link: device)
            defer { driver.unplug() }
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--listen", "hv-vss:\(device)",
                                                                   "--max-freeze", "2s"])
            defer { agent.stop() }
            _ = try driver.register()
            #expect(try driver.request(freezeOp).error == hvOK)
            #expect(try isFrozen(a))
            // Watched through the agent's status rather than by probing the filesystem every few
            // milliseconds while it is frozen.
            let watcher = try TestClient(path: agent.socketPath)
            var status: JSONObject = [:]
            try waitUntil(timeoutMs: 4000) {
                status = try watcher.result(["op": "status"])
                return status["state"] == "thawed"
            }
            #expect(status["last_auto_thaw"]?["reason"] == "deadline", "\(status)\n\(agent.log)")
            #expect(try !isFrozen(a))

            #expect(try driver.request(thawOp).error == hvFail)
            #expect(agent.log.contains("THAW answered HV_E_FAIL"))
            #expect(agent.log.contains("because its deadline passed"))
            // The next backup starts afresh.
            #expect(try driver.request(freezeOp).error == hvOK)
            #expect(try driver.request(thawOp).error == hvOK)
            #expect(try !isFrozen(a))
        }
    }

    @Test("a device that goes away thaws the freeze bound to it; the agent reopens and registers again when it comes back, and the late THAW fails")
    func deviceGoesAwayAndComesBack() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let device = "\(lab.root)/hv_vss"
            // The device is not there yet when the agent starts (hv_utils loads later).
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--listen", "hv-vss:\(device)"])
            defer { agent.stop() }
            try waitUntil(timeoutMs: 3000) { agent.log.contains("waiting for it") }

            let first = try HVVSSDriverStandIn(link: device)
            defer { first.unplug() }
            _ = try first.register()
            #expect(try first.request(freezeOp).error == hvOK)
            #expect(try isFrozen(a))
            first.unplug()
            try waitUntil(timeoutMs: 5000) { try !isFrozen(a) }

            let second = try HVVSSDriverStandIn(link: device)
            defer { second.unplug() }
            #expect(try second.register(timeoutMs: 5000) == HVVSS.registerMessage)
            #expect(try second.request(thawOp).error == hvFail, "the freeze ended with the device: the host must hear so")
            #expect(agent.log.contains("because the connection (or device session) it was bound to closed"))
            #expect(try second.request(freezeOp).error == hvOK)
            #expect(try isFrozen(a))
            #expect(try second.request(thawOp).error == hvOK)
            #expect(try !isFrozen(a))
        }
    }

    @Test("a device that is not there is waited for with no timer: the idle agent does not wake, and registers once it appears")
    func missingDeviceCostsNoWakeups() async throws {
        try await LoopLab.with { lab in
            _ = try lab.filesystem("a")
            let device = "\(lab.root)/vmbus/hv_vss"  // its directory is missing too, as without hv_utils
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--listen", "hv-vss:\(device)"])
            defer { agent.stop() }
            try waitUntil(timeoutMs: 3000) { agent.log.contains("waiting for it") }
            usleep(300_000)
            let before = try contextSwitches(of: agent.pid)
            usleep(3_200_000)
            let switches = try contextSwitches(of: agent.pid) - before
            // Retrying once a second made 3 here; an inotify watch makes none.
            #expect(switches <= 1, "\(switches) context switches in 3.2 s waiting for a missing device")
            try FileManager.default.createDirectory(atPath: "\(lab.root)/vmbus", withIntermediateDirectories: true)
            let driver = try HVVSSDriverStandIn(link: device)
            defer { driver.unplug() }
            #expect(try driver.register(timeoutMs: 5000) == HVVSS.registerMessage)
        }
    }

    @Test("an agent restarted between FREEZE and THAW registers again and answers the THAW HV_E_FAIL: it held nothing for the host")
    func restartMidBackup() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            let device = "\(lab.root)/hv_vss"
            let driver = try HVVSSDriverStandIn(link: device)
            defer { driver.unplug() }
            let args = ["--include", "\(lab.root)/*", "--listen", "hv-vss:\(device)"]
            let first = try AgentProcess(in: lab.root, arguments: args)
            defer { first.stop() }
            _ = try driver.register()
            #expect(try driver.request(freezeOp).error == hvOK)
            #expect(try isFrozen(a))
            first.signal(SIGTERM)
            #expect(first.waitForExit() == 0)
            #expect(try !isFrozen(a), "SIGTERM thaws")

            let second = try AgentProcess(in: lab.root, name: "agent2", arguments: args)
            defer { second.stop() }
            #expect(try driver.register() == HVVSS.registerMessage)
            #expect(try driver.request(thawOp).error == hvFail)
            #expect(try driver.request(freezeOp).error == hvOK)
            #expect(try driver.request(thawOp).error == hvOK)
            #expect(try !isFrozen(a))
        }
    }

    @Test("a device path that is not a character device (a disk image, by a typo) is never opened: nothing is written to it, nothing freezes")
    func refusesWhatIsNotACharacterDevice() async throws {
        try await LoopLab.with { lab in
            let a = try lab.filesystem("a")
            // A file full of bytes that would read as FREEZE requests, and the image under `a` itself.
            let decoy = "\(lab.root)/decoy"
            try sh("printf '\\005\\000\\000\\000\\000\\000\\000\\000\\000\\000\\000\\000%.0s' $(seq 64) > '\(decoy)'")
            let image = "\(lab.root)/a.img"
            let before = try sh("md5sum '\(decoy)' '\(image)'")
            let agent = try AgentProcess(in: lab.root, arguments: [
                "--include", "\(lab.root)/*", "--listen", "hv-vss:\(decoy)", "--listen", "serial:\(image)"])
            defer { agent.stop() }
            try waitUntil(timeoutMs: 5000) {
                agent.log.contains("\(decoy) (not a character device)") && agent.log.contains("\(image) (not a character device)")
            }
            usleep(500_000)
            #expect(try sh("md5sum '\(decoy)' '\(image)'") == before, "neither file was written")
            #expect(try !isFrozen(a))
            let status = try TestClient(path: agent.socketPath).result(["op": "status"])
            #expect(status["state"] == "thawed")
        }
    }
}
