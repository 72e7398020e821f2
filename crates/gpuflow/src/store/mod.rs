//! Durable state. The trait is the seam between the runtime and a database; SQLite is the
//! embedded default. Every write the runtime makes for one step goes in one transaction, and
//! it acts only after that transaction has committed.

mod sqlite;

use std::future::Future;

use serde_json::Value;

pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("idempotency key is already used by job {0}")]
    DuplicateKey(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A job to insert, with its stages.
#[derive(Clone, Debug)]
pub struct NewJob {
    pub id: String,
    pub pipeline: String,
    pub input: Value,
    pub priority: i32,
    pub idempotency_key: Option<String>,
    pub config_hash: String,
    pub config_text: String,
    /// `(name, predecessor positions)` per stage.
    pub stages: Vec<(String, Vec<usize>)>,
    pub created_at: i64,
}

/// One state change. The runtime writes a batch of these atomically.
#[derive(Clone, Debug)]
pub enum Write {
    AttemptStarted {
        job: String,
        stage: usize,
        attempt: u32,
        grant: Value,
        at: i64,
    },
    AttemptEnded {
        job: String,
        stage: usize,
        attempt: u32,
        /// How the attempt ended: succeeded, failed, timed_out, cancelled, interrupted.
        result: &'static str,
        /// The stage's state now: succeeded, backoff, pending, failed, cancelled.
        stage_state: &'static str,
        not_before: Option<i64>,
        error: Option<String>,
        output: Option<Value>,
        exit_code: Option<i32>,
        signal: Option<i32>,
        failures: u32,
        interruptions: u32,
        at: i64,
    },
    StageCancelled {
        job: String,
        stage: usize,
        at: i64,
    },
    JobFinished {
        job: String,
        state: &'static str,
        error: Option<String>,
        output: Option<Value>,
        at: i64,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct JobRecord {
    pub id: String,
    pub seq: i64,
    pub pipeline: String,
    pub input: Value,
    pub priority: i32,
    pub state: String,
    pub idempotency_key: Option<String>,
    pub config_hash: String,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub error: Option<String>,
    pub output: Option<Value>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StageRecord {
    pub idx: usize,
    pub name: String,
    pub deps: Vec<usize>,
    pub state: String,
    pub attempts: u32,
    pub failures: u32,
    pub interruptions: u32,
    pub not_before: Option<i64>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub output: Option<Value>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AttemptRecord {
    pub stage_idx: usize,
    pub attempt: u32,
    pub state: String,
    pub grant: Value,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct JobDetail {
    pub job: JobRecord,
    pub stages: Vec<StageRecord>,
    pub attempts: Vec<AttemptRecord>,
}

/// An unfinished job and its stages.
#[derive(Clone, Debug)]
pub struct UnfinishedJob {
    pub job: JobRecord,
    pub stages: Vec<StageRecord>,
}

#[derive(Clone, Debug, Default)]
pub struct JobFilter {
    pub state: Option<String>,
    pub pipeline: Option<String>,
    /// Only jobs older than this arrival number (the cursor of the previous page).
    pub before_seq: Option<i64>,
    pub limit: u32,
}

/// A diagnosis finding as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct FindingRecord {
    pub id: i64,
    pub kind: String,
    pub subject: String,
    pub summary: String,
    pub evidence: Vec<(String, String)>,
    pub cause: String,
    pub fix: String,
    pub opened_at: i64,
    pub updated_at: i64,
    pub closed_at: Option<i64>,
}

/// The store seam. Implementations must make `write` atomic.
pub trait Store: Clone + Send + Sync + 'static {
    fn insert_job(&self, job: &NewJob) -> impl Future<Output = StoreResult<i64>> + Send;
    fn job_by_idempotency_key(&self, key: &str) -> impl Future<Output = StoreResult<Option<JobRecord>>> + Send;
    fn write(&self, batch: &[Write]) -> impl Future<Output = StoreResult<()>> + Send;
    fn job(&self, id: &str) -> impl Future<Output = StoreResult<Option<JobDetail>>> + Send;
    fn list_jobs(&self, filter: &JobFilter) -> impl Future<Output = StoreResult<Vec<JobRecord>>> + Send;
    fn unfinished_jobs(&self) -> impl Future<Output = StoreResult<Vec<UnfinishedJob>>> + Send;
    /// The text of the pipeline file with this content hash (see `NewJob::config_hash`).
    fn config_snapshot(&self, hash: &str) -> impl Future<Output = StoreResult<Option<String>>> + Send;
    /// Records a newly opened finding; returns its id.
    fn open_finding(
        &self,
        f: &gpuflow_core::diagnosis::Finding,
        at: i64,
    ) -> impl Future<Output = StoreResult<i64>> + Send;
    /// Refreshes an open finding's text and evidence.
    fn update_finding(
        &self,
        id: i64,
        f: &gpuflow_core::diagnosis::Finding,
        at: i64,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    fn close_finding(&self, id: i64, at: i64) -> impl Future<Output = StoreResult<()>> + Send;
    /// Closes whatever a previous engine left open (its conditions are re-checked from scratch).
    fn close_open_findings(&self, at: i64) -> impl Future<Output = StoreResult<u64>> + Send;
    /// Open findings, then the most recently closed ones, `limit` in all.
    fn findings(&self, limit: u32) -> impl Future<Output = StoreResult<Vec<FindingRecord>>> + Send;
    /// Attempts recorded as running: held leases. Empty whenever the engine is idle.
    fn running_attempts(&self) -> impl Future<Output = StoreResult<Vec<(String, AttemptRecord)>>> + Send;
    /// Job counts by pipeline and state, and jobs finished per minute since `since_ms`.
    fn job_stats(&self, since_ms: i64) -> impl Future<Output = StoreResult<JobStats>> + Send;
}

/// What the dashboard's overview shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobStats {
    /// `(pipeline, state, jobs)`.
    pub counts: Vec<(String, String, u64)>,
    /// `(pipeline, final state, minute start in unix ms, jobs)`, oldest first.
    pub finished: Vec<(String, String, i64, u64)>,
}

/// A stable 64-bit FNV-1a hash, for naming config snapshots (std's hasher is not stable
/// across Rust releases).
pub fn content_hash(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}
