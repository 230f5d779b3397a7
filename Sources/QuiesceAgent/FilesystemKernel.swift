// The seam between the freeze state machine and the kernel: the calls a freeze is made of and the
// planner, behind protocols whose default implementations are the real ones.
import QuiesceLinux
import QuiesceProtocol

/// The kernel calls the freeze engine and the deadline guard make, on descriptors of mountpoints.
///
/// `LinuxFilesystemKernel` is the real one (FIFREEZE, FITHAW, syncfs(2), sysfs and procfs
/// counters). Tests of the state machine give a fake that answers EBUSY, EIO or blocks, where the
/// real kernel would need root and filesystems that misbehave on cue. Every method may be called
/// from any thread, and may block (the engine calls them on threads of their own).
public protocol FilesystemKernel: Sendable {
    /// Opens a mountpoint for the ioctls, checking that its `st_dev` is one of
    /// `expectedDevices` (when not empty). Errors as `FilesystemOps.open`.
    func open(_ mountPoint: String, expectedDevices: Set<DeviceNumber>) throws(SystemError) -> Int32
    /// FIFREEZE; nil on success. EBUSY: frozen already; EOPNOTSUPP: cannot freeze.
    func freeze(_ fd: Int32) -> Errno?
    /// FITHAW; nil on success. EINVAL: it was not frozen.
    func thaw(_ fd: Int32) -> Errno?
    /// syncfs(2); nil on success, else the writeback error.
    func syncfs(_ fd: Int32) -> Errno?
    /// A close-on-exec duplicate (for the deadline guard), nil if none could be made.
    func duplicate(_ fd: Int32) -> Int32?
    func close(_ fd: Int32)
    /// How much the presync flushed and what is left dirty (see `PresyncConvergence`): bytes
    /// written to `devices` so far, bytes dirty or under writeback now, bytes dirtied so far,
    /// each nil when unknown (an unknown measure ends the presync after one pass).
    func writeback(of devices: Set<DeviceNumber>) -> WritebackSample
}

/// One reading of the writeback counters, in bytes; nil fields are unknown.
public struct WritebackSample: Sendable {
    /// Sectors written to the devices (sysfs `stat`), times 512, summed.
    public var written: UInt64?
    /// Dirty + Writeback of /proc/meminfo (system-wide).
    public var dirty: UInt64?
    /// nr_dirtied of /proc/vmstat (system-wide), times the page size.
    public var dirtied: UInt64?

    public init(written: UInt64?, dirty: UInt64?, dirtied: UInt64?) {
        self.written = written
        self.dirty = dirty
        self.dirtied = dirtied
    }
}

/// The real kernel.
public struct LinuxFilesystemKernel: FilesystemKernel {
    public init() {}

    public func open(_ mountPoint: String, expectedDevices: Set<DeviceNumber>) throws(SystemError) -> Int32 {
        try FilesystemOps.open(mountPoint, expectedDevices: expectedDevices)
    }
    public func freeze(_ fd: Int32) -> Errno? { FilesystemOps.freeze(fd) }
    public func thaw(_ fd: Int32) -> Errno? { FilesystemOps.thaw(fd) }
    public func syncfs(_ fd: Int32) -> Errno? { FilesystemOps.syncfs(fd) }
    public func duplicate(_ fd: Int32) -> Int32? { FD.duplicate(fd) }
    public func close(_ fd: Int32) { FD.close(fd) }
    public func writeback(of devices: Set<DeviceNumber>) -> WritebackSample {
        let counts = devices.compactMap(WritebackStats.bytesWritten)
        return WritebackSample(written: counts.isEmpty ? nil : counts.reduce(0, +),
                               dirty: WritebackStats.dirtyBytes(), dirtied: WritebackStats.bytesDirtied())
    }
}

/// Plans a freeze: which filesystems, opened how, in which waves. `Discovery` reads the live
/// system; tests of the state machine give a fixed plan.
public protocol FreezePlanner: Sendable {
    /// The targets in freeze order and what was passed over; `explicitMounts` and `avoiding`
    /// as `Discovery.plan`. Errors are the wire's (`unknown-mount`, `ineligible-mount`, `internal`).
    func plan(explicitMounts: [String]?, avoiding stuck: Set<DeviceNumber>) throws(ProtocolError)
        -> (targets: [FreezeTarget], skipped: [SkippedReport])
}

extension Discovery: FreezePlanner {}
