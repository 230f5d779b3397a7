// The streaming line decoder: any chunking gives the same frames, memory stays bounded, 0xFF resets.
import QuiesceProtocol
import Testing

/// Feeds `chunks` one `feed` call each, taking events out after every call.
private func events(feeding chunks: [ArraySlice<UInt8>], maxFrameBytes: Int = ProtocolLimits.maxFrameBytes) -> [FrameEvent] {
    var decoder = FrameDecoder(maxFrameBytes: maxFrameBytes)
    var out: [FrameEvent] = []
    for chunk in chunks {
        decoder.feed(chunk)
        while let e = decoder.next() { out.append(e) }
    }
    return out
}

private func events(_ bytes: [UInt8], chunkSize: Int) -> [FrameEvent] {
    events(feeding: stride(from: 0, to: bytes.count, by: chunkSize).map { bytes[$0..<min($0 + chunkSize, bytes.count)] })
}

private func bytes(_ s: String) -> [UInt8] { Array(s.utf8) }

private let ping = bytes(#"{"id":1,"op":"ping"}"#)

@Suite("FrameDecoder")
struct FrameDecoderTests {
    /// Every vector that fits in a test stream (not the generated 1 MiB line), in file order.
    static let streamVectors = Vectors.all.filter { !$0.isGenerated }

    @Test("all vector frames joined in one stream give each vector's own events, in order")
    func joinedStream() throws {
        let vectors = Self.streamVectors
        #expect(vectors.count >= 40)
        var stream: [UInt8] = []
        var expected: [FrameEvent] = []
        for v in vectors {
            let b = try v.streamBytes()
            stream += b
            expected += Vectors.decode(b)
        }
        #expect(Vectors.decode(stream) == expected)
        #expect(events(stream, chunkSize: 1) == expected, "byte by byte")
        for size in [2, 3, 5, 7, 64, 1000, 4096] {
            #expect(events(stream, chunkSize: size) == expected, "chunks of \(size) bytes")
        }
    }

    @Test("a vector between two other frames decodes the same when split at every byte offset",
          arguments: FrameDecoderTests.streamVectors)
    func splitAtEveryOffset(_ v: Vector) throws {
        var stream = ping + [0x0A]
        stream += try v.streamBytes()
        stream += bytes(#"{"id":2,"op":"status"}"#) + [0x0D, 0x0A]
        let expected = Vectors.decode(stream)
        #expect(expected.first == .frame(ping))
        #expect(expected.last == .frame(bytes(#"{"id":2,"op":"status"}"#)))
        for offset in 0...stream.count {
            let got = events(feeding: [stream[..<offset], stream[offset...]])
            if got != expected {
                Issue.record("\(v.file): split at byte \(offset) gave \(got.map(describe)), expected \(expected.map(describe))")
                return
            }
        }
        #expect(events(stream, chunkSize: 1) == expected, "byte by byte")
    }

    @Test("several frames in one feed come out in order")
    func severalFramesInOneFeed() {
        let stream = bytes("{\"id\":1,\"op\":\"ping\"}\n{\"id\":2,\"op\":\"status\"}\n{\"id\":3,\"op\":\"thaw\"}\n")
        let got = events(feeding: [stream[...]])
        #expect(got == [
            .frame(bytes(#"{"id":1,"op":"ping"}"#)), .frame(bytes(#"{"id":2,"op":"status"}"#)),
            .frame(bytes(#"{"id":3,"op":"thaw"}"#)),
        ])
    }

    @Test("events not taken out yet survive the next feed")
    func pendingEventsSurviveFeeds() {
        var decoder = FrameDecoder()
        decoder.feed(bytes("a\n"))
        decoder.feed(bytes("b\n"))
        #expect(decoder.next() == .frame(bytes("a")))
        #expect(decoder.next() == .frame(bytes("b")))
        #expect(decoder.next() == nil)
    }

    @Test("a partial line gives nothing until its newline arrives")
    func partialLineWaits() {
        var decoder = FrameDecoder()
        decoder.feed(ping[..<7])
        #expect(decoder.next() == nil)
        #expect(decoder.bufferedByteCount == 7)
        decoder.feed(ping[7...] + [0x0A])
        #expect(decoder.next() == .frame(ping))
        #expect(decoder.bufferedByteCount == 0)
    }

    @Test("1 MiB with no newline, fed in 4 KiB chunks, is one tooLarge and never buffers more than maxFrameBytes")
    func oneMebibyteWithoutNewline() {
        var decoder = FrameDecoder()
        let chunk = [UInt8](repeating: UInt8(ascii: "a"), count: 4096)
        var got: [FrameEvent] = []
        for _ in 0..<(1 << 20) / chunk.count {
            decoder.feed(chunk)
            #expect(decoder.bufferedByteCount <= ProtocolLimits.maxFrameBytes)
            while let e = decoder.next() { got.append(e) }
        }
        #expect(got == [.tooLarge(discardedAtLeast: ProtocolLimits.maxFrameBytes + 1)])
        // The rest of the oversized line is skipped; the frame after the next newline decodes.
        decoder.feed(bytes("more of the long line\n"))
        #expect(decoder.next() == nil)
        decoder.feed(ping + [0x0A])
        let next = decoder.next()
        #expect(next == .frame(ping))
        if case .frame(let frame) = next {
            let request = Request.decode(frame: frame)
            #expect(request == .success(Request(id: .int(1), .ping)))
        }
        #expect(decoder.bufferedByteCount == 0)
    }

    @Test("a frame of exactly maxFrameBytes is accepted; one byte more is too large")
    func frameSizeBoundary() {
        let max = 64
        let exact = [UInt8](repeating: UInt8(ascii: "x"), count: max)
        #expect(events(feeding: [(exact + [0x0A])[...]], maxFrameBytes: max) == [.frame(exact)])
        let over = exact + [UInt8(ascii: "x")]
        #expect(events(feeding: [(over + [0x0A] + ping + [0x0A])[...]], maxFrameBytes: max)
            == [.tooLarge(discardedAtLeast: max + 1), .frame(ping)])
    }

    @Test("the size limit counts a trailing carriage return: maxFrameBytes plus CRLF is too large")
    func carriageReturnCountsTowardsTheLimit() {
        let max = 64
        let exact = [UInt8](repeating: UInt8(ascii: "x"), count: max)
        #expect(events(feeding: [(exact + [0x0D, 0x0A])[...]], maxFrameBytes: max) == [.tooLarge(discardedAtLeast: max + 1)])
        let shorter = [UInt8](repeating: UInt8(ascii: "x"), count: max - 1)
        #expect(events(feeding: [(shorter + [0x0D, 0x0A])[...]], maxFrameBytes: max) == [.frame(shorter)])
    }

    @Test("a 0xFF byte drops the partial line and reports a reset")
    func resetDropsPartialLine() {
        let stale = bytes(#"{"id":99,"op":"fre"#)
        let got = events(feeding: [(stale + [0xFF] + ping + [0x0A])[...]])
        #expect(got == [.reset(droppedBytes: stale.count), .frame(ping)])
    }

    @Test("0xFF between complete frames reports a reset that dropped nothing")
    func resetBetweenFrames() {
        let got = events(feeding: [(ping + [0x0A, 0xFF, 0xFF] + ping + [0x0A])[...]])
        #expect(got == [.frame(ping), .reset(droppedBytes: 0), .reset(droppedBytes: 0), .frame(ping)])
    }

    @Test("0xFF ends the skipping of an oversized line")
    func resetEndsDiscarding() {
        let max = 16
        let long = [UInt8](repeating: UInt8(ascii: "z"), count: 40)
        let got = events(feeding: [(long + [0xFF] + ping[..<10])[...]], maxFrameBytes: max)
        #expect(got.count == 2)
        #expect(got.first == .tooLarge(discardedAtLeast: max + 1))
        if case .reset(let dropped) = got.last { #expect(dropped == 40) } else { Issue.record("no reset: \(got)") }
        // The bytes after 0xFF start a new line even though no newline came.
        let after = events(feeding: [(long + [0xFF] + bytes("short") + [0x0A])[...]], maxFrameBytes: max)
        #expect(after.last == .frame(bytes("short")))
    }

    @Test("CRLF line ends are stripped of their carriage return, and only one is stripped")
    func crlf() {
        #expect(events(feeding: [(ping + [0x0D, 0x0A])[...]]) == [.frame(ping)])
        #expect(events(feeding: [bytes("a\r\r\n")[...]]) == [.frame(bytes("a\r"))])
        // Split between CR and LF.
        #expect(events(feeding: [(ping + [0x0D])[...], ArraySlice<UInt8>([0x0A])]) == [.frame(ping)])
    }

    @Test("blank lines and lines of only spaces, tabs or CR are ignored")
    func blankLines() {
        let stream = bytes("\n\n \n\t\n\r\n \t\r\n") + ping + bytes("\n\n")
        #expect(events(feeding: [stream[...]]) == [.frame(ping)])
    }

    @Test("reset() drops a partial line, so the next bytes start a fresh frame")
    func explicitReset() {
        var decoder = FrameDecoder()
        decoder.feed(bytes("{\"id\":1,\"op\""))
        #expect(decoder.bufferedByteCount > 0)
        decoder.reset()
        #expect(decoder.bufferedByteCount == 0)
        decoder.feed(ping + [0x0A])
        #expect(decoder.next() == .frame(ping))
    }

    @Test("the default limit is the protocol's 65536 bytes")
    func defaultLimit() {
        #expect(FrameDecoder().maxFrameBytes == 65_536)
        #expect(ProtocolLimits.maxFrameBytes == 65_536)
        #expect(ProtocolLimits.maxDepth == 16)
    }
}
