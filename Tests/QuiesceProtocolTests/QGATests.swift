// qemu-ga's dialect: commands as libvirt and Proxmox send them, and the replies they expect.
@testable import QuiesceProtocol
import Testing

@Suite("qemu-ga dialect")
struct QGATests {
    private func decode(_ text: String) -> Result<QGA.Decoded, QGA.Refusal> { QGA.decode(frame: Array(text.utf8)) }

    @Test("a refusal travels as GenericError \"CODE: MESSAGE\" and reads back as the same code and message; qemu-ga's own errors carry none")
    func refusalRoundTrip() {
        let refusal = ProtocolError(.notFrozen, "operation op-1 was thawed by the agent before this thaw: because its deadline passed")
        let failure = QGA.Failure(refusal)
        #expect(failure.errorClass == QGA.Failure.genericError)
        #expect(failure.desc == "not-frozen: operation op-1 was thawed by the agent before this thaw: because its deadline passed")
        #expect(failure.refusal?.code == .notFrozen && failure.refusal?.message == refusal.message)
        #expect(QGA.Failure("Command guest-exec has been disabled").refusal == nil)
        #expect(QGA.Failure("frobnicate: not a code of ours").refusal == nil)
        #expect(QGA.Failure("not-frozen: x", errorClass: QGA.Failure.commandNotFound).refusal == nil)
    }

    @Test("the commands hosts send around snapshots decode, with the request id kept for the reply")
    func commands() throws {
        let cases: [(String, QGA.Command, JSON?)] = [
            (#"{"execute":"guest-sync","arguments":{"id":1234567890123}}"#, .sync(id: 1_234_567_890_123, delimited: false), nil),
            (#"{"execute":"guest-sync-delimited","arguments":{"id":7}}"#, .sync(id: 7, delimited: true), nil),
            (#"{"execute":"guest-ping","id":"p1"}"#, .ping, "p1"),
            (#"{"execute":"guest-info"}"#, .info, nil),
            (#"{"execute":"guest-fsfreeze-status","id":3}"#, .fsfreezeStatus, 3),
            (#"{"execute":"guest-fsfreeze-freeze"}"#, .fsfreezeFreeze(mountpoints: nil), nil),
            (#"{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":["/","/srv"]}}"#, .fsfreezeFreeze(mountpoints: ["/", "/srv"]), nil),
            (#"{"execute":"guest-fsfreeze-freeze-list"}"#, .fsfreezeFreeze(mountpoints: nil), nil),
            (#"{"execute":"guest-fsfreeze-thaw","arguments":null}"#, .fsfreezeThaw, nil),
        ]
        for (text, command, id) in cases {
            let decoded = try decode(text).get()
            #expect(decoded.command == command, "\(text)")
            #expect(decoded.id == id, "\(text)")
        }
    }

    @Test("bad commands are refused with qemu-ga's error classes, echoing the id when there is one",
          arguments: [
              (#"{"execute":"guest-exec","arguments":{"path":"/bin/sh"},"id":9}"#, "CommandNotFound", "The command guest-exec has not been found", JSON?.some(9)),
              (#"{"arguments":{}}"#, "GenericError", "lacks member 'execute'", nil),
              (#"{"execute":5}"#, "GenericError", "'execute' must be a string", nil),
              (#"{"execute":"guest-ping","arguments":[1]}"#, "GenericError", "'arguments' must be an object", nil),
              (#"{"execute":"guest-sync"}"#, "GenericError", "Parameter 'id' is missing", nil),
              (#"{"execute":"guest-sync","arguments":{"id":"x"}}"#, "GenericError", "expected: integer", nil),
              (#"{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":[]}}"#, "GenericError", "'mountpoints' is empty", nil),
              (#"{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":[""]}}"#, "GenericError", "non-empty strings", nil),
              (#"{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":"/"}}"#, "GenericError", "expected: array", nil),
              ("[1,2]", "GenericError", "must be a JSON object", nil),
              ("not json", "GenericError", "JSON parse error", nil),
          ])
    func refusals(text: String, errorClass: String, desc: String, id: JSON?) {
        guard case .failure(let r) = decode(text) else { Issue.record("\(text) was accepted"); return }
        #expect(r.failure.errorClass == errorClass)
        #expect(r.failure.desc.contains(desc), "\(r.failure.desc)")
        #expect(r.id == id)
        let frame = QGA.errorFrame(r.failure, id: r.id)
        #expect(frame.last == 0x0A)
        let back = try? JSON.parse(Array(frame.dropLast()))
        #expect(back?["error"]?["class"] == .string(errorClass) && back?["id"] == id)
    }

    @Test("replies are qemu-ga's shapes: return with the id, the status words, every command listed by guest-info")
    func replies() throws {
        #expect(String(decoding: QGA.returnFrame(42, id: nil), as: UTF8.self) == "{\"return\":42}\n")
        #expect(String(decoding: QGA.returnFrame(.object([:]), id: "a"), as: UTF8.self) == "{\"return\":{},\"id\":\"a\"}\n")
        #expect(QGA.freezeStatus(frozen: true) == "frozen" && QGA.freezeStatus(frozen: false) == "thawed")
        let names = (QGA.supportedCommands().arrayValue ?? []).compactMap { $0["name"]?.stringValue }
        #expect(names == QGA.CommandName.allCases.map(\.rawValue))
    }

    @Test("the host encodes each command as the line libvirt would send, and it decodes back to the same command")
    func hostEncodesCommands() throws {
        let cases: [(QGA.Command, String)] = [
            (.sync(id: 7, delimited: true), #"{"execute":"guest-sync-delimited","arguments":{"id":7}}"#),
            (.sync(id: 1_234_567_890_123, delimited: false), #"{"execute":"guest-sync","arguments":{"id":1234567890123}}"#),
            (.ping, #"{"execute":"guest-ping"}"#),
            (.info, #"{"execute":"guest-info"}"#),
            (.fsfreezeStatus, #"{"execute":"guest-fsfreeze-status"}"#),
            (.fsfreezeFreeze(mountpoints: nil), #"{"execute":"guest-fsfreeze-freeze"}"#),
            (.fsfreezeFreeze(mountpoints: ["/", "/srv"]), #"{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":["/","/srv"]}}"#),
            (.fsfreezeThaw, #"{"execute":"guest-fsfreeze-thaw"}"#),
        ]
        #expect(Set(cases.map(\.0.name)) == Set(QGA.CommandName.allCases), "every command is encoded")
        for (command, text) in cases {
            #expect(command.line == Array((text + "\n").utf8))
            let decoded = try decode(text).get()
            #expect(decoded.command == command && decoded.id == nil)
        }
    }

    @Test("guest-info's list reads back as the enabled command names; the status words read back")
    func hostReadsInfoAndStatus() {
        #expect(QGA.enabledCommands(info: ["supported_commands": QGA.supportedCommands()]) == QGA.CommandName.allCases.map(\.rawValue))
        let info: JSON = ["supported_commands": [["name": "guest-exec", "enabled": false], ["name": "guest-ping"], ["enabled": true]]]
        #expect(QGA.enabledCommands(info: info) == ["guest-ping"])
        #expect(QGA.enabledCommands(info: ["version": "7.2.0"]) == [])
        #expect(QGA.isFrozen(status: QGA.freezeStatus(frozen: true)) && !QGA.isFrozen(status: QGA.freezeStatus(frozen: false)))
        #expect(!QGA.isFrozen(status: "error"))
    }

    @Test("encodedLine is the compact encoding and one newline, for every frame a side writes")
    func encodedLine() {
        let value: JSON = ["a": [1, "x\ny"], "b": nil]
        #expect(value.encodedLine() == value.encoded() + [0x0A])
        #expect(value.encodedLine().filter { $0 == 0x0A }.count == 1)
    }
}
