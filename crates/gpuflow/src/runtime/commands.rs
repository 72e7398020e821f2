//! What the API asks of the loop, and how the loop answers.

use gpuflow_core::{Event, JobId, JobState, ResourceRequest};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::*;
use crate::store::{NewJob, StoreError};

/// The most submissions one batch may carry.
pub const MAX_BATCH: usize = 1_000;

#[derive(Clone, Debug)]
pub struct SubmitRequest {
    pub pipeline: String,
    pub input: Value,
    pub priority: i32,
    pub idempotency_key: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Submitted {
    pub id: String,
    pub state: String,
    /// False when an earlier submission with the same idempotency key is returned.
    pub created: bool,
}

#[derive(Clone, Debug)]
pub struct LeaseView {
    pub job: String,
    pub pipeline: String,
    pub stage: String,
    pub attempt: u32,
    pub since_ms: u64,
    pub pid: Option<u32>,
    pub lease: LeaseRecord,
    pub grant: gpuflow_core::Grant,
    pub stopping: Option<&'static str>,
}

#[derive(Clone, Debug)]
pub struct WaitingView {
    pub job: String,
    pub pipeline: String,
    pub stage: String,
    pub priority: i32,
    pub since_ms: u64,
    pub needs: ResourceRequest,
}

#[derive(Clone, Debug)]
pub struct ResourcesSnapshot {
    pub now_ms: u64,
    pub gpus: Vec<crate::gpu::GpuInfo>,
    pub usage: gpuflow_core::Usage,
    pub capacity: gpuflow_core::Capacity,
    pub foreign: Vec<u64>,
    /// How much of each counter may be granted now (a pool's ready instances), in use included.
    pub available: std::collections::BTreeMap<String, u64>,
    pub leases: Vec<LeaseView>,
    pub waiting: Vec<WaitingView>,
    pub pools: Vec<PoolView>,
}

pub enum Command {
    Submit {
        request: SubmitRequest,
        reply: oneshot::Sender<Result<Submitted, EngineError>>,
    },
    /// Several submissions admitted in one turn; one answer per request, in order.
    SubmitBatch {
        requests: Vec<SubmitRequest>,
        reply: oneshot::Sender<Vec<Result<Submitted, EngineError>>>,
    },
    Cancel {
        id: String,
        reply: oneshot::Sender<Result<String, EngineError>>,
    },
    Resources {
        reply: oneshot::Sender<ResourcesSnapshot>,
    },
    Reload {
        reply: oneshot::Sender<Result<Vec<String>, EngineError>>,
    },
    Diagnosis {
        reply: oneshot::Sender<DiagnosisSnapshot>,
    },
    Metrics {
        reply: oneshot::Sender<String>,
    },
    Agents {
        reply: oneshot::Sender<Result<Vec<crate::store::AgentRecord>, EngineError>>,
    },
}

/// One device's latest reading and recent history.
#[derive(Clone, Debug)]
pub struct DeviceReading {
    pub index: u32,
    pub name: String,
    pub source: crate::gpu::GpuSource,
    pub memory_total: u64,
    pub sample: Option<crate::gpu::DeviceSample>,
    pub idle_ms: u64,
    /// `(at ms, utilisation %, memory used)`, oldest first.
    pub history: Vec<(u64, u32, u64)>,
}

#[derive(Clone, Debug)]
pub struct DiagnosisSnapshot {
    pub now_ms: u64,
    pub open: Vec<super::OpenFinding>,
    pub devices: Vec<DeviceReading>,
}

/// Errors the engine reports to callers, each with a stable code.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unknown pipeline `{name}`; known pipelines: {known}")]
    UnknownPipeline { name: String, known: String },
    #[error("pipeline `{pipeline}` already has {max} unfinished jobs (max_queued); retry later")]
    QueueFull { pipeline: String, max: u32 },
    #[error("no job with id `{0}`")]
    NotFound(String),
    #[error("job {id} has already finished ({state})")]
    AlreadyFinished { id: String, state: String },
    #[error("idempotency key `{key}` was used for a different request (job {existing}); use a new key")]
    IdempotencyConflict { key: String, existing: String },
    #[error("reload refused, the running configuration is unchanged: {0}")]
    ReloadRefused(String),
    #[error(
        "this engine is not part of a cluster: it uses the embedded SQLite store; agents exist when engines share `store: postgres://...`"
    )]
    NotClustered,
    #[error("the database is unreachable ({0}); retry shortly")]
    StoreUnavailable(String),
    /// The disk under the store is full or failing; the message names the data directory
    /// and its free space.
    #[error("{0}")]
    StoreUnwritable(String),
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            EngineError::UnknownPipeline { .. } => "unknown_pipeline",
            EngineError::QueueFull { .. } => "queue_full",
            EngineError::NotFound(_) => "not_found",
            EngineError::AlreadyFinished { .. } => "already_finished",
            EngineError::IdempotencyConflict { .. } => "idempotency_conflict",
            EngineError::ReloadRefused(_) => "reload_refused",
            EngineError::NotClustered => "not_clustered",
            EngineError::StoreUnavailable(_) => "store_unavailable",
            EngineError::StoreUnwritable(_) => "store_unwritable",
            EngineError::ShuttingDown => "shutting_down",
            EngineError::Internal(_) => "internal",
        }
    }
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        if e.is_transient() {
            return EngineError::StoreUnavailable(e.to_string());
        }
        EngineError::Internal(e.to_string())
    }
}

/// The API's way into the loop.
#[derive(Clone)]
pub struct EngineHandle {
    pub(super) tx: mpsc::Sender<Command>,
    journal: Journal,
    ready: Arc<std::sync::atomic::AtomicBool>,
    degraded: super::Degraded,
}

impl EngineHandle {
    pub(super) fn new(
        tx: mpsc::Sender<Command>,
        journal: Journal,
        ready: Arc<std::sync::atomic::AtomicBool>,
        degraded: super::Degraded,
    ) -> Self {
        EngineHandle { tx, journal, ready, degraded }
    }

    /// Why the engine is degraded (its store cannot be written), if it is.
    pub fn degraded(&self) -> Option<String> {
        self.degraded.reason()
    }

    /// Refuses a write at once while the store cannot be written, without queueing it.
    fn writable(&self) -> Result<(), EngineError> {
        self.degraded.reason().map_or(Ok(()), |r| Err(EngineError::StoreUnwritable(r)))
    }

    /// True once start-up is done: a dead engine's processes swept, unfinished jobs recovered
    /// (or the agent joined its cluster). Until then `/healthz` answers 503.
    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The live feed and recent histories, for the dashboard.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| EngineError::ShuttingDown)?;
        rx.await.map_err(|_| EngineError::ShuttingDown)
    }

    pub async fn submit(&self, request: SubmitRequest) -> Result<Submitted, EngineError> {
        self.writable()?;
        self.ask(|reply| Command::Submit { request, reply }).await?
    }

    /// Admits up to `MAX_BATCH` submissions together (one transaction in the engine). Each
    /// request gets its own answer, in order: a refused one does not sink the others.
    pub async fn submit_batch(
        &self,
        requests: Vec<SubmitRequest>,
    ) -> Result<Vec<Result<Submitted, EngineError>>, EngineError> {
        self.writable()?;
        self.ask(|reply| Command::SubmitBatch { requests, reply }).await
    }

    pub async fn cancel(&self, id: String) -> Result<String, EngineError> {
        self.writable()?;
        self.ask(|reply| Command::Cancel { id, reply }).await?
    }

    /// Re-reads the pipeline file; returns what changed.
    pub async fn reload(&self) -> Result<Vec<String>, EngineError> {
        self.ask(|reply| Command::Reload { reply }).await?
    }

    pub async fn metrics(&self) -> Result<String, EngineError> {
        self.ask(|reply| Command::Metrics { reply }).await
    }

    pub async fn diagnosis(&self) -> Result<DiagnosisSnapshot, EngineError> {
        self.ask(|reply| Command::Diagnosis { reply }).await
    }

    /// The agents sharing this engine's queue (agent mode only).
    pub async fn agents(&self) -> Result<Vec<crate::store::AgentRecord>, EngineError> {
        self.ask(|reply| Command::Agents { reply }).await?
    }

    pub async fn resources(&self) -> Result<ResourcesSnapshot, EngineError> {
        self.ask(|reply| Command::Resources { reply }).await
    }
}

impl<S: Store> Runtime<S> {
    pub(super) async fn on_command(&mut self, command: Command) -> Result<(), RuntimeError> {
        let Some(command) = self.refuse_while_stalled(command) else { return Ok(()) };
        match command {
            Command::Submit { request, reply } => self.submit(request, reply).await,
            Command::SubmitBatch { requests, reply } => self.submit_batch(requests, ledger::oneshot_all(reply)).await,
            Command::Cancel { id, reply } => self.cancel(id, reply).await,
            Command::Agents { reply } => {
                let _ = reply.send(self.agents().await);
                Ok(())
            }
            Command::Resources { reply } => {
                let _ = reply.send(self.snapshot());
                Ok(())
            }
            Command::Metrics { reply } => {
                let _ = reply.send(self.metrics_text());
                Ok(())
            }
            Command::Diagnosis { reply } => {
                let _ = reply.send(self.diagnosis_snapshot());
                Ok(())
            }
            Command::Reload { reply } => {
                let _ = reply.send(self.reload());
                // Resized pools and a new scheduling setting may let waiting work start.
                self.step(Event::Tick);
                Ok(())
            }
        }
    }

    /// Admission: known pipeline, idempotency, queue bound; then the job joins the turn. It
    /// is acknowledged only once the turn has committed it.
    pub(super) async fn admit(&mut self, request: SubmitRequest) -> Result<Submitted, AdmitError> {
        let def = self.pipeline_for(&request.pipeline).map_err(AdmitError::Refused)?;
        if let Some(earlier) = self.earlier_submission(&request).await? {
            return Ok(earlier);
        }
        let active = self.active_per_pipeline.get(request.pipeline.as_str()).copied().unwrap_or(0);
        if active >= def.max_queued {
            return Err(AdmitError::Refused(EngineError::QueueFull {
                pipeline: request.pipeline,
                max: def.max_queued,
            }));
        }
        let uuid = uuid::Uuid::now_v7();
        let id = uuid.to_string();
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut new_job = self.new_job(&id, &request, &def);
        new_job.seq = Some(seq as i64);
        if let Some(key) = &request.idempotency_key {
            self.turn.keys.insert(key.clone(), self.turn.jobs.len());
        }
        self.turn.jobs.push(new_job);
        self.metrics.submitted(&request.pipeline);
        let job = JobId(uuid.as_u128());
        let submitted = Submitted { id: id.clone(), state: JobState::Queued.as_str().to_string(), created: true };
        self.turn.submitted.push(EngineEvent::JobSubmitted { job: id.clone(), pipeline: request.pipeline.clone() });
        self.step(Event::Submitted { job, seq, priority: request.priority, pipeline: def.core.clone() });
        self.track(job, id, request.pipeline, def.clone(), Some(request.input), Vec::new());
        Ok(submitted)
    }

    /// The pipeline a submission names, or an error listing the known ones.
    pub(super) fn pipeline_for(&self, name: &str) -> Result<Arc<PipelineDef>, EngineError> {
        self.config.pipeline(name).map_err(|_| EngineError::UnknownPipeline {
            name: name.to_string(),
            known: self.config.pipelines.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }

    /// The job an earlier submission with the same idempotency key created, when it was the
    /// same request; a conflict when it was a different one.
    pub(super) async fn earlier_submission(&self, request: &SubmitRequest) -> Result<Option<Submitted>, AdmitError> {
        let Some(key) = &request.idempotency_key else { return Ok(None) };
        let same = |pipeline: &str, input: &Value, priority: i32| {
            pipeline == request.pipeline && *input == request.input && priority == request.priority
        };
        // A job admitted earlier in this turn is not in the store yet.
        let (id, state, same) = match self.turn.keys.get(key).map(|i| &self.turn.jobs[*i]) {
            Some(j) => (j.id.clone(), JobState::Queued, same(&j.pipeline, &j.input, j.priority)),
            None => match self.store.job_by_idempotency_key(key).await? {
                Some(j) => {
                    let same = same(&j.pipeline, &j.input, j.priority);
                    (j.id, j.state, same)
                }
                None => return Ok(None),
            },
        };
        if !same {
            return Err(AdmitError::Refused(EngineError::IdempotencyConflict { key: key.clone(), existing: id }));
        }
        Ok(Some(Submitted { id, state: state.as_str().to_string(), created: false }))
    }

    /// The row to insert for an admitted request, with the pipeline file it is accepted under.
    pub(super) fn new_job(&self, id: &str, request: &SubmitRequest, def: &PipelineDef) -> NewJob {
        NewJob {
            seq: None,
            id: id.to_string(),
            pipeline: request.pipeline.clone(),
            input: request.input.clone(),
            priority: request.priority,
            idempotency_key: request.idempotency_key.clone(),
            config_hash: self.config_hash.clone(),
            config_text: self.config_text.clone(),
            stages: def.core.stages.iter().map(|s| (s.name.clone(), s.after.clone())).collect(),
            created_at: self.clock.now_ms() as i64,
        }
    }

    pub(super) fn track(
        &mut self,
        job: JobId,
        id: String,
        pipeline_name: String,
        pipeline: Arc<PipelineDef>,
        input: Option<Value>,
        outputs: Vec<Option<Value>>,
    ) {
        // The count's key is the name every job of the pipeline shares.
        let pipeline_name = match self.active_per_pipeline.get_key_value(pipeline_name.as_str()) {
            Some((name, _)) => name.clone(),
            None => Arc::from(pipeline_name),
        };
        *self.active_per_pipeline.entry(pipeline_name.clone()).or_default() += 1;
        // Job ids are UUIDs (admission makes them; recovery refuses others). An agent's local key is
        // not the job's id, so the id is parsed, not derived from the key.
        let uuid = uuid::Uuid::parse_str(&id).unwrap_or_else(|_| uuid::Uuid::from_u128(job.0));
        // A large input stays for the turn that admitted (or restored, or claimed) the job,
        // which may start it; after that it is read from the store when needed.
        if input.as_ref().is_some_and(|i| json_size(i) > super::INPUT_KEPT_BYTES) {
            self.inputs_held.push(job);
        }
        self.jobs.insert(job, ActiveJob { uuid, pipeline, pipeline_name, input, outputs: outputs.into_boxed_slice() });
    }

    fn snapshot(&self) -> ResourcesSnapshot {
        let leases = self
            .state
            .leases()
            .filter_map(|l| {
                let active = self.jobs.get(&l.job)?;
                let a = l.attempt;
                Some(LeaseView {
                    job: active.id(),
                    pipeline: active.pipeline_name.to_string(),
                    stage: l.pipeline.stages[l.stage].name.clone(),
                    attempt: a.attempt,
                    since_ms: a.started_at,
                    pid: self.processes.get(&(l.job, l.stage, a.attempt)).and_then(|p| p.pid),
                    lease: LeaseRecord::from(&a.grant),
                    grant: a.grant.clone(),
                    stopping: a.kill.map(kill_reason_text),
                })
            })
            .collect();
        let waiting = self
            .state
            .waiting()
            .filter_map(|w| {
                let active = self.jobs.get(&w.job)?;
                Some(WaitingView {
                    job: active.id(),
                    pipeline: active.pipeline_name.to_string(),
                    stage: w.pipeline.stages[w.stage].name.clone(),
                    priority: w.priority,
                    since_ms: w.since,
                    needs: w.pipeline.stages[w.stage].needs.clone(),
                })
            })
            .collect();
        let inventory = self.state.inventory();
        let available =
            inventory.capacity().counters.keys().map(|k| (k.clone(), inventory.counter_available(k))).collect();
        ResourcesSnapshot {
            available,
            now_ms: self.clock.now_ms(),
            gpus: self.config.gpus.clone(),
            usage: self.state.inventory().usage(),
            capacity: self.state.inventory().capacity().clone(),
            foreign: self.state.inventory().foreign().to_vec(),
            leases,
            waiting,
            pools: self.pool_views(),
        }
    }
}

pub(super) enum AdmitError {
    Refused(EngineError),
    Store(StoreError),
}

impl From<AdmitError> for EngineError {
    fn from(e: AdmitError) -> Self {
        match e {
            AdmitError::Refused(e) => e,
            AdmitError::Store(e) => e.into(),
        }
    }
}

impl From<StoreError> for AdmitError {
    fn from(e: StoreError) -> Self {
        AdmitError::Store(e)
    }
}

/// The length of a JSON value serialized compactly, without building the text.
pub fn json_size(value: &serde_json::Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}
