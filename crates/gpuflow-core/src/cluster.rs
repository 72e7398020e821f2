//! Agent mode: several agents share one store. Each agent runs only the stages it has claimed,
//! so no agent holds a whole job in memory: the store holds the job's stages, and each change
//! (an attempt ends, a lease expires, a cancel) is decided from those rows, inside the
//! transaction that locks them. The decisions are `rules`, the very functions the single
//! engine's scheduler uses; this module only speaks the shared queue's words (rows, lost
//! leases) and chooses what an agent claims (`choose_claims`).

use std::cmp::Reverse;

use crate::pipeline::StageIndex;
use crate::resources::{Inventory, ResourceRequest};
use crate::retry::RetryPolicy;
use crate::rules::{self, Interruption, Stage};
use crate::scheduler::{AttemptResult, JobState};

/// What to write for one stage (`Stop` needs no write: the agent holding it sees the ending).
pub use crate::rules::Change as StageChange;
/// A stage as stored, in the rules' words (`Waiting`: queued or backing off, claimable now or
/// after its delay).
pub use crate::rules::Status as SharedStageState;
pub use crate::rules::Transition;

#[derive(Clone, Debug, PartialEq)]
pub struct SharedStage {
    pub name: String,
    pub state: SharedStageState,
    pub deps: Vec<usize>,
    pub failures: u32,
    pub interruptions: u32,
}

/// How a claimed attempt ended: the single engine's `End`, one type for both. A lost lease is
/// `End::Interrupted(Interruption::LeaseLost)`.
pub use crate::rules::End;

/// A lost lease, as an ending.
pub const LEASE_LOST: End = End::Interrupted(Interruption::LeaseLost);

/// How an agent reports a local attempt's end to the shared queue. A local interruption (its
/// worker crashed, the agent is stopping) is a lost lease there: another agent may run the
/// stage, and no retry is spent.
pub fn reported_end(result: AttemptResult, error: Option<&str>, retryable: bool) -> End {
    let error = error.unwrap_or_default().to_string();
    match result {
        AttemptResult::Succeeded => End::Succeeded,
        AttemptResult::Cancelled => End::Cancelled { error },
        AttemptResult::TimedOut => End::Failed { error, retryable, timed_out: true },
        AttemptResult::Failed => End::Failed { error, retryable, timed_out: false },
        AttemptResult::Interrupted => LEASE_LOST,
    }
}

fn view(stages: &[SharedStage]) -> Vec<Stage<'_>> {
    stages
        .iter()
        .map(|s| Stage {
            name: &s.name,
            after: &s.deps,
            status: s.state,
            failures: s.failures,
            interruptions: s.interruptions,
        })
        .collect()
}

/// An attempt of `stage` ended. `ending` is the job's pending end, if another stage already
/// failed or the job was cancelled. `retry` is the stage's policy.
pub fn attempt_ended(
    stages: &[SharedStage],
    ending: Option<JobState>,
    stage: usize,
    end: End,
    retry: &RetryPolicy,
) -> Transition {
    rules::attempt_ended(&view(stages), ending, stage, end, retry)
}

/// The lease of `stage`'s attempt expired (its agent died, froze or lost the database): an
/// interruption, which spends no retry.
pub fn lease_lost(stages: &[SharedStage], ending: Option<JobState>, stage: usize) -> Transition {
    attempt_ended(stages, ending, stage, LEASE_LOST, &RetryPolicy::no_retry())
}

/// The job was asked to stop. `None` when it has already finished.
pub fn cancel(stages: &[SharedStage], ending: Option<JobState>) -> Option<Transition> {
    rules::cancel(&view(stages), ending)
}

/// `stage` has waited, claimable, past the bound and no live agent can run it (no agent can
/// parse its pipeline, or none has what it needs): the stage fails, and with it the job, with
/// `reason` (what each agent said) as the error. `None` when the stage is no longer waiting.
pub fn unrunnable(stages: &[SharedStage], ending: Option<JobState>, stage: usize, reason: &str) -> Option<Transition> {
    if ending.is_some() || stages.get(stage)?.state != SharedStageState::Waiting {
        return None;
    }
    let text = format!("no live agent can run it: {reason}");
    let error = rules::interrupted_text(&stages[stage].name, &text);
    let mut t = rules::end_job(&view(stages), None, JobState::Failed, error);
    for (idx, change) in &mut t.changes {
        if *idx == stage {
            *change = StageChange::Failed;
        }
    }
    Some(t)
}

/// The stages no other stage depends on: their outputs make the job's output.
pub fn sinks(stages: &[SharedStage]) -> Vec<usize> {
    rules::sinks(stages.iter().map(|s| s.deps.as_slice()))
}

/// A claimable stage, as an agent weighs it.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimCandidate<K> {
    /// What the caller knows it by.
    pub key: K,
    /// Higher first.
    pub priority: i32,
    /// The job's arrival number: older first.
    pub arrival: u64,
    pub stage: StageIndex,
    pub request: ResourceRequest,
    /// How long it has been claimable.
    pub waited_ms: u64,
}

/// What an agent may claim from: the candidates (any order) and its free local resources.
#[derive(Clone, Debug)]
pub struct ClaimProblem<K> {
    pub candidates: Vec<ClaimCandidate<K>>,
    /// The agent's inventory as it stands (capacity and what is in use).
    pub inventory: Inventory,
    /// `SchedulerConfig::reserve_after_ms`: a candidate that has waited this long and does not
    /// fit reserves what it needs, so smaller ones behind it cannot take it.
    pub reserve_after_ms: u64,
}

/// The candidates to claim, in claim order: walked by priority (high first), then those that
/// waited past `reserve_after_ms` before the rest, then arrival, then stage, each taken when it
/// fits what is left. A smaller one may be taken when a larger one
/// before it does not fit (backfill), except out of capacity reserved by a candidate before it
/// that has waited past `reserve_after_ms` (the same starvation rule as the single engine's
/// scheduling pass). A candidate that could never fit this agent's capacity is left for other
/// agents and reserves nothing here.
pub fn choose_claims<K: Clone>(problem: &ClaimProblem<K>) -> Vec<K> {
    let mut order: Vec<&ClaimCandidate<K>> = problem.candidates.iter().collect();
    // A starving candidate goes first in its priority, as the single engine re-keys a stage
    // that waited past the bound to the front of its priority.
    let starving = |c: &ClaimCandidate<K>| c.waited_ms >= problem.reserve_after_ms;
    order.sort_by_key(|c| (Reverse(c.priority), !starving(c), c.arrival, c.stage));
    let mut inventory = problem.inventory.clone();
    let mut reserved = inventory.new_reservation();
    let mut chosen = Vec::new();
    for c in order {
        if c.request.check_fits(inventory.capacity()).is_err() {
            continue;
        }
        match inventory.try_grant(&c.request, &reserved) {
            Some(_) => chosen.push(c.key.clone()),
            None if c.waited_ms >= problem.reserve_after_ms => {
                inventory.reserve(&c.request, &mut reserved);
            }
            None => {}
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{Capacity, GpuDevice};
    use crate::rules::MAX_INTERRUPTIONS;
    use crate::scheduler::AttemptResult;
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
        let t = attempt_ended(&chain(&[Running, Pending]), None, 0, End::Succeeded, &RetryPolicy::default());
        assert_eq!(t.changes, vec![(0, StageChange::Succeeded), (1, StageChange::Ready)]);
        assert_eq!(t.finished, None);
        let t = attempt_ended(&chain(&[Succeeded, Running]), None, 1, End::Succeeded, &RetryPolicy::default());
        assert_eq!(t.finished, Some(JobState::Succeeded));
    }

    #[test]
    fn a_join_waits_for_every_predecessor() {
        let mut stages = chain(&[Running, Running, Pending]);
        stages[1].deps = vec![];
        stages[2].deps = vec![0, 1];
        let t = attempt_ended(&stages, None, 0, End::Succeeded, &RetryPolicy::default());
        assert_eq!(t.changes, vec![(0, StageChange::Succeeded)]);
        stages[0].state = Succeeded;
        let t = attempt_ended(&stages, None, 1, End::Succeeded, &RetryPolicy::default());
        assert_eq!(t.changes, vec![(1, StageChange::Succeeded), (2, StageChange::Ready)]);
    }

    #[test]
    fn failures_back_off_then_fail_the_job_and_cancel_the_rest() {
        let policy = RetryPolicy { max_attempts: 2, initial_backoff_ms: 500, multiplier: 2.0, max_backoff_ms: 10_000 };
        let fail = || End::Failed { error: "exit 1".into(), retryable: true, timed_out: false };
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
        let end = End::Failed { error: "bad output".into(), retryable: false, timed_out: false };
        let t = attempt_ended(&chain(&[Running]), None, 0, end, &RetryPolicy::default());
        assert_eq!(t.changes, vec![(0, StageChange::Failed)]);
    }

    #[test]
    fn a_lost_lease_requeues_without_spending_the_retry_budget_until_the_cap() {
        let mut stages = chain(&[Running]);
        let t = attempt_ended(&stages, None, 0, LEASE_LOST, &RetryPolicy::no_retry());
        assert_eq!(t.changes, vec![(0, StageChange::Retry { delay_ms: 0 })]);
        assert_eq!((t.failures, t.interruptions), (0, 1));
        assert_eq!(t.attempt.unwrap().0, AttemptResult::Interrupted);
        stages[0].interruptions = MAX_INTERRUPTIONS;
        let t = attempt_ended(&stages, None, 0, LEASE_LOST, &RetryPolicy::no_retry());
        assert_eq!(t.changes, vec![(0, StageChange::Failed)]);
        assert_eq!(t.finished, Some(JobState::Failed));
    }

    #[test]
    fn a_job_that_is_ending_waits_for_its_running_stages() {
        let mut stages = chain(&[Running, Pending]);
        stages.push(SharedStage { name: "side".into(), state: Running, deps: vec![], failures: 0, interruptions: 0 });
        let t = cancel(&stages, None).unwrap();
        assert_eq!(t.changes, vec![(0, StageChange::Stop), (1, StageChange::Cancelled), (2, StageChange::Stop)]);
        assert_eq!(t.finished, None);
        stages[1].state = Cancelled;
        let end = End::Cancelled { error: "cancelled".into() };
        let t = attempt_ended(&stages, Some(JobState::Cancelled), 0, end, &RetryPolicy::default());
        assert_eq!(t.finished, None, "the side stage still runs");
        stages[0].state = Cancelled;
        let t = attempt_ended(&stages, Some(JobState::Cancelled), 2, End::Succeeded, &RetryPolicy::default());
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

    fn candidate(
        key: u32,
        priority: i32,
        arrival: u64,
        request: ResourceRequest,
        waited_ms: u64,
    ) -> ClaimCandidate<u32> {
        ClaimCandidate { key, priority, arrival, stage: 0, request, waited_ms }
    }

    fn cpu(n: u32) -> ResourceRequest {
        ResourceRequest { cpu: n, ..Default::default() }
    }

    fn problem(cpu_slots: u32, candidates: Vec<ClaimCandidate<u32>>) -> ClaimProblem<u32> {
        let capacity = Capacity { cpu: cpu_slots, ..Default::default() };
        ClaimProblem { candidates, inventory: Inventory::new(capacity), reserve_after_ms: 1_000 }
    }

    #[test]
    fn claims_follow_priority_then_arrival_then_stage() {
        let mut p = problem(2, vec![candidate(1, 0, 1, cpu(1), 0), candidate(2, 5, 9, cpu(1), 0)]);
        p.candidates.push(ClaimCandidate { stage: 1, ..candidate(3, 0, 1, cpu(1), 0) });
        p.candidates.push(candidate(4, 0, 0, cpu(1), 0));
        assert_eq!(choose_claims(&p), vec![2, 4], "the high priority first, then the oldest");
        p.inventory = Inventory::new(Capacity { cpu: 4, ..Default::default() });
        assert_eq!(choose_claims(&p), vec![2, 4, 1, 3], "then by stage within a job");
    }

    #[test]
    fn a_smaller_candidate_backfills_past_one_that_does_not_fit() {
        let mut p = problem(3, vec![candidate(1, 0, 1, cpu(2), 0), candidate(2, 0, 2, cpu(2), 0)]);
        p.candidates.push(candidate(3, 0, 3, cpu(1), 0));
        assert_eq!(choose_claims(&p), vec![1, 3]);
    }

    #[test]
    fn free_capacity_is_what_the_inventory_has_left() {
        let mut p = problem(3, vec![candidate(1, 0, 1, cpu(2), 0), candidate(2, 0, 2, cpu(1), 0)]);
        let none = p.inventory.new_reservation();
        p.inventory.try_grant(&cpu(2), &none).unwrap();
        assert_eq!(choose_claims(&p), vec![2]);
    }

    #[test]
    fn a_starving_candidate_that_does_not_fit_reserves_so_smaller_ones_cannot_take_it() {
        // One GPU, busy. A GPU stage has waited past the bound; CPU stages behind it would
        // take the CPU slot it needs.
        let capacity = Capacity { gpus: vec![GpuDevice { index: 0, memory: 1 << 30 }], cpu: 2, ..Default::default() };
        let mut inventory = Inventory::new(capacity);
        let none = inventory.new_reservation();
        inventory.try_grant(&ResourceRequest { gpus: 1, ..Default::default() }, &none).unwrap();
        let gpu = ResourceRequest { gpus: 1, cpu: 2, ..Default::default() };
        let candidates =
            vec![candidate(1, 0, 1, gpu, 5_000), candidate(2, 0, 2, cpu(1), 0), candidate(3, 0, 3, cpu(1), 0)];
        let mut p = ClaimProblem { candidates, inventory, reserve_after_ms: 1_000 };
        assert_eq!(choose_claims(&p), Vec::<u32>::new(), "the starving stage holds both CPU slots");
        // Not starving yet (or reservation off): the small ones backfill.
        p.reserve_after_ms = 10_000;
        assert_eq!(choose_claims(&p), vec![2, 3]);
        p.reserve_after_ms = u64::MAX;
        assert_eq!(choose_claims(&p), vec![2, 3]);
    }

    #[test]
    fn a_starving_candidate_goes_before_older_ones_of_its_priority_but_not_before_higher_priority() {
        let mut p = problem(1, vec![candidate(1, 0, 1, cpu(1), 0), candidate(2, 0, 9, cpu(1), 5_000)]);
        assert_eq!(choose_claims(&p), vec![2], "waited past reserve_after: first in its priority");
        p.candidates.push(candidate(3, 1, 20, cpu(1), 0));
        assert_eq!(choose_claims(&p), vec![3], "a higher priority still goes first");
        p.reserve_after_ms = u64::MAX;
        p.candidates.pop();
        assert_eq!(choose_claims(&p), vec![1], "reservation off: arrival order");
    }

    #[test]
    fn an_unrunnable_stage_fails_its_job_with_the_reason() {
        let stages = chain(&[Succeeded, Waiting, Pending]);
        let t = unrunnable(&stages, None, 1, "agent a: no pool `ocr`").unwrap();
        assert_eq!(t.changes, vec![(1, StageChange::Failed), (2, StageChange::Cancelled)]);
        assert_eq!(t.finished, Some(JobState::Failed));
        assert_eq!(t.ending.unwrap().1, "stage `s1` failed: no live agent can run it: agent a: no pool `ocr`");
        assert_eq!(unrunnable(&chain(&[Running]), None, 0, "x"), None, "a claimed stage is not judged");
        assert_eq!(unrunnable(&stages, Some(JobState::Cancelled), 1, "x"), None);
    }

    #[test]
    fn a_candidate_that_can_never_fit_here_reserves_nothing() {
        // Two whole GPUs on a one-GPU agent: other agents' work, not a reason to idle here.
        let capacity = Capacity { gpus: vec![GpuDevice { index: 0, memory: 1 << 30 }], cpu: 1, ..Default::default() };
        let big = ResourceRequest { gpus: 2, cpu: 1, ..Default::default() };
        let candidates = vec![candidate(1, 0, 1, big, 60_000), candidate(2, 0, 2, cpu(1), 0)];
        let p = ClaimProblem { candidates, inventory: Inventory::new(capacity), reserve_after_ms: 0 };
        assert_eq!(choose_claims(&p), vec![2]);
    }
}
