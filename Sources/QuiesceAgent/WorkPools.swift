// The agent's bounded pools for blocking work that is not a freeze wave.
import QuiesceLinux

/// Threads for blocking work whose parallelism is not the point, bounded so that no number of
/// connections or queued requests can make the agent start an unbounded number of threads.
/// Freeze and thaw waves keep threads of their own: there, parallel FIFREEZE calls are what
/// shortens the stall.
public enum WorkPools {
    /// Reading mountinfo and sysfs for a plan (`filesystems`, `freeze`, `sync`). Two threads: a
    /// plan takes milliseconds; one blocked on a FUSE or network server is given up at the step
    /// timeout, and while it stays blocked new plans are refused at once (see `AgentState`).
    public static let planning = BlockingPool(name: "plan", maxThreads: 2)
    /// Waiting for hook processes and reading the hooks directory. One freeze runs its hooks one
    /// after another, so two threads leave room for a `status`-time look at the directory.
    public static let hooks = BlockingPool(name: "hook", maxThreads: 2)
    /// syncfs for `sync` requests, at most this many filesystems at once agent-wide.
    public static let sync = BlockingPool(name: "sync", maxThreads: 4)
}
