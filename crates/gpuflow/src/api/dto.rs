//! Wire types. Kept apart from the domain and store types so the API can stay stable while
//! those change.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::gpu::GpuSource;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"pipeline": "quickstart", "input": {"text": "hello gpus"}}))]
pub struct SubmitJobRequest {
    /// Name of a pipeline in the pipeline file.
    pub pipeline: String,
    /// The job input: a JSON object, checked against the pipeline's declared `inputs`. Left out or
    /// `null`, it is `{}`. A value used in a command line may not hold a NUL byte, and the
    /// command line it makes must fit the OS limits (else 400 `command_too_long`).
    #[serde(default = "empty_object")]
    #[schema(value_type = Option<Object>)]
    pub input: Value,
    /// Higher runs first. Default 0.
    #[serde(default)]
    pub priority: i32,
    /// Submitting again with the same key returns the same job. 1 to 200 characters.
    #[schema(min_length = 1, max_length = 200)]
    pub idempotency_key: Option<String>,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// The request shape of a gateway that chains named stages, so it can point at gpuflow unchanged.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowRequest {
    /// Becomes the job input named by `workflows.input` (default `video_path`); checked against `allowed_roots`.
    pub video_path: String,
    pub workflow_config: WorkflowConfig,
    #[serde(default)]
    pub priority: i32,
    /// 1 to 200 characters; submitting again with the same key returns the same job.
    #[schema(min_length = 1, max_length = 200)]
    pub idempotency_key: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowConfig {
    /// Names of stages under `workflows.stages`, run in this order: at least one, each once.
    #[schema(schema_with = workflow_chain_schema)]
    pub workflow_chain: Vec<String>,
}

/// At least one stage, none twice: what `POST /v1/workflows` accepts.
fn workflow_chain_schema() -> utoipa::openapi::Array {
    use utoipa::openapi::{ArrayBuilder, ObjectBuilder, Type};
    ArrayBuilder::new()
        .items(ObjectBuilder::new().schema_type(Type::String))
        .min_items(Some(1))
        .unique_items(true)
        .description(Some("Names of stages under `workflows.stages`, run in this order: at least one, each once."))
        .build()
}

#[derive(Serialize, ToSchema)]
pub struct WorkflowResponse {
    /// The job id (as in `/v1/jobs/{id}`).
    #[schema(format = Uuid)]
    pub workflow_id: String,
    #[schema(format = Uuid)]
    pub id: String,
    pub state: String,
}

#[derive(Serialize, ToSchema)]
pub struct SubmitJobResponse {
    #[schema(format = Uuid)]
    pub id: String,
    pub state: String,
}

/// `POST /v1/jobs/batch`: up to 1,000 submissions in one request.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitBatchRequest {
    /// 1 to 1,000 jobs, each shaped like the body of `POST /v1/jobs`. Each is checked on its
    /// own: one that is malformed or refused gets an error entry and the others go ahead.
    #[schema(value_type = Vec<SubmitJobRequest>, min_items = 1, max_items = 1000)]
    pub jobs: Vec<Value>,
}

#[derive(Serialize, ToSchema)]
pub struct SubmitBatchResponse {
    /// One entry per submitted job, in the order of the request.
    pub jobs: Vec<BatchEntry>,
}

/// What became of one job of a batch: accepted (`id`, `state`, `created`) or refused (`error`).
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum BatchEntry {
    Accepted(BatchAccepted),
    Refused(BatchRefused),
}

#[derive(Serialize, ToSchema)]
pub struct BatchAccepted {
    #[schema(format = Uuid)]
    pub id: String,
    pub state: String,
    /// False when an earlier job with the same idempotency key is returned (where
    /// `POST /v1/jobs` would answer 200 rather than 201).
    pub created: bool,
}

#[derive(Serialize, ToSchema)]
pub struct BatchRefused {
    pub error: BatchItemError,
}

/// The error `POST /v1/jobs` would have answered for this job alone.
#[derive(Serialize, ToSchema)]
pub struct BatchItemError {
    /// The same stable codes as the other endpoints: `invalid_request`, `invalid_input`,
    /// `unknown_pipeline`, `payload_too_large`, `queue_full`, `idempotency_conflict`, ...
    pub code: String,
    pub message: String,
    /// The HTTP status `POST /v1/jobs` would have answered (e.g. 400, 409, 413, 429), so a
    /// client can retry 429 and 503 entries and give up on the rest.
    pub status: u16,
}

#[derive(Serialize, ToSchema)]
pub struct CancelResponse {
    #[schema(format = Uuid)]
    pub id: String,
    /// `cancelling` while stages are being stopped, `cancelled` once none runs.
    pub state: String,
}

#[derive(Serialize, ToSchema)]
pub struct AttemptView {
    pub attempt: u32,
    /// running, succeeded, failed, timed_out, cancelled, interrupted
    pub state: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub error: Option<String>,
    /// What the attempt held: devices, GPU memory, CPU slots, counters.
    pub lease: Value,
    /// For a worker task: how many tasks the batch it ran in held (1 when not batched).
    pub batch_size: Option<u32>,
}

#[derive(Serialize, ToSchema)]
pub struct StageView {
    pub name: String,
    /// pending (waiting for predecessors), queued (waiting for resources), backoff, running,
    /// succeeded, failed, cancelled
    pub state: String,
    pub after: Vec<String>,
    pub attempts: u32,
    pub failures: u32,
    pub retry_at: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub output: Option<Value>,
    /// While the stage runs: the latest progress its attempt reported (a worker's
    /// `task.progress`, or a command stage's `$GPUFLOW_PROGRESS` file); absent before the
    /// first report and once the attempt ended. Not stored: an engine restart forgets it.
    pub progress: Option<ProgressView>,
    /// Why it has not started, while it waits: for resources (`queued`), for the stages it
    /// runs after (`pending`), or to be retried (`backoff`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<WaitingForView>,
    pub attempt_history: Vec<AttemptView>,
}

/// A running attempt's latest progress report.
#[derive(Serialize, ToSchema, Clone, Debug, PartialEq)]
pub struct ProgressView {
    /// How much is done, 0 to 1; null when the report had only a message.
    pub fraction: Option<f64>,
    /// A short status (at most 200 characters).
    pub message: Option<String>,
    /// When the engine received it.
    pub at: String,
}

#[derive(Serialize, ToSchema)]
pub struct JobView {
    #[schema(format = Uuid)]
    pub id: String,
    pub pipeline: String,
    /// queued, running, succeeded, failed, cancelled
    pub state: String,
    pub priority: i32,
    #[schema(value_type = Object)]
    pub input: Value,
    pub output: Option<Value>,
    pub error: Option<String>,
    pub idempotency_key: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub stages: Vec<StageView>,
    /// The job this one was submitted to retry (`POST /v1/jobs/{id}/retry`).
    pub retry_of: Option<String>,
    /// The jobs submitted to retry this one, oldest first.
    pub retried_by: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct JobSummary {
    #[schema(format = Uuid)]
    pub id: String,
    pub pipeline: String,
    pub state: String,
    pub priority: i32,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub error: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobSummary>,
    /// Pass as `cursor` to get the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct JobListQuery {
    /// queued, running, succeeded, failed or cancelled
    #[param(pattern = "^(queued|running|succeeded|failed|cancelled)$")]
    pub state: Option<String>,
    pub pipeline: Option<String>,
    /// 1 to 500, default 50.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^-?[0-9]+$")]
    pub cursor: Option<String>,
    /// Only jobs whose id starts with these hex digits (dashes optional). Not with `state`,
    /// `pipeline`, `cursor` or `short_id`.
    pub id_prefix: Option<String>,
    /// Only jobs whose id ends with these 8 hex digits: the short id the dashboard and the
    /// CLI show. Not with `state`, `pipeline`, `cursor` or `id_prefix`.
    pub short_id: Option<String>,
}

/// `POST /v1/jobs/{id}/retry`: the new job, submitted with the failed or cancelled job's
/// pipeline, input and priority.
#[derive(Serialize, ToSchema)]
pub struct RetryResponse {
    pub id: String,
    pub state: String,
    /// The job it retries.
    pub retry_of: String,
}

#[derive(Serialize, ToSchema)]
pub struct GpuView {
    pub index: u32,
    pub name: String,
    pub uuid: Option<String>,
    pub source: GpuSource,
    pub memory_bytes: u64,
    pub memory_leased_bytes: u64,
    /// Memory the device reports in use by processes without a lease; kept out of the inventory.
    pub memory_foreign_bytes: u64,
    /// True while a stage holds the whole device.
    pub exclusive: bool,
}

#[derive(Serialize, ToSchema)]
pub struct CountView {
    pub capacity: u64,
    pub leased: u64,
}

#[derive(Serialize, ToSchema)]
pub struct LeaseView {
    #[schema(format = Uuid)]
    pub job: String,
    pub pipeline: String,
    pub stage: String,
    pub attempt: u32,
    pub since: String,
    pub held_ms: u64,
    pub pid: Option<u32>,
    pub gpus: Vec<u32>,
    pub gpu_memory: Option<GpuShareView>,
    pub cpu: u32,
    pub counters: BTreeMap<String, u64>,
    /// Set while the engine is stopping it: timeout, cancel or job failed.
    pub stopping: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct GpuShareView {
    pub device: u32,
    pub bytes: u64,
}

#[derive(Serialize, ToSchema)]
pub struct NeedsView {
    pub gpu: u32,
    pub gpu_memory_bytes: u64,
    pub cpu: u32,
    pub counters: BTreeMap<String, u64>,
}

#[derive(Serialize, ToSchema)]
pub struct WaitingView {
    #[schema(format = Uuid)]
    pub job: String,
    pub pipeline: String,
    pub stage: String,
    pub priority: i32,
    pub since: String,
    pub waited_ms: u64,
    pub needs: NeedsView,
    /// What it waits for, now.
    pub waiting_for: WaitingForView,
}

/// Why a stage waits: each thing that holds it back, and all of it in one sentence.
#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct WaitingForView {
    /// E.g. "Needs 16 GiB of GPU memory, at most 15 GiB free; held by 7a4de9bc/generate".
    pub sentence: String,
    #[schema(min_items = 1)]
    pub reasons: Vec<WaitReasonView>,
}

/// One thing a stage waits for. `kind` says which fields are present:
/// `gpu` (`needs`, `free`, `capacity`, `held_by`), `gpu_memory` (`needs_bytes`,
/// `free_at_most_bytes`, `foreign_bytes`, `held_by`), `cpu` and `counter` (`name`, `needs`,
/// `free`, `capacity`, `held_by`), `pool_busy` (`pool`, `ready`, `held_by`),
/// `pool_crash_looping` (`pool`, `instances`, `crash_looping`, `failures`, `last_error`),
/// `pool_not_ready` (`pool`, `instances`), `queue` (`ahead`: its resources are free, earlier
/// entries go first), `starting`, `dependency` (`after`: the stages it waits for) and
/// `backoff` (`failures`, `retry_at`).
#[derive(Serialize, ToSchema, Clone, Debug, Default)]
pub struct WaitReasonView {
    pub kind: String,
    /// This reason in words.
    pub sentence: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub needs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub needs_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_at_most_bytes: Option<u64>,
    /// GPU memory other programs hold on the devices it could run on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub foreign_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instances: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crash_looping: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failures: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ahead: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<String>,
    /// Who holds what it needs (at most 10; `held_by_count` counts them all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_by: Option<Vec<HolderView>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_by_count: Option<usize>,
}

/// A lease holder: a running stage (`job`, `stage`) or a worker-pool instance (`pool`, `instance`).
#[derive(Serialize, ToSchema, Clone, Debug, PartialEq)]
pub struct HolderView {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = Uuid)]
    pub job: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<usize>,
}

#[derive(Serialize, ToSchema)]
pub struct ResourcesView {
    pub gpus: Vec<GpuView>,
    pub cpu: CountView,
    pub counters: BTreeMap<String, CountView>,
    /// Leases held now.
    pub leases: Vec<LeaseView>,
    /// Stages waiting for resources, in the order they will be served.
    pub waiting: Vec<WaitingView>,
    /// Worker pools and the state of each instance.
    pub pools: Vec<PoolView>,
}

#[derive(Serialize, ToSchema)]
pub struct PoolView {
    pub name: String,
    pub instances: Vec<InstanceView>,
}

#[derive(Serialize, ToSchema)]
pub struct InstanceView {
    pub index: usize,
    /// starting, idle, busy, stopping, restarting, failed (crash-looping or without capacity)
    pub state: String,
    pub pid: Option<u32>,
    pub devices: Vec<u32>,
    /// The share of its device's memory it holds for its lifetime (the pool's
    /// `needs.gpu_memory`); absent when it holds whole devices (`devices`) or no GPU.
    pub gpu_memory_bytes: Option<u64>,
    /// The task it runs, as `JOB/STAGE/ATTEMPT`.
    pub task: Option<String>,
    /// Tasks sent ahead to it (the pool's `prefetch`), in the order it will run them.
    pub queued: Vec<String>,
    /// Tasks finished by this incarnation.
    pub tasks_done: u32,
    pub restarts: u32,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    /// What the worker reported in its `ready` message (e.g. execution providers).
    pub info: Option<Value>,
    /// The latest progress of the task it runs.
    pub progress: Option<ProgressView>,
}

#[derive(Serialize, ToSchema)]
pub struct EvidenceView {
    pub label: String,
    pub value: String,
}

#[derive(Serialize, ToSchema)]
pub struct FindingView {
    pub id: i64,
    /// task_stalled, gpu_unused, gpu_idle_under_lease, queue_stalled, zombie_process,
    /// shm_too_small, cuda_visible_devices_overridden, worker_unhealthy
    pub kind: String,
    /// What it is about (a holder, a device, a pipeline).
    pub subject: String,
    pub summary: String,
    pub evidence: Vec<EvidenceView>,
    pub cause: String,
    pub fix: String,
    pub opened_at: String,
    pub closed_at: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct GpuProcessView {
    pub pid: u32,
    pub memory_bytes: u64,
}

#[derive(Serialize, ToSchema)]
pub struct GpuReadingView {
    pub index: u32,
    pub name: String,
    pub source: GpuSource,
    /// False when nothing can be read (a virtual device without telemetry).
    pub telemetry: bool,
    pub utilization_pct: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub memory_bytes: u64,
    pub idle_ms: u64,
    pub processes: Vec<GpuProcessView>,
    /// `[unix ms, utilisation %, memory used bytes]`, oldest first.
    pub history: Vec<[u64; 3]>,
}

#[derive(Serialize, ToSchema)]
pub struct DiagnosisView {
    pub checked_at: String,
    /// Problems now, newest first.
    pub open: Vec<FindingView>,
    /// Recently closed findings.
    pub recent: Vec<FindingView>,
    pub gpus: Vec<GpuReadingView>,
}

#[derive(Serialize, ToSchema)]
pub struct ReloadResponse {
    /// What changed, e.g. `pipelines.ocr: added`, `workers.ocr.instances: 1 -> 2`.
    pub applied: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `starting`, `ok`, or `degraded` (running, but the store cannot be written: new jobs
    /// get 507; see `reason`).
    pub status: String,
    pub version: String,
    /// Why it is degraded: the error, the data directory and its free space.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One engine sharing the PostgreSQL queue.
#[derive(Serialize, ToSchema)]
pub struct AgentView {
    pub id: String,
    pub name: String,
    pub host: String,
    pub pid: i64,
    /// Where its API listens.
    pub api: String,
    /// running, unresponsive (no heartbeat within one lease TTL), stopped or replaced.
    pub state: String,
    pub started_at: String,
    pub last_heartbeat: String,
    pub heartbeat_age_ms: i64,
    /// Leases it holds now.
    pub leases: i64,
    /// Capacity and usage as of its last heartbeat.
    #[schema(value_type = Object)]
    pub resources: serde_json::Value,
}

#[derive(Serialize, ToSchema)]
pub struct AgentsView {
    pub agents: Vec<AgentView>,
}
