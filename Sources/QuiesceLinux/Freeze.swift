// FIFREEZE, FITHAW and syncfs on mounted filesystems.
#if canImport(Glibc)
import Glibc
#endif
import CQuiesceShims

/// Kernel operations on one mounted filesystem, addressed through an fd of its mountpoint.
public enum FilesystemOps {
    /// Opens a mountpoint for ioctls (O_RDONLY|O_DIRECTORY|O_NOFOLLOW) and checks that it is
    /// the filesystem we mean: its st_dev must be one of `expectedDevices` (when given), so a
    /// mount that changed under us is never frozen by mistake.
    public static func open(_ mountPoint: String, expectedDevices: Set<DeviceNumber> = []) throws(SystemError) -> Int32 {
        let fd = try retryingEINTR("open", mountPoint) {
            Glibc.open(mountPoint, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        }
        if !expectedDevices.isEmpty {
            var st = stat()
            guard fstat(fd, &st) == 0 else {
                let e = Errno.current
                FD.close(fd)
                throw SystemError("stat", mountPoint, e)
            }
            let dev = DeviceNumber(UInt64(st.st_dev))
            guard expectedDevices.contains(dev) else {
                FD.close(fd)
                throw SystemError("open", "\(mountPoint) (now device \(dev), expected \(expectedDevices.sorted().map(\.description).joined(separator: ",")))", .ESTALE)
            }
        }
        return fd
    }

    /// FIFREEZE: syncs the filesystem and blocks its writers until FITHAW.
    public static func freeze(_ fd: Int32) -> Errno? {
        if case .failure(let e) = syscallResult({ qs_fifreeze(fd) }) { return e }
        return nil
    }

    /// FITHAW. EINVAL means the filesystem was not frozen.
    public static func thaw(_ fd: Int32) -> Errno? {
        if case .failure(let e) = syscallResult({ qs_fithaw(fd) }) { return e }
        return nil
    }

    /// syncfs(2): flushes one filesystem without blocking its writers; reports writeback errors.
    public static func syncfs(_ fd: Int32) -> Errno? {
        if case .failure(let e) = syscallResult({ qs_syncfs(fd) }) { return e }
        return nil
    }
}

extension Errno {
    public static let ESTALE = Errno(Glibc.ESTALE)
}
