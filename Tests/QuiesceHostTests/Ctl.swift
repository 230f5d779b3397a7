// Running the built quiescectl executable from tests, with its output in files (no pipe deadlocks).
import Foundation
import QuiesceLinux
import QuiesceProtocol
import QuiesceTestSupport

struct CtlResult {
    var status: Int32
    /// True when quiescectl died of a signal (status is then the signal number).
    var signaled: Bool
    var stdout: String
    var stderr: String

    /// The JSON document on standard output (--json).
    var json: JSON? { try? JSON.parse(stdout.trimmingCharacters(in: .whitespacesAndNewlines)) }

    /// When (t_ms) the JSON timeline first shows `event`.
    func timelineMs(_ event: String) -> Double? {
        json?["timeline"]?.arrayValue?.first { $0["event"]?.stringValue == event }?["t_ms"]?.doubleValue
    }
}

/// One quiescectl process.
final class Ctl: @unchecked Sendable {
    static var path: String { "\(buildProductsDir)/quiescectl" }

    let process = Process()
    let outPath: String
    let errPath: String

    /// Starts `quiescectl ARGS` with output captured under `dir`.
    init(_ arguments: [String], in dir: TempDir, environment: [String: String]? = nil) throws {
        let tag = UUID().uuidString.prefix(8)
        outPath = dir.file("ctl-\(tag).out")
        errPath = dir.file("ctl-\(tag).err")
        _ = FileManager.default.createFile(atPath: outPath, contents: nil)
        _ = FileManager.default.createFile(atPath: errPath, contents: nil)
        process.executableURL = URL(fileURLWithPath: Ctl.path)
        process.arguments = arguments
        if let environment { process.environment = environment }
        process.standardOutput = FileHandle(forWritingAtPath: outPath)!
        process.standardError = FileHandle(forWritingAtPath: errPath)!
        process.standardInput = FileHandle.nullDevice
        try process.run()
    }

    var pid: Int32 { process.processIdentifier }
    /// Only while it runs: a reaped pid may be another process by now.
    func signal(_ sig: Int32) { if process.isRunning { kill(pid, sig) } }
    var stderrSoFar: String { (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? "" }

    /// Waits for the exit; nil when it is still running after `timeoutMs`.
    func wait(timeoutMs: Int = 30_000) -> CtlResult? {
        let deadline = Date().addingTimeInterval(Double(timeoutMs) / 1000)
        while process.isRunning && Date() < deadline { usleep(5000) }
        if process.isRunning { return nil }
        return CtlResult(status: process.terminationStatus, signaled: process.terminationReason == .uncaughtSignal,
                         stdout: (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? "",
                         stderr: (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? "")
    }

    deinit { if process.isRunning { kill(pid, SIGKILL) } }

    /// Runs quiescectl to the end (killing it after `timeoutMs`).
    static func run(_ arguments: [String], in dir: TempDir, timeoutMs: Int = 30_000) throws -> CtlResult {
        let ctl = try Ctl(arguments, in: dir)
        guard let r = ctl.wait(timeoutMs: timeoutMs) else {
            ctl.signal(SIGKILL)
            throw LabError("quiescectl \(arguments.joined(separator: " ")) did not finish within \(timeoutMs) ms: \(ctl.stderrSoFar)")
        }
        return r
    }
}

/// Reads a file if it exists.
func contents(_ path: String) -> String? { try? String(contentsOfFile: path, encoding: .utf8) }

/// Parses "A=1\nB=2" (env output) into a dictionary.
func environmentDump(_ text: String) -> [String: String] {
    var out: [String: String] = [:]
    for line in text.split(separator: "\n") {
        guard let eq = line.firstIndex(of: "=") else { continue }
        out[String(line[..<eq])] = String(line[line.index(after: eq)...])
    }
    return out
}
