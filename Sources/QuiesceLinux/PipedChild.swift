// A child process with pipes on its standard streams and a pidfd: what the agent's hooks run as.
#if canImport(Glibc)
import Glibc
#endif
import CQuiesceShims
import Synchronization

/// A child that leads its own process group, reads a pipe on its standard input, and writes
/// standard output and standard error into one pipe. Its end is watched through a pidfd
/// (`pidfd_open`, Linux 5.3+), so a thread can `poll` output and exit together without a timer.
///
/// The child inherits no descriptor beyond 0, 1 and 2.
///
/// Reaping and signalling the group are serialised: `killGroup` never signals after the child
/// was reaped, so it can never hit a process group that reused the pid.
public final class PipedChild: @unchecked Sendable {
    public let pid: pid_t
    /// Read end of the child's stdout+stderr, non-blocking.
    public let outputFD: Int32
    /// Polls readable once the child has exited.
    public let pidFD: Int32
    private let stdinState: Mutex<Int32>
    private let reaped = Mutex(false)

    private init(pid: pid_t, stdinFD: Int32, outputFD: Int32, pidFD: Int32) {
        self.pid = pid
        self.stdinState = Mutex(stdinFD)
        self.outputFD = outputFD
        self.pidFD = pidFD
    }

    /// Starts `arguments[0]` (an absolute path) in a new process group with `environment`.
    /// Errors: the pipe, pidfd or spawn failure (ENOENT, EACCES, ENOSYS for a kernel before 5.3).
    public static func start(arguments: [String], environment: [String]) throws(SystemError) -> PipedChild {
        guard let program = arguments.first, program.hasPrefix("/") else {
            throw SystemError("spawn", arguments.first ?? "(empty command)", .EINVAL)
        }
        var input: [Int32] = [-1, -1]
        var output: [Int32] = [-1, -1]
        guard qs_pipe_cloexec(&input) == 0 else { throw SystemError("pipe2", program, Errno(errno)) }
        guard qs_pipe_cloexec(&output) == 0 else {
            let e = errno
            FD.close(input[0]); FD.close(input[1])
            throw SystemError("pipe2", program, Errno(e))
        }
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP))
        posix_spawnattr_setpgroup(&attr, 0)
        resetSignals(&attr)
        // dup2 clears close-on-exec on the new descriptors; the originals close at exec.
        posix_spawn_file_actions_adddup2(&actions, input[0], 0)
        posix_spawn_file_actions_adddup2(&actions, output[1], 1)
        posix_spawn_file_actions_adddup2(&actions, output[1], 2)
        // Nothing else: not the agent's sockets (activated ones are not close-on-exec), not
        // descriptors its own parent leaked to it.
        _ = qs_spawn_closefrom(&actions, 3)

        var pid: pid_t = 0
        let rc = withCArrays(arguments, environment) { argv, envp in posix_spawn(&pid, program, &actions, &attr, argv, envp) }
        FD.close(input[0])
        FD.close(output[1])
        guard rc == 0 else {
            FD.close(input[1]); FD.close(output[0])
            throw SystemError("spawn", program, Errno(rc))
        }
        let pidFD = qs_pidfd_open(pid)
        if pidFD < 0 {
            let e = errno
            _ = kill(-pid, SIGKILL)
            var status: Int32 = 0
            _ = waitpid(pid, &status, 0)
            FD.close(input[1]); FD.close(output[0])
            throw SystemError("pidfd_open", program, Errno(e))
        }
        FD.setNonBlocking(output[0], true)
        return PipedChild(pid: pid, stdinFD: input[1], outputFD: output[0], pidFD: pidFD)
    }

    /// Writes `bytes` to the child's standard input (best effort: a child that stopped reading,
    /// or exited, gets nothing; never blocks longer than `timeoutMs`).
    public func writeStdin(_ bytes: [UInt8], timeoutMs: Int32 = 1000) {
        stdinState.withLock { fd in
            guard fd >= 0 else { return }
            FD.setNonBlocking(fd, true)
            try? FD.writeAll(fd, bytes, timeoutMs: timeoutMs)
        }
    }

    /// Closes the child's standard input: it reads end of file.
    public func closeStdin() {
        stdinState.withLock { fd in
            if fd >= 0 { FD.close(fd); fd = -1 }
        }
    }

    /// SIGKILL to the whole process group, unless the child has been reaped already.
    public func killGroup(_ sig: Int32 = SIGKILL) {
        reaped.withLock { done in
            if !done { _ = kill(-pid, sig) }
        }
    }

    /// Reaps the child once `pidFD` polled readable (or blocks until it ends). Whatever it left
    /// running in its process group is killed first, while the group still exists.
    public func reap() -> ExitStatus {
        reaped.withLock { done -> ExitStatus in
            _ = kill(-pid, SIGKILL)
            var status: Int32 = 0
            var rc: pid_t
            repeat { rc = waitpid(pid, &status, 0) } while rc < 0 && errno == EINTR
            done = true
            return rc == pid ? ExitStatus(waitStatus: status) : .exited(-1)
        }
    }

    deinit {
        closeStdin()
        FD.close(outputFD)
        FD.close(pidFD)
    }
}
