//! What the dashboard needs beyond the store: a live feed of state changes (published only
//! after the step that caused them committed), recent GPU lease intervals for the timeline,
//! and the history of pool instance states. The loop writes; the API only reads.
//!
//! Everything here is bounded: the feed is a broadcast channel (a slow subscriber lags and
//! is told to resync, the loop never waits), and both histories are ring buffers.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use gpuflow_core::{Action, StageState};
use tokio::sync::broadcast;

use super::*;

/// Events a subscriber may fall behind by before it is told to resync.
const FEED_CAPACITY: usize = 1024;
/// Closed lease intervals kept for the GPU timeline.
const INTERVALS_KEPT: usize = 2_000;
/// Pool instance transitions kept.
const TRANSITIONS_KEPT: usize = 500;

/// One state change, small: subscribers fetch the detail over the REST endpoints.
#[derive(Clone, Debug, PartialEq)]
pub enum EngineEvent {
    JobSubmitted {
        job: String,
        pipeline: String,
    },
    JobFinished {
        job: String,
        pipeline: String,
        state: &'static str,
    },
    AttemptStarted {
        job: String,
        pipeline: String,
        stage: String,
        attempt: u32,
    },
    AttemptEnded {
        job: String,
        pipeline: String,
        stage: String,
        attempt: u32,
        result: &'static str,
        stage_state: &'static str,
    },
    StageCancelled {
        job: String,
        pipeline: String,
        stage: String,
    },
    /// A stage's lease was granted (`held`) or returned. `gpus` are the devices it touches.
    Lease {
        job: String,
        stage: String,
        attempt: u32,
        gpus: Vec<u32>,
        cpu: u32,
        held: bool,
    },
    PoolInstance {
        pool: String,
        index: usize,
        state: &'static str,
        restarts: u32,
    },
    /// A running attempt's latest progress (at most one per attempt every
    /// `progress::FEED_GAP_MS`).
    Progress {
        job: String,
        pipeline: String,
        stage: String,
        attempt: u32,
        fraction: Option<f64>,
        message: Option<String>,
    },
    /// The set of open findings changed.
    Findings {
        open: usize,
    },
    /// New device readings: `(utilisation %, memory used)` per device, `None` where unknown.
    GpuSamples {
        at_ms: u64,
        readings: Vec<Option<(u32, u64)>>,
    },
}

impl EngineEvent {
    pub fn kind(&self) -> &'static str {
        match self {
            EngineEvent::JobSubmitted { .. } => "job_submitted",
            EngineEvent::JobFinished { .. } => "job_finished",
            EngineEvent::AttemptStarted { .. } => "attempt_started",
            EngineEvent::AttemptEnded { .. } => "attempt_ended",
            EngineEvent::StageCancelled { .. } => "stage_cancelled",
            EngineEvent::Lease { .. } => "lease",
            EngineEvent::PoolInstance { .. } => "pool_instance",
            EngineEvent::Progress { .. } => "progress",
            EngineEvent::Findings { .. } => "findings",
            EngineEvent::GpuSamples { .. } => "gpu_samples",
        }
    }
}

/// An event with its place in the feed.
#[derive(Clone, Debug)]
pub struct Published {
    /// Increases by one per event; a gap seen by a subscriber means it lagged.
    pub seq: u64,
    pub at_ms: u64,
    pub event: EngineEvent,
}

/// Who held (part of) a device, and when. `end_ms` is `None` while held.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaseInterval {
    pub device: u32,
    pub job: String,
    pub pipeline: String,
    pub stage: String,
    pub attempt: u32,
    /// `None` for the whole device, else the bytes of its memory held.
    pub memory_bytes: Option<u64>,
    pub start_ms: u64,
    pub end_ms: Option<u64>,
    pub result: Option<&'static str>,
    /// The holder's latest progress, while held.
    pub progress: Option<StageProgress>,
}

/// A pool instance's state change.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolTransition {
    pub at_ms: u64,
    pub pool: String,
    pub index: usize,
    pub from: Option<&'static str>,
    pub to: &'static str,
    pub restarts: u32,
    pub last_error: Option<String>,
}

#[derive(Default)]
struct Histories {
    open: HashMap<AttemptKey, Vec<LeaseInterval>>,
    closed: VecDeque<LeaseInterval>,
    transitions: VecDeque<PoolTransition>,
}

/// Shared between the loop (writer) and the API (reader, through `EngineHandle`).
#[derive(Clone)]
pub struct Journal {
    feed: broadcast::Sender<Arc<Published>>,
    histories: Arc<Mutex<Histories>>,
    progress: ProgressBoard,
}

impl Default for Journal {
    fn default() -> Self {
        Journal {
            feed: broadcast::channel(FEED_CAPACITY).0,
            histories: Arc::default(),
            progress: ProgressBoard::default(),
        }
    }
}

impl Journal {
    /// Closes an attempt's open GPU timeline intervals; returns their devices.
    fn close_interval(&self, key: (JobId, usize, u32), now: u64, result: &'static str) -> Vec<u32> {
        let mut gpus = Vec::new();
        let mut h = self.lock();
        if let Some(intervals) = h.open.remove(&key) {
            for mut i in intervals {
                gpus.push(i.device);
                i.end_ms = Some(now);
                i.result = Some(result);
                h.closed.push_back(i);
            }
            while h.closed.len() > INTERVALS_KEPT {
                h.closed.pop_front();
            }
        }
        gpus
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Published>> {
        self.feed.subscribe()
    }

    /// Someone is on the feed.
    pub(super) fn listening(&self) -> bool {
        self.feed.receiver_count() > 0
    }

    /// The latest progress of each running attempt.
    pub fn progress(&self) -> &ProgressBoard {
        &self.progress
    }

    /// Lease intervals on GPUs that were open at or after `since_ms`, oldest first.
    pub fn lease_intervals(&self, since_ms: u64) -> Vec<LeaseInterval> {
        let h = self.lock();
        let mut out: Vec<LeaseInterval> =
            h.closed.iter().filter(|i| i.end_ms.is_none_or(|e| e >= since_ms)).cloned().collect();
        out.extend(h.open.iter().flat_map(|(key, intervals)| {
            let progress = self.progress.get(key);
            intervals.iter().map(move |i| LeaseInterval { progress: progress.clone(), ..i.clone() })
        }));
        out.sort_by_key(|i| (i.start_ms, i.device));
        out
    }

    /// Pool instance transitions, newest first.
    pub fn pool_transitions(&self, limit: usize) -> Vec<PoolTransition> {
        self.lock().transitions.iter().rev().take(limit).cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, Histories> {
        // A panic while holding the lock cannot leave the ring buffers inconsistent enough
        // to matter to a dashboard; keep serving rather than poison every reader.
        self.histories.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the loop keeps to publish only real changes.
#[derive(Default)]
pub(super) struct JournalState {
    seq: u64,
    instances: BTreeMap<(String, usize), (&'static str, u32)>,
    findings: Option<Vec<i64>>,
    /// When the newest published device reading was taken.
    sampled_ms: u64,
    /// Worker-stage attempts started in this step, for `journal_workers`.
    workers: Vec<(AttemptKey, String, String, String)>,
}

impl<S: Store> Runtime<S> {
    pub(super) fn publish(&mut self, event: EngineEvent) {
        self.publish_at(event, self.clock.now_ms());
    }

    pub(super) fn publish_at(&mut self, event: EngineEvent, at_ms: u64) {
        self.journal_state.seq += 1;
        if self.journal.feed.receiver_count() == 0 {
            return;
        }
        let published = Published { seq: self.journal_state.seq, at_ms, event };
        let _ = self.journal.feed.send(Arc::new(published));
    }

    /// Records and publishes what one committed step's actions changed. Called after the
    /// commit and before `perform` (which forgets finished jobs).
    pub(super) fn journal_actions(&mut self, actions: &[Action], now: u64) {
        // With nobody on the feed, only the GPU timeline's bookkeeping is done: no event is
        // built, so a no-op job costs no string copies here.
        let listening = self.journal.feed.receiver_count() > 0;
        for action in actions {
            let Some(active) = self.jobs.get(action_job(action)) else { continue };
            if !listening {
                match action {
                    Action::Start { stage, grant, .. }
                        if grant.gpus.is_empty()
                            && grant.gpu_memory.is_none()
                            && self.pool_of(*action_job(action), *stage).is_none() =>
                    {
                        continue;
                    }
                    Action::AttemptEnded { job, stage, attempt, result, .. } => {
                        self.journal.close_interval((*job, *stage, *attempt), now, result.as_str());
                        continue;
                    }
                    Action::Start { .. } => {}
                    _ => continue,
                }
            }
            let (job, pipeline) = (active.id(), active.pipeline_name.to_string());
            let stage_name = |stage: usize| active.pipeline.core.stages[stage].name.clone();
            let events = match action {
                Action::Start { stage, attempt, grant, .. } => {
                    let stage = stage_name(*stage);
                    let intervals: Vec<LeaseInterval> = grant
                        .gpus
                        .iter()
                        .map(|d| (*d, None))
                        .chain(grant.gpu_memory.map(|(d, bytes)| (d, Some(bytes))))
                        .map(|(device, memory_bytes)| LeaseInterval {
                            device,
                            job: job.clone(),
                            pipeline: pipeline.clone(),
                            stage: stage.clone(),
                            attempt: *attempt,
                            memory_bytes,
                            start_ms: now,
                            end_ms: None,
                            result: None,
                            progress: None,
                        })
                        .collect();
                    // A worker stage runs on its pool instance's devices; which instance takes
                    // it is known only once `perform` dispatched it (`journal_workers`).
                    let key = (*action_job(action), action_stage(action), *attempt);
                    if intervals.is_empty() && self.pool_of(key.0, key.1).is_some() {
                        self.journal_state.workers.push((key, job.clone(), pipeline.clone(), stage.clone()));
                    }
                    let gpus: Vec<u32> = intervals.iter().map(|i| i.device).collect();
                    if !intervals.is_empty() {
                        self.journal.lock().open.insert(key, intervals);
                    }
                    vec![
                        EngineEvent::Lease {
                            job: job.clone(),
                            stage: stage.clone(),
                            attempt: *attempt,
                            gpus,
                            cpu: grant.cpu,
                            held: true,
                        },
                        EngineEvent::AttemptStarted { job, pipeline, stage, attempt: *attempt },
                    ]
                }
                Action::AttemptEnded { job: key_job, stage, attempt, result, next, .. } => {
                    let stage_index = *stage;
                    let key = (*key_job, stage_index, *attempt);
                    let stage = stage_name(stage_index);
                    let gpus = self.journal.close_interval(key, now, result.as_str());
                    // A report the feed held back goes out before the end, never after.
                    let last_progress =
                        self.progress_feed.take_pending(&key).then(|| self.journal.progress.get(&key)).flatten().map(
                            |p| EngineEvent::Progress {
                                job: job.clone(),
                                pipeline: pipeline.clone(),
                                stage: stage.clone(),
                                attempt: *attempt,
                                fraction: p.fraction,
                                message: p.message,
                            },
                        );
                    last_progress
                        .into_iter()
                        .chain([
                            EngineEvent::AttemptEnded {
                                job: job.clone(),
                                pipeline,
                                stage: stage.clone(),
                                attempt: *attempt,
                                result: result.as_str(),
                                stage_state: StageState::after(next, now).as_str(),
                            },
                            EngineEvent::Lease { job, stage, attempt: *attempt, gpus, cpu: 0, held: false },
                        ])
                        .collect()
                }
                Action::StageCancelled { stage, .. } => {
                    vec![EngineEvent::StageCancelled { job, pipeline, stage: stage_name(*stage) }]
                }
                Action::JobFinished { state, .. } => {
                    vec![EngineEvent::JobFinished { job, pipeline, state: state.as_str() }]
                }
                Action::Kill { .. } => vec![],
            };
            for e in events {
                self.publish_at(e, now);
            }
        }
    }

    /// Opens the timeline intervals of worker-stage attempts dispatched in this step: they
    /// hold their instance's devices.
    pub(super) fn journal_workers(&mut self, now: u64) {
        for (key, job, pipeline, stage) in std::mem::take(&mut self.journal_state.workers) {
            let Some((pool, index)) = self.worker_tasks.get(&key) else { continue };
            let intervals: Vec<LeaseInterval> = self
                .instance_devices(pool, *index)
                .into_iter()
                .map(|device| LeaseInterval {
                    device,
                    job: job.clone(),
                    pipeline: pipeline.clone(),
                    stage: stage.clone(),
                    attempt: key.2,
                    memory_bytes: None,
                    start_ms: now,
                    end_ms: None,
                    result: None,
                    progress: None,
                })
                .collect();
            if !intervals.is_empty() {
                self.journal.lock().open.insert(key, intervals);
            }
        }
    }

    /// Publishes pool instance and findings changes since the last call. Cheap: a handful
    /// of instances and open findings, compared by state.
    pub(super) fn journal_observe(&mut self) {
        let now = self.clock.now_ms();
        let changed: Vec<PoolTransition> = self
            .instance_states()
            .into_iter()
            .filter_map(|(pool, index, state, restarts, last_error)| {
                let before = self.journal_state.instances.get(&(pool.to_string(), index)).copied();
                (before != Some((state, restarts))).then(|| PoolTransition {
                    at_ms: now,
                    pool: pool.to_string(),
                    index,
                    from: before.map(|(s, _)| s),
                    to: state,
                    restarts,
                    last_error: last_error.map(str::to_string),
                })
            })
            .collect();
        for t in &changed {
            self.journal_state.instances.insert((t.pool.clone(), t.index), (t.to, t.restarts));
        }
        if !changed.is_empty() {
            {
                let mut h = self.journal.lock();
                h.transitions.extend(changed.iter().cloned());
                while h.transitions.len() > TRANSITIONS_KEPT {
                    h.transitions.pop_front();
                }
            }
            for t in changed {
                self.publish(EngineEvent::PoolInstance {
                    pool: t.pool,
                    index: t.index,
                    state: t.to,
                    restarts: t.restarts,
                });
            }
        }
        let mut open: Vec<i64> = self.watchdog.open.values().map(|f| f.id).collect();
        open.sort_unstable();
        if self.journal_state.findings.as_ref() != Some(&open) {
            let n = open.len();
            self.journal_state.findings = Some(open);
            self.publish(EngineEvent::Findings { open: n });
        }
        let newest = self.watchdog.devices.iter().filter_map(|d| d.history.back().map(|h| h.0)).max().unwrap_or(0);
        if newest > self.journal_state.sampled_ms {
            self.journal_state.sampled_ms = newest;
            let readings = self
                .watchdog
                .devices
                .iter()
                .map(|d| d.history.back().filter(|h| h.0 == newest).map(|h| (h.1, h.2)))
                .collect();
            self.publish(EngineEvent::GpuSamples { at_ms: newest, readings });
        }
    }
}

fn action_job(action: &Action) -> &JobId {
    match action {
        Action::Start { job, .. }
        | Action::Kill { job, .. }
        | Action::AttemptEnded { job, .. }
        | Action::StageCancelled { job, .. }
        | Action::JobFinished { job, .. } => job,
    }
}

fn action_stage(action: &Action) -> StageIndex {
    match action {
        Action::Start { stage, .. }
        | Action::Kill { stage, .. }
        | Action::AttemptEnded { stage, .. }
        | Action::StageCancelled { stage, .. } => *stage,
        Action::JobFinished { .. } => 0,
    }
}
