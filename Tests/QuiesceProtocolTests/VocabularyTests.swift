import QuiesceProtocol
import Testing

@Suite("Wire vocabulary")
struct VocabularyTests {
    @Test("each set names every word once, and none is empty")
    func setsAreWellFormed() {
        let sets: [(String, [String])] = [
            ("SkipReason", SkipReason.all.map(\.rawValue)), ("HookPhase", HookPhase.all.map(\.rawValue)),
            ("ThawReason", ThawReason.all.map(\.rawValue)), ("ErrorCode", ErrorCode.all.map(\.rawValue)),
        ]
        for (name, words) in sets {
            #expect(Set(words).count == words.count, "\(name) repeats a word: \(words)")
            #expect(!words.contains(""), "\(name) has an empty word")
        }
    }

    @Test("the skip reasons the engine reports beside the planner's are defined")
    func engineReasonsAreDefined() {
        #expect(Set(SkipReason.all.map(\.rawValue)).isSuperset(of: ["unsupported", "vanished", "frozen-elsewhere", "duplicate"]))
    }

    @Test("a skip reason this version does not define decodes as itself and encodes back unchanged")
    func unknownSkipReasonSurvives() throws {
        let wire: JSONObject = ["mountpoint": "/mnt/x", "type": "ext4", "reason": "quarantined", "detail": "newer agent"]
        let report = try SkippedReport(json: wire)
        #expect(report.reason == SkipReason(rawValue: "quarantined") && !SkipReason.all.contains(report.reason))
        #expect(report.json == wire)
    }

    @Test("a hook phase this version does not define decodes as itself; a missing phase counts as the freeze's")
    func unknownHookPhaseSurvives() throws {
        let wire: JSONObject = ["name": "db", "phase": "pre-snapshot", "duration_us": 5]
        let report = try HookReport(json: wire)
        #expect(report.phase.rawValue == "pre-snapshot" && !report.isFreezePhase)
        #expect(report.json == wire)
        #expect(try HookReport(json: ["name": "db", "duration_us": 5]).isFreezePhase)
        #expect(try HookReport(json: ["name": "db", "phase": "freeze"]).isFreezePhase)
        #expect(try !HookReport(json: ["name": "db", "phase": "freeze-failed"]).isFreezePhase)
    }

    @Test("a thaw reason this version does not define decodes as itself in last_auto_thaw")
    func unknownThawReasonSurvives() throws {
        let wire: JSONObject = ["reason": "memory-pressure", "op_id": "k1", "at_ms": 7, "filesystems": ["/"]]
        let report = try AutoThawReport(json: wire)
        #expect(report.reason == ThawReason(rawValue: "memory-pressure") && !ThawReason.all.contains(report.reason))
        #expect(report.json == wire)
    }
}
