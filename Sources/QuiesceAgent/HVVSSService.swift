// Hyper-V's VSS channel (`hv-vss:DEVICE`): the hv_utils driver's FREEZE and THAW through our freeze.
import QuiesceLinux
import QuiesceProtocol
import Logging

extension Server {
    /// Serves the Hyper-V VSS device (`/dev/vmbus/hv_vss`) on a thread of its own, in place of
    /// `hv_vss_daemon`: registers with `VSS_OP_REGISTER1`, then answers each request of the driver
    /// in turn. The device may be missing at start (hv_utils not loaded yet), busy (another daemon
    /// holds it) or go away (driver reset, hibernation): it is reopened and registered again.
    public func serve(hvVSSDevice path: String) {
        Threads.detach(name: "hv-vss") { [self] in HVVSSChannel(server: self, path: path).run() }
    }
}

/// One hv-vss listener. Used by its own thread only.
///
/// - FREEZE is a `bound` freeze of every filesystem in the agent's scope, through the same state
///   actor as every other listener (hooks, stacking order, parallel waves), with the agent's
///   --max-freeze as its deadline. Bound to one open of the device: when the device goes away or
///   the agent closes it, the freeze thaws (hv_vss_daemon thaws on reopen as well, and the driver
///   fails the host's pending request when the device is closed), unless thaw-on-disconnect=no.
/// - THAW thaws that freeze. If the agent already ended it by itself (deadline, lost device,
///   signal), THAW is answered HV_E_FAIL and the log says when and why: the host's checkpoint
///   was not quiesced throughout. A THAW with no freeze of ours (this agent restarted since the
///   FREEZE, or took over the device from hv_vss_daemon mid-backup) thaws nothing and is answered
///   HV_E_FAIL too, for the same reason; hv_vss_daemon answers HV_S_OK there. (The THAW the
///   driver fakes before hibernating is never answered at all: the driver refuses the write and
///   the device is reopened.)
/// - HOT_BACKUP is answered HV_S_OK: the guest supports backup (the driver adds the
///   "no auto-recovery" flag itself). Any other operation is answered HV_E_FAIL and logged
///   (hv_vss_daemon answers HV_S_OK to what it does not know; we never claim what we did not do).
final class HVVSSChannel {
    let server: Server
    let path: String
    var logger: Logger
    /// The freeze whose THAW the host owes, across reopenings of the device.
    private var opID: String?
    private var freezes: UInt64 = 0

    init(server: Server, path: String) {
        self.server = server
        self.path = path
        logger = server.logger
        logger[metadataKey: "listener"] = "hv-vss:\(path)"
    }

    func run() {
        var lastOpenError: String?
        var retry = RetryBackoff()
        while true {
            let fd: Int32
            do {
                fd = try FD.openCharacterDevice(path, [.readWrite, .noControllingTerminal])
                lastOpenError = nil
                retry.reset()
            } catch {
                let text = "\(error)"
                if text != lastOpenError {
                    let hint = error.errno == .EBUSY ? " (another daemon, hv_vss_daemon?, holds it)" : ""
                    logger.warning("Hyper-V VSS device \(path): \(error)\(hint); waiting for it")
                    lastOpenError = text
                }
                // A missing device (hv_utils not loaded, not a Hyper-V guest) is waited for
                // through inotify, with no timer; other errors back off from 1 s to 1 min.
                if !Paths.exists(path), (try? PathWatch.waitUntilExists(path)) != nil { continue }
                retry.sleep()
                continue
            }
            let session = server.nextID.add(1, ordering: .relaxed).oldValue
            let why = serve(fd: fd, session: session)
            FD.close(fd)
            // A freeze bound to this device session thaws now, before the next session starts.
            let state = server.state
            blockingAwait { await state.connectionClosed(session) }
            logger.warning("Hyper-V VSS device \(path): \(why); reopening")
            Threads.sleep(milliseconds: 500)
        }
    }

    /// Registers and answers requests until the device fails. Returns why it stopped.
    private func serve(fd: Int32, session: ConnectionID) -> String {
        do {
            try FD.writeAll(fd, HVVSS.registerMessage)
        } catch {
            return "registration (VSS_OP_REGISTER1) refused: \(error)"
        }
        var decoder = HVVSS.Decoder()
        var buffer = [UInt8](repeating: 0, count: 256)
        while true {
            let ev: PollEvents
            do { ev = try FD.poll(fd, for: .readable, timeoutMs: -1) } catch { return "\(error)" }
            if !ev.isDisjoint(with: [.error, .invalid]) { return "the device reports an error" }
            if !ev.contains(.readable) && ev.contains(.hangUp) { return "the device hung up" }
            let n: Int
            do { n = try buffer.withUnsafeMutableBytes { try FD.read(fd, into: $0) } } catch { return "\(error)" }
            if n == 0 { return "end of file on the device" }
            decoder.feed(buffer[0..<n])
            while let input = decoder.next() {
                switch input {
                case .version(let v):
                    logger.info("Hyper-V VSS device \(path) open: registered with the hv_utils driver (its answer: \(v))")
                case .message(let m):
                    let error = answer(m, session: session)
                    do {
                        try FD.writeAll(fd, m.answer(error))
                    } catch {
                        // EINVAL: the driver's wait ran out and it answered the host itself, or it
                        // faked a THAW before hibernating. hv_vss_daemon resets the device then too.
                        return "the driver did not take the answer to \(Self.name(m)): \(error)"
                    }
                }
            }
        }
    }

    static func name(_ m: HVVSS.Message) -> String { m.operation?.name ?? "operation \(m.operationCode)" }

    /// Carries out one request; returns the `error` to answer with.
    private func answer(_ m: HVVSS.Message, session: ConnectionID) -> Int32 {
        let state = server.state
        switch m.operation {
        case .hotBackup?:
            logger.info("Hyper-V VSS: HOT_BACKUP (flags 0x\(String(m.flags, radix: 16))): answered supported")
            return HVVSS.ok
        case .freeze?:
            // A FREEZE while this device's freeze still holds (the host lost track of it, or
            // retried): the guest is frozen as asked, so it is answered OK and the freeze
            // continues under its deadline, for the THAW to end. Failing it would leave the
            // guest frozen with the host believing otherwise, until max-freeze.
            if let held = opID {
                let status = blockingAwait { await state.status() }
                if status.state == .frozen && status.opID == held {
                    logger.warning("Hyper-V VSS: FREEZE while this device's freeze still holds: answered OK; the freeze continues until THAW or its deadline",
                                   metadata: ["op_id": "\(held)"])
                    return HVVSS.ok
                }
            }
            freezes += 1
            let op = "hv-vss-\(wallClockMillis())-\(freezes)"
            opID = nil
            let request = Request(id: nil, .freeze(FreezeRequest(mounts: nil, timeoutMs: nil, opID: op, mode: .bound)))
            let context = RequestContext(connection: session, peer: .hvVSS(path: path))
            let reply = blockingAwait { await state.handle(request, context: context) }
            switch reply.outcome {
            case .success(let result):
                opID = op
                let count = result["filesystems"]?.arrayValue?.count ?? 0
                logger.info("Hyper-V VSS: FREEZE: froze \(count) filesystems", metadata: ["op_id": "\(op)"])
                return HVVSS.ok
            case .failure(let e):
                logger.error("Hyper-V VSS: FREEZE failed, answered HV_E_FAIL: \(e.code): \(e.message)", metadata: ["op_id": "\(op)"])
                return HVVSS.fail
            }
        case .thaw?:
            guard let op = opID else {
                logger.warning("Hyper-V VSS: THAW with no FREEZE of this agent before it (restarted, or took the device over mid-backup): answered HV_E_FAIL, nothing thawed")
                return HVVSS.fail
            }
            opID = nil
            switch blockingAwait({ await state.thaw(opID: op, reason: .request) }) {
            case .success(let r):
                logger.info("Hyper-V VSS: THAW: thawed \(r.filesystems.count) filesystems", metadata: ["op_id": "\(op)"])
                return HVVSS.ok
            case .failure(let e):
                logger.error("Hyper-V VSS: THAW answered HV_E_FAIL: \(e.code): \(e.message)", metadata: ["op_id": "\(op)"])
                return HVVSS.fail
            }
        default:
            logger.warning("Hyper-V VSS: \(Self.name(m)) is not handled here: answered HV_E_FAIL")
            return HVVSS.fail
        }
    }
}

/// Runs async work from a plain thread and waits for its result.
func blockingAwait<T: Sendable>(_ body: @escaping @Sendable () async -> T) -> T {
    let box = Mailbox<T>()
    Task { box.post(await body()) }
    return box.receive()!
}
