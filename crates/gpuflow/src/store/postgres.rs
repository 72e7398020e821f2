//! The PostgreSQL store: the same `Store` as SQLite. The shared queue that several agents
//! claim from lives in the same database and is its own type, `PgQueue` (`pg_queue.rs`).

use std::str::FromStr;
use std::time::Duration;

use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};

use super::pg_queue::notify;
use super::*;

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/postgres/0001_init.sql")),
    (4, include_str!("../../migrations/postgres/0004_batch_size.sql")),
    (6, include_str!("../../migrations/postgres/0006_cannot_run.sql")),
];

/// The channel agents LISTEN on: something became claimable, or a job is ending.
pub const QUEUE_CHANNEL: &str = "gpuflow_queue";

#[derive(Clone)]
pub struct PgStore {
    pub(super) pool: PgPool,
    pub(super) url: String,
    /// The agent this handle writes for: findings and leases are scoped to it.
    pub(super) agent: String,
}

impl Columns for PgRow {
    fn text(&self, column: &str) -> StoreResult<Option<String>> {
        Ok(self.try_get(column)?)
    }
    fn int(&self, column: &str) -> StoreResult<Option<i64>> {
        Ok(self.try_get(column)?)
    }
}

impl PgStore {
    /// Connects and brings the schema up to date (one agent at a time, under an advisory lock).
    pub async fn connect(url: &str, agent: &str) -> StoreResult<PgStore> {
        let options = PgConnectOptions::from_str(url)?.application_name("gpuflow");
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            // A connection killed by a server restart is noticed before it is handed out.
            .test_before_acquire(true)
            .connect_with(options)
            .await?;
        let store = PgStore { pool, url: url.to_string(), agent: agent.to_string() };
        store.migrate().await?;
        Ok(store)
    }

    pub fn agent(&self) -> &str {
        &self.agent
    }

    async fn migrate(&self) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(70707070)").execute(&mut *tx).await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .execute(&mut *tx)
        .await?;
        for (version, sql) in MIGRATIONS {
            let applied: Option<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = $1")
                .bind(version)
                .fetch_optional(&mut *tx)
                .await?;
            if applied.is_none() {
                sqlx::raw_sql(*sql).execute(&mut *tx).await?;
                sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, gpuflow_now_ms())")
                    .bind(version)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn insert(&self, job: &NewJob, shared: bool) -> StoreResult<i64> {
        let mut tx = self.pool.begin().await?;
        let seq = Self::insert_in(&mut tx, job, shared).await?;
        if shared {
            notify(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(seq)
    }

    pub(super) async fn insert_in(
        tx: &mut Transaction<'static, Postgres>,
        job: &NewJob,
        shared: bool,
    ) -> StoreResult<i64> {
        sqlx::query("INSERT INTO config_snapshots (hash, text, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
            .bind(&job.config_hash)
            .bind(&*job.config_text)
            .bind(job.created_at)
            .execute(&mut **tx)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO jobs (id, pipeline, input, priority, state, idempotency_key, config_hash, created_at) VALUES ($1, $2, $3, $4, 'queued', $5, $6, $7) RETURNING seq",
        )
        .bind(&job.id)
        .bind(&job.pipeline)
        .bind(job.input.to_string())
        .bind(job.priority as i64)
        .bind(&job.idempotency_key)
        .bind(&job.config_hash)
        .bind(job.created_at)
        .fetch_one(&mut **tx)
        .await;
        let seq: i64 = match inserted {
            Ok(row) => row.try_get("seq")?,
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(StoreError::DuplicateKey(job.idempotency_key.clone().unwrap_or_default()));
            }
            Err(e) => return Err(e.into()),
        };
        let names: Vec<&str> = job.stages.iter().map(|(n, _)| n.as_str()).collect();
        let deps: Vec<String> =
            job.stages.iter().map(|(_, d)| serde_json::to_string(d).expect("serializable")).collect();
        // In the shared queue a stage with no predecessors is claimable at once.
        let states: Vec<&str> =
            job.stages.iter().map(|(_, d)| if shared && d.is_empty() { "queued" } else { "pending" }).collect();
        sqlx::query(
            "INSERT INTO stages (job_id, idx, name, deps, state, priority, job_seq) SELECT $1, ord - 1, name, deps, state, $5, $6 FROM unnest($2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS t(name, deps, state, ord)",
        )
        .bind(&job.id)
        .bind(&names)
        .bind(&deps)
        .bind(&states)
        .bind(job.priority as i64)
        .bind(seq)
        .execute(&mut **tx)
        .await?;
        Ok(seq)
    }
}

impl PgStore {
    async fn write_one(tx: &mut Transaction<'static, Postgres>, w: &Write) -> StoreResult<()> {
        match w {
            Write::AttemptStarted { job, stage, attempt, grant, at } => {
                sqlx::query("INSERT INTO attempts (job_id, stage_idx, attempt, state, grant_json, started_at) VALUES ($1, $2, $3, 'running', $4, $5)")
                    .bind(job).bind(*stage as i64).bind(*attempt as i64).bind(grant).bind(at)
                    .execute(&mut **tx).await?;
                sqlx::query("UPDATE stages SET state = 'running', attempts = $3, not_before = NULL, started_at = $4, finished_at = NULL, error = NULL, exit_code = NULL WHERE job_id = $1 AND idx = $2")
                    .bind(job).bind(*stage as i64).bind(*attempt as i64).bind(at)
                    .execute(&mut **tx).await?;
                sqlx::query("UPDATE jobs SET state = 'running', started_at = COALESCE(started_at, $2) WHERE id = $1")
                    .bind(job)
                    .bind(at)
                    .execute(&mut **tx)
                    .await?;
            }
            Write::AttemptEnded {
                job,
                stage,
                attempt,
                result,
                stage_state,
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
                let updated = sqlx::query("UPDATE attempts SET state = $4, finished_at = $5, exit_code = $6, signal = $7, error = $8, batch_size = $9 WHERE job_id = $1 AND stage_idx = $2 AND attempt = $3 AND state = 'running'")
                    .bind(job).bind(*stage as i64).bind(*attempt as i64).bind(*result).bind(at)
                    .bind(exit_code.map(i64::from)).bind(signal.map(i64::from)).bind(error).bind(batch_size.map(i64::from))
                    .execute(&mut **tx).await?;
                if updated.rows_affected() != 1 {
                    return Err(StoreError::Corrupt(format!("attempt {job}/{stage}/{attempt} was not running")));
                }
                let finished = matches!(*stage_state, "succeeded" | "failed" | "cancelled").then_some(*at);
                sqlx::query("UPDATE stages SET state = $3, not_before = $4, error = $5, output = $6, exit_code = $7, failures = $8, interruptions = $9, finished_at = $10 WHERE job_id = $1 AND idx = $2")
                    .bind(job).bind(*stage as i64).bind(*stage_state).bind(not_before).bind(error)
                    .bind(output.as_ref().map(Value::to_string)).bind(exit_code.map(i64::from)).bind(*failures as i64).bind(*interruptions as i64).bind(finished)
                    .execute(&mut **tx).await?;
            }
            Write::StageCancelled { job, stage, at } => {
                sqlx::query("UPDATE stages SET state = 'cancelled', not_before = NULL, finished_at = $3 WHERE job_id = $1 AND idx = $2")
                    .bind(job).bind(*stage as i64).bind(at)
                    .execute(&mut **tx).await?;
            }
            Write::JobFinished { job, state, error, output, at } => {
                sqlx::query("UPDATE jobs SET state = $2, error = $3, output = $4, finished_at = $5 WHERE id = $1")
                    .bind(job)
                    .bind(*state)
                    .bind(error)
                    .bind(output.as_ref().map(Value::to_string))
                    .bind(at)
                    .execute(&mut **tx)
                    .await?;
            }
        }
        Ok(())
    }
}

impl Store for PgStore {
    async fn insert_job(&self, job: &NewJob) -> StoreResult<i64> {
        self.insert(job, false).await
    }

    async fn job_by_idempotency_key(&self, key: &str) -> StoreResult<Option<JobRecord>> {
        let row =
            sqlx::query("SELECT * FROM jobs WHERE idempotency_key = $1").bind(key).fetch_optional(&self.pool).await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn write(&self, batch: &[Write]) -> StoreResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for w in batch {
            Self::write_one(&mut tx, w).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Agents admit into the shared queue instead (`insert_shared_job`); this serves the
    /// store suite. The arrival number is the database's (`NewJob::seq` is not used).
    async fn write_turn(&self, jobs: &[NewJob], batch: &[Write]) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        for job in jobs {
            Self::insert_in(&mut tx, job, false).await?;
        }
        for w in batch {
            Self::write_one(&mut tx, w).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn next_job_seq(&self) -> StoreResult<i64> {
        let max: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM jobs").fetch_one(&self.pool).await?;
        Ok(max.unwrap_or(0) + 1)
    }

    async fn job(&self, id: &str) -> StoreResult<Option<JobDetail>> {
        let Some(row) = sqlx::query("SELECT * FROM jobs WHERE id = $1").bind(id).fetch_optional(&self.pool).await?
        else {
            return Ok(None);
        };
        let job = job_from_row(&row)?;
        let stages = sqlx::query("SELECT * FROM stages WHERE job_id = $1 ORDER BY idx")
            .bind(id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(stage_from_row)
            .collect::<StoreResult<_>>()?;
        let attempts = sqlx::query("SELECT * FROM attempts WHERE job_id = $1 ORDER BY stage_idx, attempt")
            .bind(id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(attempt_from_row)
            .collect::<StoreResult<_>>()?;
        Ok(Some(JobDetail { job, stages, attempts }))
    }

    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<JobRecord>> {
        let rows = sqlx::query(
            concat!("SELECT ", listed_job_columns!(), " FROM jobs WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR pipeline = $2) AND seq < $3 ORDER BY seq DESC LIMIT $4"),
        )
        .bind(&filter.state)
        .bind(&filter.pipeline)
        .bind(filter.before_seq.unwrap_or(i64::MAX))
        .bind(filter.limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn unfinished_jobs(&self, after: Option<RecoveryCursor>, limit: u32) -> StoreResult<Vec<UnfinishedJob>> {
        let RecoveryCursor(p, s) = after.unwrap_or(RecoveryCursor::start());
        let rows = sqlx::query(
            "SELECT * FROM jobs WHERE state IN ('queued', 'running') AND (-priority::bigint, seq) > ($1, $2) ORDER BY -priority::bigint, seq LIMIT $3",
        )
        .bind(p)
        .bind(s)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        let stage_rows = sqlx::query(
            "SELECT stages.* FROM stages WHERE job_id IN (SELECT id FROM jobs WHERE state IN ('queued', 'running') AND (-priority::bigint, seq) > ($1, $2) ORDER BY -priority::bigint, seq LIMIT $3) ORDER BY job_id, idx",
        )
        .bind(p)
        .bind(s)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        let jobs = rows.iter().map(job_from_row).collect::<StoreResult<Vec<_>>>()?;
        let stages = stage_rows
            .iter()
            .map(|r| Ok((r.try_get("job_id")?, stage_from_row(r)?)))
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(with_stages(jobs, stages))
    }

    async fn config_snapshot(&self, hash: &str) -> StoreResult<Option<String>> {
        Ok(sqlx::query_scalar("SELECT text FROM config_snapshots WHERE hash = $1")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn open_finding(&self, f: &gpuflow_core::diagnosis::Finding, at: i64) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "INSERT INTO findings (agent_id, kind, subject, summary, evidence, cause, fix, opened_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) RETURNING id",
        )
        .bind(&self.agent)
        .bind(f.kind.as_str())
        .bind(&f.subject)
        .bind(&f.summary)
        .bind(serde_json::to_string(&f.evidence).expect("serializable"))
        .bind(&f.cause)
        .bind(&f.fix)
        .bind(at)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn update_finding(&self, id: i64, f: &gpuflow_core::diagnosis::Finding, at: i64) -> StoreResult<()> {
        sqlx::query("UPDATE findings SET summary = $2, evidence = $3, updated_at = $4 WHERE id = $1")
            .bind(id)
            .bind(&f.summary)
            .bind(serde_json::to_string(&f.evidence).expect("serializable"))
            .bind(at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn close_finding(&self, id: i64, at: i64) -> StoreResult<()> {
        sqlx::query("UPDATE findings SET closed_at = $2, updated_at = $2 WHERE id = $1")
            .bind(id)
            .bind(at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn close_open_findings(&self, at: i64) -> StoreResult<u64> {
        // Only this agent's: other agents' findings are theirs to close.
        let r = sqlx::query(
            "UPDATE findings SET closed_at = $2, updated_at = $2 WHERE closed_at IS NULL AND agent_id = $1",
        )
        .bind(&self.agent)
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    async fn findings(&self, limit: u32) -> StoreResult<Vec<FindingRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM findings ORDER BY closed_at IS NOT NULL, COALESCE(closed_at, opened_at) DESC LIMIT $1",
        )
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(finding_from_row).collect()
    }

    async fn running_attempts(&self) -> StoreResult<Vec<(String, AttemptRecord)>> {
        let rows = sqlx::query("SELECT * FROM attempts WHERE state = 'running'").fetch_all(&self.pool).await?;
        rows.iter().map(|r| Ok((r.try_get("job_id")?, attempt_from_row(r)?))).collect()
    }

    async fn expired_jobs(&self, state: &str, finished_before_ms: i64, limit: u32) -> StoreResult<Vec<(String, i64)>> {
        let rows = sqlx::query_as::<_, (String, i64)>(
            "SELECT id, finished_at FROM jobs WHERE state = $1 AND finished_at < $2 ORDER BY seq LIMIT $3",
        )
        .bind(state)
        .bind(finished_before_ms)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    async fn delete_finished_jobs(&self, ids: &[String]) -> StoreResult<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await?;
        for sql in [
            "DELETE FROM attempts WHERE job_id IN (SELECT id FROM jobs WHERE id = ANY($1) AND state IN ('succeeded', 'failed', 'cancelled'))",
            "DELETE FROM stages WHERE job_id IN (SELECT id FROM jobs WHERE id = ANY($1) AND state IN ('succeeded', 'failed', 'cancelled'))",
        ] {
            sqlx::query(sql).bind(ids).execute(&mut *tx).await?;
        }
        let gone = sqlx::query("DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE id = ANY($1) AND state IN ('succeeded', 'failed', 'cancelled'))").bind(ids).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(gone.rows_affected())
    }

    async fn job_stats(&self, since_ms: i64) -> StoreResult<JobStats> {
        let counts = sqlx::query("SELECT pipeline, state, count(*) AS n FROM jobs GROUP BY pipeline, state")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok((r.try_get("pipeline")?, r.try_get("state")?, r.try_get::<i64, _>("n")? as u64)))
            .collect::<StoreResult<_>>()?;
        let finished = sqlx::query(
            "SELECT pipeline, state, (finished_at / 60000) * 60000 AS minute, count(*) AS n FROM jobs \
             WHERE finished_at >= $1 GROUP BY pipeline, state, minute ORDER BY minute",
        )
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok((r.try_get("pipeline")?, r.try_get("state")?, r.try_get("minute")?, r.try_get::<i64, _>("n")? as u64))
        })
        .collect::<StoreResult<_>>()?;
        Ok(JobStats { counts, finished })
    }
}
