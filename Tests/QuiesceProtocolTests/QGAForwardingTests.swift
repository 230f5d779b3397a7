// The pure rules of passing qemu-ga commands on: private sync frames, the union in guest-info.
import QuiesceProtocol
import Testing

@Suite("qemu-ga forwarding rules")
struct QGAForwardingTests {
    @Test("the private guest-sync carries its own tag, and only its reply matches it")
    func privateSync() throws {
        let (frame, tag) = QGA.privateSync(77)
        #expect(String(decoding: frame, as: UTF8.self) == #"{"execute":"guest-sync","arguments":{"id":77},"id":"quiesced-sync-77"}"# + "\n")
        #expect(QGA.isSyncReply(Array(#"{"return": 77, "id": "quiesced-sync-77"}"#.utf8), tag: tag))
        #expect(!QGA.isSyncReply(Array(#"{"return": 77}"#.utf8), tag: tag), "a command returning the same number is not the sync")
        #expect(!QGA.isSyncReply(Array(#"{"return": 77, "id": "quiesced-sync-78"}"#.utf8), tag: tag))
        #expect(!QGA.isSyncReply(Array(#"{"error": {"class": "GenericError", "desc": "x"}, "id": "quiesced-sync-77"}"#.utf8), tag: tag))
        #expect(!QGA.isSyncReply(Array("not json".utf8), tag: tag))
    }

    @Test("guest-info lists ours first, then qemu-ga's others once; while frozen only read-only ones stay enabled")
    func union() throws {
        let theirs = [
            QGA.ForwardedCommand(name: "guest-ping", enabled: true, successResponse: true),
            QGA.ForwardedCommand(name: "guest-fsfreeze-freeze", enabled: false, successResponse: true),
            QGA.ForwardedCommand(name: "guest-get-time", enabled: true, successResponse: true),
            QGA.ForwardedCommand(name: "guest-file-write", enabled: true, successResponse: true),
            QGA.ForwardedCommand(name: "guest-shutdown", enabled: true, successResponse: false),
            QGA.ForwardedCommand(name: "guest-exec", enabled: false, successResponse: true),
        ]
        func entries(_ frozen: Bool) -> [String: (Bool, Bool)] {
            var out: [String: (Bool, Bool)] = [:]
            for e in QGA.supportedCommands(forwarding: theirs, frozen: frozen).arrayValue ?? [] {
                out[e["name"]!.stringValue!] = (e["enabled"]!.boolValue!, e["success-response"]!.boolValue!)
            }
            return out
        }
        let names = (QGA.supportedCommands(forwarding: theirs, frozen: false).arrayValue ?? []).compactMap { $0["name"]?.stringValue }
        #expect(names == QGA.CommandName.allCases.map(\.rawValue) + ["guest-get-time", "guest-file-write", "guest-shutdown", "guest-exec"])
        let thawed = entries(false), frozen = entries(true)
        #expect(thawed["guest-fsfreeze-freeze"]! == (true, true), "the freeze is ours, enabled whatever qemu-ga says")
        #expect(thawed["guest-file-write"]!.0 && !frozen["guest-file-write"]!.0)
        #expect(thawed["guest-get-time"]!.0 && frozen["guest-get-time"]!.0)
        #expect(thawed["guest-shutdown"]! == (true, false), "success-response is qemu-ga's")
        #expect(!thawed["guest-exec"]!.0, "disabled there, disabled here")
        let reply: JSON = ["return": ["version": "7.2.22", "supported_commands": [
            ["enabled": true, "name": "guest-get-osinfo", "success-response": true], ["name": 3]]]]
        #expect(QGA.forwardedCommands(fromInfoReply: reply) == [QGA.ForwardedCommand(name: "guest-get-osinfo", enabled: true, successResponse: true)])
        #expect(QGA.forwardedCommands(fromInfoReply: ["error": ["class": "GenericError", "desc": "x"]]) == nil)
    }

    @Test("an unknown command's refusal names it, so that a forwarder can take it; other refusals do not")
    func unknownCommandNamed() {
        guard case .failure(let r) = QGA.decode(frame: Array(#"{"execute":"guest-get-fsinfo","id":4}"#.utf8)) else {
            Issue.record("decoded"); return
        }
        #expect(r.unknownCommand == "guest-get-fsinfo" && r.id == 4 && r.failure.errorClass == "CommandNotFound")
        guard case .failure(let bad) = QGA.decode(frame: Array(#"{"execute":"guest-get-fsinfo","arguments":[]}"#.utf8)) else {
            Issue.record("decoded"); return
        }
        #expect(bad.unknownCommand == nil)
    }
}
