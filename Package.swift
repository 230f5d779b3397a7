// swift-tools-version:6.0
import PackageDescription

// The agent's release link with QUIESCE_STATIC_PIE=1 in the environment (`make release` and
// debian/rules set it): glibc, libstdc++ and the Swift runtime all linked in, position-independent
// (static-pie, relocated by glibc's own start-up code, so the agent keeps ASLR) and bound at start.
// A guest then maps no shared library for it, and it runs on any guest whatever its glibc. Its RSS
// is about 2 MB lower, the shared libraries' pages it no longer maps; its PSS, what the guest
// really pays, 0.2-1 MB lower idle, about the same after work (bench/README.md, "Memory"). It uses nothing of glibc that loads
// modules at run time (no NSS, iconv or DNS).
// GNU gold cannot link a static-pie, so lld links it (from the Swift toolchain). The switch needs
// --disable-local-rpath beside it: SwiftPM otherwise gives executables a RUNPATH of $ORIGIN, and
// glibc's static-pie start-up asserts there is none, so such a binary dies of SIGSEGV at start
// without a word (the assertion fails before anything can print). `make release` checks that the
// agent it built runs. That is also why the switch is not on by default: a plain
// `swift build -c release` gives a working, dynamically linked agent.
let staticPIEAgent: [LinkerSetting] = Context.environment["QUIESCE_STATIC_PIE"] == "1"
    ? [.unsafeFlags(["-static-executable", "-Xclang-linker", "-static-pie", "-Xclang-linker", "-fuse-ld=lld"],
                    .when(platforms: [.linux], configuration: .release))]
    : []

// The agent (quiesced) goes into every guest: it depends on swift-log only (it speaks systemd's
// notify, socket-activation and journal protocols itself), and never on Foundation. The host tool (quiescectl) may use swift-argument-parser.
let package = Package(
    name: "Quiesce",
    products: [
        .executable(name: "quiesced", targets: ["quiesced"]),
        .executable(name: "quiescectl", targets: ["quiescectl"]),
        .library(name: "QuiesceProtocol", targets: ["QuiesceProtocol"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-log.git", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.5.0"),
    ],
    targets: [
        // Pure wire protocol: messages, JSON, framing. No Glibc, no sockets.
        .target(name: "QuiesceProtocol"),
        // C constants and structs Swift cannot see (linux/fs.h, linux/vm_sockets.h, linux/loop.h).
        .target(name: "CQuiesceShims"),
        // Swift concurrency's global executor on our own threads (no libdispatch timer when idle).
        .target(name: "CQuiesceExecutor"),
        // The only place that calls the kernel: the only Swift module that imports Glibc
        // (scripts/check-layering checks it).
        .target(name: "QuiesceLinux", dependencies: ["CQuiesceShims"]),
        // Guest side: discovery, freeze plan, engine, daemon state machine, listeners.
        .target(name: "QuiesceAgent", dependencies: [
            "QuiesceProtocol", "QuiesceLinux",
            .product(name: "Logging", package: "swift-log"),
        ]),
        // Host side: transports, agent client, checkpoint bracket.
        .target(name: "QuiesceHost", dependencies: ["QuiesceProtocol", "QuiesceLinux"]),
        .executableTarget(name: "quiesced", dependencies: ["QuiesceAgent", "CQuiesceExecutor"],
                          linkerSettings: staticPIEAgent),
        .executableTarget(name: "quiescectl", dependencies: [
            "QuiesceHost",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        // Loop-filesystem labs, agent processes and a blocking client, shared by the test targets.
        .target(name: "QuiesceTestSupport", dependencies: ["QuiesceProtocol", "QuiesceLinux"],
                path: "Tests/QuiesceTestSupport"),
        .testTarget(name: "QuiesceProtocolTests", dependencies: ["QuiesceProtocol", "QuiesceTestSupport"]),
        .testTarget(name: "QuiesceAgentTests", dependencies: ["QuiesceAgent", "QuiesceLinux", "QuiesceTestSupport", "quiesced"]),
        .testTarget(name: "QuiesceHostTests", dependencies: ["QuiesceHost", "QuiesceTestSupport", "quiesced", "quiescectl"]),
    ],
    swiftLanguageModes: [.v6]
)
