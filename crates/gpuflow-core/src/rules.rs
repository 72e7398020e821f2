//! The job transition rules, written once. Both the single engine (`scheduler::State`) and agent
//! mode (`cluster`, applied by the PostgreSQL store) decide what happens to a job through these
//! functions; they differ only in how they hold a job's stages and in how they carry a decision
//! out (the single engine sets statuses and kills processes; agent mode writes rows).
//!
//! The rules:
//! - A stage is ready when it is pending and every predecessor (`after`) succeeded.
//! - A success readies the stages that depend on it, unless the job is ending.
//! - A failure spends one try of the retry budget: it backs off per the retry policy, or, when
//!   the budget is spent or the failure must not be retried, fails the stage and the job. A
//!   failing job cancels what has not started and stops its running stages.
//! - An interruption (the engine restarted, or the agent's lease was lost) is not the stage's
//!   fault: it re-queues without spending the budget, up to `MAX_INTERRUPTIONS`.
//! - While a job is ending (failing or cancelled), an attempt that ends is cancelled.
//! - A job is final once nothing of it runs: in its ending state, or succeeded when every stage
//!   succeeded.

use crate::pipeline::StageIndex;
use crate::retry::RetryPolicy;
use crate::scheduler::{AttemptResult, JobState};

/// How many interruptions (engine restarts, lost leases) one stage may suffer before it is
/// failed. Interruptions are not the stage's fault, so they do not spend its retry budget, but
/// a stage that takes its engine down with it (say, by exhausting host memory) must not loop
/// forever.
pub const MAX_INTERRUPTIONS: u32 = 5;

/// Where a stage stands, as the rules see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Waiting for predecessors.
    Pending,
    /// Ready: queued for resources, or waiting out a retry delay. Holds nothing.
    Waiting,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl Status {
    pub fn is_final(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Cancelled)
    }
}

/// One stage of a job: its place in the pipeline and where it stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stage<'a> {
    pub name: &'a str,
    /// Predecessors: every one must succeed before this stage starts.
    pub after: &'a [StageIndex],
    pub status: Status,
    /// Failed attempts that count against the retry budget.
    pub failures: u32,
    pub interruptions: u32,
}

/// What interrupted an attempt. Only the wording differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interruption {
    /// The engine stopped while the attempt ran (found on restart).
    EngineRestart,
    /// The agent holding its lease stopped renewing it (died, froze or lost the database).
    LeaseLost,
}

impl Interruption {
    /// The attempt's error: `failed` when this interruption was one too many.
    pub fn error(self, interruptions: u32, failed: bool) -> String {
        match (self, failed) {
            (Interruption::EngineRestart, true) => format!("interrupted by {interruptions} engine restarts"),
            (Interruption::EngineRestart, false) => "interrupted: the engine stopped while this attempt ran".into(),
            (Interruption::LeaseLost, true) => {
                format!("its lease was lost {interruptions} times (agents died or lost the database)")
            }
            (Interruption::LeaseLost, false) => {
                "lease expired: the agent running it stopped renewing (died, froze or lost the database)".into()
            }
        }
    }
}

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq)]
pub enum End {
    Succeeded,
    /// It failed (or timed out, or was stopped by a policy); this spends one try.
    Failed {
        error: String,
        retryable: bool,
        timed_out: bool,
    },
    /// It was stopped because its job is ending.
    Cancelled {
        error: String,
    },
    Interrupted(Interruption),
}

/// What becomes of one stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Succeeded,
    /// Ready again after `delay_ms` (0: at once).
    Retry {
        delay_ms: u64,
    },
    Failed,
    Cancelled,
    /// A pending stage whose predecessors have all succeeded.
    Ready,
    /// A running stage of a job that now ends: stop it. It stays running until its attempt
    /// ends (as cancelled); agent mode leaves this to the agent holding it, which sees the
    /// job's ending.
    Stop,
}

/// A job's transition.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Transition {
    /// How the attempt is recorded (absent when no attempt ended).
    pub attempt: Option<(AttemptResult, Option<String>)>,
    /// `(stage, change)`: the ended stage first, then the others in stage order.
    pub changes: Vec<(StageIndex, Change)>,
    /// The ended stage's counters afterwards (0 when no attempt ended).
    pub failures: u32,
    pub interruptions: u32,
    /// Set when this transition makes the job end (fail or cancel), with the job's error.
    pub ending: Option<(JobState, String)>,
    /// Set when nothing of the job runs any more: it is final now, in this state.
    pub finished: Option<JobState>,
}

/// Whether `stage` may be queued: it is pending and every predecessor succeeded.
pub fn is_ready(stages: &[Stage], stage: StageIndex) -> bool {
    stages[stage].status == Status::Pending
        && stages[stage].after.iter().all(|p| stages[*p].status == Status::Succeeded)
}

/// The job's error when `stage` failed for good with `error` after `failures` spent tries.
pub fn failure_text(name: &str, failures: u32, error: &str) -> String {
    let tries = if failures > 1 { format!(" after {failures} attempts") } else { String::new() };
    format!("stage `{name}` failed{tries}: {error}")
}

/// The job's error when `stage` failed for good because it was interrupted too often.
pub fn interrupted_text(name: &str, error: &str) -> String {
    format!("stage `{name}` failed: {error}")
}

/// An attempt of `stage` ended. `ending` is the job's pending end, if it is already failing or
/// cancelled. `retry` is the stage's retry policy.
pub fn attempt_ended(
    stages: &[Stage],
    ending: Option<JobState>,
    stage: StageIndex,
    end: End,
    retry: &RetryPolicy,
) -> Transition {
    let s = &stages[stage];
    let mut failures = s.failures;
    let mut interruptions = s.interruptions;
    let (result, error, change, failed_text) = match end {
        End::Succeeded => (AttemptResult::Succeeded, None, Change::Succeeded, None),
        End::Cancelled { error } => (AttemptResult::Cancelled, Some(error), Change::Cancelled, None),
        End::Failed { error, retryable, timed_out } => {
            failures += 1;
            let result = if timed_out { AttemptResult::TimedOut } else { AttemptResult::Failed };
            let change = match ending {
                Some(_) => Change::Cancelled,
                None if !retryable => Change::Failed,
                None => match retry.backoff_after(failures) {
                    Some(delay_ms) => Change::Retry { delay_ms },
                    None => Change::Failed,
                },
            };
            let text = failure_text(s.name, failures, &error);
            (result, Some(error), change, Some(text))
        }
        End::Interrupted(cause) => {
            interruptions += 1;
            let change = if ending.is_some() {
                Change::Cancelled
            } else if interruptions > MAX_INTERRUPTIONS {
                Change::Failed
            } else {
                Change::Retry { delay_ms: 0 }
            };
            let error = cause.error(interruptions, change == Change::Failed);
            let text = interrupted_text(s.name, &error);
            (AttemptResult::Interrupted, Some(error), change, Some(text))
        }
    };

    let mut after: Vec<Status> = stages.iter().map(|s| s.status).collect();
    after[stage] = match change {
        Change::Succeeded => Status::Succeeded,
        Change::Retry { .. } | Change::Ready => Status::Waiting,
        Change::Failed => Status::Failed,
        Change::Cancelled => Status::Cancelled,
        Change::Stop => Status::Running,
    };
    let mut changes = vec![(stage, change.clone())];
    let mut new_ending = None;
    match change {
        Change::Succeeded if ending.is_none() => {
            for (j, other) in stages.iter().enumerate() {
                let ready = after[j] == Status::Pending
                    && other.after.contains(&stage)
                    && other.after.iter().all(|p| after[*p] == Status::Succeeded);
                if ready {
                    after[j] = Status::Waiting;
                    changes.push((j, Change::Ready));
                }
            }
        }
        Change::Failed if ending.is_none() => {
            new_ending = Some((JobState::Failed, failed_text.unwrap_or_default()));
            stop_the_rest(&mut after, &mut changes);
        }
        _ => {}
    }
    let ending_now = ending.or(new_ending.as_ref().map(|(state, _)| *state));
    Transition {
        attempt: Some((result, error)),
        changes,
        failures,
        interruptions,
        ending: new_ending,
        finished: finished(&after, ending_now),
    }
}

/// The job is bound to end in `state` with `error` (a cancel, or a request that can no longer
/// fit): cancel what has not started and stop what runs. Nothing changes when it is already
/// ending.
pub fn end_job(stages: &[Stage], ending: Option<JobState>, state: JobState, error: String) -> Transition {
    let mut after: Vec<Status> = stages.iter().map(|s| s.status).collect();
    let mut changes = Vec::new();
    let new_ending = match ending {
        Some(_) => None,
        None => {
            stop_the_rest(&mut after, &mut changes);
            Some((state, error))
        }
    };
    let ending_now = ending.or(Some(state));
    Transition {
        attempt: None,
        changes,
        failures: 0,
        interruptions: 0,
        ending: new_ending,
        finished: finished(&after, ending_now),
    }
}

/// The job was asked to stop. `None` when it has already finished (every stage final and not
/// ending: it succeeded).
pub fn cancel(stages: &[Stage], ending: Option<JobState>) -> Option<Transition> {
    if ending.is_none() && stages.iter().all(|s| s.status.is_final()) {
        return None;
    }
    Some(end_job(stages, ending, JobState::Cancelled, "cancelled by request".to_string()))
}

/// A job starts to end: what has not started is cancelled, what runs is stopped.
fn stop_the_rest(after: &mut [Status], changes: &mut Vec<(StageIndex, Change)>) {
    for (j, status) in after.iter_mut().enumerate() {
        match status {
            Status::Pending | Status::Waiting => {
                *status = Status::Cancelled;
                changes.push((j, Change::Cancelled));
            }
            Status::Running => changes.push((j, Change::Stop)),
            _ => {}
        }
    }
}

/// The job's final state, once nothing of it runs: its ending, or succeeded when every stage
/// succeeded. `None` while it goes on.
pub fn finished(statuses: &[Status], ending: Option<JobState>) -> Option<JobState> {
    if statuses.contains(&Status::Running) {
        return None;
    }
    match ending {
        Some(state) => Some(state),
        None if statuses.iter().all(|s| *s == Status::Succeeded) => Some(JobState::Succeeded),
        None => None,
    }
}

/// The stages no other stage depends on: their outputs make the job's output.
pub fn sinks<'a>(after: impl Iterator<Item = &'a [StageIndex]> + Clone) -> Vec<StageIndex> {
    let n = after.clone().count();
    (0..n).filter(|i| !after.clone().any(|a| a.contains(i))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use Status::*;

    const CHAIN: [&[usize]; 3] = [&[], &[0], &[1]];

    fn chain(statuses: &[Status]) -> Vec<Stage<'static>> {
        statuses
            .iter()
            .enumerate()
            .map(|(i, s)| Stage {
                name: ["a", "b", "c"][i],
                after: CHAIN[i],
                status: *s,
                failures: 0,
                interruptions: 0,
            })
            .collect()
    }

    #[test]
    fn the_job_failure_text_counts_spent_tries_but_not_interruptions() {
        let policy = RetryPolicy::no_retry();
        let mut stages = chain(&[Running, Pending]);
        stages[0].failures = 2;
        let fail = End::Failed { error: "exit 1".into(), retryable: true, timed_out: false };
        let t = attempt_ended(&stages, None, 0, fail, &policy);
        assert_eq!(t.ending.unwrap().1, "stage `a` failed after 3 attempts: exit 1");
        stages[0].interruptions = MAX_INTERRUPTIONS;
        let t = attempt_ended(&stages, None, 0, End::Interrupted(Interruption::EngineRestart), &policy);
        assert_eq!(t.changes, vec![(0, Change::Failed), (1, Change::Cancelled)]);
        assert_eq!(t.ending.unwrap().1, "stage `a` failed: interrupted by 6 engine restarts");
        assert_eq!(t.failures, 2, "an interruption spends no try");
    }

    #[test]
    fn ending_stops_running_stages_and_waits_for_them() {
        let t = cancel(&chain(&[Running, Waiting, Pending]), None).unwrap();
        assert_eq!(t.changes, vec![(0, Change::Stop), (1, Change::Cancelled), (2, Change::Cancelled)]);
        assert_eq!(t.finished, None);
        let t = cancel(&chain(&[Cancelled, Cancelled, Cancelled]), Some(JobState::Cancelled)).unwrap();
        assert_eq!((t.changes, t.ending, t.finished), (vec![], None, Some(JobState::Cancelled)));
        assert_eq!(cancel(&chain(&[Succeeded, Succeeded, Succeeded]), None), None);
    }

    #[test]
    fn sinks_are_the_stages_nothing_depends_on() {
        assert_eq!(sinks(CHAIN.iter().copied()), vec![2]);
        assert_eq!(sinks([&[][..], &[], &[0]].into_iter()), vec![1, 2]);
    }
}
