//! What the queue knows about how long stages take, for the critical-path order: within one
//! priority, the waiting stage whose job has the most work left downstream goes first.
//!
//! A stage's expected duration is its declared `expected_ms`, else the mean of its recent
//! attempts (fed in by the runtime), else 0, so that with nothing known the order is arrival
//! order. Pure: the runtime passes the durations in.

use std::collections::{BTreeMap, VecDeque};

use crate::pipeline::{Pipeline, StageIndex};

/// How many recent attempts of a stage its mean is taken over.
pub const WINDOW: usize = 20;

/// How many pipelines keep windows. Workflow chains are pipelines named by their request, so
/// the set is open-ended; past this, the first by name is forgotten.
const MAX_PIPELINES: usize = 1_024;

/// Recent run times of one stage.
#[derive(Clone, Debug, Default)]
struct Window {
    recent: VecDeque<u64>,
    sum: u64,
}

/// Measured run times per pipeline and stage, by name (so they outlive a reload).
#[derive(Clone, Debug, Default)]
pub struct Durations {
    by_pipeline: BTreeMap<String, BTreeMap<String, Window>>,
}

impl Durations {
    /// Records how long one attempt of a stage ran; only the last `WINDOW` are kept.
    pub fn record(&mut self, pipeline: &str, stage: &str, ms: u64) {
        if !self.by_pipeline.contains_key(pipeline) && self.by_pipeline.len() >= MAX_PIPELINES {
            self.by_pipeline.pop_first();
        }
        let stages = self.by_pipeline.entry(pipeline.to_string()).or_default();
        let window = match stages.get_mut(stage) {
            Some(w) => w,
            None => stages.entry(stage.to_string()).or_default(),
        };
        if window.recent.len() == WINDOW
            && let Some(old) = window.recent.pop_front()
        {
            window.sum -= old;
        }
        window.recent.push_back(ms);
        window.sum += ms;
    }

    /// The mean of the stage's recent attempts, if any were recorded.
    pub fn mean(&self, pipeline: &str, stage: &str) -> Option<u64> {
        let w = self.by_pipeline.get(pipeline)?.get(stage)?;
        (!w.recent.is_empty()).then(|| w.sum / w.recent.len() as u64)
    }

    /// A stage's expected duration: declared, else measured, else 0.
    pub fn expected(&self, pipeline: &Pipeline, stage: StageIndex) -> u64 {
        let spec = &pipeline.stages[stage];
        spec.expected_ms.or_else(|| self.mean(&pipeline.name, &spec.name)).unwrap_or(0)
    }

    /// The work left in a job when `stage` is about to run: its own expected duration plus the
    /// longest expected path through the stages after it.
    pub fn remaining(&self, pipeline: &Pipeline, stage: StageIndex) -> u64 {
        if !self.by_pipeline.contains_key(&pipeline.name) && pipeline.stages.iter().all(|s| s.expected_ms.is_none()) {
            return 0;
        }
        // On the stack for the usual few stages: this runs each time a stage is queued.
        let n = pipeline.stages.len();
        if n <= 16 {
            let mut memo = [None; 16];
            self.longest(pipeline, stage, &mut memo[..n])
        } else {
            self.longest(pipeline, stage, &mut vec![None; n])
        }
    }

    fn longest(&self, pipeline: &Pipeline, stage: StageIndex, memo: &mut [Option<u64>]) -> u64 {
        if let Some(known) = memo[stage] {
            return known;
        }
        let mut after = 0;
        for (next, spec) in pipeline.stages.iter().enumerate() {
            if spec.after.contains(&stage) {
                after = after.max(self.longest(pipeline, next, memo));
            }
        }
        let total = self.expected(pipeline, stage).saturating_add(after);
        memo[stage] = Some(total);
        total
    }
}

/// A stage's place among waiting stages of one priority: its remaining work on a coarse
/// logarithmic scale (8 steps per doubling). Estimates within about a tenth of each other
/// mostly share a step, so measurement noise does not reorder them: arrival order decides.
pub fn rank(remaining_ms: u64) -> u32 {
    if remaining_ms < 8 {
        return remaining_ms as u32;
    }
    let exponent = 63 - remaining_ms.leading_zeros();
    let mantissa = (remaining_ms >> (exponent - 3)) & 7;
    exponent * 8 + mantissa as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::StageSpec;
    use crate::retry::RetryPolicy;

    fn stage(name: &str, after: Vec<usize>, expected_ms: Option<u64>) -> StageSpec {
        StageSpec {
            name: name.into(),
            needs: Default::default(),
            after,
            timeout_ms: None,
            retry: RetryPolicy::no_retry(),
            expected_ms,
        }
    }

    #[test]
    fn remaining_work_follows_the_longest_path_after_the_stage() {
        // a -> b (5) -> d (1); a -> c (2); a declared 3.
        let p = Pipeline::new(
            "p",
            vec![
                stage("a", vec![], Some(3_000)),
                stage("b", vec![0], Some(5_000)),
                stage("c", vec![0], Some(2_000)),
                stage("d", vec![1], Some(1_000)),
            ],
        )
        .unwrap();
        let d = Durations::default();
        assert_eq!(d.remaining(&p, 0), 9_000);
        assert_eq!(d.remaining(&p, 1), 6_000);
        assert_eq!(d.remaining(&p, 2), 2_000);
        assert_eq!(d.remaining(&p, 3), 1_000);
    }

    #[test]
    fn measured_means_fill_in_what_is_not_declared_and_forget_old_attempts() {
        let p = Pipeline::new("p", vec![stage("a", vec![], None), stage("b", vec![0], Some(1_000))]).unwrap();
        let mut d = Durations::default();
        assert_eq!(d.remaining(&p, 0), 1_000, "nothing known about a: it counts 0");
        d.record("p", "a", 4_000);
        d.record("p", "a", 2_000);
        assert_eq!(d.mean("p", "a"), Some(3_000));
        assert_eq!(d.remaining(&p, 0), 4_000);
        // A declared duration wins over the measured one.
        d.record("p", "b", 9_000);
        assert_eq!(d.remaining(&p, 1), 1_000);
        for _ in 0..WINDOW {
            d.record("p", "a", 500);
        }
        assert_eq!(d.mean("p", "a"), Some(500), "only the last {WINDOW} attempts count");
        assert_eq!(d.mean("other", "a"), None);
    }

    #[test]
    fn rank_is_monotone_and_coarse() {
        let mut last = 0;
        for ms in (0..100_000).chain([u64::MAX / 2, u64::MAX]) {
            let r = rank(ms);
            assert!(r >= last, "rank({ms}) went down");
            last = r;
        }
        assert_eq!(rank(7_000), rank(7_100), "a percent apart: one step");
        assert!(rank(4_000) < rank(7_000));
        assert!(rank(u64::MAX) < u32::MAX, "leaves room for the starving rank");
    }
}
