//! Job transitions when several agents share one store. Each agent runs only the stages it has
//! claimed, so no agent holds a whole job in memory: the store holds the job's stages, and each
//! change (an attempt ends, a lease expires, a cancel) is decided here from those rows, inside
//! the transaction that locks them. Same rules as the single-engine scheduler: a stage is ready
//! when all its predecessors succeeded; a failure spends the retry budget unless the lease was
//! lost (that is an interruption, capped at `MAX_INTERRUPTIONS`); a job that fails or is
//! cancelled cancels what has not started and ends once nothing of it runs.

use crate::retry::RetryPolicy;
use crate::scheduler::{AttemptResult, JobState, MAX_INTERRUPTIONS};

/// A stage as stored, in the words of the shared queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharedStageState {
    /// Waiting for predecessors.
    Pending,
    /// Claimable (now, or after its backoff delay).
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl SharedStageState {
    pub fn is_final(self) -> bool {
        matches!(self, SharedStageState::Succeeded | SharedStageState::Failed | SharedStageState::Cancelled)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct SharedStage {
    pub name: String,
    pub state: SharedStageState,
    pub deps: Vec<usize>,
    pub failures: u32,
    pub interruptions: u32,
}

/// How a claimed attempt ended.
#[derive(Clone, Debug, PartialEq)]
pub enum SharedEnd {
    Succeeded,
    Failed {
        error: String,
        retryable: bool,
        timed_out: bool,
    },
    /// Stopped because its job was cancelled or failed elsewhere.
    Cancelled {
        error: String,
    },
    /// Its lease expired: the agent died, froze or lost the database.
    LeaseLost,
}

/// What to write for one stage.
#[derive(Clone, Debug, PartialEq)]
pub enum StageChange {
    Succeeded,
    /// Claimable again after `delay_ms`.
    Retry {
        delay_ms: u64,
    },
    Failed,
    Cancelled,
    /// A pending stage whose predecessors have all succeeded.
    Ready,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    /// How the attempt is recorded (absent for a cancel that ended no attempt).
    pub attempt: Option<(AttemptResult, Option<String>)>,
    /// `(stage, change)`, the ended stage first.
    pub changes: Vec<(usize, StageChange)>,
    pub failures: u32,
    pub interruptions: u32,
    /// Set when this transition makes the job end (fail or cancel).
    pub ending: Option<(JobState, String)>,
    /// Set when nothing of the job runs any more: it is final now.
    pub finished: Option<JobState>,
}

/// An attempt of `stage` ended. `ending` is the job's pending end, if another stage already
/// failed or the job was cancelled.
pub fn attempt_ended(
    stages: &[SharedStage],
    ending: Option<JobState>,
    stage: usize,
    end: SharedEnd,
    retry: &RetryPolicy,
) -> Transition {
    let s = &stages[stage];
    let mut failures = s.failures;
    let mut interruptions = s.interruptions;
    let (result, error, change) = match end {
        SharedEnd::Succeeded => (AttemptResult::Succeeded, None, StageChange::Succeeded),
        SharedEnd::Cancelled { error } => (AttemptResult::Cancelled, Some(error), StageChange::Cancelled),
        SharedEnd::LeaseLost => {
            interruptions += 1;
            let change = if ending.is_some() {
                StageChange::Cancelled
            } else if interruptions > MAX_INTERRUPTIONS {
                StageChange::Failed
            } else {
                StageChange::Retry { delay_ms: 0 }
            };
            let error = if change == StageChange::Failed {
                format!("its lease was lost {interruptions} times (agents died or lost the database)")
            } else {
                "lease expired: the agent running it stopped renewing (died, froze or lost the database)".to_string()
            };
            (AttemptResult::Interrupted, Some(error), change)
        }
        SharedEnd::Failed { error, retryable, timed_out } => {
            failures += 1;
            let result = if timed_out { AttemptResult::TimedOut } else { AttemptResult::Failed };
            let change = match ending {
                Some(_) => StageChange::Cancelled,
                None if !retryable => StageChange::Failed,
                None => match retry.backoff_after(failures) {
                    Some(delay_ms) => StageChange::Retry { delay_ms },
                    None => StageChange::Failed,
                },
            };
            (result, Some(error), change)
        }
    };

    let mut after: Vec<SharedStageState> = stages.iter().map(|s| s.state).collect();
    let mut changes = vec![(stage, change.clone())];
    let mut new_ending = None;
    after[stage] = match change {
        StageChange::Succeeded => SharedStageState::Succeeded,
        StageChange::Retry { .. } | StageChange::Ready => SharedStageState::Queued,
        StageChange::Failed => SharedStageState::Failed,
        StageChange::Cancelled => SharedStageState::Cancelled,
    };
    match change {
        StageChange::Succeeded if ending.is_none() => {
            for (j, other) in stages.iter().enumerate() {
                let ready = after[j] == SharedStageState::Pending
                    && other.deps.contains(&stage)
                    && other.deps.iter().all(|d| after[*d] == SharedStageState::Succeeded);
                if ready {
                    after[j] = SharedStageState::Queued;
                    changes.push((j, StageChange::Ready));
                }
            }
        }
        StageChange::Failed if ending.is_none() => {
            let tries = if failures > 1 { format!(" after {failures} attempts") } else { String::new() };
            let reason = format!("stage `{}` failed{tries}: {}", s.name, error.clone().unwrap_or_default());
            new_ending = Some((JobState::Failed, reason));
            cancel_unstarted(&mut after, &mut changes);
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

/// The job was asked to stop. `None` when it has already finished.
pub fn cancel(stages: &[SharedStage], ending: Option<JobState>) -> Option<Transition> {
    let mut after: Vec<SharedStageState> = stages.iter().map(|s| s.state).collect();
    if ending.is_none() && after.iter().all(|s| s.is_final()) {
        return None;
    }
    let mut changes = Vec::new();
    cancel_unstarted(&mut after, &mut changes);
    let new_ending = ending.is_none().then(|| (JobState::Cancelled, "cancelled by request".to_string()));
    let ending_now = ending.unwrap_or(JobState::Cancelled);
    Some(Transition {
        attempt: None,
        changes,
        failures: 0,
        interruptions: 0,
        ending: new_ending,
        finished: finished(&after, Some(ending_now)),
    })
}

fn cancel_unstarted(after: &mut [SharedStageState], changes: &mut Vec<(usize, StageChange)>) {
    for (j, state) in after.iter_mut().enumerate() {
        if matches!(state, SharedStageState::Pending | SharedStageState::Queued) {
            *state = SharedStageState::Cancelled;
            changes.push((j, StageChange::Cancelled));
        }
    }
}

fn finished(after: &[SharedStageState], ending: Option<JobState>) -> Option<JobState> {
    if after.contains(&SharedStageState::Running) {
        return None;
    }
    match ending {
        Some(state) => Some(state),
        None if after.iter().all(|s| *s == SharedStageState::Succeeded) => Some(JobState::Succeeded),
        None => None,
    }
}

/// The stages no other stage depends on: their outputs make the job's output.
pub fn sinks(stages: &[SharedStage]) -> Vec<usize> {
    (0..stages.len()).filter(|i| !stages.iter().any(|s| s.deps.contains(i))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use SharedStageState::*;

    fn chain(states: &[SharedStageState]) -> Vec<SharedStage> {
        states
            .iter()
            .enumerate()
            .map(|(i, s)| SharedStage {
                name: format!("s{i}"),
                state: *s,
                deps: if i == 0 { vec![] } else { vec![i - 1] },
                failures: 0,
                interruptions: 0,
            })
            .collect()
    }

    #[test]
    fn success_readies_the_next_stage_and_the_last_finishes_the_job() {
        let t = attempt_ended(&chain(&[Running, Pending]), None, 0, SharedEnd::Succeeded, &RetryPolicy::default());
        assert_eq!(t.changes, vec![(0, StageChange::Succeeded), (1, StageChange::Ready)]);
        assert_eq!(t.finished, None);
        let t = attempt_ended(&chain(&[Succeeded, Running]), None, 1, SharedEnd::Succeeded, &RetryPolicy::default());
        assert_eq!(t.finished, Some(JobState::Succeeded));
    }

    #[test]
    fn a_join_waits_for_every_predecessor() {
        let mut stages = chain(&[Running, Running, Pending]);
        stages[1].deps = vec![];
        stages[2].deps = vec![0, 1];
        let t = attempt_ended(&stages, None, 0, SharedEnd::Succeeded, &RetryPolicy::default());
        assert_eq!(t.changes, vec![(0, StageChange::Succeeded)]);
        stages[0].state = Succeeded;
        let t = attempt_ended(&stages, None, 1, SharedEnd::Succeeded, &RetryPolicy::default());
        assert_eq!(t.changes, vec![(1, StageChange::Succeeded), (2, StageChange::Ready)]);
    }

    #[test]
    fn failures_back_off_then_fail_the_job_and_cancel_the_rest() {
        let policy = RetryPolicy { max_attempts: 2, initial_backoff_ms: 500, multiplier: 2.0, max_backoff_ms: 10_000 };
        let fail = || SharedEnd::Failed { error: "exit 1".into(), retryable: true, timed_out: false };
        let mut stages = chain(&[Running, Pending]);
        let t = attempt_ended(&stages, None, 0, fail(), &policy);
        assert_eq!(t.changes, vec![(0, StageChange::Retry { delay_ms: 500 })]);
        assert_eq!(t.failures, 1);
        stages[0].failures = 1;
        let t = attempt_ended(&stages, None, 0, fail(), &policy);
        assert_eq!(t.changes, vec![(0, StageChange::Failed), (1, StageChange::Cancelled)]);
        assert_eq!(t.ending.as_ref().map(|e| e.0), Some(JobState::Failed));
        assert!(t.ending.unwrap().1.contains("after 2 attempts"));
        assert_eq!(t.finished, Some(JobState::Failed));
    }

    #[test]
    fn a_failure_that_must_not_retry_fails_at_once() {
        let end = SharedEnd::Failed { error: "bad output".into(), retryable: false, timed_out: false };
        let t = attempt_ended(&chain(&[Running]), None, 0, end, &RetryPolicy::default());
        assert_eq!(t.changes, vec![(0, StageChange::Failed)]);
    }

    #[test]
    fn a_lost_lease_requeues_without_spending_the_retry_budget_until_the_cap() {
        let mut stages = chain(&[Running]);
        let t = attempt_ended(&stages, None, 0, SharedEnd::LeaseLost, &RetryPolicy::no_retry());
        assert_eq!(t.changes, vec![(0, StageChange::Retry { delay_ms: 0 })]);
        assert_eq!((t.failures, t.interruptions), (0, 1));
        assert_eq!(t.attempt.unwrap().0, AttemptResult::Interrupted);
        stages[0].interruptions = MAX_INTERRUPTIONS;
        let t = attempt_ended(&stages, None, 0, SharedEnd::LeaseLost, &RetryPolicy::no_retry());
        assert_eq!(t.changes, vec![(0, StageChange::Failed)]);
        assert_eq!(t.finished, Some(JobState::Failed));
    }

    #[test]
    fn a_job_that_is_ending_waits_for_its_running_stages() {
        let mut stages = chain(&[Running, Pending]);
        stages.push(SharedStage { name: "side".into(), state: Running, deps: vec![], failures: 0, interruptions: 0 });
        let t = cancel(&stages, None).unwrap();
        assert_eq!(t.changes, vec![(1, StageChange::Cancelled)]);
        assert_eq!(t.finished, None);
        stages[1].state = Cancelled;
        let end = SharedEnd::Cancelled { error: "cancelled".into() };
        let t = attempt_ended(&stages, Some(JobState::Cancelled), 0, end, &RetryPolicy::default());
        assert_eq!(t.finished, None, "the side stage still runs");
        stages[0].state = Cancelled;
        let t = attempt_ended(&stages, Some(JobState::Cancelled), 2, SharedEnd::Succeeded, &RetryPolicy::default());
        assert_eq!(t.changes, vec![(2, StageChange::Succeeded)], "a success while ending readies nothing");
        assert_eq!(t.finished, Some(JobState::Cancelled));
    }

    #[test]
    fn a_finished_job_cannot_be_cancelled() {
        assert_eq!(cancel(&chain(&[Succeeded, Succeeded]), None), None);
    }

    #[test]
    fn sinks_are_the_stages_nothing_depends_on() {
        let mut stages = chain(&[Pending, Pending, Pending]);
        stages[2].deps = vec![0];
        assert_eq!(sinks(&stages), vec![1, 2]);
    }
}
