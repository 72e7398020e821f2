//! Why a queued stage waits, in the scheduler's terms, and one sentence a person reads.
//!
//! A pure function of what the scheduler knows at one moment: capacity, what is in use, the
//! memory other programs hold on each device, how much of each counter may be granted now
//! (a worker pool's ready instances), who holds what, and the pools' instance states. The API
//! serves the result; the dashboard and the CLI show the sentence as it is.

use std::collections::BTreeMap;

use crate::resources::{Capacity, Grant, ResourceRequest, Usage};

/// How many holders a reason names; the rest are counted.
pub const HOLDERS_NAMED: usize = 10;

/// Who holds a lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// A running stage: its job's id and the stage's name.
    Stage { job: String, stage: String },
    /// A worker-pool instance (its standing lease).
    PoolInstance { pool: String, index: usize },
}

impl Holder {
    /// `7a4de9bc/generate` (the job id's last 8 characters, as the dashboard shows ids), or
    /// `pool ocr #0`.
    pub fn label(&self) -> String {
        match self {
            Holder::Stage { job, stage } => format!("{}/{stage}", short_id(job)),
            Holder::PoolInstance { pool, index } => format!("pool {pool} #{index}"),
        }
    }
}

/// How many characters of a job id people see (the dashboard, the CLI, these sentences).
pub const SHORT_ID: usize = 8;

/// The last 8 characters of an id (UUID v7 ids begin with their time, so the tail tells them apart).
pub fn short_id(id: &str) -> &str {
    let start = id.char_indices().rev().nth(SHORT_ID - 1).map(|(i, _)| i).unwrap_or(0);
    &id[start..]
}

/// A worker pool as the waiting queue sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolBrief {
    pub name: String,
    /// The counter its stages ask for (`pool:NAME`).
    pub counter: String,
    pub instances: u32,
    /// Idle or busy: able to take a task.
    pub ready: u32,
    /// Restarting after failing again and again, or given up on.
    pub crash_looping: u32,
    /// The most consecutive failures of any instance.
    pub failures: u32,
    pub last_error: Option<String>,
}

/// Everything `explain` reads, borrowed from a snapshot of the scheduler's state.
#[derive(Clone, Copy, Debug)]
pub struct Situation<'a> {
    pub capacity: &'a Capacity,
    pub usage: &'a Usage,
    /// Memory each device reports in use by processes without a lease.
    pub foreign: &'a [u64],
    /// How much of each counter may be granted now (in use included); a counter not listed
    /// may be granted up to its capacity.
    pub available: &'a BTreeMap<String, u64>,
    pub holders: &'a [(Holder, Grant)],
    pub pools: &'a [PoolBrief],
}

/// One thing a stage waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocker {
    /// Not enough whole devices free (no lease, no share, no foreign memory on them).
    Gpus {
        needs: u32,
        free: u32,
        total: u32,
        held_by: Vec<Holder>,
        held_by_count: usize,
    },
    /// No device has this much memory free; `foreign` is what other programs hold in all.
    GpuMemory {
        needs: u64,
        free_at_most: u64,
        foreign: u64,
        held_by: Vec<Holder>,
        held_by_count: usize,
    },
    Cpu {
        needs: u32,
        free: u32,
        capacity: u32,
        held_by: Vec<Holder>,
        held_by_count: usize,
    },
    /// A named counter (not a pool's).
    Counter {
        name: String,
        needs: u64,
        free: u64,
        capacity: u64,
        held_by: Vec<Holder>,
        held_by_count: usize,
    },
    /// Every ready instance of the pool is busy.
    PoolBusy {
        pool: String,
        ready: u32,
        held_by: Vec<Holder>,
        held_by_count: usize,
    },
    /// No instance is ready and some fail again and again.
    PoolCrashLooping {
        pool: String,
        instances: u32,
        crash_looping: u32,
        failures: u32,
        last_error: Option<String>,
    },
    /// No instance is ready yet (starting or restarting).
    PoolNotReady {
        pool: String,
        instances: u32,
    },
    /// Its resources are free; `ahead` entries earlier in the queue are served first
    /// (one that waited past the starvation bound holds capacity back for itself).
    Queue {
        ahead: usize,
    },
    /// Its resources are free and nothing is ahead: the next scheduling pass starts it.
    Starting,
}

impl Blocker {
    /// The reason's kind on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Blocker::Gpus { .. } => "gpu",
            Blocker::GpuMemory { .. } => "gpu_memory",
            Blocker::Cpu { .. } => "cpu",
            Blocker::Counter { .. } => "counter",
            Blocker::PoolBusy { .. } => "pool_busy",
            Blocker::PoolCrashLooping { .. } => "pool_crash_looping",
            Blocker::PoolNotReady { .. } => "pool_not_ready",
            Blocker::Queue { .. } => "queue",
            Blocker::Starting => "starting",
        }
    }

    /// This blocker in words, starting with a capital.
    pub fn sentence(&self) -> String {
        match self {
            Blocker::Gpus { needs, free, total, held_by, held_by_count } => {
                let what = match (free, total) {
                    (0, 1) => "the only one is held".to_string(),
                    (0, _) => format!("all {total} are held"),
                    _ => format!("only {free} of {total} free"),
                };
                let by = holders_text(held_by, *held_by_count);
                let by = if by.is_empty() { by } else { format!(" by {by}") };
                format!("Needs {}, {what}{by}", plural(*needs as u64, "GPU"))
            }
            Blocker::GpuMemory { needs, free_at_most, foreign, held_by, held_by_count } => {
                let mut s = format!("Needs {} of GPU memory, at most {} free", bytes(*needs), bytes(*free_at_most));
                let by = holders_text(held_by, *held_by_count);
                match (by.is_empty(), *foreign > 0) {
                    (false, false) => s.push_str(&format!("; held by {by}")),
                    (false, true) => s.push_str(&format!("; held by {by}, and {} by other programs", bytes(*foreign))),
                    (true, true) => s.push_str(&format!("; {} held by other programs", bytes(*foreign))),
                    (true, false) => {}
                }
                s
            }
            Blocker::Cpu { needs, free, capacity, held_by, held_by_count } => {
                let by = holders_text(held_by, *held_by_count);
                let by = if by.is_empty() { by } else { format!(" by {by}") };
                format!("Needs {}, {} of {capacity} held{by}", plural(*needs as u64, "CPU slot"), capacity - free)
            }
            Blocker::Counter { name, needs, free, capacity, held_by, held_by_count } => {
                let by = holders_text(held_by, *held_by_count);
                let by = if by.is_empty() { by } else { format!(" by {by}") };
                format!("Needs {needs} of counter {name}, {} of {capacity} held{by}", capacity - free.min(capacity))
            }
            Blocker::PoolBusy { pool, ready, held_by, held_by_count } => {
                let by = holders_text(held_by, *held_by_count);
                let busy = match ready {
                    1 => "its ready instance is busy".to_string(),
                    n => format!("its {n} ready instances are busy"),
                };
                let by = if by.is_empty() { by } else { format!(" with {by}") };
                format!("Needs an idle instance of pool {pool}; {busy}{by}")
            }
            Blocker::PoolCrashLooping { pool, instances, crash_looping, failures, last_error } => {
                let which = if crash_looping == instances {
                    match instances {
                        1 => "its instance is crash-looping".to_string(),
                        n => format!("all {n} instances are crash-looping"),
                    }
                } else {
                    format!("{crash_looping} of {instances} instances are crash-looping and none is ready")
                };
                let error = last_error.as_deref().map(|e| format!("; last error: {}", one_line(e))).unwrap_or_default();
                format!("Pool {pool} has no ready instance: {which} ({failures} failures in a row{error})")
            }
            Blocker::PoolNotReady { pool, instances } => {
                let n = plural(*instances as u64, "instance");
                format!("Pool {pool} has no ready instance yet ({n}, starting or restarting)")
            }
            Blocker::Queue { ahead } => {
                let entries = if *ahead == 1 {
                    "1 earlier entry goes".to_string()
                } else {
                    format!("{ahead} earlier entries go")
                };
                format!("Its resources are free; {entries} first")
            }
            Blocker::Starting => "Its resources are free: starting".to_string(),
        }
    }
}

/// Why one queued stage waits: what blocks it, and all of it in one sentence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaitReason {
    pub blockers: Vec<Blocker>,
    pub sentence: String,
}

/// Why a stage that asks for `needs`, at `position` in the waiting queue (0: first), waits.
pub fn explain(needs: &ResourceRequest, position: usize, s: &Situation<'_>) -> WaitReason {
    let mut blockers = Vec::new();
    let devices = s.capacity.gpus.len();
    let exclusive = |d: usize| s.usage.gpu_exclusive.get(d).copied().unwrap_or(false);
    let used = |d: usize| s.usage.gpu_memory_used.get(d).copied().unwrap_or(0);
    let foreign = |d: usize| s.foreign.get(d).copied().unwrap_or(0);
    let on_device = |g: &Grant, pick: &dyn Fn(usize) -> bool| g.devices().iter().any(|d| pick(*d as usize));

    if needs.gpus > 0 {
        let free = (0..devices).filter(|d| !exclusive(*d) && used(*d) == 0 && foreign(*d) == 0).count() as u32;
        if free < needs.gpus {
            let (held_by, held_by_count) = holders(s, |g| !g.devices().is_empty());
            blockers.push(Blocker::Gpus { needs: needs.gpus, free, total: devices as u32, held_by, held_by_count });
        }
    }
    if needs.gpu_memory > 0 {
        let free_at_most = (0..devices)
            .filter(|d| !exclusive(*d))
            .map(|d| s.capacity.gpus[d].memory.saturating_sub(used(d) + foreign(d)))
            .max()
            .unwrap_or(0);
        if free_at_most < needs.gpu_memory {
            // Only devices it could ever fit on matter.
            let fits = |d: usize| s.capacity.gpus.get(d).is_some_and(|g| g.memory >= needs.gpu_memory);
            let (held_by, held_by_count) = holders(s, |g| on_device(g, &fits));
            let foreign = (0..devices).filter(|d| fits(*d)).map(foreign).sum();
            blockers.push(Blocker::GpuMemory {
                needs: needs.gpu_memory,
                free_at_most,
                foreign,
                held_by,
                held_by_count,
            });
        }
    }
    if needs.cpu > 0 {
        let free = s.capacity.cpu.saturating_sub(s.usage.cpu);
        if free < needs.cpu {
            let (held_by, held_by_count) = holders(s, |g| g.cpu > 0);
            blockers.push(Blocker::Cpu { needs: needs.cpu, free, capacity: s.capacity.cpu, held_by, held_by_count });
        }
    }
    for (name, want) in needs.counters.iter().filter(|(_, w)| **w > 0) {
        let capacity = s.capacity.counters.get(name).copied().unwrap_or(0);
        let available = s.available.get(name).copied().unwrap_or(capacity).min(capacity);
        let in_use = s.usage.counters.get(name).copied().unwrap_or(0);
        let free = available.saturating_sub(in_use);
        if free >= *want {
            continue;
        }
        let (held_by, held_by_count) = holders(s, |g| g.counters.get(name).is_some_and(|n| *n > 0));
        let Some(pool) = s.pools.iter().find(|p| &p.counter == name) else {
            blockers.push(Blocker::Counter {
                name: name.clone(),
                needs: *want,
                free,
                capacity,
                held_by,
                held_by_count,
            });
            continue;
        };
        blockers.push(if pool.ready > 0 {
            Blocker::PoolBusy { pool: pool.name.clone(), ready: pool.ready, held_by, held_by_count }
        } else if pool.crash_looping > 0 {
            Blocker::PoolCrashLooping {
                pool: pool.name.clone(),
                instances: pool.instances,
                crash_looping: pool.crash_looping,
                failures: pool.failures,
                last_error: pool.last_error.clone(),
            }
        } else {
            Blocker::PoolNotReady { pool: pool.name.clone(), instances: pool.instances }
        });
    }
    if blockers.is_empty() {
        blockers.push(if position == 0 { Blocker::Starting } else { Blocker::Queue { ahead: position } });
    }
    let sentence = blockers.iter().map(Blocker::sentence).collect::<Vec<_>>().join(". ");
    WaitReason { blockers, sentence }
}

/// Why a stage waits for the stages it runs after: `waiting_on` are those not yet succeeded.
pub fn dependency_sentence(waiting_on: &[String]) -> String {
    match waiting_on {
        [] => "Its predecessors have finished: queued next".to_string(),
        [one] => format!("Waits for stage {one} to finish"),
        many => format!("Waits for stages {} to finish", list(many, many.len())),
    }
}

/// Why a stage waits to be retried; `retry_at` is a time as the API prints it.
pub fn backoff_sentence(failures: u32, retry_at: Option<&str>) -> String {
    let when = retry_at.map(|t| format!(" at {t}")).unwrap_or_default();
    format!("Failed {}; retries{when}", times(failures))
}

fn times(n: u32) -> String {
    match n {
        1 => "once".to_string(),
        2 => "twice".to_string(),
        n => format!("{n} times"),
    }
}

/// Holders whose grant matches, the first `HOLDERS_NAMED` of them, and how many in all.
fn holders(s: &Situation<'_>, pick: impl Fn(&Grant) -> bool) -> (Vec<Holder>, usize) {
    let mut named = Vec::new();
    let mut count = 0;
    for (holder, grant) in s.holders {
        if pick(grant) {
            count += 1;
            if named.len() < HOLDERS_NAMED {
                named.push(holder.clone());
            }
        }
    }
    (named, count)
}

/// At most three labels, then how many more.
fn holders_text(named: &[Holder], count: usize) -> String {
    let labels: Vec<String> = named.iter().map(Holder::label).collect();
    list(&labels, count)
}

fn list(items: &[String], count: usize) -> String {
    match items.len() {
        0 => String::new(),
        _ if count > 3 => format!("{} and {} more", items[..3.min(items.len())].join(", "), count - 3.min(items.len())),
        _ => items.join(", "),
    }
}

fn plural(n: u64, word: &str) -> String {
    if n == 1 { format!("1 {word}") } else { format!("{n} {word}s") }
}

/// An error on one line for a sentence: its first line and, when the rest says more, its last
/// (a worker's error ends with the tail of its stderr, whose last line is the exception), at
/// most 200 characters.
fn one_line(error: &str) -> String {
    let lines: Vec<&str> = error.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let text = match lines.as_slice() {
        [] => String::new(),
        [first] => first.to_string(),
        [first, .., last] if first.contains(last) => first.to_string(),
        [first, .., last] => format!("{first} … {last}"),
    };
    let n = text.chars().count();
    if n <= 200 { text } else { format!("{}…", text.chars().take(199).collect::<String>()) }
}

/// Binary units, at most one decimal: `16 GiB`, `15.5 GiB`, `512 MiB`, `0 B`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        return format!("{n} B");
    }
    let text = format!("{value:.1}");
    let text = text.strip_suffix(".0").unwrap_or(&text);
    format!("{text} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::GpuDevice;

    const GIB: u64 = 1 << 30;

    fn capacity(gpus: &[u64], cpu: u32, counters: &[(&str, u64)]) -> Capacity {
        Capacity {
            gpus: gpus.iter().enumerate().map(|(i, m)| GpuDevice { index: i as u32, memory: *m }).collect(),
            cpu,
            counters: counters.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    fn stage(job: &str, stage: &str) -> Holder {
        Holder::Stage { job: job.into(), stage: stage.into() }
    }

    const JOB: &str = "01935d3c-0000-7000-8000-00007a4de9bc";

    #[test]
    fn gpu_memory_names_the_need_the_best_free_and_the_holder() {
        let cap = capacity(&[80 * GIB], 8, &[]);
        let usage =
            Usage { gpu_exclusive: vec![false], gpu_memory_used: vec![65 * GIB], cpu: 1, counters: BTreeMap::new() };
        let holders =
            vec![(stage(JOB, "generate"), Grant { gpu_memory: Some((0, 65 * GIB)), cpu: 1, ..Default::default() })];
        let s = Situation {
            capacity: &cap,
            usage: &usage,
            foreign: &[0],
            available: &BTreeMap::new(),
            holders: &holders,
            pools: &[],
        };
        let needs = ResourceRequest { gpu_memory: 16 * GIB, cpu: 1, ..Default::default() };
        let r = explain(&needs, 3, &s);
        assert_eq!(r.sentence, "Needs 16 GiB of GPU memory, at most 15 GiB free; held by 7a4de9bc/generate");
        assert_eq!(r.blockers.len(), 1);
        assert_eq!(r.blockers[0].kind(), "gpu_memory");
    }

    #[test]
    fn free_resources_say_starting_or_how_many_go_first() {
        let cap = capacity(&[], 4, &[]);
        let usage = Usage { cpu: 1, ..Default::default() };
        let s = Situation {
            capacity: &cap,
            usage: &usage,
            foreign: &[],
            available: &BTreeMap::new(),
            holders: &[],
            pools: &[],
        };
        let needs = ResourceRequest { cpu: 2, ..Default::default() };
        assert_eq!(explain(&needs, 0, &s).blockers, vec![Blocker::Starting]);
        let r = explain(&needs, 2, &s);
        assert_eq!(r.blockers, vec![Blocker::Queue { ahead: 2 }]);
        assert_eq!(r.sentence, "Its resources are free; 2 earlier entries go first");
    }

    #[test]
    fn a_pool_without_ready_instances_says_it_crash_loops_with_the_last_error() {
        let cap = capacity(&[], 4, &[("pool:ocr", 2)]);
        let usage = Usage { counters: [("pool:ocr".to_string(), 0)].into(), ..Default::default() };
        let available = [("pool:ocr".to_string(), 0)].into();
        let pools = vec![PoolBrief {
            name: "ocr".into(),
            counter: "pool:ocr".into(),
            instances: 2,
            ready: 0,
            crash_looping: 2,
            failures: 6,
            last_error: Some("exited with status 1: ImportError: no module named paddle".into()),
        }];
        let s = Situation {
            capacity: &cap,
            usage: &usage,
            foreign: &[],
            available: &available,
            holders: &[],
            pools: &pools,
        };
        let needs = ResourceRequest { counters: [("pool:ocr".to_string(), 1)].into(), ..Default::default() };
        let r = explain(&needs, 0, &s);
        assert_eq!(r.blockers[0].kind(), "pool_crash_looping");
        assert_eq!(
            r.sentence,
            "Pool ocr has no ready instance: all 2 instances are crash-looping (6 failures in a row; last error: \
             exited with status 1: ImportError: no module named paddle)"
        );
        // The same pool with an instance still starting, and none failing, is not crash-looping.
        let starting = vec![PoolBrief { crash_looping: 0, failures: 0, last_error: None, ..pools[0].clone() }];
        let s = Situation { pools: &starting, ..s };
        assert_eq!(explain(&needs, 0, &s).blockers, vec![Blocker::PoolNotReady { pool: "ocr".into(), instances: 2 }]);
    }

    #[test]
    fn whole_gpus_cpu_and_counters_each_say_what_is_held_and_by_whom() {
        let cap = capacity(&[24 * GIB, 24 * GIB], 2, &[("license", 1)]);
        let usage = Usage {
            gpu_exclusive: vec![true, false],
            gpu_memory_used: vec![0, 0],
            cpu: 2,
            counters: [("license".to_string(), 1)].into(),
        };
        let holders = vec![
            (stage(JOB, "train"), Grant { gpus: vec![0], cpu: 1, ..Default::default() }),
            (Holder::PoolInstance { pool: "emb".into(), index: 0 }, Grant { cpu: 1, ..Default::default() }),
            (stage("x-aaaaaaaa", "lic"), Grant { counters: [("license".to_string(), 1)].into(), ..Default::default() }),
        ];
        let foreign = [0, GIB];
        let s = Situation {
            capacity: &cap,
            usage: &usage,
            foreign: &foreign,
            available: &BTreeMap::new(),
            holders: &holders,
            pools: &[],
        };
        let needs =
            ResourceRequest { gpus: 2, cpu: 1, counters: [("license".to_string(), 1)].into(), ..Default::default() };
        let r = explain(&needs, 5, &s);
        let kinds: Vec<&str> = r.blockers.iter().map(Blocker::kind).collect();
        assert_eq!(kinds, ["gpu", "cpu", "counter"]);
        assert_eq!(
            r.sentence,
            "Needs 2 GPUs, all 2 are held by 7a4de9bc/train. Needs 1 CPU slot, 2 of 2 held by 7a4de9bc/train, \
             pool emb #0. Needs 1 of counter license, 1 of 1 held by aaaaaaaa/lic"
        );
    }

    #[test]
    fn holders_past_three_are_counted_and_past_ten_not_listed() {
        let cap = capacity(&[], 20, &[]);
        let usage = Usage { cpu: 20, ..Default::default() };
        let holders: Vec<(Holder, Grant)> =
            (0..20).map(|i| (stage(&format!("job-{i:08}"), "s"), Grant { cpu: 1, ..Default::default() })).collect();
        let s = Situation {
            capacity: &cap,
            usage: &usage,
            foreign: &[],
            available: &BTreeMap::new(),
            holders: &holders,
            pools: &[],
        };
        let r = explain(&ResourceRequest { cpu: 1, ..Default::default() }, 0, &s);
        let Blocker::Cpu { held_by, held_by_count, .. } = &r.blockers[0] else { panic!("{r:?}") };
        assert_eq!((held_by.len(), *held_by_count), (HOLDERS_NAMED, 20));
        assert!(r.sentence.ends_with("00000002/s and 17 more"), "{}", r.sentence);
    }

    #[test]
    fn a_multi_line_error_reads_as_one_line() {
        let repeated =
            "instance exited with status 1; stderr ends with: ImportError: x\nImportError: x\nImportError: x";
        assert_eq!(one_line(repeated), "instance exited with status 1; stderr ends with: ImportError: x");
        let traceback = "exited with status 1; stderr ends with: Traceback (most recent call last):\n  File \"w.py\"\nKeyError: 'a'";
        assert_eq!(
            one_line(traceback),
            "exited with status 1; stderr ends with: Traceback (most recent call last): … KeyError: 'a'"
        );
        assert_eq!(one_line(&"x".repeat(300)).chars().count(), 200);
    }

    #[test]
    fn sizes_read_like_the_dashboard() {
        assert_eq!(bytes(16 * GIB), "16 GiB");
        assert_eq!(bytes(GIB + GIB / 2), "1.5 GiB");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(short_id("abc"), "abc");
        assert_eq!(dependency_sentence(&["a".into(), "b".into()]), "Waits for stages a, b to finish");
        assert_eq!(backoff_sentence(2, Some("2026-01-01T00:00:00Z")), "Failed twice; retries at 2026-01-01T00:00:00Z");
    }
}
