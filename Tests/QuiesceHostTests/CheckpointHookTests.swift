// quiescectl checkpoint with real agent hooks: what COMMAND is told, and what the report says
// when a hold-style hook loses its lock while frozen. Real quiesced, real loop filesystems.
import Foundation
import QuiesceHost
import QuiesceLinux
import QuiesceProtocol
import QuiesceTestSupport
import Testing

/// Root-owned 0755 hook scripts in LAB/hooks.d (0755).
private func hooksDir(in root: String, _ scripts: [String: String]) throws -> String {
    let dir = "\(root)/hooks.d"
    _ = try sh("mkdir -p '\(dir)' && chmod 755 '\(dir)'")
    for (name, body) in scripts {
        try "#!/bin/sh\n\(body)\n".write(toFile: "\(dir)/\(name)", atomically: true, encoding: .utf8)
        _ = try sh("chmod 755 '\(dir)/\(name)'")
    }
    return dir
}

@Suite("Checkpoint consistency from hooks", .serialized, .enabled(if: canUseLoopDevices, "needs root and loop devices"))
struct CheckpointHookTests {
    @Test("application only when every hook holds through the snapshot; an optional failure and a lost hold are named")
    func consistencyFromHooks() async throws {
        try await LoopLab.with { lab in
            _ = try lab.filesystem("a")
            let hooks = try hooksDir(in: lab.root, [
                "10-hold": "# quiesce: hold timeout=5s\n[ \"$1\" = freeze ] || exit 0\necho ready\nread line",
            ])
            let agent = try AgentProcess(in: lab.root, arguments: ["--include", "\(lab.root)/*", "--hooks-dir", hooks])
            defer { agent.stop() }
            let dir = TempDir()
            let env = dir.file("env")
            let address = ["--agent", "unix:\(agent.socketPath)"]

            // Every hook holds: application.
            var r = try Ctl.run(address + ["--json", "checkpoint", "--", "sh", "-c", "env > '\(env)'"], in: dir)
            #expect(r.status == 0, "\(r.stderr)")
            var vars = environmentDump(contents(env) ?? "")
            #expect(vars["QUIESCE_CONSISTENCY"] == "application")
            #expect(vars["QUIESCE_HOOKS_NOT_HELD"] == "")
            #expect(r.json?["consistency"] == "application")

            // An optional hook fails: the freeze goes on, filesystem-consistent, and COMMAND is told which.
            _ = try hooksDir(in: lab.root, ["20-cache": "# quiesce: optional\n[ \"$1\" = freeze ] && exit 7\nexit 0"])
            r = try Ctl.run(address + ["--json", "checkpoint", "--", "sh", "-c", "env > '\(env)'"], in: dir)
            #expect(r.status == 0, "\(r.stderr)")
            vars = environmentDump(contents(env) ?? "")
            #expect(vars["QUIESCE_CONSISTENCY"] == "filesystem")
            #expect(vars["QUIESCE_HOOKS_NOT_HELD"] == "unix:\(agent.socketPath)=20-cache")
            #expect(vars["QUIESCE_FROZEN_JSON"]?.contains("20-cache") == true)
            #expect(r.timelineMs("hooks-not-held") != nil, "the timeline says which hook did not hold")
            _ = try sh("rm '\(hooks)/20-cache'")

            // The holding hook dies while COMMAND runs: COMMAND was told application, the report
            // is lowered to filesystem, the timeline warns, and the run fails (exit 70): a
            // backup script must not file this copy as application-consistent.
            _ = try hooksDir(in: lab.root, ["10-hold": "# quiesce: hold\n[ \"$1\" = freeze ] || exit 0\necho ready\nsleep 0.2\nexit 3"])
            r = try Ctl.run(address + ["--json", "checkpoint", "--", "sh", "-c", "env > '\(env)'; sleep 0.6"], in: dir)
            vars = environmentDump(contents(env) ?? "")
            #expect(vars["QUIESCE_CONSISTENCY"] == "application")
            #expect(r.json?["consistency"] == "filesystem", "\(r.stdout)")
            #expect(r.timelineMs("hook-lost") != nil)
            #expect(r.json?["agents"]?.arrayValue?.first?["thaw"]?["hooks"]?.arrayValue?.first?["outcome"] == "lost")
            #expect(r.status == ExitCodes.freezeFailed, "a lost hold fails the checkpoint: \(r.stderr)")
            #expect(r.json?["ok"] == false)
            #expect(r.stdout.contains("hook 10-hold ended while frozen"), "the summary names the hook: \(r.stdout)")

            // The same loss from a hook marked optional lowers the consistency but the run succeeds.
            _ = try hooksDir(in: lab.root, ["10-hold": "# quiesce: hold optional\n[ \"$1\" = freeze ] || exit 0\necho ready\nsleep 0.2\nexit 3"])
            r = try Ctl.run(address + ["--json", "checkpoint", "--", "sh", "-c", "sleep 0.6"], in: dir)
            #expect(r.json?["consistency"] == "filesystem", "\(r.stdout)")
            #expect(r.status == 0, "an optional hook's loss is reported, not fatal: \(r.stderr)")
        }
    }

    @Test("Consistency.of: optional failures and lost holds are not application-consistent")
    func consistencyRules() {
        func freeze(_ hooks: [HookReport]) -> FreezeResult {
            FreezeResult(opID: "op", mode: .bound, filesystems: [], skipped: [], hooks: hooks, presyncUs: 0, freezeUs: 0,
                         stallUs: 0, totalUs: 0, timeoutMs: 1, deadlineMs: 1)
        }
        let holding = HookReport(name: "db", phase: .freeze, exitCode: nil, durationUs: 1, outcome: .holding, hold: true)
        let optionalFailed = HookReport(name: "cache", phase: .freeze, exitCode: 1, durationUs: 1, error: "exit code 1",
                                        outcome: .failed, optional: true)
        #expect(Consistency.of(freeze([holding])) == .application)
        #expect(Consistency.of(freeze([holding, optionalFailed])) == .filesystem)
        #expect(Consistency.notHeld(freeze([holding, optionalFailed])) == ["cache: exit code 1 (optional)"])
        let thaw = ThawResult(opID: "op", wasFrozen: true, filesystems: [],
                              hooks: [HookReport(name: "db", phase: .thaw, exitCode: 3, durationUs: 1, error: "ended", outcome: .lost)],
                              totalUs: 0, frozenUs: 0)
        #expect(Consistency.of(freeze([holding]), thaw: thaw) == .filesystem)
        var refused = freeze([holding])
        refused.hooksRefused = [RefusedHook(name: "50-mariadb", reason: "writable by group or others (mode 775)")]
        #expect(Consistency.of(refused) == .filesystem, "a refused hook's application was never asked")
    }
}
