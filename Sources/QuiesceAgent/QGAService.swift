// The qemu-ga dialect's commands, carried out by the same state actor as our own protocol's.
import QuiesceLinux
import QuiesceProtocol

/// Runs qemu-ga commands (from `qga+unix:` and `qga+serial:` listeners) against the agent.
///
/// Differences from qemu-ga, on purpose:
/// - A freeze is detached (a host such as Proxmox reconnects between freeze and thaw) but still
///   has a deadline: the agent's --max-freeze. qemu-ga would stay frozen until told otherwise.
/// - `guest-fsfreeze-freeze-list` with a mountpoint that is not a mount, or that the guest's
///   scope leaves out, is an error that freezes nothing; qemu-ga silently skips such entries.
/// - A `guest-fsfreeze-thaw` that comes after the agent thawed the dialect's last freeze by
///   itself (deadline, signal) fails, saying when and why, so the host does not call its
///   snapshot quiesced. qemu-ga would answer 0.
/// - One freeze at a time across both dialects: a freeze taken through our protocol makes
///   `guest-fsfreeze-status` answer "frozen", and a qga freeze shows in our `status`.
///
/// With `qga-forward`, every other command goes to a private qemu-ga (`QGAForwarder`), and
/// `guest-info` lists the union of both agents' commands.
enum QGAService {
    /// The reply bytes for one command (for `guest-sync-delimited`, preceded by 0xFF).
    static func execute(_ command: QGA.Command, id: JSON?, state: AgentState, context: RequestContext,
                        forwarder: QGAForwarder? = nil) async -> [UInt8] {
        switch command {
        case .sync(let value, let delimited):
            let reply = QGA.returnFrame(.int(value), id: id)
            return delimited ? [0xFF] + reply : reply
        case .ping:
            return QGA.returnFrame(.object([:]), id: id)
        case .info:
            let frozen = await state.status().state != .thawed
            var commands = QGA.supportedCommands(frozen: frozen)
            if let forwarder, let theirs = await Threads.run({ forwarder.commands() }) {
                commands = QGA.supportedCommands(forwarding: theirs, frozen: frozen)
            }
            // `quiesce`, a member qemu-ga's guest-info lacks, tells a host that reads it (quiescectl)
            // which agent this is and its deadline; hosts that do not know it ignore it.
            let marker: JSONObject = ["agent": "quiesced", "version": .string(QuiesceRelease.version),
                                      "protocol": .int(ProtocolVersion.current), "max_freeze_ms": .int(state.config.maxFreezeMs)]
            return QGA.returnFrame(["version": .string(QuiesceRelease.version), "supported_commands": commands,
                                    "quiesce": .object(marker)], id: id)
        case .fsfreezeStatus:
            // "thawed" once the filesystems are, while the thaw hooks still run: qemu-ga too
            // marks itself thawed before it runs its fsfreeze-hook's thaw (qga/commands-posix.c).
            let status = await state.status()
            let thawedNow = status.state == .thawed || (status.state == .thawing && status.thawedAtMs != nil)
            return QGA.returnFrame(QGA.freezeStatus(frozen: !thawedNow), id: id)
        case .fsfreezeFreeze(let mountpoints):
            return countOrError(await state.qgaFreeze(mounts: mountpoints, context: context), id: id)
        case .fsfreezeThaw:
            switch await state.qgaThaw() {
            case .success(let r):
                // As qemu-ga counts: the filesystems its FITHAW thawed. One that something else
                // had thawed already (EINVAL) is not counted, so a host that compares the count
                // with the freeze's sees that the freeze did not hold.
                return QGA.returnFrame(.int(Int64(r.filesystems.filter { $0.thawedElsewhere != true }.count)), id: id)
            case .failure(let e): return countOrError(Reply(id: nil, error: e), id: id)
            }
        }
    }

    /// Passes a command this dialect does not implement to the private qemu-ga and returns its
    /// reply unchanged, nil when the command answered nothing (`guest-shutdown` that succeeded),
    /// or an error naming the forwarder when it is missing, stuck or broken. While frozen only
    /// `QGA.readOnlyCommands` are passed on, within `QGAForwarder.frozenTimeoutMs`; the others
    /// are refused the way qemu-ga refuses them while frozen.
    static func forward(_ frame: [UInt8], name: String, id: JSON?, forwarder: QGAForwarder, state: AgentState,
                        onFailure: @Sendable (String) -> Void) async -> [UInt8]? {
        let frozen = await state.status().state != .thawed
        if frozen && !QGA.readOnlyCommands.contains(name) {
            return QGA.errorFrame(QGA.disabledWhileFrozen(name), id: id)
        }
        let timeoutMs = frozen ? min(forwarder.timeoutMs, QGAForwarder.frozenTimeoutMs) : forwarder.timeoutMs
        switch await Threads.run({ forwarder.call(frame: frame, name: name, timeoutMs: timeoutMs) }) {
        case .reply(let bytes):
            return bytes
        case .noReply:
            return nil
        case .failed(let why):
            onFailure(why)
            return QGA.errorFrame(QGA.Failure("\(name) is passed on to qemu-guest-agent at unix:\(forwarder.path) "
                                              + "(qga-forward), which failed: \(why)"), id: id)
        }
    }

    /// qemu-ga answers freeze and thaw with the number of filesystems concerned.
    private static func countOrError(_ reply: Reply, id: JSON?) -> [UInt8] {
        switch reply.outcome {
        case .success(let result):
            return QGA.returnFrame(.int(Int64(result["filesystems"]?.arrayValue?.count ?? 0)), id: id)
        case .failure(let error):
            return QGA.errorFrame(QGA.Failure(error), id: id)
        }
    }
}
