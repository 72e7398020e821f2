//! The embedded SQLite store: WAL mode, `synchronous=FULL`, one writer (the runtime loop).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use std::collections::HashMap;

use sqlx::{QueryBuilder, Row, Sqlite, Transaction};

use gpuflow_core::{JobState, StageState};

use super::dialect::{self, Dialect};
use super::sql::{SqlBackend, SqlDb, close_if_failed};
use super::*;

/// Schema migrations, applied in order once each.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/sqlite/0001_init.sql")),
    (2, include_str!("../../migrations/sqlite/0002_findings.sql")),
    (3, include_str!("../../migrations/sqlite/0003_recovery_order.sql")),
    (4, include_str!("../../migrations/sqlite/0004_batch_size.sql")),
    (5, include_str!("../../migrations/sqlite/0005_job_links.sql")),
    (7, include_str!("../../migrations/sqlite/0007_one_sql.sql")),
];

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and brings its schema up to date.
    pub async fn open(path: &Path) -> StoreResult<SqliteStore> {
        let options = SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL syncs the WAL on every commit: an acknowledged job survives power loss too.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
        let store = SqliteStore { pool };
        store.pool.migrate(Self::DIALECT, MIGRATIONS).await?;
        Ok(store)
    }

    /// Runs SQLite's own consistency check; "ok" when sound.
    pub async fn integrity_check(&self) -> StoreResult<String> {
        Ok(sqlx::query_scalar("PRAGMA integrity_check").fetch_one(&self.pool).await?)
    }
}

impl Columns for SqliteRow {
    fn text(&self, column: &str) -> StoreResult<Option<String>> {
        Ok(self.try_get(column)?)
    }
    fn int(&self, column: &str) -> StoreResult<Option<i64>> {
        Ok(self.try_get(column)?)
    }
}

impl SqlBackend for SqliteStore {
    type Db = SqlitePool;
    const DIALECT: &'static Dialect = &dialect::SQLITE;

    fn db(&self) -> &SqlitePool {
        &self.pool
    }

    fn findings_owner(&self) -> &str {
        ""
    }

    async fn admit_job(&self, job: &NewJob) -> StoreResult<i64> {
        // The turn's insert path, for one job; the store numbers it when `seq` is unset.
        self.commit_turn(std::slice::from_ref(job), &[]).await?;
        Ok(sqlx::query_scalar("SELECT seq FROM jobs WHERE id = $1").bind(&job.id).fetch_one(&self.pool).await?)
    }

    async fn commit_turn(&self, jobs: &[NewJob], batch: &[Write]) -> StoreResult<()> {
        if jobs.is_empty() && batch.is_empty() {
            return Ok(());
        }
        let rows = TurnRows::build(jobs, batch);
        let mut conn = self.pool.acquire().await?;
        let result: StoreResult<()> = async {
            let mut tx =
                sqlx::Connection::begin_with(&mut *conn, sqlx::SqlStr::from_static(Self::DIALECT.begin_write)).await?;
            Self::write_turn_rows(&mut tx, jobs, &rows).await?;
            tx.commit().await?;
            Ok(())
        }
        .await;
        close_if_failed(&mut conn, &result);
        result
    }

    async fn next_arrival(&self) -> StoreResult<i64> {
        // AUTOINCREMENT's counter never goes back, even when rows are deleted.
        let used: Option<i64> = sqlx::query_scalar(
            "SELECT max(n) FROM (SELECT max(seq) AS n FROM jobs UNION ALL SELECT seq AS n FROM sqlite_sequence WHERE name = 'jobs')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(used.unwrap_or(0) + 1)
    }
}

/// Stage columns a turn sets; `None` leaves a column as stored.
#[derive(Clone, Default)]
struct StageCols<'a> {
    state: Option<&'a str>,
    attempts: Option<i64>,
    failures: Option<i64>,
    interruptions: Option<i64>,
    not_before: Option<Option<i64>>,
    started_at: Option<Option<i64>>,
    finished_at: Option<Option<i64>>,
    exit_code: Option<Option<i32>>,
    error: Option<Option<&'a str>>,
    output: Option<Option<String>>,
}

impl<'a> StageCols<'a> {
    /// A stage row as `insert_job` creates it: queued at once without predecessors.
    fn fresh(deps: &[usize]) -> Self {
        let state = if deps.is_empty() { StageState::Queued } else { StageState::Pending };
        StageCols {
            state: Some(state.as_str()),
            attempts: Some(0),
            failures: Some(0),
            interruptions: Some(0),
            not_before: Some(None),
            started_at: Some(None),
            finished_at: Some(None),
            exit_code: Some(None),
            error: Some(None),
            output: Some(None),
        }
    }
}

/// Job columns a turn sets.
#[derive(Default)]
struct JobCols<'a> {
    state: Option<&'a str>,
    /// Set when still unset (the first attempt's start).
    started_at: Option<i64>,
    finished_at: Option<i64>,
    error: Option<Option<&'a str>>,
    output: Option<Option<String>>,
}

/// An attempt row started in this turn, in its final state.
struct AttemptRow<'a> {
    job: &'a str,
    stage: i64,
    attempt: i64,
    state: &'a str,
    grant: &'a str,
    started_at: i64,
    finished_at: Option<i64>,
    exit_code: Option<i32>,
    signal: Option<i32>,
    error: Option<&'a str>,
    batch_size: Option<u32>,
}

/// Every row one turn touches, merged to its final state, in first-touched order.
#[derive(Default)]
struct TurnRows<'a> {
    new_jobs: HashMap<&'a str, JobCols<'a>>,
    job_patches: Vec<(&'a str, JobCols<'a>)>,
    job_patch_at: HashMap<&'a str, usize>,
    stages: Vec<((&'a str, i64), StageCols<'a>)>,
    stage_at: HashMap<(&'a str, i64), usize>,
    new_attempts: Vec<AttemptRow<'a>>,
    attempt_at: HashMap<(&'a str, i64, i64), usize>,
    /// Ends of attempts started in an earlier turn.
    ended_earlier: Vec<&'a Write>,
}

impl<'a> TurnRows<'a> {
    fn build(jobs: &'a [NewJob], writes: &'a [Write]) -> Self {
        let mut rows = TurnRows::default();
        for job in jobs {
            rows.new_jobs.insert(&job.id, JobCols::default());
            for (idx, (_, deps)) in job.stages.iter().enumerate() {
                rows.stage(&job.id, idx as i64, StageCols::fresh(deps));
            }
        }
        for w in writes {
            rows.apply(w);
        }
        rows
    }

    fn stage(&mut self, job: &'a str, idx: i64, initial: StageCols<'a>) -> &mut StageCols<'a> {
        let at = *self.stage_at.entry((job, idx)).or_insert_with(|| {
            self.stages.push(((job, idx), initial));
            self.stages.len() - 1
        });
        &mut self.stages[at].1
    }

    fn job(&mut self, job: &'a str) -> &mut JobCols<'a> {
        if self.new_jobs.contains_key(job) {
            return self.new_jobs.get_mut(job).expect("checked");
        }
        let at = *self.job_patch_at.entry(job).or_insert_with(|| {
            self.job_patches.push((job, JobCols::default()));
            self.job_patches.len() - 1
        });
        &mut self.job_patches[at].1
    }

    fn apply(&mut self, w: &'a Write) {
        match w {
            Write::AttemptStarted { job, stage, attempt, grant, at } => {
                let key = (job.as_str(), *stage as i64, *attempt as i64);
                self.attempt_at.insert(key, self.new_attempts.len());
                self.new_attempts.push(AttemptRow {
                    job,
                    stage: key.1,
                    attempt: key.2,
                    state: "running",
                    grant,
                    started_at: *at,
                    finished_at: None,
                    exit_code: None,
                    signal: None,
                    error: None,
                    batch_size: None,
                });
                let s = self.stage(job, key.1, StageCols::default());
                s.state = Some(StageState::Running.as_str());
                s.attempts = Some(key.2);
                s.not_before = Some(None);
                s.started_at = Some(Some(*at));
                s.finished_at = Some(None);
                s.error = Some(None);
                s.exit_code = Some(None);
                let j = self.job(job);
                j.state = Some(JobState::Running.as_str());
                j.started_at = j.started_at.or(Some(*at));
            }
            Write::AttemptEnded {
                job,
                stage,
                attempt,
                result,
                stage_state,
                readied,
                not_before,
                error,
                output,
                exit_code,
                signal,
                batch_size,
                failures,
                interruptions,
                at,
            } => {
                match self.attempt_at.get(&(job.as_str(), *stage as i64, *attempt as i64)) {
                    Some(&i) => {
                        let a = &mut self.new_attempts[i];
                        a.state = result;
                        a.finished_at = Some(*at);
                        a.exit_code = *exit_code;
                        a.signal = *signal;
                        a.error = error.as_deref();
                        a.batch_size = *batch_size;
                    }
                    None => self.ended_earlier.push(w),
                }
                let finished = stage_state.is_final().then_some(*at);
                let s = self.stage(job, *stage as i64, StageCols::default());
                s.state = Some(stage_state.as_str());
                s.not_before = Some(*not_before);
                s.error = Some(error.as_deref());
                s.output = Some(output.as_ref().map(Value::to_string));
                s.exit_code = Some(*exit_code);
                s.failures = Some(*failures as i64);
                s.interruptions = Some(*interruptions as i64);
                s.finished_at = Some(finished);
                for next in readied {
                    self.stage(job, *next as i64, StageCols::default()).state = Some(StageState::Queued.as_str());
                }
            }
            Write::StageCancelled { job, stage, at } => {
                let s = self.stage(job, *stage as i64, StageCols::default());
                s.state = Some(StageState::Cancelled.as_str());
                s.not_before = Some(None);
                s.finished_at = Some(Some(*at));
            }
            Write::JobFinished { job, state, error, output, at } => {
                let j = self.job(job);
                j.state = Some(state.as_str());
                j.error = Some(error.as_deref());
                j.output = Some(output.as_ref().map(Value::to_string));
                j.finished_at = Some(*at);
            }
        }
    }
}

/// Rows per multi-row statement: one statement instead of one per row, well under SQLite's
/// limit on bound parameters.
const INSERT_CHUNK: usize = 64;

/// A value bound into a multi-row statement.
#[derive(Clone)]
enum Val<'a> {
    Int(Option<i64>),
    Text(Option<&'a str>),
    Owned(Option<String>),
}

fn push_val(b: &mut sqlx::query_builder::Separated<'_, Sqlite, &'static str>, v: Val<'_>) {
    match v {
        Val::Int(x) => b.push_bind(x),
        Val::Text(x) => b.push_bind(x),
        Val::Owned(x) => b.push_bind(x),
    };
}

/// The columns a patch sets, by name, with their values, in a fixed order.
#[derive(Default)]
struct SetColumns<'a> {
    names: Vec<&'static str>,
    values: Vec<Val<'a>>,
}

impl<'a> SetColumns<'a> {
    fn set(mut self, name: &'static str, value: Option<Val<'a>>) -> Self {
        if let Some(v) = value {
            self.names.push(name);
            self.values.push(v);
        }
        self
    }

    fn into_parts(self) -> (Vec<&'static str>, Vec<Val<'a>>) {
        (self.names, self.values)
    }
}

impl<'a> StageCols<'a> {
    fn set_columns(&self) -> (Vec<&'static str>, Vec<Val<'a>>) {
        SetColumns::default()
            .set("state", self.state.map(|x| Val::Text(Some(x))))
            .set("attempts", self.attempts.map(|x| Val::Int(Some(x))))
            .set("failures", self.failures.map(|x| Val::Int(Some(x))))
            .set("interruptions", self.interruptions.map(|x| Val::Int(Some(x))))
            .set("not_before", self.not_before.map(Val::Int))
            .set("started_at", self.started_at.map(Val::Int))
            .set("finished_at", self.finished_at.map(Val::Int))
            .set("exit_code", self.exit_code.map(|x| Val::Int(x.map(i64::from))))
            .set("error", self.error.map(Val::Text))
            .set("output", self.output.clone().map(Val::Owned))
            .into_parts()
    }
}

impl<'a> JobCols<'a> {
    fn set_columns(&self) -> (Vec<&'static str>, Vec<Val<'a>>) {
        SetColumns::default()
            .set("state", self.state.map(|x| Val::Text(Some(x))))
            .set("started_at", self.started_at.map(|x| Val::Int(Some(x))))
            .set("finished_at", self.finished_at.map(|x| Val::Int(Some(x))))
            .set("error", self.error.map(Val::Text))
            .set("output", self.output.clone().map(Val::Owned))
            .into_parts()
    }
}

/// One row of a multi-row update: two key values, then the values of the columns it sets.
type UpdateRow<'a> = (Val<'a>, Val<'a>, Vec<Val<'a>>);

/// Updates grouped by the columns they set: each group shares one statement text.
#[derive(Default)]
struct UpdateGroups<'a>(Vec<(Vec<&'static str>, Vec<UpdateRow<'a>>)>);

impl<'a> UpdateGroups<'a> {
    fn add(&mut self, names: Vec<&'static str>, row: UpdateRow<'a>) {
        match self.0.iter_mut().find(|(n, _)| *n == names) {
            Some((_, rows)) => rows.push(row),
            None => self.0.push((names, vec![row])),
        }
    }
}

/// `UPDATE table SET assignments FROM (VALUES (key1, key2, values...), ...) AS v WHERE
/// matches`, `INSERT_CHUNK` rows a statement. With `must_match`, a statement that updated
/// fewer rows than it carried is an error with that text.
async fn update_from_values<'a>(
    tx: &mut Transaction<'_, Sqlite>,
    table: &'static str,
    assignments: &str,
    matches: &'static str,
    rows: Vec<UpdateRow<'a>>,
    must_match: Option<&'static str>,
) -> StoreResult<()> {
    for chunk in rows.chunks(INSERT_CHUNK) {
        let mut q = QueryBuilder::<Sqlite>::new(format!("UPDATE {table} SET {assignments} FROM ("));
        q.push_values(chunk.iter().cloned(), |mut b, (k1, k2, values)| {
            push_val(&mut b, k1);
            push_val(&mut b, k2);
            for v in values {
                push_val(&mut b, v);
            }
        });
        q.push(format!(") AS v WHERE {matches}"));
        let updated = q.build().execute(&mut **tx).await?;
        if let Some(what) = must_match
            && updated.rows_affected() != chunk.len() as u64
        {
            return Err(StoreError::Corrupt(format!("{what} ({} of {} rows)", updated.rows_affected(), chunk.len())));
        }
    }
    Ok(())
}

impl SqliteStore {
    async fn write_turn_rows(
        tx: &mut Transaction<'_, Sqlite>,
        jobs: &[NewJob],
        rows: &TurnRows<'_>,
    ) -> StoreResult<()> {
        let mut snapshots: Vec<(&str, &str, i64)> = Vec::new();
        for job in jobs {
            if !snapshots.iter().any(|(h, _, _)| *h == job.config_hash) {
                snapshots.push((&job.config_hash, &job.config_text, job.created_at));
            }
        }
        for (hash, text, at) in snapshots {
            sqlx::query(
                "INSERT INTO config_snapshots (hash, text, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            )
            .bind(hash)
            .bind(text)
            .bind(at)
            .execute(&mut **tx)
            .await?;
        }
        for chunk in jobs.chunks(INSERT_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT INTO jobs (seq, id, pipeline, input, priority, state, idempotency_key, config_hash, created_at, started_at, finished_at, error, output) ",
            );
            q.push_values(chunk, |mut b, job| {
                let cols = &rows.new_jobs[job.id.as_str()];
                b.push_bind(job.seq)
                    .push_bind(&job.id)
                    .push_bind(&job.pipeline)
                    .push_bind(job.input.to_string())
                    .push_bind(job.priority)
                    .push_bind(cols.state.unwrap_or(JobState::Queued.as_str()))
                    .push_bind(&job.idempotency_key)
                    .push_bind(&job.config_hash)
                    .push_bind(job.created_at)
                    .push_bind(cols.started_at)
                    .push_bind(cols.finished_at)
                    .push_bind(cols.error.flatten())
                    .push_bind(cols.output.clone().flatten());
            });
            match q.build().execute(&mut **tx).await {
                Ok(_) => {}
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                    // Admission checks keys first, so this is a caller's duplicate: name the
                    // keys of the statement's rows (one, for `insert_job`).
                    let keys: Vec<&str> = chunk.iter().filter_map(|j| j.idempotency_key.as_deref()).collect();
                    return Err(StoreError::DuplicateKey(keys.join(", ")));
                }
                Err(e) => return Err(e.into()),
            }
        }
        // Stages of the turn's new jobs are inserted whole; others are updated.
        let (new_stages, patched): (Vec<_>, Vec<_>) =
            rows.stages.iter().partition(|((job, _), _)| rows.new_jobs.contains_key(job));
        let deps: HashMap<(&str, i64), String> = jobs
            .iter()
            .flat_map(|j| {
                j.stages.iter().enumerate().map(move |(i, (_, d))| {
                    ((j.id.as_str(), i as i64), serde_json::to_string(d).expect("serializable"))
                })
            })
            .collect();
        let names: HashMap<(&str, i64), &str> = jobs
            .iter()
            .flat_map(|j| j.stages.iter().enumerate().map(move |(i, (n, _))| ((j.id.as_str(), i as i64), n.as_str())))
            .collect();
        for chunk in new_stages.chunks(INSERT_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT INTO stages (job_id, idx, name, deps, state, attempts, failures, interruptions, not_before, started_at, finished_at, exit_code, error, output) ",
            );
            q.push_values(chunk, |mut b, (key, s)| {
                b.push_bind(key.0)
                    .push_bind(key.1)
                    .push_bind(names[key])
                    .push_bind(&deps[key])
                    .push_bind(s.state.unwrap_or(StageState::Pending.as_str()))
                    .push_bind(s.attempts.unwrap_or(0))
                    .push_bind(s.failures.unwrap_or(0))
                    .push_bind(s.interruptions.unwrap_or(0))
                    .push_bind(s.not_before.flatten())
                    .push_bind(s.started_at.flatten())
                    .push_bind(s.finished_at.flatten())
                    .push_bind(s.exit_code.flatten())
                    .push_bind(s.error.flatten())
                    .push_bind(s.output.clone().flatten());
            });
            q.build().execute(&mut **tx).await?;
        }
        // Updates are grouped by the columns they set; each group goes in statements of up
        // to `INSERT_CHUNK` rows (`UPDATE ... FROM (VALUES ...)`), not one statement per row.
        let mut stage_groups = UpdateGroups::default();
        for ((job, idx), s) in patched {
            let (names, values) = s.set_columns();
            stage_groups.add(names, (Val::Text(Some(job)), Val::Int(Some(*idx)), values));
        }
        for (names, group) in stage_groups.0 {
            let set: Vec<String> = names.iter().enumerate().map(|(i, n)| format!("{n} = v.column{}", i + 3)).collect();
            update_from_values(
                tx,
                "stages",
                &set.join(", "),
                "stages.job_id = v.column1 AND stages.idx = v.column2",
                group,
                None,
            )
            .await?;
        }
        for chunk in rows.new_attempts.chunks(INSERT_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT INTO attempts (job_id, stage_idx, attempt, state, grant_json, started_at, finished_at, exit_code, signal, error, batch_size) ",
            );
            q.push_values(chunk, |mut b, a| {
                b.push_bind(a.job)
                    .push_bind(a.stage)
                    .push_bind(a.attempt)
                    .push_bind(a.state)
                    .push_bind(a.grant)
                    .push_bind(a.started_at)
                    .push_bind(a.finished_at)
                    .push_bind(a.exit_code)
                    .push_bind(a.signal)
                    .push_bind(a.error)
                    .push_bind(a.batch_size.map(i64::from));
            });
            q.build().execute(&mut **tx).await?;
        }
        let mut ended: Vec<UpdateRow> = Vec::new();
        for w in &rows.ended_earlier {
            let Write::AttemptEnded { job, stage, attempt, result, error, exit_code, signal, batch_size, at, .. } = w
            else {
                continue;
            };
            let values = vec![
                Val::Int(Some(*attempt as i64)),
                Val::Text(Some(result)),
                Val::Int(Some(*at)),
                Val::Int(exit_code.map(i64::from)),
                Val::Int(signal.map(i64::from)),
                Val::Text(error.as_deref()),
                Val::Int(batch_size.map(i64::from)),
            ];
            ended.push((Val::Text(Some(job)), Val::Int(Some(*stage as i64)), values));
        }
        if !ended.is_empty() {
            // Every ended attempt must have been running: a count short of the rows is corrupt.
            update_from_values(
                tx,
                "attempts",
                "state = v.column4, finished_at = v.column5, exit_code = v.column6, signal = v.column7, error = v.column8, batch_size = v.column9",
                "attempts.job_id = v.column1 AND attempts.stage_idx = v.column2 AND attempts.attempt = v.column3 AND attempts.state = 'running'",
                ended,
                Some("an attempt that ended was not recorded as running"),
            )
            .await?;
        }
        let mut job_groups = UpdateGroups::default();
        for (job, j) in &rows.job_patches {
            let (names, values) = j.set_columns();
            // The key is one column: the second key slot repeats it, so both tables share the
            // statement builder.
            job_groups.add(names, (Val::Text(Some(job)), Val::Text(Some(job)), values));
        }
        for (names, group) in job_groups.0 {
            let set: Vec<String> = names
                .iter()
                .enumerate()
                .map(|(i, n)| match *n {
                    "started_at" => format!("started_at = COALESCE(jobs.started_at, v.column{})", i + 3),
                    n => format!("{n} = v.column{}", i + 3),
                })
                .collect();
            update_from_values(tx, "jobs", &set.join(", "), "jobs.id = v.column1", group, None).await?;
        }
        Ok(())
    }
}
