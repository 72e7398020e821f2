//! The one loop that owns the mutable state. It turns API commands, child exits and timers
//! into core events, commits what each step changed, and only then acts (spawn, signal).

mod clock;
mod cluster;
mod commands;
mod degraded;
mod journal;
mod ledger;
mod metrics;
mod pools;
mod progress;
mod recover;
mod reload;
mod watchdog;

pub use degraded::{Degraded, free_bytes};

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gpuflow_core::{
    Action, AttemptResult, Event, Grant, JobId, KillReason, Outcome, StageIndex, StageNext, StageState, State,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::config::template::RenderContext;
use crate::config::{Config, PipelineDef, SharedConfig, StageExec};
use crate::store::{NewJob, Store, StoreError, Write};
use crate::supervisor::{self, AttemptReport, AttemptSpec, ChildRegistry, ExitStatus, InstanceEvent, StopRequest};

pub use clock::Clock;
pub use commands::{
    Command, DeviceReading, DiagnosisSnapshot, EngineError, EngineHandle, LeaseView, MAX_BATCH, ResourcesSnapshot,
    SubmitRequest, Submitted, WaitingView, json_size,
};
pub use journal::{EngineEvent, Journal, LeaseInterval, PoolTransition, Published};
pub use pools::{CRASH_LOOP, InstanceView, PoolView};
pub use progress::{ProgressBoard, StageProgress};
pub use watchdog::OpenFinding;

/// `command: [gpuflow:noop]`: a built-in stage that succeeds at once without spawning.
pub const NOOP_COMMAND: &str = "gpuflow:noop";

/// Why the loop stopped on its own. The store failing is fatal by design: the engine must
/// not act on a change it could not record, and a restart recovers from what was recorded.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot prepare {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// The lease as recorded with each attempt.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LeaseRecord {
    pub gpus: Vec<u32>,
    pub gpu_memory: Option<GpuShare>,
    pub cpu: u32,
    pub counters: BTreeMap<String, u64>,
}

/// A share of one device's memory.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct GpuShare {
    pub device: u32,
    pub bytes: u64,
}

impl From<&Grant> for LeaseRecord {
    fn from(g: &Grant) -> Self {
        LeaseRecord {
            gpus: g.gpus.clone(),
            gpu_memory: g.gpu_memory.map(|(device, bytes)| GpuShare { device, bytes }),
            cpu: g.cpu,
            counters: g.counters.clone(),
        }
    }
}

type AttemptKey = (JobId, StageIndex, u32);

/// What the loop knows about a job beyond the core's view.
struct ActiveJob {
    /// The job's UUID; its text form is made when needed (`id`), not kept per job.
    uuid: uuid::Uuid,
    pipeline: Arc<PipelineDef>,
    /// Shared by every job of the pipeline (the key of `Runtime::active_per_pipeline`).
    pipeline_name: Arc<str>,
    /// `None` while a large input stays in the store only: a queued job must not hold it in
    /// memory (`INPUT_KEPT_BYTES`); it is read back for the turn that starts one of its stages.
    input: Option<Value>,
    /// Stage outputs by position; shorter than the stage list (empty at first) until outputs
    /// arrive, so a queued job holds no allocation for them.
    outputs: Box<[Option<Value>]>,
}

impl ActiveJob {
    fn id(&self) -> String {
        self.uuid.to_string()
    }

    /// The input; `Null` only while a large one is in the store (never during a start).
    fn input(&self) -> &Value {
        self.input.as_ref().unwrap_or(&Value::Null)
    }

    fn output(&self, stage: StageIndex) -> Option<&Value> {
        self.outputs.get(stage).and_then(Option::as_ref)
    }

    fn set_output(&mut self, stage: StageIndex, output: Option<Value>) {
        if output.is_some() && self.outputs.len() <= stage {
            let mut longer = std::mem::take(&mut self.outputs).into_vec();
            longer.resize(stage + 1, None);
            self.outputs = longer.into_boxed_slice();
        }
        if let Some(slot) = self.outputs.get_mut(stage) {
            *slot = output;
        }
    }
}

struct RunningProcess {
    stop: mpsc::UnboundedSender<StopRequest>,
    pid: Option<u32>,
}

/// How an attempt's process ended, kept until the step that records it.
#[derive(Default)]
struct ExitDetails {
    exit_code: Option<i32>,
    signal: Option<i32>,
    output: Option<Value>,
    /// For a worker task: how many tasks its batch held.
    batch_size: Option<u32>,
    /// How long a worker task ran on its instance, which is less than its attempt held the
    /// lease when it was sent ahead behind another task.
    ran_ms: Option<u64>,
}

enum Internal {
    Spawned { key: AttemptKey, pid: u32 },
    Exited { key: AttemptKey, report: AttemptReport },
    Worker { pool: String, index: usize, generation: u64, event: InstanceEvent },
    GpuSamples { samples: Vec<Option<crate::gpu::DeviceSample>>, at: u64 },
    // A command stage's newest progress line, read by its attempt's task.
    Progress { key: AttemptKey, progress: supervisor::Progress },
}

/// An answer to an API caller, sent once its turn has committed (`Ok`), or with the reason
/// when the commit failed. It reads the scheduler's state as the turn left it.
type Reply = Box<dyn FnOnce(&State, Result<(), &str>) + Send>;

/// What one turn decided. Nothing in it is acted on before `Store::write_turn` (or, for an
/// agent, the fenced writes) committed it; a failed commit performs none of it.
#[derive(Default)]
struct Turn {
    /// Jobs admitted in this turn.
    jobs: Vec<NewJob>,
    writes: Vec<Write>,
    /// Decided actions, performed after the commit, in order.
    actions: Vec<Action>,
    replies: Vec<Reply>,
    /// Feed events of this turn's admissions (the others follow from `actions`).
    submitted: Vec<EngineEvent>,
    /// Built-in no-op attempts that started and ended within the turn: nothing to spawn.
    completed_inline: HashSet<AttemptKey>,
    /// Idempotency keys admitted in this turn (not yet readable from the store): the position
    /// of their job in `jobs`.
    keys: HashMap<String, usize>,
}

impl Turn {
    fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.writes.is_empty() && self.actions.is_empty() && self.replies.is_empty()
    }
}

/// Hands memory freed after a burst (recovery's pages, a turn of large batches) back to the
/// system; glibc keeps it otherwise, and the resident size stays at the burst's peak.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Inputs larger than this (as JSON, about) are not kept in memory while their job waits;
/// they are read from the store when a stage starts. Smaller ones stay, so the common case
/// costs no read.
const INPUT_KEPT_BYTES: usize = 64 * 1024;

/// A turn takes at most this many ready inputs before it decides...
const TURN_INPUTS: usize = 1_024;
/// ...and decides at most this many actions; what is left goes to the next turn, so API
/// replies and timers are never held up by a long backlog.
const TURN_ACTIONS: usize = 2_048;

pub struct Runtime<S: Store> {
    config: Arc<Config>,
    /// What the API reads; replaced together with `config` on reload.
    shared: SharedConfig,
    store: S,
    state: State,
    clock: Clock,
    registry: ChildRegistry,
    config_hash: String,
    /// The pipeline file's text, shared by every job admitted under it.
    config_text: Arc<str>,
    /// The arrival number of the next admitted job.
    next_seq: u64,
    /// The turn being gathered.
    turn: Turn,
    /// Events to apply in the next turn (inputs gathered, or the rest of a turn cut short).
    pending: VecDeque<Event>,
    /// Events were applied since the last scheduling pass (a full turn can stop between).
    schedule_owed: bool,
    /// Test hook: abort the process right after this many more commits.
    abort_after_commit: Option<u64>,
    engine_marker: String,
    jobs: HashMap<JobId, ActiveJob>,
    /// Jobs holding a large input in memory for the current turn only; dropped after it acts.
    inputs_held: Vec<JobId>,
    processes: HashMap<AttemptKey, RunningProcess>,
    exits: HashMap<AttemptKey, ExitDetails>,
    /// Unfinished jobs per pipeline name; its keys are the names jobs share.
    active_per_pipeline: HashMap<Arc<str>, u32>,
    pools: BTreeMap<String, pools::Pool>,
    /// Worker-stage attempts in flight: which pool instance runs each.
    worker_tasks: HashMap<AttemptKey, (String, usize)>,
    watchdog: watchdog::Watchdog,
    metrics: metrics::Metrics,
    /// The dashboard's live feed and histories (read by the API through `EngineHandle`).
    journal: Journal,
    journal_state: journal::JournalState,
    /// Holds back `progress` events so each attempt sends at most 4 a second.
    progress_feed: progress::FeedThrottle,
    internal_tx: mpsc::UnboundedSender<Internal>,
    internal_rx: mpsc::UnboundedReceiver<Internal>,
    commands: mpsc::Receiver<Command>,
    /// Where decisions are recorded: this engine's store, or a queue shared with other agents.
    ledger: ledger::Ledger,
    /// The API's address, as agents advertise it.
    api_address: String,
    /// Set once start-up (sweep, recovery) is done; read by `/healthz`.
    ready: Arc<std::sync::atomic::AtomicBool>,
    /// A turn held because the store could not be written (`degraded.rs`).
    stall: Option<degraded::Stall>,
    degraded: degraded::Degraded,
}

pub fn job_id_of(id: &str) -> Option<JobId> {
    uuid::Uuid::parse_str(id).ok().map(|u| JobId(u.as_u128()))
}

impl<S: Store> Runtime<S> {
    /// Builds the loop and the handle the API talks to it through.
    pub fn new(shared: SharedConfig, store: S, registry: ChildRegistry) -> (Runtime<S>, EngineHandle) {
        let config = shared.get();
        let (cmd_tx, commands) = mpsc::channel(1024);
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        let data_dir = std::fs::canonicalize(&config.data_dir).unwrap_or_else(|_| config.data_dir.clone());
        let journal = Journal::default();
        let runtime = Runtime {
            state: State::new(config.capacity.clone(), config.scheduler.clone()),
            config_hash: crate::store::content_hash(&config.source),
            config_text: Arc::from(config.source.as_str()),
            next_seq: 1,
            turn: Turn::default(),
            pending: VecDeque::new(),
            schedule_owed: false,
            abort_after_commit: std::env::var("GPUFLOW_TEST_ABORT_AFTER_COMMIT")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|n| *n > 0),
            engine_marker: data_dir.display().to_string(),
            config: config.clone(),
            shared,
            store,
            clock: Clock::start(),
            registry,
            jobs: HashMap::new(),
            inputs_held: Vec::new(),
            processes: HashMap::new(),
            exits: HashMap::new(),
            active_per_pipeline: HashMap::new(),
            pools: BTreeMap::new(),
            worker_tasks: HashMap::new(),
            watchdog: watchdog::Watchdog::default(),
            metrics: metrics::Metrics::default(),
            journal: journal.clone(),
            journal_state: journal::JournalState::default(),
            progress_feed: progress::FeedThrottle::default(),
            internal_tx,
            internal_rx,
            commands,
            ledger: ledger::Ledger::Local,
            api_address: String::new(),
            ready: Arc::default(),
            stall: None,
            degraded: degraded::Degraded::default(),
        };
        let ready = runtime.ready.clone();
        let degraded = runtime.degraded.clone();
        (runtime, EngineHandle::new(cmd_tx, journal, ready, degraded))
    }

    /// The address this engine's API listens on (agents advertise it in `/v1/agents`).
    pub fn with_api_address(mut self, address: String) -> Self {
        self.api_address = address;
        self
    }

    /// Recovers, then runs until `shutdown` resolves; then stops every attempt.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<(), RuntimeError> {
        self.sweep().await;
        let closed = self.store.close_open_findings(self.clock.now_ms() as i64).await?;
        if closed > 0 {
            tracing::info!(closed, "closed findings left open by the previous run; they are re-checked now");
        }
        self.start_pools();
        self.open_ledger().await?;
        self.start_gpu_sampler();
        // Recovery's events make the first turn; it is committed before anything is started.
        let r = self.run_turn().await;
        self.tolerate(r)?;
        self.ready.store(true, std::sync::atomic::Ordering::Release);
        tokio::pin!(shutdown);
        let ledger_wake = self.ledger.wake();
        let ticks = self.ledger.tick_every().is_some();
        let mut ledger_tick = tokio::time::interval(self.ledger.tick_every().unwrap_or(Duration::from_secs(3600)));
        ledger_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut diagnosis = tokio::time::interval(Duration::from_millis(self.config.diagnosis.sample_interval_ms));
        diagnosis.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Pool watchdog: hangs, startup timeouts and restarts are checked this often.
        let mut watchdog = tokio::time::interval(Duration::from_millis(200));
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // A turn: await one input (none when a cut-short turn left events), drain what else
            // is ready, decide it all, commit once, then act.
            // Batches that became due in the last turn go out before the loop waits again.
            self.flush_pools();
            // While a turn waits for the store nothing is decided: the only timer is its retry.
            let wake = match self.stall_retry_at() {
                Some(retry) => Some(retry),
                None => self.state.next_wakeup().map(|t| self.clock.instant_at(t)),
            };
            let batch_wake = self.next_batch_wakeup().map(|t| self.clock.instant_at(t));
            let progress_due = self.progress_feed.next_due().map(|t| self.clock.instant_at(t));
            let backlog = !self.is_stalled() && (!self.pending.is_empty() || self.schedule_owed);
            // Not `biased`: with internal events first, a steady stream of child exits starved
            // API commands and timers until the queue drained.
            let r = tokio::select! {
                _ = &mut shutdown => break,
                _ = std::future::ready(()), if backlog => Ok(()),
                Some(msg) = self.internal_rx.recv() => self.on_internal(msg).await,
                Some(cmd) = self.commands.recv() => self.on_command(cmd).await,
                _ = sleep_until(wake) => {
                    if !self.is_stalled() {
                        self.step(Event::Tick);
                    }
                    Ok(())
                }
                // A forming batch's oldest task has waited `max_wait`: flushed at the top.
                _ = sleep_until(batch_wake) => Ok(()),
                _ = sleep_until(progress_due) => { self.flush_progress(); Ok(()) }
                _ = watchdog.tick(), if !self.pools.is_empty() => self.watch_pools().await,
                _ = diagnosis.tick() => self.diagnose().await,
                _ = notified(&ledger_wake) => { self.ledger_woken().await; Ok(()) }
                _ = ledger_tick.tick(), if ticks => self.ledger_tick().await,
            };
            self.tolerate(r)?;
            let r = self.drain_ready().await;
            self.tolerate(r)?;
            let r = self.run_turn().await;
            self.tolerate(r)?;
            self.journal_observe();
        }
        if let Some(stall) = self.stall.take() {
            // Never written: its callers learn so; a restart re-runs what the store holds.
            let e = RuntimeError::Store(StoreError::Unwritable(
                "the engine stopped before the store could be written".into(),
            ));
            self.abandon_turn(stall.turn, &e);
        }
        self.stop_all().await;
        self.close_ledger().await;
        Ok(())
    }

    /// Errors the ledger rides out (see `Ledger::rides_out`) are logged; others stop the loop.
    fn tolerate(&self, result: Result<(), RuntimeError>) -> Result<(), RuntimeError> {
        match result {
            Err(e) if self.ledger.rides_out(&e) => {
                tracing::warn!("database unavailable, continuing: {e}");
                Ok(())
            }
            Err(e) if self.is_unwritable(&e) => {
                tracing::warn!("store unwritable, continuing: {e}");
                Ok(())
            }
            other => other,
        }
    }

    /// Queues an event for the current turn. Handlers only push; `run_turn` decides.
    fn step(&mut self, event: Event) {
        self.pending.push_back(event);
    }

    /// Takes the inputs that are ready now, alternating between API commands and internal
    /// messages so neither starves the other, up to `TURN_INPUTS`.
    async fn drain_ready(&mut self) -> Result<(), RuntimeError> {
        for _ in 0..TURN_INPUTS {
            let mut took = false;
            if let Ok(cmd) = self.commands.try_recv() {
                let r = self.on_command(cmd).await;
                self.tolerate(r)?;
                took = true;
            }
            if let Ok(msg) = self.internal_rx.try_recv() {
                let r = self.on_internal(msg).await;
                self.tolerate(r)?;
                took = true;
            }
            if !took {
                break;
            }
        }
        Ok(())
    }

    /// One turn: apply the pending events to the core, commit every write they imply in one
    /// transaction, and only then act and reply.
    async fn run_turn(&mut self) -> Result<(), RuntimeError> {
        if self.is_stalled() {
            return self.retry_stalled().await;
        }
        self.decide();
        if self.turn.is_empty() {
            return Ok(());
        }
        let turn = std::mem::take(&mut self.turn);
        match self.commit(&turn).await {
            Ok(()) => {
                self.act_after_commit(turn).await;
                Ok(())
            }
            Err(e) if self.is_unwritable(&e) => {
                self.stall(turn, &e);
                Ok(())
            }
            Err(e) => {
                self.abandon_turn(turn, &e);
                Err(e)
            }
        }
    }

    /// Records everything a turn decided (`record`: one transaction, or an agent's fenced
    /// writes).
    async fn commit(&mut self, turn: &Turn) -> Result<(), RuntimeError> {
        self.record(turn).await?;
        if let Some(after) = self.abort_after_commit.as_mut() {
            // Test hook (GPUFLOW_TEST_ABORT_AFTER_COMMIT=N): die like `kill -9` right after
            // the Nth commit, before any of its effects.
            *after -= 1;
            if *after == 0 {
                std::process::abort();
            }
        }
        Ok(())
    }

    /// A turn that could not be committed: no effect happens and callers get the reason.
    /// The loop then stops (a store failing other than for its disk is fatal, see
    /// `degraded.rs`); a restart recovers what was recorded.
    fn abandon_turn(&mut self, turn: Turn, error: &RuntimeError) {
        let reason = format!("the engine could not record this: {error}");
        for reply in turn.replies {
            reply(&self.state, Err(&reason));
        }
    }

    /// A committed turn's effects: replies, the live feed, then spawns, signals and tasks.
    /// Acts on a committed turn, with the inputs its starts need read back from the store.
    async fn act_after_commit(&mut self, turn: Turn) {
        self.load_inputs(&turn.actions).await;
        self.act(turn);
        self.shed_inputs();
    }

    /// Reads the stored inputs of the jobs whose stages this turn starts and whose input is
    /// not in memory, in one query. A failed read leaves them absent: those starts fail
    /// retryably (`start_attempt`).
    async fn load_inputs(&mut self, actions: &[Action]) {
        let mut missing: Vec<JobId> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Start { job, .. } => Some(*job),
                _ => None,
            })
            .filter(|job| self.jobs.get(job).is_some_and(|a| a.input.is_none()))
            .collect();
        if missing.is_empty() {
            return;
        }
        missing.sort_unstable();
        missing.dedup();
        let ids: Vec<String> = missing.iter().map(|j| self.jobs[j].id()).collect();
        match self.store.job_inputs(&ids).await {
            Ok(inputs) => {
                let by_id: HashMap<String, Value> = inputs.into_iter().collect();
                for (job, id) in missing.into_iter().zip(ids) {
                    if let (Some(active), Some(input)) = (self.jobs.get_mut(&job), by_id.get(&id)) {
                        active.input = Some(input.clone());
                        self.inputs_held.push(job);
                    }
                }
            }
            Err(e) => tracing::warn!(jobs = ids.len(), "could not read job inputs from the store: {e}"),
        }
    }

    /// Drops the large inputs this turn needed: their jobs go back to holding none.
    fn shed_inputs(&mut self) {
        for job in std::mem::take(&mut self.inputs_held) {
            if let Some(active) = self.jobs.get_mut(&job) {
                active.input = None;
            }
        }
    }

    fn act(&mut self, turn: Turn) {
        let burst = turn.jobs.len() >= TURN_INPUTS;
        for reply in turn.replies {
            reply(&self.state, Ok(()));
        }
        for event in turn.submitted {
            self.publish(event);
        }
        let now = self.clock.now_ms();
        self.journal_actions(&turn.actions, now);
        for action in turn.actions {
            self.perform(action, &turn.completed_inline);
        }
        self.journal_workers(now);
        // A burst (recovery, a large batch) leaves big buffers behind; do not keep them.
        if self.pending.is_empty() && self.pending.capacity() > 4 * TURN_INPUTS {
            self.pending.shrink_to(TURN_INPUTS);
        }
        if burst {
            release_freed_memory();
        }
    }

    /// Applies pending events and scheduling passes until nothing more follows or the turn is
    /// full. A built-in no-op stage ends within the turn that starts it.
    fn decide(&mut self) {
        loop {
            let now = self.clock.now_ms();
            while let Some(event) = self.pending.pop_front() {
                match self.state.handle(event, now) {
                    Ok(actions) => self.take(actions, now),
                    Err(e) => tracing::error!("scheduler refused an event: {e}"),
                }
                self.schedule_owed = true;
                if self.turn.actions.len() >= TURN_ACTIONS {
                    return;
                }
            }
            if !std::mem::take(&mut self.schedule_owed) {
                return;
            }
            let started = self.state.schedule_pass(now);
            if started.is_empty() {
                return;
            }
            self.take(started, now);
            if self.pending.is_empty() || self.turn.actions.len() >= TURN_ACTIONS {
                return;
            }
        }
    }

    /// Adds decided actions to the turn: their writes, the bookkeeping later decisions of the
    /// same turn read (outputs), and the actions to perform after the commit.
    fn take(&mut self, actions: Vec<Action>, now: u64) {
        for action in actions {
            if self.ledger.keeps_rows()
                && let Some(write) = self.write_for(&action, now)
            {
                self.turn.writes.push(write);
            }
            match &action {
                Action::AttemptEnded { job, stage, attempt, result: AttemptResult::Succeeded, .. } => {
                    let output = self.exits.get(&(*job, *stage, *attempt)).and_then(|d| d.output.clone());
                    if let Some(active) = self.jobs.get_mut(job) {
                        active.set_output(*stage, output);
                    }
                }
                Action::Start { job, stage, attempt, .. } if self.is_noop(*job, *stage) => {
                    let (job, stage, attempt) = (*job, *stage, *attempt);
                    self.turn.completed_inline.insert((job, stage, attempt));
                    self.exits.insert((job, stage, attempt), ExitDetails { exit_code: Some(0), ..Default::default() });
                    self.pending.push_back(Event::AttemptExited { job, stage, attempt, outcome: Outcome::Succeeded });
                }
                _ => {}
            }
            self.turn.actions.push(action);
        }
    }

    /// A job's directory (computed, not kept per job: 100,000 queued jobs would hold 100,000
    /// paths).
    fn job_dir(&self, id: &str) -> PathBuf {
        let dir = self.config.data_dir.join("jobs").join(id);
        std::path::absolute(&dir).unwrap_or(dir)
    }

    /// `command: [gpuflow:noop]`: succeeds at once, with no process and no file, while every
    /// durable transition still happens, so benchmarks measure the scheduler and the store.
    fn is_noop(&self, job: JobId, stage: StageIndex) -> bool {
        self.jobs.get(&job).is_some_and(|active| {
            matches!(&active.pipeline.stages[stage], StageExec::Command { command, .. }
                if command.len() == 1 && command[0].as_literal() == Some(NOOP_COMMAND))
        })
    }

    fn write_for(&self, action: &Action, now: u64) -> Option<Write> {
        let at = now as i64;
        let job_id = |job: &JobId| self.jobs.get(job).map(|j| j.id());
        Some(match action {
            Action::Start { job, stage, attempt, grant, .. } => Write::AttemptStarted {
                job: job_id(job)?,
                stage: *stage,
                attempt: *attempt,
                grant: serde_json::to_string(&LeaseRecord::from(grant)).expect("serializable"),
                at,
            },
            Action::Kill { .. } => return None,
            Action::AttemptEnded { job, stage, attempt, result, next, error, counters, readied, .. } => {
                let details = self.exits.get(&(*job, *stage, *attempt));
                let stage_state = StageState::after(next, now);
                let not_before = match next {
                    StageNext::Retry { at } if stage_state == StageState::Backoff => Some(*at as i64),
                    _ => None,
                };
                Write::AttemptEnded {
                    job: job_id(job)?,
                    stage: *stage,
                    attempt: *attempt,
                    result: result.as_str(),
                    stage_state,
                    readied: readied.clone(),
                    not_before,
                    error: error.clone(),
                    output: if *result == AttemptResult::Succeeded {
                        details.and_then(|d| d.output.clone())
                    } else {
                        None
                    },
                    exit_code: details.and_then(|d| d.exit_code),
                    signal: details.and_then(|d| d.signal),
                    batch_size: details.and_then(|d| d.batch_size),
                    failures: counters.failures,
                    interruptions: counters.interruptions,
                    at,
                }
            }
            Action::StageCancelled { job, stage } => Write::StageCancelled { job: job_id(job)?, stage: *stage, at },
            Action::JobFinished { job, state, error } => {
                let active = self.jobs.get(job)?;
                let output = (*state == gpuflow_core::JobState::Succeeded).then(|| self.job_output(active)).flatten();
                Write::JobFinished { job: active.id(), state: *state, error: error.clone(), output, at }
            }
        })
    }

    /// The job's output: its one final stage's output, or an object of all final stages'.
    fn job_output(&self, active: &ActiveJob) -> Option<Value> {
        let sinks = active.pipeline.core.sinks();
        if let [only] = sinks.as_slice() {
            return active.output(*only).cloned();
        }
        let map: serde_json::Map<String, Value> = sinks
            .iter()
            .map(|i| (active.pipeline.core.stages[*i].name.clone(), active.output(*i).cloned().unwrap_or(Value::Null)))
            .collect();
        Some(Value::Object(map))
    }

    /// Acts on one committed action.
    fn perform(&mut self, action: Action, completed_inline: &HashSet<AttemptKey>) {
        match action {
            Action::Start { job, stage, attempt, grant, queued_ms, .. } => {
                self.note_start(job);
                if let Some(active) = self.jobs.get(&job) {
                    self.metrics.started(&active.pipeline_name, &active.pipeline.core.stages[stage].name, queued_ms);
                }
                if completed_inline.contains(&(job, stage, attempt)) {
                    return;
                }
                if self.jobs.get(&job).is_some_and(|a| a.input.is_none()) {
                    // Its stored input could not be read (`load_inputs`): a store fault, not
                    // the job's, so the attempt may be retried.
                    let error = "the job's input could not be read from the store".to_string();
                    let outcome = Outcome::Failed { error, retryable: true };
                    self.pending.push_back(Event::AttemptExited { job, stage, attempt, outcome });
                } else if let Err(error) = self.start_attempt(job, stage, attempt, &grant, queued_ms) {
                    let outcome = Outcome::Failed { error, retryable: false };
                    self.pending.push_back(Event::AttemptExited { job, stage, attempt, outcome });
                }
            }
            Action::Kill { job, stage, attempt, reason } if self.pool_holds((job, stage, attempt)) => {
                tracing::info!(job = %self.jobs[&job].id(), stage, attempt, ?reason, "stopping worker task");
                self.stop_worker_task((job, stage, attempt));
            }
            Action::Kill { job, stage, attempt, reason } => {
                if let Some(p) = self.processes.get(&(job, stage, attempt)) {
                    tracing::info!(job = %self.jobs[&job].id(), stage, attempt, ?reason, pid = p.pid, "stopping attempt");
                    let _ = p.stop.send(StopRequest);
                }
            }
            Action::AttemptEnded { job, stage, attempt, result, next, ran_ms, .. } => {
                let exit = self.exits.remove(&(job, stage, attempt));
                if let Some(active) = self.jobs.get(&job) {
                    let spec = &active.pipeline.core.stages[stage];
                    self.metrics.ended(&active.pipeline_name, &spec.name, &spec.needs, result, next, ran_ms);
                    // Successful attempts teach the queue how long the stage takes.
                    // A declared `expected` wins over the measured mean, so only undeclared
                    // stages are measured.
                    if result == AttemptResult::Succeeded && spec.expected_ms.is_none() {
                        let ran = exit.and_then(|e| e.ran_ms).unwrap_or(ran_ms);
                        self.state.record_duration(&active.pipeline_name, &spec.name, ran);
                    }
                }
                self.progress_ended((job, stage, attempt));
            }
            Action::StageCancelled { .. } => {}
            Action::JobFinished { job, state, .. } => {
                if let Some(active) = self.jobs.remove(&job) {
                    tracing::debug!(job = %active.id(), pipeline = %active.pipeline_name, state = state.as_str(), "job finished");
                    self.metrics.finished(&active.pipeline_name, state.as_str());
                    if let Some(n) = self.active_per_pipeline.get_mut(&*active.pipeline_name) {
                        *n = n.saturating_sub(1);
                    }
                }
            }
        }
    }

    /// Renders the command and spawns the attempt. An error here fails the attempt for good:
    /// it would fail the same way again.
    fn start_attempt(
        &mut self,
        job: JobId,
        stage: StageIndex,
        attempt: u32,
        grant: &Grant,
        queued_ms: u64,
    ) -> Result<(), String> {
        if let Some(active) = self.jobs.get(&job) {
            active.pipeline.recheck_paths(active.input(), &self.config.allowed_roots)?;
        }
        if let Some(pool) = self.pool_of(job, stage) {
            return self.dispatch_to_pool(&pool, (job, stage, attempt), queued_ms);
        }
        let active = self.jobs.get(&job).ok_or("job is not active")?;
        let StageExec::Command { command, env: stage_env, workdir, .. } = &active.pipeline.stages[stage] else {
            return Err("not a command stage".into());
        };
        let name = &active.pipeline.core.stages[stage].name;
        let id = active.id();
        let job_dir = self.job_dir(&id);
        let dir = job_dir.display().to_string();
        let ctx = RenderContext { input: active.input(), outputs: &active.outputs, job_dir: &dir, job_id: &id };
        let argv = command
            .iter()
            .map(|t| t.render(&ctx))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("cannot build the command: {e}"))?;
        // Logs and outputs live in the job's `.gpuflow` directory. The attempt's own task
        // creates it (directory creation is a measurable cost that must not stall this loop).
        let internal = job_dir.join(".gpuflow");
        let cuda: Vec<String> = grant.devices().iter().map(|d| self.config.gpus[*d as usize].cuda_id(*d)).collect();
        let output_path = internal.join(format!("{name}.{attempt}.output.json"));
        let progress_path = internal.join(format!("{name}.{attempt}.progress"));
        let mut env: Vec<(String, String)> = stage_env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        env.extend([
            ("GPUFLOW_JOB_ID".to_string(), id.clone()),
            ("GPUFLOW_JOB_DIR".to_string(), dir.clone()),
            ("GPUFLOW_STAGE".to_string(), name.clone()),
            ("GPUFLOW_ATTEMPT".to_string(), attempt.to_string()),
            ("GPUFLOW_OUTPUT".to_string(), output_path.display().to_string()),
            ("GPUFLOW_PROGRESS".to_string(), progress_path.display().to_string()),
            // Empty for a stage granted no GPU: it must not see any device.
            ("CUDA_VISIBLE_DEVICES".to_string(), cuda.join(",")),
            (supervisor::ENGINE_MARKER.to_string(), self.engine_marker.clone()),
        ]);
        if let Some((_, bytes)) = grant.gpu_memory {
            env.push(("GPUFLOW_GPU_MEMORY_BYTES".to_string(), bytes.to_string()));
        }
        let spec = AttemptSpec {
            argv,
            env,
            cwd: workdir.clone(),
            stdout_log: internal.join(format!("{name}.{attempt}.stdout.log")),
            stderr_log: internal.join(format!("{name}.{attempt}.stderr.log")),
            output_path,
            marker: format!("{id}/{name}/{attempt}"),
            log_max: self.config.limits.log_max,
            output_max: self.config.limits.output_max,
            kill_grace_ms: self.config.limits.kill_grace_ms,
        };
        tracing::debug!(job = %id, stage = %name, attempt, devices = %cuda.join(","), "starting attempt");
        let key = (job, stage, attempt);
        let (stop_tx, stop_rx) = mpsc::unbounded_channel();
        let (pid_tx, pid_rx) = oneshot::channel();
        let tx = self.internal_tx.clone();
        let registry = self.registry.clone();
        tokio::spawn(async move {
            let forward = tx.clone();
            tokio::spawn(async move {
                if let Ok(pid) = pid_rx.await {
                    let _ = forward.send(Internal::Spawned { key, pid });
                }
            });
            // The stage's progress file is read here, off the loop, while it runs and once
            // more after it exited, so its last line arrives before its exit.
            let mut tail = supervisor::ProgressTail::start(progress_path).await;
            let progress = |p: Option<supervisor::Progress>| {
                if let Some(progress) = p {
                    let _ = tx.send(Internal::Progress { key, progress });
                }
            };
            let attempt = supervisor::run_attempt(registry, spec, pid_tx, stop_rx);
            tokio::pin!(attempt);
            let mut every = tokio::time::interval(supervisor::PROGRESS_POLL);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let report = loop {
                tokio::select! {
                    report = &mut attempt => break report,
                    _ = every.tick() => progress(tail.poll().await),
                }
            };
            progress(tail.poll().await);
            let _ = tx.send(Internal::Exited { key, report });
        });
        self.processes.insert(key, RunningProcess { stop: stop_tx, pid: None });
        Ok(())
    }

    async fn on_internal(&mut self, msg: Internal) -> Result<(), RuntimeError> {
        match msg {
            Internal::Spawned { key, pid } => {
                if let Some(p) = self.processes.get_mut(&key) {
                    p.pid = Some(pid);
                }
                Ok(())
            }
            Internal::Worker { pool, index, generation, event } => {
                self.on_worker_event(pool, index, generation, event).await
            }
            Internal::GpuSamples { samples, at } => {
                self.on_gpu_samples(samples, at);
                Ok(())
            }
            Internal::Progress { key, progress } => {
                // Sent before the attempt's exit; one that ended already is not running.
                if self.processes.contains_key(&key) {
                    self.progress_reported(key, progress);
                }
                Ok(())
            }
            Internal::Exited { key, report } => {
                self.processes.remove(&key);
                let (outcome, details) = outcome_of(report);
                self.exits.insert(key, details);
                let (job, stage, attempt) = key;
                self.step(Event::AttemptExited { job, stage, attempt, outcome });
                Ok(())
            }
        }
    }

    /// Reads the devices every sampling interval, off the loop (NVML calls can block).
    fn start_gpu_sampler(&self) {
        if self.config.gpus.is_empty() {
            return;
        }
        let sampler = Arc::new(crate::gpu::Sampler::new(self.config.gpus.clone()));
        let tx = self.internal_tx.clone();
        let clock = self.clock;
        let every = Duration::from_millis(self.config.diagnosis.sample_interval_ms);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let s = sampler.clone();
                let Ok(samples) = tokio::task::spawn_blocking(move || crate::gpu::GpuSampler::sample(s.as_ref())).await
                else {
                    break;
                };
                if tx.send(Internal::GpuSamples { samples, at: clock.now_ms() }).is_err() {
                    break;
                }
            }
        });
    }

    /// Graceful stop: every attempt is stopped and waited for. Their attempts stay recorded as
    /// running, so the next start re-queues them as interrupted.
    async fn stop_all(&mut self) {
        for p in self.processes.values() {
            let _ = p.stop.send(StopRequest);
        }
        self.stop_pools();
        let grace = Duration::from_millis(self.config.limits.kill_grace_ms + 3_000);
        let deadline = tokio::time::Instant::now() + grace;
        while !self.processes.is_empty() || self.instances_running() > 0 {
            match tokio::time::timeout_at(deadline, self.internal_rx.recv()).await {
                Ok(Some(Internal::Exited { key, .. })) => {
                    self.processes.remove(&key);
                }
                Ok(Some(Internal::Worker { pool, index, generation, event: InstanceEvent::Exited { .. } })) => {
                    self.instance_gone(&pool, index, generation);
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
    }
}

async fn notified(wake: &Option<Arc<tokio::sync::Notify>>) {
    match wake {
        Some(w) => w.notified().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig).map(|s| s.as_str().to_string()).unwrap_or_else(|_| format!("signal {sig}"))
}

/// Maps how a process ended to the core's outcome and the details kept for the store.
fn outcome_of(report: AttemptReport) -> (Outcome, ExitDetails) {
    let stderr = if report.stderr_tail.is_empty() {
        String::new()
    } else {
        format!("; stderr ends with: {}", last_chars(&report.stderr_tail, 500))
    };
    match report.status {
        ExitStatus::Code(0) => match report.output {
            Ok(output) => {
                (Outcome::Succeeded, ExitDetails { exit_code: Some(0), signal: None, output, ..Default::default() })
            }
            Err(e) => (
                Outcome::Failed { error: e, retryable: false },
                ExitDetails { exit_code: Some(0), ..Default::default() },
            ),
        },
        ExitStatus::Code(code) => (
            Outcome::Failed { error: format!("exited with status {code}{stderr}"), retryable: true },
            ExitDetails { exit_code: Some(code), ..Default::default() },
        ),
        ExitStatus::Signal(sig) => (
            Outcome::Failed { error: format!("killed by {}{stderr}", signal_name(sig)), retryable: true },
            ExitDetails { signal: Some(sig), ..Default::default() },
        ),
        ExitStatus::SpawnFailed(e) => (Outcome::Failed { error: e, retryable: false }, ExitDetails::default()),
    }
}

fn last_chars(s: &str, n: usize) -> &str {
    let start = s.char_indices().rev().nth(n.saturating_sub(1)).map(|(i, _)| i).unwrap_or(0);
    &s[start..]
}

/// Human words for a kill reason, for logs and the API.
pub fn kill_reason_text(reason: KillReason) -> &'static str {
    match reason {
        KillReason::Timeout => "timeout",
        KillReason::Cancel => "cancel",
        KillReason::JobFailed => "job failed",
        KillReason::Policy => "policy",
    }
}

#[cfg(test)]
mod tests;
