//! The shared queue that several agents claim from, on PostgreSQL.

use std::collections::BTreeMap;

use gpuflow_core::JobState;
use gpuflow_core::cluster::{self, SharedStage, SharedStageState, StageChange, Transition};
use serde_json::Value;
use sqlx::postgres::PgListener;
use sqlx::{Postgres, Row, Transaction};

use super::postgres::QUEUE_CHANNEL;
use super::*;

/// A claimable stage, offered to the agent's choice.
#[derive(Clone, Debug)]
pub struct ClaimCandidate {
    pub job: String,
    pub stage: usize,
    pub pipeline: String,
    pub config_hash: String,
    pub priority: i32,
    /// The job's arrival number.
    pub arrival: u64,
    /// How long it has been claimable (by the database's clock).
    pub waited_ms: u64,
}

/// The rule that decides what a lost lease does to its job (`cluster::lease_lost`).
pub type LeaseLostRule = fn(&[SharedStage], Option<JobState>, usize) -> Transition;

/// A stage this agent now holds.
#[derive(Clone, Debug)]
pub struct Claim {
    pub token: i64,
    pub job: String,
    pub stage: usize,
    pub attempt: u32,
    pub pipeline: String,
    pub config_hash: String,
    pub input: Value,
    /// Every stage's output so far, for rendering `{stages.NAME.key}`.
    pub outputs: Vec<Option<Value>>,
    pub priority: i32,
}

/// What became of an attempt's final write.
#[derive(Clone, Debug, PartialEq)]
pub enum Finish {
    Applied {
        job_finished: Option<JobState>,
    },
    /// The token is no longer current: the lease expired and the stage was re-queued.
    Fenced,
}

#[derive(Clone, Debug, PartialEq)]
pub enum SharedCancel {
    /// `cancelling` while stages still run on agents, else `cancelled`.
    Accepted(&'static str),
    AlreadyFinished(String),
    NotFound,
}

/// A lease that ran out, re-queued by whoever noticed.
#[derive(Clone, Debug)]
pub struct LostLease {
    pub agent: String,
    pub job: String,
    pub stage: usize,
    pub attempt: u32,
    /// How long past its expiry it was re-queued.
    pub late_ms: i64,
}

#[derive(Clone, Debug)]
pub struct AgentRecord {
    pub id: String,
    pub name: String,
    pub host: String,
    pub pid: i64,
    pub api: String,
    pub resources: Value,
    pub started_at: i64,
    pub heartbeat_at: i64,
    pub heartbeat_age_ms: i64,
    /// running (heartbeat within one lease TTL), unresponsive, stopped or replaced.
    pub state: String,
    pub leases: i64,
}

fn shared_state(s: &str) -> SharedStageState {
    match s {
        "pending" => SharedStageState::Pending,
        "queued" | "backoff" => SharedStageState::Waiting,
        "running" => SharedStageState::Running,
        "succeeded" => SharedStageState::Succeeded,
        "failed" => SharedStageState::Failed,
        _ => SharedStageState::Cancelled,
    }
}

impl PgStore {
    /// A listener for `QUEUE_CHANNEL`. It reconnects by itself; notifications sent while it
    /// was away are lost, which is why agents also poll.
    pub async fn listener(&self) -> StoreResult<PgListener> {
        let mut listener = PgListener::connect(&self.url).await?;
        listener.listen(QUEUE_CHANNEL).await?;
        Ok(listener)
    }

    /// Inserts a job into the shared queue and wakes the agents.
    pub async fn insert_shared_job(&self, job: &NewJob) -> StoreResult<i64> {
        self.insert(job, true).await
    }

    /// Unfinished jobs of a pipeline, across every agent (for `max_queued`).
    pub async fn unfinished_count(&self, pipeline: &str) -> StoreResult<u64> {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM jobs WHERE pipeline = $1 AND state IN ('queued', 'running')")
                .bind(pipeline)
                .fetch_one(&self.pool)
                .await?;
        Ok(n as u64)
    }

    // ---- agents ----------------------------------------------------------------------------

    /// Records this agent. Leases held by earlier runs under the same name (a restart after a
    /// crash) are re-queued at once: their processes were killed by this run's start-up sweep.
    pub async fn register_agent(
        &self,
        name: &str,
        host: &str,
        api: &str,
        resources: &Value,
        rule: LeaseLostRule,
    ) -> StoreResult<Vec<LostLease>> {
        sqlx::query(
            "INSERT INTO agents (id, name, host, pid, api, resources, started_at, heartbeat_at, state) VALUES ($1, $2, $3, $4, $5, $6, gpuflow_now_ms(), gpuflow_now_ms(), 'running')",
        )
        .bind(&self.agent)
        .bind(name)
        .bind(host)
        .bind(std::process::id() as i64)
        .bind(api)
        .bind(resources.to_string())
        .execute(&self.pool)
        .await?;
        let previous: Vec<String> = sqlx::query_scalar(
            "UPDATE agents SET state = 'replaced' WHERE name = $1 AND id <> $2 AND state = 'running' RETURNING id",
        )
        .bind(name)
        .bind(&self.agent)
        .fetch_all(&self.pool)
        .await?;
        self.requeue_leases(Requeue::OfAgents, &previous, rule).await
    }

    /// Renews every lease this agent holds; returns the tokens it still holds. A token missing
    /// from the answer was lost (expired and re-queued): its process must be killed.
    pub async fn heartbeat(&self, ttl_ms: u64, resources: &Value) -> StoreResult<Vec<i64>> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE agents SET heartbeat_at = gpuflow_now_ms(), resources = $2 WHERE id = $1")
            .bind(&self.agent)
            .bind(resources.to_string())
            .execute(&mut *tx)
            .await?;
        let held: Vec<i64> = sqlx::query_scalar(
            "UPDATE leases SET expires_at = gpuflow_now_ms() + $2 WHERE agent_id = $1 AND expires_at >= gpuflow_now_ms() RETURNING token",
        )
        .bind(&self.agent)
        .bind(ttl_ms as i64)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(held)
    }

    /// Marks this agent stopped and re-queues what it held (a clean shutdown stopped those
    /// processes), so other agents need not wait for the leases to expire.
    pub async fn stop_agent(&self, rule: LeaseLostRule) -> StoreResult<Vec<LostLease>> {
        sqlx::query("UPDATE agents SET state = 'stopped', heartbeat_at = gpuflow_now_ms() WHERE id = $1")
            .bind(&self.agent)
            .execute(&self.pool)
            .await?;
        self.requeue_leases(Requeue::OfAgents, std::slice::from_ref(&self.agent), rule).await
    }

    /// Re-queues leases past their expiry, whoever held them.
    pub async fn expire_leases(&self, rule: LeaseLostRule) -> StoreResult<Vec<LostLease>> {
        self.requeue_leases(Requeue::Expired, &[], rule).await
    }

    /// Every agent, newest first, with its state judged against `ttl_ms`.
    pub async fn agents(&self, ttl_ms: u64) -> StoreResult<Vec<AgentRecord>> {
        let rows = sqlx::query(
            "SELECT a.*, gpuflow_now_ms() - a.heartbeat_at AS age, (SELECT count(*) FROM leases l WHERE l.agent_id = a.id) AS lease_count FROM agents a ORDER BY a.started_at DESC LIMIT 200",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let age: i64 = r.try_get("age")?;
                let state: String = r.try_get("state")?;
                let state = if state == "running" && age > ttl_ms as i64 { "unresponsive".to_string() } else { state };
                Ok(AgentRecord {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    host: r.try_get("host")?,
                    pid: r.try_get("pid")?,
                    api: r.try_get("api")?,
                    resources: r.json("resources")?.unwrap_or(Value::Null),
                    started_at: r.try_get("started_at")?,
                    heartbeat_at: r.try_get("heartbeat_at")?,
                    heartbeat_age_ms: age,
                    state,
                    leases: r.try_get("lease_count")?,
                })
            })
            .collect()
    }

    async fn requeue_leases(
        &self,
        which: Requeue,
        agents: &[String],
        rule: LeaseLostRule,
    ) -> StoreResult<Vec<LostLease>> {
        let (select, delete) = match which {
            Requeue::OfAgents => (
                "SELECT token, job_id FROM leases WHERE agent_id = ANY($1) ORDER BY job_id LIMIT 500",
                "DELETE FROM leases WHERE token = $2 AND agent_id = ANY($1) RETURNING agent_id, stage_idx, attempt, gpuflow_now_ms() - expires_at",
            ),
            Requeue::Expired => (
                "SELECT token, job_id FROM leases WHERE expires_at < gpuflow_now_ms() AND $1::text[] IS NOT NULL ORDER BY job_id LIMIT 500",
                "DELETE FROM leases WHERE token = $2 AND expires_at < gpuflow_now_ms() AND $1::text[] IS NOT NULL RETURNING agent_id, stage_idx, attempt, gpuflow_now_ms() - expires_at",
            ),
        };
        let candidates: Vec<(i64, String)> = sqlx::query_as(select).bind(agents).fetch_all(&self.pool).await?;
        let mut lost = Vec::new();
        for (token, job) in candidates {
            let mut tx = self.pool.begin().await?;
            let (stages, ending) = lock_job(&mut tx, &job).await?;
            // Re-checked under the locks: a heartbeat or a finish may have come first.
            let row: Option<(String, i64, i64, i64)> =
                sqlx::query_as(delete).bind(agents).bind(token).fetch_optional(&mut *tx).await?;
            let Some((agent, stage, attempt, late_ms)) = row else { continue };
            let (stage, attempt) = (stage as usize, attempt as u32);
            let t = rule(&stages, ending, stage);
            apply(&mut tx, &job, stage, attempt, &t, &AttemptDetails::default()).await?;
            tx.commit().await?;
            lost.push(LostLease { agent, job, stage, attempt, late_ms });
        }
        Ok(lost)
    }

    // ---- claims and fenced writes ------------------------------------------------------------

    /// Claims what `choose` picks (by position) among the first `limit` claimable stages,
    /// highest priority then oldest first (`cluster::choose_claims` decides against the agent's
    /// free resources). The window is locked `FOR UPDATE SKIP LOCKED`: stages other agents are
    /// claiming are skipped, not waited for, and what is not chosen is released at commit.
    pub async fn claim(
        &self,
        limit: u32,
        ttl_ms: u64,
        choose: impl FnOnce(&[ClaimCandidate]) -> Vec<usize>,
    ) -> StoreResult<Vec<Claim>> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT s.job_id, s.idx, s.attempts, j.pipeline, j.config_hash, j.priority, s.job_seq, \
             gpuflow_now_ms() - COALESCE(s.not_before, j.created_at) AS waited FROM stages s JOIN jobs j ON j.id = s.job_id \
             WHERE s.state IN ('queued', 'backoff') AND COALESCE(s.not_before, 0) <= gpuflow_now_ms() AND j.ending IS NULL \
             ORDER BY s.priority DESC, s.job_seq, s.idx LIMIT $1 FOR UPDATE OF s SKIP LOCKED",
        )
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await?;
        let mut candidates = Vec::with_capacity(rows.len());
        let mut attempts = Vec::with_capacity(rows.len());
        for r in &rows {
            candidates.push(ClaimCandidate {
                job: r.try_get("job_id")?,
                stage: r.try_get::<i64, _>("idx")? as usize,
                pipeline: r.try_get("pipeline")?,
                config_hash: r.try_get("config_hash")?,
                priority: r.try_get::<i64, _>("priority")? as i32,
                arrival: r.try_get::<i64, _>("job_seq")?.max(0) as u64,
                waited_ms: r.try_get::<i64, _>("waited")?.max(0) as u64,
            });
            attempts.push(r.try_get::<i64, _>("attempts")? as u32 + 1);
        }
        let mut picked = choose(&candidates);
        picked.sort_unstable();
        picked.dedup();
        let mut chosen: Vec<(ClaimCandidate, u32)> = Vec::new();
        for i in picked {
            if let Some(c) = candidates.get(i) {
                chosen.push((c.clone(), attempts[i]));
            }
        }
        if chosen.is_empty() {
            tx.rollback().await?;
            return Ok(Vec::new());
        }
        let jobs: Vec<&str> = chosen.iter().map(|(c, _)| c.job.as_str()).collect();
        let idxs: Vec<i64> = chosen.iter().map(|(c, _)| c.stage as i64).collect();
        let attempts: Vec<i64> = chosen.iter().map(|(_, a)| *a as i64).collect();
        let tokens: Vec<i64> = sqlx::query(
            "INSERT INTO leases (token, job_id, stage_idx, attempt, agent_id, granted_at, expires_at) \
             SELECT nextval('fencing_tokens'), j, i, a, $4, gpuflow_now_ms(), gpuflow_now_ms() + $5 FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS t(j, i, a) \
             RETURNING token, job_id, stage_idx",
        )
        .bind(&jobs)
        .bind(&idxs)
        .bind(&attempts)
        .bind(&self.agent)
        .bind(ttl_ms as i64)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| -> StoreResult<((String, i64), i64)> {
            Ok(((r.try_get("job_id")?, r.try_get("stage_idx")?), r.try_get("token")?))
        })
        .collect::<StoreResult<BTreeMap<_, _>>>()?
        .into_values()
        .collect();
        // `tokens` is ordered by (job, stage); order the claims the same way.
        chosen.sort_by(|a, b| (&a.0.job, a.0.stage).cmp(&(&b.0.job, b.0.stage)));
        let jobs: Vec<&str> = chosen.iter().map(|(c, _)| c.job.as_str()).collect();
        let idxs: Vec<i64> = chosen.iter().map(|(c, _)| c.stage as i64).collect();
        let attempts: Vec<i64> = chosen.iter().map(|(_, a)| *a as i64).collect();
        sqlx::query(
            "INSERT INTO attempts (job_id, stage_idx, attempt, state, grant_json, started_at, agent_id, token) \
             SELECT j, i, a, 'running', '{}', gpuflow_now_ms(), $4, t FROM unnest($1::text[], $2::bigint[], $3::bigint[], $5::bigint[]) AS u(j, i, a, t)",
        )
        .bind(&jobs)
        .bind(&idxs)
        .bind(&attempts)
        .bind(&self.agent)
        .bind(&tokens)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE stages s SET state = 'running', attempts = u.a, not_before = NULL, started_at = gpuflow_now_ms(), finished_at = NULL, error = NULL, exit_code = NULL \
             FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS u(j, i, a) WHERE s.job_id = u.j AND s.idx = u.i",
        )
        .bind(&jobs)
        .bind(&idxs)
        .bind(&attempts)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE jobs SET state = 'running', started_at = COALESCE(started_at, gpuflow_now_ms()) \
             WHERE id IN (SELECT id FROM jobs WHERE id = ANY($1) ORDER BY id FOR UPDATE)",
        )
        .bind(&jobs)
        .execute(&mut *tx)
        .await?;
        // What the claimed stages need to render their commands.
        let details = sqlx::query(
            "SELECT j.id, j.input, (SELECT json_agg(s.output ORDER BY s.idx) FROM stages s WHERE s.job_id = j.id)::text AS outputs FROM jobs j WHERE j.id = ANY($1)",
        )
        .bind(&jobs)
        .fetch_all(&mut *tx)
        .await?;
        let mut by_job: BTreeMap<String, (Value, Vec<Option<Value>>)> = BTreeMap::new();
        for r in &details {
            let raw: Vec<Option<String>> = serde_json::from_value(r.json("outputs")?.unwrap_or(Value::Null))
                .map_err(|e| StoreError::Corrupt(format!("outputs: {e}")))?;
            let outputs = raw.into_iter().map(|o| o.map(|t| serde_json::from_str(&t).unwrap_or(Value::Null))).collect();
            by_job.insert(r.try_get("id")?, (r.json("input")?.unwrap_or(Value::Null), outputs));
        }
        tx.commit().await?;
        Ok(chosen
            .into_iter()
            .zip(tokens)
            .map(|((c, attempt), token)| {
                let (input, outputs) = by_job.get(&c.job).cloned().unwrap_or((Value::Null, Vec::new()));
                Claim {
                    token,
                    job: c.job,
                    stage: c.stage,
                    attempt,
                    pipeline: c.pipeline,
                    config_hash: c.config_hash,
                    input,
                    outputs,
                    priority: c.priority,
                }
            })
            .collect())
    }

    /// Records what the attempt was granted. False when its token is no longer current.
    pub async fn record_grant(&self, token: i64, grant: &Value) -> StoreResult<bool> {
        let r = sqlx::query(
            "UPDATE attempts a SET grant_json = $2 FROM leases l WHERE l.token = $1 AND l.agent_id = $3 AND a.token = l.token",
        )
        .bind(token)
        .bind(grant.to_string())
        .bind(&self.agent)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The attempt's final write, fenced by its token: refused when the lease was lost. Within
    /// one transaction: locks the job's stages, asks `decide` (the caller's rule, given the
    /// stages, the job's pending end and the lease's stage) for the transition, and writes it.
    pub async fn finish(
        &self,
        token: i64,
        job: &str,
        details: &AttemptDetails,
        decide: impl FnOnce(&[SharedStage], Option<JobState>, usize) -> Transition,
    ) -> StoreResult<Finish> {
        let mut tx = self.pool.begin().await?;
        let (stages, ending) = lock_job(&mut tx, job).await?;
        let lease: Option<(i64, i64)> = sqlx::query_as(
            "DELETE FROM leases WHERE token = $1 AND agent_id = $2 AND job_id = $3 RETURNING stage_idx, attempt",
        )
        .bind(token)
        .bind(&self.agent)
        .bind(job)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((stage, attempt)) = lease else {
            tx.rollback().await?;
            return Ok(Finish::Fenced);
        };
        let t = decide(&stages, ending, stage as usize);
        apply(&mut tx, job, stage as usize, attempt as u32, &t, details).await?;
        tx.commit().await?;
        Ok(Finish::Applied { job_finished: t.finished })
    }

    /// Asks a job to stop: what has not started is cancelled now; running stages are stopped
    /// by the agents that hold them, which see the job's `ending`.
    /// `decide` is the rule (`cluster::cancel`); `None` from it means the job has finished.
    pub async fn cancel_shared(
        &self,
        job: &str,
        decide: impl FnOnce(&[SharedStage], Option<JobState>) -> Option<Transition>,
    ) -> StoreResult<SharedCancel> {
        let mut tx = self.pool.begin().await?;
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1").bind(job).fetch_optional(&mut *tx).await?;
        let Some(state) = state else { return Ok(SharedCancel::NotFound) };
        if JobState::parse(&state).is_some_and(|s| s.is_final()) {
            return Ok(SharedCancel::AlreadyFinished(state));
        }
        let (stages, ending) = lock_job(&mut tx, job).await?;
        let Some(t) = decide(&stages, ending) else {
            return Ok(SharedCancel::AlreadyFinished(state));
        };
        apply(&mut tx, job, 0, 0, &t, &AttemptDetails::default()).await?;
        tx.commit().await?;
        Ok(SharedCancel::Accepted(if t.finished.is_some() { "cancelled" } else { "cancelling" }))
    }

    /// This agent's leases whose job is ending (cancelled, or failed on another stage).
    pub async fn leases_to_stop(&self) -> StoreResult<Vec<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT l.token FROM leases l JOIN jobs j ON j.id = l.job_id WHERE l.agent_id = $1 AND j.ending IS NOT NULL",
        )
        .bind(&self.agent)
        .fetch_all(&self.pool)
        .await?)
    }
}

/// Whose leases to re-queue.
#[derive(Clone, Copy)]
enum Requeue {
    /// Those of the given agents (stopped, or replaced by a restart).
    OfAgents,
    /// Those past their expiry, whoever holds them.
    Expired,
}

/// How the attempt's process ended, for the attempt and stage rows.
#[derive(Clone, Debug, Default)]
pub struct AttemptDetails {
    pub output: Option<Value>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub batch_size: Option<u32>,
}

pub(super) async fn notify(tx: &mut Transaction<'static, Postgres>) -> StoreResult<()> {
    sqlx::query("SELECT pg_notify($1, '')").bind(QUEUE_CHANNEL).execute(&mut **tx).await?;
    Ok(())
}

/// Locks a job's stages (by index) and then the job, and reads them as the transitions see them.
async fn lock_job(
    tx: &mut Transaction<'static, Postgres>,
    job: &str,
) -> StoreResult<(Vec<SharedStage>, Option<JobState>)> {
    let rows = sqlx::query(
        "SELECT idx, name, deps, state, failures, interruptions FROM stages WHERE job_id = $1 ORDER BY idx FOR UPDATE",
    )
    .bind(job)
    .fetch_all(&mut **tx)
    .await?;
    let stages = rows
        .iter()
        .map(|r| {
            let deps: Vec<usize> = serde_json::from_value(r.json("deps")?.unwrap_or(Value::Null))
                .map_err(|e| StoreError::Corrupt(format!("deps: {e}")))?;
            Ok(SharedStage {
                name: r.required_text("name")?,
                state: shared_state(&r.required_text("state")?),
                deps,
                failures: r.required_int("failures")? as u32,
                interruptions: r.required_int("interruptions")? as u32,
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
    let ending: Option<String> =
        sqlx::query_scalar("SELECT ending FROM jobs WHERE id = $1 FOR UPDATE").bind(job).fetch_one(&mut **tx).await?;
    Ok((stages, ending.as_deref().and_then(JobState::parse)))
}

/// Writes a transition: the attempt, each changed stage, the job's end; then wakes the agents.
async fn apply(
    tx: &mut Transaction<'static, Postgres>,
    job: &str,
    stage: usize,
    attempt: u32,
    t: &Transition,
    details: &AttemptDetails,
) -> StoreResult<()> {
    let error = t.attempt.as_ref().and_then(|(_, e)| e.clone());
    if let Some((result, _)) = &t.attempt {
        sqlx::query(
            "UPDATE attempts SET state = $4, finished_at = gpuflow_now_ms(), exit_code = $5, signal = $6, error = $7, batch_size = $8 WHERE job_id = $1 AND stage_idx = $2 AND attempt = $3",
        )
        .bind(job)
        .bind(stage as i64)
        .bind(attempt as i64)
        .bind(result.as_str())
        .bind(details.exit_code.map(i64::from))
        .bind(details.signal.map(i64::from))
        .bind(&error)
        .bind(details.batch_size.map(i64::from))
        .execute(&mut **tx)
        .await?;
    }
    for (idx, change) in &t.changes {
        let ended_here = t.attempt.is_some() && *idx == stage;
        // `not_before`: when a waiting stage is claimable (how long it waited, for claims).
        let (state, not_before_delay) = match change {
            StageChange::Succeeded => ("succeeded", None),
            StageChange::Retry { delay_ms: 0 } => ("queued", Some(0)),
            StageChange::Retry { delay_ms } => ("backoff", Some(*delay_ms as i64)),
            StageChange::Failed => ("failed", None),
            StageChange::Cancelled => ("cancelled", None),
            StageChange::Ready => ("queued", Some(0)),
            // The agent holding it sees the job's ending and stops it.
            StageChange::Stop => continue,
        };
        let finished = matches!(change, StageChange::Succeeded | StageChange::Failed | StageChange::Cancelled);
        if ended_here {
            let output = (*change == StageChange::Succeeded).then(|| details.output.as_ref().map(Value::to_string));
            sqlx::query(
                "UPDATE stages SET state = $3, not_before = gpuflow_now_ms() + $4, error = $5, output = $6, exit_code = $7, failures = $8, interruptions = $9, \
                 finished_at = CASE WHEN $10 THEN gpuflow_now_ms() END WHERE job_id = $1 AND idx = $2",
            )
            .bind(job)
            .bind(*idx as i64)
            .bind(state)
            .bind(not_before_delay)
            .bind(&error)
            .bind(output.flatten())
            .bind(details.exit_code.map(i64::from))
            .bind(t.failures as i64)
            .bind(t.interruptions as i64)
            .bind(finished)
            .execute(&mut **tx)
            .await?;
        } else {
            sqlx::query(
                "UPDATE stages SET state = $3, not_before = gpuflow_now_ms() + $5, finished_at = CASE WHEN $4 THEN gpuflow_now_ms() END WHERE job_id = $1 AND idx = $2",
            )
            .bind(job)
            .bind(*idx as i64)
            .bind(state)
            .bind(finished)
            .bind(not_before_delay)
            .execute(&mut **tx)
            .await?;
        }
    }
    if let Some((state, reason)) = &t.ending {
        sqlx::query("UPDATE jobs SET ending = $2, error = $3 WHERE id = $1")
            .bind(job)
            .bind(state.as_str())
            .bind(reason)
            .execute(&mut **tx)
            .await?;
    }
    if let Some(state) = t.finished {
        let output = if state == JobState::Succeeded { job_output(tx, job).await? } else { None };
        sqlx::query("UPDATE jobs SET state = $2, output = $3, finished_at = gpuflow_now_ms() WHERE id = $1")
            .bind(job)
            .bind(state.as_str())
            .bind(output.map(|o| o.to_string()))
            .execute(&mut **tx)
            .await?;
    }
    notify(tx).await
}

/// The job's output: its one final stage's output, or an object of all final stages' outputs.
async fn job_output(tx: &mut Transaction<'static, Postgres>, job: &str) -> StoreResult<Option<Value>> {
    let rows = sqlx::query("SELECT name, deps, output FROM stages WHERE job_id = $1 ORDER BY idx")
        .bind(job)
        .fetch_all(&mut **tx)
        .await?;
    let mut stages = Vec::new();
    let mut outputs = Vec::new();
    for r in &rows {
        let deps: Vec<usize> = serde_json::from_value(r.json("deps")?.unwrap_or(Value::Null))
            .map_err(|e| StoreError::Corrupt(format!("deps: {e}")))?;
        let name = r.required_text("name")?;
        stages.push(SharedStage {
            name: name.clone(),
            state: SharedStageState::Succeeded,
            deps,
            failures: 0,
            interruptions: 0,
        });
        outputs.push((name, r.json("output")?));
    }
    let sinks = cluster::sinks(&stages);
    if let [only] = sinks.as_slice() {
        return Ok(outputs[*only].1.clone());
    }
    let map: serde_json::Map<String, Value> =
        sinks.iter().map(|i| (outputs[*i].0.clone(), outputs[*i].1.clone().unwrap_or(Value::Null))).collect();
    Ok(Some(Value::Object(map)))
}
