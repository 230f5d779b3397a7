// The Hyper-V VSS message layout and its stream decoder.
import QuiesceProtocol
import Testing

@Suite("Hyper-V VSS messages")
struct HVVSSCodecTests {
    @Test("operation numbers and constants are those of include/uapi/linux/hyperv.h")
    func constants() {
        #expect(HVVSS.Operation.hotBackup.rawValue == 2)
        #expect(HVVSS.Operation.freeze.rawValue == 5)
        #expect(HVVSS.Operation.thaw.rawValue == 6)
        #expect(HVVSS.Operation.autoRecover.rawValue == 7)
        #expect(HVVSS.register1 == 129)
        #expect(UInt32(bitPattern: HVVSS.fail) == 0x8000_4005)
        #expect(HVVSS.registerMessage == [129, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    }

    @Test("an answer overlays the int error on bytes 0-3 and keeps bytes 4-11 (the packed union)")
    func answerLayout() {
        let m = HVVSS.Message(operation: 2, flags: 0x0000_0005)
        #expect(m.bytes == [2, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0])
        #expect(m.flags == 5)
        #expect(m.answer(HVVSS.fail) == [0x05, 0x40, 0x00, 0x80, 0, 0, 0, 0, 5, 0, 0, 0])
        #expect(HVVSS.Message(m.answer(HVVSS.ok))?.error == HVVSS.ok)
        #expect(HVVSS.Message([UInt8](repeating: 0, count: 11)) == nil)
    }

    @Test("the version and the messages come out whole however the bytes are split")
    func splitAtEveryOffset() {
        var stream: [UInt8] = [129, 0, 0, 0]
        let sent = [HVVSS.Message(operation: 2), HVVSS.Message(operation: 5), HVVSS.Message(operation: 6, flags: 0xDEAD_BEEF)]
        for m in sent { stream += m.bytes }
        let whole: [HVVSS.Input] = [.version(129)] + sent.map { .message($0) }
        for cut in 0...stream.count {
            for cut2 in cut...stream.count {
                var d = HVVSS.Decoder()
                var got: [HVVSS.Input] = []
                for part in [stream[..<cut], stream[cut..<cut2], stream[cut2...]] {
                    d.feed(part)
                    while let i = d.next() { got.append(i) }
                }
                #expect(got == whole, "cut at \(cut), \(cut2)")
                #expect(d.bufferedByteCount == 0)
            }
        }
    }
}
