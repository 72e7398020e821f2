//! Retention: finished jobs older than `retention.{succeeded,failed,cancelled}` are removed,
//! rows (job, stages, attempts) and directory (logs, outputs), by a background task outside
//! the runtime loop, in batches of `BATCH` with a pause between, so it never holds the loop
//! or the store's writer for long. `gpuflow gc --dry-run` lists what a pass would remove.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{Retention, SharedConfig};
use crate::store::{Store, StoreResult};

/// Jobs removed per transaction.
pub const BATCH: u32 = 200;
/// Pause between batches: the engine's own writes go in between.
const PAUSE: Duration = Duration::from_millis(20);

/// A finished job past its retention.
pub struct Expired {
    pub id: String,
    pub state: &'static str,
    pub finished_at: i64,
    /// Size of its directory (logs, outputs).
    pub dir_bytes: u64,
}

fn job_dir(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join("jobs").join(id)
}

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

/// One pass: every job past its retention at `now_ms`, oldest first per state, handed to
/// `each`. Unless `dry_run`, each batch's directories are removed, then its rows (so a crash
/// between leaves rows the next pass removes, never directories without rows). Directories
/// are sized (`Expired::dir_bytes`) only when `measure`: the background pass does not need it.
/// Returns how many jobs were (or would be) removed.
pub async fn pass<S: Store>(
    store: &S,
    retention: &Retention,
    data_dir: &Path,
    now_ms: i64,
    dry_run: bool,
    measure: bool,
    mut each: impl FnMut(&Expired),
) -> StoreResult<u64> {
    let mut total = 0;
    for (state, keep_ms) in retention.expiring() {
        let cutoff = now_ms.saturating_sub(keep_ms as i64);
        if dry_run {
            // Nothing is deleted, so one query sees them all.
            for (id, finished_at) in store.expired_jobs(state, cutoff, u32::MAX / 2).await? {
                let dir_bytes = if measure { dir_size(&job_dir(data_dir, &id)) } else { 0 };
                each(&Expired { id, state, finished_at, dir_bytes });
                total += 1;
            }
            continue;
        }
        loop {
            let batch = store.expired_jobs(state, cutoff, BATCH).await?;
            let ids: Vec<String> = batch.iter().map(|(id, _)| id.clone()).collect();
            let dirs: Vec<PathBuf> = ids.iter().map(|id| job_dir(data_dir, id)).collect();
            let sizes = tokio::task::spawn_blocking(move || {
                dirs.iter()
                    .map(|d| {
                        let size = if measure { dir_size(d) } else { 0 };
                        let _ = std::fs::remove_dir_all(d);
                        size
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            store.delete_finished_jobs(&ids).await?;
            for ((id, finished_at), dir_bytes) in batch.iter().zip(sizes.into_iter().chain(std::iter::repeat(0))) {
                each(&Expired { id: id.clone(), state, finished_at: *finished_at, dir_bytes });
            }
            total += batch.len() as u64;
            if batch.len() < BATCH as usize {
                break;
            }
            tokio::time::sleep(PAUSE).await;
        }
    }
    Ok(total)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The background task: a pass every `retention.interval` (read each time, so a reload
/// applies) until `stop`. Failures (a full disk) are logged and retried at the next pass.
pub async fn run<S: Store>(store: S, config: SharedConfig, mut stop: watch::Receiver<bool>) {
    loop {
        let interval = Duration::from_millis(config.get().retention.interval_ms);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let config = config.get();
        let data_dir = std::path::absolute(&config.data_dir).unwrap_or_else(|_| config.data_dir.clone());
        match pass(&store, &config.retention, &data_dir, now_ms(), false, false, |_| {}).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "retention: removed finished jobs past their retention"),
            Err(e) => tracing::warn!("retention: {e}; trying again at the next pass"),
        }
    }
}

/// `gpuflow gc [--dry-run]`: one pass now, printing each job.
pub async fn gc<S: Store>(store: &S, retention: &Retention, data_dir: &Path, dry_run: bool) -> StoreResult<u64> {
    let mut bytes = 0;
    let verb = if dry_run { "would remove" } else { "removed" };
    let n = pass(store, retention, data_dir, now_ms(), dry_run, true, |e| {
        bytes += e.dir_bytes;
        let at = jiff::Timestamp::from_millisecond(e.finished_at).map(|t| t.to_string()).unwrap_or_default();
        println!("{verb} {} {} finished {at} {} bytes", e.id, e.state, e.dir_bytes);
    })
    .await?;
    println!("{n} jobs, {bytes} bytes of job directories {verb}");
    Ok(n)
}
