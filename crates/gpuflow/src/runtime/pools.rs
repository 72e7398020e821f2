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
//!
//! Tasks go to instances in batches (one task each unless the pool declares `batch:` and the
//! worker announced the `batch` feature). A granted task first joins its *forming* group
//! (same pipeline, stage and `batch_key`); a group is sent as one batch to an instance with a
//! free batch slot once it is as large as the instance takes, or, to an idle instance, once its
//! oldest task has waited `max_wait`. So the counter's units are tasks: an instance counts
//! `(1 + prefetch) * its largest batch`. The running batch is the head batch: every task of it
//! ran, so a crash interrupts them all (without spending retries). A task interrupted before is
//! a suspect and runs alone, so a task that kills its worker is found and failed alone instead
//! of taking its batch-mates' interruption budget with it.

use std::cmp::Reverse;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

use gpuflow_core::{Event, Grant, Outcome};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::*;
use crate::config::{StageExec, WorkerDef, pool_counter};
use crate::supervisor::{InstanceEvent, InstanceSpec, InstanceStop, Progress, ToWorker};

/// The protocol version this engine speaks (see docs/worker-protocol.md).
pub const PROTOCOL_VERSION: u64 = 1;
/// The feature a worker announces in `ready` when it may be sent tasks ahead and honours
/// `cancel` for a task it has not started.
pub const FEATURE_PREFETCH: &str = "prefetch";
/// The feature a worker announces when it creates a task's `job_dir` itself, on first use: the
/// engine then makes no directory per task (a `mkdir` per task dominated short tasks).
pub const FEATURE_JOB_DIR_ON_DEMAND: &str = "job_dir_on_demand";
/// The feature a worker announces when it takes a `batch` message (several tasks) and answers
/// each of its tasks with its own `result` or `error`.
pub const FEATURE_BATCH: &str = "batch";
/// Consecutive failures after which a pool instance is reported as crash-looping.
pub const CRASH_LOOP: u32 = 5;

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
    /// The batch it was sent in (numbered per instance, in the order sent).
    batch: u64,
    /// How many tasks that batch held when it was sent.
    size: u32,
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
    /// It announced `batch`: it takes several tasks in one `batch` message.
    batch_ok: bool,
    /// The largest batch its `ready` said it can take (its GPU memory), if it said.
    max_batch: Option<u32>,
    /// The number the next batch sent to it gets.
    next_batch: u64,
    tasks_done: u32,
    consecutive_failures: u32,
    restarts: u32,
    last_error: Option<String>,
    info: Option<Value>,
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
            batch_ok: false,
            max_batch: None,
            next_batch: 0,
            tasks_done: 0,
            consecutive_failures: 0,
            restarts: 0,
            last_error: None,
            info: None,
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

    /// The largest batch it is sent: the pool's `max_size`, capped by its own `max_batch`; 1
    /// unless the pool batches and it announced `batch`.
    fn batch_cap(&self, def: &WorkerDef) -> u32 {
        match def.batch {
            Some(b) if self.batch_ok => b.max_size.min(self.max_batch.unwrap_or(u32::MAX)).max(1),
            _ => 1,
        }
    }

    /// Batches it may hold at once: the one it runs plus its prefetch (0 for a worker that did
    /// not announce the feature).
    fn slots(&self, def: &WorkerDef) -> usize {
        1 + if self.prefetch_ok { def.prefetch as usize } else { 0 }
    }

    /// Batches it holds whose tasks are not all answered or cancelled.
    fn batches_held(&self) -> usize {
        let mut n = 0;
        let mut last = None;
        for h in self.live() {
            if last != Some(h.batch) {
                n += 1;
                last = Some(h.batch);
            }
        }
        n
    }

    /// How many tasks it could be sent now as one batch: 0 without a free batch slot.
    fn room(&self, def: &WorkerDef) -> usize {
        if !is_ready(self.state) || self.batches_held() >= self.slots(def) {
            return 0;
        }
        let free = self.depth(def).saturating_sub(self.live_count() as u64) as usize;
        free.min(self.batch_cap(def) as usize)
    }

    /// How many tasks it may hold now: 0 unless ready; its running batch plus its prefetch,
    /// each as large as it takes; no new ones once it is retiring or its last task before
    /// recycling has been sent.
    fn depth(&self, def: &WorkerDef) -> u64 {
        if !is_ready(self.state) {
            return 0;
        }
        let live = self.live_count() as u64;
        if self.retiring {
            return live;
        }
        let mut depth = self.slots(def) as u64 * self.batch_cap(def) as u64;
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
    /// Granted tasks not sent yet, by the batch they may share.
    forming: Vec<Forming>,
}

/// Tasks that may share a batch: one stage of one pipeline, equal `batch_key`s.
#[derive(Clone, Debug, PartialEq, Eq)]
struct GroupKey {
    pipeline: Arc<str>,
    stage: String,
    key: Option<String>,
    /// A suspect (interrupted before): it runs in a batch of its own.
    alone: Option<AttemptKey>,
}

struct Forming {
    group: GroupKey,
    tasks: VecDeque<Pending>,
}

/// A granted task waiting for its batch (its attempt is recorded as started).
struct Pending {
    key: AttemptKey,
    id: String,
    /// The task as a batch lists it: the `task` message without its `type`.
    task: Value,
    dir: PathBuf,
    /// When its stage became ready (for the queue-delay metric).
    ready_ms: u64,
    /// When it joined its group (for `max_wait`).
    since_ms: u64,
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
    /// The latest progress of the task it runs.
    pub progress: Option<StageProgress>,
    /// Its standing lease, for saying who holds what a waiting stage needs.
    pub grant: Option<Grant>,
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
            self.pools.insert(name, Pool { def, instances, available: 0, forming: Vec::new() });
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
        inst.stop_reason = None;
        inst.escalated = false;
        inst.tasks_done = 0;
        inst.prefetch_ok = false;
        inst.makes_job_dir = false;
        inst.batch_ok = false;
        inst.max_batch = None;
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

    /// A task granted to a pool joins its forming batch; whatever batch is due goes out now.
    /// `queued_ms` is how long the stage waited for its grant.
    pub(super) fn dispatch_to_pool(&mut self, pool_name: &str, key: AttemptKey, queued_ms: u64) -> Result<(), String> {
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
        let stage_name = active.pipeline.core.stages[stage].name.clone();
        let task_id = format!("{id}/{stage_name}/{attempt}");
        let dir = self.job_dir(&id);
        // Without `type`: that is added for a single `task` message (`send_batch`).
        let task = json!({
            "task": task_id,
            "job_id": id,
            "job_dir": dir.display().to_string(),
            "stage": stage_name,
            "attempt": attempt,
            "input": active.input(),
            "stages": stages,
        });
        // A value the key reads that the input lacks renders as nothing: such tasks share
        // batches among themselves.
        let batch_key = match &active.pipeline.stages[stage] {
            StageExec::Worker { batch_key: Some(t), .. } => {
                let ctx = RenderContext { input: active.input(), outputs: &active.outputs, job_dir: "", job_id: "" };
                Some(t.render(&ctx).unwrap_or_default())
            }
            _ => None,
        };
        let pipeline = active.pipeline_name.clone();
        let pool = self.pools.get_mut(pool_name).ok_or_else(|| format!("unknown pool `{pool_name}`"))?;
        let run = self.state.job(job).map(|j| &j.stages[stage]);
        let suspect = pool.def.batch.is_some() && run.is_some_and(|r| r.interruptions > 0);
        // When it became ready: its grant was decided (before the turn's commit) after its wait.
        let granted = match run.map(|r| &r.status) {
            Some(gpuflow_core::StageStatus::Running(r)) => r.started_at,
            _ => now,
        };
        let group = GroupKey { pipeline, stage: stage_name, key: batch_key, alone: suspect.then_some(key) };
        let pending =
            Pending { key, id: task_id, task, dir, ready_ms: granted.saturating_sub(queued_ms), since_ms: now };
        match pool.forming.iter_mut().find(|f| f.group == group) {
            Some(f) => f.tasks.push_back(pending),
            None => pool.forming.push(Forming { group, tasks: VecDeque::from([pending]) }),
        }
        self.flush_pool(pool_name);
        Ok(())
    }

    /// Sends every batch that is due: to the instance with a free batch slot that holds the
    /// fewest tasks (idle first), the group whose oldest task waits longest among those that
    /// are full for it, run alone, or (to an idle instance) have waited `max_wait`. Tasks that
    /// no ready instance has room for any more go back to the queue.
    pub(super) fn flush_pool(&mut self, pool_name: &str) {
        let now = self.clock.now_ms();
        loop {
            let Some(pool) = self.pools.get_mut(pool_name) else { return };
            if pool.forming.is_empty() {
                break;
            }
            let def = pool.def.clone();
            let max_wait = def.batch.map_or(0, |b| b.max_wait_ms);
            let Some(index) = pool
                .instances
                .iter()
                .filter(|i| i.room(&def) > 0)
                .min_by_key(|i| (i.live_count(), Reverse(i.room(&def))))
                .map(|i| i.index)
            else {
                break;
            };
            let inst = &pool.instances[index];
            let (room, idle) = (inst.room(&def), inst.live_count() == 0);
            let due = pool
                .forming
                .iter()
                .enumerate()
                .filter(|(_, f)| {
                    f.group.alone.is_some()
                        || f.tasks.len() >= room
                        || (idle && now.saturating_sub(f.tasks[0].since_ms) >= max_wait)
                })
                .min_by_key(|(_, f)| f.tasks[0].since_ms)
                .map(|(g, _)| g);
            let Some(g) = due else { break };
            let take = if pool.forming[g].group.alone.is_some() { 1 } else { room.min(pool.forming[g].tasks.len()) };
            let tasks: Vec<Pending> = pool.forming[g].tasks.drain(..take).collect();
            let group = pool.forming[g].group.clone();
            if pool.forming[g].tasks.is_empty() {
                pool.forming.swap_remove(g);
            }
            if let Err(tasks) = self.send_batch(pool_name, index, &group, tasks) {
                // The instance is stopping (its exit says why); another may take them.
                let pool = self.pools.get_mut(pool_name).expect("known pool");
                match pool.forming.iter_mut().find(|f| f.group == group) {
                    Some(f) => tasks.into_iter().rev().for_each(|t| f.tasks.push_front(t)),
                    None => pool.forming.push(Forming { group, tasks: tasks.into() }),
                }
            }
        }
        self.sync_availability(pool_name);
    }

    /// Every pool's due batches (the loop calls this once per turn).
    pub(super) fn flush_pools(&mut self) {
        let names: Vec<String> =
            self.pools.iter().filter(|(_, p)| !p.forming.is_empty()).map(|(n, _)| n.clone()).collect();
        for name in names {
            self.flush_pool(&name);
        }
    }

    /// When the oldest task of a forming batch will have waited `max_wait`, if that is still
    /// ahead (one already due waits for an instance to free, which is an event of its own).
    pub(super) fn next_batch_wakeup(&self) -> Option<u64> {
        let now = self.clock.now_ms();
        self.pools
            .values()
            .filter_map(|p| p.def.batch.filter(|b| b.max_wait_ms > 0).map(|b| (p, b.max_wait_ms)))
            .flat_map(|(p, wait)| p.forming.iter().map(move |f| f.tasks[0].since_ms + wait))
            .filter(|at| *at > now)
            .min()
    }

    /// Writes one batch to an instance: a `task` message for one task, a `batch` message for
    /// more. Gives the tasks back if its input is closed.
    fn send_batch(
        &mut self,
        pool_name: &str,
        index: usize,
        group: &GroupKey,
        tasks: Vec<Pending>,
    ) -> Result<(), Vec<Pending>> {
        let now = self.clock.now_ms();
        let pool = self.pools.get_mut(pool_name).expect("known pool");
        let inst = &mut pool.instances[index];
        let dirs: Vec<PathBuf> =
            if inst.makes_job_dir { Vec::new() } else { tasks.iter().map(|t| t.dir.clone()).collect() };
        let line = if let [one] = tasks.as_slice() {
            // The object's text never starts empty (it has `task`): prefix its type.
            format!("{{\"type\":\"task\",{}", &one.task.to_string()[1..])
        } else {
            let list: Vec<&Value> = tasks.iter().map(|t| &t.task).collect();
            json!({"type": "batch", "tasks": list}).to_string()
        };
        // The job directory is the task's to write into, as for command stages: the
        // instance's writer creates it before it writes the line (`ToWorker`), unless the
        // worker creates it itself when it uses it (`job_dir_on_demand`).
        if inst.stdin.as_ref().is_none_or(|tx| tx.send(ToWorker { line, job_dirs: dirs }).is_err()) {
            // Its input is closed: the process is gone or going; its exit says why.
            tracing::warn!(pool = %pool_name, index, "worker instance no longer reads its input; stopping it");
            inst.state = InstanceState::Stopping;
            if let Some(stop) = &inst.stop {
                let _ = stop.send(InstanceStop::Now);
            }
            return Err(tasks);
        }
        let ahead = inst.live_count();
        let size = tasks.len() as u32;
        tracing::debug!(pool = %pool_name, index, first = %tasks[0].id, size, ahead, "dispatched a batch to a worker");
        if ahead == 0 {
            // It becomes the head batch now: hang detection and its run time count from here.
            inst.last_beat_ms = now;
            inst.head_since_ms = now;
        }
        let batch = inst.next_batch;
        inst.next_batch += 1;
        let delays: Vec<u64> = tasks.iter().map(|t| now.saturating_sub(t.ready_ms)).collect();
        for t in tasks {
            inst.held.push_back(Held { key: t.key, id: t.id, batch, size, cancelled: false });
            self.worker_tasks.insert(t.key, (pool_name.to_string(), index));
        }
        inst.settle();
        self.metrics.batch_sent(pool_name, &group.pipeline, &group.stage, size, &delays);
        Ok(())
    }

    /// The stage's attempt must stop (timeout, cancel, job failed). The task the instance
    /// runs cannot be interrupted any other way than by stopping the instance (it is restarted
    /// at once; the tasks sent ahead to it are re-queued as interrupted). A task sent ahead
    /// that has not started is cancelled with a `cancel` message and its attempt ends now.
    pub(super) fn stop_worker_task(&mut self, key: AttemptKey) {
        let Some((pool, index)) = self.worker_tasks.get(&key).cloned() else {
            self.stop_forming_task(key);
            return;
        };
        let inst = &mut self.pools.get_mut(&pool).expect("known pool").instances[index];
        // A task of the batch it runs has started, whatever its place in the batch.
        let batch = inst.held.iter().find(|h| h.key == key).map(|h| h.batch);
        let is_head = inst.head().is_none_or(|h| Some(h.batch) == batch);
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

    /// A task still waiting for its batch never reached a worker: its attempt ends now.
    fn stop_forming_task(&mut self, key: AttemptKey) {
        let found = self.pools.iter_mut().find_map(|(name, p)| {
            let g = p.forming.iter().position(|f| f.tasks.iter().any(|t| t.key == key))?;
            p.forming[g].tasks.retain(|t| t.key != key);
            if p.forming[g].tasks.is_empty() {
                p.forming.swap_remove(g);
            }
            Some(name.clone())
        });
        let Some(pool) = found else { return };
        let (job, stage, attempt) = key;
        let error = format!("stopped while waiting for a batch of pool `{pool}` (not started)");
        self.step(Event::AttemptExited { job, stage, attempt, outcome: Outcome::Interrupted { error, ran: false } });
    }

    /// Whether the pool side holds the attempt: sent to an instance, or waiting for its batch.
    pub(super) fn pool_holds(&self, key: AttemptKey) -> bool {
        self.worker_tasks.contains_key(&key)
            || self.pools.values().any(|p| p.forming.iter().any(|f| f.tasks.iter().any(|t| t.key == key)))
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
            InstanceEvent::Line(Err(e)) if self.still_loading(&pool, index) => {
                // Libraries print while a model loads (before the worker could point fd 1 at
                // stderr): not a protocol error until the worker said `ready`.
                tracing::warn!(pool = %pool, index, "worker wrote to stdout before `ready`, ignored: {e}");
                Ok(())
            }
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
                inst.batch_ok = announces(FEATURE_BATCH);
                inst.max_batch = match message.get("max_batch") {
                    None | Some(Value::Null) => None,
                    Some(v) => match v.as_u64().filter(|n| *n >= 1).map(|n| n.min(u32::MAX as u64) as u32) {
                        Some(n) => Some(n),
                        None => {
                            let e = format!("sent `max_batch` {v}; it must be a whole number of tasks, at least 1");
                            return self.protocol_error(pool, index, e).await;
                        }
                    },
                };
                tracing::info!(pool, index, info = %message["info"], prefetch = inst.prefetch_ok, batch = inst.batch_ok, max_batch = ?inst.max_batch, "worker instance ready");
                self.sync_availability(pool);
                Ok(())
            }
            "ready" => self.protocol_error(pool, index, "sent `ready` twice".into()).await,
            "heartbeat" | "progress" | "result" | "error" => {
                let named = message["task"].as_str();
                let Some(mut at) = named.and_then(|t| inst.held.iter().position(|h| h.id == t)) else {
                    let e = format!(
                        "sent `{kind}` for task {}, but it holds {}",
                        message["task"],
                        inst.head().map(|h| h.id.as_str()).unwrap_or("no task")
                    );
                    return self.protocol_error(pool, index, e).await;
                };
                // Tasks of one batch run together, answered in any order; batches in order.
                let batch = inst.held[at].batch;
                if let Some(head) = inst.held.iter().take(at).find(|h| !h.cancelled && h.batch != batch) {
                    let e = format!(
                        "sent `{kind}` for task {}, which it was sent ahead and has not started: it runs {} first",
                        message["task"], head.id
                    );
                    return self.protocol_error(pool, index, e).await;
                }
                // Cancelled tasks of earlier batches were skipped by the worker, as `cancel` asked.
                let skipped = inst.held.iter().take_while(|h| h.batch != batch).count();
                inst.held.drain(..skipped);
                at -= skipped;
                let cancelled = inst.held[at].cancelled;
                match kind.as_str() {
                    "heartbeat" | "progress" => {
                        inst.last_beat_ms = now;
                        if kind == "progress" && !cancelled {
                            let key = inst.held[at].key;
                            // A malformed report still counts as a heartbeat; it is not
                            // worth restarting the instance for.
                            match Progress::from_json(&message) {
                                Ok(progress) => self.progress_reported(key, progress),
                                Err(e) => tracing::debug!(pool, index, "progress report ignored: {e}"),
                            }
                        }
                        Ok(())
                    }
                    _ if cancelled => {
                        // It had started before the `cancel` arrived; its attempt already ended.
                        tracing::info!(pool, index, task = %inst.held[at].id, "dropping the answer to a cancelled task");
                        let batch = inst.held.remove(at).map(|h| h.batch);
                        inst.last_beat_ms = now;
                        if inst.head().map(|h| h.batch) != batch {
                            inst.head_since_ms = now;
                        }
                        Ok(())
                    }
                    "result" => {
                        let output = message.get("output").cloned().filter(|v| !v.is_null());
                        self.finish_task(pool, index, at, Outcome::Succeeded, output).await
                    }
                    _ => {
                        let error = message["message"]
                            .as_str()
                            .unwrap_or("the worker reported an error without a message")
                            .to_string();
                        let retryable = message["retryable"].as_bool().unwrap_or(true);
                        self.finish_task(pool, index, at, Outcome::Failed { error, retryable }, None).await
                    }
                }
            }
            _ => self.protocol_error(pool, index, format!("unknown message type {}", message["type"])).await,
        }
    }

    /// A task of the head batch (held at `at`) ended by a `result` or `error` message: the
    /// instance is healthy and its hang clock restarts. Once the batch is all answered, the
    /// next batch it holds becomes the head.
    async fn finish_task(
        &mut self,
        pool: &str,
        index: usize,
        at: usize,
        outcome: Outcome,
        output: Option<Value>,
    ) -> Result<(), RuntimeError> {
        let now = self.clock.now_ms();
        let p = self.pools.get_mut(pool).expect("known pool");
        let max_tasks = p.def.max_tasks_per_instance;
        let inst = &mut p.instances[index];
        let Some(Held { key, batch, size, .. }) = inst.held.remove(at) else { return Ok(()) };
        let ran_ms = now.saturating_sub(inst.head_since_ms);
        inst.last_beat_ms = now;
        // Once its batch is all answered, the next batch it holds starts running.
        if inst.head().is_none_or(|h| h.batch != batch) {
            inst.head_since_ms = now;
        }
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
        self.exits
            .insert(key, ExitDetails { output, batch_size: Some(size), ran_ms: Some(ran_ms), ..Default::default() });
        self.sync_availability(pool);
        let (job, stage, attempt) = key;
        self.step(Event::AttemptExited { job, stage, attempt, outcome });
        Ok(())
    }

    /// A malformed or unexpected message: the task it holds fails (retryable) and the
    /// instance is replaced. One bad worker never wedges the pool.
    fn still_loading(&self, pool: &str, index: usize) -> bool {
        self.pools.get(pool).and_then(|p| p.instances.get(index)).is_some_and(|i| i.state == InstanceState::Starting)
    }

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
        // A batch of several ran together: which task caused it is unknown, so all are
        // interrupted, and each then runs alone once (see `dispatch_to_pool`).
        let own_fault = matches!(reason, Some(StopReason::Hung | StopReason::ProtocolError));
        let head = held.first().map(|h| h.batch);
        let alone = held.iter().filter(|h| Some(h.batch) == head).count() == 1;
        for Held { key, batch, size, .. } in held {
            self.worker_tasks.remove(&key);
            let (job, stage, attempt) = key;
            let ran = Some(batch) == head;
            if ran {
                self.exits.insert(key, ExitDetails { batch_size: Some(size), ..Default::default() });
            }
            let interrupted_before = self.state.job(job).is_some_and(|j| j.stages[stage].interruptions > 0);
            let outcome = if ran && alone && (own_fault || interrupted_before) {
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

    /// Tells the scheduler how many tasks the pool's instances can hold now. Forming tasks
    /// beyond what the ready instances have room for (one stopped) go back to the queue.
    fn sync_availability(&mut self, pool: &str) {
        let p = self.pools.get_mut(pool).expect("known pool");
        let room: u64 = p.instances.iter().map(|i| i.depth(&p.def).saturating_sub(i.live_count() as u64)).sum();
        let mut forming: u64 = p.forming.iter().map(|f| f.tasks.len() as u64).sum();
        let mut requeue = Vec::new();
        while forming > room {
            // The newest first: the older ones have waited longest for their batch.
            let g = (0..p.forming.len()).max_by_key(|g| p.forming[*g].tasks.back().map(|t| t.since_ms)).expect("some");
            let t = p.forming[g].tasks.pop_back().expect("groups are never empty");
            if p.forming[g].tasks.is_empty() {
                p.forming.swap_remove(g);
            }
            requeue.push(t.key);
            forming -= 1;
        }
        for (job, stage, attempt) in requeue {
            let error = format!("no instance of pool `{pool}` could take it (not started)");
            self.step(Event::AttemptExited {
                job,
                stage,
                attempt,
                outcome: Outcome::Interrupted { error, ran: false },
            });
        }
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
            generation: i.generation,
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
    /// Its processes carry the marker `worker/POOL/INDEX/GENERATION`.
    pub generation: u64,
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
                        progress: i.head().and_then(|h| self.journal.progress().get(&h.key)),
                        grant: i.grant.clone(),
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
            StageExec::Worker { pool, .. } => Some(pool.clone()),
            StageExec::Command { .. } => None,
        }
    }
}
