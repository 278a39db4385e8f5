//! Long-running console operations, advanced a step at a time by
//! [`Console::poll`](crate::Console::poll) so the appliance is never stuck inside one
//! command.

use core::fmt::Write;

use crate::CommandError;

/// What a job may use during one step.
pub(crate) struct Context<'a> {
    /// The monotonic clock (nanoseconds).
    pub clock: &'a dyn Fn() -> u64,
}

/// Outcome of one step.
pub(crate) enum Progress {
    /// More to do; step again soon.
    Running,
    /// Done; an error is printed as the command's one `error:` line.
    Finished(Result<(), CommandError>),
}

/// A command that takes longer than one step.
pub(crate) trait Job {
    /// Does the work that is ready (submits, reaps completions) without waiting.
    fn step(&mut self, context: &mut Context<'_>, out: &mut dyn Write) -> Progress;
    /// Asks the job to stop; it finishes once its requests in flight are back.
    fn cancel(&mut self);
}
