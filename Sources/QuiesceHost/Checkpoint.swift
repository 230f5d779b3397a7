// The checkpoint bracket: freeze every agent in parallel, run COMMAND once all are frozen, thaw whatever happens.
import QuiesceLinux

/// Runs one checkpoint. Create it, hand `interrupt` to whatever receives SIGINT/SIGTERM, call `run`.
public final class Checkpoint: Sendable {
    public let plan: CheckpointPlan
    let events = Mailbox<CheckpointEvent>()
    private let onTimeline: @Sendable (TimelineEntry) -> Void

    /// `onTimeline` sees each timeline entry as it happens (for live output), on the calling thread of `run`.
    public init(plan: CheckpointPlan, onTimeline: @escaping @Sendable (TimelineEntry) -> Void = { _ in }) {
        self.plan = plan
        self.onTimeline = onTimeline
    }

    /// Tells the checkpoint that quiescectl got a signal. The first one is forwarded to COMMAND,
    /// the guests are thawed and the run ends as interrupted; a second one stops waiting.
    public func interrupt(signal: Int32) {
        events.post(.signal(signal, monotonicNanos()))
    }

    /// Runs the checkpoint to the end and reports it. Blocks; call once.
    public func run() -> CheckpointReport {
        let run = CheckpointRun(plan: plan, events: events, onTimeline: onTimeline)
        return run.execute()
    }
}
