//! The PostgreSQL store: the same `Store` as SQLite. The shared queue that several agents
//! claim from lives in the same database and is its own type, `PgQueue` (`pg_queue.rs`).

use std::str::FromStr;
use std::time::Duration;

use gpuflow_core::StageState;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};

use super::dialect::{self, Dialect};
use super::sql::{SqlBackend, SqlDb};
use super::*;

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/postgres/0001_init.sql")),
    (4, include_str!("../../migrations/postgres/0004_batch_size.sql")),
    (5, include_str!("../../migrations/postgres/0005_job_links.sql")),
    (6, include_str!("../../migrations/postgres/0006_cannot_run.sql")),
    (7, include_str!("../../migrations/postgres/0007_one_sql.sql")),
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
        store.pool.migrate(Self::DIALECT, MIGRATIONS).await?;
        Ok(store)
    }

    pub fn agent(&self) -> &str {
        &self.agent
    }

    pub(super) async fn insert_in(tx: &mut Transaction<'static, Postgres>, job: &NewJob) -> StoreResult<i64> {
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
        // A stage with no predecessors is ready (in the shared queue: claimable) at once.
        let states: Vec<&str> = job
            .stages
            .iter()
            .map(|(_, d)| if d.is_empty() { StageState::Queued } else { StageState::Pending }.as_str())
            .collect();
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
                let updated = sqlx::query("UPDATE attempts SET state = $4, finished_at = $5, exit_code = $6, signal = $7, error = $8, batch_size = $9 WHERE job_id = $1 AND stage_idx = $2 AND attempt = $3 AND state = 'running'")
                    .bind(job).bind(*stage as i64).bind(*attempt as i64).bind(*result).bind(at)
                    .bind(exit_code.map(i64::from)).bind(signal.map(i64::from)).bind(error).bind(batch_size.map(i64::from))
                    .execute(&mut **tx).await?;
                if updated.rows_affected() != 1 {
                    return Err(StoreError::Corrupt(format!("attempt {job}/{stage}/{attempt} was not running")));
                }
                let finished = stage_state.is_final().then_some(*at);
                sqlx::query("UPDATE stages SET state = $3, not_before = $4, error = $5, output = $6, exit_code = $7, failures = $8, interruptions = $9, finished_at = $10 WHERE job_id = $1 AND idx = $2")
                    .bind(job).bind(*stage as i64).bind(stage_state.as_str()).bind(not_before).bind(error)
                    .bind(output.as_ref().map(Value::to_string)).bind(exit_code.map(i64::from)).bind(*failures as i64).bind(*interruptions as i64).bind(finished)
                    .execute(&mut **tx).await?;
                if !readied.is_empty() {
                    let readied: Vec<i64> = readied.iter().map(|i| *i as i64).collect();
                    sqlx::query("UPDATE stages SET state = 'queued' WHERE job_id = $1 AND idx = ANY($2)")
                        .bind(job)
                        .bind(readied)
                        .execute(&mut **tx)
                        .await?;
                }
            }
            Write::StageCancelled { job, stage, at } => {
                sqlx::query("UPDATE stages SET state = 'cancelled', not_before = NULL, finished_at = $3 WHERE job_id = $1 AND idx = $2")
                    .bind(job).bind(*stage as i64).bind(at)
                    .execute(&mut **tx).await?;
            }
            Write::JobFinished { job, state, error, output, at } => {
                sqlx::query("UPDATE jobs SET state = $2, error = $3, output = $4, finished_at = $5 WHERE id = $1")
                    .bind(job)
                    .bind(state.as_str())
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

impl SqlBackend for PgStore {
    type Db = PgPool;
    const DIALECT: &'static Dialect = &dialect::POSTGRES;

    fn db(&self) -> &PgPool {
        &self.pool
    }

    fn findings_owner(&self) -> &str {
        &self.agent
    }

    async fn admit_job(&self, job: &NewJob) -> StoreResult<i64> {
        let mut tx = self.pool.begin().await?;
        let seq = Self::insert_in(&mut tx, job).await?;
        tx.commit().await?;
        Ok(seq)
    }

    /// Agents admit into the shared queue instead (`insert_shared_job`); this serves the
    /// store suite. The arrival number is the database's (`NewJob::seq` is not used).
    async fn commit_turn(&self, jobs: &[NewJob], batch: &[Write]) -> StoreResult<()> {
        if jobs.is_empty() && batch.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for job in jobs {
            Self::insert_in(&mut tx, job).await?;
        }
        for w in batch {
            Self::write_one(&mut tx, w).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn next_arrival(&self) -> StoreResult<i64> {
        // The serial's counter, not the largest stored number: retention may have deleted the
        // newest job, and its number must not be handed out again.
        let used: i64 = sqlx::query_scalar("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM jobs_seq_seq")
            .fetch_one(&self.pool)
            .await?;
        Ok(used + 1)
    }
}
