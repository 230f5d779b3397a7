// Arbitrary bytes and mutated valid frames: the codec answers with an error or a value, never crashes.
import Foundation
@testable import QuiesceProtocol
import QuiesceTestSupport
import Testing

@Suite("Random input")
struct RandomInputTests {
    static let seeds: [UInt64] = [1, 2, 3, 0xC0FFEE, 0xDEAD_BEEF]

    @Test("random bytes decode to a request or a precise error, never a crash", arguments: seeds)
    func randomBytes(seed: UInt64) {
        var rng = SplitMix64(state: seed)
        let alphabet = Array("{}[]\":,0123456789.eE+-truefalsnul \\/u\t\nabcxyz".utf8) + [0x00, 0x7F, 0x80, 0xC3, 0xFF]
        for _ in 0..<3000 {
            let length = Int.random(in: 0..<200, using: &rng)
            let frame = (0..<length).map { _ in alphabet.randomElement(using: &rng)! }
            switch Request.decode(frame: frame) {
            case .success(let r): #expect(OperationName.allCases.contains(r.operation.name))
            case .failure(let e): #expect(ErrorCode.all.contains(e.error.code) && !e.error.message.isEmpty)
            }
        }
    }

    @Test("every valid request vector, mutated byte by byte, decodes or fails cleanly", arguments: seeds)
    func mutatedRequests(seed: UInt64) throws {
        var rng = SplitMix64(state: seed)
        let base: [String] = [
            #"{"id":1,"op":"freeze","mounts":["/a","/b"],"timeout_ms":30000,"op_id":"x","mode":"detached"}"#,
            #"{"id":"k","op":"hello","version":1,"client":"c","capabilities":["events"]}"#,
            #"{"id":2,"op":"keepalive","op_id":"x","timeout_ms":5000}"#,
        ]
        for text in base {
            let bytes = Array(text.utf8)
            for _ in 0..<1000 {
                var m = bytes
                for _ in 0..<Int.random(in: 1...4, using: &rng) {
                    let i = Int.random(in: 0..<m.count, using: &rng)
                    switch Int.random(in: 0..<3, using: &rng) {
                    case 0: m[i] = UInt8.random(in: 0...255, using: &rng)
                    case 1: m.remove(at: i)
                    default: m.insert(UInt8.random(in: 0...255, using: &rng), at: i)
                    }
                    if m.isEmpty { break }
                }
                if case .failure(let e) = Request.decode(frame: m) {
                    #expect(ErrorCode.all.contains(e.error.code))
                }
                // Whatever the agent might echo back must itself encode to a single valid line.
                if case .success(let r) = Request.decode(frame: m) {
                    let line = r.json.encoded()
                    #expect(!line.contains(0x0A))
                    #expect((try? JSON.parse(line)) != nil)
                }
            }
        }
    }

    @Test("the frame decoder stays bounded on any stream", arguments: seeds)
    func decoderBounded(seed: UInt64) {
        var rng = SplitMix64(state: seed)
        var decoder = FrameDecoder(maxFrameBytes: 512)
        var frames = 0
        for _ in 0..<2000 {
            let chunk = (0..<Int.random(in: 1..<700, using: &rng)).map { _ -> UInt8 in
                let r = Int.random(in: 0..<100, using: &rng)
                return r < 2 ? 0x0A : r < 3 ? 0xFF : UInt8.random(in: 0x20...0x7E, using: &rng)
            }
            decoder.feed(chunk)
            #expect(decoder.bufferedByteCount <= 512)
            while let ev = decoder.next() {
                if case .frame(let f) = ev {
                    frames += 1
                    #expect(f.count <= 512 && !f.contains(0x0A) && !f.contains(0xFF))
                }
            }
        }
        #expect(frames > 0)
    }
}
