//! Start-up recovery: kill what a dead engine left running, then rebuild the scheduler's state
//! from the store. Attempts that were running are interrupted and re-queued.

use std::collections::HashMap;

use gpuflow_core::{Event, JobState, RestoredStage, RestoredStatus, StageState};

use super::*;
use crate::config::Config;
use crate::gpu::{GpuInfo, GpuProbe};
use crate::store::{RecoveryCursor, UnfinishedJob};

/// Unfinished jobs read and restored per turn at start-up.
const RECOVERY_PAGE: u32 = 5_000;

/// Resolves `gpus: auto` in a stored pipeline file to the devices this engine has now.
struct CurrentGpus(Vec<GpuInfo>);

impl GpuProbe for CurrentGpus {
    fn discover(&self) -> Vec<GpuInfo> {
        self.0.clone()
    }
}

impl<S: Store> Runtime<S> {
    /// Kills what a previous engine on this data directory left running (after a `kill -9`
    /// its children survive, and may hold GPUs). Must run before this engine starts anything.
    pub(super) async fn sweep(&self) {
        let killed = supervisor::sweep_leftovers(&self.engine_marker).await;
        if killed > 0 {
            tracing::warn!(killed, "killed processes left running by a previous engine on this data directory");
        }
    }

    /// The pipeline file a job was accepted under, read with this engine's GPUs.
    pub(super) async fn snapshot_config(&self, hash: &str) -> Result<Result<Config, String>, StoreError> {
        let probe = CurrentGpus(self.config.gpus.clone());
        Ok(match self.store.config_snapshot(hash).await? {
            Some(text) => Config::parse(&text, "stored pipeline file", &probe).map_err(|e| e.to_string()),
            None => Err(format!("pipeline file snapshot {hash} is missing")),
        })
    }

    /// Restores unfinished jobs a page at a time, in the order they are served, and runs a
    /// turn after each page: the first dispatch comes after the first page, not after the
    /// whole queue was read, and only a page of rows is in memory at once.
    pub(super) async fn recover(&mut self) -> Result<(), RuntimeError> {
        let mut parsed: HashMap<String, Result<Config, String>> = HashMap::new();
        let mut after = None;
        let mut recovered = 0;
        loop {
            let page = self.store.unfinished_jobs(after, RECOVERY_PAGE).await?;
            let Some(last) = page.last() else { break };
            after = Some(RecoveryCursor::of(&last.job));
            recovered += page.len();
            for job in page {
                let hash = job.job.config_hash.clone();
                if !parsed.contains_key(&hash) {
                    let config = self.snapshot_config(&hash).await?;
                    parsed.insert(hash.clone(), config);
                }
                let config = &parsed[&hash];
                let def = match config {
                    Ok(c) => c.pipeline(&job.job.pipeline),
                    Err(e) => Err(e.clone()),
                }
                .and_then(|def| {
                    if def.core.stages.len() == job.stages.len() {
                        Ok(def)
                    } else {
                        Err("stage list does not match the stored job".to_string())
                    }
                });
                match def {
                    Ok(def) => self.restore(job, def).await?,
                    Err(e) => {
                        self.abandon(job, format!("cannot recover the job: its pipeline definition is unusable ({e})"))
                            .await?
                    }
                }
            }
            self.run_turn().await?;
        }
        if recovered > 0 {
            tracing::info!(jobs = recovered, "recovered unfinished jobs");
        }
        super::release_freed_memory();
        Ok(())
    }

    async fn restore(&mut self, job: UnfinishedJob, def: Arc<PipelineDef>) -> Result<(), RuntimeError> {
        let Some(id) = job_id_of(&job.job.id) else {
            return self.abandon(job, "stored job id is not a UUID".into()).await;
        };
        let stages = job
            .stages
            .iter()
            .map(|s| RestoredStage {
                status: match s.state {
                    StageState::Running => RestoredStatus::WasRunning { attempt: s.attempts },
                    StageState::Backoff => RestoredStatus::Backoff { until: s.not_before.unwrap_or(0) as u64 },
                    StageState::Succeeded => RestoredStatus::Succeeded,
                    StageState::Failed => RestoredStatus::Failed,
                    StageState::Cancelled => RestoredStatus::Cancelled,
                    // Readiness follows from the predecessors: the core works it out again.
                    StageState::Pending | StageState::Queued => RestoredStatus::NotStarted,
                },
                attempts: s.attempts,
                failures: s.failures,
                interruptions: s.interruptions,
            })
            .collect();
        let outputs = job.stages.iter().map(|s| s.output.clone()).collect();
        // A large input comes back as null (`recovered_job_columns`); it is read when a stage
        // starts. (A stored null input is read back the same way, as itself.)
        let input = Some(job.job.input.clone()).filter(|i| !i.is_null());
        self.track(id, job.job.id.clone(), job.job.pipeline.clone(), def.clone(), input, outputs);
        self.step(Event::Restored {
            job: id,
            seq: job.job.seq as u64,
            priority: job.job.priority,
            pipeline: def.core.clone(),
            stages,
        });
        Ok(())
    }

    /// Fails a job that cannot be recovered, releasing what it held in the store.
    async fn abandon(&mut self, job: UnfinishedJob, error: String) -> Result<(), RuntimeError> {
        tracing::error!(job = %job.job.id, "{error}");
        let at = self.clock.now_ms() as i64;
        let mut writes = Vec::new();
        for s in &job.stages {
            match s.state {
                StageState::Running => writes.push(Write::AttemptEnded {
                    job: job.job.id.clone(),
                    stage: s.idx,
                    attempt: s.attempts,
                    result: "interrupted",
                    stage_state: StageState::Cancelled,
                    readied: Vec::new(),
                    not_before: None,
                    error: Some(error.clone()),
                    output: None,
                    exit_code: None,
                    signal: None,
                    batch_size: None,
                    failures: s.failures,
                    interruptions: s.interruptions + 1,
                    at,
                }),
                state if state.is_final() => {}
                _ => writes.push(Write::StageCancelled { job: job.job.id.clone(), stage: s.idx, at }),
            }
        }
        writes.push(Write::JobFinished {
            job: job.job.id.clone(),
            state: JobState::Failed,
            error: Some(error),
            output: None,
            at,
        });
        self.store.write(&writes).await?;
        Ok(())
    }
}
