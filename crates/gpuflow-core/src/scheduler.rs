//! The scheduling state machine: `apply(event, now) -> actions`.
//!
//! It owns the inventory and every job that is not yet final. It never performs IO: the
//! runtime persists the actions it returns (in one transaction) and only then acts on them.
//! Time and ids come in from the caller, so a test can step it deterministically.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::ops::Bound;
use std::sync::Arc;

use crate::order::{self, Durations};
use crate::pipeline::{Pipeline, StageIndex};
use crate::resources::{Capacity, Grant, Inventory, Reservation, ResourceRequest};
use crate::retry::RetryPolicy;
use crate::rules::{self, Change, End, Interruption};

/// A job's id. The runtime makes them (UUIDv7); the core only compares them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(pub u128);

pub use crate::rules::MAX_INTERRUPTIONS;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        Some(match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => return None,
        })
    }
}

/// A stage's state as recorded and shown: `StageStatus` without its data. `Pending` waits for
/// predecessors; `Queued` is ready and waits for resources (or an agent's claim); `Backoff`
/// waits out a retry delay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageState {
    Pending,
    Queued,
    Backoff,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl StageState {
    pub fn is_final(self) -> bool {
        matches!(self, StageState::Succeeded | StageState::Failed | StageState::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StageState::Pending => "pending",
            StageState::Queued => "queued",
            StageState::Backoff => "backoff",
            StageState::Running => "running",
            StageState::Succeeded => "succeeded",
            StageState::Failed => "failed",
            StageState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<StageState> {
        Some(match s {
            "pending" => StageState::Pending,
            "queued" => StageState::Queued,
            "backoff" => StageState::Backoff,
            "running" => StageState::Running,
            "succeeded" => StageState::Succeeded,
            "failed" => StageState::Failed,
            "cancelled" => StageState::Cancelled,
            _ => return None,
        })
    }
}

/// Why the engine is stopping an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillReason {
    Timeout,
    Cancel,
    /// Another stage of the job failed for good; this one's work is no longer wanted.
    JobFailed,
    /// A policy of the engine (e.g. `gpu_check: fail`): the attempt fails without retry.
    Policy,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RunningAttempt {
    pub attempt: u32,
    pub grant: Grant,
    pub started_at: u64,
    pub deadline: Option<u64>,
    pub kill: Option<KillReason>,
    /// Why a `Policy` stop happened.
    pub kill_detail: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum StageStatus {
    /// Waiting for predecessors.
    Pending,
    /// Ready, waiting for resources. Holds nothing.
    Queued {
        since: u64,
    },
    /// Waiting out a retry delay. Holds nothing.
    Backoff {
        until: u64,
    },
    /// Boxed: most stages of a long queue are not running, and a queued stage should not
    /// carry the size of a running attempt.
    Running(Box<RunningAttempt>),
    Succeeded,
    Failed,
    Cancelled,
}

impl StageStatus {
    pub fn is_final(&self) -> bool {
        matches!(self, StageStatus::Succeeded | StageStatus::Failed | StageStatus::Cancelled)
    }

    /// The status in the words of the transition rules.
    pub fn rule_status(&self) -> rules::Status {
        match self {
            StageStatus::Pending => rules::Status::Pending,
            StageStatus::Queued { .. } | StageStatus::Backoff { .. } => rules::Status::Waiting,
            StageStatus::Running(_) => rules::Status::Running,
            StageStatus::Succeeded => rules::Status::Succeeded,
            StageStatus::Failed => rules::Status::Failed,
            StageStatus::Cancelled => rules::Status::Cancelled,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct StageRun {
    pub status: StageStatus,
    /// Attempts started so far; the next one gets `attempts + 1`.
    pub attempts: u32,
    /// Failed attempts that count against the retry budget.
    pub failures: u32,
    pub interruptions: u32,
    /// Its place among waiting stages of its priority (`order::rank` of the job's remaining
    /// work), fixed when it was last queued, so the queue's order never changes under it.
    rank: u32,
}

#[derive(Clone, Debug)]
pub struct JobRun {
    pub id: JobId,
    pub seq: u64,
    pub priority: i32,
    pub pipeline: Arc<Pipeline>,
    pub stages: Vec<StageRun>,
    pub state: JobState,
    /// Set once the job is bound to fail or be cancelled; it ends when nothing runs any more.
    /// Boxed: rare, and every queued job would otherwise carry its size.
    ending: Option<Box<(JobState, String)>>,
    /// The shape of each stage's request (interned at admission, released when the job ends).
    shapes: Vec<ShapeId>,
}

impl JobRun {
    /// How the job is bound to end, with its error, once it is failing or cancelled.
    pub fn ending(&self) -> Option<(JobState, &str)> {
        self.ending.as_deref().map(|(state, error)| (*state, error.as_str()))
    }

    /// The job's stages as the transition rules see them.
    pub fn rules_view(&self) -> Vec<rules::Stage<'_>> {
        self.stages
            .iter()
            .zip(&self.pipeline.stages)
            .map(|(run, spec)| rules::Stage {
                name: &spec.name,
                after: &spec.after,
                status: run.status.rule_status(),
                failures: run.failures,
                interruptions: run.interruptions,
            })
            .collect()
    }

    fn ending_state(&self) -> Option<JobState> {
        self.ending.as_deref().map(|(state, _)| *state)
    }
}

/// What a finished attempt reports, as seen by the supervisor.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Succeeded,
    Failed {
        error: String,
        retryable: bool,
    },
    /// It stopped through no fault of its own (the worker instance running it, or holding it
    /// queued, crashed or was replaced). Like an attempt found running after an engine restart,
    /// it is re-queued at once without spending the retry budget. If it `ran`, it counts an
    /// interruption (the stage fails past `MAX_INTERRUPTIONS`, which bounds a task that takes
    /// its worker down every time); a task that never started cannot have caused it, so it
    /// counts nothing. If the attempt was being stopped (cancel, job failed, policy, or a
    /// timeout of one that ran), it ends as that stop says, as `Failed` would; a timeout of
    /// one that never ran is no verdict on it, so it is re-queued.
    Interrupted {
        error: String,
        ran: bool,
    },
}

/// Where a stage stood when the engine last stopped, as recorded in the store.
#[derive(Clone, Debug, PartialEq)]
pub enum RestoredStatus {
    NotStarted,
    Backoff {
        until: u64,
    },
    /// It was running when the engine died: that attempt is interrupted.
    WasRunning {
        attempt: u32,
    },
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RestoredStage {
    pub status: RestoredStatus,
    pub attempts: u32,
    pub failures: u32,
    pub interruptions: u32,
}

#[derive(Clone, Debug)]
pub enum Event {
    Submitted {
        job: JobId,
        seq: u64,
        priority: i32,
        pipeline: Arc<Pipeline>,
    },
    Restored {
        job: JobId,
        seq: u64,
        priority: i32,
        pipeline: Arc<Pipeline>,
        stages: Vec<RestoredStage>,
    },
    AttemptExited {
        job: JobId,
        stage: StageIndex,
        attempt: u32,
        outcome: Outcome,
    },
    CancelRequested {
        job: JobId,
    },
    /// Time passed: fire due timeouts and retry delays.
    Tick,
    /// How many units of a counter may be granted now (e.g. the ready instances of a pool).
    CounterAvailable {
        name: String,
        available: u64,
    },
    /// GPU memory on a device held by processes that hold no lease (from its latest reading).
    GpuForeign {
        device: u32,
        bytes: u64,
    },
    /// Stop an attempt for a policy reason; it fails with `error` and is not retried.
    StopAttempt {
        job: JobId,
        stage: StageIndex,
        attempt: u32,
        error: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptResult {
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    Interrupted,
}

impl AttemptResult {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptResult::Succeeded => "succeeded",
            AttemptResult::Failed => "failed",
            AttemptResult::TimedOut => "timed_out",
            AttemptResult::Cancelled => "cancelled",
            AttemptResult::Interrupted => "interrupted",
        }
    }
}

/// What happens to a stage after an attempt ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageNext {
    Succeeded,
    /// Queued again, not before `at`.
    Retry {
        at: u64,
    },
    Failed,
    Cancelled,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Record the attempt and its lease, then spawn it.
    Start {
        job: JobId,
        stage: StageIndex,
        attempt: u32,
        grant: Grant,
        deadline: Option<u64>,
        /// How long it waited in the queue.
        queued_ms: u64,
    },
    /// Stop the attempt's process group. Its lease returns when it has exited.
    Kill {
        job: JobId,
        stage: StageIndex,
        attempt: u32,
        reason: KillReason,
    },
    /// Record how an attempt ended and what comes next for its stage. Its lease is released.
    AttemptEnded {
        job: JobId,
        stage: StageIndex,
        attempt: u32,
        result: AttemptResult,
        next: StageNext,
        error: Option<String>,
        /// Whether a failure may be retried (false for spawn errors, bad output, policy stops).
        /// `next` already applies it; cluster mode re-decides retries against the shared store.
        retryable: bool,
        counters: StageCounters,
        /// How long the attempt held its lease (0 for one interrupted by an engine restart).
        ran_ms: u64,
        /// Stages this attempt's success made ready (all their predecessors succeeded): they
        /// are queued now, and recorded so.
        readied: Vec<StageIndex>,
    },
    /// A stage that never ran (or waits to retry) will not run.
    StageCancelled {
        job: JobId,
        stage: StageIndex,
    },
    JobFinished {
        job: JobId,
        state: JobState,
        error: Option<String>,
    },
}

/// The stage's counters after an attempt ended, for the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct StageCounters {
    pub failures: u32,
    pub interruptions: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("job {0:?} is already known")]
    DuplicateJob(JobId),
    #[error("job {0:?} is not active")]
    UnknownJob(JobId),
    #[error("job {job:?} stage {stage} attempt {attempt} is not running")]
    NotRunning { job: JobId, stage: StageIndex, attempt: u32 },
}

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// A queued stage that has waited this long and still does not fit reserves capacity, so
    /// smaller requests behind it can no longer take what it needs.
    pub reserve_after_ms: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig { reserve_after_ms: 30_000 }
    }
}

/// Order of the waiting queue: priority (high first), then the most work left in the job
/// (`rank`, high first; a starving stage ranks above all), then arrival, then stage position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct QueueKey {
    priority: Reverse<i32>,
    rank: Reverse<u32>,
    seq: u64,
    stage: StageIndex,
    job: JobId,
}

/// The rank of a stage that has waited past `reserve_after_ms`: it goes before every stage of
/// its priority that has not, in arrival order among its peers, so no stream of stages with
/// more work left can keep overtaking it.
const STARVING: u32 = u32::MAX;

impl QueueKey {
    /// Orders after every real key, to bound ranges of `(since, shape, key)`.
    const LAST: QueueKey = QueueKey {
        priority: Reverse(i32::MIN),
        rank: Reverse(0),
        seq: u64::MAX,
        stage: StageIndex::MAX,
        job: JobId(u128::MAX),
    };

    /// The key of a waiting stage, starving (`STARVING` rank) or not.
    fn of(job: &JobRun, stage: StageIndex, starving: bool) -> QueueKey {
        let rank = if starving { STARVING } else { job.stages[stage].rank };
        QueueKey { priority: Reverse(job.priority), rank: Reverse(rank), seq: job.seq, stage, job: job.id }
    }
}

/// A distinct resource request. Stages that ask for the same thing wait in the same shape, so
/// a pass can skip all of them in one step once one was refused.
type ShapeId = u64;

/// A request as an ordered map key (`ResourceRequest` itself has no order). Two requests are
/// one shape exactly when they are equal, as the linear pass compared them.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ShapeKey(ResourceRequest);

impl ShapeKey {
    fn fields(&self) -> (u32, u64, u32, &BTreeMap<String, u64>) {
        (self.0.gpus, self.0.gpu_memory, self.0.cpu, &self.0.counters)
    }
}

impl Ord for ShapeKey {
    fn cmp(&self, other: &Self) -> Ordering {
        self.fields().cmp(&other.fields())
    }
}

impl PartialOrd for ShapeKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The waiting stages of one shape.
#[derive(Debug)]
struct Shape {
    request: ResourceRequest,
    /// Stages of active jobs with this shape (waiting or not); it is forgotten at zero.
    stages: usize,
    /// Its waiting stages, in served order.
    queue: BTreeSet<QueueKey>,
    /// Those of them that were starving (waited `reserve_after_ms`) at the last full pass.
    starving: BTreeSet<QueueKey>,
}

/// What a full pass does next with a shape: try to start its head, or (once it was refused)
/// reserve for its next starving stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Visit {
    Try,
    Reserve,
}

/// An entry of the waiting queue, for the API.
#[derive(Clone, Debug, PartialEq)]
pub struct Waiting<'a> {
    pub job: JobId,
    pub stage: StageIndex,
    pub pipeline: &'a Pipeline,
    pub priority: i32,
    pub since: u64,
}

/// A lease currently held, for the API.
#[derive(Clone, Debug, PartialEq)]
pub struct Lease<'a> {
    pub job: JobId,
    pub stage: StageIndex,
    pub pipeline: &'a Pipeline,
    pub attempt: &'a RunningAttempt,
}

pub struct State {
    config: SchedulerConfig,
    inventory: Inventory,
    jobs: BTreeMap<JobId, JobRun>,
    /// Every waiting stage, in served order (for `waiting` and the reference pass).
    queue: BTreeSet<QueueKey>,
    /// The same stages by shape: what a full pass walks.
    shapes: BTreeMap<ShapeId, Shape>,
    shape_ids: BTreeMap<ShapeKey, ShapeId>,
    next_shape: ShapeId,
    /// Every waiting stage by the time it was queued, to keep `Shape::starving` current.
    by_since: BTreeSet<(u64, ShapeId, QueueKey)>,
    /// Waiting stages queued at or before this are in their shape's `starving` set.
    starving_upto: Option<u64>,
    /// Run the old pass over the whole queue instead (a test oracle; see
    /// `set_reference_scheduler`).
    linear_pass: bool,
    /// Queue entries the last pass looked at.
    #[cfg(test)]
    visited: usize,
    /// Retry delays and deadlines, `(when, job, stage)`. Entries may be stale; they are
    /// checked against the stage's status when they fire.
    timers: BTreeSet<(u64, JobId, StageIndex)>,
    /// Capacity came back since the last full pass: everything waiting must be tried again.
    capacity_returned: bool,
    /// Stages queued since the last pass. With no capacity returned, only they can start.
    fresh: Vec<QueueKey>,
    last_full_pass: u64,
    /// What the last full pass withheld for starving stages; incremental passes honour it.
    last_reservation: Reservation,
    /// Recent run times per stage, for the critical-path order.
    durations: Durations,
}

/// A full pass over the whole queue runs at least this often (on the next event), so a
/// stage that became starving since the last one gets its reservation.
const FULL_PASS_INTERVAL_MS: u64 = 1_000;

impl State {
    pub fn new(capacity: Capacity, config: SchedulerConfig) -> State {
        let inventory = Inventory::new(capacity);
        State {
            config,
            last_reservation: inventory.new_reservation(),
            inventory,
            jobs: BTreeMap::new(),
            queue: BTreeSet::new(),
            shapes: BTreeMap::new(),
            shape_ids: BTreeMap::new(),
            next_shape: 0,
            by_since: BTreeSet::new(),
            starving_upto: None,
            linear_pass: false,
            #[cfg(test)]
            visited: 0,
            timers: BTreeSet::new(),
            capacity_returned: false,
            fresh: Vec::new(),
            last_full_pass: 0,
            durations: Durations::default(),
        }
    }

    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    pub fn job(&self, id: JobId) -> Option<&JobRun> {
        self.jobs.get(&id)
    }

    /// Active (not final) jobs.
    pub fn jobs(&self) -> impl Iterator<Item = &JobRun> {
        self.jobs.values()
    }

    /// The waiting queue, in the order it is served.
    pub fn waiting(&self) -> impl Iterator<Item = Waiting<'_>> {
        self.queue.iter().filter_map(|key| {
            let job = self.jobs.get(&key.job)?;
            let StageStatus::Queued { since } = job.stages[key.stage].status else { return None };
            Some(Waiting { job: key.job, stage: key.stage, pipeline: &job.pipeline, priority: job.priority, since })
        })
    }

    pub fn leases(&self) -> impl Iterator<Item = Lease<'_>> {
        self.jobs.values().flat_map(|job| {
            job.stages.iter().enumerate().filter_map(move |(i, s)| match &s.status {
                StageStatus::Running(attempt) => {
                    Some(Lease { job: job.id, stage: i, pipeline: &job.pipeline, attempt })
                }
                _ => None,
            })
        })
    }

    /// Takes a lease that outlives any job, such as the resources a worker-pool instance holds
    /// for its lifetime, optionally on one device. All or nothing, like any grant.
    pub fn lease_standing(&mut self, request: &ResourceRequest, device: Option<u32>) -> Option<Grant> {
        let none = self.inventory.new_reservation();
        self.inventory.try_grant_on(request, &none, device)
    }

    /// Returns a standing lease.
    pub fn release_standing(&mut self, grant: &Grant) {
        self.inventory.release(grant);
        self.capacity_returned = true;
    }

    /// Resizes a counter, e.g. a worker pool's instance count after a config reload.
    pub fn set_counter_capacity(&mut self, name: &str, capacity: u64) {
        self.inventory.set_counter_capacity(name, capacity);
    }

    /// Replaces the scheduling settings (config reload).
    pub fn set_config(&mut self, config: SchedulerConfig) {
        self.config = config;
    }

    /// Makes every scheduling pass walk the whole waiting queue, as the scheduler did before
    /// the queue was indexed by shape. Slow (a full pass costs the queue's length); it exists
    /// as the oracle the indexed pass is checked against, and must decide exactly the same.
    #[doc(hidden)]
    pub fn set_reference_scheduler(&mut self, linear: bool) {
        self.linear_pass = linear;
    }

    /// Records how long an attempt of a stage ran (the runtime calls it for attempts that
    /// succeeded). The mean of a stage's recent attempts is its expected duration when the
    /// pipeline declares none; it orders stages queued from now on.
    pub fn record_duration(&mut self, pipeline: &str, stage: &str, ms: u64) {
        self.durations.record(pipeline, stage, ms);
    }

    /// When the next timeout or retry delay falls due, if any.
    pub fn next_wakeup(&self) -> Option<u64> {
        self.timers.first().map(|(at, _, _)| *at)
    }

    /// Applies one event, then runs a scheduling pass.
    pub fn apply(&mut self, event: Event, now: u64) -> Result<Vec<Action>, ApplyError> {
        let mut actions = self.handle(event, now)?;
        self.schedule(now, &mut actions);
        Ok(actions)
    }

    /// Applies one event without scheduling. A caller that applies many events at once (the
    /// runtime's turn) calls `schedule_pass` once after them instead of once per event.
    pub fn handle(&mut self, event: Event, now: u64) -> Result<Vec<Action>, ApplyError> {
        let mut actions = Vec::new();
        match event {
            Event::Submitted { job, seq, priority, pipeline } => {
                let stages = vec![
                    RestoredStage {
                        status: RestoredStatus::NotStarted,
                        attempts: 0,
                        failures: 0,
                        interruptions: 0
                    };
                    pipeline.stages.len()
                ];
                self.admit(job, seq, priority, pipeline, stages, now, &mut actions)?;
            }
            Event::Restored { job, seq, priority, pipeline, stages } => {
                self.admit(job, seq, priority, pipeline, stages, now, &mut actions)?;
            }
            Event::AttemptExited { job, stage, attempt, outcome } => {
                self.attempt_exited(job, stage, attempt, outcome, now, &mut actions)?;
            }
            Event::CancelRequested { job } => {
                if !self.jobs.contains_key(&job) {
                    return Err(ApplyError::UnknownJob(job));
                }
                let run = &self.jobs[&job];
                if let Some(t) = rules::cancel(&run.rules_view(), run.ending_state()) {
                    self.carry_out(job, &t.changes, t.ending, KillReason::Cancel, 0, &mut actions);
                }
                self.finish_if_done(job, &mut actions);
            }
            Event::Tick => self.fire_timers(now, &mut actions),
            Event::GpuForeign { device, bytes } => {
                if self.inventory.set_foreign(device as usize, bytes) {
                    self.capacity_returned = true;
                }
            }
            Event::StopAttempt { job, stage, attempt, error } => {
                let not_running = ApplyError::NotRunning { job, stage, attempt };
                let run = self.jobs.get_mut(&job).ok_or(not_running.clone())?;
                match &mut run.stages[stage].status {
                    StageStatus::Running(r) if r.attempt == attempt && r.kill.is_none() => {
                        r.kill = Some(KillReason::Policy);
                        r.kill_detail = Some(error);
                        actions.push(Action::Kill { job, stage, attempt, reason: KillReason::Policy });
                    }
                    StageStatus::Running(r) if r.attempt == attempt => {}
                    _ => return Err(not_running),
                }
            }
            Event::CounterAvailable { name, available } => {
                if self.inventory.set_counter_available(&name, available) {
                    self.capacity_returned = true;
                }
            }
        }
        Ok(actions)
    }

    /// Starts whatever fits now (see `schedule`).
    pub fn schedule_pass(&mut self, now: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        self.schedule(now, &mut actions);
        actions
    }

    #[allow(clippy::too_many_arguments)]
    fn admit(
        &mut self,
        id: JobId,
        seq: u64,
        priority: i32,
        pipeline: Arc<Pipeline>,
        restored: Vec<RestoredStage>,
        now: u64,
        actions: &mut Vec<Action>,
    ) -> Result<(), ApplyError> {
        if self.jobs.contains_key(&id) {
            return Err(ApplyError::DuplicateJob(id));
        }
        let stages = restored
            .iter()
            .map(|r| StageRun {
                status: match r.status {
                    RestoredStatus::Succeeded => StageStatus::Succeeded,
                    RestoredStatus::Failed => StageStatus::Failed,
                    RestoredStatus::Cancelled => StageStatus::Cancelled,
                    _ => StageStatus::Pending,
                },
                attempts: r.attempts,
                failures: r.failures,
                interruptions: r.interruptions,
                rank: 0,
            })
            .collect();
        let any_started = restored.iter().any(|r| r.attempts > 0);
        let state = if any_started { JobState::Running } else { JobState::Queued };
        let shapes = pipeline.stages.iter().map(|s| self.intern(&s.needs)).collect();
        self.jobs
            .insert(id, JobRun { id, seq, priority, pipeline: pipeline.clone(), stages, state, ending: None, shapes });

        // A request that can never fit (the inventory shrank since the job was accepted) would
        // wait forever: fail the job now and say why.
        if let Some((i, err)) = pipeline
            .stages
            .iter()
            .enumerate()
            .find_map(|(i, s)| s.needs.check_fits(self.inventory.capacity()).err().map(|e| (i, e)))
        {
            let error = format!("stage `{}` {err}", pipeline.stages[i].name);
            self.end_job(id, JobState::Failed, error, KillReason::JobFailed, actions);
        }

        for (i, r) in restored.iter().enumerate() {
            match r.status {
                RestoredStatus::WasRunning { attempt } => {
                    let job = &self.jobs[&id];
                    let mut view = job.rules_view();
                    view[i].status = rules::Status::Running;
                    let end = End::Interrupted(Interruption::EngineRestart);
                    let t = rules::attempt_ended(&view, job.ending_state(), i, end, &RetryPolicy::no_retry());
                    let run = &mut self.jobs.get_mut(&id).expect("inserted").stages[i];
                    run.interruptions = t.interruptions;
                    let counters = StageCounters { failures: run.failures, interruptions: run.interruptions };
                    let next = match t.changes[0].1 {
                        Change::Failed => StageNext::Failed,
                        Change::Cancelled => StageNext::Cancelled,
                        _ => StageNext::Retry { at: now },
                    };
                    let error = t.attempt.as_ref().and_then(|(_, e)| e.clone());
                    actions.push(Action::AttemptEnded {
                        job: id,
                        stage: i,
                        attempt,
                        result: AttemptResult::Interrupted,
                        next,
                        error,
                        retryable: true,
                        counters,
                        ran_ms: 0,
                        readied: Vec::new(),
                    });
                    match next {
                        StageNext::Failed => {
                            self.set_status(id, i, StageStatus::Failed);
                            self.carry_out(id, &t.changes[1..], t.ending, KillReason::JobFailed, now, actions);
                        }
                        StageNext::Cancelled => self.set_status(id, i, StageStatus::Cancelled),
                        _ => {}
                    }
                }
                RestoredStatus::Backoff { until } if self.jobs[&id].ending.is_none() => {
                    self.set_status(id, i, StageStatus::Backoff { until });
                }
                _ => {}
            }
        }
        if self.jobs[&id].ending.is_none() {
            for i in 0..pipeline.stages.len() {
                self.queue_if_ready(id, i, now);
            }
        } else {
            // Anything not final left over from a job that is ending is cancelled.
            for i in 0..pipeline.stages.len() {
                if !self.jobs[&id].stages[i].status.is_final() {
                    self.set_status(id, i, StageStatus::Cancelled);
                    actions.push(Action::StageCancelled { job: id, stage: i });
                }
            }
        }
        self.finish_if_done(id, actions);
        Ok(())
    }

    fn attempt_exited(
        &mut self,
        id: JobId,
        stage: StageIndex,
        attempt: u32,
        outcome: Outcome,
        now: u64,
        actions: &mut Vec<Action>,
    ) -> Result<(), ApplyError> {
        let not_running = ApplyError::NotRunning { job: id, stage, attempt };
        let job = self.jobs.get(&id).ok_or(not_running.clone())?;
        let StageStatus::Running(running) = &job.stages[stage].status else { return Err(not_running) };
        if running.attempt != attempt {
            return Err(not_running);
        }
        let running = running.clone();
        let spec = job.pipeline.stages[stage].clone();
        self.inventory.release(&running.grant);
        self.capacity_returned = true;

        let outcome = match (outcome, running.kill) {
            (Outcome::Interrupted { error, ran }, None)
            | (Outcome::Interrupted { error, ran: ran @ false }, Some(KillReason::Timeout)) => {
                let ran_ms = now.saturating_sub(running.started_at);
                self.interrupted(id, stage, attempt, error, ran, ran_ms, now, actions);
                self.finish_if_done(id, actions);
                return Ok(());
            }
            // Being stopped anyway: the stop decides how it ends.
            (Outcome::Interrupted { error, .. }, Some(_)) => Outcome::Failed { error, retryable: true },
            (outcome, _) => outcome,
        };
        let (result, error, retryable) = match (outcome, running.kill) {
            (Outcome::Interrupted { .. }, _) => unreachable!("mapped above"),
            (Outcome::Succeeded, _) => (AttemptResult::Succeeded, None, false),
            (Outcome::Failed { .. }, Some(KillReason::Timeout)) => {
                let limit = spec.timeout_ms.unwrap_or(0);
                (AttemptResult::TimedOut, Some(format!("timed out after {limit} ms")), true)
            }
            (Outcome::Failed { error, .. }, Some(KillReason::Cancel)) => {
                (AttemptResult::Cancelled, Some(format!("cancelled ({error})")), false)
            }
            (Outcome::Failed { .. }, Some(KillReason::Policy)) => {
                let error = running.kill_detail.clone().unwrap_or_else(|| "stopped by the engine".into());
                (AttemptResult::Failed, Some(error), false)
            }
            (Outcome::Failed { error, .. }, Some(KillReason::JobFailed)) => {
                (AttemptResult::Cancelled, Some(format!("stopped because the job failed ({error})")), false)
            }
            (Outcome::Failed { error, retryable }, None) => (AttemptResult::Failed, Some(error), retryable),
        };

        let end = match result {
            AttemptResult::Succeeded => End::Succeeded,
            AttemptResult::Cancelled => End::Cancelled { error: error.clone().unwrap_or_default() },
            _ => End::Failed {
                error: error.clone().unwrap_or_default(),
                retryable,
                timed_out: result == AttemptResult::TimedOut,
            },
        };
        let job = &self.jobs[&id];
        let t = rules::attempt_ended(&job.rules_view(), job.ending_state(), stage, end, &spec.retry);
        let run = &mut self.jobs.get_mut(&id).expect("checked").stages[stage];
        run.failures = t.failures;
        let counters = StageCounters { failures: run.failures, interruptions: run.interruptions };
        let next = match t.changes[0].1 {
            Change::Succeeded => StageNext::Succeeded,
            Change::Retry { delay_ms } => StageNext::Retry { at: now + delay_ms },
            Change::Failed => StageNext::Failed,
            _ => StageNext::Cancelled,
        };
        let ran_ms = now.saturating_sub(running.started_at);
        let readied = t.changes[1..].iter().filter(|(_, c)| *c == Change::Ready).map(|(i, _)| *i).collect();
        actions.push(Action::AttemptEnded {
            job: id,
            stage,
            attempt,
            result,
            next,
            error,
            retryable,
            counters,
            ran_ms,
            readied,
        });

        let status = match next {
            StageNext::Succeeded => StageStatus::Succeeded,
            StageNext::Retry { at } if at <= now => StageStatus::Queued { since: now },
            StageNext::Retry { at } => StageStatus::Backoff { until: at },
            StageNext::Cancelled => StageStatus::Cancelled,
            StageNext::Failed => StageStatus::Failed,
        };
        self.set_status(id, stage, status);
        self.carry_out(id, &t.changes[1..], t.ending, KillReason::JobFailed, now, actions);
        self.finish_if_done(id, actions);
        Ok(())
    }

    /// An attempt interrupted through no fault of its own (its lease is already released):
    /// re-queued now without spending a retry, as restore does for an attempt found running,
    /// with the same cap on the ones that `ran`. Past the cap the stage fails, and the job.
    #[allow(clippy::too_many_arguments)]
    fn interrupted(
        &mut self,
        id: JobId,
        stage: StageIndex,
        attempt: u32,
        error: String,
        ran: bool,
        ran_ms: u64,
        now: u64,
        actions: &mut Vec<Action>,
    ) {
        let ending = self.jobs[&id].ending.is_some();
        let run = &mut self.jobs.get_mut(&id).expect("checked").stages[stage];
        if ran {
            run.interruptions += 1;
        }
        let counters = StageCounters { failures: run.failures, interruptions: run.interruptions };
        let next = if ending {
            StageNext::Cancelled
        } else if counters.interruptions > MAX_INTERRUPTIONS {
            StageNext::Failed
        } else {
            StageNext::Retry { at: now }
        };
        let error = match next {
            StageNext::Failed => format!("interrupted {} times; the last time: {error}", counters.interruptions),
            _ => error,
        };
        actions.push(Action::AttemptEnded {
            job: id,
            stage,
            attempt,
            result: AttemptResult::Interrupted,
            next,
            error: Some(error.clone()),
            retryable: true,
            counters,
            ran_ms,
            readied: Vec::new(),
        });
        match next {
            StageNext::Failed => {
                self.set_status(id, stage, StageStatus::Failed);
                let name = self.jobs[&id].pipeline.stages[stage].name.clone();
                let error = format!("stage `{name}` failed: {error}");
                self.end_job(id, JobState::Failed, error, KillReason::JobFailed, actions);
            }
            StageNext::Cancelled => self.set_status(id, stage, StageStatus::Cancelled),
            _ => self.set_status(id, stage, StageStatus::Queued { since: now }),
        }
    }

    /// Marks the job as ending: cancels what has not started and stops what runs.
    fn end_job(&mut self, id: JobId, state: JobState, error: String, reason: KillReason, actions: &mut Vec<Action>) {
        let job = self.jobs.get(&id).expect("caller checked");
        let t = rules::end_job(&job.rules_view(), job.ending_state(), state, error);
        self.carry_out(id, &t.changes, t.ending, reason, 0, actions);
    }

    /// Carries out a transition's changes to the job's other stages (the ended stage, if any,
    /// is the caller's): readies, cancels, stops what runs (for `reason`), and records the
    /// job's ending.
    fn carry_out(
        &mut self,
        id: JobId,
        changes: &[(StageIndex, Change)],
        ending: Option<(JobState, String)>,
        reason: KillReason,
        now: u64,
        actions: &mut Vec<Action>,
    ) {
        if let Some(ending) = ending {
            self.jobs.get_mut(&id).expect("caller checked").ending = Some(Box::new(ending));
        }
        for (i, change) in changes {
            match change {
                Change::Ready => self.set_status(id, *i, StageStatus::Queued { since: now }),
                Change::Cancelled => {
                    self.set_status(id, *i, StageStatus::Cancelled);
                    actions.push(Action::StageCancelled { job: id, stage: *i });
                }
                Change::Stop => {
                    let job = self.jobs.get_mut(&id).expect("caller checked");
                    if let StageStatus::Running(running) = &mut job.stages[*i].status
                        && running.kill.is_none()
                    {
                        running.kill = Some(reason);
                        actions.push(Action::Kill { job: id, stage: *i, attempt: running.attempt, reason });
                    }
                }
                Change::Succeeded | Change::Retry { .. } | Change::Failed => {
                    debug_assert!(false, "only the ended stage succeeds, retries or fails")
                }
            }
        }
    }

    /// Emits `JobFinished` and forgets the job once nothing of it runs any more.
    fn finish_if_done(&mut self, id: JobId, actions: &mut Vec<Action>) {
        let Some(job) = self.jobs.get(&id) else { return };
        let statuses: Vec<rules::Status> = job.stages.iter().map(|s| s.status.rule_status()).collect();
        let Some(state) = rules::finished(&statuses, job.ending_state()) else { return };
        let error = job.ending.as_deref().map(|(_, error)| error.clone());
        actions.push(Action::JobFinished { job: id, state, error });
        let job = self.jobs.remove(&id).expect("present");
        for shape in job.shapes {
            self.release_shape(shape);
        }
    }

    /// The shape of a request, made on first sight. Counts one more stage using it.
    fn intern(&mut self, request: &ResourceRequest) -> ShapeId {
        let key = ShapeKey(request.clone());
        let id = match self.shape_ids.get(&key) {
            Some(id) => *id,
            None => {
                let id = self.next_shape;
                self.next_shape += 1;
                self.shape_ids.insert(key, id);
                let shape =
                    Shape { request: request.clone(), stages: 0, queue: BTreeSet::new(), starving: BTreeSet::new() };
                self.shapes.insert(id, shape);
                id
            }
        };
        self.shapes.get_mut(&id).expect("interned").stages += 1;
        id
    }

    /// One stage using the shape is gone (its job ended); the last one forgets the shape.
    fn release_shape(&mut self, id: ShapeId) {
        let shape = self.shapes.get_mut(&id).expect("interned");
        shape.stages -= 1;
        if shape.stages == 0 {
            debug_assert!(shape.queue.is_empty() && shape.starving.is_empty(), "a forgotten shape had waiting stages");
            let shape = self.shapes.remove(&id).expect("present");
            self.shape_ids.remove(&ShapeKey(shape.request));
        }
    }

    fn queue_if_ready(&mut self, id: JobId, stage: StageIndex, now: u64) {
        if rules::is_ready(&self.jobs[&id].rules_view(), stage) {
            self.set_status(id, stage, StageStatus::Queued { since: now });
        }
    }

    fn fire_timers(&mut self, now: u64, actions: &mut Vec<Action>) {
        while let Some(&(at, id, stage)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            let Some(job) = self.jobs.get_mut(&id) else { continue };
            match &mut job.stages[stage].status {
                StageStatus::Backoff { until } if *until <= now => {
                    let since = *until;
                    self.set_status(id, stage, StageStatus::Queued { since });
                }
                StageStatus::Running(running)
                    if running.kill.is_none() && running.deadline.is_some_and(|d| d <= now) =>
                {
                    running.kill = Some(KillReason::Timeout);
                    actions.push(Action::Kill {
                        job: id,
                        stage,
                        attempt: running.attempt,
                        reason: KillReason::Timeout,
                    });
                }
                _ => {}
            }
        }
    }

    /// Starts whatever fits, in queue order. A small request may overtake a big one that does
    /// not fit (backfill) unless the big one has waited past the bound, in which case it
    /// reserves capacity. When no capacity came back since the last full pass, stages that
    /// did not fit then still cannot, so only newly queued ones are tried.
    fn schedule(&mut self, now: u64, actions: &mut Vec<Action>) {
        #[cfg(test)]
        {
            self.visited = 0;
        }
        let mut full = self.capacity_returned || now.saturating_sub(self.last_full_pass) >= FULL_PASS_INTERVAL_MS;
        if !full && !self.fresh.is_empty() {
            // A stage that became starving since the last full pass, or was queued starving
            // already (a retry whose delay ran out a while ago, or `reserve_after: 0`), goes
            // before what reserved then: only a full pass gives it its place.
            let became = self.update_starving(now);
            full = became
                || self.fresh.iter().any(|k| self.current_key(k.job, k.stage).is_some_and(|k| k.rank.0 == STARVING));
        }
        if full {
            self.capacity_returned = false;
            self.fresh.clear();
            self.last_full_pass = now;
            let mut reserved = self.inventory.new_reservation();
            if self.linear_pass {
                // The index is kept as always (the API shows its order), but the reference
                // orders the waiting stages itself, from their statuses.
                self.update_starving(now);
                let keys = self.reference_order(now);
                self.try_start_linear(keys, &mut reserved, true, now, actions);
            } else {
                self.full_pass(&mut reserved, now, actions);
            }
            self.last_reservation = reserved;
        } else if !self.fresh.is_empty() {
            let fresh = std::mem::take(&mut self.fresh);
            let mut keys: Vec<QueueKey> = fresh.iter().filter_map(|k| self.current_key(k.job, k.stage)).collect();
            keys.sort();
            keys.dedup();
            let mut reserved = self.last_reservation.clone();
            if self.linear_pass {
                self.try_start_linear(keys, &mut reserved, false, now, actions);
            } else {
                self.fresh_pass(keys, &reserved, now, actions);
            }
        }
    }

    /// A full pass, by shape. The heads of all shapes are merged in queue order; each is tried
    /// and, while it fits, its shape's next stage follows. Within one pass free capacity only
    /// shrinks, so once a shape is refused none of its stages can start: the shape is skipped
    /// in one step, except that its starving stages still reserve, each at its own place in
    /// the queue, until reserving for the shape changes nothing (from then on it never does
    /// again in this pass). That is exactly what the linear pass did one entry at a time; this
    /// costs O((started + shapes + reservations that withheld something) · log n) instead of
    /// the queue's length.
    fn full_pass(&mut self, reserved: &mut Reservation, now: u64, actions: &mut Vec<Action>) {
        self.update_starving(now);
        let mut next: BinaryHeap<Reverse<(QueueKey, ShapeId, Visit)>> = self
            .shapes
            .iter()
            .filter_map(|(id, shape)| shape.queue.first().map(|key| Reverse((*key, *id, Visit::Try))))
            .collect();
        while let Some(Reverse((key, id, visit))) = next.pop() {
            #[cfg(test)]
            {
                self.visited += 1;
            }
            let after = (Bound::Excluded(key), Bound::Unbounded);
            let Some(since) = self.queued_since(key) else {
                debug_assert!(false, "the shape index holds a stage that is not queued");
                continue;
            };
            if visit == Visit::Try
                && let Some(grant) = self.inventory.try_grant(&self.shapes[&id].request, reserved)
            {
                self.start(key, since, grant, now, actions);
                if let Some(head) = self.shapes[&id].queue.range(after).next() {
                    next.push(Reverse((*head, id, Visit::Try)));
                }
                continue;
            }
            // Refused (now, or earlier in this pass): a starving stage reserves what it needs.
            let shape = &self.shapes[&id];
            let starving = now.saturating_sub(since) >= self.config.reserve_after_ms;
            debug_assert!(visit == Visit::Try || starving, "the starving index is stale");
            if starving && !self.inventory.reserve(&shape.request, reserved) {
                continue;
            }
            if let Some(key) = shape.starving.range(after).next() {
                next.push(Reverse((*key, id, Visit::Reserve)));
            }
        }
    }

    /// An incremental pass over the stages queued since the last pass, honouring what the last
    /// full pass reserved (it does not reserve itself).
    fn fresh_pass(&mut self, keys: Vec<QueueKey>, reserved: &Reservation, now: u64, actions: &mut Vec<Action>) {
        let mut refused: BTreeSet<ShapeId> = BTreeSet::new();
        for key in keys {
            let Some(since) = self.queued_since(key) else { continue };
            let id = self.jobs[&key.job].shapes[key.stage];
            if refused.contains(&id) {
                continue;
            }
            #[cfg(test)]
            {
                self.visited += 1;
            }
            match self.inventory.try_grant(&self.shapes[&id].request, reserved) {
                Some(grant) => self.start(key, since, grant, now, actions),
                None => {
                    refused.insert(id);
                }
            }
        }
    }

    /// Every waiting stage in served order, computed from the jobs alone (not from the index):
    /// what the linear pass walks.
    fn reference_order(&self, now: u64) -> Vec<QueueKey> {
        let mut keys: Vec<QueueKey> = self
            .jobs
            .values()
            .flat_map(|job| {
                job.stages.iter().enumerate().filter_map(move |(i, run)| match run.status {
                    StageStatus::Queued { since } => {
                        Some(QueueKey::of(job, i, now.saturating_sub(since) >= self.config.reserve_after_ms))
                    }
                    _ => None,
                })
            })
            .collect();
        keys.sort();
        keys
    }

    /// The pass as it was before the queue was indexed by shape, kept as the reference
    /// (`set_reference_scheduler`): it walks every key it is given.
    fn try_start_linear(
        &mut self,
        keys: Vec<QueueKey>,
        reserved: &mut Reservation,
        full: bool,
        now: u64,
        actions: &mut Vec<Action>,
    ) {
        // Within one pass free capacity only shrinks, so a request that did not fit once will
        // not fit again: remember it instead of re-checking a long queue of identical stages.
        let mut refused: Vec<ResourceRequest> = Vec::new();
        for key in keys {
            #[cfg(test)]
            {
                self.visited += 1;
            }
            let Some(job) = self.jobs.get(&key.job) else { continue };
            let StageStatus::Queued { since } = job.stages[key.stage].status else { continue };
            let needs: &ResourceRequest = &job.pipeline.stages[key.stage].needs;
            let grant = if refused.contains(needs) { None } else { self.inventory.try_grant(needs, reserved) };
            match grant {
                Some(grant) => self.start(key, since, grant, now, actions),
                None => {
                    if full && now.saturating_sub(since) >= self.config.reserve_after_ms {
                        self.inventory.reserve(needs, reserved);
                    }
                    if !refused.contains(needs) {
                        refused.push(needs.clone());
                    }
                }
            }
        }
    }

    /// The key a waiting stage has in the index now, or `None` if it is not waiting.
    fn current_key(&self, id: JobId, stage: StageIndex) -> Option<QueueKey> {
        let job = self.jobs.get(&id)?;
        let StageStatus::Queued { since } = job.stages[stage].status else { return None };
        Some(QueueKey::of(job, stage, self.starving_upto.is_some_and(|upto| since <= upto)))
    }

    /// When a waiting stage was queued, or `None` if it is not waiting.
    fn queued_since(&self, key: QueueKey) -> Option<u64> {
        match self.jobs.get(&key.job)?.stages[key.stage].status {
            StageStatus::Queued { since } => Some(since),
            _ => None,
        }
    }

    /// Starts a waiting stage with the grant it got.
    fn start(&mut self, key: QueueKey, since: u64, grant: Grant, now: u64, actions: &mut Vec<Action>) {
        let job = self.jobs.get_mut(&key.job).expect("queued job exists");
        let deadline = job.pipeline.stages[key.stage].timeout_ms.map(|t| now + t);
        job.state = JobState::Running;
        let run = &mut job.stages[key.stage];
        run.attempts += 1;
        let attempt = run.attempts;
        actions.push(Action::Start {
            job: key.job,
            stage: key.stage,
            attempt,
            grant: grant.clone(),
            deadline,
            queued_ms: now.saturating_sub(since),
        });
        let running = RunningAttempt { attempt, grant, started_at: now, deadline, kill: None, kill_detail: None };
        self.set_status(key.job, key.stage, StageStatus::Running(Box::new(running)));
    }

    /// The latest queue time at which a stage counts as starving at `now`, if any: a stage
    /// starves when `now.saturating_sub(since) >= reserve_after_ms`.
    fn starving_threshold(&self, now: u64) -> Option<u64> {
        match self.config.reserve_after_ms {
            0 => Some(u64::MAX),
            after => now.checked_sub(after),
        }
    }

    /// Brings every shape's `starving` set up to `now`. Time moves forward, so each stage
    /// enters its set once (a later `reserve_after_ms` moves stages back out). Says whether
    /// a waiting stage became starving.
    fn update_starving(&mut self, now: u64) -> bool {
        let upto = self.starving_threshold(now);
        let (low, high, entering) = match upto.cmp(&self.starving_upto) {
            Ordering::Equal => return false,
            Ordering::Greater => (self.starving_upto, upto, true),
            Ordering::Less => (upto, self.starving_upto, false),
        };
        let bound = |since: u64| (since, ShapeId::MAX, QueueKey::LAST);
        let lower = low.map_or(Bound::Unbounded, |since| Bound::Excluded(bound(since)));
        let upper = Bound::Included(bound(high.expect("above something")));
        // Each moves to (or back from) the starving rank: its key changes everywhere.
        let moving: Vec<(u64, ShapeId, QueueKey)> = self.by_since.range((lower, upper)).copied().collect();
        let became = entering && !moving.is_empty();
        for (since, id, old) in moving {
            let new = QueueKey::of(&self.jobs[&old.job], old.stage, entering);
            self.queue.remove(&old);
            self.queue.insert(new);
            self.by_since.remove(&(since, id, old));
            self.by_since.insert((since, id, new));
            let shape = self.shapes.get_mut(&id).expect("waiting stages have a shape");
            shape.queue.remove(&old);
            shape.queue.insert(new);
            if entering {
                shape.starving.insert(new);
            } else {
                shape.starving.remove(&old);
            }
        }
        self.starving_upto = upto;
        became
    }

    /// The one place a stage's status changes, so the queue, its shape index and the timers
    /// stay in step.
    fn set_status(&mut self, id: JobId, stage: StageIndex, status: StageStatus) {
        let upto = self.starving_upto;
        let starving = |since: u64| upto.is_some_and(|upto| since <= upto);
        let job = self.jobs.get_mut(&id).expect("caller checked");
        let shape_id = job.shapes[stage];
        if let StageStatus::Queued { since } = job.stages[stage].status {
            let key = QueueKey::of(job, stage, starving(since));
            self.queue.remove(&key);
            self.by_since.remove(&(since, shape_id, key));
            let shape = self.shapes.get_mut(&shape_id).expect("interned");
            shape.queue.remove(&key);
            // A starving stage that leaves the queue without starting may hold a reservation
            // that incremental passes still honour: the next pass must be a full one.
            if shape.starving.remove(&key) && !matches!(status, StageStatus::Running(_)) {
                self.capacity_returned = true;
            }
        }
        if let StageStatus::Queued { .. } = status {
            job.stages[stage].rank = order::rank(self.durations.remaining(&job.pipeline, stage));
        }
        match &status {
            StageStatus::Queued { since } => {
                let key = QueueKey::of(job, stage, starving(*since));
                self.queue.insert(key);
                self.by_since.insert((*since, shape_id, key));
                let shape = self.shapes.get_mut(&shape_id).expect("interned");
                shape.queue.insert(key);
                if self.starving_upto.is_some_and(|upto| *since <= upto) {
                    shape.starving.insert(key);
                }
                self.fresh.push(key);
            }
            StageStatus::Backoff { until } => {
                self.timers.insert((*until, id, stage));
            }
            StageStatus::Running(r) if let Some(d) = &r.deadline => {
                self.timers.insert((*d, id, stage));
            }
            _ => {}
        }
        job.stages[stage].status = status;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::StageSpec;
    use crate::resources::GpuDevice;
    use crate::retry::RetryPolicy;

    fn pipeline(needs: ResourceRequest) -> Arc<Pipeline> {
        let stage = StageSpec {
            name: "s".into(),
            needs,
            after: vec![],
            timeout_ms: None,
            retry: RetryPolicy::no_retry(),
            expected_ms: None,
        };
        Arc::new(Pipeline::new("p", vec![stage]).unwrap())
    }

    fn cpu(n: u32) -> ResourceRequest {
        ResourceRequest { cpu: n, ..Default::default() }
    }

    fn gpu(cpu: u32) -> ResourceRequest {
        ResourceRequest { gpus: 1, cpu, ..Default::default() }
    }

    fn exit(state: &mut State, id: u128, now: u64) -> Vec<Action> {
        let event = Event::AttemptExited { job: JobId(id), stage: 0, attempt: 1, outcome: Outcome::Succeeded };
        state.apply(event, now).unwrap()
    }

    fn started(actions: &[Action]) -> Vec<u128> {
        actions.iter().filter_map(|a| if let Action::Start { job, .. } = a { Some(job.0) } else { None }).collect()
    }

    fn one_gpu(cpu: u32) -> Capacity {
        Capacity { gpus: vec![GpuDevice { index: 0, memory: 1 << 30 }], cpu, counters: BTreeMap::new() }
    }

    /// Both schedulers on the same events; every step must decide the same.
    struct Pair {
        indexed: State,
        linear: State,
    }

    impl Pair {
        fn new(capacity: Capacity, config: SchedulerConfig) -> Pair {
            let mut linear = State::new(capacity.clone(), config.clone());
            linear.set_reference_scheduler(true);
            Pair { indexed: State::new(capacity, config), linear }
        }

        fn apply(&mut self, event: Event, now: u64) -> Vec<Action> {
            let a = self.indexed.apply(event.clone(), now).unwrap();
            let b = self.linear.apply(event, now).unwrap();
            assert_eq!(a, b, "the indexed pass decided differently from the linear one");
            a
        }

        fn submit(&mut self, id: u128, p: &Arc<Pipeline>, now: u64) -> Vec<Action> {
            self.apply(Event::Submitted { job: JobId(id), seq: id as u64, priority: 0, pipeline: p.clone() }, now)
        }
    }

    #[test]
    fn a_refused_shape_is_skipped_in_one_step() {
        let mut pair = Pair::new(one_gpu(1), SchedulerConfig::default());
        let (g, c) = (pipeline(gpu(0)), pipeline(cpu(1)));
        assert_eq!(started(&pair.submit(1, &g, 0)), vec![1]);
        assert_eq!(started(&pair.submit(2, &c, 0)), vec![2]);
        // A thousand of each shape wait, interleaved.
        for i in 0..1_000u128 {
            pair.submit(10 + 2 * i, &g, 1);
            pair.submit(11 + 2 * i, &c, 1);
        }
        // The CPU slot comes back: the first waiting CPU stage starts, nothing else.
        assert_eq!(
            started(
                &pair.apply(
                    Event::AttemptExited { job: JobId(2), stage: 0, attempt: 1, outcome: Outcome::Succeeded },
                    2,
                )
            ),
            vec![11]
        );
        assert_eq!(pair.linear.visited, 2_000, "the linear pass walks the whole queue");
        // The GPU head refused, the CPU head started, the next CPU head refused.
        assert_eq!(pair.indexed.visited, 3, "the indexed pass skips each refused shape in one step");
    }
    #[test]
    fn every_starving_stage_of_a_refused_shape_reserves() {
        let mut pair = Pair::new(one_gpu(4), SchedulerConfig { reserve_after_ms: 100 });
        let (holder, g, c) = (pipeline(gpu(0)), pipeline(gpu(1)), pipeline(cpu(1)));
        assert_eq!(started(&pair.submit(1, &holder, 0)), vec![1]);
        for id in 2..=4 {
            assert!(started(&pair.submit(id, &g, 0)).is_empty());
        }
        // A full pass after the bound: each of the three starving GPU stages withholds a CPU
        // slot (and the device), so only one CPU slot is left for backfill.
        assert!(pair.apply(Event::Tick, 1_000).is_empty());
        assert_eq!(pair.indexed.visited, 3, "one visit per reservation that withheld something");
        let mut backfilled = Vec::new();
        for id in 5..=7 {
            backfilled.extend(started(&pair.submit(id, &c, 1_001)));
        }
        assert_eq!(backfilled, vec![5]);
        // The device comes back: the oldest GPU stage takes it.
        let actions = pair
            .apply(Event::AttemptExited { job: JobId(1), stage: 0, attempt: 1, outcome: Outcome::Succeeded }, 1_002);
        assert_eq!(started(&actions), vec![2]);
    }

    fn interrupt(state: &mut State, id: u128, attempt: u32, now: u64) -> Vec<Action> {
        let outcome = Outcome::Interrupted { error: "worker instance model#0 exited with status 3".into(), ran: true };
        state.apply(Event::AttemptExited { job: JobId(id), stage: 0, attempt, outcome }, now).unwrap()
    }

    fn ended(actions: &[Action]) -> Vec<(AttemptResult, StageNext, Option<String>, StageCounters)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::AttemptEnded { result, next, error, counters, .. } => {
                    Some((*result, *next, error.clone(), *counters))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_interruption_requeues_at_once_without_spending_the_retry_budget() {
        // One attempt allowed (no retry): a failure would fail the job; an interruption must not.
        let mut state = State::new(Capacity { cpu: 1, ..Default::default() }, SchedulerConfig::default());
        let p = pipeline(cpu(1));
        let submitted = Event::Submitted { job: JobId(1), seq: 1, priority: 0, pipeline: p.clone() };
        assert_eq!(started(&state.apply(submitted, 0).unwrap()), vec![1]);
        let actions = interrupt(&mut state, 1, 1, 10);
        let ends = ended(&actions);
        assert_eq!(ends.len(), 1);
        let (result, next, error, counters) = &ends[0];
        assert_eq!(*result, AttemptResult::Interrupted);
        assert_eq!(*next, StageNext::Retry { at: 10 }, "re-queued now, no backoff");
        assert!(error.as_deref().unwrap().contains("exited with status 3"), "the cause is kept: {error:?}");
        assert_eq!(*counters, StageCounters { failures: 0, interruptions: 1 });
        // The lease came back and the stage started again in the same step, as attempt 2.
        assert!(actions.iter().any(|a| matches!(a, Action::Start { job: JobId(1), attempt: 2, .. })), "{actions:?}");
        let run = &state.job(JobId(1)).unwrap().stages[0];
        assert_eq!((run.attempts, run.failures, run.interruptions), (2, 0, 1));
        // It then succeeds: the job succeeds.
        let actions = state
            .apply(Event::AttemptExited { job: JobId(1), stage: 0, attempt: 2, outcome: Outcome::Succeeded }, 20)
            .unwrap();
        assert!(actions.iter().any(|a| matches!(a, Action::JobFinished { state: JobState::Succeeded, .. })));
        assert!(state.inventory().is_idle());
    }

    #[test]
    fn interruptions_are_capped_like_restores() {
        let mut state = State::new(Capacity { cpu: 1, ..Default::default() }, SchedulerConfig::default());
        let p = pipeline(cpu(1));
        state.apply(Event::Submitted { job: JobId(1), seq: 1, priority: 0, pipeline: p }, 0).unwrap();
        for attempt in 1..=MAX_INTERRUPTIONS {
            let actions = interrupt(&mut state, 1, attempt, attempt as u64);
            assert_eq!(ended(&actions)[0].1, StageNext::Retry { at: attempt as u64 });
        }
        // One more than the cap: a poison task that crashes its worker every time fails.
        let last = MAX_INTERRUPTIONS + 1;
        let actions = interrupt(&mut state, 1, last, 100);
        let (result, next, error, counters) = ended(&actions)[0].clone();
        assert_eq!((result, next), (AttemptResult::Interrupted, StageNext::Failed));
        assert_eq!(counters, StageCounters { failures: 0, interruptions: last });
        let error = error.unwrap();
        assert!(error.starts_with(&format!("interrupted {last} times")) && error.contains("status 3"), "{error}");
        let finished = actions.iter().find_map(|a| match a {
            Action::JobFinished { state, error, .. } => Some((*state, error.clone())),
            _ => None,
        });
        let (job_state, job_error) = finished.expect("the job ends");
        assert_eq!(job_state, JobState::Failed);
        assert!(job_error.unwrap().contains(&format!("interrupted {last} times")));
        assert!(state.inventory().is_idle());
    }

    #[test]
    fn an_interrupted_task_that_never_started_counts_no_interruption() {
        // A task sent ahead to a worker that crashed on another task: re-queued any number of
        // times, it never reaches the cap (it cannot be what crashed the worker).
        let mut state = State::new(Capacity { cpu: 1, ..Default::default() }, SchedulerConfig::default());
        state.apply(Event::Submitted { job: JobId(1), seq: 1, priority: 0, pipeline: pipeline(cpu(1)) }, 0).unwrap();
        for attempt in 1..=3 * MAX_INTERRUPTIONS {
            let outcome = Outcome::Interrupted { error: "queued on a worker that crashed".into(), ran: false };
            let event = Event::AttemptExited { job: JobId(1), stage: 0, attempt, outcome };
            let (result, next, _, counters) = ended(&state.apply(event, attempt as u64).unwrap())[0].clone();
            assert_eq!((result, next), (AttemptResult::Interrupted, StageNext::Retry { at: attempt as u64 }));
            assert_eq!(counters, StageCounters { failures: 0, interruptions: 0 });
        }
        let run = &state.job(JobId(1)).unwrap().stages[0];
        assert!(matches!(run.status, StageStatus::Running(_)), "started again: {run:?}");
    }

    #[test]
    fn a_task_that_timed_out_before_it_started_is_requeued_not_failed() {
        let mut state = State::new(Capacity { cpu: 1, ..Default::default() }, SchedulerConfig::default());
        let stage = StageSpec {
            name: "s".into(),
            needs: cpu(1),
            after: vec![],
            timeout_ms: Some(100),
            retry: RetryPolicy::no_retry(),
            expected_ms: None,
        };
        let p = Arc::new(Pipeline::new("p", vec![stage]).unwrap());
        state.apply(Event::Submitted { job: JobId(1), seq: 1, priority: 0, pipeline: p }, 0).unwrap();
        let actions = state.apply(Event::Tick, 100).unwrap();
        assert!(actions.iter().any(|a| matches!(a, Action::Kill { reason: KillReason::Timeout, .. })));
        let outcome = Outcome::Interrupted { error: "stopped while queued (not started)".into(), ran: false };
        let event = Event::AttemptExited { job: JobId(1), stage: 0, attempt: 1, outcome };
        let actions = state.apply(event, 101).unwrap();
        let (result, next, _, counters) = ended(&actions)[0].clone();
        assert_eq!((result, next), (AttemptResult::Interrupted, StageNext::Retry { at: 101 }));
        assert_eq!(counters, StageCounters { failures: 0, interruptions: 0 });
        assert!(
            actions.iter().any(|a| matches!(a, Action::Start { attempt: 2, deadline: Some(201), .. })),
            "{actions:?}"
        );
        // One that ran and timed out is timed out, whatever else stopped it.
        state.apply(Event::Tick, 201).unwrap();
        let outcome = Outcome::Interrupted { error: "its worker crashed".into(), ran: true };
        let event = Event::AttemptExited { job: JobId(1), stage: 0, attempt: 2, outcome };
        let (result, next, _, _) = ended(&state.apply(event, 202).unwrap())[0].clone();
        assert_eq!((result, next), (AttemptResult::TimedOut, StageNext::Failed));
    }

    #[test]
    fn an_interrupted_attempt_that_was_being_stopped_ends_as_the_stop_says() {
        let mut state = State::new(Capacity { cpu: 2, ..Default::default() }, SchedulerConfig::default());
        let p = pipeline(cpu(1));
        for id in [1, 2] {
            state
                .apply(Event::Submitted { job: JobId(id), seq: id as u64, priority: 0, pipeline: p.clone() }, 0)
                .unwrap();
        }
        // Job 1 is cancelled: its attempt is being stopped when its worker crashes.
        let actions = state.apply(Event::CancelRequested { job: JobId(1) }, 1).unwrap();
        assert!(actions.iter().any(|a| matches!(a, Action::Kill { reason: KillReason::Cancel, .. })));
        let (result, next, _, counters) = ended(&interrupt(&mut state, 1, 1, 2))[0].clone();
        assert_eq!((result, next), (AttemptResult::Cancelled, StageNext::Cancelled));
        assert_eq!(counters.interruptions, 0, "not counted as an interruption");
        // Job 2 is stopped by policy: it fails, not retried, whatever interrupted it.
        let stop = Event::StopAttempt { job: JobId(2), stage: 0, attempt: 1, error: "gpu unused".into() };
        state.apply(stop, 3).unwrap();
        let (result, next, error, _) = ended(&interrupt(&mut state, 2, 1, 4))[0].clone();
        assert_eq!((result, next, error.as_deref()), (AttemptResult::Failed, StageNext::Failed, Some("gpu unused")));
        assert!(state.inventory().is_idle());
    }

    #[test]
    fn draining_a_hundred_thousand_identical_stages_visits_a_few_entries_per_pass() {
        const JOBS: u128 = 100_000;
        let mut state = State::new(Capacity { cpu: 2, ..Default::default() }, SchedulerConfig::default());
        let p = pipeline(cpu(1));
        let mut running = std::collections::VecDeque::new();
        for id in 1..=JOBS {
            let event = Event::Submitted { job: JobId(id), seq: id as u64, priority: 0, pipeline: p.clone() };
            assert!(state.handle(event, 0).unwrap().is_empty());
        }
        running.extend(started(&state.schedule_pass(0)));
        assert_eq!(running, [1, 2]);
        assert_eq!(state.visited, 3, "two start, the third is refused and its shape skipped");
        let mut now = 0;
        let mut most = 0;
        while let Some(id) = running.pop_front() {
            // Past 30 s every waiting stage is starving; reserving for them changes nothing.
            now += 1;
            running.extend(started(&exit(&mut state, id, now)));
            most = most.max(state.visited);
        }
        assert_eq!(state.jobs().count(), 0);
        assert!(state.inventory().is_idle());
        assert_eq!(state.shapes.len(), 0, "shapes are forgotten with their last job");
        assert!(most <= 2, "a pass visited {most} entries");
    }

    /// The six-stage video OCR chain of examples/chain: (name, GPU?, seconds).
    const CHAIN: [(&str, bool, u64); 6] = [
        ("extract", false, 2),
        ("detect", true, 1),
        ("crop", true, 2),
        ("stitch", false, 1),
        ("ocr", true, 3),
        ("finalize", false, 1),
    ];

    fn chain() -> Arc<Pipeline> {
        let stages = CHAIN
            .iter()
            .enumerate()
            .map(|(i, (name, gpu, _))| StageSpec {
                name: (*name).into(),
                needs: if *gpu { ResourceRequest { gpus: 1, ..Default::default() } } else { cpu(1) },
                after: if i == 0 { vec![] } else { vec![i - 1] },
                timeout_ms: None,
                retry: RetryPolicy::no_retry(),
                expected_ms: None,
            })
            .collect();
        Arc::new(Pipeline::new("chain", stages).unwrap())
    }

    /// A chain job restored with its first `done` stages succeeded: the next one is queued.
    fn restore_at(state: &mut State, id: u128, done: usize, now: u64) -> Vec<Action> {
        let stages = (0..CHAIN.len())
            .map(|i| RestoredStage {
                status: if i < done { RestoredStatus::Succeeded } else { RestoredStatus::NotStarted },
                attempts: u32::from(i < done),
                failures: 0,
                interruptions: 0,
            })
            .collect();
        state
            .apply(Event::Restored { job: JobId(id), seq: id as u64, priority: 0, pipeline: chain(), stages }, now)
            .unwrap()
    }

    /// Job 5 waits at ocr (3 s of GPU, then 1 s of CPU left), job 6 at crop (2 s of GPU, then
    /// 1 + 3 + 1 s left) while the GPU is busy. When it frees, job 6's crop must go first:
    /// arrival order would run job 5's ocr, and at the end the GPU would wait while job 6
    /// stitches on the CPU.
    fn tail_gap(measured: bool, reserve_after_ms: u64) -> (State, Vec<(u128, StageIndex)>) {
        let capacity =
            Capacity { gpus: vec![GpuDevice { index: 0, memory: 1 << 30 }], cpu: 4, counters: BTreeMap::new() };
        let mut state = State::new(capacity, SchedulerConfig { reserve_after_ms });
        if measured {
            for (name, _, secs) in CHAIN {
                // Measured means, as the runtime feeds them: a little noise around each.
                for jitter in [0, 40, 80] {
                    state.record_duration("chain", name, secs * 1_000 - 40 + jitter);
                }
            }
        }
        // Something else holds the GPU.
        let holder = pipeline(gpu(0));
        let a = state.apply(Event::Submitted { job: JobId(1), seq: 1, priority: 0, pipeline: holder }, 0).unwrap();
        assert_eq!(started(&a), vec![1]);
        assert!(started(&restore_at(&mut state, 5, 4, 10)).is_empty(), "ocr waits for the GPU");
        assert!(started(&restore_at(&mut state, 6, 2, 20)).is_empty(), "crop waits for the GPU");
        let order = state.waiting().map(|w| (w.job.0, w.stage)).collect();
        (state, order)
    }

    #[test]
    fn the_stage_with_more_work_left_downstream_goes_first() {
        let (mut state, order) = tail_gap(true, 30_000);
        assert_eq!(order, vec![(6, 2), (5, 4)], "job 6's crop before job 5's ocr");
        let actions = exit(&mut state, 1, 1_000);
        assert!(actions.iter().any(|a| matches!(a, Action::Start { job: JobId(6), stage: 2, .. })), "{actions:?}");
        assert_eq!(state.waiting().map(|w| (w.job.0, w.stage)).collect::<Vec<_>>(), vec![(5, 4)]);
    }

    #[test]
    fn with_no_durations_known_the_order_is_arrival() {
        let (_, order) = tail_gap(false, 30_000);
        assert_eq!(order, vec![(5, 4), (6, 2)]);
    }

    #[test]
    fn declared_durations_order_without_measurements() {
        let declared: Vec<StageSpec> = chain()
            .stages
            .iter()
            .zip(CHAIN)
            .map(|(s, (_, _, secs))| StageSpec { expected_ms: Some(secs * 1_000), ..s.clone() })
            .collect();
        let p = Pipeline::new("chain", declared).unwrap();
        let d = Durations::default();
        let remaining: Vec<u64> = (0..6).map(|i| d.remaining(&p, i)).collect();
        assert_eq!(remaining, vec![10_000, 8_000, 7_000, 5_000, 4_000, 1_000]);
    }

    #[test]
    fn a_stage_past_reserve_after_goes_before_those_with_more_work_left() {
        let (mut state, order) = tail_gap(true, 5_000);
        assert_eq!(order, vec![(6, 2), (5, 4)]);
        // Job 5's ocr has waited past the bound at the next full pass: it goes first now.
        assert!(state.apply(Event::Tick, 5_015).unwrap().is_empty());
        assert_eq!(state.waiting().map(|w| (w.job.0, w.stage)).collect::<Vec<_>>(), vec![(5, 4), (6, 2)]);
        let actions = exit(&mut state, 1, 5_020);
        assert!(actions.iter().any(|a| matches!(a, Action::Start { job: JobId(5), stage: 4, .. })), "{actions:?}");
    }
}
