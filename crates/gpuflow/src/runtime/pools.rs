//! Worker pools: long-lived instances that load a model once and run one task at a time.
//!
//! The loop owns every instance's state. The scheduler sees a pool as the counter
//! `pool:NAME`, whose available units are the tasks its ready instances can hold: each one
//! its running task plus, if it announced the `prefetch` feature, up to the pool's `prefetch`
//! more sent ahead (they wait in its stdin pipe, so it does not idle while the engine runs the
//! turn that follows a result). A worker stage is granted only when an instance can take it.
//! An instance's own resources (e.g. GPU memory) are standing leases taken once at start-up.
//!
//! An instance holds its tasks in order; the head is the one it runs. Messages about a task
//! must name the head; hang detection watches the head only, from when it became the head.
//! A crash re-queues the tasks it held without spending retries (the running one once; a second
//! crash while running it fails it); a hang or a protocol error fails the running task. A
//! prefetched task that must stop is cancelled with a `cancel` message; the instance stays.

use std::collections::VecDeque;
use std::sync::Arc;

use gpuflow_core::{Event, Grant, Outcome};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::*;
use crate::config::{StageExec, WorkerDef, pool_counter};
use crate::supervisor::{InstanceEvent, InstanceSpec, InstanceStop, ToWorker};

/// The protocol version this engine speaks (see docs/worker-protocol.md).
pub const PROTOCOL_VERSION: u64 = 1;
/// The feature a worker announces in `ready` when it may be sent tasks ahead and honours
/// `cancel` for a task it has not started.
pub const FEATURE_PREFETCH: &str = "prefetch";
/// The feature a worker announces when it creates a task's `job_dir` itself, on first use: the
/// engine then makes no directory per task (a `mkdir` per task dominated short tasks).
pub const FEATURE_JOB_DIR_ON_DEMAND: &str = "job_dir_on_demand";
/// Consecutive failures after which a pool instance is reported as crash-looping.
const CRASH_LOOP: u32 = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstanceState {
    Starting,
    Idle,
    Busy,
    Stopping,
    /// Waiting to be started again, not before `at_ms`.
    Restarting {
        at_ms: u64,
    },
    /// Could not get its standing lease; it never runs.
    Failed,
    /// Removed by a reload that shrank the pool; its standing lease is returned.
    Retired,
}

impl InstanceState {
    pub fn as_str(&self, crash_looping: bool) -> &'static str {
        match self {
            InstanceState::Starting => "starting",
            InstanceState::Idle => "idle",
            InstanceState::Busy => "busy",
            InstanceState::Stopping => "stopping",
            InstanceState::Restarting { .. } if crash_looping => "failed",
            InstanceState::Restarting { .. } => "restarting",
            InstanceState::Failed => "failed",
            InstanceState::Retired => "retired",
        }
    }
}

/// Why the engine is stopping an instance; decides how its exit is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StopReason {
    Recycle,
    Shutdown,
    Hung,
    StartupTimeout,
    ProtocolError,
    /// The task it ran timed out or was cancelled.
    TaskStopped,
    /// The pool shrank.
    Retire,
}

/// A task sent to an instance.
struct Held {
    key: AttemptKey,
    id: String,
    /// Sent ahead, then cancelled with a `cancel` message: its attempt has ended. Kept in its
    /// place until the worker's answers pass it, so a late answer (it had already started the
    /// task when the `cancel` arrived) is dropped rather than taken for a protocol error.
    cancelled: bool,
}

pub(super) struct Instance {
    index: usize,
    device: Option<u32>,
    grant: Option<Grant>,
    generation: u64,
    state: InstanceState,
    pid: Option<u32>,
    stdin: Option<mpsc::UnboundedSender<ToWorker>>,
    stop: Option<mpsc::UnboundedSender<InstanceStop>>,
    since_ms: u64,
    last_beat_ms: u64,
    /// When its head task started running (a task sent ahead starts when the one before it
    /// ends): how long a task ran, for the queue's measured stage durations.
    head_since_ms: u64,
    /// The tasks sent to it, in the order it runs them; the first live one is the head.
    held: VecDeque<Held>,
    /// It announced the `prefetch` feature in `ready`.
    prefetch_ok: bool,
    /// It announced `job_dir_on_demand`: it creates a task's job directory when it uses it.
    makes_job_dir: bool,
    tasks_done: u32,
    consecutive_failures: u32,
    restarts: u32,
    last_error: Option<String>,
    info: Option<Value>,
    progress: Option<Value>,
    stop_reason: Option<StopReason>,
    /// A recycled instance that ignored `shutdown` has been sent SIGTERM.
    escalated: bool,
    /// The pool shrank past this instance: it leaves once its current task is done.
    retiring: bool,
}

impl Instance {
    /// A slot with no process yet, retired until given a lease.
    fn new(index: usize, device: Option<u32>, now: u64) -> Instance {
        Instance {
            index,
            device,
            grant: None,
            generation: 0,
            state: InstanceState::Retired,
            pid: None,
            stdin: None,
            stop: None,
            since_ms: now,
            last_beat_ms: now,
            head_since_ms: now,
            held: VecDeque::new(),
            prefetch_ok: false,
            makes_job_dir: false,
            tasks_done: 0,
            consecutive_failures: 0,
            restarts: 0,
            last_error: None,
            info: None,
            progress: None,
            stop_reason: None,
            escalated: false,
            retiring: false,
        }
    }

    /// Tasks it holds whose attempts are still running (cancelled ones excluded).
    fn live(&self) -> impl Iterator<Item = &Held> {
        self.held.iter().filter(|h| !h.cancelled)
    }

    fn live_count(&self) -> usize {
        self.live().count()
    }

    /// The task it runs (or is about to).
    fn head(&self) -> Option<&Held> {
        self.live().next()
    }

    /// How many tasks it may hold now: 0 unless ready; its running task plus its prefetch
    /// (0 for a worker that did not announce the feature); no new ones once it is retiring or
    /// its last task before recycling has been sent.
    fn depth(&self, def: &WorkerDef) -> u64 {
        if !is_ready(self.state) {
            return 0;
        }
        let live = self.live_count() as u64;
        if self.retiring {
            return live;
        }
        let mut depth = 1 + if self.prefetch_ok { def.prefetch as u64 } else { 0 };
        if let Some(max) = def.max_tasks_per_instance {
            depth = depth.min(max.saturating_sub(self.tasks_done) as u64);
        }
        depth.max(live)
    }

    /// Idle or busy from what it holds (for a ready instance).
    fn settle(&mut self) {
        if is_ready(self.state) {
            self.state = if self.live_count() == 0 { InstanceState::Idle } else { InstanceState::Busy };
        }
    }
}

pub(super) struct Pool {
    def: Arc<WorkerDef>,
    instances: Vec<Instance>,
    /// What the scheduler was last told is available.
    available: u64,
}

/// A pool instance as the API shows it.
#[derive(Clone, Debug)]
pub struct InstanceView {
    pub index: usize,
    pub state: &'static str,
    pub pid: Option<u32>,
    pub devices: Vec<u32>,
    pub task: Option<String>,
    /// Tasks sent ahead, in the order it will run them.
    pub queued: Vec<String>,
    pub tasks_done: u32,
    pub restarts: u32,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    pub info: Option<Value>,
    pub progress: Option<Value>,
}

#[derive(Clone, Debug)]
pub struct PoolView {
    pub name: String,
    pub instances: Vec<InstanceView>,
}

fn is_ready(state: InstanceState) -> bool {
    matches!(state, InstanceState::Idle | InstanceState::Busy)
}

impl<S: Store> Runtime<S> {
    /// Takes every instance's standing lease, tells the scheduler no instance is ready yet,
    /// and starts the instances. Runs before recovery, so no job can take a pool slot first.
    pub(super) fn start_pools(&mut self) {
        let now = self.clock.now_ms();
        for (name, def) in self.config.workers.clone() {
            let _ = self.state.apply(Event::CounterAvailable { name: pool_counter(&name), available: 0 }, now);
            let mut instances = Vec::new();
            for (index, device) in def.slots.iter().enumerate() {
                let grant = self.state.lease_standing(&def.needs, *device);
                if grant.is_none() {
                    tracing::error!(pool = %name, index, "no capacity for this instance's standing lease; it will not run");
                }
                let mut inst = Instance::new(index, *device, now);
                inst.state =
                    if grant.is_some() { InstanceState::Restarting { at_ms: now } } else { InstanceState::Failed };
                inst.grant = grant;
                instances.push(inst);
            }
            self.pools.insert(name, Pool { def, instances, available: 0 });
        }
        self.check_pools_now();
    }

    fn spawn_instance(&mut self, pool_name: &str, index: usize) {
        let now = self.clock.now_ms();
        let tx = self.internal_tx.clone();
        let registry = self.registry.clone();
        let config = self.config.clone();
        let engine_marker = self.engine_marker.clone();
        let pool = self.pools.get_mut(pool_name).expect("known pool");
        let def = pool.def.clone();
        let inst = &mut pool.instances[index];
        let Some(grant) = inst.grant.as_ref() else { return };
        inst.generation += 1;
        if inst.generation > 1 {
            inst.restarts += 1;
        }
        let generation = inst.generation;
        let cuda: Vec<String> = grant.devices().iter().map(|d| config.gpus[*d as usize].cuda_id(*d)).collect();
        let mut env: Vec<(String, String)> = def.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        env.extend([
            ("CUDA_VISIBLE_DEVICES".to_string(), cuda.join(",")),
            ("GPUFLOW_WORKER_POOL".to_string(), pool_name.to_string()),
            ("GPUFLOW_WORKER_INSTANCE".to_string(), index.to_string()),
            ("GPUFLOW_HEARTBEAT_INTERVAL_MS".to_string(), (def.heartbeat_timeout_ms / 4).max(50).to_string()),
            (supervisor::ENGINE_MARKER.to_string(), engine_marker),
        ]);
        if let Some((_, bytes)) = grant.gpu_memory {
            env.push(("GPUFLOW_GPU_MEMORY_BYTES".to_string(), bytes.to_string()));
        }
        let spec = InstanceSpec {
            argv: def.command.clone(),
            env,
            cwd: def.workdir.clone(),
            stderr_log: config.data_dir.join("workers").join(format!("{pool_name}.{index}.stderr.log")),
            marker: format!("worker/{pool_name}/{index}/{generation}"),
            log_max: config.limits.log_max,
            kill_grace_ms: config.limits.kill_grace_ms,
            max_line: config.limits.output_max as usize + 4096,
        };
        let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = mpsc::unbounded_channel();
        inst.state = InstanceState::Starting;
        inst.since_ms = now;
        inst.pid = None;
        inst.info = None;
        inst.progress = None;
        inst.stop_reason = None;
        inst.escalated = false;
        inst.tasks_done = 0;
        inst.prefetch_ok = false;
        inst.makes_job_dir = false;
        inst.held.clear();
        inst.stdin = Some(stdin_tx);
        inst.stop = Some(stop_tx);
        tracing::info!(pool = %pool_name, index, generation, devices = %cuda.join(","), "starting worker instance");
        let pool_name = pool_name.to_string();
        let report = move |event| {
            let _ = tx.send(Internal::Worker { pool: pool_name.clone(), index, generation, event });
        };
        tokio::spawn(supervisor::run_instance(registry, spec, report, stdin_rx, stop_rx));
    }

    /// Sends a task to the instance of the stage's pool that holds the fewest (idle first).
    pub(super) fn dispatch_to_pool(&mut self, pool_name: &str, key: AttemptKey) -> Result<(), String> {
        let now = self.clock.now_ms();
        let (job, stage, attempt) = key;
        let active = self.jobs.get(&job).ok_or("job is not active")?;
        let stages: serde_json::Map<String, Value> = active
            .pipeline
            .core
            .stages
            .iter()
            .zip(&active.outputs)
            .filter_map(|(s, o)| o.as_ref().map(|o| (s.name.clone(), o.clone())))
            .collect();
        let id = active.id();
        let task_id = format!("{id}/{}/{attempt}", active.pipeline.core.stages[stage].name);
        let dir = self.job_dir(&id);
        let message = json!({
            "type": "task",
            "task": task_id,
            "job_id": id,
            "job_dir": dir.display().to_string(),
            "stage": active.pipeline.core.stages[stage].name,
            "attempt": attempt,
            "input": active.input,
            "stages": stages,
        });
        // The job directory is the task's to write into, as for command stages: the
        // instance's writer creates it before it writes the task (`ToWorker`), unless the
        // worker creates it itself when it uses it (`job_dir_on_demand`).
        let line = message.to_string();
        let pool = self.pools.get_mut(pool_name).ok_or_else(|| format!("unknown pool `{pool_name}`"))?;
        let def = pool.def.clone();
        loop {
            let Some(inst) = pool
                .instances
                .iter_mut()
                .filter(|i| (i.live_count() as u64) < i.depth(&def))
                .min_by_key(|i| i.live_count())
            else {
                // Every instance that could take it went away since the turn granted it (their
                // exits are not read yet): not the task's fault, so it is re-queued.
                tracing::warn!(pool = %pool_name, task = %task_id, "no instance can take the task now; re-queueing it");
                self.sync_availability(pool_name);
                let (job, stage, attempt) = key;
                let error = format!("no instance of pool `{pool_name}` could take it (not started)");
                self.step(Event::AttemptExited {
                    job,
                    stage,
                    attempt,
                    outcome: Outcome::Interrupted { error, ran: false },
                });
                return Ok(());
            };
            let message = ToWorker { line: line.clone(), job_dir: (!inst.makes_job_dir).then(|| dir.clone()) };
            if inst.stdin.as_ref().is_none_or(|tx| tx.send(message).is_err()) {
                // Its input is closed: the process is gone or going; its exit says why.
                tracing::warn!(pool = %pool_name, index = inst.index, "worker instance no longer reads its input; stopping it");
                inst.state = InstanceState::Stopping;
                if let Some(stop) = &inst.stop {
                    let _ = stop.send(InstanceStop::Now);
                }
                continue;
            }
            let ahead = inst.live_count();
            tracing::debug!(pool = %pool_name, index = inst.index, task = %task_id, ahead, "dispatched task to worker");
            if ahead == 0 {
                // It becomes the head now: hang detection counts from here.
                inst.last_beat_ms = now;
                inst.head_since_ms = now;
                inst.progress = None;
            }
            inst.held.push_back(Held { key, id: task_id, cancelled: false });
            inst.settle();
            let index = inst.index;
            self.worker_tasks.insert(key, (pool_name.to_string(), index));
            self.sync_availability(pool_name);
            return Ok(());
        }
    }

    /// The stage's attempt must stop (timeout, cancel, job failed). The task the instance
    /// runs cannot be interrupted any other way than by stopping the instance (it is restarted
    /// at once; the tasks sent ahead to it are re-queued as interrupted). A task sent ahead
    /// that has not started is cancelled with a `cancel` message and its attempt ends now.
    pub(super) fn stop_worker_task(&mut self, key: AttemptKey) {
        let Some((pool, index)) = self.worker_tasks.get(&key).cloned() else { return };
        let inst = &mut self.pools.get_mut(&pool).expect("known pool").instances[index];
        let is_head = inst.head().is_none_or(|h| h.key == key);
        let sent = match inst.held.iter_mut().find(|h| h.key == key && !h.cancelled) {
            Some(held) if !is_head && inst.prefetch_ok => inst
                .stdin
                .as_ref()
                .is_some_and(|tx| {
                    tx.send(ToWorker::line(json!({"type": "cancel", "task": held.id}).to_string())).is_ok()
                })
                .then(|| {
                    held.cancelled = true;
                    held.id.clone()
                }),
            _ => None,
        };
        inst.settle();
        let Some(task_id) = sent else {
            inst.stop_reason = Some(StopReason::TaskStopped);
            if let Some(stop) = &inst.stop {
                let _ = stop.send(InstanceStop::Graceful);
            }
            return;
        };
        tracing::info!(pool = %pool, index, task = %task_id, "cancelled a task sent ahead before it started");
        self.worker_tasks.remove(&key);
        self.sync_availability(&pool);
        // It never ran: a cancel or a failed job ends it as such; a timeout re-queues it.
        let (job, stage, attempt) = key;
        let error = format!("stopped while queued on worker instance {pool}#{index} (not started)");
        self.step(Event::AttemptExited { job, stage, attempt, outcome: Outcome::Interrupted { error, ran: false } });
    }

    pub(super) async fn on_worker_event(
        &mut self,
        pool: String,
        index: usize,
        generation: u64,
        event: InstanceEvent,
    ) -> Result<(), RuntimeError> {
        let Some(p) = self.pools.get_mut(&pool) else { return Ok(()) };
        let inst = &mut p.instances[index];
        if inst.generation != generation {
            return Ok(()); // from an earlier incarnation
        }
        match event {
            InstanceEvent::Spawned { pid } => {
                inst.pid = Some(pid);
                Ok(())
            }
            InstanceEvent::Line(Ok(message)) => self.on_worker_message(&pool, index, message).await,
            InstanceEvent::Line(Err(e)) => self.protocol_error(&pool, index, e).await,
            InstanceEvent::Exited { status, stderr_tail } => {
                self.instance_exited(&pool, index, status, stderr_tail).await
            }
        }
    }

    async fn on_worker_message(&mut self, pool: &str, index: usize, message: Value) -> Result<(), RuntimeError> {
        let now = self.clock.now_ms();
        let inst = &mut self.pools.get_mut(pool).expect("known pool").instances[index];
        let kind = message["type"].as_str().unwrap_or("").to_string();
        match kind.as_str() {
            "ready" if inst.state == InstanceState::Starting => {
                let version = message["protocol"].as_u64();
                if version != Some(PROTOCOL_VERSION) {
                    let e = format!("speaks protocol {:?}; this engine speaks {PROTOCOL_VERSION}", message["protocol"]);
                    return self.protocol_error(pool, index, e).await;
                }
                inst.state = InstanceState::Idle;
                inst.info = Some(message["info"].clone());
                let announces = |feature: &str| {
                    message["features"].as_array().is_some_and(|f| f.iter().any(|v| v.as_str() == Some(feature)))
                };
                inst.prefetch_ok = announces(FEATURE_PREFETCH);
                inst.makes_job_dir = announces(FEATURE_JOB_DIR_ON_DEMAND);
                tracing::info!(pool, index, info = %message["info"], prefetch = inst.prefetch_ok, "worker instance ready");
                self.sync_availability(pool);
                Ok(())
            }
            "ready" => self.protocol_error(pool, index, "sent `ready` twice".into()).await,
            "heartbeat" | "progress" | "result" | "error" => {
                let named = message["task"].as_str();
                let Some(at) = named.and_then(|t| inst.held.iter().position(|h| h.id == t)) else {
                    let e = format!(
                        "sent `{kind}` for task {}, but it holds {}",
                        message["task"],
                        inst.head().map(|h| h.id.as_str()).unwrap_or("no task")
                    );
                    return self.protocol_error(pool, index, e).await;
                };
                if let Some(head) = inst.held.iter().take(at).find(|h| !h.cancelled) {
                    let e = format!(
                        "sent `{kind}` for task {}, which it was sent ahead and has not started: it runs {} first",
                        message["task"], head.id
                    );
                    return self.protocol_error(pool, index, e).await;
                }
                // Cancelled tasks ahead of it were skipped by the worker, as `cancel` asked.
                inst.held.drain(..at);
                let cancelled = inst.held[0].cancelled;
                match kind.as_str() {
                    "heartbeat" | "progress" => {
                        inst.last_beat_ms = now;
                        if kind == "progress" && !cancelled {
                            inst.progress =
                                Some(json!({"fraction": message["fraction"], "message": message["message"]}));
                        }
                        Ok(())
                    }
                    _ if cancelled => {
                        // It had started before the `cancel` arrived; its attempt already ended.
                        tracing::info!(pool, index, task = %inst.held[0].id, "dropping the answer to a cancelled task");
                        inst.held.pop_front();
                        inst.last_beat_ms = now;
                        inst.head_since_ms = now;
                        Ok(())
                    }
                    "result" => {
                        let output = message.get("output").cloned().filter(|v| !v.is_null());
                        self.finish_task(pool, index, Outcome::Succeeded, output).await
                    }
                    _ => {
                        let error = message["message"]
                            .as_str()
                            .unwrap_or("the worker reported an error without a message")
                            .to_string();
                        let retryable = message["retryable"].as_bool().unwrap_or(true);
                        self.finish_task(pool, index, Outcome::Failed { error, retryable }, None).await
                    }
                }
            }
            _ => self.protocol_error(pool, index, format!("unknown message type {}", message["type"])).await,
        }
    }

    /// The head task ended by a `result` or `error` message: the instance is healthy. The
    /// next task it holds becomes the head, and its hang clock starts now.
    async fn finish_task(
        &mut self,
        pool: &str,
        index: usize,
        outcome: Outcome,
        output: Option<Value>,
    ) -> Result<(), RuntimeError> {
        let now = self.clock.now_ms();
        let p = self.pools.get_mut(pool).expect("known pool");
        let max_tasks = p.def.max_tasks_per_instance;
        let inst = &mut p.instances[index];
        let Some(Held { key, .. }) = inst.held.pop_front() else { return Ok(()) };
        let ran_ms = now.saturating_sub(inst.head_since_ms);
        inst.progress = None;
        inst.last_beat_ms = now;
        inst.head_since_ms = now;
        inst.tasks_done += 1;
        inst.consecutive_failures = 0;
        inst.settle();
        let drained = inst.live_count() == 0;
        if drained && inst.retiring {
            tracing::info!(pool, index, "retiring worker instance (the pool shrank)");
            inst.state = InstanceState::Stopping;
            inst.since_ms = now;
            inst.stop_reason = Some(StopReason::Retire);
            if let Some(tx) = &inst.stdin {
                let _ = tx.send(ToWorker::line(json!({"type": "shutdown"}).to_string()));
            }
        } else if drained && max_tasks.is_some_and(|max| inst.tasks_done >= max) {
            // Recycle to bound leaks: ask it to exit; it is replaced at once.
            tracing::info!(pool, index, tasks = inst.tasks_done, "recycling worker instance (max_tasks_per_instance)");
            inst.state = InstanceState::Stopping;
            inst.since_ms = now;
            inst.stop_reason = Some(StopReason::Recycle);
            if let Some(tx) = &inst.stdin {
                let _ = tx.send(ToWorker::line(json!({"type": "shutdown"}).to_string()));
            }
        }
        self.worker_tasks.remove(&key);
        self.exits.insert(key, ExitDetails { output, ran_ms: Some(ran_ms), ..Default::default() });
        self.sync_availability(pool);
        let (job, stage, attempt) = key;
        self.step(Event::AttemptExited { job, stage, attempt, outcome });
        Ok(())
    }

    /// A malformed or unexpected message: the task it holds fails (retryable) and the
    /// instance is replaced. One bad worker never wedges the pool.
    async fn protocol_error(&mut self, pool: &str, index: usize, error: String) -> Result<(), RuntimeError> {
        let inst = &mut self.pools.get_mut(pool).expect("known pool").instances[index];
        tracing::error!(pool, index, pid = inst.pid, "worker protocol error: {error}; restarting the instance");
        inst.last_error = Some(format!("protocol error: {error}"));
        if inst.stop_reason.is_none() {
            inst.stop_reason = Some(StopReason::ProtocolError);
        }
        inst.state = InstanceState::Stopping;
        if let Some(stop) = &inst.stop {
            let _ = stop.send(InstanceStop::Now);
        }
        self.sync_availability(pool);
        Ok(())
    }

    async fn instance_exited(
        &mut self,
        pool: &str,
        index: usize,
        status: ExitStatus,
        stderr_tail: String,
    ) -> Result<(), RuntimeError> {
        let now = self.clock.now_ms();
        let p = self.pools.get_mut(pool).expect("known pool");
        let heartbeat_s = p.def.heartbeat_timeout_ms as f64 / 1000.0;
        let inst = &mut p.instances[index];
        let how = match &status {
            ExitStatus::Code(c) => format!("exited with status {c}"),
            ExitStatus::Signal(s) => format!("was killed by {}", signal_name(*s)),
            ExitStatus::SpawnFailed(e) => e.clone(),
        };
        let stderr = if stderr_tail.is_empty() {
            String::new()
        } else {
            format!("; stderr ends with: {}", last_chars(&stderr_tail, 400))
        };
        let reason = inst.stop_reason.take();
        let cause = match reason {
            Some(StopReason::Hung) => format!(
                "no heartbeat or progress for {heartbeat_s}s: the handler is stuck (deadlock?); the instance was killed"
            ),
            Some(StopReason::StartupTimeout) => format!("did not send `ready` within startup_timeout ({how}{stderr})"),
            Some(StopReason::ProtocolError) => inst.last_error.clone().unwrap_or_else(|| "protocol error".into()),
            _ => format!("worker instance {pool}#{index} {how}{stderr}"),
        };
        let planned = matches!(reason, Some(StopReason::Recycle | StopReason::TaskStopped));
        // Cancelled tasks' attempts have ended already.
        let held: Vec<Held> = inst.held.drain(..).filter(|h| !h.cancelled).collect();
        inst.prefetch_ok = false;
        inst.pid = None;
        inst.stdin = None;
        inst.stop = None;
        let mut released = None;
        if reason == Some(StopReason::Shutdown) {
            inst.state = InstanceState::Stopping;
        } else if inst.retiring {
            inst.state = InstanceState::Retired;
            inst.retiring = false;
            released = inst.grant.take();
        } else {
            let delay = if planned {
                0
            } else {
                inst.consecutive_failures += 1;
                inst.last_error = Some(cause.clone());
                500u64.saturating_mul(1 << (inst.consecutive_failures - 1).min(7)).min(60_000)
            };
            if inst.consecutive_failures >= CRASH_LOOP {
                tracing::error!(
                    pool,
                    index,
                    failures = inst.consecutive_failures,
                    "worker instance is crash-looping: {cause}; next start in {delay} ms"
                );
            } else if !planned {
                tracing::warn!(pool, index, "worker instance failed: {cause}; restarting in {delay} ms");
            }
            inst.state = InstanceState::Restarting { at_ms: now + delay };
        }
        if let Some(grant) = released {
            self.state.release_standing(&grant);
        }
        self.sync_availability(pool);
        // A crash sends every task it held back to the queue without spending a retry: the
        // one it ran counts an interruption; those sent ahead never started (every line the
        // worker wrote was read before its exit), so they count nothing. One whose stop caused
        // this (timeout, cancel) ends as its stop says. A hang or a protocol error is the
        // running task's own doing, and so is a second crash while running a task that was
        // interrupted before (by anything, an engine restart included): that task fails (retryable, spending a retry), so a task that
        // kills its worker every time costs one extra restart, not one per interruption.
        let own_fault = matches!(reason, Some(StopReason::Hung | StopReason::ProtocolError));
        for (i, Held { key, .. }) in held.into_iter().enumerate() {
            self.worker_tasks.remove(&key);
            let (job, stage, attempt) = key;
            let ran = i == 0;
            let interrupted_before = self.state.job(job).is_some_and(|j| j.stages[stage].interruptions > 0);
            let outcome = if ran && (own_fault || interrupted_before) {
                Outcome::Failed { error: cause.clone(), retryable: true }
            } else if ran {
                Outcome::Interrupted { error: cause.clone(), ran }
            } else {
                let error = format!("queued on worker instance {pool}#{index} (not started) when it stopped: {cause}");
                Outcome::Interrupted { error, ran }
            };
            self.step(Event::AttemptExited { job, stage, attempt, outcome });
        }
        self.check_pools_now();
        Ok(())
    }

    /// Tells the scheduler how many tasks the pool's instances can hold now.
    fn sync_availability(&mut self, pool: &str) {
        let p = self.pools.get_mut(pool).expect("known pool");
        let units: u64 = p.instances.iter().map(|i| i.depth(&p.def)).sum();
        if units == p.available {
            return;
        }
        p.available = units;
        self.step(Event::CounterAvailable { name: pool_counter(pool), available: units });
    }

    /// The pools' watchdog: startup timeouts, hangs (no heartbeat), and due restarts.
    pub(super) fn check_pools_now(&mut self) {
        let now = self.clock.now_ms();
        let mut to_spawn = Vec::new();
        for (name, pool) in &mut self.pools {
            let def = pool.def.clone();
            for inst in &mut pool.instances {
                match inst.state {
                    InstanceState::Starting if now.saturating_sub(inst.since_ms) > def.startup_timeout_ms => {
                        tracing::error!(pool = %name, index = inst.index, "no `ready` within startup_timeout ({} ms); killing it", def.startup_timeout_ms);
                        inst.stop_reason = Some(StopReason::StartupTimeout);
                        inst.state = InstanceState::Stopping;
                        if let Some(stop) = &inst.stop {
                            let _ = stop.send(InstanceStop::Now);
                        }
                    }
                    InstanceState::Busy if now.saturating_sub(inst.last_beat_ms) > def.heartbeat_timeout_ms => {
                        let task = inst.head().map(|h| h.id.clone());
                        tracing::error!(pool = %name, index = inst.index, pid = inst.pid, task = ?task, "no heartbeat or progress for {} ms: killing the instance's process group", def.heartbeat_timeout_ms);
                        inst.stop_reason = Some(StopReason::Hung);
                        inst.state = InstanceState::Stopping;
                        if let Some(stop) = &inst.stop {
                            let _ = stop.send(InstanceStop::Now);
                        }
                    }
                    InstanceState::Restarting { at_ms } if now >= at_ms => to_spawn.push((name.clone(), inst.index)),
                    // Asked to exit (recycling) but still there after the grace period.
                    InstanceState::Stopping
                        if matches!(inst.stop_reason, Some(StopReason::Recycle | StopReason::Retire))
                            && !inst.escalated
                            && now.saturating_sub(inst.since_ms) > self.config.limits.kill_grace_ms =>
                    {
                        tracing::warn!(pool = %name, index = inst.index, "recycled instance ignored `shutdown`; stopping it");
                        inst.escalated = true;
                        if let Some(stop) = &inst.stop {
                            let _ = stop.send(InstanceStop::Graceful);
                        }
                    }
                    _ => {}
                }
            }
        }
        for (name, index) in to_spawn {
            self.spawn_instance(&name, index);
        }
    }

    /// Stopping instances take part in sync_availability's count, so a check that changed
    /// states must be followed by one.
    pub(super) async fn watch_pools(&mut self) -> Result<(), RuntimeError> {
        self.check_pools_now();
        let names: Vec<String> = self.pools.keys().cloned().collect();
        for name in names {
            self.sync_availability(&name);
        }
        Ok(())
    }

    /// On shutdown: ask every instance to exit, then stop those that do not.
    pub(super) fn stop_pools(&mut self) {
        for pool in self.pools.values_mut() {
            for inst in &mut pool.instances {
                inst.stop_reason = Some(StopReason::Shutdown);
                if let Some(tx) = &inst.stdin {
                    let _ = tx.send(ToWorker::line(json!({"type": "shutdown"}).to_string()));
                }
                if let Some(stop) = &inst.stop {
                    let _ = stop.send(InstanceStop::Graceful);
                }
            }
        }
    }

    /// Resizes a pool to `def` (a reload), or explains why it cannot. New slots take their
    /// standing leases first, all or nothing; surplus instances retire once idle.
    pub(super) fn resize_pool(&mut self, name: &str, def: Arc<WorkerDef>) -> Result<Option<String>, String> {
        let now = self.clock.now_ms();
        let pool = self.pools.get(name).ok_or_else(|| format!("pool `{name}` is not running"))?;
        let old_n = pool.instances.iter().filter(|i| i.state != InstanceState::Retired && !i.retiring).count();
        let new_n = def.slots.len();
        let needs_lease: Vec<usize> = (0..new_n)
            .filter(|i| pool.instances.get(*i).is_none_or(|inst| inst.state == InstanceState::Retired))
            .collect();
        let mut taken = Vec::new();
        for i in &needs_lease {
            match self.state.lease_standing(&def.needs, def.slots[*i]) {
                Some(grant) => taken.push((*i, grant)),
                None => {
                    for (_, grant) in &taken {
                        self.state.release_standing(grant);
                    }
                    return Err(format!(
                        "workers.{name}: instance {i} does not fit in what is free now; free capacity first or restart"
                    ));
                }
            }
        }
        self.state.set_counter_capacity(&pool_counter(name), def.units());
        let pool = self.pools.get_mut(name).expect("checked");
        pool.def = def.clone();
        for (i, grant) in taken {
            if i == pool.instances.len() {
                pool.instances.push(Instance::new(i, def.slots[i], now));
            }
            let inst = &mut pool.instances[i];
            inst.grant = Some(grant);
            inst.device = def.slots[i];
            inst.consecutive_failures = 0;
            inst.state = InstanceState::Restarting { at_ms: now };
        }
        // A slot kept by the new size that an earlier shrink was retiring stays (it restarts).
        for inst in pool.instances.iter_mut().take(new_n).filter(|i| i.retiring) {
            inst.retiring = false;
            if inst.stop_reason == Some(StopReason::Retire) {
                inst.stop_reason = Some(StopReason::Recycle);
            }
        }
        for inst in pool.instances.iter_mut().skip(new_n) {
            inst.retiring = inst.state != InstanceState::Retired;
            match inst.state {
                InstanceState::Idle | InstanceState::Starting => {
                    inst.state = InstanceState::Stopping;
                    inst.since_ms = now;
                    inst.stop_reason = Some(StopReason::Retire);
                    if let Some(tx) = &inst.stdin {
                        let _ = tx.send(ToWorker::line(json!({"type": "shutdown"}).to_string()));
                    }
                }
                InstanceState::Restarting { .. } | InstanceState::Failed => {
                    inst.retiring = false;
                    inst.state = InstanceState::Retired;
                    if let Some(grant) = inst.grant.take() {
                        self.state.release_standing(&grant);
                    }
                }
                _ => {} // busy or stopping: leaves when its process ends
            }
        }
        // Other settings (timeouts, max tasks, prefetch) apply from now on through `pool.def`.
        self.check_pools_now();
        self.sync_availability(name);
        Ok((old_n != new_n).then(|| format!("workers.{name}.instances: {old_n} -> {new_n}")))
    }
}

impl Pool {
    /// The pool's live instances, for the watchdog.
    pub(super) fn instance_briefs(&self) -> Vec<InstanceBrief> {
        (0..self.instances.len())
            .filter(|i| self.instances[*i].state != InstanceState::Retired)
            .map(|i| self.instance_brief(i))
            .collect()
    }

    pub(super) fn instance_brief(&self, index: usize) -> InstanceBrief {
        let i = &self.instances[index];
        InstanceBrief {
            index,
            pid: i.pid,
            since_ms: i.since_ms,
            last_beat_ms: i.last_beat_ms,
            devices: i.grant.as_ref().map(|g| g.devices()).unwrap_or_default(),
            providers: i
                .info
                .as_ref()
                .and_then(|info| info["providers"].as_array())
                .map(|p| p.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()),
            last_error: i.last_error.clone(),
            failures: i.consecutive_failures,
        }
    }

    pub(super) fn gpu_check(&self) -> crate::config::GpuCheck {
        self.def.gpu_check
    }

    /// Why the pool cannot take a task, when none of its instances is ready.
    pub(super) fn problem(&self, name: &str) -> Option<String> {
        let live: Vec<&Instance> = self.instances.iter().filter(|i| i.state != InstanceState::Retired).collect();
        if live.iter().any(|i| is_ready(i.state)) {
            return None;
        }
        let states: Vec<String> = live
            .iter()
            .map(|i| {
                let error = i
                    .last_error
                    .as_deref()
                    .map(|e| format!(", last error: {}", last_chars(e, 200)))
                    .unwrap_or_default();
                format!("#{} {}{error}", i.index, i.state.as_str(i.consecutive_failures >= CRASH_LOOP))
            })
            .collect();
        Some(format!("pool {name} has no ready instance ({})", states.join("; ")))
    }
}

/// What the watchdog needs to know of an instance.
pub(super) struct InstanceBrief {
    pub index: usize,
    pub pid: Option<u32>,
    pub since_ms: u64,
    pub last_beat_ms: u64,
    pub devices: Vec<u32>,
    pub providers: Option<Vec<String>>,
    pub last_error: Option<String>,
    pub failures: u32,
}

impl<S: Store> Runtime<S> {
    /// During shutdown: the instance's process is gone.
    pub(super) fn instance_gone(&mut self, pool: &str, index: usize, generation: u64) {
        if let Some(inst) = self.pools.get_mut(pool).and_then(|p| p.instances.get_mut(index))
            && inst.generation == generation
        {
            inst.stop = None;
        }
    }

    pub(super) fn instances_running(&self) -> usize {
        self.pools.values().flat_map(|p| &p.instances).filter(|i| i.stop.is_some()).count()
    }

    pub(super) fn pool_views(&self) -> Vec<PoolView> {
        self.pools
            .iter()
            .map(|(name, p)| PoolView {
                name: name.clone(),
                instances: p
                    .instances
                    .iter()
                    .filter(|i| i.state != InstanceState::Retired)
                    .map(|i| InstanceView {
                        index: i.index,
                        state: i.state.as_str(i.consecutive_failures >= CRASH_LOOP),
                        pid: i.pid,
                        devices: i
                            .grant
                            .as_ref()
                            .map(|g| g.devices())
                            .unwrap_or_else(|| i.device.into_iter().collect()),
                        task: i.head().map(|h| h.id.clone()),
                        queued: i.live().skip(1).map(|h| h.id.clone()).collect(),
                        tasks_done: i.tasks_done,
                        restarts: i.restarts,
                        consecutive_failures: i.consecutive_failures,
                        last_error: i.last_error.clone(),
                        info: i.info.clone(),
                        progress: i.progress.clone(),
                    })
                    .collect(),
            })
            .collect()
    }

    /// `(pool, index, state, restarts, last error)` of every live instance, for the journal.
    pub(super) fn instance_states(&self) -> Vec<(&str, usize, &'static str, u32, Option<&str>)> {
        self.pools
            .iter()
            .flat_map(|(name, p)| p.instances.iter().map(move |i| (name.as_str(), i)))
            .filter(|(_, i)| i.state != InstanceState::Retired)
            .map(|(name, i)| {
                let state = i.state.as_str(i.consecutive_failures >= CRASH_LOOP);
                (name, i.index, state, i.restarts, i.last_error.as_deref())
            })
            .collect()
    }

    /// The devices an instance holds (its standing lease).
    pub(super) fn instance_devices(&self, pool: &str, index: usize) -> Vec<u32> {
        let Some(i) = self.pools.get(pool).and_then(|p| p.instances.get(index)) else { return Vec::new() };
        i.grant.as_ref().map(|g| g.devices()).unwrap_or_default()
    }

    /// The pool a stage runs on, if it is a worker stage.
    pub(super) fn pool_of(&self, job: JobId, stage: usize) -> Option<String> {
        match &self.jobs.get(&job)?.pipeline.stages[stage] {
            StageExec::Worker { pool } => Some(pool.clone()),
            StageExec::Command { .. } => None,
        }
    }
}
