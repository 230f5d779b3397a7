// Keeps every reply and event within the limits its peer enforces: bounded lists, bounded frames.

extension ProtocolLimits {
    /// No array in a reply or an event holds more items than this (the same bound as a
    /// request's `mounts`): a longer list is cut to its first items, and `KEY_total` beside it
    /// gives the full count. PROTOCOL.md sections 2.1 and 11.
    public static let maxListItems = 1024
    /// The largest reply or event frame the agent writes, in bytes without the newline. Half of
    /// the 1 MiB a client should accept, so a reply and an event fit the agent's 1 MiB send queue.
    public static let maxReplyBytes = 524_288
    /// The longest reply or event line a client accepts (1 MiB, without the newline): PROTOCOL.md
    /// asks clients to take at least this much, twice what the agent writes.
    public static let clientMaxFrameBytes = 1 << 20
}

/// Fits the body of a reply (its `result`, or its error's `details`) or an event's fields to
/// `ProtocolLimits`: lists are cut to a sample of at most 1024 items, then, while the frame is
/// still larger than `maxReplyBytes`, to 64, 8 and 0 items. A list that was cut keeps its full
/// count in `KEY_total`, written right after it, and the body gains `"truncated": true`. Only
/// lists are cut; if the frame is still too large (strings of pathological length), the body
/// keeps only its short scalar fields. PROTOCOL.md section 2.1.
public enum ReplyBudget {
    /// Sample sizes tried in turn.
    static let samples = [ProtocolLimits.maxListItems, 64, 8, 0]
    /// In the last resort, scalar fields longer than this (encoded) are dropped.
    static let longestKeptScalar = 1024

    /// The frame bytes (with the newline) of `wrap(body)`, with `body` fitted as described.
    /// `wrap` builds the whole message around a body; it is called once per attempt.
    static func frame(body: JSONObject, maxBytes: Int = ProtocolLimits.maxReplyBytes,
                      _ wrap: (JSONObject) -> JSON) -> [UInt8] {
        var last: [UInt8]
        for sample in samples {
            var cut = false
            var fitted = shorten(body, sample: sample, cut: &cut)
            if cut { fitted["truncated"] = true }
            last = wrap(fitted).encodedLine()
            if last.count - 1 <= maxBytes { return last }  // the limit counts the JSON, not its newline
        }
        var kept = JSONObject()
        for (key, value) in body {
            switch value {
            case .array, .object: continue
            default: if value.encoded().count <= longestKeptScalar { kept[key] = value }
            }
        }
        kept["truncated"] = true
        return wrap(kept).encodedLine()
    }

    /// `object` with every array longer than `sample` cut to its first `sample` items and its
    /// full count written as `KEY_total` right after it. Sets `cut` when anything was cut.
    static func shorten(_ object: JSONObject, sample: Int, cut: inout Bool) -> JSONObject {
        var pairs: [(key: String, value: JSON)] = []
        pairs.reserveCapacity(object.count)
        for (key, value) in object {
            pairs.append((key, shorten(value, sample: sample, cut: &cut)))
            if case .array(let items) = value, items.count > sample, object[key + "_total"] == nil {
                pairs.append((key + "_total", .int(Int64(items.count))))
            }
        }
        return JSONObject(distinctPairs: pairs)
    }

    static func shorten(_ value: JSON, sample: Int, cut: inout Bool) -> JSON {
        switch value {
        case .object(let o):
            return .object(shorten(o, sample: sample, cut: &cut))
        case .array(let items):
            if items.count > sample { cut = true }
            return .array(items.prefix(sample).map { shorten($0, sample: sample, cut: &cut) })
        default:
            return value
        }
    }
}
