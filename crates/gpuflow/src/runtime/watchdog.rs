//! The watchdog: samples GPUs, reads `/proc`, and keeps diagnosis findings open while their
//! condition holds. The rules themselves are pure (`gpuflow_core::diagnosis`); this file only
//! gathers the observation and records what the rules say.

use std::collections::{HashMap, HashSet, VecDeque};

use gpuflow_core::diagnosis::{
    self, DeviceObs, Finding, FindingKind, HolderKind, HolderObs, Observation, ProcessObs, QueueObs,
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
}

#[derive(Default)]
pub(super) struct Watchdog {
    pub(super) devices: Vec<DeviceTrack>,
    /// pid -> (cpu ms, when it last grew)
    cpu: HashMap<u32, (u64, u64)>,
    /// pid -> first seen as a zombie
    zombies: HashMap<u32, u64>,
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
        let mut by_group: HashMap<u32, Vec<u32>> = HashMap::new();
        for (pid, p) in &procs {
            by_group.entry(p.pgrp).or_default().push(*pid);
        }
        // CPU time per process, and since when it has not grown.
        let mut cpu = HashMap::new();
        for (pid, p) in &procs {
            let since = match self.watchdog.cpu.get(pid) {
                Some((old, since)) if *old == p.cpu_ms => *since,
                _ => now,
            };
            cpu.insert(*pid, (p.cpu_ms, since));
        }
        self.watchdog.cpu = cpu;
        let process_obs = |pid: u32, cpu: &HashMap<u32, (u64, u64)>| {
            procs.get(&pid).map(|p| ProcessObs {
                pid,
                state: p.state,
                cpu_ms: p.cpu_ms,
                cpu_flat_ms: cpu.get(&pid).map(|(_, since)| now.saturating_sub(*since)).unwrap_or(0),
            })
        };
        let granted = |devices: &[u32]| -> String {
            devices.iter().map(|d| self.config.gpus[*d as usize].cuda_id(*d)).collect::<Vec<_>>().join(",")
        };
        let overrides = |pids: &[u32], expected: &str| -> Vec<(u32, String)> {
            pids.iter().filter_map(|p| cuda_visible(*p).filter(|v| v != expected).map(|v| (*p, v))).collect()
        };

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
                holders.push(HolderObs {
                    kind: HolderKind::WorkerTask,
                    holder: name,
                    since_ms: lease.attempt.started_at,
                    devices: vec![],
                    gpu_check: false,
                    pids: vec![],
                    main: None,
                    last_progress_ms: inst.as_ref().map(|i| i.last_beat_ms),
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
            let pid = self.processes.get(&key).and_then(|p| p.pid);
            let pids = pid.and_then(|p| by_group.get(&p).cloned()).unwrap_or_default();
            if *gpu_check == GpuCheck::Fail {
                fail_on_unused.insert(name.clone(), key);
            }
            holders.push(HolderObs {
                kind: HolderKind::Task,
                holder: name,
                since_ms: lease.attempt.started_at,
                gpu_check: *gpu_check != GpuCheck::Off,
                cuda_overrides: overrides(&pids, &granted(&devices)),
                devices,
                main: pid.and_then(|p| process_obs(p, &self.watchdog.cpu)),
                pids,
                last_progress_ms: None,
                providers: None,
                note: None,
                failures: 0,
            });
        }
        for (name, pool) in &self.pools {
            for inst in pool.instance_briefs() {
                let pids = inst.pid.and_then(|p| by_group.get(&p).cloned()).unwrap_or_default();
                holders.push(HolderObs {
                    kind: HolderKind::Instance,
                    holder: format!("pool {name} #{}", inst.index),
                    since_ms: inst.since_ms,
                    gpu_check: pool.gpu_check() != GpuCheck::Off,
                    cuda_overrides: overrides(&pids, &granted(&inst.devices)),
                    devices: inst.devices,
                    main: inst.pid.and_then(|p| process_obs(p, &self.watchdog.cpu)),
                    pids,
                    last_progress_ms: None,
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
        let foreign_of = |sample: &DeviceSample| -> Vec<(u32, u64, String)> {
            sample
                .processes
                .iter()
                .filter(|(pid, _)| !leased_pids.contains(pid))
                .map(|(pid, bytes)| {
                    let what = if descends_from_us(*pid) {
                        "started by this engine, holds no lease (a killed attempt still exiting?)"
                    } else if procs.contains_key(pid) {
                        "not started by this engine"
                    } else {
                        "not visible in /proc (another container or a process that just exited)"
                    };
                    (*pid, *bytes, what.to_string())
                })
                .collect()
        };
        let devices: Vec<DeviceObs> = self
            .watchdog
            .devices
            .iter()
            .enumerate()
            .map(|(i, t)| DeviceObs {
                index: i as u32,
                name: self.config.gpus.get(i).map(|g| g.name.clone()).unwrap_or_default(),
                telemetry: t.last.is_some(),
                utilization_pct: t.last.as_ref().map(|s| s.utilization_pct).unwrap_or(0),
                idle_ms: t.idle_since.map(|s| now.saturating_sub(s)).unwrap_or(0),
                memory_used: t.last.as_ref().map(|s| s.memory_used).unwrap_or(0),
                memory_total: self.config.gpus.get(i).map(|g| g.memory).unwrap_or(0),
                processes: t.last.as_ref().map(|s| s.processes.clone()).unwrap_or_default(),
                foreign: t.last.as_ref().map(&foreign_of).unwrap_or_default(),
            })
            .collect();
        let foreign_bytes: Vec<u64> = devices.iter().map(|d| d.foreign.iter().map(|(_, b, _)| b).sum()).collect();

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
                    Some(format!(
                        "job {}/{} attempt {} for {} s ({}) [{doing}]",
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

        let mut zombies = Vec::new();
        let mut seen = HashMap::new();
        for (pid, p) in procs.iter().filter(|(_, p)| p.ppid == me && p.state == 'Z') {
            let first = self.watchdog.zombies.get(pid).copied().unwrap_or(now);
            seen.insert(*pid, first);
            // tokio reaps its own children a moment after they exit: only a lasting zombie counts.
            if now.saturating_sub(first) >= 2_000 {
                zombies.push((*pid, p.comm.clone()));
            }
        }
        self.watchdog.zombies = seen;

        let observation = Observation { now_ms: now, holders, devices, queues, zombies, shm_bytes: shm_bytes() };
        for (device, bytes) in foreign_bytes.into_iter().enumerate() {
            if self.state.inventory().foreign().get(device) != Some(&bytes) {
                self.step(Event::GpuForeign { device: device as u32, bytes });
            }
        }
        let findings = diagnosis::evaluate(&observation, &self.config.diagnosis.thresholds);
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
        let mut current = HashSet::new();
        for f in findings {
            let key = (f.kind, f.subject.clone());
            current.insert(key.clone());
            match self.watchdog.open.get_mut(&key) {
                Some(open) => {
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
                    self.watchdog.open.insert(key, OpenFinding { id, opened_ms: now, finding: f, stored_ms: now });
                }
            }
        }
        let cleared: Vec<_> = self.watchdog.open.keys().filter(|k| !current.contains(*k)).cloned().collect();
        for key in cleared {
            let open = self.watchdog.open.remove(&key).expect("listed");
            self.store.update_finding(open.id, &open.finding, at).await?;
            self.store.close_finding(open.id, at).await?;
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
            open.push(OpenFinding { id: 0, opened_ms, finding, stored_ms: opened_ms });
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
