//! Differential test of the job transition rules: the single engine (`State`) and agent mode
//! (`cluster::attempt_ended` / `cluster::cancel` over the shared queue's stage rows, applied the
//! way `PgQueue::sync`, `cancel_shared` and the lease sweep apply them) must give every stage
//! the same state and counters, and the job the same ending, final state and error text, after
//! any sequence of attempt outcomes.

use std::sync::Arc;

use gpuflow_core::cluster::{self, SharedStage, SharedStageState, StageChange, Transition};
use gpuflow_core::rules::{Interruption, MAX_INTERRUPTIONS};
use gpuflow_core::*;
use proptest::prelude::*;

const JOB: JobId = JobId(1);
/// Long enough that only a `Timeout` step reaches a deadline; retry delays are far shorter.
const TIMEOUT_MS: u64 = 1_000_000;

fn pipeline_strategy() -> impl Strategy<Value = Pipeline> {
    prop::collection::vec((prop::collection::vec(0usize..8, 0..=2), 1u32..=4), 1..=5).prop_map(|stages| {
        let specs = stages
            .into_iter()
            .enumerate()
            .map(|(i, (after, max_attempts))| {
                let mut after: Vec<usize> = if i == 0 { vec![] } else { after.iter().map(|ix| ix % i).collect() };
                after.sort();
                after.dedup();
                StageSpec {
                    name: format!("s{i}"),
                    needs: ResourceRequest::default(),
                    after,
                    timeout_ms: Some(TIMEOUT_MS),
                    retry: RetryPolicy { max_attempts, initial_backoff_ms: 100, multiplier: 2.0, max_backoff_ms: 300 },
                    expected_ms: None,
                }
            })
            .collect();
        Pipeline::new("p", specs).expect("edges only point backwards")
    })
}

/// One attempt outcome (on the `n`-th running stage) or another step of the job's life.
#[derive(Clone, Debug)]
enum Op {
    Succeed(usize),
    Fail(usize, bool),
    /// Its deadline passes: it is killed and exits (so does any other stage due by then).
    Timeout(usize),
    /// A policy stops it (fails without retry).
    Stop(usize),
    /// The engine restarts / every running stage's lease is lost.
    Interrupt,
    Cancel,
    /// Time passes: retry delays run out.
    Wait(u64),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..8).prop_map(Op::Succeed),
        3 => (0usize..8, any::<bool>()).prop_map(|(i, r)| Op::Fail(i, r)),
        1 => (0usize..8).prop_map(Op::Timeout),
        1 => (0usize..8).prop_map(Op::Stop),
        3 => Just(Op::Interrupt),
        1 => Just(Op::Cancel),
        2 => (0u64..400).prop_map(Op::Wait),
    ]
}

/// The job as the shared queue holds it.
struct Agent {
    stages: Vec<SharedStage>,
    attempts: Vec<u32>,
    /// When a waiting stage becomes claimable.
    not_before: Vec<u64>,
    ending: Option<(JobState, String)>,
    finished: Option<JobState>,
}

impl Agent {
    fn new(p: &Pipeline) -> Agent {
        Agent {
            stages: p
                .stages
                .iter()
                .map(|s| SharedStage {
                    name: s.name.clone(),
                    // As `PgQueue::insert_shared_job`: a stage with no predecessors is claimable.
                    state: if s.after.is_empty() { SharedStageState::Waiting } else { SharedStageState::Pending },
                    deps: s.after.clone(),
                    failures: 0,
                    interruptions: 0,
                })
                .collect(),
            attempts: vec![0; p.stages.len()],
            not_before: vec![0; p.stages.len()],
            ending: None,
            finished: None,
        }
    }

    /// As `PgQueue::claim` (everything fits, so an agent claims a stage as soon as it is
    /// claimable): the single engine started `stage`, an agent claims it.
    fn claim(&mut self, stage: usize, now: u64) -> Result<(), TestCaseError> {
        prop_assert!(self.ending.is_none() && self.finished.is_none(), "a stage of an ending job started");
        prop_assert_eq!(self.stages[stage].state, SharedStageState::Waiting, "stage {} started unclaimable", stage);
        prop_assert!(self.not_before[stage] <= now, "stage {} started before its retry delay ran out", stage);
        self.stages[stage].state = SharedStageState::Running;
        self.attempts[stage] += 1;
        Ok(())
    }

    /// As the store's `apply`.
    fn apply(&mut self, stage: Option<usize>, t: &Transition, now: u64) {
        assert_eq!(self.finished, None, "a finished job changed");
        for (i, change) in &t.changes {
            let s = &mut self.stages[*i];
            s.state = match change {
                StageChange::Succeeded => SharedStageState::Succeeded,
                StageChange::Failed => SharedStageState::Failed,
                StageChange::Cancelled => SharedStageState::Cancelled,
                StageChange::Retry { delay_ms } => {
                    self.not_before[*i] = now + delay_ms;
                    SharedStageState::Waiting
                }
                StageChange::Ready => {
                    self.not_before[*i] = now;
                    SharedStageState::Waiting
                }
                StageChange::Stop => continue,
            };
        }
        if let Some(stage) = stage {
            self.stages[stage].failures = t.failures;
            self.stages[stage].interruptions = t.interruptions;
        }
        if let Some(ending) = &t.ending {
            assert_eq!(self.ending, None, "a job ends once");
            self.ending = Some(ending.clone());
        }
        self.finished = t.finished;
    }

    /// An attempt's end reported by the local engine, as `runtime::cluster::cluster_writes`
    /// turns it into an `End` and `PgQueue::sync` (or the lease sweep) decides it.
    fn attempt_ended(&mut self, action: &Action, p: &Pipeline, now: u64) {
        let Action::AttemptEnded { stage, result, error, retryable, .. } = action else { return };
        let end = cluster::reported_end(*result, error.as_deref(), *retryable);
        assert_eq!(self.stages[*stage].state, SharedStageState::Running, "stage {stage} ended but was not claimed");
        let ending = self.ending.as_ref().map(|(s, _)| *s);
        let t = cluster::attempt_ended(&self.stages, ending, *stage, end, &p.stages[*stage].retry);
        let (shared_result, _) = t.attempt.clone().expect("an attempt ended");
        assert_eq!(shared_result, *result, "stage {stage} recorded differently");
        self.apply(Some(*stage), &t, now);
    }
}

/// The single engine's wording of an interruption, in agent mode's.
fn as_agent_text(text: &str) -> String {
    let mut text = text.to_string();
    for n in 1..=MAX_INTERRUPTIONS + 1 {
        for failed in [true, false] {
            text =
                text.replace(&Interruption::EngineRestart.error(n, failed), &Interruption::LeaseLost.error(n, failed));
        }
    }
    text
}

fn expected(status: &StageStatus) -> SharedStageState {
    match status {
        StageStatus::Pending => SharedStageState::Pending,
        StageStatus::Queued { .. } | StageStatus::Backoff { .. } => SharedStageState::Waiting,
        StageStatus::Running(_) => SharedStageState::Running,
        StageStatus::Succeeded => SharedStageState::Succeeded,
        StageStatus::Failed => SharedStageState::Failed,
        StageStatus::Cancelled => SharedStageState::Cancelled,
    }
}

/// Both sides after a step: same stages, counters, ending and (once there) final state.
fn check_agree(state: &State, agent: &Agent, actions: &[Action], now: u64) -> Result<(), TestCaseError> {
    let finished = actions.iter().find_map(|a| match a {
        Action::JobFinished { state, error, .. } => Some((*state, error.clone())),
        _ => None,
    });
    match (state.job(JOB), finished) {
        (Some(job), None) => {
            prop_assert_eq!(agent.finished, None, "agent mode finished the job, the single engine did not");
            for (i, run) in job.stages.iter().enumerate() {
                let shared = &agent.stages[i];
                prop_assert_eq!(expected(&run.status), shared.state, "stage {} ({:?})", i, run.status);
                prop_assert_eq!(
                    (run.attempts, run.failures, run.interruptions),
                    (agent.attempts[i], shared.failures, shared.interruptions),
                    "stage {} counters (attempts, failures, interruptions)",
                    i
                );
                match run.status {
                    StageStatus::Backoff { until } => prop_assert_eq!(until, agent.not_before[i]),
                    // Everything fits: nothing stays queued, and nothing claimable unclaimed.
                    StageStatus::Queued { .. } => prop_assert!(false, "stage {} queued", i),
                    _ if shared.state == SharedStageState::Waiting => prop_assert!(agent.not_before[i] > now),
                    _ => {}
                }
            }
            let ending = job.ending().map(|(s, e)| (s, as_agent_text(e)));
            prop_assert_eq!(ending, agent.ending.clone(), "the job's ending");
        }
        (None, Some((final_state, error))) => {
            prop_assert_eq!(agent.finished, Some(final_state), "the job's final state");
            let agent_error = agent.ending.as_ref().map(|(_, e)| e.clone());
            prop_assert_eq!(error.map(|e| as_agent_text(&e)), agent_error, "the job's error");
        }
        (job, finished) => prop_assert!(false, "job active: {}, finished now: {:?}", job.is_some(), finished),
    }
    Ok(())
}

/// The stage of the `n`-th running attempt, if any runs.
fn running(state: &State, n: usize) -> Option<(usize, u32, Option<u64>)> {
    let job = state.job(JOB)?;
    let running: Vec<_> = job
        .stages
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match &s.status {
            StageStatus::Running(r) => Some((i, r.attempt, r.deadline)),
            _ => None,
        })
        .collect();
    (!running.is_empty()).then(|| running[n % running.len()])
}

fn exited(stage: usize, attempt: u32, outcome: Outcome) -> Event {
    Event::AttemptExited { job: JOB, stage, attempt, outcome }
}

fn failed(retryable: bool) -> Outcome {
    Outcome::Failed { error: "exit status 1".into(), retryable }
}

fn run_scenario(p: Pipeline, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let p = Arc::new(p);
    let capacity = Capacity { cpu: 1, ..Default::default() };
    let mut state = State::new(capacity.clone(), SchedulerConfig::default());
    let mut agent = Agent::new(&p);
    let mut now = 0u64;
    let actions = state.apply(Event::Submitted { job: JOB, seq: 1, priority: 0, pipeline: p.clone() }, now).unwrap();
    for action in &actions {
        if let Action::Start { stage, .. } = action {
            agent.claim(*stage, now)?;
        }
    }
    check_agree(&state, &agent, &actions, now)?;

    for op in ops {
        if state.job(JOB).is_none() {
            break;
        }
        let mut actions = Vec::new();
        match op {
            Op::Succeed(n) | Op::Fail(n, _) => {
                let Some((stage, attempt, _)) = running(&state, n) else { continue };
                let outcome = if let Op::Fail(_, retryable) = op { failed(retryable) } else { Outcome::Succeeded };
                actions.extend(state.apply(exited(stage, attempt, outcome), now).unwrap());
            }
            Op::Timeout(n) => {
                let Some((_, _, Some(deadline))) = running(&state, n) else { continue };
                now = now.max(deadline);
                let kills = state.apply(Event::Tick, now).unwrap();
                actions.extend(kills.iter().cloned());
                for kill in kills {
                    if let Action::Kill { stage, attempt, .. } = kill {
                        actions.extend(state.apply(exited(stage, attempt, failed(true)), now).unwrap());
                    }
                }
            }
            Op::Stop(n) => {
                let Some((stage, attempt, _)) = running(&state, n) else { continue };
                let stop = Event::StopAttempt { job: JOB, stage, attempt, error: "gpu_check: no GPU in use".into() };
                actions.extend(state.apply(stop, now).unwrap());
                actions.extend(state.apply(exited(stage, attempt, failed(true)), now).unwrap());
            }
            Op::Interrupt => {
                // A restart does not bring back a job's ending (a single-engine limit, see the
                // report), so only a job that is not ending is interrupted here.
                let job = state.job(JOB).unwrap();
                if job.ending().is_some() {
                    continue;
                }
                let stages = job
                    .stages
                    .iter()
                    .map(|s| RestoredStage {
                        status: match &s.status {
                            StageStatus::Running(r) => RestoredStatus::WasRunning { attempt: r.attempt },
                            StageStatus::Backoff { until } => RestoredStatus::Backoff { until: *until },
                            StageStatus::Succeeded => RestoredStatus::Succeeded,
                            StageStatus::Failed => RestoredStatus::Failed,
                            StageStatus::Cancelled => RestoredStatus::Cancelled,
                            StageStatus::Pending | StageStatus::Queued { .. } => RestoredStatus::NotStarted,
                        },
                        attempts: s.attempts,
                        failures: s.failures,
                        interruptions: s.interruptions,
                    })
                    .collect();
                state = State::new(capacity.clone(), SchedulerConfig::default());
                let restored = Event::Restored { job: JOB, seq: 1, priority: 0, pipeline: p.clone(), stages };
                actions.extend(state.apply(restored, now).unwrap());
            }
            Op::Cancel => {
                actions.extend(state.apply(Event::CancelRequested { job: JOB }, now).unwrap());
                let ending = agent.ending.as_ref().map(|(s, _)| *s);
                let t = cluster::cancel(&agent.stages, ending);
                prop_assert!(t.is_some(), "agent mode refused to cancel an active job");
                agent.apply(None, &t.unwrap(), now);
            }
            Op::Wait(ms) => {
                now += ms;
                actions.extend(state.apply(Event::Tick, now).unwrap());
            }
        }
        // Agent mode learns of each ended attempt from its agent, in the order they ended, and
        // claims what became claimable when the single engine starts it.
        for action in &actions {
            match action {
                Action::Start { stage, .. } => agent.claim(*stage, now)?,
                Action::AttemptEnded { .. } => agent.attempt_ended(action, &p, now),
                _ => {}
            }
        }
        check_agree(&state, &agent, &actions, now)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn single_engine_and_agent_rules_agree(
        p in pipeline_strategy(),
        ops in prop::collection::vec(op_strategy(), 0..60),
    ) {
        run_scenario(p, ops)?;
    }
}

/// A fixed case: retries, a restart between them, a success that readies two stages, a policy stop.
#[test]
fn a_chain_that_fails_twice_then_succeeds_agrees() {
    let stage = |name: &str, after: Vec<usize>| StageSpec {
        name: name.into(),
        needs: ResourceRequest::default(),
        after,
        timeout_ms: Some(TIMEOUT_MS),
        retry: RetryPolicy { max_attempts: 3, initial_backoff_ms: 100, multiplier: 2.0, max_backoff_ms: 300 },
        expected_ms: None,
    };
    let p = Pipeline::new("p", vec![stage("a", vec![]), stage("b", vec![0]), stage("c", vec![0])]).unwrap();
    let first = 0;
    let ops = vec![
        Op::Fail(first, true),
        Op::Wait(100),
        Op::Interrupt,
        Op::Fail(first, true),
        Op::Wait(200),
        Op::Succeed(first),
        Op::Stop(first),
    ];
    run_scenario(p, ops).unwrap();
}

/// A fixed case: a stage that already spent tries is interrupted past the cap. The job's error
/// names the interruptions, not the spent tries (the single engine's wording; agent mode said
/// "failed after 2 attempts" here before the rules were shared).
#[test]
fn the_interruption_cap_after_spent_tries_agrees() {
    let spec = StageSpec {
        name: "a".into(),
        needs: ResourceRequest::default(),
        after: vec![],
        timeout_ms: Some(TIMEOUT_MS),
        retry: RetryPolicy { max_attempts: 4, initial_backoff_ms: 100, multiplier: 2.0, max_backoff_ms: 300 },
        expected_ms: None,
    };
    let p = Pipeline::new("p", vec![spec]).unwrap();
    let mut ops = vec![Op::Fail(0, true), Op::Wait(100), Op::Fail(0, true), Op::Wait(200)];
    ops.extend(std::iter::repeat_n(Op::Interrupt, MAX_INTERRUPTIONS as usize + 1));
    run_scenario(p, ops).unwrap();
}
