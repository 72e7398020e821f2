//! The pipeline file: schema, parsing with positions, and compilation into what the engine runs.
//!
//! Parsing is strict: unknown keys are errors, and every error names the file, line, column,
//! the field and what is allowed. See `docs/pipelines.md`.

pub mod shape;
pub mod template;
pub mod units;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use gpuflow_core::{
    Capacity, GpuDevice, Pipeline, PipelineError, ResourceRequest, RetryPolicy, SchedulerConfig, StageSpec,
};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use serde_saphyr::Spanned;

use crate::gpu::{GpuInfo, GpuProbe, GpuSource};
use template::Template;
use units::{Bytes, Millis};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

/// One problem in a pipeline file, with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: String,
    pub line: u64,
    pub column: u64,
    /// Dotted path of the offending field, e.g. `pipelines.ocr.stages[1].after`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}:{}:{}: {}", self.file, self.line, self.column, self.message)
        } else {
            write!(f, "{}:{}:{}: {}: {}", self.file, self.line, self.column, self.field, self.message)
        }
    }
}

/// All problems found in one file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        if let [first, _, ..] = self.0.as_slice() {
            write!(f, "\n{} errors in {}", self.0.len(), first.file)?;
        }
        Ok(())
    }
}

// ---- the file as written -------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<Spanned<String>>,
    data_dir: Option<PathBuf>,
    store: Option<Spanned<String>>,
    #[serde(default)]
    cluster: ClusterFile,
    #[serde(default)]
    resources: ResourcesFile,
    #[serde(default)]
    scheduling: SchedulingFile,
    auth: Option<AuthFile>,
    #[serde(default)]
    allowed_roots: Vec<PathBuf>,
    #[serde(default)]
    limits: LimitsFile,
    #[serde(default)]
    retention: RetentionFile,
    #[serde(default)]
    workers: BTreeMap<String, Spanned<WorkerFile>>,
    workflows: Option<Spanned<WorkflowsFile>>,
    #[serde(default)]
    diagnosis: DiagnosisFile,
    #[serde(default)]
    pipelines: BTreeMap<String, Spanned<PipelineFile>>,
}

/// Named stage definitions that `POST /v1/workflows` chains on request (the chain shape some gateways send).
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct WorkflowsFile {
    /// The job input key that receives the request's `video_path`.
    input: Option<String>,
    max_queued: Option<u32>,
    stages: BTreeMap<String, Spanned<LibraryStageFile>>,
}

/// A stage definition in the workflow library: a stage without `name` and `after` (the
/// name is its key; a chain runs its stages in request order).
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct LibraryStageFile {
    command: Option<Vec<Spanned<String>>>,
    worker: Option<String>,
    batch_key: Option<String>,
    needs: Option<NeedsFile>,
    timeout: Option<Millis>,
    retry: Option<RetryFile>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    workdir: Option<PathBuf>,
    #[serde(default)]
    gpu_check: GpuCheck,
    /// How long one attempt takes, for the queue's critical-path order.
    expected: Option<Millis>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkerFile {
    command: Vec<String>,
    instances: Option<u32>,
    per_gpu: Option<u32>,
    needs: Option<NeedsFile>,
    startup_timeout: Option<Millis>,
    heartbeat_timeout: Option<Millis>,
    max_tasks_per_instance: Option<u32>,
    prefetch: Option<u32>,
    batch: Option<BatchFile>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    workdir: Option<PathBuf>,
    #[serde(default)]
    gpu_check: GpuCheck,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchFile {
    max_size: Option<u32>,
    max_wait: Option<Millis>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ResourcesFile {
    gpus: Option<Spanned<GpusFile>>,
    cpu: Option<u32>,
    #[serde(default)]
    counters: BTreeMap<String, u64>,
}

enum GpusFile {
    Auto,
    None,
    Virtual(Vec<VirtualGpuFile>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VirtualGpuFile {
    memory: Bytes,
    name: Option<String>,
    /// A JSON file read as this device's NVML readings (see docs/pipelines.md).
    telemetry: Option<PathBuf>,
}

impl<'de> Deserialize<'de> for GpusFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = GpusFile;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`auto`, `none`, or a list of virtual devices like `[{memory: 80GiB}]`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<GpusFile, E> {
                match v {
                    "auto" => Ok(GpusFile::Auto),
                    "none" => Ok(GpusFile::None),
                    other => Err(E::custom(format!(
                        "`{other}` is not allowed; use `auto`, `none`, or a list of virtual devices like `[{{memory: 80GiB}}]`"
                    ))),
                }
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<GpusFile, A::Error> {
                let mut gpus = Vec::new();
                while let Some(gpu) = seq.next_element::<VirtualGpuFile>()? {
                    gpus.push(gpu);
                }
                Ok(GpusFile::Virtual(gpus))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DiagnosisFile {
    sample_interval: Option<Millis>,
    task_stall: Option<Millis>,
    gpu_idle: Option<Millis>,
    queue_stall: Option<Millis>,
    gpu_use_window: Option<Millis>,
    shm_min: Option<Bytes>,
    /// Percent of one core; a stalled task's whole process tree stays under it.
    stall_cpu_floor: Option<f64>,
    finding_clear: Option<Millis>,
}

/// What to do when a stage or instance granted a GPU never uses it.
#[derive(Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GpuCheck {
    /// Report it (`gpuflow doctor`, `/v1/diagnosis`).
    #[default]
    Warn,
    /// Report it and fail the attempt (not retried).
    Fail,
    Off,
}

#[derive(Clone, Debug)]
pub struct Diagnosis {
    pub sample_interval_ms: u64,
    pub thresholds: gpuflow_core::diagnosis::Thresholds,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SchedulingFile {
    reserve_after: Option<Millis>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    token: Option<String>,
    token_file: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    max_request_body: Option<Bytes>,
    log_max: Option<Bytes>,
    output_max: Option<Bytes>,
    kill_grace: Option<Millis>,
    header_read_timeout: Option<Millis>,
    idle_timeout: Option<Millis>,
    max_connections: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RetentionFile {
    succeeded: Option<Keep>,
    failed: Option<Keep>,
    cancelled: Option<Keep>,
    interval: Option<Millis>,
}

/// `keep`, or how long to keep a finished job.
struct Keep(Option<u64>);

impl<'de> Deserialize<'de> for Keep {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.trim() == "keep" {
            return Ok(Keep(None));
        }
        units::parse_duration(&text)
            .map(|ms| Keep(Some(ms)))
            .map_err(|e| de::Error::custom(format!("{e}; or write `keep` to never remove these jobs")))
    }
}

/// How long finished jobs are kept, per final state (`None`: for ever), and how often the
/// background pass looks for expired ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    pub succeeded_ms: Option<u64>,
    pub failed_ms: Option<u64>,
    pub cancelled_ms: Option<u64>,
    pub interval_ms: u64,
}

impl Retention {
    /// `(state, keep for)` for each final state that is not kept for ever.
    pub fn expiring(&self) -> Vec<(&'static str, u64)> {
        [("succeeded", self.succeeded_ms), ("failed", self.failed_ms), ("cancelled", self.cancelled_ms)]
            .into_iter()
            .filter_map(|(state, ms)| ms.map(|ms| (state, ms)))
            .collect()
    }
}

/// How an agent takes part in a shared PostgreSQL queue.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    /// This agent's name in `/v1/agents`; defaults to `HOST:DATA_DIR`.
    name: Option<String>,
    lease_ttl: Option<Millis>,
    poll_interval: Option<Millis>,
    unrunnable_after: Option<Millis>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineFile {
    max_queued: Option<u32>,
    #[serde(default)]
    inputs: BTreeMap<String, InputFile>,
    stages: Vec<Spanned<StageFile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputFile {
    #[serde(rename = "type", default)]
    kind: InputKind,
    required: Option<bool>,
    default: Option<Value>,
}

/// The declared type of one job input.
#[derive(Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InputKind {
    #[default]
    Any,
    String,
    /// A file-system path; checked against `allowed_roots`.
    Path,
    Number,
    Integer,
    Boolean,
    Object,
    Array,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct StageFile {
    name: String,
    command: Option<Vec<Spanned<String>>>,
    worker: Option<String>,
    /// Tasks share a batch only when this template renders equal for them.
    batch_key: Option<String>,
    needs: Option<NeedsFile>,
    timeout: Option<Millis>,
    retry: Option<RetryFile>,
    after: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    workdir: Option<PathBuf>,
    #[serde(default)]
    gpu_check: GpuCheck,
    /// How long one attempt takes, for the queue's critical-path order.
    expected: Option<Millis>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct NeedsFile {
    #[serde(default)]
    gpu: u32,
    gpu_memory: Option<Bytes>,
    #[serde(default)]
    cpu: u32,
    #[serde(default)]
    counters: BTreeMap<String, u64>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RetryFile {
    max_attempts: Option<u32>,
    backoff: Option<BackoffFile>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct BackoffFile {
    initial: Option<Millis>,
    multiplier: Option<f64>,
    max: Option<Millis>,
}

// ---- what the engine runs ------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct InputSpec {
    pub kind: InputKind,
    pub required: bool,
    pub default: Option<Value>,
}

/// How a stage runs: a command per attempt, or a task on a worker pool.
#[derive(Clone, Debug)]
pub enum StageExec {
    Command {
        command: Vec<Template>,
        env: BTreeMap<String, String>,
        workdir: Option<PathBuf>,
        gpu_check: GpuCheck,
    },
    Worker {
        pool: String,
        /// `batch_key`: only tasks whose keys render equal share a batch.
        batch_key: Option<Template>,
    },
}

/// The counter that stands for the ready instances of a pool.
pub fn pool_counter(pool: &str) -> String {
    format!("pool:{pool}")
}

/// Most tasks an instance may hold queued behind the one it runs (`workers.NAME.prefetch`).
pub const MAX_PREFETCH: u32 = 64;
/// Most tasks one batch may hold (`workers.NAME.batch.max_size`).
pub const MAX_BATCH_SIZE: u32 = 1024;

/// `workers.NAME.batch`: an idle instance is handed up to `max_size` queued tasks of one stage
/// at once, as soon as that many wait or when the oldest has waited `max_wait_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchDef {
    pub max_size: u32,
    pub max_wait_ms: u64,
}

/// A worker pool: long-lived instances that load a model once and run one task at a time,
/// with up to `prefetch` more sent ahead to instances that support it.
#[derive(Clone, Debug)]
pub struct WorkerDef {
    pub name: String,
    pub command: Vec<String>,
    /// One entry per instance: the device it is pinned to (`per_gpu`), if any.
    pub slots: Vec<Option<u32>>,
    /// Held by each instance for its lifetime.
    pub needs: ResourceRequest,
    pub startup_timeout_ms: u64,
    pub heartbeat_timeout_ms: u64,
    pub max_tasks_per_instance: Option<u32>,
    /// Tasks sent ahead to an instance while it runs one (only to workers that announce the
    /// `prefetch` feature); 0 sends the next task only after the previous one's answer.
    pub prefetch: u32,
    /// Dynamic batching, for workers that announce the `batch` feature.
    pub batch: Option<BatchDef>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<PathBuf>,
    pub gpu_check: GpuCheck,
}

impl WorkerDef {
    /// Units of the pool's counter: every instance with its running batch and its prefetch
    /// (a batch is one task without batching). What may be granted at a time is lower while
    /// instances are not ready or do not support prefetch or batches (the runtime sets it).
    pub fn units(&self) -> u64 {
        self.slots.len() as u64 * (1 + self.prefetch as u64) * self.max_batch() as u64
    }

    /// The most tasks one batch may hold: 1 without `batch`.
    pub fn max_batch(&self) -> u32 {
        self.batch.map_or(1, |b| b.max_size)
    }
}

#[derive(Clone, Debug)]
pub struct PipelineDef {
    pub core: Arc<Pipeline>,
    pub stages: Vec<StageExec>,
    pub inputs: BTreeMap<String, InputSpec>,
    /// Inputs that are paths under `allowed_roots`, checked again when a stage starts.
    pub path_inputs: Vec<String>,
    pub max_queued: u32,
}

/// Where jobs are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSetting {
    /// The embedded default: `DATA_DIR/gpuflow.db`.
    Sqlite,
    /// A shared PostgreSQL database: this engine is one agent of a cluster.
    Postgres(String),
}

impl StoreSetting {
    /// Reads `store:` (or `GPUFLOW_STORE`). The error says what is accepted.
    pub fn parse(value: &str) -> Result<StoreSetting, String> {
        let v = value.trim();
        if v.is_empty() || v == "sqlite" {
            Ok(StoreSetting::Sqlite)
        } else if v.starts_with("postgres://") || v.starts_with("postgresql://") {
            Ok(StoreSetting::Postgres(v.to_string()))
        } else {
            Err(format!(
                "`{v}` is not a store; write `sqlite` (the embedded default) or a PostgreSQL URL such as `postgres://user@host:5432/gpuflow`"
            ))
        }
    }
}

/// Settings of an agent sharing a PostgreSQL queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSettings {
    pub name: Option<String>,
    /// A claimed attempt's lease lasts this long unless renewed; a dead agent's work is
    /// re-queued once it runs out. Renewed every third of it.
    pub lease_ttl_ms: u64,
    /// How often to look for work when no notification arrives (backoff delays, lost
    /// notifications during a reconnect).
    pub poll_interval_ms: u64,
    /// A claimable stage that no live agent can run (its pipeline does not load on any, or it
    /// needs a pool or resource none has) fails its job after waiting this long.
    pub unrunnable_after_ms: u64,
}

#[derive(Clone, Debug)]
pub struct Limits {
    pub max_request_body: usize,
    pub log_max: u64,
    pub output_max: u64,
    pub kill_grace_ms: u64,
    /// A client must send a request's whole head within this, from its first byte.
    pub header_read_timeout_ms: u64,
    /// A keep-alive connection with no request in flight is closed after this long quiet.
    pub idle_timeout_ms: u64,
    /// Open API connections at most; one more is answered 503 and closed.
    pub max_connections: u32,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// The file it was read from, for reload.
    pub path: Option<PathBuf>,
    /// The file's text, kept so each job can be recovered with the definition it was accepted under.
    pub source: String,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub store: StoreSetting,
    pub cluster: ClusterSettings,
    pub gpus: Vec<GpuInfo>,
    pub capacity: Capacity,
    pub scheduler: SchedulerConfig,
    pub auth_token: Option<String>,
    pub allowed_roots: Vec<PathBuf>,
    pub limits: Limits,
    pub retention: Retention,
    pub workers: BTreeMap<String, Arc<WorkerDef>>,
    pub pipelines: BTreeMap<String, Arc<PipelineDef>>,
    pub workflows: Option<WorkflowLibrary>,
    pub diagnosis: Diagnosis,
    /// What `check` reports without refusing the file: commands not found on PATH.
    pub warnings: Vec<ConfigError>,
}

/// The running configuration, replaced as a whole by a reload. Readers take a snapshot.
#[derive(Clone)]
pub struct SharedConfig(Arc<std::sync::RwLock<Arc<Config>>>);

impl SharedConfig {
    pub fn new(config: Arc<Config>) -> Self {
        SharedConfig(Arc::new(std::sync::RwLock::new(config)))
    }

    pub fn get(&self) -> Arc<Config> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, config: Arc<Config>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = config;
    }
}

/// Prefix of the pipeline name a workflow chain runs under, e.g.
/// `workflow:ffmpeg.extract_keyframes,paddleocr.perform_ocr`. The name alone rebuilds the
/// pipeline, so recovery needs nothing else.
pub const WORKFLOW_PREFIX: &str = "workflow:";

#[derive(Clone)]
pub struct WorkflowLibrary {
    pub input_key: String,
    pub max_queued: u32,
    file_label: String,
    stages: BTreeMap<String, Spanned<LibraryStageFile>>,
    capacity: Capacity,
    standing: gpuflow_core::Inventory,
    workers: BTreeMap<String, Arc<WorkerDef>>,
}

impl fmt::Debug for WorkflowLibrary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkflowLibrary").field("stages", &self.stages.keys().collect::<Vec<_>>()).finish()
    }
}

impl WorkflowLibrary {
    pub fn stage_names(&self) -> Vec<&str> {
        self.stages.keys().map(String::as_str).collect()
    }

    /// Builds the pipeline for a chain of named stages, each after the one before it.
    pub fn chain(&self, chain: &[String]) -> Result<Arc<PipelineDef>, String> {
        self.build(chain, &[])
    }

    fn build(&self, chain: &[String], lenient_refs: &[String]) -> Result<Arc<PipelineDef>, String> {
        if chain.is_empty() {
            return Err("workflow_config.workflow_chain: must name at least one stage".into());
        }
        let mut stages = Vec::new();
        for (i, name) in chain.iter().enumerate() {
            let Some(def) = self.stages.get(name) else {
                return Err(format!(
                    "workflow_config.workflow_chain[{i}]: unknown stage `{name}`; known stages: {}",
                    self.stage_names().join(", ")
                ));
            };
            if chain[..i].contains(name) {
                return Err(format!("workflow_config.workflow_chain[{i}]: stage `{name}` appears twice"));
            }
            let l = def.value.clone();
            let stage = StageFile {
                name: workflow_stage_name(name),
                command: l.command,
                worker: l.worker,
                batch_key: l.batch_key,
                needs: l.needs,
                timeout: l.timeout,
                retry: l.retry,
                after: None,
                env: l.env,
                workdir: l.workdir,
                gpu_check: l.gpu_check,
                expected: l.expected,
            };
            stages.push(Spanned::new(stage, def.referenced, def.defined));
        }
        let file = PipelineFile { max_queued: Some(self.max_queued), inputs: BTreeMap::new(), stages };
        let name = format!("{WORKFLOW_PREFIX}{}", chain.join(","));
        let mut errors = Errors::new(&self.file_label);
        let def = compile_pipeline(
            &name,
            &file,
            &serde_saphyr::Location::UNKNOWN,
            &CompileContext {
                capacity: &self.capacity,
                standing: &self.standing,
                workers: &self.workers,
                lenient_refs,
                // A chain is built per request: no file-system lookups there.
                look_up_commands: false,
            },
            &mut errors,
        );
        match def {
            Some(def) if errors.list.is_empty() => {
                Ok(Arc::new(PipelineDef { path_inputs: vec![self.input_key.clone()], ..def }))
            }
            _ => {
                let reasons: Vec<String> = errors.list.iter().map(ToString::to_string).collect();
                Err(format!("workflow_config.workflow_chain: this chain cannot run: {}", reasons.join("; ")))
            }
        }
    }
}

/// A library stage's name inside a chain: templates split on `.`, so dots become `_`.
pub fn workflow_stage_name(library_name: &str) -> String {
    library_name.replace('.', "_")
}

impl Config {
    /// A pipeline by the name a job records: a declared pipeline or a workflow chain.
    pub fn pipeline(&self, name: &str) -> Result<Arc<PipelineDef>, String> {
        if let Some(def) = self.pipelines.get(name) {
            return Ok(def.clone());
        }
        if let Some(chain) = name.strip_prefix(WORKFLOW_PREFIX) {
            let library = self.workflows.as_ref().ok_or("this file declares no `workflows:` library")?;
            let chain: Vec<String> = chain.split(',').map(str::to_string).collect();
            return library.chain(&chain);
        }
        Err(format!("pipeline `{name}` is not declared"))
    }
}

struct Errors {
    file: String,
    list: Vec<ConfigError>,
    /// Problems that do not stop the file from loading (a command not found on PATH).
    warnings: Vec<ConfigError>,
}

impl Errors {
    fn new(file: &str) -> Errors {
        Errors { file: file.to_string(), list: Vec::new(), warnings: Vec::new() }
    }

    fn warn(&mut self, loc: &serde_saphyr::Location, field: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(ConfigError {
            file: self.file.clone(),
            line: loc.line(),
            column: loc.column(),
            field: field.into(),
            message: message.into(),
        });
    }

    fn at(&mut self, loc: &serde_saphyr::Location, field: impl Into<String>, message: impl Into<String>) {
        self.list.push(ConfigError {
            file: self.file.clone(),
            line: loc.line(),
            column: loc.column(),
            field: field.into(),
            message: message.into(),
        });
    }
}

impl Config {
    pub fn load(path: &Path, probe: &dyn GpuProbe) -> Result<Config, ConfigErrors> {
        let label = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: label.clone(),
                line: 0,
                column: 0,
                field: String::new(),
                message: format!("cannot read: {e}"),
            }])
        })?;
        let mut config = Config::parse(&text, &label, probe)?;
        config.path = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses and checks a whole file. `label` names it in errors.
    pub fn parse(text: &str, label: &str, probe: &dyn GpuProbe) -> Result<Config, ConfigErrors> {
        let file: FileConfig = shape::read(text, label).map_err(ConfigErrors)?;
        let mut errors = Errors::new(label);
        let start = serde_saphyr::Location::UNKNOWN;

        let listen = match &file.listen {
            None => DEFAULT_LISTEN.parse().expect("valid default"),
            Some(s) => s.value.parse().unwrap_or_else(|_| {
                errors.at(
                    &s.referenced,
                    "listen",
                    format!("`{}` is not an address; write `HOST:PORT`, e.g. `127.0.0.1:7070`", s.value),
                );
                DEFAULT_LISTEN.parse().expect("valid default")
            }),
        };

        let store = match &file.store {
            None => StoreSetting::Sqlite,
            Some(s) => StoreSetting::parse(&s.value).unwrap_or_else(|message| {
                errors.at(&s.referenced, "store", message);
                StoreSetting::Sqlite
            }),
        };
        let cluster = ClusterSettings {
            name: file.cluster.name.clone(),
            lease_ttl_ms: file.cluster.lease_ttl.map(|m| m.0).unwrap_or(10_000),
            poll_interval_ms: file.cluster.poll_interval.map(|m| m.0).unwrap_or(1_000),
            unrunnable_after_ms: file.cluster.unrunnable_after.map(|m| m.0).unwrap_or(300_000),
        };
        if cluster.lease_ttl_ms < 1_000 {
            errors.at(
                &start,
                "cluster.lease_ttl",
                format!("{} ms is too short to renew reliably; use at least 1s", cluster.lease_ttl_ms),
            );
        }
        if cluster.poll_interval_ms < 50 {
            errors.at(&start, "cluster.poll_interval", "must be at least 50ms");
        }
        if cluster.unrunnable_after_ms < 1_000 {
            errors.at(
                &start,
                "cluster.unrunnable_after",
                format!(
                    "{} ms leaves agents no time to claim a stage; use at least 1s (default 5m)",
                    cluster.unrunnable_after_ms
                ),
            );
        }
        if let Some(floor) = file.diagnosis.stall_cpu_floor
            && !(floor > 0.0 && floor <= 100.0)
        {
            errors.at(
                &start,
                "diagnosis.stall_cpu_floor",
                format!("{floor} is not a share of one core; give a percentage above 0 and at most 100, e.g. 2"),
            );
        }

        let (gpus, gpu_loc) = match &file.resources.gpus {
            None => (probe.discover(), start),
            Some(spanned) => (
                match &spanned.value {
                    GpusFile::Auto => probe.discover(),
                    GpusFile::None => Vec::new(),
                    GpusFile::Virtual(list) => list
                        .iter()
                        .enumerate()
                        .map(|(i, g)| GpuInfo {
                            name: g.name.clone().unwrap_or_else(|| format!("virtual-gpu-{i}")),
                            uuid: None,
                            memory: g.memory.0,
                            source: GpuSource::Virtual,
                            telemetry: g.telemetry.clone(),
                        })
                        .collect(),
                },
                spanned.referenced,
            ),
        };
        for (i, g) in gpus.iter().enumerate() {
            if g.memory == 0 {
                errors.at(&gpu_loc, format!("resources.gpus[{i}].memory"), "must be more than 0");
            }
        }
        let cpu = file
            .resources
            .cpu
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1));
        let mut capacity = Capacity {
            gpus: gpus.iter().enumerate().map(|(i, g)| GpuDevice { index: i as u32, memory: g.memory }).collect(),
            cpu,
            counters: file.resources.counters.clone(),
        };
        let workers = compile_workers(&file.workers, &capacity, &mut errors);
        for (name, w) in &workers {
            if file.resources.counters.contains_key(&pool_counter(name)) {
                errors.at(
                    &start,
                    format!("resources.counters.{}", pool_counter(name)),
                    "the `pool:` prefix is reserved for worker pools",
                );
            }
            capacity.counters.insert(pool_counter(name), w.units());
        }
        let standing = standing_inventory(&capacity, &workers);

        let auth_token = match file.auth {
            None => None,
            Some(AuthFile { token: Some(t), token_file: None }) => Some(t),
            Some(AuthFile { token: None, token_file: Some(p) }) => match std::fs::read_to_string(&p) {
                Ok(t) => Some(t.trim().to_string()),
                Err(e) => {
                    errors.at(&start, "auth.token_file", format!("cannot read `{}`: {e}", p.display()));
                    None
                }
            },
            Some(_) => {
                errors.at(&start, "auth", "set exactly one of `token` or `token_file`");
                None
            }
        };
        if auth_token.as_ref().is_some_and(|t| t.len() < 16) {
            errors.at(&start, "auth.token", "must be at least 16 characters");
        }

        let mut pipelines = BTreeMap::new();
        for (name, spanned) in &file.pipelines {
            if !is_identifier(name) {
                errors.at(
                    &spanned.referenced,
                    format!("pipelines.{name}"),
                    "pipeline names may use a-z, A-Z, 0-9, `_` and `-`",
                );
            }
            let ctx = CompileContext {
                capacity: &capacity,
                standing: &standing,
                workers: &workers,
                lenient_refs: &[],
                look_up_commands: true,
            };
            if let Some(def) = compile_pipeline(name, &spanned.value, &spanned.referenced, &ctx, &mut errors) {
                pipelines.insert(name.clone(), Arc::new(def));
            }
        }
        let workflows = file.workflows.as_ref().map(|w| {
            for (name, stage) in &w.value.stages {
                if !name.split('.').all(is_identifier) {
                    errors.at(
                        &stage.referenced,
                        format!("workflows.stages.{name}"),
                        "stage names may use a-z, A-Z, 0-9, `_`, `-` and `.`",
                    );
                }
                if !is_identifier(&workflow_stage_name(name))
                    || w.value.stages.keys().filter(|k| workflow_stage_name(k) == workflow_stage_name(name)).count() > 1
                {
                    errors.at(
                        &stage.referenced,
                        format!("workflows.stages.{name}"),
                        "names must stay distinct when `.` becomes `_`",
                    );
                }
            }
            // Check every library stage as a chain of one, so mistakes show up at check time.
            // Its references to other library stages are checked per request, against the chain.
            let all: Vec<String> = w.value.stages.keys().map(|k| workflow_stage_name(k)).collect();
            let library = WorkflowLibrary {
                input_key: w.value.input.clone().unwrap_or_else(|| "video_path".into()),
                max_queued: w.value.max_queued.unwrap_or(1_000),
                file_label: label.to_string(),
                stages: w.value.stages.clone(),
                capacity: capacity.clone(),
                standing: standing.clone(),
                workers: workers.clone(),
            };
            for name in w.value.stages.keys() {
                if let Err(e) = library.build(std::slice::from_ref(name), &all) {
                    errors.at(&w.value.stages[name].referenced, format!("workflows.stages.{name}"), e);
                }
            }
            library
        });
        if file.pipelines.is_empty() && file.workflows.is_none() {
            errors.at(&start, "pipelines", "declare at least one pipeline (or a `workflows:` library)");
        }

        let limits = Limits {
            max_request_body: file.limits.max_request_body.map(|b| b.0 as usize).unwrap_or(1 << 20),
            log_max: file.limits.log_max.map(|b| b.0).unwrap_or(16 << 20),
            output_max: file.limits.output_max.map(|b| b.0).unwrap_or(1 << 20),
            kill_grace_ms: file.limits.kill_grace.map(|m| m.0).unwrap_or(5_000),
            header_read_timeout_ms: file.limits.header_read_timeout.map(|m| m.0).unwrap_or(10_000),
            idle_timeout_ms: file.limits.idle_timeout.map(|m| m.0).unwrap_or(60_000),
            max_connections: file.limits.max_connections.unwrap_or(1024),
        };
        for (key, value) in [
            ("header_read_timeout", limits.header_read_timeout_ms),
            ("idle_timeout", limits.idle_timeout_ms),
            ("max_connections", limits.max_connections as u64),
        ] {
            if value == 0 {
                errors.at(&start, format!("limits.{key}"), "must be more than 0");
            }
        }

        if !errors.list.is_empty() {
            // In file order; errors with no position (whole-file checks) last.
            errors.list.sort_by_key(|e| (e.line == 0, e.line, e.column));
            return Err(ConfigErrors(errors.list));
        }
        Ok(Config {
            path: None,
            source: text.to_string(),
            listen,
            data_dir: file.data_dir.unwrap_or_else(|| PathBuf::from("./gpuflow-data")),
            store,
            cluster,
            gpus,
            capacity,
            scheduler: SchedulerConfig {
                reserve_after_ms: file
                    .scheduling
                    .reserve_after
                    .map(|m| m.0)
                    .unwrap_or(SchedulerConfig::default().reserve_after_ms),
            },
            auth_token,
            allowed_roots: file.allowed_roots,
            limits,
            retention: Retention {
                succeeded_ms: file.retention.succeeded.and_then(|k| k.0),
                failed_ms: file.retention.failed.and_then(|k| k.0),
                cancelled_ms: file.retention.cancelled.and_then(|k| k.0),
                interval_ms: file.retention.interval.map(|m| m.0.max(100)).unwrap_or(60_000),
            },
            workers,
            pipelines,
            workflows,
            warnings: errors.warnings,
            diagnosis: {
                let d = &file.diagnosis;
                let defaults = gpuflow_core::diagnosis::Thresholds::default();
                Diagnosis {
                    sample_interval_ms: d.sample_interval.map(|m| m.0.max(100)).unwrap_or(1_000),
                    thresholds: gpuflow_core::diagnosis::Thresholds {
                        task_stall_ms: d.task_stall.map(|m| m.0).unwrap_or(defaults.task_stall_ms),
                        gpu_idle_ms: d.gpu_idle.map(|m| m.0).unwrap_or(defaults.gpu_idle_ms),
                        queue_stall_ms: d.queue_stall.map(|m| m.0).unwrap_or(defaults.queue_stall_ms),
                        gpu_use_window_ms: d.gpu_use_window.map(|m| m.0).unwrap_or(defaults.gpu_use_window_ms),
                        shm_min_bytes: d.shm_min.map(|b| b.0).unwrap_or(defaults.shm_min_bytes),
                        idle_utilization_pct: defaults.idle_utilization_pct,
                        stall_cpu_floor_pct: d.stall_cpu_floor.unwrap_or(defaults.stall_cpu_floor_pct),
                        finding_clear_ms: d.finding_clear.map(|m| m.0).unwrap_or(defaults.finding_clear_ms),
                        zombie_grace_ms: defaults.zombie_grace_ms,
                    },
                }
            },
        })
    }
}

/// What compiling a pipeline checks against.
#[derive(Clone, Copy)]
struct CompileContext<'a> {
    capacity: &'a Capacity,
    /// The inventory once every pool instance holds its standing lease.
    standing: &'a gpuflow_core::Inventory,
    workers: &'a BTreeMap<String, Arc<WorkerDef>>,
    /// Stage names templates may name without being ancestors (checking a library stage alone).
    lenient_refs: &'a [String],
    /// Warn about programs not found on PATH (when reading the file, not per request).
    look_up_commands: bool,
}

/// The inventory with every pool instance's standing lease taken, as at engine start.
fn standing_inventory(capacity: &Capacity, workers: &BTreeMap<String, Arc<WorkerDef>>) -> gpuflow_core::Inventory {
    let mut inventory = gpuflow_core::Inventory::new(capacity.clone());
    let none = inventory.new_reservation();
    for w in workers.values() {
        for device in &w.slots {
            let _ = inventory.try_grant_on(&w.needs, &none, *device);
        }
    }
    inventory
}

fn compile_workers(
    files: &BTreeMap<String, Spanned<WorkerFile>>,
    capacity: &Capacity,
    errors: &mut Errors,
) -> BTreeMap<String, Arc<WorkerDef>> {
    let mut out = BTreeMap::new();
    // Instances hold their resources for their lifetime: all of them must fit at once, next
    // to each other, or some instance could never start.
    let mut inventory = gpuflow_core::Inventory::new(capacity.clone());
    let none = inventory.new_reservation();
    for (name, spanned) in files {
        let (w, at) = (&spanned.value, &spanned.referenced);
        let field = |f: &str| format!("workers.{name}.{f}");
        if !is_identifier(name) {
            errors.at(at, format!("workers.{name}"), "pool names may use a-z, A-Z, 0-9, `_` and `-`");
        }
        if w.command.is_empty() || w.command[0].is_empty() {
            errors.at(at, field("command"), "must name a program to run, e.g. `[python3, worker.py]`");
        } else if let Some(missing) = not_on_path(&w.command[0], w.env.get("PATH").map(String::as_str)) {
            errors.warn(at, field("command"), missing);
        }
        let needs = match &w.needs {
            None => ResourceRequest::default(),
            Some(n) => ResourceRequest {
                gpus: n.gpu,
                gpu_memory: n.gpu_memory.map(|b| b.0).unwrap_or(0),
                cpu: n.cpu,
                counters: n.counters.clone(),
            },
        };
        if let Err(e) = needs.check_fits(capacity) {
            errors.at(at, field("needs"), format!("{e}; an instance could never start"));
        }
        let slots: Vec<Option<u32>> = match (w.instances, w.per_gpu) {
            (Some(0), None) | (None, Some(0)) => {
                errors.at(at, field("instances"), "a pool needs at least one instance");
                vec![]
            }
            (Some(n), None) => vec![None; n as usize],
            (None, Some(n)) => {
                if !needs.uses_gpu() {
                    errors.at(
                        at,
                        field("per_gpu"),
                        "per_gpu needs a GPU request in `needs` (`gpu: 1` or `gpu_memory: SIZE`)",
                    );
                }
                if capacity.gpus.is_empty() {
                    errors.at(at, field("per_gpu"), "the inventory has no GPU; use `instances: N`");
                }
                (0..capacity.gpus.len() as u32).flat_map(|d| std::iter::repeat_n(Some(d), n as usize)).collect()
            }
            (None, None) => vec![None],
            (Some(_), Some(_)) => {
                errors.at(at, field("instances"), "set `instances` or `per_gpu`, not both");
                vec![]
            }
        };
        for (i, device) in slots.iter().enumerate() {
            if inventory.try_grant_on(&needs, &none, *device).is_none() {
                errors.at(
                    at,
                    field("needs"),
                    format!(
                        "instance {i} does not fit: the pools' instances together need more than the inventory has"
                    ),
                );
                break;
            }
        }
        if w.heartbeat_timeout == Some(Millis(0)) || w.startup_timeout == Some(Millis(0)) {
            errors.at(at, field("heartbeat_timeout"), "timeouts must be more than 0");
        }
        let prefetch = w.prefetch.unwrap_or(1);
        if prefetch > MAX_PREFETCH {
            errors.at(
                at,
                field("prefetch"),
                format!(
                    "{prefetch} is more than the most an instance may hold queued ({MAX_PREFETCH}); \
                     a few tasks ahead are enough to keep an instance busy between turns: use e.g. `prefetch: 2`"
                ),
            );
        }
        let batch = w.batch.as_ref().map(|b| {
            let max_size = b.max_size.unwrap_or(0);
            if max_size == 0 || max_size > MAX_BATCH_SIZE {
                let value = b.max_size.map_or("missing".to_string(), |n| format!("`{n}`"));
                errors.at(
                    at,
                    field("batch.max_size"),
                    format!(
                        "{value} is not a batch size; write how many tasks one batch may hold, from 1 to {MAX_BATCH_SIZE}, e.g. `batch: {{max_size: 32, max_wait: 5ms}}`"
                    ),
                );
            }
            BatchDef { max_size: max_size.clamp(1, MAX_BATCH_SIZE), max_wait_ms: b.max_wait.map_or(0, |m| m.0) }
        });
        out.insert(
            name.clone(),
            Arc::new(WorkerDef {
                name: name.clone(),
                command: w.command.clone(),
                slots,
                needs,
                startup_timeout_ms: w.startup_timeout.map(|m| m.0).unwrap_or(120_000),
                heartbeat_timeout_ms: w.heartbeat_timeout.map(|m| m.0).unwrap_or(30_000),
                max_tasks_per_instance: w.max_tasks_per_instance.filter(|n| *n > 0),
                prefetch: prefetch.min(MAX_PREFETCH),
                batch,
                env: w.env.clone(),
                workdir: w.workdir.clone(),
                gpu_check: w.gpu_check,
            }),
        );
    }
    out
}

/// The YAML crate starts its message with "error: line L column C: ", which our own prefix
/// already says.
fn strip_position(rendered: &str) -> &str {
    rendered
        .strip_prefix("error: line ")
        .and_then(|rest| rest.split_once(": "))
        .map(|(_, message)| message)
        .unwrap_or(rendered)
}

/// A path through `after` edges that comes back to where it started, run order first
/// (`[a, b, c, a]`: b runs after a, c after b, a after c), reached from `from`.
fn find_cycle(after: &[Vec<usize>], from: usize) -> Option<Vec<usize>> {
    // Walk predecessors depth first; a stage met again on the current path closes the cycle.
    fn walk(after: &[Vec<usize>], at: usize, path: &mut Vec<usize>, done: &mut [bool]) -> Option<Vec<usize>> {
        if let Some(i) = path.iter().position(|&p| p == at) {
            let mut cycle: Vec<usize> = path[i..].to_vec();
            cycle.push(at);
            // The path follows "runs after" backwards; show it in run order.
            cycle.reverse();
            return Some(cycle);
        }
        if done[at] {
            return None;
        }
        path.push(at);
        for &before in &after[at] {
            if let Some(cycle) = walk(after, before, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done[at] = true;
        None
    }
    let mut done = vec![false; after.len()];
    walk(after, from, &mut Vec::new(), &mut done)
        .or_else(|| (0..after.len()).find_map(|s| walk(after, s, &mut Vec::new(), &mut done)))
}

/// Why `program` (a stage's argv[0]) would not be found, when it is a bare name that no
/// directory of PATH holds as an executable. Paths, templates and built-ins are not looked up.
fn not_on_path(program: &str, stage_path: Option<&str>) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') || program.contains('{') || program == crate::runtime::NOOP_COMMAND {
        return None;
    }
    let path = stage_path.map(std::ffi::OsString::from).or_else(|| std::env::var_os("PATH")).unwrap_or_default();
    let found = std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(program)).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    });
    (!found).then(|| {
        let source = if stage_path.is_some() { "the stage's `env.PATH`" } else { "PATH" };
        format!(
            "command `{program}` is not found in any directory of {source}; install it, or give its full path (the engine looks it up again, on its own PATH, when the stage runs)"
        )
    })
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn compile_pipeline(
    name: &str,
    file: &PipelineFile,
    loc: &serde_saphyr::Location,
    ctx: &CompileContext,
    errors: &mut Errors,
) -> Option<PipelineDef> {
    let CompileContext { capacity, standing, workers, lenient_refs, look_up_commands } = *ctx;
    let before = errors.list.len();
    let mut positions: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, stage) in file.stages.iter().enumerate() {
        let field = format!("pipelines.{name}.stages[{i}].name");
        if !is_identifier(&stage.value.name) {
            errors.at(&stage.referenced, field, "stage names may use a-z, A-Z, 0-9, `_` and `-`");
        } else if positions.insert(&stage.value.name, i).is_some() {
            errors.at(&stage.referenced, field, format!("stage `{}` is declared twice", stage.value.name));
        }
    }
    if file.stages.is_empty() {
        errors.at(loc, format!("pipelines.{name}.stages"), "a pipeline needs at least one stage");
        return None;
    }

    let mut specs = Vec::new();
    for (i, spanned) in file.stages.iter().enumerate() {
        let stage = &spanned.value;
        let at = &spanned.referenced;
        let field = |f: &str| format!("pipelines.{name}.stages[{i}].{f}");
        let after: Vec<usize> = match &stage.after {
            // Default: the previous stage, so a plain list is a chain.
            None => {
                if i == 0 {
                    vec![]
                } else {
                    vec![i - 1]
                }
            }
            Some(list) => list
                .iter()
                .filter_map(|a| match positions.get(a.value.as_str()) {
                    Some(p) => Some(*p),
                    None => {
                        let known: Vec<&str> = positions.keys().copied().collect();
                        errors.at(
                            &a.referenced,
                            field("after"),
                            format!(
                                "unknown stage `{}`; stages of this pipeline: {}{}",
                                a.value,
                                known.join(", "),
                                shape::suggestion(&a.value, known.iter().copied())
                            ),
                        );
                        None
                    }
                })
                .collect(),
        };
        let needs = match (&stage.worker, &stage.needs) {
            // A worker stage holds one ready instance of its pool; the instance holds the rest.
            (Some(pool), None) => {
                ResourceRequest { counters: BTreeMap::from([(pool_counter(pool), 1)]), ..Default::default() }
            }
            (Some(_), Some(_)) => {
                errors.at(
                    at,
                    field("needs"),
                    "a worker stage holds an instance of its pool; declare `needs` on the pool under `workers:`",
                );
                ResourceRequest::default()
            }
            // A command with no declared needs runs on the CPU: it holds one CPU slot.
            (None, None) => ResourceRequest { cpu: 1, ..Default::default() },
            (None, Some(n)) => ResourceRequest {
                gpus: n.gpu,
                gpu_memory: n.gpu_memory.map(|b| b.0).unwrap_or(0),
                cpu: n.cpu,
                counters: n.counters.clone(),
            },
        };
        if let Some(pool) = &stage.worker
            && !workers.contains_key(pool)
        {
            let known: Vec<&str> = workers.keys().map(String::as_str).collect();
            let known = if known.is_empty() { "none".to_string() } else { known.join(", ") };
            errors.at(
                at,
                field("worker"),
                format!(
                    "unknown worker pool `{pool}`; pools under `workers:`: {known}{}",
                    shape::suggestion(pool, workers.keys().map(String::as_str))
                ),
            );
        } else if let Err(e) = needs.check_fits(capacity) {
            errors.at(at, field("needs"), format!("{e}; this request could never be granted"));
        } else if standing.clone().try_grant(&needs, &standing.new_reservation()).is_none() {
            errors.at(
                at,
                field("needs"),
                "could never be granted next to the worker pools' instances, which hold their `needs` for their lifetime; shrink the pools' needs or this request",
            );
        }
        let defaults = RetryPolicy::default();
        let retry = match &stage.retry {
            None => defaults,
            Some(r) => {
                let backoff = r.backoff.as_ref();
                RetryPolicy {
                    max_attempts: r.max_attempts.unwrap_or(defaults.max_attempts),
                    initial_backoff_ms: backoff
                        .and_then(|b| b.initial)
                        .map(|m| m.0)
                        .unwrap_or(defaults.initial_backoff_ms),
                    multiplier: backoff.and_then(|b| b.multiplier).unwrap_or(defaults.multiplier),
                    max_backoff_ms: backoff.and_then(|b| b.max).map(|m| m.0).unwrap_or(defaults.max_backoff_ms),
                }
            }
        };
        if retry.max_attempts == 0 {
            errors.at(at, field("retry.max_attempts"), "must be at least 1 (1 means no retry)");
        }
        if !(retry.multiplier >= 1.0 && retry.multiplier.is_finite()) {
            errors.at(
                at,
                field("retry.backoff.multiplier"),
                format!("`{}` is not allowed; use a number >= 1", retry.multiplier),
            );
        }
        if stage.timeout == Some(Millis(0)) {
            errors.at(at, field("timeout"), "must be more than 0; leave it out for no limit");
        }
        if stage.expected == Some(Millis(0)) {
            errors.at(
                at,
                field("expected"),
                "`0s` is not a duration a stage can take; write how long one attempt usually runs (e.g. `3s`), or leave it out to use the mean of its recent attempts",
            );
        }
        specs.push(StageSpec {
            name: stage.name.clone(),
            needs,
            after,
            timeout_ms: stage.timeout.map(|m| m.0),
            retry,
            expected_ms: stage.expected.map(|m| m.0),
        });
    }
    // Stage errors above do not stop the checks below: each reports what it finds, so one run
    // of `check` lists every independent error.
    let stage_errors = errors.list.len() > before;
    let after_lists: Vec<Vec<usize>> = specs.iter().map(|s| s.after.clone()).collect();
    let pipeline = match Pipeline::new(name, specs) {
        Ok(p) => Some(p),
        // Already reported, per stage.
        Err(PipelineError::UnknownPredecessor { .. }) if stage_errors => None,
        Err(e) => {
            let (at, msg) = match e {
                PipelineError::Cycle { stage } => {
                    let cycle = find_cycle(&after_lists, stage).unwrap_or_else(|| vec![stage, stage]);
                    let names: Vec<&str> = cycle.iter().map(|&i| file.stages[i].value.name.as_str()).collect();
                    (
                        &file.stages[cycle[0]].referenced,
                        format!(
                            "`after` edges form a cycle: {} (each runs after the one before it), so none of them can start; remove one of these `after` entries",
                            names.join(" -> ")
                        ),
                    )
                }
                other => (loc, other.to_string()),
            };
            errors.at(at, format!("pipelines.{name}.stages"), msg);
            None
        }
    };

    let inputs: BTreeMap<String, InputSpec> = file
        .inputs
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                InputSpec {
                    kind: v.kind,
                    required: v.required.unwrap_or(v.default.is_none()),
                    default: v.default.clone(),
                },
            )
        })
        .collect();

    let mut stages = Vec::new();
    for (i, spanned) in file.stages.iter().enumerate() {
        let stage = &spanned.value;
        let field = format!("pipelines.{name}.stages[{i}].command");
        let command = match (&stage.command, &stage.worker) {
            (Some(_), Some(_)) => {
                errors.at(
                    &spanned.referenced,
                    field,
                    "set `command` (run a program per attempt) or `worker` (run on a pool), not both",
                );
                continue;
            }
            (None, Some(pool)) => {
                if !stage.env.is_empty() || stage.workdir.is_some() {
                    errors.at(
                        &spanned.referenced,
                        format!("pipelines.{name}.stages[{i}].env"),
                        "`env` and `workdir` of a worker stage belong to its pool under `workers:`",
                    );
                }
                let batch_key = stage.batch_key.as_ref().and_then(|key| {
                    batch_key(key, pool, workers, &inputs, &format!("pipelines.{name}.stages[{i}].batch_key"))
                        .map_err(|e| {
                            errors.at(&spanned.referenced, format!("pipelines.{name}.stages[{i}].batch_key"), e)
                        })
                        .ok()
                });
                stages.push(StageExec::Worker { pool: pool.clone(), batch_key });
                continue;
            }
            (Some(_), None) if stage.batch_key.is_some() => {
                errors.at(
                    &spanned.referenced,
                    format!("pipelines.{name}.stages[{i}].batch_key"),
                    "only a worker stage is batched; remove `batch_key`, or run the stage on a pool with `worker:`",
                );
                continue;
            }
            (Some(command), None) => command,
            (None, None) => {
                errors.at(&spanned.referenced, field, "a stage needs `command` (an argv list such as `[python3, infer.py, \"{input.video}\"]`) or `worker` (a pool name)");
                continue;
            }
        };
        if command.is_empty() || command[0].value.is_empty() {
            errors.at(&spanned.referenced, field, "must name a program to run, e.g. `[python3, infer.py]`");
            continue;
        }
        let stage_env_path = stage.env.get("PATH").map(String::as_str);
        if look_up_commands && let Some(missing) = not_on_path(&command[0].value, stage_env_path) {
            errors.warn(&command[0].referenced, format!("{field}[0]"), format!("stage `{}`: {missing}", stage.name));
        }
        let lookup = |stage_name: &str| -> Result<usize, String> {
            match positions.get(stage_name) {
                // Without a graph (a cycle), only whether the stage exists is checked.
                Some(p) if pipeline.as_ref().is_none_or(|g| g.is_ancestor(*p, i)) => Ok(*p),
                Some(_) => Err(format!(
                    "stage `{stage_name}` does not run before `{}`; only stages it comes `after` (directly or not) can be referenced",
                    stage.name
                )),
                // Checking a workflow-library stage alone: it may name any library stage.
                None if lenient_refs.iter().any(|r| r == stage_name) => Ok(0),
                None => Err(format!(
                    "unknown stage `{stage_name}`; stages of this pipeline: {}{}",
                    positions.keys().copied().collect::<Vec<_>>().join(", "),
                    shape::suggestion(stage_name, positions.keys().copied())
                )),
            }
        };
        let mut templates = Vec::new();
        // Template errors point at the argument that holds the template, not at the stage.
        for (position, arg) in command.iter().enumerate() {
            let arg_field = format!("{field}[{position}]");
            match Template::parse(&arg.value, &lookup) {
                Ok(t) => {
                    for r in t.references() {
                        if let template::Reference::Input(path) = r
                            && !inputs.is_empty()
                            && !inputs.contains_key(&path[0])
                        {
                            let declared: Vec<&str> = inputs.keys().map(String::as_str).collect();
                            errors.at(
                                &arg.referenced,
                                arg_field.clone(),
                                format!(
                                    "`{{input.{}}}`: input `{}` is not declared; declared inputs: {}{}",
                                    path.join("."),
                                    path[0],
                                    declared.join(", "),
                                    shape::suggestion(&path[0], declared.iter().copied())
                                ),
                            );
                        }
                    }
                    templates.push(t);
                }
                Err(e) => errors.at(&arg.referenced, arg_field, e),
            }
        }
        stages.push(StageExec::Command {
            command: templates,
            env: stage.env.clone(),
            workdir: stage.workdir.clone(),
            gpu_check: stage.gpu_check,
        });
    }
    let pipeline = pipeline.filter(|_| errors.list.len() == before)?;
    let path_inputs = inputs.iter().filter(|(_, spec)| spec.kind == InputKind::Path).map(|(k, _)| k.clone()).collect();
    Some(PipelineDef {
        core: Arc::new(pipeline),
        stages,
        inputs,
        path_inputs,
        max_queued: file.max_queued.unwrap_or(1_000),
    })
}

/// Parses a worker stage's `batch_key`: a template over the job input only, on a pool that
/// batches.
fn batch_key(
    text: &str,
    pool: &str,
    workers: &BTreeMap<String, Arc<WorkerDef>>,
    inputs: &BTreeMap<String, InputSpec>,
    field: &str,
) -> Result<Template, String> {
    if workers.get(pool).is_some_and(|w| w.batch.is_none()) {
        return Err(format!(
            "`{text}`: pool `{pool}` does not batch; add `batch: {{max_size: 32, max_wait: 5ms}}` to workers.{pool}, or remove `batch_key`"
        ));
    }
    let only_input = |stage: &str| -> Result<usize, String> {
        Err(format!("`{{stages.{stage}...}}`: {field} may only read the job input, e.g. `{{input.model}}`"))
    };
    let template = Template::parse(text, &only_input)?;
    for r in template.references() {
        match r {
            template::Reference::Input(path) if !inputs.is_empty() && !inputs.contains_key(&path[0]) => {
                let declared: Vec<&str> = inputs.keys().map(String::as_str).collect();
                return Err(format!(
                    "`{{input.{}}}`: input `{}` is not declared; declared inputs: {}",
                    path.join("."),
                    path[0],
                    declared.join(", ")
                ));
            }
            template::Reference::Input(_) => {}
            _ => {
                return Err(format!(
                    "`{text}`: {field} may only read the job input (e.g. `{{input.model}}`); `{{job.id}}` and `{{job.dir}}` differ for every job, so no two tasks would share a batch"
                ));
            }
        }
    }
    if template.references().next().is_none() {
        return Err(format!(
            "`{text}` reads nothing from the input, so every task has the same key; write e.g. `{{input.model}}`, or remove `batch_key`"
        ));
    }
    Ok(template)
}

/// The OS limits on one command line, as admission checks them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArgLimits {
    /// Longest single argument, in bytes.
    pub per_arg: usize,
    /// Most bytes all arguments may take together (strings, their NULs and pointers), after
    /// the environment every stage gets.
    pub total: usize,
}

impl ArgLimits {
    /// This host's limits: `ARG_MAX` less the engine's own environment (which stages inherit)
    /// and room for the `GPUFLOW_*` variables; on Linux, also 128 KiB per argument.
    pub fn of_this_os() -> ArgLimits {
        static LIMITS: std::sync::OnceLock<ArgLimits> = std::sync::OnceLock::new();
        *LIMITS.get_or_init(|| {
            // SAFETY: sysconf has no preconditions.
            let arg_max = unsafe { libc::sysconf(libc::_SC_ARG_MAX) };
            let arg_max = if arg_max > 0 { arg_max as usize } else { 128 * 1024 };
            let env: usize = std::env::vars_os().map(|(k, v)| k.len() + v.len() + 2 + 8).sum();
            let total = arg_max.saturating_sub(env + 8 * 1024);
            // Linux's MAX_ARG_STRLEN: 32 pages, the terminating NUL included.
            let per_arg = if cfg!(target_os = "linux") { 32 * 4096 - 1 } else { total };
            ArgLimits { per_arg, total }
        })
    }
}

/// Why a job's input cannot make a command line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommandInputError {
    #[error("{0}; a value used in a command line cannot hold a NUL byte")]
    Nul(InputError),
    #[error("{0}")]
    TooLong(String),
}

/// A rejected job input: which field, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("input.{field}: {message}")]
pub struct InputError {
    pub field: String,
    pub message: String,
}

impl PipelineDef {
    /// Checks a job input against the declared inputs, fills defaults, and resolves paths
    /// inside `allowed_roots`. Undeclared keys are refused when inputs are declared.
    pub fn validate_input(&self, input: &Value, allowed_roots: &[PathBuf]) -> Result<Value, InputError> {
        let err = |field: &str, message: String| InputError { field: field.to_string(), message };
        let Value::Object(map) = input else {
            return Err(err("", format!("the input must be a JSON object, got {}", type_name(input))));
        };
        if self.inputs.is_empty() {
            return Ok(input.clone());
        }
        let mut out = serde_json::Map::new();
        for key in map.keys() {
            if !self.inputs.contains_key(key) {
                let declared: Vec<&str> = self.inputs.keys().map(String::as_str).collect();
                return Err(err(key, format!("unknown input; this pipeline takes: {}", declared.join(", "))));
            }
        }
        for (key, spec) in &self.inputs {
            let value = match map.get(key).or(spec.default.as_ref()) {
                Some(v) => v,
                None if spec.required => return Err(err(key, "is required".into())),
                None => continue,
            };
            let ok = match spec.kind {
                InputKind::Any => true,
                InputKind::String | InputKind::Path => value.is_string(),
                InputKind::Number => value.is_number(),
                InputKind::Integer => value.is_i64() || value.is_u64(),
                InputKind::Boolean => value.is_boolean(),
                InputKind::Object => value.is_object(),
                InputKind::Array => value.is_array(),
            };
            if !ok {
                return Err(err(key, format!("expected {:?}, got {}", spec.kind, type_name(value)).to_lowercase()));
            }
            if let Some(s) = value.as_str()
                && s.contains('\0')
                && matches!(spec.kind, InputKind::String | InputKind::Path)
            {
                return Err(err(key, "holds a NUL byte, which no command line, environment or path can carry".into()));
            }
            let value = if spec.kind == InputKind::Path {
                let raw = value.as_str().expect("checked");
                Value::String(check_path(raw, allowed_roots).map_err(|m| err(key, m))?.display().to_string())
            } else {
                value.clone()
            };
            out.insert(key.clone(), value);
        }
        Ok(Value::Object(out))
    }
}

impl PipelineDef {
    /// Renders what admission can of each command stage's argv (stage outputs count as empty)
    /// so that a value no process could be started with is refused now, not when the stage
    /// runs: a NUL byte, or a command line over the OS limits.
    pub fn check_command_input(
        &self,
        input: &Value,
        job_dir: &str,
        limits: ArgLimits,
    ) -> Result<(), CommandInputError> {
        // Job ids are 26 to 36 characters; count the longest.
        let job_id = "x".repeat(36);
        let ctx = template::RenderContext { input, outputs: &[], job_dir, job_id: &job_id };
        for (index, stage) in self.stages.iter().enumerate() {
            let StageExec::Command { command, env, .. } = stage else { continue };
            let name = &self.core.stages[index].name;
            let mut total: usize = env.iter().map(|(k, v)| k.len() + v.len() + 2 + 8).sum();
            for (position, template) in command.iter().enumerate() {
                let (len, nul) = template.admission_check(&ctx);
                if let Some(field) = nul {
                    return Err(CommandInputError::Nul(InputError {
                        field,
                        message: format!("holds a NUL byte and stage `{name}` puts it in its command line"),
                    }));
                }
                if len > limits.per_arg {
                    return Err(CommandInputError::TooLong(format!(
                        "stage `{name}`: argument {position} of its command would be {len} bytes, over the OS limit of {} bytes for one argument; pass large values in a file (a `path` input) instead",
                        limits.per_arg
                    )));
                }
                total += len + 1 + 8;
            }
            if total > limits.total {
                return Err(CommandInputError::TooLong(format!(
                    "stage `{name}`: its command line would be {total} bytes, over the OS limit of {} bytes (ARG_MAX less the environment); pass large values in a file (a `path` input) instead",
                    limits.total
                )));
            }
        }
        Ok(())
    }
}

impl PipelineDef {
    /// Resolves the job's path inputs again, as they are now: a path that was inside
    /// `allowed_roots` at admission may have become a symlink out of them since.
    pub fn recheck_paths(&self, input: &Value, allowed_roots: &[PathBuf]) -> Result<(), String> {
        for key in &self.path_inputs {
            let Some(raw) = input.get(key).and_then(Value::as_str) else { continue };
            check_path(raw, allowed_roots).map_err(|e| {
                format!("input.{key}: checked again as the stage started, {e} (it was inside them at admission; a symlink or rename moved it out)")
            })?;
        }
        Ok(())
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Resolves `raw` (following symlinks where it exists, lexically where not) and checks that it
/// lies under one of `roots`.
pub fn check_path(raw: &str, roots: &[PathBuf]) -> Result<PathBuf, String> {
    if roots.is_empty() {
        return Err(format!(
            "`{raw}`: path inputs are refused because no `allowed_roots` are configured; add the directory to `allowed_roots` in the pipeline file"
        ));
    }
    if raw.contains('\0') {
        return Err(format!("{raw:?} holds a NUL byte, which no path can carry"));
    }
    let path = Path::new(raw);
    if !path.is_absolute() {
        return Err(format!("`{raw}` must be an absolute path"));
    }
    let resolved = resolve(path);
    for root in roots {
        let root = resolve(root);
        if resolved.starts_with(&root) {
            return Ok(resolved);
        }
    }
    let roots: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
    Err(format!(
        "`{raw}` is outside the allowed roots ({}); move the file there or add its directory to `allowed_roots`",
        roots.join(", ")
    ))
}

/// Canonicalizes the longest existing prefix, then applies the rest lexically.
fn resolve(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    let mut out = match path.parent() {
        Some(parent) if parent != path => resolve(parent),
        _ => PathBuf::from("/"),
    };
    match path.components().next_back() {
        Some(Component::ParentDir) => {
            out.pop();
        }
        Some(Component::Normal(name)) => out.push(name),
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoGpus;
    impl crate::gpu::GpuProbe for NoGpus {
        fn discover(&self) -> Vec<crate::gpu::GpuInfo> {
            Vec::new()
        }
    }

    fn pool_file(prefetch: &str) -> String {
        format!(
            "resources: {{gpus: none, cpu: 1}}\nworkers:\n  m:\n    command: [python3, w.py]\n    instances: 2\n{prefetch}pipelines:\n  p: {{stages: [{{name: s, worker: m}}]}}\n"
        )
    }

    #[test]
    fn prefetch_defaults_to_one_and_sizes_the_pool_counter() {
        let config = Config::parse(&pool_file(""), "t.yaml", &NoGpus).unwrap();
        assert_eq!(config.workers["m"].prefetch, 1);
        assert_eq!(config.capacity.counters[&pool_counter("m")], 4, "2 instances x (1 running + 1 ahead)");
        let config = Config::parse(&pool_file("    prefetch: 0\n"), "t.yaml", &NoGpus).unwrap();
        assert_eq!(config.capacity.counters[&pool_counter("m")], 2);
        let config = Config::parse(&pool_file("    prefetch: 64\n"), "t.yaml", &NoGpus).unwrap();
        assert_eq!(config.workers["m"].prefetch, 64);
    }

    #[test]
    fn too_much_prefetch_is_refused_with_its_position_value_and_fix() {
        let errors = Config::parse(&pool_file("    prefetch: 65\n"), "t.yaml", &NoGpus).unwrap_err();
        let text = errors.to_string();
        assert_eq!(errors.0.len(), 1, "{text}");
        assert_eq!(errors.0[0].field, "workers.m.prefetch");
        assert!(errors.0[0].line > 0, "{text}");
        assert!(text.contains("65") && text.contains("64") && text.contains("prefetch: 2"), "{text}");
    }

    fn expected_file(expected: &str) -> String {
        format!(
            "resources: {{gpus: none, cpu: 1}}\npipelines:\n  p:\n    stages:\n      - {{name: s, command: [true]{expected}}}\n"
        )
    }

    #[test]
    fn a_stage_may_declare_its_expected_duration() {
        let config = Config::parse(&expected_file(", expected: 2.5s"), "t.yaml", &NoGpus).unwrap();
        assert_eq!(config.pipelines["p"].core.stages[0].expected_ms, Some(2_500));
        let config = Config::parse(&expected_file(""), "t.yaml", &NoGpus).unwrap();
        assert_eq!(config.pipelines["p"].core.stages[0].expected_ms, None, "measured instead");
    }

    #[test]
    fn a_zero_or_malformed_expected_duration_is_refused_with_its_field_and_fix() {
        let errors = Config::parse(&expected_file(", expected: 0s"), "t.yaml", &NoGpus).unwrap_err();
        let text = errors.to_string();
        assert_eq!(errors.0.len(), 1, "{text}");
        assert_eq!(errors.0[0].field, "pipelines.p.stages[0].expected");
        assert!(text.contains("`0s`") && text.contains("leave it out"), "{text}");
        let errors = Config::parse(&expected_file(", expected: soon"), "t.yaml", &NoGpus).unwrap_err();
        let text = errors.to_string();
        assert!(text.contains("expected") && text.contains("soon"), "{text}");
    }

    #[test]
    fn diagnosis_defaults_name_a_stuck_holder_within_30_s_and_a_bad_cpu_floor_is_refused() {
        let p = "resources: {gpus: none, cpu: 1}\npipelines:\n  p: {stages: [{name: s, command: [true]}]}\n";
        let th = Config::parse(p, "t.yaml", &NoGpus).unwrap().diagnosis.thresholds;
        assert!(th.task_stall_ms + 1_000 <= 30_000 && th.queue_stall_ms + 1_000 <= 30_000, "{th:?}");
        assert_eq!((th.stall_cpu_floor_pct, th.finding_clear_ms), (2.0, 5_000));
        let set = format!("diagnosis: {{stall_cpu_floor: 5, finding_clear: 2s}}\n{p}");
        let th = Config::parse(&set, "t.yaml", &NoGpus).unwrap().diagnosis.thresholds;
        assert_eq!((th.stall_cpu_floor_pct, th.finding_clear_ms), (5.0, 2_000));
        let errors = Config::parse(&format!("diagnosis: {{stall_cpu_floor: 0}}\n{p}"), "t.yaml", &NoGpus).unwrap_err();
        assert_eq!(errors.0[0].field, "diagnosis.stall_cpu_floor");
        assert!(errors.to_string().contains("e.g. 2"), "{errors}");
    }

    #[test]
    fn paths_must_resolve_inside_a_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("media");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("etc-link")).unwrap();
        let roots = vec![root.clone()];
        let inside = root.join("sub/new.mp4");
        assert_eq!(
            check_path(inside.to_str().unwrap(), &roots).unwrap(),
            root.canonicalize().unwrap().join("sub/new.mp4")
        );
        for outside in
            [format!("{}/../x", root.display()), format!("{}/etc-link/passwd", root.display()), "/etc/passwd".into()]
        {
            assert!(check_path(&outside, &roots).unwrap_err().contains("outside the allowed roots"), "{outside}");
        }
        assert!(check_path("relative.mp4", &roots).unwrap_err().contains("absolute"));
        assert!(check_path("/x", &[]).unwrap_err().contains("no `allowed_roots`"));
    }

    fn batch_file(pool: &str, stage: &str) -> String {
        format!(
            "resources: {{gpus: none, cpu: 1}}\nworkers:\n  m:\n    command: [python3, w.py]\n    instances: 2\n{pool}pipelines:\n  p:\n    inputs: {{model: {{type: string}}}}\n    stages: [{{name: s, {stage}}}]\n"
        )
    }

    fn one_error(text: &str) -> ConfigError {
        let errors = Config::parse(text, "t.yaml", &NoGpus).unwrap_err();
        assert_eq!(errors.0.len(), 1, "{errors}");
        errors.0.into_iter().next().unwrap()
    }

    #[test]
    fn batch_sizes_the_pool_counter_and_keys_parse() {
        let text = batch_file("    batch: {max_size: 32, max_wait: 5ms}\n", "worker: m, batch_key: \"{input.model}\"");
        let config = Config::parse(&text, "t.yaml", &NoGpus).unwrap();
        let def = &config.workers["m"];
        assert_eq!(def.batch, Some(BatchDef { max_size: 32, max_wait_ms: 5 }));
        // 2 instances x (1 running + 1 prefetched batch) x 32 tasks
        assert_eq!(def.units(), 128);
        let StageExec::Worker { batch_key: Some(key), .. } = &config.pipelines["p"].stages[0] else { panic!() };
        let ctx = template::RenderContext {
            input: &serde_json::json!({"model": "resnet"}),
            outputs: &[],
            job_dir: "",
            job_id: "",
        };
        assert_eq!(key.render(&ctx).unwrap(), "resnet");
        let plain = Config::parse(&batch_file("    batch: {max_size: 4}\n", "worker: m"), "t.yaml", &NoGpus).unwrap();
        assert_eq!(plain.workers["m"].batch, Some(BatchDef { max_size: 4, max_wait_ms: 0 }), "max_wait defaults to 0");
    }

    #[test]
    fn bad_batch_settings_are_refused_with_field_value_and_fix() {
        for (size, shown) in [("0", "`0`"), ("5000", "`5000`")] {
            let e = one_error(&batch_file(&format!("    batch: {{max_size: {size}}}\n"), "worker: m"));
            assert_eq!(e.field, "workers.m.batch.max_size");
            assert!(
                e.message.contains(shown) && e.message.contains("1 to 1024") && e.message.contains("max_size: 32"),
                "{e}"
            );
        }
        let e = one_error(&batch_file("    batch: {max_wait: 5ms}\n", "worker: m"));
        assert!(e.field == "workers.m.batch.max_size" && e.message.contains("missing"), "{e}");
        let errors = Config::parse(&batch_file("    batch: {size: 4}\n", "worker: m"), "t.yaml", &NoGpus).unwrap_err();
        assert!(errors.to_string().contains("size"), "{errors}");
    }

    #[test]
    fn bad_batch_keys_are_refused_with_field_value_and_fix() {
        let field = "pipelines.p.stages[0].batch_key";
        let e = one_error(&batch_file("", "worker: m, batch_key: \"{input.model}\""));
        assert_eq!(e.field, field);
        assert!(e.message.contains("pool `m` does not batch") && e.message.contains("batch: {max_size"), "{e}");
        let batching = "    batch: {max_size: 8}\n";
        let e = one_error(&batch_file(batching, "worker: m, batch_key: \"{job.id}\""));
        assert!(e.field == field && e.message.contains("`{job.id}`") && e.message.contains("{input.model}"), "{e}");
        let e = one_error(&batch_file(batching, "worker: m, batch_key: \"{input.size}\""));
        assert!(e.message.contains("input `size` is not declared") && e.message.contains("model"), "{e}");
        let e = one_error(&batch_file(batching, "worker: m, batch_key: \"{stages.x.y}\""));
        assert!(e.message.contains("may only read the job input"), "{e}");
        let e = one_error(&batch_file(batching, "worker: m, batch_key: fixed"));
        assert!(e.message.contains("reads nothing from the input"), "{e}");
        let e = one_error(&batch_file(batching, "command: [true], batch_key: \"{input.model}\""));
        assert!(e.field == field && e.message.contains("only a worker stage is batched"), "{e}");
    }

    fn errors_of(text: &str) -> ConfigErrors {
        Config::parse(text, "conf/p.yaml", &NoGpus).unwrap_err()
    }

    const HEAD: &str = "resources: {gpus: none, cpu: 2}\npipelines:\n  p:\n";

    #[test]
    fn a_command_written_as_a_string_is_shown_as_a_list() {
        let errors = errors_of(&format!("{HEAD}    stages:\n      - name: a\n        command: echo hello\n"));
        assert_eq!(errors.0.len(), 1, "{errors}");
        let e = &errors.0[0];
        assert_eq!((e.line, e.column), (6, 18), "{e}");
        assert!(e.message.contains(r#"write `command: ["echo", "hello"]`"#), "{e}");
        assert!(e.message.contains("one element per argument"), "{e}");
        // In a flow mapping too, and for other list keys.
        let errors = errors_of(&format!(
            "{HEAD}    stages: [{{name: a, command: [\"true\"], after: b}}, {{name: b, command: [\"true\"]}}]\n"
        ));
        assert!(errors.to_string().contains(r#"write `after: ["b"]`"#), "{errors}");
    }

    #[test]
    fn unknown_keys_and_values_get_did_you_mean() {
        let errors = errors_of(&format!(
            "listn: 127.0.0.1:1\n{HEAD}    stages:\n      - name: a\n        command: [\"true\"]\n        timout: 5s\n        gpu_check: warm\n"
        ));
        let text = errors.to_string();
        assert_eq!(errors.0.len(), 3, "{text}");
        assert!(
            errors.0[0].message.contains("unknown field `listn`")
                && errors.0[0].message.contains("did you mean `listen`?"),
            "{text}"
        );
        assert!(errors.0[1].message.contains("did you mean `timeout`?") && errors.0[1].line == 8, "{text}");
        assert!(errors.0[2].message.contains("did you mean `warn`?"), "{text}");
        // Nothing close: no guess.
        let errors = errors_of(&format!("{HEAD}    stages: [{{name: a, command: [\"true\"], zzzzzz: 1}}]\n"));
        assert!(!errors.to_string().contains("did you mean"), "{errors}");
    }

    #[test]
    fn unknown_stage_names_get_did_you_mean() {
        let e = one_error(&format!(
            "{HEAD}    stages:\n      - {{name: detect, command: [\"true\"]}}\n      - {{name: b, command: [\"true\"], after: [detcet]}}\n"
        ));
        assert_eq!(e.field, "pipelines.p.stages[1].after");
        assert!(e.message.contains("unknown stage `detcet`") && e.message.contains("did you mean `detect`?"), "{e}");
        let e = one_error(&batch_file("", "worker: n"));
        assert!(e.message.contains("unknown worker pool `n`") && e.message.contains("did you mean `m`?"), "{e}");
    }

    #[test]
    fn template_errors_point_at_their_argument_with_did_you_mean() {
        let errors = errors_of(&format!(
            "{HEAD}    inputs: {{frames: {{type: integer}}}}\n    stages:\n      - name: extract\n        command: [python3, x.py, \"{{input.frmes}}\"]\n      - name: detect\n        command:\n          - python3\n          - \"{{stages.extrct.boxes}}\"\n"
        ));
        let text = errors.to_string();
        assert_eq!(errors.0.len(), 2, "{text}");
        let input = &errors.0[0];
        assert_eq!(
            (input.line, input.column, input.field.as_str()),
            (7, 34, "pipelines.p.stages[0].command[2]"),
            "{text}"
        );
        assert!(
            input.message.contains("input `frmes` is not declared") && input.message.contains("did you mean `frames`?"),
            "{text}"
        );
        let stage = &errors.0[1];
        assert_eq!(
            (stage.line, stage.column, stage.field.as_str()),
            (11, 13, "pipelines.p.stages[1].command[1]"),
            "{text}"
        );
        assert!(
            stage.message.contains("unknown stage `extrct`") && stage.message.contains("did you mean `extract`?"),
            "{text}"
        );
    }

    #[test]
    fn a_cycle_error_names_the_whole_cycle() {
        let e = one_error(&format!(
            "{HEAD}    stages:\n      - {{name: start, command: [\"true\"]}}\n      - {{name: a, command: [\"true\"], after: [start, c]}}\n      - {{name: b, command: [\"true\"], after: [a]}}\n      - {{name: c, command: [\"true\"], after: [b]}}\n"
        ));
        assert!(e.message.contains("a -> b -> c -> a"), "{e}");
        assert_eq!(e.line, 6, "{e}");
        let e = one_error(&format!("{HEAD}    stages: [{{name: a, command: [\"true\"], after: [a]}}]\n"));
        assert!(e.message.contains("cycle: a -> a"), "{e}");
    }

    #[test]
    fn independent_errors_are_all_reported_with_a_count() {
        // Shape errors: each part with an error is set aside and the rest read again.
        let errors = errors_of(&format!(
            "{HEAD}    stages:\n      - name: a\n        command: echo hello\n      - name: b\n        comand: [\"true\"]\n  q:\n    stages: [{{name: x, command: [\"true\"], timeout: 10}}]\n"
        ));
        let text = errors.to_string();
        assert_eq!(errors.0.iter().map(|e| e.line).collect::<Vec<_>>(), vec![6, 8, 10], "{text}");
        assert!(text.ends_with("3 errors in conf/p.yaml"), "{text}");
        assert!(text.contains("--> conf/p.yaml:8:9") && !text.contains("<input>"), "{text}");
        // The snippet shows the file as written, not the copy with parts set aside.
        assert!(text.contains("7 |       - name: b\n"), "{text}");
        // Checks on the whole pipeline too: an unknown predecessor does not hide a bad template.
        let errors = errors_of(&format!(
            "{HEAD}    stages:\n      - {{name: a, command: [\"true\", \"{{job.idd}}\"]}}\n      - {{name: b, command: [\"true\"], after: [nope]}}\n"
        ));
        assert_eq!(errors.0.len(), 2, "{errors}");
    }

    #[test]
    fn setting_a_part_aside_reports_no_error_of_its_own() {
        // `name` is required: setting the bad `name` aside must not add "missing field `name`".
        let errors = errors_of(&format!(
            "{HEAD}    stages:\n      - name: [a]\n        command: [\"true\"]\n      - {{name: b, command: [\"true\"], retry: {{max_attempts: x}}}}\n"
        ));
        let text = errors.to_string();
        assert_eq!(errors.0.len(), 2, "{text}");
        assert!(!text.contains("missing field"), "{text}");
        // A key set aside in one stage does not hide the same key really missing in another.
        let errors = errors_of(&format!(
            "{HEAD}    stages:\n      - name: [a]\n        command: [\"true\"]\n      - command: [\"true\"]\n        timeout: 1s\n"
        ));
        let text = errors.to_string();
        assert_eq!(errors.0.iter().map(|e| e.line).collect::<Vec<_>>(), vec![5, 8], "{text}");
        assert!(errors.0[1].message.contains("missing field `name`"), "{text}");
        // A misspelt key is one mistake, not also a missing one.
        let errors = errors_of(&format!("{HEAD}    stages:\n      - nme: a\n        command: [\"true\"]\n"));
        assert_eq!(errors.0.len(), 1, "{errors}");
        assert!(errors.0[0].message.contains("did you mean `name`?"), "{errors}");
        // A key that is really missing is reported once.
        let errors = errors_of(&format!("{HEAD}    stages:\n      - command: [\"true\"]\n        timeout: 1s\n"));
        assert_eq!(errors.0.len(), 1, "{errors}");
        assert!(errors.0[0].message.contains("missing field `name`"), "{errors}");
        // Not YAML at all: one error, where the parser stopped.
        let errors = errors_of("pipelines:\n  p: {stages: [\n");
        assert_eq!(errors.0.len(), 1, "{errors}");
    }

    #[test]
    fn commands_missing_from_path_are_warnings_naming_stage_and_command() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("mytool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        std::os::unix::fs::PermissionsExt::set_mode(&mut std::fs::metadata(&tool).unwrap().permissions(), 0o755);
        std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let text = format!(
            "resources: {{gpus: none, cpu: 2}}\nworkers:\n  m: {{command: [no-such-worker-xyz]}}\npipelines:\n  p:\n    stages:\n      - {{name: a, command: [no-such-tool-xyz, x]}}\n      - {{name: b, command: [gpuflow:noop]}}\n      - {{name: c, command: [/no/such/abs]}}\n      - {{name: d, command: [\"{{input.tool}}\"]}}\n      - {{name: e, command: [mytool], env: {{PATH: {}}}}}\n      - {{name: f, command: [sh, -c, \"true\"]}}\n      - {{name: g, worker: m}}\n",
            dir.path().display()
        );
        let config = Config::parse(&text, "t.yaml", &NoGpus).unwrap();
        let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].contains("workers.m.command") && warnings[0].contains("`no-such-worker-xyz`"),
            "{warnings:?}"
        );
        assert!(
            warnings[1].starts_with(
                "t.yaml:7:29: pipelines.p.stages[0].command[0]: stage `a`: command `no-such-tool-xyz` is not found"
            ),
            "{warnings:?}"
        );
    }

    #[test]
    fn units_accept_spaces_in_durations_and_sizes_alike() {
        let config = Config::parse(
            "resources: {gpus: [{memory: 6 GB}, {memory: 8GiB}], cpu: 2}\nlimits: {log_max: 1 MiB, kill_grace: 10 s}\npipelines:\n  p: {stages: [{name: a, command: [\"true\"], timeout: 1h 30m, expected: 1.5 s}]}\n",
            "t.yaml",
            &NoGpus,
        )
        .unwrap();
        assert_eq!(config.gpus[0].memory, 6_000_000_000);
        assert_eq!(config.gpus[1].memory, 8 << 30);
        assert_eq!((config.limits.log_max, config.limits.kill_grace_ms), (1 << 20, 10_000));
        assert_eq!(config.pipelines["p"].core.stages[0].timeout_ms, Some(5_400_000));
        assert_eq!(config.pipelines["p"].core.stages[0].expected_ms, Some(1_500));
        let e = one_error(
            "resources: {gpus: [{memory: 6G}], cpu: 2}\npipelines:\n  p: {stages: [{name: a, command: [\"true\"]}]}\n",
        );
        assert!(e.message.contains("ambiguous") && e.message.contains("`6GiB`"), "{e}");
    }
}
