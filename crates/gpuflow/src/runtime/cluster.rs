//! Agent mode: several engines share one PostgreSQL queue. Each agent claims the stages that
//! fit its own free resources and runs each claim as a one-stage job of its own scheduler
//! (the claimed stage queued, every other stage marked done), so supervision, timeouts, worker
//! pools and diagnosis are the single-engine code. What differs is where decisions land: the
//! stage's outcome goes to the shared queue (`PgQueue`), fenced by the claim's token, and
//! retries go back to the queue, where any agent may take them. The decisions are the core's:
//! `cluster::choose_claims` picks what to claim, and the job transition rules
//! (`cluster::attempt_ended`, `lease_lost`, `cancel`, shared with the single engine) are handed
//! to the queue, which applies them to the job's locked rows.
//!
//! Round trips are what bound an agent: a turn's attempt ends are written in one transaction
//! (`PgQueue::sync`), and the same transaction claims what the freed resources can take.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use gpuflow_core::cluster::{self, ClaimCandidate as Candidate, ClaimProblem, End};
use gpuflow_core::{
    Action, Event, Inventory, JobId, RequestError, ResourceRequest, RestoredStage, RestoredStatus, RetryPolicy,
};
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::ledger::Ledger;
use super::*;
use crate::config::{ClusterSettings, Config};
use crate::store::{
    Admitted, AgentRecord, Also, AttemptDetails, Claim, ClaimAsk, ClaimCandidate, Ending, Finish, PgQueue, PgStore,
    SharedCancel,
};

/// Claims look at this many candidates at a time, in claim order.
const CLAIM_BATCH: u32 = 64;

/// How many starving stages an agent looks up by key between ticks.
const STARVING_REMEMBERED: usize = 16;

pub(super) struct Agent {
    store: PgQueue,
    settings: ClusterSettings,
    name: String,
    /// Claims this agent runs, by the local job id each runs under.
    claims: HashMap<JobId, ClaimedStage>,
    /// Claims already told to stop (lease lost, or their job is ending).
    stopping: HashSet<JobId>,
    /// Final writes that failed on a lost connection, retried every tick.
    unsent: Vec<(JobId, End, AttemptDetails)>,
    /// Claims adopted whose local start has not been decided yet, with what they need: the
    /// local inventory does not count them, the next claim must.
    unstarted: HashMap<JobId, ResourceRequest>,
    /// Stages found waiting past `reserve_after` that this agent did not claim: every claim
    /// looks them up by key (a tick scans for them), so they go before smaller ones wherever
    /// they stand in claim order.
    starving: Vec<(String, usize)>,
    /// Claimable stages this agent cannot run, already recorded as such.
    cannot_run: HashSet<(String, usize)>,
    /// Pipeline files jobs were accepted under, parsed, by content hash.
    configs: HashMap<String, Result<Arc<Config>, String>>,
    wake: Arc<Notify>,
    last_renewal: tokio::time::Instant,
}

struct ClaimedStage {
    token: i64,
    job: String,
    retry: RetryPolicy,
    /// Whether its outcome has been written (or refused); the claim is forgotten then.
    settled: bool,
}

impl Agent {
    pub(super) fn new(store: PgStore, settings: ClusterSettings, name: String) -> Agent {
        Agent {
            store: store.queue(),
            settings,
            name,
            claims: HashMap::new(),
            stopping: HashSet::new(),
            unsent: Vec::new(),
            unstarted: HashMap::new(),
            starving: Vec::new(),
            cannot_run: HashSet::new(),
            configs: HashMap::new(),
            wake: Arc::new(Notify::new()),
            last_renewal: tokio::time::Instant::now(),
        }
    }

    pub(super) fn wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// How often leases are renewed and the queue polled.
    pub(super) fn tick_every(&self) -> Duration {
        Duration::from_millis((self.settings.lease_ttl_ms / 3).min(self.settings.poll_interval_ms).max(50))
    }
}

/// What a claim chooses with: the agent's free inventory and the requests of the pipelines it
/// has loaded. It collects the pipelines it has not loaded yet and the starving stages it saw.
struct Picker {
    inventory: Inventory,
    reserve_after_ms: u64,
    requests: HashMap<String, Result<Arc<Config>, String>>,
    missing: HashSet<String>,
    starving: Vec<(String, usize)>,
    /// Offered stages this agent can never run, and why.
    cannot_run: Vec<(String, usize, String)>,
}

impl Picker {
    fn ask<'a>(&'a mut self, settings: &ClusterSettings, starving: &[(String, usize)], scan: bool) -> ClaimAsk<'a> {
        let also = if scan {
            Also::Starving { after_ms: self.reserve_after_ms }
        } else if starving.is_empty() {
            Also::Nothing
        } else {
            Also::Keys(starving.to_vec())
        };
        ClaimAsk {
            limit: CLAIM_BATCH,
            ttl_ms: settings.lease_ttl_ms,
            also,
            choose: Box::new(move |offered| self.choose(offered)),
        }
    }

    /// Among what is offered, what this agent claims: the core's choice over the candidates
    /// whose pipeline it has loaded.
    fn choose(&mut self, offered: &[ClaimCandidate]) -> Vec<usize> {
        let mut candidates = Vec::new();
        self.cannot_run.clear();
        for (i, c) in offered.iter().enumerate() {
            let request = match self.requests.get(&c.config_hash) {
                None => {
                    self.missing.insert(c.config_hash.clone());
                    continue;
                }
                Some(Err(e)) => Err(format!("its pipeline file does not load here: {e}")),
                Some(Ok(config)) => match config.pipeline(&c.pipeline) {
                    Ok(def) => match def.core.stages.get(c.stage) {
                        Some(s) => Ok(s.needs.clone()),
                        None => Err(format!("pipeline `{}` has no stage {}", c.pipeline, c.stage)),
                    },
                    Err(e) => Err(e),
                },
            };
            let request = request.and_then(|r| match r.check_fits(self.inventory.capacity()) {
                Ok(()) => Ok(r),
                Err(RequestError::UnknownCounter { name }) if name.starts_with("pool:") => {
                    Err(format!("it needs worker pool `{}`, which this agent does not have", &name["pool:".len()..]))
                }
                Err(e) => Err(format!("its stage {e} here")),
            });
            let request = match request {
                Ok(r) => r,
                Err(reason) => {
                    self.cannot_run.push((c.job.clone(), c.stage, reason));
                    continue;
                }
            };
            candidates.push(Candidate {
                key: i,
                priority: c.priority,
                arrival: c.arrival,
                stage: c.stage,
                request,
                waited_ms: c.waited_ms,
            });
        }
        let problem =
            ClaimProblem { candidates, inventory: self.inventory.clone(), reserve_after_ms: self.reserve_after_ms };
        let chosen = cluster::choose_claims(&problem);
        // The oldest few are enough: claims take them in this order, and a tick finds the rest.
        self.starving = problem
            .candidates
            .iter()
            .filter(|c| c.waited_ms >= self.reserve_after_ms && !chosen.contains(&c.key))
            .map(|c| (offered[c.key].job.clone(), offered[c.key].stage))
            .take(STARVING_REMEMBERED)
            .collect();
        chosen
    }
}

/// The local job id a claim runs under: its fencing token, unique forever.
fn local_id(token: i64) -> JobId {
    JobId(token as u128)
}

impl<S: Store> Runtime<S> {
    pub fn with_cluster(mut self, store: PgStore, settings: ClusterSettings, name: String) -> Self {
        self.ledger = Ledger::Shared(Box::new(Agent::new(store, settings, name)));
        self
    }

    /// Registers the agent, re-queues what an earlier run under its name held, and starts
    /// listening for work.
    pub(super) async fn join_cluster(&mut self, api: String) -> Result<(), RuntimeError> {
        let resources = self.agent_resources();
        let Some(agent) = self.ledger.agent_mut() else { return Ok(()) };
        let host = crate::serve::hostname();
        let requeued = agent.store.register_agent(&agent.name, &host, &api, &resources, cluster::lease_lost).await?;
        for l in &requeued {
            tracing::warn!(job = %l.job, stage = l.stage, attempt = l.attempt, "re-queued a stage this agent held before it restarted");
        }
        agent.last_renewal = tokio::time::Instant::now();
        tracing::info!(agent = %agent.store.agent(), name = %agent.name, "joined the shared queue");
        let store = agent.store.clone();
        let wake = agent.wake.clone();
        tokio::spawn(async move {
            loop {
                match store.listener().await {
                    Ok(mut listener) => loop {
                        match listener.recv().await {
                            Ok(_) => wake.notify_one(),
                            Err(e) => {
                                tracing::warn!("queue notifications interrupted ({e}); reconnecting");
                                // Anything sent meanwhile is lost: look now.
                                wake.notify_one();
                                break;
                            }
                        }
                    },
                    Err(e) => tracing::warn!("cannot listen for queue notifications ({e}); polling meanwhile"),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        self.claim_work(true).await;
        Ok(())
    }

    /// What this agent has and uses, for `/v1/agents`.
    fn agent_resources(&self) -> Value {
        let inventory = self.state.inventory();
        let capacity = inventory.capacity();
        let usage = inventory.usage();
        json!({
            "gpus": self.config.gpus.iter().map(|g| json!({"name": g.name, "memory": g.memory, "source": format!("{:?}", g.source).to_lowercase()})).collect::<Vec<_>>(),
            "cpu": capacity.cpu,
            "cpu_used": usage.cpu,
            "gpus_used": usage.gpu_exclusive.iter().filter(|b| **b).count(),
            "gpu_memory_used": usage.gpu_memory_used,
            "counters": capacity.counters,
            "counters_used": usage.counters,
            "running": self.ledger.agent().map(|a| a.claims.len()).unwrap_or(0),
        })
    }

    /// Renews leases, re-queues expired ones (anyone's), stops what must stop, resends final
    /// writes that failed, and looks for work.
    pub(super) async fn cluster_tick(&mut self) -> Result<(), RuntimeError> {
        let resources = self.agent_resources();
        let Some(agent) = self.ledger.agent_mut() else { return Ok(()) };
        let ttl = agent.settings.lease_ttl_ms;
        let mut stop: Vec<(JobId, String)> = Vec::new();
        let silent_ms = agent.last_renewal.elapsed().as_millis() as u64;
        for local in self.signal_stale_after_silence() {
            stop.push((local, format!("lease lost: this agent was not heard from for {silent_ms} ms, past lease_ttl ({ttl} ms); the stage may already run elsewhere, so this run was stopped")));
        }
        let Some(agent) = self.ledger.agent_mut() else { return Ok(()) };
        for (local, _) in &stop {
            agent.stopping.insert(*local);
        }
        match agent.store.heartbeat(ttl, &resources).await {
            Ok(held) => {
                agent.last_renewal = tokio::time::Instant::now();
                let held: HashSet<i64> = held.into_iter().collect();
                for (local, c) in &agent.claims {
                    if !c.settled && !held.contains(&c.token) && !agent.stopping.contains(local) {
                        stop.push((
                            *local,
                            "lease lost: it expired and the stage was re-queued to another agent; this run was stopped"
                                .into(),
                        ));
                    }
                }
            }
            Err(e) => {
                tracing::warn!("cannot renew leases: {e}");
                // Past the TTL another agent may already run these stages: stop them here so
                // no stage runs twice for long.
                if agent.last_renewal.elapsed() > Duration::from_millis(ttl) {
                    for (local, c) in &agent.claims {
                        if !c.settled && !agent.stopping.contains(local) {
                            stop.push((*local, format!("lease not renewed for {ttl} ms (database unreachable); stopped because another agent may take it over")));
                        }
                    }
                }
            }
        }
        match agent.store.fail_unrunnable(agent.settings.unrunnable_after_ms, ttl, cluster::unrunnable).await {
            Ok(failed) => {
                for (job, stage, reason) in failed {
                    tracing::warn!(%job, stage, "failed a stage no live agent can run: {reason}");
                    agent.cannot_run.remove(&(job, stage));
                }
            }
            Err(e) => tracing::warn!("cannot check for stages no agent can run: {e}"),
        }
        match agent.store.expire_leases(cluster::lease_lost).await {
            Ok(lost) => {
                for l in lost {
                    self.metrics.leases_expired.inc();
                    tracing::warn!(agent = %l.agent, job = %l.job, stage = l.stage, attempt = l.attempt, late_ms = l.late_ms, "lease expired; stage re-queued");
                }
            }
            Err(e) => tracing::warn!("cannot check for expired leases: {e}"),
        }
        for (local, _) in &stop {
            agent.stopping.insert(*local);
        }
        for (local, error) in stop {
            self.stop_claim(local, error, true).await?;
        }
        if let Err(e) = self.stop_ending_claims().await {
            tracing::warn!("cannot check for cancelled jobs: {e}");
        }
        self.resend_unsent().await;
        self.claim_work(true).await;
        Ok(())
    }

    /// Frozen (SIGSTOP, a paused VM) or cut off past the TTL: every lease this agent holds has
    /// expired whatever the database answers, and another agent may already re-run its stages.
    /// Signals their processes now, before any round trip (one may hang on a connection the
    /// server dropped meanwhile); the next tick records the stops. Returns the claims it
    /// signalled, those not already stopping.
    fn signal_stale_after_silence(&mut self) -> Vec<JobId> {
        let Some(agent) = self.ledger.agent_mut() else { return Vec::new() };
        let (silent_ms, ttl_ms) = (agent.last_renewal.elapsed().as_millis() as u64, agent.settings.lease_ttl_ms);
        if silent_ms <= ttl_ms {
            return Vec::new();
        }
        let stale: Vec<JobId> =
            agent.claims.iter().filter(|(l, c)| !c.settled && !agent.stopping.contains(l)).map(|(l, _)| *l).collect();
        if !stale.is_empty() {
            tracing::warn!(
                silent_ms,
                ttl_ms,
                stages = stale.len(),
                "lease lost: this agent was not heard from past lease_ttl (frozen or cut off), so its stages may already run elsewhere; their processes are stopped now"
            );
        }
        for local in &stale {
            self.signal_stop(*local);
        }
        stale
    }

    /// Asks every process running a stage of `local` to stop now (TERM, grace, KILL); the
    /// attempt ends through its exit as usual.
    fn signal_stop(&mut self, local: JobId) {
        for (key, p) in &self.processes {
            if key.0 == local {
                let _ = p.stop.send(StopRequest);
            }
        }
        let tasks: Vec<AttemptKey> = self.worker_tasks.keys().filter(|k| k.0 == local).copied().collect();
        for key in tasks {
            self.stop_worker_task(key);
        }
    }

    /// Stops this agent's claims whose job is ending (cancelled, or failed on another stage).
    async fn stop_ending_claims(&mut self) -> Result<(), RuntimeError> {
        let Some(agent) = self.ledger.agent_mut() else { return Ok(()) };
        let tokens = agent.store.leases_to_stop().await?;
        let ending: Vec<JobId> = tokens
            .into_iter()
            .map(local_id)
            .filter(|local| agent.claims.contains_key(local) && agent.stopping.insert(*local))
            .collect();
        for local in ending {
            self.stop_claim(local, "its job is ending (cancelled, or failed on another stage)".into(), false).await?;
        }
        Ok(())
    }

    /// Stops a claim's local run. One that has not started yet is dropped here and its
    /// stage handed back; a running one ends through its process, like any attempt.
    async fn stop_claim(&mut self, local: JobId, error: String, lease_lost: bool) -> Result<(), RuntimeError> {
        let running = self.state.job(local).and_then(|j| {
            j.stages.iter().enumerate().find_map(|(i, s)| match &s.status {
                gpuflow_core::StageStatus::Running(r) => Some((i, r.attempt)),
                _ => None,
            })
        });
        let job = self.jobs.get(&local).map(|j| j.id()).unwrap_or_default();
        tracing::warn!(%job, "{error}");
        match running {
            Some((stage, attempt)) if lease_lost => {
                self.step(Event::StopAttempt { job: local, stage, attempt, error });
                Ok(())
            }
            Some(_) => {
                self.step(Event::CancelRequested { job: local });
                Ok(())
            }
            None => {
                self.step(Event::CancelRequested { job: local });
                let end = if lease_lost { cluster::LEASE_LOST } else { End::Cancelled { error } };
                self.send_ends(Vec::new(), vec![(local, end, AttemptDetails::default())], false).await;
                Ok(())
            }
        }
    }

    /// Claims what fits the free local resources, and starts it. A tick also scans for stages
    /// that waited past `reserve_after` anywhere in the queue.
    pub(super) async fn claim_work(&mut self, scan_starving: bool) {
        for _ in 0..8 {
            let Some(mut picker) = self.claim_picker() else { return };
            let Some(agent) = self.ledger.agent_mut() else { return };
            let claimed = agent.store.claim_with(picker.ask(&agent.settings, &agent.starving, scan_starving)).await;
            let claimed = match claimed {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("cannot claim work: {e}");
                    return;
                }
            };
            let full = claimed.len() as u32 == CLAIM_BATCH;
            let again = self.after_claim(picker, claimed).await;
            if !full && !again {
                return;
            }
        }
    }

    /// What a claim needs to choose: the free local inventory (less what adopted claims will
    /// take) and the pipelines this agent has loaded.
    fn claim_picker(&self) -> Option<Picker> {
        let agent = self.ledger.agent()?;
        let mut inventory = self.state.inventory().clone();
        let none = inventory.new_reservation();
        for request in agent.unstarted.values() {
            // A claim adopted but not started yet: its share is spoken for.
            let _ = inventory.try_grant(request, &none);
        }
        Some(Picker {
            inventory,
            reserve_after_ms: self.config.scheduler.reserve_after_ms,
            requests: agent.configs.iter().map(|(hash, parsed)| (hash.clone(), parsed.clone())).collect(),
            missing: HashSet::new(),
            starving: Vec::new(),
            cannot_run: Vec::new(),
        })
    }

    /// Adopts what was claimed, remembers the starving stages left, and loads the pipelines
    /// of candidates it has not seen. True when it should claim again (new pipelines).
    async fn after_claim(&mut self, picker: Picker, claimed: Vec<Claim>) -> bool {
        if let Some(agent) = self.ledger.agent_mut() {
            agent.starving = picker.starving;
            let new: Vec<(String, usize, String)> = picker
                .cannot_run
                .into_iter()
                .filter(|(job, stage, _)| !agent.cannot_run.contains(&(job.clone(), *stage)))
                .collect();
            if !new.is_empty() {
                match agent.store.mark_cannot_run(&new).await {
                    Ok(()) => {
                        for (job, stage, reason) in new {
                            tracing::warn!(%job, stage, "this agent cannot run a queued stage: {reason}");
                            agent.cannot_run.insert((job, stage));
                        }
                    }
                    Err(e) => tracing::warn!("cannot record the stages this agent cannot run: {e}"),
                }
            }
        }
        for claim in claimed {
            if let Err(e) = self.adopt(claim).await {
                tracing::error!("cannot start a claimed stage: {e}");
            }
        }
        for hash in &picker.missing {
            let parsed = match self.snapshot_config(hash).await {
                Ok(r) => r.map(Arc::new),
                Err(e) => {
                    tracing::warn!("cannot read pipeline snapshot {hash}: {e}");
                    continue;
                }
            };
            if let Err(e) = &parsed {
                tracing::error!("jobs accepted under pipeline snapshot {hash} cannot run on this agent: {e}");
            }
            if let Some(agent) = self.ledger.agent_mut() {
                agent.configs.insert(hash.clone(), parsed);
            }
        }
        !picker.missing.is_empty()
    }

    /// Runs a claim as a local one-stage job: the claimed stage queued, the others done.
    async fn adopt(&mut self, claim: Claim) -> Result<(), RuntimeError> {
        let Some(agent) = self.ledger.agent_mut() else { return Ok(()) };
        let def = match agent.configs.get(&claim.config_hash) {
            Some(Ok(config)) => config.pipeline(&claim.pipeline),
            _ => Err("pipeline snapshot not loaded".to_string()),
        };
        let def = match def {
            Ok(def) => def,
            Err(e) => {
                // Cannot happen for a stage the fit check accepted; give it back as failed.
                let end =
                    End::Failed { error: format!("cannot run on this agent: {e}"), retryable: false, timed_out: false };
                let decide = |stages: &_, ending, stage| {
                    cluster::attempt_ended(stages, ending, stage, end, &RetryPolicy::no_retry())
                };
                let _ = agent.store.finish(claim.token, &claim.job, &AttemptDetails::default(), decide).await;
                return Ok(());
            }
        };
        let local = local_id(claim.token);
        let n = def.core.stages.len();
        let mut core = (*def.core).clone();
        for (i, s) in core.stages.iter_mut().enumerate() {
            if i != claim.stage {
                s.needs = Default::default();
            }
            // Retries go back to the shared queue, decided by `PgQueue::sync`.
            s.retry = RetryPolicy::no_retry();
        }
        let stages = (0..n)
            .map(|i| RestoredStage {
                status: if i == claim.stage { RestoredStatus::NotStarted } else { RestoredStatus::Succeeded },
                attempts: if i == claim.stage { claim.attempt - 1 } else { 0 },
                failures: 0,
                interruptions: 0,
            })
            .collect();
        let retry = def.core.stages[claim.stage].retry.clone();
        agent.unstarted.insert(local, def.core.stages[claim.stage].needs.clone());
        agent.claims.insert(local, ClaimedStage { token: claim.token, job: claim.job.clone(), retry, settled: false });
        let mut outputs = claim.outputs;
        outputs.resize(n, None);
        tracing::info!(job = %claim.job, stage = %def.core.stages[claim.stage].name, attempt = claim.attempt, token = claim.token, "claimed");
        self.track(local, claim.job, claim.pipeline, def, Some(claim.input), outputs);
        self.step(Event::Restored {
            job: local,
            seq: claim.token as u64,
            priority: claim.priority,
            pipeline: Arc::new(core),
            stages,
        });
        Ok(())
    }

    /// Agent mode's counterpart of the store write: starts record their grant; the turn's
    /// ends are written to the shared queue in one transaction, fenced by the claims' tokens,
    /// which also claims what the freed resources can take.
    pub(super) async fn cluster_writes(&mut self, actions: &[Action]) -> Result<(), RuntimeError> {
        let mut ends = Vec::new();
        let mut grants = Vec::new();
        for action in actions {
            match action {
                Action::Start { job, grant, .. } => {
                    let Some(agent) = self.ledger.agent_mut() else { return Ok(()) };
                    agent.unstarted.remove(job);
                    let Some(c) = agent.claims.get(job) else { continue };
                    // Written with the turn's ends. The grant is for display; a refusal (the
                    // lease is gone) is acted on by the next renewal, which stops the attempt.
                    grants.push((c.token, serde_json::to_value(LeaseRecord::from(grant)).expect("serializable")));
                }
                Action::AttemptEnded { job, stage, attempt, result, error, retryable, .. } => {
                    let end = cluster::reported_end(*result, error.as_deref(), *retryable);
                    let details = self.exits.get(&(*job, *stage, *attempt));
                    let details = AttemptDetails {
                        output: details.and_then(|d| d.output.clone()),
                        exit_code: details.and_then(|d| d.exit_code),
                        signal: details.and_then(|d| d.signal),
                        batch_size: details.and_then(|d| d.batch_size),
                    };
                    ends.push((*job, end, details));
                }
                _ => {}
            }
        }
        if !ends.is_empty() || !grants.is_empty() {
            self.send_ends(grants, ends, true).await;
        }
        Ok(())
    }

    /// Writes attempts' ends in one transaction; with `claim`, the same transaction claims what
    /// fits the resources they freed. Writes that fail on a lost connection are retried every
    /// tick; a refused one (the lease was lost) is dropped.
    async fn send_ends(&mut self, grants: Vec<(i64, Value)>, ends: Vec<(JobId, End, AttemptDetails)>, claim: bool) {
        // After a freeze this turn's write is the first round trip: the stale stages stop first.
        self.signal_stale_after_silence();
        // A turn with ends claims what they freed; one with only starts has nothing to claim.
        let picker = if claim && !ends.is_empty() { self.claim_picker() } else { None };
        let Some(agent) = self.ledger.agent_mut() else { return };
        let mut sent = Vec::with_capacity(ends.len());
        let mut endings = Vec::with_capacity(ends.len());
        for (local, end, details) in ends {
            let Some(c) = agent.claims.get(&local) else { continue };
            endings.push(Ending { token: c.token, job: c.job.clone(), details: details.clone() });
            sent.push((local, end, details, c.retry.clone()));
        }
        if endings.is_empty() && grants.is_empty() {
            return;
        }
        let mut decide = |i: usize, stages: &[cluster::SharedStage], ending, stage| {
            cluster::attempt_ended(stages, ending, stage, sent[i].1.clone(), &sent[i].3)
        };
        let mut picker = picker;
        let ask = picker.as_mut().map(|p| p.ask(&agent.settings, &agent.starving, false));
        let synced = agent.store.sync(&grants, &endings, &mut decide, ask).await;
        let synced = match synced {
            Ok(s) => s,
            Err(e) if endings.is_empty() => {
                tracing::warn!("cannot record what {} started attempts were granted: {e}", grants.len());
                return;
            }
            Err(e) => {
                tracing::warn!("cannot record {} attempt ends ({e}); retrying", sent.len());
                agent.unsent.extend(sent.into_iter().map(|(local, end, details, _)| (local, end, details)));
                return;
            }
        };
        if synced.refused_grants > 0 {
            self.metrics.fenced_writes.inc_by(synced.refused_grants as u64);
            tracing::warn!(refused = synced.refused_grants, "grant write refused: lease no longer current");
        }
        for ((local, ..), finish) in sent.iter().zip(synced.finishes) {
            let Some(c) = agent.claims.remove(local) else { continue };
            agent.stopping.remove(local);
            agent.unstarted.remove(local);
            match finish {
                Finish::Applied { job_finished: Some(state) } => {
                    tracing::debug!(job = %c.job, state = state.as_str(), "job finished")
                }
                Finish::Applied { job_finished: None } => {}
                Finish::Fenced => {
                    self.metrics.fenced_writes.inc();
                    tracing::warn!(job = %c.job, token = c.token, "late write refused: the lease expired and the stage was re-queued; this outcome is discarded");
                }
            }
        }
        if let Some(picker) = picker
            && self.after_claim(picker, synced.claims).await
        {
            self.claim_work(false).await;
        }
    }

    async fn resend_unsent(&mut self) {
        let Some(agent) = self.ledger.agent_mut() else { return };
        let unsent = std::mem::take(&mut agent.unsent);
        if !unsent.is_empty() {
            self.send_ends(Vec::new(), unsent, false).await;
        }
    }

    /// Admission in agent mode: the job goes into the shared queue for any agent to claim.
    pub(super) async fn admit_shared(&mut self, request: SubmitRequest) -> Result<Submitted, EngineError> {
        let def = self.pipeline_for(&request.pipeline)?;
        if let Some(earlier) = self.earlier_submission(&request).await? {
            return Ok(earlier);
        }
        let Some(agent) = self.ledger.agent() else { return Err(EngineError::Internal("not an agent".into())) };
        let id = uuid::Uuid::now_v7().to_string();
        // Counted across agents, under the pipeline's admission lock: exact.
        match agent.store.insert_shared_job(&self.new_job(&id, &request, &def), def.max_queued as u64).await {
            Ok(Admitted::Inserted(_)) => {}
            Ok(Admitted::Full) => {
                return Err(EngineError::QueueFull { pipeline: request.pipeline, max: def.max_queued });
            }
            Err(StoreError::DuplicateKey(key)) => {
                return Err(EngineError::IdempotencyConflict { key, existing: "another submission".into() });
            }
            Err(e) => return Err(e.into()),
        }
        self.metrics.submitted(&request.pipeline);
        Ok(Submitted { id, state: "queued".into(), created: true })
    }

    pub(super) async fn cancel_shared(&mut self, id: String) -> Result<String, EngineError> {
        let Some(agent) = self.ledger.agent() else { return Err(EngineError::Internal("not an agent".into())) };
        match agent.store.cancel_shared(&id, cluster::cancel).await? {
            SharedCancel::Accepted(state) => {
                // Stop our own share of it now; other agents see it at their next tick.
                // The cancel is recorded; a failure here only delays the stop to the next tick.
                if let Err(e) = self.stop_ending_claims().await {
                    tracing::warn!("cancel recorded, stopping this agent's share deferred: {e}");
                }
                Ok(state.to_string())
            }
            SharedCancel::AlreadyFinished(state) => Err(EngineError::AlreadyFinished { id, state }),
            SharedCancel::NotFound => Err(EngineError::NotFound(id)),
        }
    }

    pub(super) async fn agents(&self) -> Result<Vec<AgentRecord>, EngineError> {
        let Some(agent) = self.ledger.agent() else {
            return Err(EngineError::NotClustered);
        };
        Ok(agent.store.agents(agent.settings.lease_ttl_ms).await?)
    }

    /// A clean shutdown: what this agent held goes back to the queue at once.
    pub(super) async fn leave_cluster(&mut self) {
        let Some(agent) = self.ledger.agent() else { return };
        match agent.store.stop_agent(cluster::lease_lost).await {
            Ok(requeued) if !requeued.is_empty() => {
                tracing::info!(stages = requeued.len(), "re-queued the stages this agent was running")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("cannot mark this agent stopped ({e}); its leases will expire instead"),
        }
    }
}
