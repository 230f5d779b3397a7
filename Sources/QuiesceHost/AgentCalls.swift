// One request to each of several agents, all at once: what ping, info, status and the other subcommands do.
import QuiesceLinux
import QuiesceProtocol

/// The answer of one agent to a one-shot request.
public struct AgentCall<Value: Sendable>: Sendable {
    public var address: AgentAddress
    public var hello: HelloResult?
    public var outcome: Result<Value, AgentError>
    /// Where it failed: `.connect` covers connecting and hello.
    public var stage: AgentStage?
    /// From the start of the connection to the reply.
    public var elapsedNs: UInt64
    /// The request alone (after hello).
    public var requestNs: UInt64

    public var ok: Bool { if case .success = outcome { return true }; return false }
    public var error: AgentError? { if case .failure(let e) = outcome { return e }; return nil }
}

public enum AgentCalls {
    /// Connects to every agent in parallel (a thread each), says hello (to qemu-ga only when
    /// `qgaHandshake`, see `AgentClient.connect`), runs `body`, closes. Results come back in the
    /// order of `agents`.
    public static func run<Value: Sendable>(
        _ agents: [AgentAddress], connectTimeoutMs: Int64, replyTimeoutMs: Int64, stage: AgentStage = .request,
        qgaHandshake: Bool = true, _ body: @escaping @Sendable (AgentClient) throws(AgentError) -> Value
    ) -> [AgentCall<Value>] {
        Threads.parallelMap(agents.count) { i in
            let start = monotonicNanos()
            let client: AgentClient
            do throws(AgentError) {
                client = try AgentClient.connect(agents[i], connectTimeoutMs: connectTimeoutMs, replyTimeoutMs: replyTimeoutMs,
                                                 qgaHandshake: qgaHandshake)
            } catch {
                return AgentCall(address: agents[i], hello: nil, outcome: .failure(error), stage: .connect,
                                 elapsedNs: monotonicNanos() - start, requestNs: 0)
            }
            defer { client.close() }
            let requestStart = monotonicNanos()
            let outcome: Result<Value, AgentError>
            do throws(AgentError) { outcome = .success(try body(client)) } catch { outcome = .failure(error) }
            let end = monotonicNanos()
            return AgentCall(address: agents[i], hello: client.hello, outcome: outcome,
                             stage: outcome.isFailure ? stage : nil, elapsedNs: end - start, requestNs: end - requestStart)
        }
    }

    /// The exit code for a set of calls: unreachable wins over a refused request.
    public static func exitCode<V>(_ calls: [AgentCall<V>], refused: Int32 = ExitCodes.freezeFailed) -> Int32 {
        // An agent that answered the connection with an error (a peer it does not allow, too
        // many connections) was reached: that is a refusal, not an unreachable agent.
        func unreachable(_ c: AgentCall<V>) -> Bool {
            guard c.stage == .connect, case .failure(let e) = c.outcome else { return false }
            return e.remote == nil
        }
        if calls.contains(where: unreachable) { return ExitCodes.agentUnreachable }
        if calls.contains(where: { !$0.ok }) { return refused }
        return ExitCodes.success
    }

    /// The JSON document for a subcommand: {"command", "ok", "exit_code", "agents": [...]}.
    public static func json<V>(_ command: String, _ calls: [AgentCall<V>], exitCode: Int32, result: (V) -> JSON) -> JSON {
        var o: JSONObject = ["command": .string(command), "ok": .bool(exitCode == 0), "exit_code": .int(Int64(exitCode))]
        o["agents"] = .array(calls.map { c in
            var a: JSONObject = ["address": .string(c.address.description), "ok": .bool(c.ok), "elapsed_ms": ms(c.elapsedNs)]
            if let h = c.hello { a["hello"] = .object(h.json) }
            switch c.outcome {
            case .success(let v): a["result"] = result(v)
            case .failure(let e):
                var err = e.json.objectValue ?? [:]
                if let s = c.stage { err["stage"] = .string(s.rawValue) }
                a["error"] = .object(err)
            }
            return .object(a)
        })
        return .object(o)
    }
}

extension Result {
    var isFailure: Bool { if case .failure = self { return true }; return false }
}
