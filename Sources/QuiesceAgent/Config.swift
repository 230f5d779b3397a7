// The agent's settings: built-in defaults, then the config file, then command-line flags.
import QuiesceLinux
import QuiesceProtocol

/// Where the agent listens.
public enum ListenAddress: Sendable, Equatable, CustomStringConvertible {
    case unix(path: String)
    /// cid nil means any (VMADDR_CID_ANY).
    case vsock(cid: UInt32?, port: UInt32)
    case serial(device: String)
    /// qemu-ga's dialect, for hosts that drive qemu-guest-agent (libvirt, Proxmox).
    case qgaUnix(path: String)
    case qgaSerial(device: String)
    /// The Hyper-V VSS channel of the kernel's hv_utils driver (Hyper-V and Azure guests), in
    /// place of hv_vss_daemon.
    case hvVSS(device: String)

    /// The Hyper-V VSS driver's character device.
    public static let defaultHVVSSDevice = "/dev/vmbus/hv_vss"

    /// The line protocol spoken on it (hv-vss: speaks the driver's binary messages instead).
    public var dialect: Dialect {
        switch self {
        case .unix, .vsock, .serial, .hvVSS: .quiesce
        case .qgaUnix, .qgaSerial: .qga
        }
    }

    /// Parses `unix:PATH`, `vsock:PORT`, `vsock:CID:PORT`, `serial:DEVICE`, `qga+unix:PATH`,
    /// `qga+serial:DEVICE` (also written `qga:unix:`, `qga:serial:`), `hv-vss:DEVICE`; `hv-vss:`
    /// or `hv-vss` alone is `/dev/vmbus/hv_vss`. The parser is the one the host uses
    /// (`TransportAddress`); paths must be absolute here.
    public init(parsing text: String) throws(ConfigError) {
        let parsed: TransportAddress
        do { parsed = try TransportAddress(parsing: text, for: .listen) } catch { throw ConfigError(error.description) }
        switch parsed.transport {
        case .unix(let path): self = parsed.speaksQGA ? .qgaUnix(path: path) : .unix(path: path)
        case .serial(let device): self = parsed.speaksQGA ? .qgaSerial(device: device) : .serial(device: device)
        case .vsock(let cid, let port): self = .vsock(cid: cid, port: port)
        case .hvVSS(let device): self = .hvVSS(device: device ?? ListenAddress.defaultHVVSSDevice)
        case .hybridVsock:
            // TransportAddress refuses hvsock: for `.listen`.
            throw ConfigError(AddressParseError(text: text, reason: "expected \(TransportAddress.forms(for: .listen))", role: .listen).description)
        }
    }

    public var description: String {
        switch self {
        case .unix(let path): "unix:\(path)"
        case .vsock(nil, let port): "vsock:\(port)"
        case .vsock(let cid?, let port): "vsock:\(cid):\(port)"
        case .serial(let device): "serial:\(device)"
        case .qgaUnix(let path): "qga+unix:\(path)"
        case .qgaSerial(let device): "qga+serial:\(device)"
        case .hvVSS(let device): "hv-vss:\(device)"
        }
    }
}

/// A configuration problem, with the file and line when it comes from a file.
public struct ConfigError: Error, Sendable, CustomStringConvertible {
    public var message: String
    /// The problem as found; a value in it may hold control characters (a CR of a file edited
    /// on Windows, a NUL): print it with `OneLine.escaped`.
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// Everything the agent can be told. Every key of the config file is also a flag.
public struct AgentConfig: Sendable {
    public static let defaultConfigPath = "/etc/quiesce/quiesced.conf"
    public static let defaultStateDir = "/run/quiesce"

    public var listen: [ListenAddress] = []
    public var stateDir = AgentConfig.defaultStateDir
    public var scope = FreezeScope()
    /// The longest a freeze may last without a keepalive; every requested timeout is capped by it.
    public var maxFreezeMs: Int64 = 600_000
    /// The longest the presync, or one wave of FIFREEZE calls, may take before the freeze is
    /// abandoned and everything it froze is thawed (10 s: Windows VSS holds writes for at most
    /// 10 s too). Never longer than the freeze's own timeout.
    public var freezeStepTimeoutMs: Int64 = 10_000
    /// Whether a freeze first syncs every filesystem in parallel while writers still run (the
    /// presync, repeated while it converges: `PresyncConvergence`). Without it FIFREEZE flushes
    /// everything with the writers already blocked: ordinary writers stall about twice as long,
    /// but writers that stream without pause (which re-dirty everything during a presync
    /// anyway) get the same stall in about half the freeze time (bench/README.md).
    public var presync = true
    public var hooksDir: String? = nil
    public var hookTimeoutMs: Int64 = 30_000
    /// Whether a freeze bound to a connection thaws when that connection closes.
    public var thawOnDisconnect = true
    /// vsock peers allowed to connect (default: the host, CID 2).
    public var allowedVsockCIDs: Set<UInt32> = [2]
    /// Unix socket peers allowed to connect, by uid (default: root).
    public var allowedUIDs: Set<UInt32> = [0]
    public var onFrozenElsewhere: FrozenElsewherePolicy = .fail
    public var maxConnections = 32
    /// Requests per second a connection may sustain, and its burst.
    public var rateLimit = 50
    public var rateBurst = 100
    /// The Unix socket of a private qemu-ga to which the qga listeners pass every command they do
    /// not implement (`qga-forward = unix:PATH`); nil: such commands are `CommandNotFound`.
    public var qgaForward: String? = nil
    /// How long one forwarded command may take (connect to reply), in milliseconds.
    public var qgaForwardTimeoutMs: Int64 = 300_000

    public init() {}

    /// The settings a key accepts, for `--help` and the sample config.
    public static let keys: [(key: String, value: String, help: String)] = [
        ("listen", "ADDR", "where to listen (repeatable): unix:, vsock:, serial:, qga+unix:, qga+serial:, hv-vss: (see ADDR)"),
        ("state-dir", "DIR", "where the crash-safety record lives (default /run/quiesce, a tmpfs); a freeze of the filesystem it is on is refused"),
        ("include", "GLOB", "only mountpoints matching a glob are eligible (repeatable)"),
        ("exclude", "GLOB", "mountpoints matching a glob are never frozen, nor their filesystem through another mount (repeatable)"),
        ("include-type", "TYPE", "only these filesystem types are eligible (repeatable)"),
        ("exclude-type", "TYPE", "these filesystem types are never frozen (repeatable)"),
        ("max-freeze", "DURATION", "longest freeze without a keepalive; caps every timeout (default 10m)"),
        ("freeze-step-timeout", "DURATION", "longest the presync or one freeze wave may take before the freeze is abandoned and thawed (default 10s)"),
        ("presync", "yes|no", "sync every filesystem in parallel before freezing, while writers still run (default yes; no suits guests whose writers stream without pause)"),
        ("hooks-dir", "DIR", "run the hooks in DIR around each freeze (freeze, thaw, freeze-failed)"),
        ("hook-timeout", "DURATION", "how long one hook phase may run unless its header says (default 30s)"),
        ("thaw-on-disconnect", "yes|no", "thaw a bound freeze when its connection closes (default yes)"),
        ("allow-vsock-cid", "CID", "vsock peers allowed to connect (repeatable; default 2, the host)"),
        ("allow-uid", "UID", "Unix socket peers allowed to connect, by uid (repeatable; default 0)"),
        ("on-frozen-elsewhere", "fail|skip", "what to do when a filesystem is already frozen by someone else (default fail)"),
        ("max-connections", "N", "concurrent connections (default 32); past it, a new one closes the connection idle longest (30 s, holding no bound freeze), else is refused"),
        ("qga-forward", "unix:PATH", "pass the qemu-ga commands quiesced does not implement to a qemu-ga listening on PATH"),
        ("qga-forward-timeout", "DURATION", "longest a forwarded qemu-ga command may take (default 5m; 5s while frozen)"),
    ]

    /// Applies one `key = value` setting. List keys given for the first time by a source replace
    /// the lists of earlier sources (so flags replace the file's `listen` lines, not add to them).
    public mutating func apply(key: String, value: String, replacing: inout Set<String>) throws(ConfigError) {
        func fresh(_ k: String) -> Bool { replacing.insert(k).inserted }
        func duration(_ v: String) throws(ConfigError) -> Int64 {
            let span: TimeSpan
            do { span = try TimeSpan(parsing: v) } catch { throw ConfigError("\(key): \(error)") }
            guard span.milliseconds > 0 else { throw ConfigError("\(key): must be longer than 0") }
            return span.milliseconds
        }
        func number(_ v: String) throws(ConfigError) -> UInt32 {
            guard let n = UInt32(v) else {
                if !v.isEmpty, v.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) {
                    throw ConfigError("\(key): \(v) is out of range (at most \(UInt32.max))")
                }
                throw ConfigError("\(key): \"\(v)\" is not a non-negative integer")
            }
            return n
        }
        func yesNo(_ v: String) throws(ConfigError) -> Bool {
            switch v.lowercased() {
            case "yes", "true", "on", "1": return true
            case "no", "false", "off", "0": return false
            default: throw ConfigError("\(key): \"\(v)\" is not yes or no")
            }
        }
        func nonEmpty(_ v: String) throws(ConfigError) -> String {
            guard !v.isEmpty else { throw ConfigError("\(key): needs a value") }
            // No path, glob or type name holds a control character; a NUL would cut it short.
            if v.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7F }) {
                throw ConfigError("\(key): \"\(v)\" contains a control character")
            }
            return v
        }
        // A mountpoint glob: mountpoints are absolute, so a relative pattern never matches and
        // would silently leave the scope empty (include) or exclude nothing (exclude).
        func mountGlob(_ v: String) throws(ConfigError) -> String {
            let v = try nonEmpty(v)
            guard v.hasPrefix("/") || v.hasPrefix("*") else {
                throw ConfigError("\(key): \"\(v)\" never matches: mountpoints are absolute paths (start the glob with /)")
            }
            if let problem = Glob.problem(in: v) { throw ConfigError("\(key): \"\(v)\": \(problem)") }
            // Mountpoints have no trailing slash: "/srv/data/" would match nothing, silently.
            var trimmed = Substring(v)
            while trimmed.count > 1 && trimmed.hasSuffix("/") { trimmed = trimmed.dropLast() }
            return String(trimmed)
        }
        // A filesystem type as /proc/self/mountinfo spells it (ext4, xfs, fuse.sshfs, nfs4).
        func fsType(_ v: String) throws(ConfigError) -> String {
            let v = try nonEmpty(v)
            guard v.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F && $0 != UInt8(ascii: ",") }) else {
                throw ConfigError("\(key): \"\(v)\" is not a filesystem type name (one word, as in /proc/self/mountinfo, e.g. ext4)")
            }
            return v
        }
        switch key {
        case "listen":
            if fresh(key) { listen = [] }
            listen.append(try ListenAddress(parsing: value))
        case "state-dir":
            guard value.hasPrefix("/") else { throw ConfigError("state-dir: \"\(value)\" must be an absolute path") }
            stateDir = value
        case "include":
            if fresh(key) { scope.include = [] }
            scope.include.append(try mountGlob(value))
        case "exclude":
            if fresh(key) { scope.exclude = [] }
            scope.exclude.append(try mountGlob(value))
        case "include-type":
            if fresh(key) { scope.includeTypes = [] }
            scope.includeTypes.append(try fsType(value))
        case "exclude-type":
            if fresh(key) { scope.excludeTypes = [] }
            scope.excludeTypes.append(try fsType(value))
        case "max-freeze":
            maxFreezeMs = try duration(value)
            guard maxFreezeMs <= Request.maxTimeoutMs else { throw ConfigError("max-freeze: at most 24h") }
            // Checked here, not only in validate(), so that the error names the file and line.
            guard maxFreezeMs >= 1000 else { throw ConfigError("max-freeze: at least 1s") }
        case "freeze-step-timeout":
            freezeStepTimeoutMs = try duration(value)
            guard freezeStepTimeoutMs <= Request.maxTimeoutMs else { throw ConfigError("freeze-step-timeout: at most 24h") }
            // One FIFREEZE costs about an RCU grace period (24-40 ms measured) even with nothing
            // to flush: below half a second every freeze of a busy guest would be abandoned.
            guard freezeStepTimeoutMs >= 500 else { throw ConfigError("freeze-step-timeout: at least 500ms") }
        case "hooks-dir":
            guard value.hasPrefix("/") else { throw ConfigError("hooks-dir: \"\(value)\" must be an absolute path") }
            hooksDir = value
        case "hook-timeout": hookTimeoutMs = try duration(value)
        case "thaw-on-disconnect": thawOnDisconnect = try yesNo(value)
        case "presync": presync = try yesNo(value)
        case "allow-vsock-cid":
            if fresh(key) { allowedVsockCIDs = [] }
            allowedVsockCIDs.insert(try number(value))
        case "allow-uid":
            if fresh(key) { allowedUIDs = [] }
            allowedUIDs.insert(try number(value))
        case "on-frozen-elsewhere":
            guard let p = FrozenElsewherePolicy(rawValue: value) else {
                throw ConfigError("on-frozen-elsewhere: \"\(value)\" is not fail or skip")
            }
            onFrozenElsewhere = p
        case "max-connections":
            let n = try number(value)
            guard (1...1024).contains(n) else { throw ConfigError("max-connections: must be 1 to 1024") }
            maxConnections = Int(n)
        case "qga-forward":
            guard value.hasPrefix("unix:") else { throw ConfigError("qga-forward: \"\(value)\" is not unix:PATH") }
            let path = String(value.dropFirst(5))
            guard path.hasPrefix("/") else { throw ConfigError("qga-forward: the socket path must be absolute") }
            guard path.utf8.count <= Socket.unixPathMax else {
                throw ConfigError("qga-forward: the socket path is longer than \(Socket.unixPathMax) bytes")
            }
            qgaForward = path
        case "qga-forward-timeout":
            qgaForwardTimeoutMs = try duration(value)
            guard qgaForwardTimeoutMs <= Request.maxTimeoutMs else { throw ConfigError("qga-forward-timeout: at most 24h") }
        default:
            throw ConfigError("unknown setting \"\(key)\"")
        }
    }

    /// Reads a config file: `key = value` lines, `#` comments, blank lines. Errors name file and line.
    /// Checks what no single setting shows, once the file and the flags are applied: two
    /// listeners on one socket path, device or vsock port (the second would fail at start,
    /// after the first had bound), and a max-freeze too short for any freeze to finish.
    public func validate() throws(ConfigError) {
        var seen: [String: ListenAddress] = [:]
        for address in listen {
            let key: String
            switch address {
            case .unix(let p), .qgaUnix(let p): key = "path \(Paths.lexicallyNormal(p))"
            case .serial(let d), .qgaSerial(let d), .hvVSS(let d): key = "device \(Paths.lexicallyNormal(d))"
            case .vsock(_, let port): key = "vsock port \(port)"
            }
            // The same address twice is listened on once (quiesced says so at start).
            if let first = seen.updateValue(address, forKey: key), first != address {
                throw ConfigError("listen: \(first) and \(address) both use \(key): give each listener its own")
            }
        }
        // FIFREEZE alone costs tens of milliseconds per filesystem, hooks more: a deadline
        // under a second would thaw freezes as they are made.
        guard maxFreezeMs >= 1000 else { throw ConfigError("max-freeze: at least 1s") }
    }

    /// Tells agents sharing a state dir apart (quiesced.service and quiesced-qga.service share
    /// /run/quiesce): the listen addresses as configured, sorted, space-separated; empty when
    /// none are (the default socket, or socket activation).
    public var identity: String { listen.map(\.description).sorted().joined(separator: " ") }

    /// Keys that may be given more than once, each line adding to a list.
    public static let listKeys: Set<String> = ["listen", "include", "exclude", "include-type", "exclude-type",
                                               "allow-vsock-cid", "allow-uid"]

    /// The lines of a config file that are not blank or comments, numbered from 1, without
    /// their comment and surrounding blanks. Lines end in LF or CRLF ("\r\n" is one Character in
    /// Swift, so it is named too). A comment starts at a `#` that begins the line or follows a
    /// space or tab, as in the shell: a `#` inside a value (unix:/run/a#b.sock) is part of it.
    /// A UTF-8 byte order mark at the start (some Windows editors write one) is skipped, as
    /// systemd's config parser does: it would otherwise be part of the first key, unseen.
    static func settingLines(_ text: String) -> [(number: Int, text: String)] {
        var out: [(number: Int, text: String)] = []
        var lineNumber = 0
        let text = text.hasPrefix("\u{FEFF}") ? String(text.dropFirst()) : text
        for rawLine in text.split(omittingEmptySubsequences: false, whereSeparator: { $0 == "\n" || $0 == "\r\n" }) {
            lineNumber += 1
            var line = Substring(rawLine)
            if let hash = line.indices.first(where: { i in
                line[i] == "#" && (i == line.startIndex || line[line.index(before: i)] == " " || line[line.index(before: i)] == "\t")
            }) { line = line[..<hash] }
            let trimmed = String(line).trimmingASCIIWhitespace()
            if !trimmed.isEmpty { out.append((lineNumber, trimmed)) }
        }
        return out
    }

    /// The settings crash recovery needs: where freeze records are, and how to run the hooks
    /// they owe.
    public static let recoveryKeys: Set<String> = ["state-dir", "hooks-dir", "hook-timeout"]

    /// Takes from `text` only the settings named in `keys` that are valid, skipping every other
    /// line and every error: for `quiesced --recover`, which must thaw what a dead agent left
    /// frozen even when the file is broken (an edit made while the agent ran), and must find
    /// the records where the file says they are. Returns the problems it skipped.
    public mutating func salvage(file path: String, text: String, keys: Set<String>) -> [String] {
        var problems: [String] = []
        var replacing = Set<String>()
        for (lineNumber, line) in AgentConfig.settingLines(text) {
            guard let eq = line.firstIndex(of: "=") else { continue }
            let key = String(line[..<eq]).trimmingASCIIWhitespace()
            guard keys.contains(key) else { continue }
            do throws(ConfigError) {
                replacing.remove(key)
                try apply(key: key, value: String(line[line.index(after: eq)...]).trimmingASCIIWhitespace(), replacing: &replacing)
            } catch {
                problems.append("\(path):\(lineNumber): \(error.message)")
            }
        }
        return problems
    }

    public mutating func load(file path: String, text: String) throws(ConfigError) {
        var replacing = Set<String>()
        var firstLine: [String: Int] = [:]
        for (lineNumber, trimmed) in AgentConfig.settingLines(text) {
            guard let eq = trimmed.firstIndex(of: "=") else {
                throw ConfigError("\(path):\(lineNumber): expected \"key = value\", got \"\(trimmed)\"")
            }
            let key = String(trimmed[..<eq]).trimmingASCIIWhitespace()
            let value = String(trimmed[trimmed.index(after: eq)...]).trimmingASCIIWhitespace()
            // A setting given twice in one file is a mistake (which one was meant?), not a list.
            if !AgentConfig.listKeys.contains(key), let first = firstLine.updateValue(firstLine[key] ?? lineNumber, forKey: key),
               first != lineNumber {
                throw ConfigError("\(path):\(lineNumber): \(key) is already set on line \(first): keep one")
            }
            do {
                try apply(key: key, value: value, replacing: &replacing)
            } catch {
                throw ConfigError("\(path):\(lineNumber): \(error.message)")
            }
        }
    }
}
