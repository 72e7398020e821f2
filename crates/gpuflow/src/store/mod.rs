//! Durable state. The trait is the seam between the runtime and a database; SQLite is the
//! embedded default. Every write the runtime makes for one step goes in one transaction, and
//! it acts only after that transaction has committed.

mod dialect;
mod pg_queue;
mod postgres;
mod sql;
mod sqlite;

use std::future::Future;
use std::sync::Arc;

use gpuflow_core::{JobState, StageState};
use serde_json::Value;

pub use pg_queue::{
    Admitted, AgentRecord, Also, AttemptDetails, Claim, ClaimAsk, ClaimCandidate, Ending, Finish, LostLease, PgQueue,
    SharedCancel, Synced,
};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("idempotency key is already used by job {0}")]
    DuplicateKey(String),
    /// Writing failed for want of a working disk (also how tests inject the fault).
    #[error("the store cannot be written: {0}")]
    Unwritable(String),
}

impl StoreError {
    /// A lost connection or a restarting server: worth retrying, not a reason to stop.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Database(e) => match e {
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => true,
                sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
                // 08: connection exception; 57P: operator intervention (admin shutdown,
                // pg_terminate_backend); 40: deadlock or serialization failure.
                sqlx::Error::Database(db) => {
                    db.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c.starts_with("40"))
                }
                _ => false,
            },
            _ => false,
        }
    }
}

impl StoreError {
    /// The disk under the store is full, failing or read-only: the engine keeps what it
    /// could not write and retries, instead of stopping.
    pub fn is_unwritable(&self) -> bool {
        match self {
            StoreError::Unwritable(_) => true,
            StoreError::Database(sqlx::Error::Database(db)) => {
                let code = db.code().unwrap_or_default();
                if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                    // SQLite (extended codes carry the primary in the low byte): READONLY 8,
                    // IOERR 10, FULL 13, CANTOPEN 14.
                    code.parse::<i64>().is_ok_and(|n| matches!(n & 0xff, 8 | 10 | 13 | 14))
                } else {
                    // PostgreSQL: disk_full, io_error.
                    code == "53100" || code == "58030"
                }
            }
            _ => false,
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A job to insert, with its stages.
#[derive(Clone, Debug)]
pub struct NewJob {
    /// Its arrival number when the engine assigns it (a turn's admissions); `None` lets the
    /// store assign the next one.
    pub seq: Option<i64>,
    pub id: String,
    pub pipeline: String,
    pub input: Value,
    pub priority: i32,
    pub idempotency_key: Option<String>,
    pub config_hash: String,
    /// The pipeline file's text, shared by every job accepted under it (stored once per hash).
    pub config_text: Arc<str>,
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
        /// The lease, as JSON text (`LeaseRecord`).
        grant: String,
        at: i64,
    },
    AttemptEnded {
        job: String,
        stage: usize,
        attempt: u32,
        /// How the attempt ended: succeeded, failed, timed_out, cancelled, interrupted.
        result: &'static str,
        /// The stage's state now: succeeded, queued, backoff, failed or cancelled.
        stage_state: StageState,
        /// Stages the attempt's success made ready: queued from now on.
        readied: Vec<usize>,
        not_before: Option<i64>,
        error: Option<String>,
        output: Option<Value>,
        exit_code: Option<i32>,
        signal: Option<i32>,
        /// For a worker task: how many tasks its batch held.
        batch_size: Option<u32>,
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
        state: JobState,
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
    pub state: JobState,
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
    pub state: StageState,
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
    /// For a worker task: how many tasks the batch it ran in held.
    pub batch_size: Option<u32>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct JobDetail {
    pub job: JobRecord,
    pub stages: Vec<StageRecord>,
    pub attempts: Vec<AttemptRecord>,
}

/// Where a page of unfinished jobs ends: `(-priority, seq)` of its last job.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RecoveryCursor(i64, i64);

impl RecoveryCursor {
    pub fn of(job: &JobRecord) -> Self {
        RecoveryCursor(-(job.priority as i64), job.seq)
    }
    /// Before every job.
    fn start() -> Self {
        RecoveryCursor(i64::MIN, i64::MIN)
    }
}

/// Groups stage rows (ordered by job) under their jobs, keeping the jobs' order.
fn with_stages(jobs: Vec<JobRecord>, stages: Vec<(String, StageRecord)>) -> Vec<UnfinishedJob> {
    let mut by_job: std::collections::HashMap<String, Vec<StageRecord>> = std::collections::HashMap::new();
    for (job, stage) in stages {
        by_job.entry(job).or_default().push(stage);
    }
    jobs.into_iter()
        .map(|job| {
            let stages = by_job.remove(&job.id).unwrap_or_default();
            UnfinishedJob { job, stages }
        })
        .collect()
}

/// An unfinished job and its stages.
#[derive(Clone, Debug)]
pub struct UnfinishedJob {
    pub job: JobRecord,
    pub stages: Vec<StageRecord>,
}

#[derive(Clone, Debug, Default)]
pub struct JobFilter {
    pub state: Option<JobState>,
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
    /// One turn of the engine: the jobs it admitted and every state change it decided, in
    /// one transaction, all or nothing. Rows a turn touches several times (a job admitted,
    /// started and finished in the same turn) are written once, in their final state.
    fn write_turn(&self, jobs: &[NewJob], batch: &[Write]) -> impl Future<Output = StoreResult<()>> + Send;
    /// The arrival number the next admitted job gets (one past every number ever used).
    fn next_job_seq(&self) -> impl Future<Output = StoreResult<i64>> + Send;
    fn job(&self, id: &str) -> impl Future<Output = StoreResult<Option<JobDetail>>> + Send;
    /// Newest first. Listings carry no input or output (`Value::Null`, `None`): a page of
    /// large inputs must not be read to show ids and states.
    fn list_jobs(&self, filter: &JobFilter) -> impl Future<Output = StoreResult<Vec<JobRecord>>> + Send;
    /// Unfinished jobs with their stages, in the order they are served (priority, high first,
    /// then arrival), `limit` at a time: the page after `after`, a previous page's last
    /// `RecoveryCursor::of` (`None`: the first page).
    fn unfinished_jobs(
        &self,
        after: Option<RecoveryCursor>,
        limit: u32,
    ) -> impl Future<Output = StoreResult<Vec<UnfinishedJob>>> + Send;
    /// The stored inputs of these jobs (those that exist), read when their stages start.
    fn job_inputs(&self, ids: &[String]) -> impl Future<Output = StoreResult<Vec<(String, Value)>>> + Send;
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
    /// Retention: up to `limit` jobs that ended in `state` before `finished_before_ms`, in
    /// arrival order, as `(id, finished_at)`.
    fn expired_jobs(
        &self,
        state: &str,
        finished_before_ms: i64,
        limit: u32,
    ) -> impl Future<Output = StoreResult<Vec<(String, i64)>>> + Send;
    /// Retention: deletes these jobs with their stages and attempts, in one transaction; a
    /// job that is not finished is left alone. Returns how many jobs went.
    fn delete_finished_jobs(&self, ids: &[String]) -> impl Future<Output = StoreResult<u64>> + Send;
}

/// What the dashboard's overview shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobStats {
    /// `(pipeline, state, jobs)`.
    pub counts: Vec<(String, String, u64)>,
    /// `(pipeline, final state, minute start in unix ms, jobs)`, oldest first.
    pub finished: Vec<(String, String, i64, u64)>,
}

/// Typed column access shared by the backends, so each record is decoded in one place.
pub(crate) trait Columns {
    fn text(&self, column: &str) -> StoreResult<Option<String>>;
    fn int(&self, column: &str) -> StoreResult<Option<i64>>;

    fn required_text(&self, column: &str) -> StoreResult<String> {
        self.text(column)?.ok_or_else(|| StoreError::Corrupt(format!("{column} is null")))
    }
    fn required_int(&self, column: &str) -> StoreResult<i64> {
        self.int(column)?.ok_or_else(|| StoreError::Corrupt(format!("{column} is null")))
    }
    fn json(&self, column: &str) -> StoreResult<Option<Value>> {
        self.text(column)?
            .map(|t| serde_json::from_str(&t).map_err(|e| StoreError::Corrupt(format!("{column}: {e}"))))
            .transpose()
    }
    fn small(&self, column: &str) -> StoreResult<Option<i32>> {
        Ok(self.int(column)?.map(|v| v as i32))
    }
    /// The `state` column of a row of `table`, as its enum.
    fn state<T>(&self, table: &str, parse: fn(&str) -> Option<T>) -> StoreResult<T> {
        let text = self.required_text("state")?;
        parse(&text).ok_or_else(|| StoreError::Corrupt(format!("{table}.state: `{text}` is not a state")))
    }
}

/// The columns a job listing reads: every column of `jobs` but the input and the output
/// (a macro, so statements stay literals: `concat!`).
macro_rules! listed_job_columns {
    () => {
        "seq, id, pipeline, 'null' AS input, priority, state, idempotency_key, config_hash, \
         created_at, started_at, finished_at, error, NULL AS output"
    };
}
use listed_job_columns;

/// The columns recovery reads: a large input (over 64 KiB of text) comes back as NULL, to be
/// read when a stage of its job starts (`Store::job_inputs`), so restoring a page of queued
/// jobs does not load every input.
macro_rules! recovered_job_columns {
    () => {
        "seq, id, pipeline, CASE WHEN octet_length(input) > 65536 THEN NULL ELSE input END AS input, \
         priority, state, idempotency_key, config_hash, created_at, started_at, finished_at, error, output"
    };
}
use recovered_job_columns;

fn job_from_row(row: &impl Columns) -> StoreResult<JobRecord> {
    Ok(JobRecord {
        id: row.required_text("id")?,
        seq: row.required_int("seq")?,
        pipeline: row.required_text("pipeline")?,
        input: row.json("input")?.unwrap_or(Value::Null),
        priority: row.required_int("priority")? as i32,
        state: row.state("jobs", JobState::parse)?,
        idempotency_key: row.text("idempotency_key")?,
        config_hash: row.required_text("config_hash")?,
        created_at: row.required_int("created_at")?,
        started_at: row.int("started_at")?,
        finished_at: row.int("finished_at")?,
        error: row.text("error")?,
        output: row.json("output")?,
    })
}

fn stage_from_row(row: &impl Columns) -> StoreResult<StageRecord> {
    let deps: Vec<usize> = serde_json::from_value(row.json("deps")?.unwrap_or(Value::Null))
        .map_err(|e| StoreError::Corrupt(format!("deps: {e}")))?;
    Ok(StageRecord {
        idx: row.required_int("idx")? as usize,
        name: row.required_text("name")?,
        deps,
        state: row.state("stages", StageState::parse)?,
        attempts: row.required_int("attempts")? as u32,
        failures: row.required_int("failures")? as u32,
        interruptions: row.required_int("interruptions")? as u32,
        not_before: row.int("not_before")?,
        started_at: row.int("started_at")?,
        finished_at: row.int("finished_at")?,
        exit_code: row.small("exit_code")?,
        error: row.text("error")?,
        output: row.json("output")?,
    })
}

fn attempt_from_row(row: &impl Columns) -> StoreResult<AttemptRecord> {
    Ok(AttemptRecord {
        stage_idx: row.required_int("stage_idx")? as usize,
        attempt: row.required_int("attempt")? as u32,
        state: row.required_text("state")?,
        grant: row.json("grant_json")?.unwrap_or(Value::Null),
        started_at: row.required_int("started_at")?,
        finished_at: row.int("finished_at")?,
        exit_code: row.small("exit_code")?,
        signal: row.small("signal")?,
        error: row.text("error")?,
        batch_size: row.int("batch_size")?.map(|n| n as u32),
    })
}

fn finding_from_row(row: &impl Columns) -> StoreResult<FindingRecord> {
    let evidence = row.required_text("evidence")?;
    Ok(FindingRecord {
        id: row.required_int("id")?,
        kind: row.required_text("kind")?,
        subject: row.required_text("subject")?,
        summary: row.required_text("summary")?,
        evidence: serde_json::from_str(&evidence).map_err(|e| StoreError::Corrupt(format!("evidence: {e}")))?,
        cause: row.required_text("cause")?,
        fix: row.required_text("fix")?,
        opened_at: row.required_int("opened_at")?,
        updated_at: row.required_int("updated_at")?,
        closed_at: row.int("closed_at")?,
    })
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

/// Lookups the API makes beside the engine's turns: jobs by the start of their id or by their
/// short id, and the link from a retry to the job it retries (written once, after the engine
/// admitted the retry).
pub trait JobLinks {
    /// Jobs whose id starts with `prefix`, newest first, at most `limit`.
    fn jobs_by_id_prefix(
        &self,
        prefix: &IdPrefix,
        limit: u32,
    ) -> impl Future<Output = StoreResult<Vec<JobRecord>>> + Send;
    /// Jobs whose id ends with `short_id` (8 lowercase hex digits), newest first.
    fn jobs_by_short_id(&self, short_id: &str, limit: u32) -> impl Future<Output = StoreResult<Vec<JobRecord>>> + Send;
    /// Records that `job` was submitted to retry `of`.
    fn set_retry_of(&self, job: &str, of: &str) -> impl Future<Output = StoreResult<()>> + Send;
    /// The job `job` retries, and the jobs submitted to retry it (oldest first).
    fn retry_links(&self, job: &str) -> impl Future<Output = StoreResult<RetryLinks>> + Send;
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct RetryLinks {
    pub retry_of: Option<String>,
    pub retried_by: Vec<String>,
}

/// The start of a job id (a hyphenated lowercase UUID), as a user types it: hex digits, with
/// or without the dashes (`7a4de9bc`, `7A4DE9BC-1f`).
#[derive(Clone, Debug, PartialEq)]
pub struct IdPrefix(String);

impl IdPrefix {
    const LOWEST: &'static str = "00000000-0000-0000-0000-000000000000";
    const HIGHEST: &'static str = "ffffffff-ffff-ffff-ffff-ffffffffffff";

    /// `None` unless `text` is 1 to 32 hex digits, dashes aside.
    pub fn parse(text: &str) -> Option<IdPrefix> {
        let digits: String = text.chars().filter(|c| *c != '-').map(|c| c.to_ascii_lowercase()).collect();
        if digits.is_empty() || digits.len() > 32 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        // Dashes where a UUID has them, so the prefix compares as stored ids do.
        let mut prefix = String::with_capacity(36);
        for (i, c) in digits.chars().enumerate() {
            if matches!(i, 8 | 12 | 16 | 20) {
                prefix.push('-');
            }
            prefix.push(c);
        }
        Some(IdPrefix(prefix))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The smallest and largest ids with this prefix: the bounds of an index range scan.
    pub fn lowest(&self) -> String {
        format!("{}{}", self.0, &Self::LOWEST[self.0.len()..])
    }

    pub fn highest(&self) -> String {
        format!("{}{}", self.0, &Self::HIGHEST[self.0.len()..])
    }
}

#[cfg(test)]
mod id_prefix_tests {
    use super::IdPrefix;

    #[test]
    fn a_prefix_gets_the_dashes_of_a_uuid_and_bounds_every_id_it_starts() {
        let p = IdPrefix::parse("7A4DE9BC1f").unwrap();
        assert_eq!(p.as_str(), "7a4de9bc-1f");
        assert_eq!(p.lowest(), "7a4de9bc-1f00-0000-0000-000000000000");
        assert_eq!(p.highest(), "7a4de9bc-1fff-ffff-ffff-ffffffffffff");
        assert_eq!(IdPrefix::parse("7a4de9bc-1f"), Some(p));
        let full = "0193b5f2-7c1e-7d3a-9f00-1234567890ab";
        let whole = IdPrefix::parse(full).unwrap();
        assert_eq!((whole.lowest(), whole.highest()), (full.to_string(), full.to_string()));
        for bad in ["", "-", "xyz", "7a4de9bc-1f00-0000-0000-0000000000000", "7a 4d"] {
            assert_eq!(IdPrefix::parse(bad), None, "{bad:?}");
        }
    }
}
