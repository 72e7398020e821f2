//! A store that cannot be written (a full or failing disk). The engine does not stop: the turn
//! whose commit failed is held whole, none of its effects performed, and retried every
//! second; meanwhile admission and cancel are refused (507) and reads are served. Running
//! attempts keep running; what they report waits in memory (one event per attempt, so it is
//! bounded by what runs) and is decided once the held turn is written. `/healthz` says
//! `degraded` and why, and a `store_unwritable` finding is open. If the engine is stopped
//! meanwhile, the store still holds those attempts as running, and a restart re-runs them.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use gpuflow_core::diagnosis::{Finding, FindingKind};

use super::*;

/// How often a held turn is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Why the engine is degraded, if it is; shared with the API (`/healthz`, admission).
#[derive(Clone, Default)]
pub struct Degraded(Arc<RwLock<Option<String>>>);

impl Degraded {
    pub fn reason(&self) -> Option<String> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, reason: Option<String>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = reason;
    }
}

/// A turn that could not be written, waiting for the store.
pub(super) struct Stall {
    pub(super) turn: Turn,
    since_ms: u64,
    retry_at: tokio::time::Instant,
    finding: Finding,
}

/// Free bytes for unprivileged writers on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid C string and `stat` a valid out-pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some(stat.f_bavail as u64 * stat.f_frsize as u64)
}

impl<S: Store> Runtime<S> {
    /// True while a turn waits for the store: nothing new is decided.
    pub(super) fn is_stalled(&self) -> bool {
        self.stall.is_some()
    }

    /// Whether this commit failure is one to ride out: the local store's disk, not a bug.
    pub(super) fn is_unwritable(&self, error: &RuntimeError) -> bool {
        self.ledger.keeps_rows() && matches!(error, RuntimeError::Store(e) if e.is_unwritable())
    }

    fn unwritable_reason(&self, error: &RuntimeError) -> String {
        let dir = std::path::absolute(&self.config.data_dir).unwrap_or_else(|_| self.config.data_dir.clone());
        let free = free_bytes(&dir).map(gpuflow_core::waiting::bytes).unwrap_or_else(|| "an unknown amount".into());
        format!(
            "the store cannot be written ({error}); data directory {} has {free} free. Free space there: running stages keep running, and the engine resumes by itself",
            dir.display()
        )
    }

    /// Holds a turn whose commit failed for want of a writable store.
    pub(super) fn stall(&mut self, turn: Turn, error: &RuntimeError) {
        let reason = self.unwritable_reason(error);
        tracing::error!("{reason}");
        self.degraded.set(Some(reason.clone()));
        let finding = Finding {
            kind: FindingKind::StoreUnwritable,
            subject: "store".into(),
            summary: "the store cannot be written; new jobs are refused".into(),
            evidence: vec![("error".into(), error.to_string())],
            cause: reason,
            fix: "free space in the data directory (or fix the disk); the engine retries every second".into(),
        };
        self.stall = Some(Stall {
            turn,
            since_ms: self.clock.now_ms(),
            retry_at: tokio::time::Instant::now() + RETRY_EVERY,
            finding,
        });
    }

    /// When the held turn is next tried.
    pub(super) fn stall_retry_at(&self) -> Option<tokio::time::Instant> {
        self.stall.as_ref().map(|s| s.retry_at)
    }

    /// The open `store_unwritable` finding, while stalled.
    pub(super) fn stall_finding(&self) -> Option<(u64, Finding)> {
        self.stall.as_ref().map(|s| (s.since_ms, s.finding.clone()))
    }

    /// Tries the held turn again when due. Once it is written its effects happen (replies,
    /// spawns) and the loop goes back to deciding; the finding is recorded, closed.
    pub(super) async fn retry_stalled(&mut self) -> Result<(), RuntimeError> {
        let Some(stall) = self.stall.as_mut() else { return Ok(()) };
        if tokio::time::Instant::now() < stall.retry_at {
            return Ok(());
        }
        let turn = std::mem::take(&mut stall.turn);
        match self.commit(&turn).await {
            Ok(()) => {
                let stall = self.stall.take().expect("stalled");
                self.degraded.set(None);
                let now = self.clock.now_ms();
                tracing::info!(after_ms = now - stall.since_ms, "the store is writable again; resuming");
                self.act_after_commit(turn).await;
                // The episode goes into the findings history; failing to record it is no
                // reason to stall again.
                let since = stall.since_ms as i64;
                if let Ok(id) = self.store.open_finding(&stall.finding, since).await {
                    let _ = self.store.close_finding(id, now as i64).await;
                }
                Ok(())
            }
            Err(e) if self.is_unwritable(&e) => {
                let reason = self.unwritable_reason(&e);
                self.degraded.set(Some(reason));
                let stall = self.stall.as_mut().expect("stalled");
                stall.turn = turn;
                stall.retry_at = tokio::time::Instant::now() + RETRY_EVERY;
                Ok(())
            }
            Err(e) => {
                self.stall = None;
                self.degraded.set(None);
                self.abandon_turn(turn, &e);
                Err(e)
            }
        }
    }

    /// While stalled, a command that would need a write is refused at once.
    pub(super) fn refuse_while_stalled(&self, command: Command) -> Option<Command> {
        let Some(reason) = self.degraded.reason().filter(|_| self.is_stalled()) else { return Some(command) };
        let error = || EngineError::StoreUnwritable(reason.clone());
        match command {
            Command::Submit { reply, .. } => {
                let _ = reply.send(Err(error()));
            }
            Command::SubmitBatch { requests, reply } => {
                let _ = reply.send(requests.iter().map(|_| Err(error())).collect());
            }
            Command::Cancel { reply, .. } => {
                let _ = reply.send(Err(error()));
            }
            other => return Some(other),
        }
        None
    }
}
