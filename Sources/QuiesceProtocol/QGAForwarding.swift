// What passing qemu-ga commands on to a private qemu-ga takes, as pure rules: the private
// connection's sync frames, which commands may run while the guest is frozen, and the
// `guest-info` union. The sockets are the agent's (QGAForwarder).

extension QGA {
    /// Commands qemu-ga declares with `'success-response': false` (qga/qapi-schema.json in QEMU):
    /// they answer only when they fail. A private qemu-ga that closes after one of them (the guest
    /// is going down) has not failed.
    public static let noResponseCommands: Set<String> = [
        "guest-shutdown", "guest-suspend-disk", "guest-suspend-ram", "guest-suspend-hybrid",
    ]

    /// Commands forwarded while the guest is frozen: they read the guest's state and write to no
    /// filesystem. qemu-ga itself, while frozen, allows only ping, info, sync, sync-delimited,
    /// fsfreeze-status and fsfreeze-thaw (`ga_freeze_allowlist` in QEMU's qga/main.c); the
    /// private qemu-ga does not know the guest is frozen, so the rule is applied here.
    public static let readOnlyCommands: Set<String> = [
        "guest-get-time", "guest-get-timezone", "guest-get-host-name", "guest-get-osinfo",
        "guest-get-users", "guest-get-vcpus", "guest-get-fsinfo", "guest-get-disks",
        "guest-network-get-interfaces", "guest-get-memory-blocks", "guest-get-memory-block-info",
        "guest-get-devices", "guest-get-diskstats", "guest-get-cpustats", "guest-exec-status",
        "guest-ssh-get-authorized-keys",
    ]

    /// The error qemu-ga gives for a command it disabled while frozen (class `CommandNotFound`,
    /// as QEMU's qmp_dispatch does for any disabled command), saying why quiesced disabled it.
    public static func disabledWhileFrozen(_ name: String) -> Failure {
        Failure("Command \(name) has been disabled: the agent is in frozen state "
                + "(only commands that write nothing are passed on to qemu-ga while frozen)",
                errorClass: Failure.commandNotFound)
    }

    /// A `guest-sync` for the private connection, tagged with its own `id` member so that its
    /// reply cannot be mistaken for a command's (`{"return":value,"id":"quiesced-sync-value"}`).
    public static func privateSync(_ value: Int64) -> (frame: [UInt8], tag: JSON) {
        let tag = JSON.string("quiesced-sync-\(value)")
        var command = QGA.Command.sync(id: value, delimited: false).json
        command["id"] = tag
        return (JSON.object(command).encodedLine(), tag)
    }

    /// Whether a reply line is the answer to the private sync tagged `tag`. Lines longer than a
    /// sync reply can be are not parsed.
    public static func isSyncReply(_ line: some Collection<UInt8>, tag: JSON) -> Bool {
        guard line.count <= 256, let reply = try? JSON.parse(line, maxDepth: 4) else { return false }
        return reply["id"] == tag && reply["return"] != nil
    }

    /// One entry of a private qemu-ga's `guest-info` command list.
    public struct ForwardedCommand: Sendable, Equatable {
        public var name: String
        public var enabled: Bool
        public var successResponse: Bool
        public init(name: String, enabled: Bool, successResponse: Bool) {
            self.name = name
            self.enabled = enabled
            self.successResponse = successResponse
        }
    }

    /// Reads the command list of a `guest-info` reply (`{"return":{"supported_commands":[…]}}`);
    /// nil when the reply is not one.
    public static func forwardedCommands(fromInfoReply reply: JSON) -> [ForwardedCommand]? {
        guard let list = reply["return"]?["supported_commands"]?.arrayValue else { return nil }
        return list.compactMap { entry in
            guard let name = entry["name"]?.stringValue else { return nil }
            return ForwardedCommand(name: name, enabled: entry["enabled"]?.boolValue ?? false,
                                    successResponse: entry["success-response"]?.boolValue ?? true)
        }
    }

    /// `guest-info`'s command list with a private qemu-ga behind us: ours (the freeze disabled while
    /// frozen, as qemu-ga has it), then
    /// each of its commands that we do not answer ourselves, enabled when it is enabled there and
    /// would be passed on now (while frozen, only `readOnlyCommands`).
    public static func supportedCommands(forwarding theirs: [ForwardedCommand], frozen: Bool) -> JSON {
        let ours = Set(CommandName.allCases.map(\.rawValue))
        var list = supportedCommands(frozen: frozen).arrayValue ?? []
        for c in theirs where !ours.contains(c.name) {
            let enabled = c.enabled && (!frozen || readOnlyCommands.contains(c.name))
            list.append(["name": .string(c.name), "enabled": .bool(enabled), "success-response": .bool(c.successResponse)])
        }
        return .array(list)
    }
}
