//! The seam between the loop and where its decisions are recorded: this engine's own store
//! (`Local`: SQLite, one transaction per turn), or the PostgreSQL queue it shares with other
//! agents (`Shared`: admission into the shared queue, claims, fenced writes). The loop calls
//! the operations below and does not ask which ledger it has; each operation decides once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, oneshot};

use super::cluster::Agent;
use super::commands::AdmitError;
use super::*;

pub(super) enum Ledger {
    Local,
    Shared(Box<Agent>),
}

impl Ledger {
    pub(super) fn agent(&self) -> Option<&Agent> {
        match self {
            Ledger::Local => None,
            Ledger::Shared(agent) => Some(agent),
        }
    }

    pub(super) fn agent_mut(&mut self) -> Option<&mut Agent> {
        match self {
            Ledger::Local => None,
            Ledger::Shared(agent) => Some(agent),
        }
    }

    /// Woken when the shared queue has something new (`LISTEN/NOTIFY`).
    pub(super) fn wake(&self) -> Option<Arc<Notify>> {
        self.agent().map(Agent::wake)
    }

    /// Whether a turn's rows are written by this engine (the shared queue keeps its own rows,
    /// written by the agents' fenced writes).
    pub(super) fn keeps_rows(&self) -> bool {
        matches!(self, Ledger::Local)
    }

    /// How often `tick` must run, if at all.
    pub(super) fn tick_every(&self) -> Option<Duration> {
        self.agent().map(Agent::tick_every)
    }

    /// An agent rides out a lost database connection: its job state lives in the database,
    /// and what it could not write is retried. The embedded store failing stays fatal.
    pub(super) fn rides_out(&self, error: &RuntimeError) -> bool {
        matches!((self, error), (Ledger::Shared(_), RuntimeError::Store(e)) if e.is_transient())
    }
}

/// Where a batch's answers go: the batch's caller, or a single submission's.
pub(super) type BatchReply = Box<dyn FnOnce(Vec<Result<Submitted, EngineError>>) + Send>;

/// A batch's answers for a caller that sent one request.
fn oneshot_first(reply: oneshot::Sender<Result<Submitted, EngineError>>) -> BatchReply {
    Box::new(move |answers| {
        let answer = answers.into_iter().next().unwrap_or(Err(EngineError::Internal("no answer".into())));
        let _ = reply.send(answer);
    })
}

/// A batch's answers for a caller that sent a batch.
pub(super) fn oneshot_all(reply: oneshot::Sender<Vec<Result<Submitted, EngineError>>>) -> BatchReply {
    Box::new(move |answers| {
        let _ = reply.send(answers);
    })
}

impl<S: Store> Runtime<S> {
    /// Start-up: this engine recovers its unfinished jobs; an agent joins the shared queue.
    pub(super) async fn open_ledger(&mut self) -> Result<(), RuntimeError> {
        match &self.ledger {
            Ledger::Local => {
                self.next_seq = self.store.next_job_seq().await? as u64;
                self.recover().await
            }
            Ledger::Shared(_) => self.join_cluster(self.api_address.clone()).await,
        }
    }

    /// Admits one submission: into the current turn (answered once it commits), or into the
    /// shared queue (answered now).
    pub(super) async fn submit(
        &mut self,
        request: SubmitRequest,
        reply: oneshot::Sender<Result<Submitted, EngineError>>,
    ) -> Result<(), RuntimeError> {
        self.submit_batch(vec![request], oneshot_first(reply)).await
    }

    /// Admits a batch: in one turn, or (an agent) one transaction per job for now. Each
    /// request gets its own answer, in order.
    pub(super) async fn submit_batch(
        &mut self,
        requests: Vec<SubmitRequest>,
        reply: BatchReply,
    ) -> Result<(), RuntimeError> {
        let count = requests.len();
        let mut answers = Vec::with_capacity(count);
        if self.ledger.agent().is_some() {
            for request in requests {
                answers.push(self.admit_shared(request).await);
            }
            reply(answers);
            return Ok(());
        }
        for request in requests {
            match self.admit(request).await {
                Ok(submitted) => answers.push(Ok(submitted)),
                Err(AdmitError::Refused(e)) => answers.push(Err(e)),
                Err(AdmitError::Store(e)) => {
                    reply((0..count).map(|_| Err(EngineError::Internal(e.to_string()))).collect());
                    return Err(e.into());
                }
            }
        }
        self.turn.replies.push(Box::new(move |_, committed| {
            reply(match committed {
                Ok(()) => answers,
                Err(e) => answers.into_iter().map(|a| a.and(Err(EngineError::Internal(e.into())))).collect(),
            })
        }));
        Ok(())
    }

    /// Cancels a job: in the current turn, or through the shared queue.
    pub(super) async fn cancel(
        &mut self,
        id: String,
        reply: oneshot::Sender<Result<String, EngineError>>,
    ) -> Result<(), RuntimeError> {
        if self.ledger.agent().is_some() {
            let _ = reply.send(self.cancel_shared(id).await);
            return Ok(());
        }
        match job_id_of(&id).filter(|j| self.state.job(*j).is_some()) {
            Some(job) => {
                self.step(Event::CancelRequested { job });
                self.turn.replies.push(Box::new(move |state, committed| {
                    let answer = committed
                        .map(|()| if state.job(job).is_some() { "cancelling" } else { "cancelled" }.to_string())
                        .map_err(|e| EngineError::Internal(e.into()));
                    let _ = reply.send(answer);
                }));
            }
            None => {
                // Finished: committed by an earlier turn, so the store has its state.
                let answer = match self.store.job(&id).await {
                    Ok(Some(detail)) => {
                        Err(EngineError::AlreadyFinished { id, state: detail.job.state.as_str().to_string() })
                    }
                    Ok(None) => Err(EngineError::NotFound(id)),
                    Err(e) => Err(e.into()),
                };
                let _ = reply.send(answer);
            }
        }
        Ok(())
    }

    /// Records everything a turn decided: one transaction in the store, or an agent's fenced
    /// writes (an agent's turn carries no rows: `keeps_rows`).
    pub(super) async fn record(&mut self, turn: &Turn) -> Result<(), RuntimeError> {
        if self.ledger.agent().is_some() {
            return self.cluster_writes(&turn.actions).await;
        }
        self.store.write_turn(&turn.jobs, &turn.writes).await?;
        Ok(())
    }

    /// The shared queue has something new: claim what fits.
    pub(super) async fn ledger_woken(&mut self) {
        self.claim_work(false).await;
    }

    /// Periodic work of the shared queue: renew leases, expire others', poll for claims.
    pub(super) async fn ledger_tick(&mut self) -> Result<(), RuntimeError> {
        self.cluster_tick().await
    }

    /// Shutdown: an agent leaves the shared queue.
    pub(super) async fn close_ledger(&mut self) {
        self.leave_cluster().await;
    }
}
