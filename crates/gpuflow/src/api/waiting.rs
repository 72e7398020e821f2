//! What each waiting stage waits for, from the loop's resources snapshot: the core's
//! `waiting::explain` fed with the snapshot, outside the loop, mapped to wire types.

use gpuflow_core::waiting::{self, Blocker, Holder, PoolBrief, Situation, WaitReason};

use super::dto::{HolderView, WaitReasonView, WaitingForView};
use crate::runtime::ResourcesSnapshot;

/// One view per entry of `snapshot.waiting`, in the same order.
pub(crate) fn waiting_for_all(snapshot: &ResourcesSnapshot) -> Vec<WaitingForView> {
    let parts = Parts::of(snapshot);
    let situation = parts.situation(snapshot);
    snapshot
        .waiting
        .iter()
        .enumerate()
        .map(|(position, w)| view(waiting::explain(&w.needs, position, &situation)))
        .collect()
}

/// Those of one job's entries: `(stage name, view)`.
pub(crate) fn waiting_for_job(snapshot: &ResourcesSnapshot, job: &str) -> Vec<(String, WaitingForView)> {
    let parts = Parts::of(snapshot);
    let situation = parts.situation(snapshot);
    snapshot
        .waiting
        .iter()
        .enumerate()
        .filter(|(_, w)| w.job == job)
        .map(|(position, w)| (w.stage.clone(), view(waiting::explain(&w.needs, position, &situation))))
        .collect()
}

/// A stage waiting for the stages it runs after (`waiting_on`: those not succeeded yet).
pub(crate) fn dependency(waiting_on: Vec<String>) -> WaitingForView {
    let sentence = waiting::dependency_sentence(&waiting_on);
    let reason = WaitReasonView {
        kind: "dependency".into(),
        sentence: sentence.clone(),
        after: Some(waiting_on),
        ..Default::default()
    };
    WaitingForView { sentence, reasons: vec![reason] }
}

/// A stage waiting to be retried after `failures` failures.
pub(crate) fn backoff(failures: u32, retry_at: Option<String>) -> WaitingForView {
    let sentence = waiting::backoff_sentence(failures, retry_at.as_deref());
    let reason = WaitReasonView {
        kind: "backoff".into(),
        sentence: sentence.clone(),
        failures: Some(failures),
        retry_at,
        ..Default::default()
    };
    WaitingForView { sentence, reasons: vec![reason] }
}

/// What the situation borrows, built once per snapshot.
struct Parts {
    holders: Vec<(Holder, gpuflow_core::Grant)>,
    pools: Vec<PoolBrief>,
}

impl Parts {
    fn of(s: &ResourcesSnapshot) -> Parts {
        let mut holders: Vec<(Holder, gpuflow_core::Grant)> = s
            .leases
            .iter()
            .map(|l| (Holder::Stage { job: l.job.clone(), stage: l.stage.clone() }, l.grant.clone()))
            .collect();
        // A pool instance's standing lease (its GPU share, CPU) is held like a stage's.
        for p in &s.pools {
            for i in &p.instances {
                if let Some(grant) = &i.grant {
                    holders.push((Holder::PoolInstance { pool: p.name.clone(), index: i.index }, grant.clone()));
                }
            }
        }
        let pools = s
            .pools
            .iter()
            .map(|p| PoolBrief {
                name: p.name.clone(),
                counter: crate::config::pool_counter(&p.name),
                instances: p.instances.len() as u32,
                ready: p.instances.iter().filter(|i| matches!(i.state, "idle" | "busy")).count() as u32,
                crash_looping: p.instances.iter().filter(|i| crash_looping(i)).count() as u32,
                failures: p.instances.iter().map(|i| i.consecutive_failures).max().unwrap_or(0),
                last_error: p
                    .instances
                    .iter()
                    .filter(|i| crash_looping(i))
                    .max_by_key(|i| i.consecutive_failures)
                    .and_then(|i| i.last_error.clone()),
            })
            .collect();
        Parts { holders, pools }
    }

    fn situation<'a>(&'a self, s: &'a ResourcesSnapshot) -> Situation<'a> {
        Situation {
            capacity: &s.capacity,
            usage: &s.usage,
            foreign: &s.foreign,
            available: &s.available,
            holders: &self.holders,
            pools: &self.pools,
        }
    }
}

/// Failed `CRASH_LOOP` times in a row and not ready: crash-looping, also while it is being
/// started once more.
fn crash_looping(i: &crate::runtime::InstanceView) -> bool {
    i.consecutive_failures >= crate::runtime::CRASH_LOOP && !matches!(i.state, "idle" | "busy")
}

fn view(reason: WaitReason) -> WaitingForView {
    WaitingForView { sentence: reason.sentence, reasons: reason.blockers.into_iter().map(reason_view).collect() }
}

fn holders(held_by: Vec<Holder>) -> Option<Vec<HolderView>> {
    Some(
        held_by
            .into_iter()
            .map(|h| match h {
                Holder::Stage { job, stage } => {
                    HolderView { job: Some(job), stage: Some(stage), pool: None, instance: None }
                }
                Holder::PoolInstance { pool, index } => {
                    HolderView { job: None, stage: None, pool: Some(pool), instance: Some(index) }
                }
            })
            .collect(),
    )
}

fn reason_view(b: Blocker) -> WaitReasonView {
    let base = WaitReasonView { kind: b.kind().into(), sentence: b.sentence(), ..Default::default() };
    match b {
        Blocker::Gpus { needs, free, total, held_by, held_by_count } => WaitReasonView {
            needs: Some(needs.into()),
            free: Some(free.into()),
            capacity: Some(total.into()),
            held_by: holders(held_by),
            held_by_count: Some(held_by_count),
            ..base
        },
        Blocker::GpuMemory { needs, free_at_most, foreign, held_by, held_by_count } => WaitReasonView {
            needs_bytes: Some(needs),
            free_at_most_bytes: Some(free_at_most),
            foreign_bytes: Some(foreign),
            held_by: holders(held_by),
            held_by_count: Some(held_by_count),
            ..base
        },
        Blocker::Cpu { needs, free, capacity, held_by, held_by_count } => WaitReasonView {
            needs: Some(needs.into()),
            free: Some(free.into()),
            capacity: Some(capacity.into()),
            held_by: holders(held_by),
            held_by_count: Some(held_by_count),
            ..base
        },
        Blocker::Counter { name, needs, free, capacity, held_by, held_by_count } => WaitReasonView {
            name: Some(name),
            needs: Some(needs),
            free: Some(free),
            capacity: Some(capacity),
            held_by: holders(held_by),
            held_by_count: Some(held_by_count),
            ..base
        },
        Blocker::PoolBusy { pool, ready, held_by, held_by_count } => WaitReasonView {
            pool: Some(pool),
            ready: Some(ready),
            held_by: holders(held_by),
            held_by_count: Some(held_by_count),
            ..base
        },
        Blocker::PoolCrashLooping { pool, instances, crash_looping, failures, last_error } => WaitReasonView {
            pool: Some(pool),
            instances: Some(instances),
            crash_looping: Some(crash_looping),
            failures: Some(failures),
            last_error,
            ..base
        },
        Blocker::PoolNotReady { pool, instances } => {
            WaitReasonView { pool: Some(pool), instances: Some(instances), ..base }
        }
        Blocker::Queue { ahead } => WaitReasonView { ahead: Some(ahead), ..base },
        Blocker::Starting => base,
    }
}
