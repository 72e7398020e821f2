//! The latest progress of each running attempt, worker task or command stage alike, and its
//! events on the live feed.
//!
//! Progress is not recorded in the store: it is a hint about a running attempt, gone with the
//! attempt (and with the engine on a restart). The board is shared with the API (`GET
//! /v1/jobs/{id}`, the GPU timeline, `/v1/resources`), which reads it without asking the loop.
//!
//! The feed carries at most one `progress` event per attempt every `FEED_GAP_MS` (4 a
//! second): a report that comes sooner is held back, and newer ones replace it (the event
//! says what is latest when it goes out). A held-back report is published before the
//! attempt's `attempt_ended`, so a subscriber always sees the last one.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use super::*;
use crate::supervisor::Progress;

/// The smallest gap between two `progress` events of one attempt on the feed.
pub(super) const FEED_GAP_MS: u64 = 250;

/// A running attempt's latest report and when it came (unix ms).
#[derive(Clone, Debug, PartialEq)]
pub struct StageProgress {
    pub fraction: Option<f64>,
    pub message: Option<String>,
    pub at_ms: u64,
}

/// Shared between the loop (writer) and the API (reader).
#[derive(Clone, Default)]
pub struct ProgressBoard {
    latest: Arc<Mutex<BTreeMap<AttemptKey, StageProgress>>>,
}

impl ProgressBoard {
    /// `(stage, attempt, progress)` of the job's running attempts that reported any.
    pub fn of_job(&self, job: JobId) -> Vec<(StageIndex, u32, StageProgress)> {
        self.lock()
            .range((job, 0, 0)..=(job, StageIndex::MAX, u32::MAX))
            .map(|((_, stage, attempt), p)| (*stage, *attempt, p.clone()))
            .collect()
    }

    pub fn get(&self, key: &AttemptKey) -> Option<StageProgress> {
        self.lock().get(key).cloned()
    }

    fn set(&self, key: AttemptKey, progress: StageProgress) {
        self.lock().insert(key, progress);
    }

    fn remove(&self, key: &AttemptKey) {
        self.lock().remove(key);
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<AttemptKey, StageProgress>> {
        // Plain inserts and removes cannot leave the map half-changed; keep serving.
        self.latest.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// When each attempt's last `progress` event went out, and whether a newer report waits.
#[derive(Default)]
pub(super) struct FeedThrottle {
    slots: HashMap<AttemptKey, Slot>,
    pending: usize,
}

struct Slot {
    sent_ms: u64,
    pending: bool,
}

impl FeedThrottle {
    /// A new report for `key` at `now`: true when its event may go out now; otherwise it is
    /// held back until `next_due`.
    pub(super) fn offer(&mut self, key: AttemptKey, now: u64) -> bool {
        match self.slots.get_mut(&key) {
            Some(slot) if now < slot.sent_ms + FEED_GAP_MS => {
                if !slot.pending {
                    slot.pending = true;
                    self.pending += 1;
                }
                false
            }
            Some(slot) => {
                slot.sent_ms = now;
                if std::mem::take(&mut slot.pending) {
                    self.pending -= 1;
                }
                true
            }
            None => {
                self.slots.insert(key, Slot { sent_ms: now, pending: false });
                true
            }
        }
    }

    /// When the earliest held-back report may go out.
    pub(super) fn next_due(&self) -> Option<u64> {
        if self.pending == 0 {
            return None;
        }
        self.slots.values().filter(|s| s.pending).map(|s| s.sent_ms + FEED_GAP_MS).min()
    }

    /// The attempts whose held-back report may go out at `now`; they count as sent.
    pub(super) fn due(&mut self, now: u64) -> Vec<AttemptKey> {
        if self.pending == 0 {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (key, slot) in &mut self.slots {
            if slot.pending && now >= slot.sent_ms + FEED_GAP_MS {
                slot.pending = false;
                slot.sent_ms = now;
                out.push(*key);
            }
        }
        self.pending -= out.len();
        out.sort_unstable();
        out
    }

    /// The attempt ended: forgets it; true when a report was still held back (publish it
    /// before the end).
    pub(super) fn take_pending(&mut self, key: &AttemptKey) -> bool {
        let held = self.slots.remove(key).is_some_and(|s| s.pending);
        if held {
            self.pending -= 1;
        }
        held
    }
}

impl<S: Store> Runtime<S> {
    /// A running attempt reported progress: a worker's `progress` message or a line of a
    /// command stage's progress file. Reports for attempts that are no longer running are
    /// dropped by the callers.
    pub(super) fn progress_reported(&mut self, key: AttemptKey, progress: Progress) {
        if !self.jobs.contains_key(&key.0) {
            return;
        }
        let now = self.clock.now_ms();
        let Progress { fraction, message } = progress;
        self.journal.progress().set(key, StageProgress { fraction, message, at_ms: now });
        if self.journal.listening() && self.progress_feed.offer(key, now) {
            self.publish_progress(key, now);
        }
    }

    /// Publishes the held-back reports whose gap has passed.
    pub(super) fn flush_progress(&mut self) {
        let now = self.clock.now_ms();
        for key in self.progress_feed.due(now) {
            self.publish_progress(key, now);
        }
    }

    /// Stamped with the throttle's own `now`, so the gaps subscribers see are the ones it kept.
    fn publish_progress(&mut self, key: AttemptKey, now: u64) {
        if let Some(event) = self.progress_event(key) {
            self.publish_at(event, now);
        }
    }

    /// The feed event for an attempt's latest report.
    fn progress_event(&self, key: AttemptKey) -> Option<EngineEvent> {
        let (job, stage, attempt) = key;
        let active = self.jobs.get(&job)?;
        let p = self.journal.progress().get(&key)?;
        Some(EngineEvent::Progress {
            job: active.id(),
            pipeline: active.pipeline_name.to_string(),
            stage: active.pipeline.core.stages[stage].name.clone(),
            attempt,
            fraction: p.fraction,
            message: p.message,
        })
    }

    /// The attempt ended (its end is recorded and published): its progress is forgotten.
    pub(super) fn progress_ended(&mut self, key: AttemptKey) {
        self.progress_feed.take_pending(&key);
        self.journal.progress().remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: AttemptKey = (JobId(1), 0, 1);
    const B: AttemptKey = (JobId(2), 1, 1);

    #[test]
    fn at_most_one_event_per_gap_per_attempt_and_the_newest_waits() {
        let mut t = FeedThrottle::default();
        assert!(t.offer(A, 1_000), "the first goes out at once");
        assert!(t.offer(B, 1_010), "another attempt has its own gap");
        for now in [1_050, 1_100, 1_200] {
            assert!(!t.offer(A, now), "within {FEED_GAP_MS} ms it is held back");
        }
        assert_eq!(t.next_due(), Some(1_000 + FEED_GAP_MS));
        assert!(t.due(1_200).is_empty(), "not before the gap passed");
        assert_eq!(t.due(1_250), vec![A], "held-back reports are one event, not three");
        assert_eq!(t.next_due(), None);
        assert!(!t.offer(A, 1_300), "the gap counts from the flush");
        assert!(t.offer(A, 1_500) && t.next_due().is_none(), "a due report goes out itself, nothing stays held");
        // Many reports over two seconds give at most 2000 / FEED_GAP_MS + 1 events.
        let mut t = FeedThrottle::default();
        let mut events = 0;
        for now in (0..2_000).step_by(10) {
            events += usize::from(t.offer(A, now)) + t.due(now).len();
        }
        assert!(events <= (2_000 / FEED_GAP_MS) as usize + 1, "{events} events in 2 s");
        assert!(events >= (2_000 / FEED_GAP_MS) as usize - 1, "{events} events in 2 s: too few");
    }

    #[test]
    fn a_held_back_report_is_handed_over_at_the_end_and_then_forgotten() {
        let mut t = FeedThrottle::default();
        assert!(t.offer(A, 0));
        assert!(!t.offer(A, 10));
        assert!(t.take_pending(&A), "the last report must go out before the end");
        assert_eq!(t.next_due(), None);
        assert!(t.due(10_000).is_empty(), "nothing left for an ended attempt");
        assert!(t.offer(B, 0));
        assert!(!t.take_pending(&B), "nothing held back: nothing more to send");
    }

    #[test]
    fn the_board_lists_a_jobs_attempts_only() {
        let board = ProgressBoard::default();
        let p = |f: f64| StageProgress { fraction: Some(f), message: None, at_ms: 5 };
        board.set((JobId(7), 2, 1), p(0.5));
        board.set((JobId(7), 0, 3), p(0.25));
        board.set((JobId(8), 0, 1), p(1.0));
        assert_eq!(board.of_job(JobId(7)), vec![(0, 3, p(0.25)), (2, 1, p(0.5))]);
        board.remove(&(JobId(7), 0, 3));
        assert_eq!(board.of_job(JobId(7)).len(), 1);
        assert!(board.of_job(JobId(9)).is_empty());
    }
}
