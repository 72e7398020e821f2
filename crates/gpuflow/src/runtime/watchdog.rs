//! The watchdog: samples GPUs, reads `/proc`, and keeps diagnosis findings open while their
//! condition holds. The rules themselves are pure (`gpuflow_core::diagnosis`); this file only
//! gathers the observation and records what the rules say.

use std::collections::{HashMap, HashSet, VecDeque};

use gpuflow_core::diagnosis::{
    self, DeviceObs, Finding, FindingKind, ForkObs, HolderKind, HolderObs, Observation, ProcessObs, QueueObs, ZombieObs,
};
use gpuflow_core::{ByteSize, Event, ResourceRequest};

use super::*;
use crate::config::{GpuCheck, StageExec};
use crate::gpu::DeviceSample;

/// Samples kept per device for the API.
const HISTORY: usize = 300;

#[derive(Default)]
pub(super) struct DeviceTrack {
    last: Option<DeviceSample>,
    idle_since: Option<u64>,
    pub(super) history: VecDeque<(u64, u32, u64)>,
}

impl DeviceTrack {
    pub(super) fn latest(&self) -> Option<&DeviceSample> {
        self.last.as_ref()
    }
}

/// A finding while it is open.
#[derive(Clone, Debug)]
pub struct OpenFinding {
    pub id: i64,
    pub opened_ms: u64,
    pub finding: Finding,
    stored_ms: u64,
    /// Since when its condition has been clear; it closes once clear for `finding_clear`.
    pub clear_since: Option<u64>,
}

/// A holder's process tree's CPU time, kept cumulative: a process that exits keeps what it
/// used, so the series never drops when a busy child ends.
#[derive(Default)]
struct TreeCpu {
    per_pid: HashMap<u32, u64>,
    total: u64,
    samples: VecDeque<(u64, u64)>,
}

impl TreeCpu {
    fn update(&mut self, now: u64, tree: &[u32], procs: &HashMap<u32, Proc>, keep_ms: u64) {
        let first = self.samples.is_empty();
        let mut per_pid = HashMap::with_capacity(tree.len());
        for pid in tree {
            let Some(p) = procs.get(pid) else { continue };
            // A process seen for the first time in a known tree was forked since the last
            // sample: all its CPU time is new.
            let before = self.per_pid.get(pid).copied().unwrap_or(if first { p.cpu_ms } else { 0 });
            self.total += p.cpu_ms.saturating_sub(before);
            per_pid.insert(*pid, p.cpu_ms);
        }
        self.per_pid = per_pid;
        self.samples.push_back((now, self.total));
        // Keep one sample at or before the window's start, and nothing older.
        while self.samples.len() > 2 && self.samples[1].0 <= now.saturating_sub(keep_ms) {
            self.samples.pop_front();
        }
    }
}

#[derive(Default)]
pub(super) struct Watchdog {
    pub(super) devices: Vec<DeviceTrack>,
    /// holder -> its process tree's CPU time
    trees: HashMap<String, TreeCpu>,
    /// pid -> first seen as a zombie
    zombies: HashMap<u32, u64>,
    /// pid -> (its parent, its executable, the driver mapping it shares with its parent): a
    /// verdict holds until the process execs or is re-parented.
    forks: HashMap<u32, (u32, Option<std::path::PathBuf>, Option<String>)>,
    /// Leftovers killed for holding GPU memory, and whose they were: they count as orphaned
    /// (not foreign) until the device stops listing them, dead or not.
    reclaimed: HashMap<u32, String>,
    pub(super) open: HashMap<(FindingKind, String), OpenFinding>,
    /// pipeline -> when anything of it last started
    pub(super) last_start: HashMap<String, u64>,
    /// attempts already stopped by `gpu_check: fail`
    stopped: HashSet<AttemptKey>,
}

struct Proc {
    ppid: u32,
    pgrp: u32,
    state: char,
    cpu_ms: u64,
    comm: String,
}

/// `(pid, bytes, what it is)` of GPU memory held outside any lease.
type Held = (u32, u64, String);

/// One pass over `/proc/*/stat`.
fn scan_proc() -> HashMap<u32, Proc> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // The command name is in parentheses and may contain spaces: split at the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let comm = stat[open + 1..close].to_string();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if fields.len() < 13 {
            continue;
        }
        let num = |i: usize| fields[i].parse::<u64>().unwrap_or(0);
        out.insert(
            pid,
            Proc {
                state: fields[0].chars().next().unwrap_or('?'),
                ppid: num(1) as u32,
                pgrp: num(2) as u32,
                cpu_ms: (num(11) + num(12)) * 1000 / ticks,
                comm,
            },
        );
    }
    out
}

/// Whether a mapped file is the NVIDIA driver: its user-space library, or one of its device
/// files. Matched by name, so a test can stand in a file called `libcuda.so.1`.
fn is_driver(path: &str) -> bool {
    path.starts_with("/dev/nvidia")
        || std::path::Path::new(path).file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libcuda.so"))
}

/// `(start address, path)` of a process's mappings of the NVIDIA driver.
fn driver_mappings(pid: u32) -> Vec<(String, String)> {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else { return Vec::new() };
    maps.lines()
        .filter_map(|line| {
            let parts: Vec<&str> = line.split_whitespace().collect();
            let path = parts.get(5..)?.join(" ");
            is_driver(&path).then(|| (parts[0].split('-').next().unwrap_or_default().to_string(), path))
        })
        .collect()
}

/// The driver mapping a child shares with its parent at the same address, if the child runs
/// the parent's executable: it was forked after the driver was loaded and never exec'd (an
/// exec maps libraries anew, at other addresses).
fn forked_after_driver(child: u32, parent: u32, child_exe: &Option<std::path::PathBuf>) -> Option<String> {
    let parent_exe = std::fs::read_link(format!("/proc/{parent}/exe")).ok();
    if child_exe.is_none() || *child_exe != parent_exe {
        return None;
    }
    let parent_maps = driver_mappings(parent);
    if parent_maps.is_empty() {
        return None;
    }
    driver_mappings(child).into_iter().find(|m| parent_maps.contains(m)).map(|(_, path)| path)
}

fn cuda_visible(pid: u32) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0)
        .find_map(|var| var.strip_prefix(b"CUDA_VISIBLE_DEVICES=").map(|v| String::from_utf8_lossy(v).into_owned()))
}

fn shm_bytes() -> Option<u64> {
    let path = std::ffi::CString::new("/dev/shm").ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a zeroed out-struct of the right type.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_blocks as u64 * st.f_frsize as u64)
}

/// An attempt marker (`JOB/STAGE/ATTEMPT` or `worker/POOL/INDEX/GENERATION`) in words.
fn marker_words(marker: &str) -> String {
    if let Some(rest) = marker.strip_prefix("worker/") {
        let parts: Vec<&str> = rest.rsplitn(3, '/').collect();
        if let [generation, index, pool] = parts[..] {
            return format!("pool {pool} #{index} (a replaced instance, generation {generation})");
        }
    }
    let parts: Vec<&str> = marker.rsplitn(3, '/').collect();
    match parts[..] {
        [attempt, stage, job] => format!("job {job}/{stage} attempt {attempt}, which has ended"),
        _ => marker.to_string(),
    }
}

/// A progress report in words: its message and, if given, the fraction done.
fn progress_words(p: &super::StageProgress) -> Option<String> {
    let message = p.message.as_deref().filter(|m| !m.is_empty());
    let fraction = p.fraction.map(|f| format!("{:.0} % done", f * 100.0));
    match (message, fraction) {
        (Some(m), Some(f)) => Some(format!("{m} ({f})")),
        (Some(m), None) => Some(m.to_string()),
        (None, f) => f,
    }
}

pub fn describe_needs(n: &ResourceRequest) -> String {
    let mut parts = Vec::new();
    if n.gpus > 0 {
        parts.push(format!("{} whole GPU(s)", n.gpus));
    }
    if n.gpu_memory > 0 {
        parts.push(format!("{} of GPU memory", ByteSize(n.gpu_memory)));
    }
    if n.cpu > 0 {
        parts.push(format!("{} CPU slot(s)", n.cpu));
    }
    for (k, v) in &n.counters {
        match k.strip_prefix("pool:") {
            Some(pool) => parts.push(format!("an instance of pool {pool}")),
            None => parts.push(format!("{v} {k}")),
        }
    }
    if parts.is_empty() { "nothing".into() } else { parts.join(", ") }
}

impl<S: Store> Runtime<S> {
    pub(super) fn on_gpu_samples(&mut self, samples: Vec<Option<DeviceSample>>, at: u64) {
        let idle_pct = self.config.diagnosis.thresholds.idle_utilization_pct;
        let tracks = &mut self.watchdog.devices;
        tracks.resize_with(samples.len(), DeviceTrack::default);
        for (track, sample) in tracks.iter_mut().zip(samples) {
            match &sample {
                Some(s) => {
                    if s.utilization_pct <= idle_pct {
                        track.idle_since.get_or_insert(at);
                    } else {
                        track.idle_since = None;
                    }
                    track.history.push_back((at, s.utilization_pct, s.memory_used));
                    if track.history.len() > HISTORY {
                        track.history.pop_front();
                    }
                }
                None => track.idle_since = None,
            }
            track.last = sample;
        }
    }

    /// One watchdog pass: observe, evaluate, open and close findings, apply `gpu_check: fail`.
    pub(super) async fn diagnose(&mut self) -> Result<(), RuntimeError> {
        let now = self.clock.now_ms();
        let procs = scan_proc();
        let me = std::process::id();
        let th = self.config.diagnosis.thresholds.clone();
        let mut by_group: HashMap<u32, Vec<u32>> = HashMap::new();
        let mut kids: HashMap<u32, Vec<u32>> = HashMap::new();
        for (pid, p) in &procs {
            by_group.entry(p.pgrp).or_default().push(*pid);
            kids.entry(p.ppid).or_default().push(*pid);
        }
        // A holder's tree: its process group, plus every descendant of its main process (a
        // child that started a new session or group is still its child).
        let tree_of = |main: u32| -> Vec<u32> {
            let mut seen: HashSet<u32> = HashSet::new();
            let mut out = Vec::new();
            let mut stack: Vec<u32> = by_group.get(&main).cloned().unwrap_or_default();
            stack.push(main);
            while let Some(pid) = stack.pop() {
                if !procs.contains_key(&pid) || !seen.insert(pid) {
                    continue;
                }
                out.push(pid);
                stack.extend(kids.get(&pid).into_iter().flatten().copied());
            }
            out.sort_unstable();
            out
        };
        let process_obs = |pid: u32| procs.get(&pid).map(|p| ProcessObs { pid, state: p.state, cpu_ms: p.cpu_ms });
        let children_of = |main: u32, tree: &[u32]| -> Vec<(u32, String, char)> {
            tree.iter()
                .filter(|p| **p != main)
                .filter_map(|p| procs.get(p).map(|x| (*p, x.comm.clone(), x.state)))
                .collect()
        };
        let granted = |devices: &[u32]| -> String {
            devices.iter().map(|d| self.config.gpus[*d as usize].cuda_id(*d)).collect::<Vec<_>>().join(",")
        };
        let overrides = |pids: &[u32], expected: &str| -> Vec<(u32, String)> {
            pids.iter().filter_map(|p| cuda_visible(*p).filter(|v| v != expected).map(|v| (*p, v))).collect()
        };

        // Every process tree we own, by holder: command attempts and pool instances.
        let mut trees: Vec<(String, Option<u32>, Vec<u32>)> = Vec::new();
        for lease in self.state.leases() {
            let key = (lease.job, lease.stage, lease.attempt.attempt);
            let Some(active) = self.jobs.get(&lease.job) else { continue };
            if self.worker_tasks.contains_key(&key) {
                continue;
            }
            let pid = self.processes.get(&key).and_then(|p| p.pid);
            let name = format!(
                "job {}/{} attempt {}",
                active.id(),
                lease.pipeline.stages[lease.stage].name,
                lease.attempt.attempt
            );
            trees.push((name, pid, pid.map(&tree_of).unwrap_or_default()));
        }
        for (name, pool) in &self.pools {
            for inst in pool.instance_briefs() {
                let holder = format!("pool {name} #{}", inst.index);
                trees.push((holder, inst.pid, inst.pid.map(&tree_of).unwrap_or_default()));
            }
        }
        // Keep one sample before the stall window and a little slack.
        let keep_ms = th.task_stall_ms + 2 * self.config.diagnosis.sample_interval_ms;
        let mut cpu_trees = std::mem::take(&mut self.watchdog.trees);
        let mut kept = HashMap::new();
        for (name, _, tree) in &trees {
            let mut t = cpu_trees.remove(name).unwrap_or_default();
            t.update(now, tree, &procs, keep_ms);
            kept.insert(name.clone(), t);
        }
        self.watchdog.trees = kept;
        let cpu_samples = |name: &str| -> Vec<(u64, u64)> {
            self.watchdog.trees.get(name).map(|t| t.samples.iter().copied().collect()).unwrap_or_default()
        };
        // Children forked after their parent loaded the driver, per tree.
        let mut fork_cache = std::mem::take(&mut self.watchdog.forks);
        let mut forks_kept = HashMap::new();
        let mut forks_of: HashMap<&str, Vec<ForkObs>> = HashMap::new();
        for (name, _, tree) in &trees {
            for pid in tree {
                let Some(p) = procs.get(pid) else { continue };
                if p.state == 'Z' || !tree.contains(&p.ppid) {
                    continue;
                }
                let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
                let marker = match fork_cache.remove(pid) {
                    Some((ppid, old_exe, marker)) if ppid == p.ppid && old_exe == exe => marker,
                    _ => forked_after_driver(*pid, p.ppid, &exe),
                };
                if let Some(marker) = &marker {
                    forks_of.entry(name.as_str()).or_default().push(ForkObs {
                        child: *pid,
                        child_command: p.comm.clone(),
                        child_state: p.state,
                        parent: p.ppid,
                        parent_command: procs.get(&p.ppid).map(|x| x.comm.clone()).unwrap_or_default(),
                        marker: marker.clone(),
                    });
                }
                forks_kept.insert(*pid, (p.ppid, exe, marker));
            }
        }
        self.watchdog.forks = forks_kept;
        let tree_by_name: HashMap<&str, (Option<u32>, &Vec<u32>)> =
            trees.iter().map(|(n, pid, t)| (n.as_str(), (*pid, t))).collect();

        let board = self.journal.progress();
        let mut holders = Vec::new();
        let mut fail_on_unused: HashMap<String, AttemptKey> = HashMap::new();
        for lease in self.state.leases() {
            let key = (lease.job, lease.stage, lease.attempt.attempt);
            let Some(active) = self.jobs.get(&lease.job) else { continue };
            let name = format!(
                "job {}/{} attempt {}",
                active.id(),
                lease.pipeline.stages[lease.stage].name,
                lease.attempt.attempt
            );
            let devices = lease.attempt.grant.devices();
            if let Some((pool, index)) = self.worker_tasks.get(&key) {
                let inst = self.pools.get(pool).map(|p| p.instance_brief(*index));
                let inst_name = format!("pool {pool} #{index}");
                let empty = Vec::new();
                let (main, tree) = tree_by_name.get(inst_name.as_str()).copied().unwrap_or((None, &empty));
                holders.push(HolderObs {
                    kind: HolderKind::WorkerTask,
                    holder: name,
                    since_ms: lease.attempt.started_at,
                    devices: vec![],
                    gpu_check: false,
                    pids: vec![],
                    main: main.and_then(process_obs),
                    last_progress_ms: inst.as_ref().map(|i| i.last_beat_ms),
                    cpu_samples: cpu_samples(&inst_name),
                    progress: board.get(&key).and_then(|p| progress_words(&p)),
                    children: main.map(|m| children_of(m, tree)).unwrap_or_default(),
                    // Reported once, on the instance that owns the tree.
                    forked_after_cuda: vec![],
                    providers: None,
                    cuda_overrides: vec![],
                    note: inst.map(|i| {
                        format!("on pool {pool} #{index} (pid {})", i.pid.map(|p| p.to_string()).unwrap_or("-".into()))
                    }),
                    failures: 0,
                });
                continue;
            }
            let StageExec::Command { gpu_check, .. } = &active.pipeline.stages[lease.stage] else { continue };
            let (pid, pids) = tree_by_name.get(name.as_str()).map(|(p, t)| (*p, (*t).clone())).unwrap_or_default();
            if *gpu_check == GpuCheck::Fail {
                fail_on_unused.insert(name.clone(), key);
            }
            holders.push(HolderObs {
                kind: HolderKind::Task,
                since_ms: lease.attempt.started_at,
                gpu_check: *gpu_check != GpuCheck::Off,
                cuda_overrides: overrides(&pids, &granted(&devices)),
                devices,
                main: pid.and_then(process_obs),
                children: pid.map(|m| children_of(m, &pids)).unwrap_or_default(),
                cpu_samples: cpu_samples(&name),
                forked_after_cuda: forks_of.remove(name.as_str()).unwrap_or_default(),
                holder: name,
                pids,
                // A command stage that writes to $GPUFLOW_PROGRESS reports progress too.
                last_progress_ms: board.get(&key).map(|p| p.at_ms),
                progress: board.get(&key).and_then(|p| progress_words(&p)),
                providers: None,
                note: None,
                failures: 0,
            });
        }
        for (name, pool) in &self.pools {
            for inst in pool.instance_briefs() {
                let holder = format!("pool {name} #{}", inst.index);
                let pids = tree_by_name.get(holder.as_str()).map(|(_, t)| (*t).clone()).unwrap_or_default();
                holders.push(HolderObs {
                    kind: HolderKind::Instance,
                    since_ms: inst.since_ms,
                    gpu_check: pool.gpu_check() != GpuCheck::Off,
                    cuda_overrides: overrides(&pids, &granted(&inst.devices)),
                    devices: inst.devices,
                    main: inst.pid.and_then(process_obs),
                    children: vec![],
                    cpu_samples: vec![],
                    forked_after_cuda: forks_of.remove(holder.as_str()).unwrap_or_default(),
                    holder,
                    pids,
                    last_progress_ms: None,
                    progress: None,
                    providers: inst.providers,
                    note: inst.last_error,
                    failures: inst.failures,
                });
            }
        }

        // GPU memory of processes that hold no lease is kept out of the inventory, so it is
        // never double-booked: a killed attempt's memory is handed on only once it is gone.
        let leased_pids: HashSet<u32> = holders.iter().flat_map(|h| h.pids.iter().copied()).collect();
        let descends_from_us = |mut pid: u32| {
            for _ in 0..64 {
                match procs.get(&pid) {
                    Some(p) if p.ppid == me => return true,
                    Some(p) if p.ppid > 1 => pid = p.ppid,
                    _ => return false,
                }
            }
            false
        };
        // Markers of every live attempt and instance: a process with our engine marker and
        // none of these is a leftover, whatever its parent.
        let mut live_markers: HashSet<String> = HashSet::new();
        for lease in self.state.leases() {
            if let Some(active) = self.jobs.get(&lease.job) {
                let stage = &lease.pipeline.stages[lease.stage].name;
                live_markers.insert(format!("{}/{stage}/{}", active.id(), lease.attempt.attempt));
            }
        }
        for (name, pool) in &self.pools {
            for inst in pool.instance_briefs() {
                live_markers.insert(format!("worker/{name}/{}/{}", inst.index, inst.generation));
            }
        }
        let engine_entry = format!("{}={}", crate::supervisor::ENGINE_MARKER, self.engine_marker);
        // Whose leftover a process is, if it carries our engine marker and no live marker.
        let leftover_of = |pid: u32| -> Option<String> {
            let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
            if !vars.contains(&engine_entry.as_bytes()) {
                return None;
            }
            let prefix = format!("{}=", crate::supervisor::ATTEMPT_MARKER);
            let attempt = vars
                .iter()
                .find_map(|v| v.strip_prefix(prefix.as_bytes()))
                .map(|m| String::from_utf8_lossy(m).into_owned());
            match attempt {
                Some(m) if live_markers.contains(&m) => None,
                Some(m) => Some(marker_words(&m)),
                None => Some("a process of this engine".into()),
            }
        };
        let reclaimed = std::mem::take(&mut self.watchdog.reclaimed);
        // (pid, group, whose, whether it carries our marker now and so may be killed)
        let mut orphans: Vec<(u32, u32, String, bool)> = Vec::new();
        let mut classify = |sample: &DeviceSample| -> (Vec<Held>, Vec<Held>) {
            let (mut foreign, mut orphaned) = (Vec::new(), Vec::new());
            for (pid, bytes) in sample.processes.iter().filter(|(pid, _)| !leased_pids.contains(pid)) {
                let marked = leftover_of(*pid);
                let live = marked.is_some();
                if let Some(whose) = marked.or_else(|| reclaimed.get(pid).cloned()) {
                    orphans.push((*pid, procs.get(pid).map(|p| p.pgrp).unwrap_or(0), whose.clone(), live));
                    orphaned.push((*pid, *bytes, whose));
                    continue;
                }
                let what = if descends_from_us(*pid) {
                    "started by this engine, holds no lease (a killed attempt still exiting?)"
                } else if procs.contains_key(pid) {
                    "not started by this engine"
                } else {
                    "not visible in /proc (another container or a process that just exited)"
                };
                foreign.push((*pid, *bytes, what.to_string()));
            }
            (foreign, orphaned)
        };
        let devices: Vec<DeviceObs> = self
            .watchdog
            .devices
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let (foreign, orphaned) = t.last.as_ref().map(&mut classify).unwrap_or_default();
                DeviceObs {
                    index: i as u32,
                    name: self.config.gpus.get(i).map(|g| g.name.clone()).unwrap_or_default(),
                    telemetry: t.last.is_some(),
                    utilization_pct: t.last.as_ref().map(|s| s.utilization_pct).unwrap_or(0),
                    idle_ms: t.idle_since.map(|s| now.saturating_sub(s)).unwrap_or(0),
                    memory_used: t.last.as_ref().map(|s| s.memory_used).unwrap_or(0),
                    memory_total: self.config.gpus.get(i).map(|g| g.memory).unwrap_or(0),
                    processes: t.last.as_ref().map(|s| s.processes.clone()).unwrap_or_default(),
                    foreign,
                    orphaned,
                }
            })
            .collect();
        // Reclaim: kill each leftover's process group (never our own) and the process itself.
        let own_group = nix::unistd::getpgrp().as_raw() as u32;
        for (pid, pgrp, whose, marked) in orphans {
            if !reclaimed.contains_key(&pid) {
                tracing::warn!(pid, pgrp, "killing a leftover of {whose} that still holds GPU memory");
            }
            // Only while it carries our marker: a dead leftover's pid may be reused by another.
            if marked {
                if pgrp > 1 && pgrp != own_group {
                    crate::supervisor::kill_group(pgrp as i32, nix::sys::signal::Signal::SIGKILL);
                }
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            }
            self.watchdog.reclaimed.insert(pid, whose);
        }
        // Memory held outside any lease (foreign or orphaned) stays out of the inventory.
        let foreign_bytes: Vec<u64> =
            devices.iter().map(|d| d.foreign.iter().chain(&d.orphaned).map(|(_, b, _)| b).sum()).collect();

        let mut queues: Vec<QueueObs> = Vec::new();
        for w in self.state.waiting() {
            let Some(active) = self.jobs.get(&w.job) else { continue };
            if let Some(q) = queues.iter_mut().find(|q| *q.pipeline == *active.pipeline_name) {
                q.waiting += 1;
                continue;
            }
            let needs = &w.pipeline.stages[w.stage].needs;
            let started = self.watchdog.last_start.get(&*active.pipeline_name).copied().unwrap_or(0);
            let blockers = self
                .state
                .leases()
                .filter(|l| {
                    let g = &l.attempt.grant;
                    (needs.uses_gpu() && !g.devices().is_empty())
                        || (needs.cpu > 0 && g.cpu > 0)
                        || needs.counters.keys().any(|k| g.counters.contains_key(k))
                })
                .filter_map(|l| {
                    let holder = self.jobs.get(&l.job)?;
                    let pid = self.processes.get(&(l.job, l.stage, l.attempt.attempt)).and_then(|p| p.pid);
                    let doing = pid
                        .and_then(|p| procs.get(&p))
                        .map(|p| format!("pid {}, state {}", pid.unwrap_or(0), p.state))
                        .unwrap_or_default();
                    let doing = if doing.is_empty() { String::new() } else { format!(" [{doing}]") };
                    Some(format!(
                        "job {}/{} attempt {} for {} s ({}){doing}",
                        holder.id(),
                        l.pipeline.stages[l.stage].name,
                        l.attempt.attempt,
                        now.saturating_sub(l.attempt.started_at) / 1000,
                        describe_needs(&l.pipeline.stages[l.stage].needs)
                    ))
                })
                .take(5)
                .collect();
            let pool_problem = needs
                .counters
                .keys()
                .find_map(|k| k.strip_prefix("pool:"))
                .and_then(|pool| self.pools.get(pool).and_then(|p| p.problem(pool)));
            queues.push(QueueObs {
                pipeline: active.pipeline_name.to_string(),
                waiting: 1,
                head: format!("job {}/{}", active.id(), w.pipeline.stages[w.stage].name),
                head_needs: describe_needs(needs),
                head_waited_ms: now.saturating_sub(w.since),
                idle_ms: now.saturating_sub(started.max(w.since)),
                blockers,
                pool_problem,
            });
        }

        // Defunct processes anywhere in our trees, and direct children of the engine (orphans
        // it inherited as subreaper are reaped at once; one that lasts is a bug to see).
        let owner_of: HashMap<u32, &str> =
            trees.iter().flat_map(|(n, _, t)| t.iter().map(move |p| (*p, n.as_str()))).collect();
        let mut zombies = Vec::new();
        let mut seen = HashMap::new();
        for (pid, p) in procs.iter().filter(|(_, p)| p.state == 'Z') {
            let owner = owner_of.get(pid).map(|o| o.to_string());
            if owner.is_none() && p.ppid != me {
                continue;
            }
            let first = self.watchdog.zombies.get(pid).copied().unwrap_or(now);
            seen.insert(*pid, first);
            let parent = procs.get(&p.ppid);
            zombies.push(ZombieObs {
                pid: *pid,
                command: p.comm.clone(),
                ppid: p.ppid,
                parent_command: if p.ppid == me {
                    "gpuflow".into()
                } else {
                    parent.map(|x| x.comm.clone()).unwrap_or_default()
                },
                parent_state: parent.map(|x| x.state).unwrap_or('?'),
                owner,
                defunct_ms: now.saturating_sub(first),
            });
        }
        self.watchdog.zombies = seen;

        let observation = Observation { now_ms: now, holders, devices, queues, zombies, shm_bytes: shm_bytes() };
        for (device, bytes) in foreign_bytes.into_iter().enumerate() {
            if self.state.inventory().foreign().get(device) != Some(&bytes) {
                self.step(Event::GpuForeign { device: device as u32, bytes });
            }
        }
        let findings = diagnosis::evaluate(&observation, &th);
        self.record_findings(findings.clone(), now).await?;

        for f in findings.iter().filter(|f| f.kind == FindingKind::GpuUnused) {
            if let Some(key) = fail_on_unused.get(&f.subject)
                && self.watchdog.stopped.insert(*key)
            {
                let (job, stage, attempt) = *key;
                let error = format!("gpu_check: fail: {}", f.summary);
                self.step(Event::StopAttempt { job, stage, attempt, error });
            }
        }
        self.watchdog.stopped.retain(|k| self.processes.contains_key(k));
        Ok(())
    }

    async fn record_findings(&mut self, findings: Vec<Finding>, now: u64) -> Result<(), RuntimeError> {
        let at = now as i64;
        let clear_ms = self.config.diagnosis.thresholds.finding_clear_ms;
        let mut current = HashSet::new();
        for f in findings {
            let key = (f.kind, f.subject.clone());
            current.insert(key.clone());
            match self.watchdog.open.get_mut(&key) {
                Some(open) => {
                    open.clear_since = None;
                    // Evidence changes every second; the store gets it every 30 s and at close.
                    if now.saturating_sub(open.stored_ms) >= 30_000 {
                        self.store.update_finding(open.id, &f, at).await?;
                        open.stored_ms = now;
                    }
                    open.finding = f;
                }
                None => {
                    tracing::warn!(kind = f.kind.as_str(), "finding: {}", f.summary);
                    self.metrics.finding_opened(f.kind.as_str());
                    let id = self.store.open_finding(&f, at).await?;
                    self.watchdog
                        .open
                        .insert(key, OpenFinding { id, opened_ms: now, finding: f, stored_ms: now, clear_since: None });
                }
            }
        }
        // Hysteresis: a finding closes only once its condition has stayed clear for
        // `finding_clear`; it is recorded as closed when the condition was first seen clear.
        let mut cleared = Vec::new();
        for (key, open) in self.watchdog.open.iter_mut().filter(|(k, _)| !current.contains(*k)) {
            let since = *open.clear_since.get_or_insert(now);
            if now.saturating_sub(since) >= clear_ms {
                cleared.push(key.clone());
            }
        }
        for key in cleared {
            let open = self.watchdog.open.remove(&key).expect("listed");
            let closed_at = open.clear_since.unwrap_or(now) as i64;
            self.store.update_finding(open.id, &open.finding, closed_at).await?;
            self.store.close_finding(open.id, closed_at).await?;
            tracing::info!(kind = key.0.as_str(), "cleared: {}", open.finding.summary);
        }
        Ok(())
    }

    /// Open findings (newest first) and device readings, for the API.
    pub(super) fn diagnosis_snapshot(&self) -> super::commands::DiagnosisSnapshot {
        let now = self.clock.now_ms();
        let mut open: Vec<OpenFinding> = self.watchdog.open.values().cloned().collect();
        // Not stored while the store cannot be written; recorded once it can.
        if let Some((opened_ms, finding)) = self.stall_finding() {
            open.push(OpenFinding { id: 0, opened_ms, finding, stored_ms: opened_ms, clear_since: None });
        }
        open.sort_by_key(|f| std::cmp::Reverse(f.opened_ms));
        let devices = self
            .config
            .gpus
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let track = self.watchdog.devices.get(i);
                super::commands::DeviceReading {
                    index: i as u32,
                    name: g.name.clone(),
                    source: g.source,
                    memory_total: g.memory,
                    sample: track.and_then(|t| t.last.clone()),
                    idle_ms: track.and_then(|t| t.idle_since).map(|s| now.saturating_sub(s)).unwrap_or(0),
                    history: track
                        .map(|t| t.history.iter().rev().take(120).rev().copied().collect())
                        .unwrap_or_default(),
                }
            })
            .collect();
        super::commands::DiagnosisSnapshot { now_ms: now, open, devices }
    }

    pub(super) fn note_start(&mut self, job: JobId) {
        if let Some(active) = self.jobs.get(&job) {
            self.watchdog.last_start.insert(active.pipeline_name.to_string(), self.clock.now_ms());
        }
    }
}
