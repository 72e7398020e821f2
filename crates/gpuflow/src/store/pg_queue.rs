//! The shared queue that several agents claim from, on PostgreSQL: agents, claims, leases,
//! renewals, expiry and fencing. Claims take `FOR UPDATE SKIP LOCKED` on claimable stages;
//! every claim is a lease row with a fencing token and an expiry read against the database's
//! clock; every write about an attempt is conditional on its token.
//!
//! The queue decides nothing about a job: each change locks the job's rows, hands them to the
//! caller's rule (`gpuflow_core::cluster`, the same rules as the single engine) and writes the
//! transition it returns, in the same transaction; which candidates to claim is the caller's
//! choice too (`cluster::choose_claims`). Lock order, to rule out deadlocks: stage rows (by job,
//! then index) before job rows (by id); a claim skips locked stages instead of waiting.

use std::collections::BTreeMap;

use gpuflow_core::JobState;
use gpuflow_core::cluster::{self, SharedStage, SharedStageState, StageChange, Transition};
use serde_json::Value;
use sqlx::postgres::{PgListener, PgPool};
use sqlx::{Postgres, Row, Transaction};

use super::postgres::QUEUE_CHANNEL;
use super::*;

/// The shared queue, acting for one agent (`PgStore::queue`).
#[derive(Clone)]
pub struct PgQueue {
    pool: PgPool,
    url: String,
    /// The agent whose leases these are.
    agent: String,
}

impl PgStore {
    /// The shared queue in this store's database, acting for the same agent.
    pub fn queue(&self) -> PgQueue {
        PgQueue { pool: self.pool.clone(), url: self.url.clone(), agent: self.agent.clone() }
    }
}

/// An attempt's end, to be written fenced by its claim's token.
#[derive(Clone, Debug)]
pub struct Ending {
    pub token: i64,
    pub job: String,
    pub details: AttemptDetails,
}

/// A claim to make: how many candidates to look at, the lease's TTL, which stages to offer
/// beyond the window in claim order, and the caller's choice among the candidates.
pub struct ClaimAsk<'a> {
    pub limit: u32,
    pub ttl_ms: u64,
    pub also: Also,
    /// Picks candidates by position (`cluster::choose_claims`).
    pub choose: Choose<'a>,
}

/// The caller's choice among claim candidates, by position (`cluster::choose_claims`).
pub type Choose<'a> = Box<dyn FnMut(&[ClaimCandidate]) -> Vec<usize> + Send + 'a>;

/// The caller's rule for the `i`th ending of a round: `(i, stages, the job's pending end, the
/// lease's stage) -> transition` (`cluster::attempt_ended`).
pub type EndRule<'a> = dyn FnMut(usize, &[SharedStage], Option<JobState>, usize) -> Transition + 'a;

/// A claimed stage's token, its job's input and every stage's output.
type Granted = (i64, Value, Vec<Option<Value>>);

/// What a claim offers besides the first `limit` claimable stages in claim order.
#[derive(Clone, Debug)]
pub enum Also {
    Nothing,
    /// Every claimable stage that has waited at least this long (a scan of the claimable).
    Starving {
        after_ms: u64,
    },
    /// These stages, if still claimable (looked up by key).
    Keys(Vec<(String, usize)>),
}

/// What one `PgQueue::sync` did.
#[derive(Debug)]
pub struct Synced {
    /// Grants not recorded because their lease is gone.
    pub refused_grants: usize,
    /// For each ending, in order.
    pub finishes: Vec<Finish>,
    pub claims: Vec<Claim>,
}

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

/// What became of a shared admission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admitted {
    /// Inserted, with this arrival number.
    Inserted(i64),
    /// The pipeline has `max_queued` unfinished jobs already.
    Full,
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

impl PgQueue {
    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// A listener for `QUEUE_CHANNEL`. It reconnects by itself; notifications sent while it
    /// was away are lost, which is why agents also poll.
    pub async fn listener(&self) -> StoreResult<PgListener> {
        let mut listener = PgListener::connect(&self.url).await?;
        listener.listen(QUEUE_CHANNEL).await?;
        Ok(listener)
    }

    /// Inserts a job into the shared queue and wakes the agents, unless the pipeline already
    /// has `max_queued` unfinished jobs across every agent (`Admitted::Full`). The count and
    /// the insert hold the pipeline's admission lock, so agents admitting at the same instant
    /// take turns and the bound is exact.
    pub async fn insert_shared_job(&self, job: &NewJob, max_queued: u64) -> StoreResult<Admitted> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(70707071, hashtext($1))")
            .bind(&job.pipeline)
            .execute(&mut *tx)
            .await?;
        // A statement of its own after the lock: its snapshot sees the jobs the previous
        // holder committed (one taken before the lock was granted would not).
        let unfinished: i64 =
            sqlx::query_scalar("SELECT count(*) FROM jobs WHERE pipeline = $1 AND state IN ('queued', 'running')")
                .bind(&job.pipeline)
                .fetch_one(&mut *tx)
                .await?;
        if unfinished as u64 >= max_queued {
            tx.rollback().await?;
            return Ok(Admitted::Full);
        }
        let seq = PgStore::insert_in(&mut tx, job).await?;
        notify(&mut tx).await?;
        tx.commit().await?;
        Ok(Admitted::Inserted(seq))
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
            let mut views = lock_jobs(&mut tx, &[job.as_str()]).await?;
            // Re-checked under the locks: a heartbeat or a finish may have come first.
            let row: Option<(String, i64, i64, i64)> =
                sqlx::query_as(delete).bind(agents).bind(token).fetch_optional(&mut *tx).await?;
            let (Some((agent, stage, attempt, late_ms)), Some(view)) = (row, views.get_mut(&job)) else { continue };
            let (stage, attempt) = (stage as usize, attempt as u32);
            let t = rule(&view.stages, view.ending, stage);
            let mut writes = Writes::default();
            writes.add(&job, view, stage, attempt, &t, &AttemptDetails::default());
            writes.write(&mut tx).await?;
            tx.commit().await?;
            lost.push(LostLease { agent, job, stage, attempt, late_ms });
        }
        Ok(lost)
    }

    // ---- claims and fenced writes ------------------------------------------------------------

    /// One round of the agent's queue work in one transaction: the final writes of attempts
    /// that ended (`endings`, each fenced by its token), then, when `ask` is given, a claim of
    /// what fits the agent's free resources. `decide(i, stages, ending, stage)` gives the
    /// transition for `endings[i]` (the caller's rule, `cluster::attempt_ended`); endings of one
    /// job are decided in order, each against the rows as the previous one left them.
    ///
    /// Round trips: the stage locks, the job locks, the fence check, one statement for every
    /// attempt, stage and job row of the round; then the claim's read and its one write.
    pub async fn sync(
        &self,
        grants: &[(i64, Value)],
        endings: &[Ending],
        decide: &mut EndRule<'_>,
        ask: Option<ClaimAsk<'_>>,
    ) -> StoreResult<Synced> {
        let mut tx = self.pool.begin().await?;
        // Before the ends: a stage that started and ended in one turn still holds its lease here.
        let refused_grants = if grants.is_empty() { 0 } else { self.record_grants(&mut tx, grants).await? };
        let finishes = if endings.is_empty() { Vec::new() } else { self.settle(&mut tx, endings, decide).await? };
        let claims = match ask {
            Some(ask) => self.claim_in(&mut tx, ask).await?,
            None => Vec::new(),
        };
        tx.commit().await?;
        Ok(Synced { refused_grants, finishes, claims })
    }

    /// Records what started attempts were granted (for display), each fenced by its token.
    /// Returns how many were refused (the lease is gone).
    async fn record_grants(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        grants: &[(i64, Value)],
    ) -> StoreResult<usize> {
        let tokens: Vec<i64> = grants.iter().map(|(t, _)| *t).collect();
        let values: Vec<String> = grants.iter().map(|(_, g)| g.to_string()).collect();
        let updated = sqlx::query(
            "UPDATE attempts a SET grant_json = u.g FROM unnest($1::bigint[], $2::text[]) AS u(t, g), leases l \
             WHERE l.token = u.t AND l.agent_id = $3 AND a.token = l.token",
        )
        .bind(&tokens)
        .bind(&values)
        .bind(&self.agent)
        .execute(&mut **tx)
        .await?;
        Ok(grants.len().saturating_sub(updated.rows_affected() as usize))
    }

    async fn settle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        endings: &[Ending],
        decide: &mut EndRule<'_>,
    ) -> StoreResult<Vec<Finish>> {
        let jobs: Vec<&str> = endings.iter().map(|e| e.job.as_str()).collect();
        let tokens: Vec<i64> = endings.iter().map(|e| e.token).collect();
        let (mut views, held) = lock_jobs_and_fence(tx, &jobs, &tokens, &self.agent).await?;
        let mut writes = Writes::default();
        let mut finishes = Vec::with_capacity(endings.len());
        for (i, e) in endings.iter().enumerate() {
            let (Some((job, stage, attempt)), Some(view)) = (held.get(&e.token), views.get_mut(&e.job)) else {
                finishes.push(Finish::Fenced);
                continue;
            };
            if *job != e.job {
                return Err(StoreError::Corrupt(format!("lease {} is of job {job}, not {}", e.token, e.job)));
            }
            let (stage, attempt) = (*stage as usize, *attempt as u32);
            let t = decide(i, &view.stages, view.ending, stage);
            writes.add(&e.job, view, stage, attempt, &t, &e.details);
            finishes.push(Finish::Applied { job_finished: t.finished });
        }
        writes.write(tx).await?;
        Ok(finishes)
    }

    /// Claims what `choose` picks (by position) among the first `limit` claimable stages,
    /// highest priority then oldest first (`cluster::choose_claims` decides against the agent's
    /// free resources). The window is locked `FOR UPDATE SKIP LOCKED`: stages other agents are
    /// claiming are skipped, not waited for, and what is not chosen is released at commit.
    pub async fn claim(
        &self,
        limit: u32,
        ttl_ms: u64,
        choose: impl FnOnce(&[ClaimCandidate]) -> Vec<usize> + Send,
    ) -> StoreResult<Vec<Claim>> {
        let mut choose = Some(choose);
        let pick = |offered: &[ClaimCandidate]| choose.take().map(|f| f(offered)).unwrap_or_default();
        let ask = ClaimAsk { limit, ttl_ms, also: Also::Nothing, choose: Box::new(pick) };
        let mut tx = self.pool.begin().await?;
        let claims = self.claim_in(&mut tx, ask).await?;
        tx.commit().await?;
        Ok(claims)
    }

    async fn claim_in(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        mut ask: ClaimAsk<'_>,
    ) -> StoreResult<Vec<Claim>> {
        const COLUMNS: &str = "s.job_id, s.idx, s.attempts, j.pipeline, j.config_hash, j.priority, s.job_seq, \
             gpuflow_now_ms() - COALESCE(s.not_before, j.created_at) AS waited FROM stages s JOIN jobs j ON j.id = s.job_id \
             WHERE s.state IN ('queued', 'backoff') AND COALESCE(s.not_before, 0) <= gpuflow_now_ms() AND j.ending IS NULL";
        const ORDER: &str = "ORDER BY s.priority DESC, s.job_seq, s.idx";
        // The window in claim order, plus the stages that waited past the starvation bound
        // wherever they stand (found by a scan, or looked up by key once known), so the
        // reservation holds across agents: whoever can fit a starving stage sees it first.
        let (also, keys_job, keys_idx, after_ms) = match ask.also {
            Also::Nothing => ("", Vec::new(), Vec::new(), 0),
            Also::Starving { after_ms } => (
                "AND COALESCE(s.not_before, j.created_at) <= gpuflow_now_ms() - $4",
                Vec::new(),
                Vec::new(),
                after_ms as i64,
            ),
            Also::Keys(keys) => (
                // `job_id = ANY` first, so the lookup walks the primary key, not the queue.
                "AND s.job_id = ANY($2::text[]) AND (s.job_id, s.idx) IN (SELECT * FROM unnest($2::text[], $3::bigint[]))",
                keys.iter().map(|(j, _)| j.clone()).collect::<Vec<_>>(),
                keys.iter().map(|(_, i)| *i as i64).collect::<Vec<_>>(),
                0,
            ),
        };
        let sql = if also.is_empty() {
            format!(
                "SELECT {COLUMNS} AND $2::text[] IS NOT NULL AND $3::bigint[] IS NOT NULL AND $4::bigint IS NOT NULL {ORDER} LIMIT $1 FOR UPDATE OF s SKIP LOCKED"
            )
        } else {
            format!(
                "WITH w AS (SELECT {COLUMNS} {ORDER} LIMIT $1 FOR UPDATE OF s SKIP LOCKED), \
                 x AS (SELECT {COLUMNS} {also} AND $2::text[] IS NOT NULL AND $3::bigint[] IS NOT NULL AND $4::bigint IS NOT NULL {ORDER} LIMIT $1 FOR UPDATE OF s SKIP LOCKED) \
                 SELECT * FROM w UNION ALL SELECT * FROM x"
            )
        };
        // Assembled from the constants above only; every value is bound.
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(ask.limit as i64)
            .bind(&keys_job)
            .bind(&keys_idx)
            .bind(after_ms)
            .fetch_all(&mut **tx)
            .await?;
        let mut candidates = Vec::with_capacity(rows.len());
        let mut attempts = Vec::with_capacity(rows.len());
        let mut seen = std::collections::HashSet::new();
        for r in &rows {
            let c = ClaimCandidate {
                job: r.try_get("job_id")?,
                stage: r.try_get::<i64, _>("idx")? as usize,
                pipeline: r.try_get("pipeline")?,
                config_hash: r.try_get("config_hash")?,
                priority: r.try_get::<i64, _>("priority")? as i32,
                arrival: r.try_get::<i64, _>("job_seq")?.max(0) as u64,
                waited_ms: r.try_get::<i64, _>("waited")?.max(0) as u64,
            };
            if seen.insert((c.job.clone(), c.stage)) {
                candidates.push(c);
                attempts.push(r.try_get::<i64, _>("attempts")? as u32 + 1);
            }
        }
        let mut picked = (ask.choose)(&candidates);
        picked.sort_unstable();
        picked.dedup();
        let chosen: Vec<(&ClaimCandidate, u32)> =
            picked.into_iter().filter_map(|i| Some((candidates.get(i)?, attempts[i]))).collect();
        if chosen.is_empty() {
            return Ok(Vec::new());
        }
        let jobs: Vec<&str> = chosen.iter().map(|(c, _)| c.job.as_str()).collect();
        let idxs: Vec<i64> = chosen.iter().map(|(c, _)| c.stage as i64).collect();
        let attempt_numbers: Vec<i64> = chosen.iter().map(|(_, a)| *a as i64).collect();
        // One statement: the leases with their fencing tokens, the attempts, the stages and jobs
        // marked running, and what the claimed stages need to render their commands (read from
        // the snapshot before these writes, which is what they need: the other stages' outputs).
        let rows = sqlx::query(
            "WITH c AS (SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS c(job_id, idx, attempt)), \
             l AS (INSERT INTO leases (token, job_id, stage_idx, attempt, agent_id, granted_at, expires_at) \
                   SELECT nextval('fencing_tokens'), job_id, idx, attempt, $4, gpuflow_now_ms(), gpuflow_now_ms() + $5 FROM c \
                   RETURNING token, job_id, stage_idx, attempt), \
             a AS (INSERT INTO attempts (job_id, stage_idx, attempt, state, grant_json, started_at, agent_id, token) \
                   SELECT job_id, stage_idx, attempt, 'running', '{}', gpuflow_now_ms(), $4, token FROM l), \
             s AS (UPDATE stages s SET state = 'running', attempts = c.attempt, not_before = NULL, started_at = gpuflow_now_ms(), \
                   finished_at = NULL, error = NULL, exit_code = NULL FROM c WHERE s.job_id = c.job_id AND s.idx = c.idx), \
             j AS (UPDATE jobs SET state = 'running', started_at = COALESCE(started_at, gpuflow_now_ms()) \
                   WHERE id IN (SELECT id FROM jobs WHERE id IN (SELECT job_id FROM c) ORDER BY id FOR UPDATE)) \
             SELECT l.token, l.job_id, l.stage_idx, jb.input, \
                    (SELECT json_agg(st.output ORDER BY st.idx) FROM stages st WHERE st.job_id = l.job_id)::text AS outputs \
             FROM l JOIN jobs jb ON jb.id = l.job_id",
        )
        .bind(&jobs)
        .bind(&idxs)
        .bind(&attempt_numbers)
        .bind(&self.agent)
        .bind(ask.ttl_ms as i64)
        .fetch_all(&mut **tx)
        .await?;
        // (job, stage): (token, input, outputs).
        let mut granted: BTreeMap<(String, i64), Granted> = BTreeMap::new();
        for r in &rows {
            let raw: Vec<Option<String>> = serde_json::from_value(r.json("outputs")?.unwrap_or(Value::Null))
                .map_err(|e| StoreError::Corrupt(format!("outputs: {e}")))?;
            let outputs = raw.into_iter().map(|o| o.map(|t| serde_json::from_str(&t).unwrap_or(Value::Null))).collect();
            granted.insert(
                (r.try_get("job_id")?, r.try_get("stage_idx")?),
                (r.try_get("token")?, r.json("input")?.unwrap_or(Value::Null), outputs),
            );
        }
        let mut claims = Vec::with_capacity(chosen.len());
        for (c, attempt) in chosen {
            let Some((token, input, outputs)) = granted.remove(&(c.job.clone(), c.stage as i64)) else {
                return Err(StoreError::Corrupt(format!("claim of {}/{} was not recorded", c.job, c.stage)));
            };
            claims.push(Claim {
                token,
                job: c.job.clone(),
                stage: c.stage,
                attempt,
                pipeline: c.pipeline.clone(),
                config_hash: c.config_hash.clone(),
                input,
                outputs,
                priority: c.priority,
            });
        }
        // In claim order, as chosen, for the agent's local queue.
        claims.sort_by_key(|c| c.token);
        Ok(claims)
    }

    /// Claims in a transaction of its own (`sync` with no endings).
    pub async fn claim_with(&self, ask: ClaimAsk<'_>) -> StoreResult<Vec<Claim>> {
        let mut tx = self.pool.begin().await?;
        let claims = self.claim_in(&mut tx, ask).await?;
        tx.commit().await?;
        Ok(claims)
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

    /// One attempt's final write, fenced by its token: refused when the lease was lost. Within
    /// one transaction: locks the job's rows, asks `decide` (the caller's rule, given the
    /// stages, the job's pending end and the lease's stage) for the transition, and writes it.
    pub async fn finish(
        &self,
        token: i64,
        job: &str,
        details: &AttemptDetails,
        decide: impl FnOnce(&[SharedStage], Option<JobState>, usize) -> Transition,
    ) -> StoreResult<Finish> {
        let ending = Ending { token, job: job.to_string(), details: details.clone() };
        let mut decide = Some(decide);
        let mut rule = |_: usize, stages: &[SharedStage], ending: Option<JobState>, stage: usize| match decide.take() {
            Some(f) => f(stages, ending, stage),
            None => Transition::default(),
        };
        let synced = self.sync(&[], std::slice::from_ref(&ending), &mut rule, None).await?;
        Ok(synced.finishes.into_iter().next().unwrap_or(Finish::Fenced))
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
        let mut views = lock_jobs(&mut tx, &[job]).await?;
        let Some(view) = views.get_mut(job) else { return Ok(SharedCancel::NotFound) };
        let Some(t) = decide(&view.stages, view.ending) else {
            return Ok(SharedCancel::AlreadyFinished(state));
        };
        let mut writes = Writes::default();
        writes.add(job, view, 0, 0, &t, &AttemptDetails::default());
        writes.write(&mut tx).await?;
        tx.commit().await?;
        Ok(SharedCancel::Accepted(if t.finished.is_some() { "cancelled" } else { "cancelling" }))
    }

    /// Records that this agent cannot run these claimable stages, and why.
    pub async fn mark_cannot_run(&self, stages: &[(String, usize, String)]) -> StoreResult<()> {
        let jobs: Vec<&str> = stages.iter().map(|(j, _, _)| j.as_str()).collect();
        let idxs: Vec<i64> = stages.iter().map(|(_, i, _)| *i as i64).collect();
        let reasons: Vec<&str> = stages.iter().map(|(_, _, r)| r.as_str()).collect();
        sqlx::query(
            "INSERT INTO cannot_run (job_id, stage_idx, agent_id, reason) \
             SELECT j, i, $4, r FROM unnest($1::text[], $2::bigint[], $3::text[]) AS u(j, i, r) \
             ON CONFLICT (job_id, stage_idx, agent_id) DO UPDATE SET reason = EXCLUDED.reason",
        )
        .bind(&jobs)
        .bind(&idxs)
        .bind(&reasons)
        .bind(&self.agent)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Fails the claimable stages that waited past `after_ms` and that every live agent (one
    /// that renewed within `ttl_ms`) has marked as one it cannot run; `rule` is
    /// `cluster::unrunnable`, given the agents' reasons. Returns the failed (job, stage, reason).
    pub async fn fail_unrunnable(
        &self,
        after_ms: u64,
        ttl_ms: u64,
        rule: fn(&[SharedStage], Option<JobState>, usize, &str) -> Option<Transition>,
    ) -> StoreResult<Vec<(String, usize, String)>> {
        // Marks of stages that are no longer claimable are spent.
        sqlx::query(
            "DELETE FROM cannot_run c WHERE NOT EXISTS (SELECT 1 FROM stages s WHERE s.job_id = c.job_id \
             AND s.idx = c.stage_idx AND s.state IN ('queued', 'backoff'))",
        )
        .execute(&self.pool)
        .await?;
        let found: Vec<(String, i64, String)> = sqlx::query_as(
            "SELECT c.job_id, c.stage_idx, string_agg(a.name || ': ' || c.reason, '; ' ORDER BY a.name) \
             FROM cannot_run c JOIN agents a ON a.id = c.agent_id \
             JOIN stages s ON s.job_id = c.job_id AND s.idx = c.stage_idx JOIN jobs j ON j.id = s.job_id \
             WHERE a.state = 'running' AND a.heartbeat_at >= gpuflow_now_ms() - $2 \
             AND s.state IN ('queued', 'backoff') AND j.ending IS NULL \
             AND gpuflow_now_ms() - COALESCE(s.not_before, j.created_at) >= $1 \
             AND NOT EXISTS (SELECT 1 FROM agents b WHERE b.state = 'running' AND b.heartbeat_at >= gpuflow_now_ms() - $2 \
                 AND NOT EXISTS (SELECT 1 FROM cannot_run d WHERE d.job_id = c.job_id AND d.stage_idx = c.stage_idx AND d.agent_id = b.id)) \
             GROUP BY c.job_id, c.stage_idx ORDER BY c.job_id, c.stage_idx LIMIT 100",
        )
        .bind(after_ms as i64)
        .bind(ttl_ms as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut failed = Vec::new();
        for (job, stage, reasons) in found {
            let stage = stage as usize;
            let mut tx = self.pool.begin().await?;
            let mut views = lock_jobs(&mut tx, &[job.as_str()]).await?;
            // Re-checked under the locks: an agent may have claimed it meanwhile.
            let Some(view) = views.get_mut(&job) else { continue };
            let Some(t) = rule(&view.stages, view.ending, stage, &reasons) else { continue };
            let mut writes = Writes::default();
            writes.add(&job, view, stage, 0, &t, &AttemptDetails::default());
            writes.write(&mut tx).await?;
            sqlx::query("DELETE FROM cannot_run WHERE job_id = $1").bind(&job).execute(&mut *tx).await?;
            tx.commit().await?;
            failed.push((job, stage, reasons));
        }
        Ok(failed)
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

/// A job's rows as the transitions see them, locked for the transaction.
struct JobView {
    stages: Vec<SharedStage>,
    /// Each stage's output, for the job's output when it succeeds.
    outputs: Vec<Option<Value>>,
    ending: Option<JobState>,
}

/// Locks the jobs' stage rows (by job, then index) and then the job rows (by id): the lock
/// order every transaction here keeps, so none deadlock.
async fn lock_jobs(tx: &mut Transaction<'static, Postgres>, jobs: &[&str]) -> StoreResult<BTreeMap<String, JobView>> {
    let mut ids: Vec<&str> = jobs.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut views = lock_stages(tx, &ids).await?;
    let endings: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT id, ending FROM jobs WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&ids)
            .fetch_all(&mut **tx)
            .await?;
    for (id, ending) in endings {
        if let Some(view) = views.get_mut(&id) {
            view.ending = ending.as_deref().and_then(JobState::parse);
        }
    }
    Ok(views)
}

/// Locks the stage rows of `ids` (sorted), by job then index, and reads them.
async fn lock_stages(tx: &mut Transaction<'static, Postgres>, ids: &[&str]) -> StoreResult<BTreeMap<String, JobView>> {
    let rows = sqlx::query(
        "SELECT job_id, idx, name, deps, state, failures, interruptions, output FROM stages WHERE job_id = ANY($1) ORDER BY job_id, idx FOR UPDATE",
    )
    .bind(ids)
    .fetch_all(&mut **tx)
    .await?;
    let mut views: BTreeMap<String, JobView> = BTreeMap::new();
    for r in &rows {
        let deps: Vec<usize> = serde_json::from_value(r.json("deps")?.unwrap_or(Value::Null))
            .map_err(|e| StoreError::Corrupt(format!("deps: {e}")))?;
        let view = views.entry(r.required_text("job_id")?).or_insert_with(|| JobView {
            stages: Vec::new(),
            outputs: Vec::new(),
            ending: None,
        });
        view.stages.push(SharedStage {
            name: r.required_text("name")?,
            state: shared_state(&r.required_text("state")?),
            deps,
            failures: r.required_int("failures")? as u32,
            interruptions: r.required_int("interruptions")? as u32,
        });
        view.outputs.push(r.json("output")?);
    }
    Ok(views)
}

/// `lock_jobs` for a round of ends, with the fence in the job locks' round trip: the leases of
/// `tokens` this agent still holds are deleted and returned (token: job, stage, attempt); the
/// others were lost. The stage locks come first, so no lease sweep can race the delete.
async fn lock_jobs_and_fence(
    tx: &mut Transaction<'static, Postgres>,
    jobs: &[&str],
    tokens: &[i64],
    agent: &str,
) -> StoreResult<(BTreeMap<String, JobView>, BTreeMap<i64, (String, i64, i64)>)> {
    let mut ids: Vec<&str> = jobs.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut views = lock_stages(tx, &ids).await?;
    let rows = sqlx::query(
        "WITH j AS (SELECT id, ending FROM jobs WHERE id = ANY($1) ORDER BY id FOR UPDATE), \
         d AS (DELETE FROM leases WHERE token = ANY($2) AND agent_id = $3 RETURNING token, job_id, stage_idx, attempt) \
         SELECT id AS job_id, ending, NULL::bigint AS token, NULL::bigint AS stage_idx, NULL::bigint AS attempt FROM j \
         UNION ALL SELECT job_id, NULL, token, stage_idx, attempt FROM d",
    )
    .bind(&ids)
    .bind(tokens)
    .bind(agent)
    .fetch_all(&mut **tx)
    .await?;
    let mut held = BTreeMap::new();
    for r in &rows {
        let job: String = r.try_get("job_id")?;
        match r.try_get::<Option<i64>, _>("token")? {
            Some(token) => {
                held.insert(token, (job, r.try_get("stage_idx")?, r.try_get("attempt")?));
            }
            None => {
                let ending: Option<String> = r.try_get("ending")?;
                if let Some(view) = views.get_mut(&job) {
                    view.ending = ending.as_deref().and_then(JobState::parse);
                }
            }
        }
    }
    Ok((views, held))
}

/// One stage row's new values (the last change of a round wins; the ended attempt's details
/// stay with it).
struct StageRow {
    state: &'static str,
    /// When a waiting stage becomes claimable, from now (how long it waited, for claims).
    delay_ms: Option<i64>,
    finished: bool,
    ended: Option<EndedRow>,
}

struct EndedRow {
    error: Option<String>,
    output: Option<String>,
    exit_code: Option<i64>,
    failures: i64,
    interruptions: i64,
}

struct AttemptRow {
    job: String,
    stage: i64,
    attempt: i64,
    state: &'static str,
    exit_code: Option<i64>,
    signal: Option<i64>,
    error: Option<String>,
    batch_size: Option<i64>,
}

#[derive(Default)]
struct JobRow {
    ending: Option<(JobState, String)>,
    finished: Option<(JobState, Option<String>)>,
}

/// A round's writes, merged per row and written in one statement.
#[derive(Default)]
struct Writes {
    attempts: Vec<AttemptRow>,
    stages: BTreeMap<(String, usize), StageRow>,
    jobs: BTreeMap<String, JobRow>,
    /// Something became claimable, or a job started to end (its other stages' agents must
    /// stop them): the agents are woken.
    wake: bool,
}

impl Writes {
    /// Adds a transition of `job` (an attempt of `stage` ended, or none when `t.attempt` is
    /// empty) and carries it into `view`, so a later transition of the same job in this round
    /// is decided against the rows as this one leaves them.
    fn add(&mut self, job: &str, view: &mut JobView, stage: usize, attempt: u32, t: &Transition, d: &AttemptDetails) {
        let error = t.attempt.as_ref().and_then(|(_, e)| e.clone());
        if let Some((result, _)) = &t.attempt {
            self.attempts.push(AttemptRow {
                job: job.to_string(),
                stage: stage as i64,
                attempt: attempt as i64,
                state: result.as_str(),
                exit_code: d.exit_code.map(i64::from),
                signal: d.signal.map(i64::from),
                error: error.clone(),
                batch_size: d.batch_size.map(i64::from),
            });
            if let Some(s) = view.stages.get_mut(stage) {
                s.failures = t.failures;
                s.interruptions = t.interruptions;
            }
        }
        for (idx, change) in &t.changes {
            let (state, delay_ms, status) = match change {
                StageChange::Succeeded => ("succeeded", None, SharedStageState::Succeeded),
                StageChange::Retry { delay_ms: 0 } | StageChange::Ready => {
                    ("queued", Some(0), SharedStageState::Waiting)
                }
                StageChange::Retry { delay_ms } => ("backoff", Some(*delay_ms as i64), SharedStageState::Waiting),
                StageChange::Failed => ("failed", None, SharedStageState::Failed),
                StageChange::Cancelled => ("cancelled", None, SharedStageState::Cancelled),
                // The agent holding it sees the job's ending and stops it.
                StageChange::Stop => continue,
            };
            if status == SharedStageState::Waiting {
                self.wake = true;
            }
            if let Some(s) = view.stages.get_mut(*idx) {
                s.state = status;
            }
            let ended_here = t.attempt.is_some() && *idx == stage;
            let row = self.stages.entry((job.to_string(), *idx)).or_insert(StageRow {
                state,
                delay_ms,
                finished: false,
                ended: None,
            });
            row.state = state;
            row.delay_ms = delay_ms;
            row.finished = status.is_final();
            if ended_here {
                let output = (*change == StageChange::Succeeded).then(|| d.output.clone()).flatten();
                if let Some(slot) = view.outputs.get_mut(*idx) {
                    slot.clone_from(&output);
                }
                row.ended = Some(EndedRow {
                    error: error.clone(),
                    output: output.as_ref().map(Value::to_string),
                    exit_code: d.exit_code.map(i64::from),
                    failures: t.failures as i64,
                    interruptions: t.interruptions as i64,
                });
            }
        }
        let row = self.jobs.entry(job.to_string()).or_default();
        if let Some((state, reason)) = &t.ending {
            view.ending = Some(*state);
            row.ending = Some((*state, reason.clone()));
            self.wake = true;
        }
        if let Some(state) = t.finished {
            let output = (state == JobState::Succeeded).then(|| job_output(view)).flatten();
            row.finished = Some((state, output.map(|o| o.to_string())));
        }
    }

    /// Writes the round: every attempt, stage and job row in one statement, and wakes the
    /// agents when something became claimable or a job is ending.
    async fn write(self, tx: &mut Transaction<'static, Postgres>) -> StoreResult<()> {
        if self.attempts.is_empty() && self.stages.is_empty() && self.jobs.is_empty() {
            return Ok(());
        }
        let a = &self.attempts;
        let a_job: Vec<&str> = a.iter().map(|r| r.job.as_str()).collect();
        let a_stage: Vec<i64> = a.iter().map(|r| r.stage).collect();
        let a_attempt: Vec<i64> = a.iter().map(|r| r.attempt).collect();
        let a_state: Vec<&str> = a.iter().map(|r| r.state).collect();
        let a_exit: Vec<Option<i64>> = a.iter().map(|r| r.exit_code).collect();
        let a_signal: Vec<Option<i64>> = a.iter().map(|r| r.signal).collect();
        let a_error: Vec<Option<&str>> = a.iter().map(|r| r.error.as_deref()).collect();
        let a_batch: Vec<Option<i64>> = a.iter().map(|r| r.batch_size).collect();
        let s = &self.stages;
        let s_job: Vec<&str> = s.keys().map(|(j, _)| j.as_str()).collect();
        let s_idx: Vec<i64> = s.keys().map(|(_, i)| *i as i64).collect();
        let s_state: Vec<&str> = s.values().map(|r| r.state).collect();
        let s_delay: Vec<Option<i64>> = s.values().map(|r| r.delay_ms).collect();
        let s_finished: Vec<bool> = s.values().map(|r| r.finished).collect();
        let s_ended: Vec<bool> = s.values().map(|r| r.ended.is_some()).collect();
        let s_error: Vec<Option<&str>> =
            s.values().map(|r| r.ended.as_ref().and_then(|e| e.error.as_deref())).collect();
        let s_output: Vec<Option<&str>> =
            s.values().map(|r| r.ended.as_ref().and_then(|e| e.output.as_deref())).collect();
        let s_exit: Vec<Option<i64>> = s.values().map(|r| r.ended.as_ref().and_then(|e| e.exit_code)).collect();
        let s_failures: Vec<i64> = s.values().map(|r| r.ended.as_ref().map_or(0, |e| e.failures)).collect();
        let s_interruptions: Vec<i64> = s.values().map(|r| r.ended.as_ref().map_or(0, |e| e.interruptions)).collect();
        let j = &self.jobs;
        let j_id: Vec<&str> = j.keys().map(String::as_str).collect();
        let j_ending: Vec<Option<&str>> = j.values().map(|r| r.ending.as_ref().map(|(s, _)| s.as_str())).collect();
        let j_error: Vec<Option<&str>> = j.values().map(|r| r.ending.as_ref().map(|(_, e)| e.as_str())).collect();
        let j_state: Vec<Option<&str>> = j.values().map(|r| r.finished.as_ref().map(|(s, _)| s.as_str())).collect();
        let j_output: Vec<Option<&str>> =
            j.values().map(|r| r.finished.as_ref().and_then(|(_, o)| o.as_deref())).collect();
        sqlx::query(
            "WITH a AS (UPDATE attempts a SET state = u.state, finished_at = gpuflow_now_ms(), exit_code = u.exit_code, signal = u.signal, error = u.error, batch_size = u.batch_size \
                 FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::bigint[], $6::bigint[], $7::text[], $8::bigint[]) \
                 AS u(job_id, idx, attempt, state, exit_code, signal, error, batch_size) \
                 WHERE a.job_id = u.job_id AND a.stage_idx = u.idx AND a.attempt = u.attempt), \
             s AS (UPDATE stages s SET state = u.state, not_before = gpuflow_now_ms() + u.delay, \
                 finished_at = CASE WHEN u.fin THEN gpuflow_now_ms() END, \
                 error = CASE WHEN u.ended THEN u.error ELSE s.error END, \
                 output = CASE WHEN u.ended THEN u.output ELSE s.output END, \
                 exit_code = CASE WHEN u.ended THEN u.exit_code ELSE s.exit_code END, \
                 failures = CASE WHEN u.ended THEN u.failures ELSE s.failures END, \
                 interruptions = CASE WHEN u.ended THEN u.interruptions ELSE s.interruptions END \
                 FROM unnest($9::text[], $10::bigint[], $11::text[], $12::bigint[], $13::bool[], $14::bool[], $15::text[], $16::text[], $17::bigint[], $18::bigint[], $19::bigint[]) \
                 AS u(job_id, idx, state, delay, fin, ended, error, output, exit_code, failures, interruptions) \
                 WHERE s.job_id = u.job_id AND s.idx = u.idx), \
             j AS (UPDATE jobs j SET ending = COALESCE(u.ending, j.ending), \
                 error = CASE WHEN u.ending IS NOT NULL THEN u.error ELSE j.error END, \
                 state = COALESCE(u.state, j.state), \
                 output = CASE WHEN u.state IS NOT NULL THEN u.output ELSE j.output END, \
                 finished_at = CASE WHEN u.state IS NOT NULL THEN gpuflow_now_ms() ELSE j.finished_at END \
                 FROM unnest($20::text[], $21::text[], $22::text[], $23::text[], $24::text[]) AS u(id, ending, error, state, output) \
                 WHERE j.id = u.id AND (u.ending IS NOT NULL OR u.state IS NOT NULL)) \
             SELECT pg_notify($25, '') WHERE $26",
        )
        .bind(&a_job)
        .bind(&a_stage)
        .bind(&a_attempt)
        .bind(&a_state)
        .bind(&a_exit)
        .bind(&a_signal)
        .bind(&a_error)
        .bind(&a_batch)
        .bind(&s_job)
        .bind(&s_idx)
        .bind(&s_state)
        .bind(&s_delay)
        .bind(&s_finished)
        .bind(&s_ended)
        .bind(&s_error)
        .bind(&s_output)
        .bind(&s_exit)
        .bind(&s_failures)
        .bind(&s_interruptions)
        .bind(&j_id)
        .bind(&j_ending)
        .bind(&j_error)
        .bind(&j_state)
        .bind(&j_output)
        .bind(QUEUE_CHANNEL)
        .bind(self.wake)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

/// The job's output: its one final stage's output, or an object of all final stages' outputs.
fn job_output(view: &JobView) -> Option<Value> {
    let sinks = cluster::sinks(&view.stages);
    if let [only] = sinks.as_slice() {
        return view.outputs.get(*only).cloned().flatten();
    }
    let map: serde_json::Map<String, Value> =
        sinks.iter().map(|i| (view.stages[*i].name.clone(), view.outputs[*i].clone().unwrap_or(Value::Null))).collect();
    Some(Value::Object(map))
}
