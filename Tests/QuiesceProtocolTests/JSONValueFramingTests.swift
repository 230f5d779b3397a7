// qemu-ga's framing: back-to-back JSON values with no newline needed, in any chunking.
import QuiesceProtocol
import Testing

private func bytes(_ s: String) -> [UInt8] { Array(s.utf8) }

private func events(feeding chunks: [ArraySlice<UInt8>], maxFrameBytes: Int = ProtocolLimits.maxFrameBytes) -> [FrameEvent] {
    var decoder = FrameDecoder(maxFrameBytes: maxFrameBytes, framing: .jsonValues)
    var out: [FrameEvent] = []
    for chunk in chunks {
        decoder.feed(chunk)
        while let e = decoder.next() { out.append(e) }
    }
    return out
}

@Suite("FrameDecoder, JSON values (qemu-ga's framing)")
struct JSONValueFramingTests {
    static let objects = [
        #"{"execute":"guest-sync-delimited","arguments":{"id":12}}"#,
        #"{"execute":"guest-ping","id":"}\"{ [ \\"}"#,
        #"{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":["/a}","/b{[\n"]}}"#,
        #"[1,[2,{"k":"]"}]]"#,
        #"{"execute":"guest-fsfreeze-thaw"}"#,
    ]

    @Test("objects back to back, with and without whitespace between them, split at every offset")
    func splitAtEveryOffset() {
        for separator in ["", "\n", " \r\n\t "] {
            let stream = bytes(Self.objects.joined(separator: separator))
            let expected = Self.objects.map { FrameEvent.frame(bytes($0)) }
            #expect(events(feeding: [stream[...]]) == expected, "separator \(Array(separator.utf8))")
            for offset in 0...stream.count {
                let got = events(feeding: [stream[..<offset], stream[offset...]])
                if got != expected {
                    Issue.record("separator \(Array(separator.utf8)), split at \(offset): \(got)")
                    return
                }
            }
            var one: [FrameEvent] = []
            var decoder = FrameDecoder(framing: .jsonValues)
            for b in stream {
                decoder.feed([b])
                while let e = decoder.next() { one.append(e) }
            }
            #expect(one == expected, "byte by byte")
        }
    }

    @Test("each frame decodes as the qemu-ga command it was")
    func framesDecode() throws {
        let stream = bytes(#"{"execute":"guest-sync","arguments":{"id":5}}{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":["/srv/{x}"]}}"#)
        let frames = events(feeding: [stream[...]]).compactMap { e -> [UInt8]? in if case .frame(let f) = e { f } else { nil } }
        #expect(frames.count == 2)
        #expect(try QGA.decode(frame: frames[0]).get().command == .sync(id: 5, delimited: false))
        #expect(try QGA.decode(frame: frames[1]).get().command == .fsfreezeFreeze(mountpoints: ["/srv/{x}"]))
    }

    @Test("0xFF resets anywhere, even inside a string; top-level junk runs to its line end or the next object, one frame")
    func resetsAndJunk() {
        let stream = bytes(#"{"execute":"gu"#) + [0xFF] + bytes(#"{"a":"x"#) + [0xFF] + bytes(#"{"b":1}"#)
            + bytes(#"junk 42 "s p"}{"c":2}"#) + bytes(" \"top\" ]] x\r\n{}")
        #expect(events(feeding: [stream[...]]) == [
            .reset(droppedBytes: 14), .reset(droppedBytes: 7), .frame(bytes(#"{"b":1}"#)),
            .frame(bytes(#"junk 42 "s p"}"#)), .frame(bytes(#"{"c":2}"#)),
            .frame(bytes(#""top""#)), .frame(bytes("]] x")), .frame(bytes("{}")),
        ])
        // A stray closing brace at the top level is junk like any other, not a negative depth
        // that swallows every object after it (found by a new-user trial).
        #expect(events(feeding: [bytes("}}{\"execute\":\"guest-ping\"}{\"id\":9}\n{\"x\":1}")[...]]) == [
            .frame(bytes("}}")), .frame(bytes(#"{"execute":"guest-ping"}"#)), .frame(bytes(#"{"id":9}"#)), .frame(bytes(#"{"x":1}"#)),
        ])
        #expect(events(feeding: [bytes("}\n{\"a\":1}")[...]]) == [.frame(bytes("}")), .frame(bytes(#"{"a":1}"#))])
        // A scalar running straight into an object ends there.
        #expect(events(feeding: [bytes(#"nonsense{"d":3}"#)[...]]) == [.frame(bytes("nonsense")), .frame(bytes(#"{"d":3}"#))])
    }

    @Test("an object over the frame limit is reported once, skipped to its end, and the next one decodes")
    func tooLarge() {
        let big = "{\"s\":\"" + String(repeating: "}", count: 200) + "\",\"t\":[" + String(repeating: "[", count: 3) + "]]]]}"
        let stream = bytes(big + #"{"ok":1}"#)
        for offset in [0, 1, 50, 150, stream.count - 3] {
            let got = events(feeding: [stream[..<offset], stream[offset...]], maxFrameBytes: 64)
            #expect(got.count == 2, "split at \(offset): \(got)")
            guard got.count == 2 else { continue }
            if case .tooLarge = got[0] {} else { Issue.record("first event \(got[0])") }
            #expect(got[1] == .frame(bytes(#"{"ok":1}"#)))
        }
        var decoder = FrameDecoder(maxFrameBytes: 64, framing: .jsonValues)
        decoder.feed(bytes("{\"s\":\"" + String(repeating: "a", count: 10_000)))
        #expect(decoder.bufferedByteCount <= 64, "memory stays bounded while skipping")
    }

    @Test("qemu-ga's framing takes a command of 1 MiB whole (guest-file-write data) and stops at 16 MiB; lines stay at 64 KiB")
    func largeQGACommands() {
        #expect(FrameDecoder(framing: .jsonValues).maxFrameBytes == 16 << 20)
        #expect(FrameDecoder(framing: .lines).maxFrameBytes == 65_536)
        let write = #"{"execute":"guest-file-write","arguments":{"handle":1,"buf-b64":""# + String(repeating: "QUJD", count: 1 << 18) + #""}}"#
        var decoder = FrameDecoder(framing: .jsonValues)
        decoder.feed(bytes(write + write))
        #expect(decoder.next() == .frame(bytes(write)))
        #expect(decoder.next() == .frame(bytes(write)))
        var small = FrameDecoder(framing: .lines)
        small.feed(bytes(write + "\n"))
        if case .tooLarge = small.next() {} else { Issue.record("a 1 MiB line passed the 64 KiB limit") }
    }

    @Test("line framing is unchanged: objects without a newline between them stay one line")
    func linesUnchanged() {
        var decoder = FrameDecoder()
        decoder.feed(bytes(#"{"a":1}{"b":2}"# + "\n"))
        #expect(decoder.next() == .frame(bytes(#"{"a":1}{"b":2}"#)))
    }
}
