// A global executor for Swift concurrency that waits on a condition variable, not on a timer.
#ifndef QUIESCE_EXECUTOR_H
#define QUIESCE_EXECUTOR_H

/// Routes Swift concurrency's global executor (Task {}, actors, continuations) to `threads`
/// worker threads of our own, through the runtime's enqueue hooks. (Swift 6.3's `Task.sleep`
/// bypasses the delay hooks and still reaches libdispatch: the agent sleeps with `AsyncSleep`.) Idle workers wait on a
/// condition variable (CLOCK_MONOTONIC) with no timeout, or until the earliest Task.sleep is due.
///
/// Why: on Linux the default global executor is libdispatch, whose internal workqueue runs a
/// 1 Hz monitor timer forever once its first worker thread starts (src/event/workqueue.c,
/// `_dispatch_workq_monitor_pools`): an idle agent would wake once a second. Call this before
/// any task is created. Returns 0, or -1 when the threads cannot be started (the default
/// executor then stays in place).
int qs_install_global_executor(int threads);

#endif
