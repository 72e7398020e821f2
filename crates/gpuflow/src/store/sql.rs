//! The statements both backends run, written once, and the one `Store` implementation over
//! them. A backend supplies its connection pool, its `Dialect` (the few words the databases
//! disagree on) and the writes whose shape really differs: admitting jobs, a turn's writes and
//! the next arrival number.

use std::future::Future;

use sqlx::{Arguments, AssertSqlSafe, Database, Encode, Executor, IntoArguments, Pool, SqlSafeStr, SqlStr, Type};

use gpuflow_core::JobState;

use super::dialect::Dialect;
use super::*;

/// A value bound to a statement. Both backends bind exactly these two kinds of value.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg<'a> {
    Int(i64),
    Text(Option<&'a str>),
}

/// A connection pool that runs the shared statements; one generic implementation serves both
/// databases, so the sqlx bounds are written once, here.
pub(crate) trait SqlDb: Send + Sync {
    type Row: Columns + Send;
    fn rows(&self, sql: SqlStr, args: &[Arg<'_>]) -> impl Future<Output = StoreResult<Vec<Self::Row>>> + Send;
    fn row(&self, sql: SqlStr, args: &[Arg<'_>]) -> impl Future<Output = StoreResult<Option<Self::Row>>> + Send;
    fn execute(&self, sql: SqlStr, args: &[Arg<'_>]) -> impl Future<Output = StoreResult<u64>> + Send;
    /// Applies the migrations not applied yet, in order, in one transaction. Versions may
    /// have gaps (a backend skips those it does not need).
    fn migrate(&self, d: &Dialect, migrations: &[(i64, &'static str)]) -> impl Future<Output = StoreResult<()>> + Send;
    /// Runs the statements in one transaction begun with `begin`; the rows each changed.
    fn execute_all(
        &self,
        begin: &'static str,
        statements: Vec<(String, Vec<Arg<'_>>)>,
    ) -> impl Future<Output = StoreResult<Vec<u64>>> + Send;
}

/// sqlx has no trait for a result's row count; each driver has the method.
pub(crate) trait RowsChanged {
    fn rows_changed(&self) -> u64;
}

impl RowsChanged for sqlx::sqlite::SqliteQueryResult {
    fn rows_changed(&self) -> u64 {
        self.rows_affected()
    }
}

impl RowsChanged for sqlx::postgres::PgQueryResult {
    fn rows_changed(&self) -> u64 {
        self.rows_affected()
    }
}

fn arguments<DB>(args: &[Arg<'_>]) -> StoreResult<DB::Arguments>
where
    DB: Database,
    for<'t> i64: Encode<'t, DB> + Type<DB>,
    for<'t> Option<String>: Encode<'t, DB> + Type<DB>,
{
    let mut out = DB::Arguments::default();
    for arg in args {
        let added = match *arg {
            Arg::Int(v) => out.add(v),
            Arg::Text(v) => out.add(v.map(str::to_owned)),
        };
        added.map_err(sqlx::Error::Encode)?;
    }
    Ok(out)
}

impl<DB> SqlDb for Pool<DB>
where
    DB: Database,
    DB::Row: Columns,
    DB::Arguments: IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'t> i64: Encode<'t, DB> + Type<DB>,
    for<'t> Option<String>: Encode<'t, DB> + Type<DB>,
    DB::QueryResult: RowsChanged,
{
    type Row = DB::Row;

    async fn rows(&self, sql: SqlStr, args: &[Arg<'_>]) -> StoreResult<Vec<DB::Row>> {
        Ok(sqlx::query_with(sql, arguments::<DB>(args)?).fetch_all(self).await?)
    }

    async fn row(&self, sql: SqlStr, args: &[Arg<'_>]) -> StoreResult<Option<DB::Row>> {
        Ok(sqlx::query_with(sql, arguments::<DB>(args)?).fetch_optional(self).await?)
    }

    async fn execute(&self, sql: SqlStr, args: &[Arg<'_>]) -> StoreResult<u64> {
        Ok(RowsChanged::rows_changed(&sqlx::query_with(sql, arguments::<DB>(args)?).execute(self).await?))
    }

    async fn migrate(&self, d: &Dialect, migrations: &[(i64, &'static str)]) -> StoreResult<()> {
        let mut tx = self.begin_with(SqlStr::from_static(d.begin_write)).await?;
        if let Some(lock) = d.migration_lock {
            sqlx::query(SqlStr::from_static(lock)).execute(&mut *tx).await?;
        }
        sqlx::raw_sql(MIGRATIONS_TABLE).execute(&mut *tx).await?;
        for (version, sql) in migrations {
            let version = [Arg::Int(*version)];
            let applied =
                sqlx::query_with(MIGRATION_APPLIED, arguments::<DB>(&version)?).fetch_optional(&mut *tx).await?;
            if applied.is_none() {
                sqlx::raw_sql(SqlStr::from_static(sql)).execute(&mut *tx).await?;
                let record = format!("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, {})", d.now_ms);
                sqlx::query_with(built(record), arguments::<DB>(&version)?).execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn execute_all(&self, begin: &'static str, statements: Vec<(String, Vec<Arg<'_>>)>) -> StoreResult<Vec<u64>> {
        let mut conn = self.acquire().await?;
        let result: StoreResult<Vec<u64>> = async {
            let mut tx = sqlx::Connection::begin_with(&mut *conn, SqlStr::from_static(begin)).await?;
            let mut changed = Vec::with_capacity(statements.len());
            for (sql, args) in &statements {
                let done = sqlx::query_with(built(sql.clone()), arguments::<DB>(args)?).execute(&mut *tx).await?;
                changed.push(RowsChanged::rows_changed(&done));
            }
            tx.commit().await?;
            Ok(changed)
        }
        .await;
        close_if_failed(&mut conn, &result);
        result
    }
}

/// After a failed write transaction, closes its connection instead of handing it back. On a
/// full disk SQLite rolls the transaction back itself, sqlx's rollback then fails and the
/// connection would come back "inside" a transaction that no longer exists: every later write
/// on it would fail.
pub(crate) fn close_if_failed<DB: Database, T>(conn: &mut sqlx::pool::PoolConnection<DB>, result: &StoreResult<T>) {
    if result.is_err() {
        conn.close_on_drop();
    }
}

// ---- statements -------------------------------------------------------------------------

const MIGRATIONS_TABLE: SqlStr = SqlStr::from_static(
    "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
);
const MIGRATION_APPLIED: SqlStr = SqlStr::from_static("SELECT version FROM schema_migrations WHERE version = $1");

const JOB_BY_ID: SqlStr = SqlStr::from_static("SELECT * FROM jobs WHERE id = $1");
const JOB_BY_KEY: SqlStr = SqlStr::from_static("SELECT * FROM jobs WHERE idempotency_key = $1");
const STAGES_OF_JOB: SqlStr = SqlStr::from_static("SELECT * FROM stages WHERE job_id = $1 ORDER BY idx");
const ATTEMPTS_OF_JOB: SqlStr =
    SqlStr::from_static("SELECT * FROM attempts WHERE job_id = $1 ORDER BY stage_idx, attempt");
const CONFIG_SNAPSHOT: SqlStr = SqlStr::from_static("SELECT text FROM config_snapshots WHERE hash = $1");
const RUNNING_ATTEMPTS: SqlStr = SqlStr::from_static("SELECT * FROM attempts WHERE state = 'running'");

// One statement per filter combination, so the planner can use the (state, seq) and
// (pipeline, seq) indexes; `$1 IS NULL OR state = $1` would scan every job. A listing leaves
// out inputs and outputs (see `listed_job_columns`).
const LIST_JOBS: SqlStr = SqlStr::from_static(concat!(
    "SELECT ",
    listed_job_columns!(),
    " FROM jobs WHERE seq < $3 ORDER BY seq DESC LIMIT $4"
));
const LIST_JOBS_IN_STATE: SqlStr = SqlStr::from_static(concat!(
    "SELECT ",
    listed_job_columns!(),
    " FROM jobs WHERE state = $1 AND seq < $3 ORDER BY seq DESC LIMIT $4"
));
const LIST_JOBS_OF_PIPELINE: SqlStr = SqlStr::from_static(concat!(
    "SELECT ",
    listed_job_columns!(),
    " FROM jobs WHERE pipeline = $2 AND seq < $3 ORDER BY seq DESC LIMIT $4"
));
const LIST_JOBS_OF_PIPELINE_IN_STATE: SqlStr = SqlStr::from_static(concat!(
    "SELECT ",
    listed_job_columns!(),
    " FROM jobs WHERE state = $1 AND pipeline = $2 AND seq < $3 ORDER BY seq DESC LIMIT $4"
));

// Findings belong to the engine that opened them (`SqlBackend::findings_owner`): an agent
// closes only its own when it restarts.
const OPEN_FINDING: SqlStr = SqlStr::from_static(
    "INSERT INTO findings (agent_id, kind, subject, summary, evidence, cause, fix, opened_at, updated_at) \
                            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) RETURNING id",
);
const UPDATE_FINDING: SqlStr =
    SqlStr::from_static("UPDATE findings SET summary = $2, evidence = $3, updated_at = $4 WHERE id = $1");
const CLOSE_FINDING: SqlStr = SqlStr::from_static("UPDATE findings SET closed_at = $2, updated_at = $2 WHERE id = $1");
const CLOSE_OPEN_FINDINGS: SqlStr = SqlStr::from_static(
    "UPDATE findings SET closed_at = $2, updated_at = $2 WHERE closed_at IS NULL AND agent_id = $1",
);
const FINDINGS: SqlStr = SqlStr::from_static(
    "SELECT * FROM findings ORDER BY closed_at IS NOT NULL, COALESCE(closed_at, opened_at) DESC LIMIT $1",
);

const JOB_COUNTS: SqlStr =
    SqlStr::from_static("SELECT pipeline, state, count(*) AS n FROM jobs GROUP BY pipeline, state");
const JOBS_FINISHED_PER_MINUTE: SqlStr = SqlStr::from_static(
    "SELECT pipeline, state, (finished_at / 60000) * 60000 AS minute, count(*) AS n \
                                        FROM jobs WHERE finished_at >= $1 GROUP BY pipeline, state, minute ORDER BY minute",
);

// `jobs_by_state` walks a state's jobs in arrival order, near enough finish order that a pass
// finds the expired ones first.
const EXPIRED_JOBS: SqlStr =
    SqlStr::from_static("SELECT id, finished_at FROM jobs WHERE state = $1 AND finished_at < $2 ORDER BY seq LIMIT $3");

/// The finished jobs among `$1` (a JSON array of ids): retention never deletes a live job.
fn finished_among(d: &Dialect) -> String {
    format!("SELECT id FROM jobs WHERE id IN ({}) AND state IN ('succeeded', 'failed', 'cancelled')", d.json_text_rows)
}

/// A job's rows go children first: attempts, stages, then the job.
fn delete_finished(d: &Dialect) -> [String; 3] {
    let among = finished_among(d);
    [
        format!("DELETE FROM attempts WHERE job_id IN ({among})"),
        format!("DELETE FROM stages WHERE job_id IN ({among})"),
        format!("DELETE FROM jobs WHERE id IN ({among})"),
    ]
}

fn unfinished_page(d: &Dialect) -> String {
    format!("SELECT {} {} ORDER BY -priority, seq LIMIT $3", recovered_job_columns!(), d.unfinished_after)
}

/// The inputs of the jobs among `$1` (a JSON array of ids).
fn inputs_among(d: &Dialect) -> String {
    format!("SELECT id, input FROM jobs WHERE id IN ({})", d.json_text_rows)
}

fn unfinished_page_stages(d: &Dialect) -> String {
    format!(
        "SELECT stages.* FROM stages WHERE job_id IN (SELECT id {} ORDER BY -priority, seq LIMIT $3) ORDER BY job_id, idx",
        d.unfinished_after
    )
}

// ---- the one Store -----------------------------------------------------------------------

/// A SQL database as a store: what differs between the backends. Everything else of `Store`
/// is implemented once, below, over the shared statements.
pub(crate) trait SqlBackend: Clone + Send + Sync + 'static {
    type Db: SqlDb;
    const DIALECT: &'static Dialect;
    fn db(&self) -> &Self::Db;
    /// Who owns the findings this handle opens: an agent's id, or "" for the embedded store.
    fn findings_owner(&self) -> &str;
    /// `Store::insert_job`.
    fn admit_job(&self, job: &NewJob) -> impl Future<Output = StoreResult<i64>> + Send;
    /// `Store::write_turn`.
    fn commit_turn(&self, jobs: &[NewJob], batch: &[Write]) -> impl Future<Output = StoreResult<()>> + Send;
    /// `Store::next_job_seq`.
    fn next_arrival(&self) -> impl Future<Output = StoreResult<i64>> + Send;
}

// Jobs by the start of their id: a range on the unique index of `id`, not `LIKE` (which
// SQLite would scan with); every id has the shape of the bounds, so both databases order them
// as their hex digits. By short id: `substr(id, 29)` exactly as in the index
// `jobs_by_short_id`, so that index is used.
const JOBS_BY_ID_RANGE: SqlStr = SqlStr::from_static(concat!(
    "SELECT ",
    listed_job_columns!(),
    " FROM jobs WHERE id >= $1 AND id <= $2 ORDER BY seq DESC LIMIT $3"
));
const JOBS_BY_SHORT_ID: SqlStr = SqlStr::from_static(concat!(
    "SELECT ",
    listed_job_columns!(),
    " FROM jobs WHERE substr(id, 29) = $1 ORDER BY seq DESC LIMIT $2"
));
const SET_RETRY_OF: SqlStr = SqlStr::from_static("UPDATE jobs SET retry_of = $2 WHERE id = $1");
const RETRY_OF: SqlStr = SqlStr::from_static("SELECT retry_of FROM jobs WHERE id = $1");
const RETRIED_BY: SqlStr = SqlStr::from_static("SELECT id FROM jobs WHERE retry_of = $1 ORDER BY seq");

/// A statement put together at run time from the shared text and a dialect's words (never
/// from input: every value is bound).
fn built(sql: String) -> SqlStr {
    AssertSqlSafe(sql).into_sql_str()
}

fn text(s: &str) -> Arg<'_> {
    Arg::Text(Some(s))
}

impl<B: SqlBackend> Store for B {
    async fn insert_job(&self, job: &NewJob) -> StoreResult<i64> {
        self.admit_job(job).await
    }

    async fn job_by_idempotency_key(&self, key: &str) -> StoreResult<Option<JobRecord>> {
        self.db().row(JOB_BY_KEY, &[text(key)]).await?.as_ref().map(job_from_row).transpose()
    }

    async fn write(&self, batch: &[Write]) -> StoreResult<()> {
        self.commit_turn(&[], batch).await
    }

    async fn write_turn(&self, jobs: &[NewJob], batch: &[Write]) -> StoreResult<()> {
        self.commit_turn(jobs, batch).await
    }

    async fn next_job_seq(&self) -> StoreResult<i64> {
        self.next_arrival().await
    }

    async fn job(&self, id: &str) -> StoreResult<Option<JobDetail>> {
        let db = self.db();
        let Some(row) = db.row(JOB_BY_ID, &[text(id)]).await? else {
            return Ok(None);
        };
        let job = job_from_row(&row)?;
        let stages =
            db.rows(STAGES_OF_JOB, &[text(id)]).await?.iter().map(stage_from_row).collect::<StoreResult<_>>()?;
        let attempts =
            db.rows(ATTEMPTS_OF_JOB, &[text(id)]).await?.iter().map(attempt_from_row).collect::<StoreResult<_>>()?;
        Ok(Some(JobDetail { job, stages, attempts }))
    }

    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<JobRecord>> {
        let sql = match (&filter.state, &filter.pipeline) {
            (None, None) => LIST_JOBS,
            (Some(_), None) => LIST_JOBS_IN_STATE,
            (None, Some(_)) => LIST_JOBS_OF_PIPELINE,
            (Some(_), Some(_)) => LIST_JOBS_OF_PIPELINE_IN_STATE,
        };
        let args = [
            Arg::Text(filter.state.map(JobState::as_str)),
            Arg::Text(filter.pipeline.as_deref()),
            Arg::Int(filter.before_seq.unwrap_or(i64::MAX)),
            Arg::Int(filter.limit as i64),
        ];
        self.db().rows(sql, &args).await?.iter().map(job_from_row).collect()
    }

    async fn unfinished_jobs(&self, after: Option<RecoveryCursor>, limit: u32) -> StoreResult<Vec<UnfinishedJob>> {
        let RecoveryCursor(p, s) = after.unwrap_or(RecoveryCursor::start());
        let args = [Arg::Int(p), Arg::Int(s), Arg::Int(limit as i64)];
        let db = self.db();
        let rows = db.rows(built(unfinished_page(Self::DIALECT)), &args).await?;
        let stage_rows = db.rows(built(unfinished_page_stages(Self::DIALECT)), &args).await?;
        let jobs = rows.iter().map(job_from_row).collect::<StoreResult<Vec<_>>>()?;
        let stages = stage_rows
            .iter()
            .map(|r| Ok((r.required_text("job_id")?, stage_from_row(r)?)))
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(with_stages(jobs, stages))
    }

    async fn job_inputs(&self, ids: &[String]) -> StoreResult<Vec<(String, Value)>> {
        let ids = serde_json::to_string(ids).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let rows = self.db().rows(built(inputs_among(Self::DIALECT)), &[text(&ids)]).await?;
        rows.iter().map(|r| Ok((r.required_text("id")?, r.json("input")?.unwrap_or(Value::Null)))).collect()
    }

    async fn config_snapshot(&self, hash: &str) -> StoreResult<Option<String>> {
        self.db().row(CONFIG_SNAPSHOT, &[text(hash)]).await?.map(|r| r.required_text("text")).transpose()
    }

    async fn open_finding(&self, f: &gpuflow_core::diagnosis::Finding, at: i64) -> StoreResult<i64> {
        let evidence = serde_json::to_string(&f.evidence).expect("serializable");
        let args = [
            text(self.findings_owner()),
            text(f.kind.as_str()),
            text(&f.subject),
            text(&f.summary),
            text(&evidence),
            text(&f.cause),
            text(&f.fix),
            Arg::Int(at),
        ];
        let row = self.db().row(OPEN_FINDING, &args).await?;
        row.ok_or_else(|| StoreError::Corrupt("inserting a finding returned no id".into()))?.required_int("id")
    }

    async fn update_finding(&self, id: i64, f: &gpuflow_core::diagnosis::Finding, at: i64) -> StoreResult<()> {
        let evidence = serde_json::to_string(&f.evidence).expect("serializable");
        self.db().execute(UPDATE_FINDING, &[Arg::Int(id), text(&f.summary), text(&evidence), Arg::Int(at)]).await?;
        Ok(())
    }

    async fn close_finding(&self, id: i64, at: i64) -> StoreResult<()> {
        self.db().execute(CLOSE_FINDING, &[Arg::Int(id), Arg::Int(at)]).await?;
        Ok(())
    }

    async fn close_open_findings(&self, at: i64) -> StoreResult<u64> {
        self.db().execute(CLOSE_OPEN_FINDINGS, &[text(self.findings_owner()), Arg::Int(at)]).await
    }

    async fn findings(&self, limit: u32) -> StoreResult<Vec<FindingRecord>> {
        self.db().rows(FINDINGS, &[Arg::Int(limit as i64)]).await?.iter().map(finding_from_row).collect()
    }

    async fn running_attempts(&self) -> StoreResult<Vec<(String, AttemptRecord)>> {
        let rows = self.db().rows(RUNNING_ATTEMPTS, &[]).await?;
        rows.iter().map(|r| Ok((r.required_text("job_id")?, attempt_from_row(r)?))).collect()
    }

    async fn job_stats(&self, since_ms: i64) -> StoreResult<JobStats> {
        let db = self.db();
        let counts = db
            .rows(JOB_COUNTS, &[])
            .await?
            .iter()
            .map(|r| Ok((r.required_text("pipeline")?, r.required_text("state")?, r.required_int("n")? as u64)))
            .collect::<StoreResult<_>>()?;
        let finished = db
            .rows(JOBS_FINISHED_PER_MINUTE, &[Arg::Int(since_ms)])
            .await?
            .iter()
            .map(|r| {
                let n = r.required_int("n")? as u64;
                Ok((r.required_text("pipeline")?, r.required_text("state")?, r.required_int("minute")?, n))
            })
            .collect::<StoreResult<_>>()?;
        Ok(JobStats { counts, finished })
    }

    async fn expired_jobs(&self, state: &str, finished_before_ms: i64, limit: u32) -> StoreResult<Vec<(String, i64)>> {
        let args = [text(state), Arg::Int(finished_before_ms), Arg::Int(limit as i64)];
        let rows = self.db().rows(EXPIRED_JOBS, &args).await?;
        rows.iter().map(|r| Ok((r.required_text("id")?, r.required_int("finished_at")?))).collect()
    }

    async fn delete_finished_jobs(&self, ids: &[String]) -> StoreResult<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let ids = serde_json::to_string(ids).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let statements = delete_finished(Self::DIALECT).into_iter().map(|sql| (sql, vec![text(&ids)])).collect();
        let changed = self.db().execute_all(Self::DIALECT.begin_write, statements).await?;
        Ok(changed.last().copied().unwrap_or(0))
    }
}

impl<B: SqlBackend> JobLinks for B {
    async fn jobs_by_id_prefix(&self, prefix: &IdPrefix, limit: u32) -> StoreResult<Vec<JobRecord>> {
        let (lowest, highest) = (prefix.lowest(), prefix.highest());
        let args = [text(&lowest), text(&highest), Arg::Int(limit as i64)];
        self.db().rows(JOBS_BY_ID_RANGE, &args).await?.iter().map(job_from_row).collect()
    }

    async fn jobs_by_short_id(&self, short_id: &str, limit: u32) -> StoreResult<Vec<JobRecord>> {
        let args = [text(short_id), Arg::Int(limit as i64)];
        self.db().rows(JOBS_BY_SHORT_ID, &args).await?.iter().map(job_from_row).collect()
    }

    async fn set_retry_of(&self, job: &str, of: &str) -> StoreResult<()> {
        self.db().execute(SET_RETRY_OF, &[text(job), text(of)]).await?;
        Ok(())
    }

    async fn retry_links(&self, job: &str) -> StoreResult<RetryLinks> {
        let db = self.db();
        let retry_of = match db.row(RETRY_OF, &[text(job)]).await? {
            Some(row) => row.text("retry_of")?,
            None => None,
        };
        let retried_by = db
            .rows(RETRIED_BY, &[text(job)])
            .await?
            .iter()
            .map(|r| r.required_text("id"))
            .collect::<StoreResult<_>>()?;
        Ok(RetryLinks { retry_of, retried_by })
    }
}
