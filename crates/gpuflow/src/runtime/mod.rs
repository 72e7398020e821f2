//! The one loop that owns the mutable state. It turns API commands, child exits and timers
//! into core events, commits what each step changed, and only then acts (spawn, signal).

mod clock;
mod cluster;
mod commands;
mod journal;
mod metrics;
mod pools;
mod recover;
mod reload;
mod watchdog;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gpuflow_core::{Action, AttemptResult, Event, Grant, JobId, KillReason, Outcome, StageIndex, StageNext, State};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::config::template::RenderContext;
use crate::config::{Config, PipelineDef, SharedConfig, StageExec};
use crate::store::{Store, StoreError, Write};
use crate::supervisor::{self, AttemptReport, AttemptSpec, ChildRegistry, ExitStatus, InstanceEvent, StopRequest};

pub use clock::Clock;
pub use commands::{
    Command, DeviceReading, DiagnosisSnapshot, EngineError, EngineHandle, LeaseView, MAX_BATCH, ResourcesSnapshot,
    SubmitRequest, Submitted, WaitingView,
};
pub use journal::{EngineEvent, Journal, LeaseInterval, PoolTransition, Published};
pub use pools::{InstanceView, PoolView};
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
    id: String,
    pipeline: Arc<PipelineDef>,
    pipeline_name: String,
    input: Value,
    outputs: Vec<Option<Value>>,
    dir: PathBuf,
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
}

enum Internal {
    Spawned { key: AttemptKey, pid: u32 },
    Exited { key: AttemptKey, report: AttemptReport },
    Worker { pool: String, index: usize, generation: u64, event: InstanceEvent },
    GpuSamples { samples: Vec<Option<crate::gpu::DeviceSample>>, at: u64 },
}

pub struct Runtime<S: Store> {
    config: Arc<Config>,
    /// What the API reads; replaced together with `config` on reload.
    shared: SharedConfig,
    store: S,
    state: State,
    clock: Clock,
    registry: ChildRegistry,
    config_hash: String,
    engine_marker: String,
    jobs: HashMap<JobId, ActiveJob>,
    processes: HashMap<AttemptKey, RunningProcess>,
    exits: HashMap<AttemptKey, ExitDetails>,
    active_per_pipeline: HashMap<String, u32>,
    pools: BTreeMap<String, pools::Pool>,
    /// Worker-stage attempts in flight: which pool instance runs each.
    worker_tasks: HashMap<AttemptKey, (String, usize)>,
    watchdog: watchdog::Watchdog,
    metrics: metrics::Metrics,
    /// The dashboard's live feed and histories (read by the API through `EngineHandle`).
    journal: Journal,
    journal_state: journal::JournalState,
    internal_tx: mpsc::UnboundedSender<Internal>,
    internal_rx: mpsc::UnboundedReceiver<Internal>,
    commands: mpsc::Receiver<Command>,
    /// Set when this engine is one agent of a shared PostgreSQL queue.
    cluster: Option<cluster::Agent>,
    /// The API's address, as agents advertise it.
    api_address: String,
    /// Set once start-up (sweep, recovery) is done; read by `/healthz`.
    ready: Arc<std::sync::atomic::AtomicBool>,
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
            engine_marker: data_dir.display().to_string(),
            config: config.clone(),
            shared,
            store,
            clock: Clock::start(),
            registry,
            jobs: HashMap::new(),
            processes: HashMap::new(),
            exits: HashMap::new(),
            active_per_pipeline: HashMap::new(),
            pools: BTreeMap::new(),
            worker_tasks: HashMap::new(),
            watchdog: watchdog::Watchdog::default(),
            metrics: metrics::Metrics::default(),
            journal: journal.clone(),
            journal_state: journal::JournalState::default(),
            internal_tx,
            internal_rx,
            commands,
            cluster: None,
            api_address: String::new(),
            ready: Arc::default(),
        };
        let ready = runtime.ready.clone();
        (runtime, EngineHandle::new(cmd_tx, journal, ready))
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
        if self.cluster.is_some() {
            self.join_cluster(self.api_address.clone()).await?;
        } else {
            self.recover().await?;
        }
        self.start_gpu_sampler();
        self.ready.store(true, std::sync::atomic::Ordering::Release);
        tokio::pin!(shutdown);
        let cluster_wake = self.cluster.as_ref().map(|a| a.wake());
        let mut cluster_tick =
            tokio::time::interval(self.cluster.as_ref().map(|a| a.tick_every()).unwrap_or(Duration::from_secs(3600)));
        cluster_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut diagnosis = tokio::time::interval(Duration::from_millis(self.config.diagnosis.sample_interval_ms));
        diagnosis.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Pool watchdog: hangs, startup timeouts and restarts are checked this often.
        let mut watchdog = tokio::time::interval(Duration::from_millis(200));
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = self.state.next_wakeup().map(|t| self.clock.instant_at(t));
            // Not `biased`: with internal events first, a steady stream of child exits (each
            // step may start the next attempt) starved API commands and timers until the queue
            // drained: a cancel or GET /v1/resources waited out the whole backlog.
            tokio::select! {
                _ = &mut shutdown => break,
                Some(msg) = self.internal_rx.recv() => {
                    let r = self.on_internal(msg).await;
                    self.tolerate(r)?
                }
                Some(cmd) = self.commands.recv() => {
                    let r = self.on_command(cmd).await;
                    self.tolerate(r)?
                }
                _ = sleep_until(wake) => {
                    let r = self.step(Event::Tick).await;
                    self.tolerate(r)?
                }
                _ = watchdog.tick(), if !self.pools.is_empty() => {
                    let r = self.watch_pools().await;
                    self.tolerate(r)?
                }
                _ = diagnosis.tick() => {
                    let r = self.diagnose().await;
                    self.tolerate(r)?
                }
                _ = notified(&cluster_wake) => self.claim_work().await,
                _ = cluster_tick.tick(), if self.cluster.is_some() => {
                    let r = self.cluster_tick().await;
                    self.tolerate(r)?
                }
            }
            self.journal_observe();
        }
        self.stop_all().await;
        self.leave_cluster().await;
        Ok(())
    }

    /// An agent rides out a lost database connection: its job state lives in the database,
    /// and what it could not write is retried. The embedded store failing stays fatal.
    fn tolerate(&self, result: Result<(), RuntimeError>) -> Result<(), RuntimeError> {
        match result {
            Err(RuntimeError::Store(e)) if self.cluster.is_some() && e.is_transient() => {
                tracing::warn!("database unavailable, continuing: {e}");
                Ok(())
            }
            other => other,
        }
    }

    /// Applies one event and everything it leads to, committing each step before acting.
    async fn step(&mut self, event: Event) -> Result<(), RuntimeError> {
        let mut pending = VecDeque::from([event]);
        while let Some(event) = pending.pop_front() {
            let now = self.clock.now_ms();
            let actions = match self.state.apply(event, now) {
                Ok(actions) => actions,
                Err(e) => {
                    tracing::error!("scheduler refused an event: {e}");
                    continue;
                }
            };
            if self.cluster.is_some() {
                self.cluster_writes(&actions).await?;
            } else {
                let writes: Vec<Write> = actions.iter().filter_map(|a| self.write_for(a, now)).collect();
                self.store.write(&writes).await?;
            }
            self.journal_actions(&actions, now);
            for action in actions {
                self.perform(action, &mut pending);
            }
            self.journal_workers(now);
        }
        Ok(())
    }

    fn write_for(&self, action: &Action, now: u64) -> Option<Write> {
        let at = now as i64;
        let job_id = |job: &JobId| self.jobs.get(job).map(|j| j.id.clone());
        Some(match action {
            Action::Start { job, stage, attempt, grant, .. } => Write::AttemptStarted {
                job: job_id(job)?,
                stage: *stage,
                attempt: *attempt,
                grant: serde_json::to_value(LeaseRecord::from(grant)).expect("serializable"),
                at,
            },
            Action::Kill { .. } => return None,
            Action::AttemptEnded { job, stage, attempt, result, next, error, counters, .. } => {
                let details = self.exits.get(&(*job, *stage, *attempt));
                let (stage_state, not_before) = match next {
                    StageNext::Succeeded => ("succeeded", None),
                    StageNext::Retry { at } => ("backoff", Some(*at as i64)),
                    StageNext::Failed => ("failed", None),
                    StageNext::Cancelled => ("cancelled", None),
                };
                Write::AttemptEnded {
                    job: job_id(job)?,
                    stage: *stage,
                    attempt: *attempt,
                    result: result.as_str(),
                    stage_state,
                    not_before,
                    error: error.clone(),
                    output: if *result == AttemptResult::Succeeded {
                        details.and_then(|d| d.output.clone())
                    } else {
                        None
                    },
                    exit_code: details.and_then(|d| d.exit_code),
                    signal: details.and_then(|d| d.signal),
                    failures: counters.failures,
                    interruptions: counters.interruptions,
                    at,
                }
            }
            Action::StageCancelled { job, stage } => Write::StageCancelled { job: job_id(job)?, stage: *stage, at },
            Action::JobFinished { job, state, error } => {
                let active = self.jobs.get(job)?;
                let output =
                    (*state == gpuflow_core::JobState::Succeeded).then(|| self.job_output(job, active)).flatten();
                Write::JobFinished { job: active.id.clone(), state: state.as_str(), error: error.clone(), output, at }
            }
        })
    }

    /// The job's output: its one final stage's output, or an object of all final stages'.
    fn job_output(&self, job: &JobId, active: &ActiveJob) -> Option<Value> {
        let sinks = active.pipeline.core.sinks();
        let output_of = |i: usize| {
            if let Some(d) = self.exits.iter().find(|((j, s, _), _)| j == job && *s == i).map(|(_, d)| d) {
                return d.output.clone();
            }
            active.outputs[i].clone()
        };
        if let [only] = sinks.as_slice() {
            return output_of(*only);
        }
        let map: serde_json::Map<String, Value> = sinks
            .iter()
            .map(|i| (active.pipeline.core.stages[*i].name.clone(), output_of(*i).unwrap_or(Value::Null)))
            .collect();
        Some(Value::Object(map))
    }

    fn perform(&mut self, action: Action, pending: &mut VecDeque<Event>) {
        match action {
            Action::Start { job, stage, attempt, grant, queued_ms, .. } => {
                self.note_start(job);
                if let Some(active) = self.jobs.get(&job) {
                    self.metrics.started(&active.pipeline_name, &active.pipeline.core.stages[stage].name, queued_ms);
                }
                if let Err(error) = self.start_attempt(job, stage, attempt, &grant) {
                    pending.push_back(Event::AttemptExited {
                        job,
                        stage,
                        attempt,
                        outcome: Outcome::Failed { error, retryable: false },
                    });
                }
            }
            Action::Kill { job, stage, attempt, reason } if self.worker_tasks.contains_key(&(job, stage, attempt)) => {
                tracing::info!(job = %self.jobs[&job].id, stage, attempt, ?reason, "stopping worker task");
                self.stop_worker_task((job, stage, attempt));
            }
            Action::Kill { job, stage, attempt, reason } => {
                if let Some(p) = self.processes.get(&(job, stage, attempt)) {
                    tracing::info!(job = %self.jobs[&job].id, stage, attempt, ?reason, pid = p.pid, "stopping attempt");
                    let _ = p.stop.send(StopRequest);
                }
            }
            Action::AttemptEnded { job, stage, attempt, result, next, ran_ms, .. } => {
                if let Some(active) = self.jobs.get(&job) {
                    let spec = &active.pipeline.core.stages[stage];
                    self.metrics.ended(&active.pipeline_name, &spec.name, &spec.needs, result, next, ran_ms);
                }
                let details = self.exits.remove(&(job, stage, attempt));
                if result == AttemptResult::Succeeded
                    && let Some(active) = self.jobs.get_mut(&job)
                {
                    active.outputs[stage] = details.and_then(|d| d.output);
                }
            }
            Action::StageCancelled { .. } => {}
            Action::JobFinished { job, state, .. } => {
                if let Some(active) = self.jobs.remove(&job) {
                    tracing::info!(job = %active.id, pipeline = %active.pipeline_name, state = state.as_str(), "job finished");
                    self.metrics.finished(&active.pipeline_name, state.as_str());
                    if let Some(n) = self.active_per_pipeline.get_mut(&active.pipeline_name) {
                        *n = n.saturating_sub(1);
                    }
                }
            }
        }
    }

    /// Renders the command and spawns the attempt. An error here fails the attempt for good:
    /// it would fail the same way again.
    fn start_attempt(&mut self, job: JobId, stage: StageIndex, attempt: u32, grant: &Grant) -> Result<(), String> {
        if let Some(pool) = self.pool_of(job, stage) {
            return self.dispatch_to_pool(&pool, (job, stage, attempt));
        }
        let active = self.jobs.get(&job).ok_or("job is not active")?;
        let StageExec::Command { command, env: stage_env, workdir, .. } = &active.pipeline.stages[stage] else {
            return Err("not a command stage".into());
        };
        let name = &active.pipeline.core.stages[stage].name;
        let dir = active.dir.display().to_string();
        let ctx = RenderContext { input: &active.input, outputs: &active.outputs, job_dir: &dir, job_id: &active.id };
        let argv = command
            .iter()
            .map(|t| t.render(&ctx))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("cannot build the command: {e}"))?;
        if argv.len() == 1 && argv[0] == NOOP_COMMAND {
            // Succeeds at once, with no process and no file: every durable transition still
            // happens, so benchmarks can measure the scheduler and the store alone.
            let report = AttemptReport { status: ExitStatus::Code(0), output: Ok(None), stderr_tail: String::new() };
            let _ = self.internal_tx.send(Internal::Exited { key: (job, stage, attempt), report });
            return Ok(());
        }
        // Logs and outputs live in the job's `.gpuflow` directory. The attempt's own task
        // creates it (directory creation is a measurable cost that must not stall this loop).
        let internal = active.dir.join(".gpuflow");
        let cuda: Vec<String> = grant.devices().iter().map(|d| self.config.gpus[*d as usize].cuda_id(*d)).collect();
        let output_path = internal.join(format!("{name}.{attempt}.output.json"));
        let mut env: Vec<(String, String)> = stage_env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        env.extend([
            ("GPUFLOW_JOB_ID".to_string(), active.id.clone()),
            ("GPUFLOW_JOB_DIR".to_string(), dir.clone()),
            ("GPUFLOW_STAGE".to_string(), name.clone()),
            ("GPUFLOW_ATTEMPT".to_string(), attempt.to_string()),
            ("GPUFLOW_OUTPUT".to_string(), output_path.display().to_string()),
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
            marker: format!("{}/{name}/{attempt}", active.id),
            log_max: self.config.limits.log_max,
            output_max: self.config.limits.output_max,
            kill_grace_ms: self.config.limits.kill_grace_ms,
        };
        tracing::info!(job = %active.id, stage = %name, attempt, devices = %cuda.join(","), "starting attempt");
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
            let report = supervisor::run_attempt(registry, spec, pid_tx, stop_rx).await;
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
            Internal::Exited { key, report } => {
                self.processes.remove(&key);
                let (outcome, details) = outcome_of(report);
                self.exits.insert(key, details);
                let (job, stage, attempt) = key;
                self.step(Event::AttemptExited { job, stage, attempt, outcome }).await
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
            Ok(output) => (Outcome::Succeeded, ExitDetails { exit_code: Some(0), signal: None, output }),
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
