// Replies and events never break the limits their peer enforces: lists are sampled with their
// full count beside them, and frames stay within ProtocolLimits.maxReplyBytes.
import QuiesceProtocol
import Testing

/// A mountpoint of `length` bytes, distinct per `i`.
func longPath(_ i: Int, length: Int) -> String {
    let head = "/srv/jail-\(i)/"
    return head + String(repeating: "d", count: max(0, length - head.utf8.count))
}

func freezeResult(bindMounts: Int, pathLength: Int, skipped: Int = 0) -> FreezeResult {
    var fs = FilesystemReport(mountPoint: "/srv", type: "ext4", device: "7:3", source: "/dev/loop3",
                              otherMounts: (0..<bindMounts).map { longPath($0, length: pathLength) }, wave: 0)
    fs.presyncUs = 1200
    fs.freezeUs = 25_000
    fs.frozenAtUs = 25_000
    return FreezeResult(opID: "backup-1", mode: .detached, filesystems: [fs],
                        skipped: (0..<skipped).map { SkippedReport(mountPoint: "/run/user/\($0)", type: "tmpfs", reason: .pseudo) },
                        hooks: [], presyncUs: 1300, freezeUs: 25_000, stallUs: 25_000, totalUs: 27_000,
                        timeoutMs: 30_000, deadlineMs: 1_795_600_830_108)
}

/// Decodes a frame the way quiescectl does: through a 1 MiB frame decoder, then as a reply.
func decodeAsHost(_ frame: [UInt8]) throws -> JSONObject {
    var decoder = FrameDecoder(maxFrameBytes: 1 << 20)
    decoder.feed(frame)
    guard case .frame(let line)? = decoder.next() else {
        Issue.record("the host's decoder did not yield one frame")
        return [:]
    }
    guard case .reply(let reply) = try AgentMessage.decode(frame: line), case .success(let result) = reply.outcome else {
        Issue.record("not a success reply")
        return [:]
    }
    return result
}

@Suite("Reply budget")
struct ReplyBudgetTests {
    @Test("a reply within the limits is written unchanged")
    func smallReplyUnchanged() {
        let r = freezeResult(bindMounts: 3, pathLength: 40)
        let reply = Reply(id: 7, result: r.json)
        #expect(reply.frame == reply.json.encoded() + [0x0A])
        #expect(!String(decoding: reply.frame, as: UTF8.self).contains("truncated"))
    }

    @Test("2000 short bind mounts: the list is cut to 1024 items and mounts_total says 2000")
    func itemLimit() throws {
        let frame = Reply(id: 7, result: freezeResult(bindMounts: 2000, pathLength: 30).json).frame
        #expect(frame.count - 1 <= ProtocolLimits.maxReplyBytes)
        let typed = try FreezeResult(json: try decodeAsHost(frame))
        #expect(typed.truncated)
        #expect(typed.filesystems[0].otherMounts.count == ProtocolLimits.maxListItems)
        #expect(typed.filesystems[0].otherMountsTotal == 2000)
        #expect(typed.filesystems[0].mountCount == 2001)
        #expect(typed.filesystems[0].otherMounts.first == longPath(0, length: 30), "the sample is the first items, in order")
        #expect(typed.filesystemCount == 1)
    }

    @Test("3000 bind mounts of 1100-byte paths and 3000 skipped mounts: past both limits, the reply still fits and counts")
    func frameLimit() throws {
        let r = freezeResult(bindMounts: 3000, pathLength: 1100, skipped: 3000)
        #expect(r.json.count > 0)
        let unfitted = Reply(id: 7, result: r.json).json.encoded()
        #expect(unfitted.count > 1 << 20, "the full reply (\(unfitted.count) bytes) would pass the host's 1 MiB frame limit")
        let frame = Reply(id: 7, result: r.json).frame
        #expect(frame.count - 1 <= ProtocolLimits.maxReplyBytes, "\(frame.count) bytes")
        let typed = try FreezeResult(json: try decodeAsHost(frame))
        #expect(typed.truncated && typed.opID == "backup-1" && typed.deadlineMs == 1_795_600_830_108)
        #expect(typed.filesystems[0].otherMountsTotal == 3000)
        #expect(typed.filesystems[0].otherMounts.count == 64, "the second sample size")
        #expect(typed.skippedTotal == 3000 && typed.skipped.count == 64)
    }

    @Test("events and error details are fitted the same way")
    func eventsAndErrors() throws {
        let paths = (0..<5000).map { longPath($0, length: 600) }
        let event = Event.thawed(opID: "backup-1", reason: .deadline, atMs: 1_795_600_860_108, filesystems: paths, errors: paths)
        let frame = event.frame
        #expect(frame.count - 1 <= ProtocolLimits.maxReplyBytes)
        guard case .event(let e) = try AgentMessage.decode(frame: Array(frame.dropLast())) else {
            Issue.record("not an event")
            return
        }
        #expect(e.fields["filesystems_total"] == .int(5000) && e.fields["errors_total"] == .int(5000))
        #expect(e.fields["truncated"] == true && e.fields["op_id"] == "backup-1")

        let details: JSONObject = ["failed": .array(paths.map { ["mountpoint": .string($0), "error": "EIO"] }), "thawed": .array(paths.map(JSON.string))]
        let error = Reply(id: 9, error: ProtocolError(.thawFailed, "5000 filesystems failed to thaw", details: details)).frame
        #expect(error.count - 1 <= ProtocolLimits.maxReplyBytes)
        guard case .reply(let r) = try AgentMessage.decode(frame: Array(error.dropLast())), case .failure(let pe) = r.outcome else {
            Issue.record("not an error reply")
            return
        }
        #expect(pe.code == .thawFailed && r.id == 9)
        #expect(pe.details?["failed_total"] == .int(5000) && pe.details?["truncated"] == true)
    }

    @Test("a pathological string is dropped in the last resort: the reply stays valid, small and says truncated")
    func lastResort() throws {
        var result = freezeResult(bindMounts: 1, pathLength: 20).json
        result["requested_by"] = .string(String(repeating: "x", count: 600_000))
        let frame = Reply(id: 7, result: result).frame
        #expect(frame.count - 1 <= ProtocolLimits.maxReplyBytes)
        let typed = try FreezeResult(json: try decodeAsHost(frame))
        #expect(typed.truncated && typed.opID == "backup-1" && typed.filesystems.isEmpty)

        let message = String(repeating: "m", count: 700_000)
        let error = Reply(id: 7, error: ProtocolError(.internal, message)).frame
        #expect(error.count - 1 <= ProtocolLimits.maxReplyBytes)
        #expect((try? AgentMessage.decode(frame: Array(error.dropLast()))) != nil)
    }
}
