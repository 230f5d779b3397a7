// libFuzzer target for the wire protocol: the frame decoder, the JSON codec, request decoding
// (ours and qemu-ga's) and durations, fed arbitrary bytes. Built by fuzz/run (swiftc -sanitize=fuzzer,address) from
// the QuiesceProtocol sources, which import nothing, so no package build is involved.
//
// Beyond "never crash", each input checks properties a peer relies on; a broken one traps,
// and libFuzzer saves the input that broke it:
// - the decoder never hands out a frame larger than its limit;
// - a decoded request encodes to JSON that decodes to the same request;
// - a refused frame still gets a reply that is itself valid wire output;
// - parsed JSON encodes and parses back to the same value;
// - the parser's duplicate-key checks cost at most one comparison per byte (linear parsing,
//   whatever the shape of the objects; a hostile agent's reply cannot stall the host);
// - a reply fitted to the reply budget (ReplyBudget) fits it and still decodes;
// - a parsed duration's canonical form parses back to the same duration;
// - qemu-ga's dialect answers every frame with a reply that parses.

/// The encoder writes a whole double as an integer (1.0 as 1): the same JSON number. Compare
/// values with that difference taken out.
func numbersNormalised(_ value: JSON) -> JSON {
    switch value {
    case .double(let d) where d.isFinite && abs(d) < 1e15 && Double(Int64(d)) == d: return .int(Int64(d))
    case .array(let items): return .array(items.map(numbersNormalised))
    case .object(var o):
        for key in o.keys { o[key] = o[key].map(numbersNormalised) }
        return .object(o)
    default: return value
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    let limit = 4096
    var decoder = FrameDecoder(maxFrameBytes: limit)
    // Feed in two pieces split where the first byte says, so frame boundaries land anywhere.
    let cut = bytes.isEmpty ? 0 : Int(bytes[0]) % (bytes.count + 1)
    decoder.feed(bytes[..<cut])
    var events: [FrameEvent] = []
    while let e = decoder.next() { events.append(e) }
    decoder.feed(bytes[cut...])
    while let e = decoder.next() { events.append(e) }

    // qemu-ga's framing (JSON values back to back) cuts the same bytes under the same limit,
    // and each of its frames goes through the same checks below.
    var values = FrameDecoder(maxFrameBytes: limit, framing: .jsonValues)
    values.feed(bytes[..<cut])
    while let e = values.next() { events.append(e) }
    values.feed(bytes[cut...])
    while let e = values.next() { events.append(e) }
    precondition(values.bufferedByteCount <= limit, "the value splitter holds more than one frame")

    for case .frame(let frame) in events {
        precondition(frame.count <= limit, "a frame of \(frame.count) bytes passed a \(limit)-byte limit")
        switch Request.decode(frame: frame) {
        case .success(let request):
            var again = request.json.encoded()
            again.append(0x0A)
            guard case .success(let decoded) = Request.decode(frame: again) else {
                preconditionFailure("a decoded request does not decode from its own encoding")
            }
            precondition(decoded == request, "a request changed through encode and decode")
        case .failure(let refusal):
            let reply = Reply(id: refusal.id, error: refusal.error).frame
            guard case .reply(let r)? = try? AgentMessage.decode(frame: Array(reply.dropLast())),
                  case .failure(let e) = r.outcome, e.code == refusal.error.code else {
                preconditionFailure("the error reply to a refused frame is not valid wire output")
            }
        }
        // qemu-ga's dialect: a command or a refusal, and either way a reply that parses.
        let qgaReply: [UInt8]
        switch QGA.decode(frame: frame) {
        case .success(let d): qgaReply = QGA.returnFrame(.string(d.command.name.rawValue), id: d.id)
        case .failure(let r): qgaReply = QGA.errorFrame(r.failure, id: r.id)
        }
        precondition((try? JSON.parse(qgaReply.dropLast(), maxDepth: ProtocolLimits.maxDepth + 2)) != nil,
                     "a qemu-ga reply is not valid JSON")
        var keyWork = 0
        _ = try? JSON.parse(frame, maxDepth: ProtocolLimits.maxDepth, keyWork: &keyWork)
        precondition(keyWork <= frame.count, "\(keyWork) key comparisons for a \(frame.count)-byte frame")
        // (One level less: the reply wraps the body in one more object.)
        if case .object(let body)? = try? JSON.parse(frame, maxDepth: ProtocolLimits.maxDepth - 1) {
            // Fitted to a tiny budget, a reply still decodes, and fits unless the last resort
            // (only the short scalar fields kept) was needed.
            let fitted = ReplyBudget.frame(body: body, maxBytes: 512) { Reply(id: 1, result: $0).json }
            guard case .reply(let r)? = try? AgentMessage.decode(frame: Array(fitted.dropLast())),
                  case .success(let result) = r.outcome else {
                preconditionFailure("a fitted reply is not valid wire output")
            }
            let lastResort = result["truncated"] == true && !result.contains { $0.value.arrayValue != nil || $0.value.objectValue != nil }
            precondition(fitted.count - 1 <= 512 || lastResort, "a fitted reply of \(fitted.count) bytes passed its 512-byte budget")
        }
        if let value = try? JSON.parse(frame, maxDepth: ProtocolLimits.maxDepth) {
            let back = try? JSON.parse(value.encoded(), maxDepth: ProtocolLimits.maxDepth)
            precondition(back.map(numbersNormalised) == numbersNormalised(value), "JSON changed through encode and parse")
        }
        if let text = String(validating: frame, as: UTF8.self), let span = try? TimeSpan(parsing: text) {
            precondition((try? TimeSpan(parsing: span.description)) == span, "\(text) -> \(span) does not parse back")
        }
    }
    return 0
}
