//! Stall and GPU-truth diagnosis as pure rules: an `Observation` of what the engine holds and
//! what the machine shows goes in, `Finding`s come out. The runtime gathers the observation
//! (from `/proc` and NVML) and keeps findings open while their condition holds.

use std::fmt::Write as _;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FindingKind {
    /// A running task makes no progress: no CPU time and no heartbeat.
    TaskStalled,
    /// A holder granted a GPU never shows up on it.
    GpuUnused,
    /// A device under lease sits at about 0 % utilisation.
    GpuIdleUnderLease,
    /// Work waits and nothing has started for a while.
    QueueStalled,
    /// A defunct process under the engine.
    ZombieProcess,
    /// `/dev/shm` is too small for DataLoader-style workers.
    SharedMemorySmall,
    /// A process of a holder sees other devices than it was granted.
    CudaDevicesOverridden,
    /// A pool instance keeps failing (crash, hang, protocol error).
    WorkerUnhealthy,
    /// GPU memory held by a process that holds no lease: kept out of the inventory.
    GpuMemoryForeign,
    /// The engine's store cannot be written (full or failing disk); admission is refused.
    StoreUnwritable,
}

impl FindingKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::TaskStalled => "task_stalled",
            FindingKind::GpuUnused => "gpu_unused",
            FindingKind::GpuIdleUnderLease => "gpu_idle_under_lease",
            FindingKind::QueueStalled => "queue_stalled",
            FindingKind::ZombieProcess => "zombie_process",
            FindingKind::SharedMemorySmall => "shm_too_small",
            FindingKind::CudaDevicesOverridden => "cuda_visible_devices_overridden",
            FindingKind::WorkerUnhealthy => "worker_unhealthy",
            FindingKind::GpuMemoryForeign => "gpu_memory_foreign",
            FindingKind::StoreUnwritable => "store_unwritable",
        }
    }

    pub const ALL: [FindingKind; 10] = [
        FindingKind::GpuMemoryForeign,
        FindingKind::TaskStalled,
        FindingKind::GpuUnused,
        FindingKind::GpuIdleUnderLease,
        FindingKind::QueueStalled,
        FindingKind::ZombieProcess,
        FindingKind::SharedMemorySmall,
        FindingKind::CudaDevicesOverridden,
        FindingKind::WorkerUnhealthy,
        FindingKind::StoreUnwritable,
    ];
}

/// One problem, with what shows it, what likely causes it and what to do.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub kind: FindingKind,
    /// Stable key of what it is about (a holder, a device, a pipeline): a finding stays the
    /// same finding while its condition holds.
    pub subject: String,
    pub summary: String,
    pub evidence: Vec<(String, String)>,
    pub cause: String,
    pub fix: String,
}

#[derive(Clone, Debug)]
pub struct Thresholds {
    pub task_stall_ms: u64,
    pub gpu_idle_ms: u64,
    pub queue_stall_ms: u64,
    pub gpu_use_window_ms: u64,
    pub shm_min_bytes: u64,
    /// At or below this utilisation a device counts as idle.
    pub idle_utilization_pct: u32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            task_stall_ms: 60_000,
            gpu_idle_ms: 120_000,
            queue_stall_ms: 60_000,
            gpu_use_window_ms: 30_000,
            shm_min_bytes: 512 << 20,
            idle_utilization_pct: 2,
        }
    }
}

/// What `/proc` says about a process.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessObs {
    pub pid: u32,
    /// R running, S sleeping, D uninterruptible (usually IO or a driver), Z zombie, T stopped.
    pub state: char,
    pub cpu_ms: u64,
    /// How long its CPU time has not grown.
    pub cpu_flat_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HolderKind {
    /// A command stage's attempt.
    Task,
    /// A task running on a pool instance.
    WorkerTask,
    /// A pool instance (holds its resources for its lifetime).
    Instance,
}

/// Something that holds a lease now.
#[derive(Clone, Debug, PartialEq)]
pub struct HolderObs {
    pub kind: HolderKind,
    /// Human name, e.g. `job 01a2…/detect attempt 1` or `pool ocr #0`.
    pub holder: String,
    pub since_ms: u64,
    pub devices: Vec<u32>,
    /// Whether it is expected to use its GPU (`gpu_check` not `off`).
    pub gpu_check: bool,
    /// All its processes (the main one and its descendants).
    pub pids: Vec<u32>,
    pub main: Option<ProcessObs>,
    /// Last heartbeat or progress (worker tasks).
    pub last_progress_ms: Option<u64>,
    /// Execution providers a worker reported in `ready`.
    pub providers: Option<Vec<String>>,
    /// `(pid, value)` of its processes whose `CUDA_VISIBLE_DEVICES` differs from the grant.
    pub cuda_overrides: Vec<(u32, String)>,
    /// What it is doing, for evidence (e.g. a pool instance's last error).
    pub note: Option<String>,
    /// Consecutive failures (pool instances).
    pub failures: u32,
}

/// One device as last sampled.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceObs {
    pub index: u32,
    pub name: String,
    /// False for a virtual device without telemetry: nothing can be said about it.
    pub telemetry: bool,
    pub utilization_pct: u32,
    /// How long utilisation has stayed at or below the idle level.
    pub idle_ms: u64,
    pub memory_used: u64,
    pub memory_total: u64,
    /// `(pid, bytes)` of processes using it.
    pub processes: Vec<(u32, u64)>,
    /// `(pid, bytes, what it is)` of those that hold no lease (e.g. "a killed attempt of
    /// ours", "not started by gpuflow").
    pub foreign: Vec<(u32, u64, String)>,
}

/// A pipeline's waiting work.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueObs {
    pub pipeline: String,
    pub waiting: usize,
    pub head: String,
    pub head_needs: String,
    pub head_waited_ms: u64,
    /// Since anything of this pipeline last started (or since the head queued).
    pub idle_ms: u64,
    /// Who holds what the head needs.
    pub blockers: Vec<String>,
    /// Why the head's pool cannot take it, if it runs on one.
    pub pool_problem: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observation {
    pub now_ms: u64,
    pub holders: Vec<HolderObs>,
    pub devices: Vec<DeviceObs>,
    pub queues: Vec<QueueObs>,
    /// `(pid, command name)` of defunct processes under the engine.
    pub zombies: Vec<(u32, String)>,
    pub shm_bytes: Option<u64>,
}

fn secs(ms: u64) -> String {
    if ms >= 10_000 { format!("{} s", ms / 1000) } else { format!("{:.1} s", ms as f64 / 1000.0) }
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

fn state_words(state: char) -> &'static str {
    match state {
        'R' => "running",
        'S' => "sleeping (waiting on a lock, pipe, socket or child)",
        'D' => "uninterruptible (stuck in IO or in the driver)",
        'Z' => "zombie (exited, never reaped)",
        'T' | 't' => "stopped",
        _ => "unknown",
    }
}

fn gpu_provider(p: &str) -> bool {
    ["CUDA", "TensorRT", "ROCM", "MIGraphX", "Dml"].iter().any(|g| p.contains(g))
}

/// Applies every rule to one observation.
pub fn evaluate(obs: &Observation, th: &Thresholds) -> Vec<Finding> {
    let mut out = Vec::new();
    let now = obs.now_ms;
    for h in &obs.holders {
        let held = now.saturating_sub(h.since_ms);
        // A task that makes no progress: CPU time flat (commands) or no heartbeat (workers).
        let stalled = match h.kind {
            HolderKind::Task => {
                h.main.as_ref().filter(|p| p.state != 'R' && p.cpu_flat_ms >= th.task_stall_ms).map(|p| p.cpu_flat_ms)
            }
            HolderKind::WorkerTask => {
                h.last_progress_ms.map(|t| now.saturating_sub(t)).filter(|d| *d >= th.task_stall_ms)
            }
            HolderKind::Instance => None,
        };
        if let Some(flat) = stalled {
            let mut evidence = vec![
                ("holder".into(), h.holder.clone()),
                ("running for".into(), secs(held)),
                ("no progress for".into(), secs(flat)),
            ];
            if let Some(p) = &h.main {
                evidence.push(("process".into(), format!("pid {} is {}", p.pid, state_words(p.state))));
                evidence.push(("cpu time".into(), format!("{} ms, not growing", p.cpu_ms)));
            }
            if h.kind == HolderKind::WorkerTask {
                evidence.push(("heartbeats".into(), format!("none for {}", secs(flat))));
            }
            out.push(Finding {
                kind: FindingKind::TaskStalled,
                subject: h.holder.clone(),
                summary: format!("{} makes no progress ({} without CPU time or heartbeat)", h.holder, secs(flat)),
                evidence,
                cause: "a deadlock or a wait that never returns: a lock taken twice, a pipe or queue nobody writes, a child that never exits (reports 000/001: DataLoader workers + fork + CUDA; report 003: a pool that lost its model)".into(),
                fix: "dump its stack (`py-spy dump --pid PID`, or `cat /proc/PID/stack` for state D); give the stage a `timeout` (or the pool a `heartbeat_timeout`) so the engine kills it and takes the lease back; use the `spawn` start method, not `fork`, after CUDA is initialised".into(),
            });
        }
        // A GPU holder that reports only CPU execution providers (report 001).
        if h.gpu_check && !h.devices.is_empty() {
            if let Some(providers) = h.providers.as_ref().filter(|p| !p.iter().any(|x| gpu_provider(x))) {
                out.push(Finding {
                    kind: FindingKind::GpuUnused,
                    subject: h.holder.clone(),
                    summary: format!("{} holds GPU {} but runs on the CPU", h.holder, join(&h.devices)),
                    evidence: vec![("holder".into(), h.holder.clone()), ("devices".into(), join(&h.devices)), ("reported providers".into(), providers.join(", "))],
                    cause: "the model runtime fell back to the CPU: ONNX Runtime without the CUDA provider (onnxruntime instead of onnxruntime-gpu), missing CUDA/cuDNN libraries, or CUDA_VISIBLE_DEVICES changed inside the worker (report 001)".into(),
                    fix: "install the GPU build of the runtime (e.g. onnxruntime-gpu) matching the CUDA version, check `onnxruntime.get_available_providers()` in the worker, and fail `load()` when the GPU provider is missing".into(),
                });
            } else if held >= th.gpu_use_window_ms {
                let devices: Vec<&DeviceObs> =
                    obs.devices.iter().filter(|d| h.devices.contains(&d.index) && d.telemetry).collect();
                let seen = devices.iter().any(|d| d.processes.iter().any(|(pid, _)| h.pids.contains(pid)));
                if !devices.is_empty() && !seen {
                    let mut evidence = vec![
                        ("holder".into(), h.holder.clone()),
                        ("devices".into(), join(&h.devices)),
                        ("held for".into(), secs(held)),
                    ];
                    evidence.push((
                        "its processes".into(),
                        h.pids.iter().map(u32::to_string).collect::<Vec<_>>().join(", "),
                    ));
                    for d in &devices {
                        let procs: Vec<String> =
                            d.processes.iter().map(|(p, b)| format!("pid {p} {}", mib(*b))).collect();
                        evidence.push((
                            format!("gpu {} processes", d.index),
                            if procs.is_empty() { "none".into() } else { procs.join(", ") },
                        ));
                    }
                    out.push(Finding {
                        kind: FindingKind::GpuUnused,
                        subject: h.holder.clone(),
                        summary: format!("{} has held GPU {} for {} and never used it", h.holder, join(&h.devices), secs(held)),
                        evidence,
                        cause: "the stage does not need a GPU but declares one (report 004: CPU stages under the global GPU lock), or its code silently runs on the CPU (report 001)".into(),
                        fix: "if the stage is CPU work, declare `needs: {cpu: 1}` instead of a GPU so it stops blocking GPU stages; otherwise make it fail when no GPU is visible; set `gpu_check: off` if this is expected".into(),
                    });
                }
            }
        }
        if !h.cuda_overrides.is_empty() {
            let seen: Vec<String> = h.cuda_overrides.iter().map(|(p, v)| format!("pid {p}: {v:?}")).collect();
            out.push(Finding {
                kind: FindingKind::CudaDevicesOverridden,
                subject: h.holder.clone(),
                summary: format!("{} changed CUDA_VISIBLE_DEVICES away from its grant", h.holder),
                evidence: vec![
                    ("holder".into(), h.holder.clone()),
                    ("granted".into(), join(&h.devices)),
                    ("seen".into(), seen.join("; ")),
                ],
                cause:
                    "the code sets CUDA_VISIBLE_DEVICES itself, so it may use a device leased to someone else, or none"
                        .into(),
                fix: "remove the override: gpuflow sets CUDA_VISIBLE_DEVICES to the leased devices".into(),
            });
        }
        if h.kind == HolderKind::Instance && h.failures > 0 {
            out.push(Finding {
                kind: FindingKind::WorkerUnhealthy,
                subject: h.holder.clone(),
                summary: format!("{} failed {} time(s) in a row", h.holder, h.failures),
                evidence: vec![("holder".into(), h.holder.clone()), ("last error".into(), h.note.clone().unwrap_or_default())],
                cause: "the worker crashes, hangs (no heartbeat) or breaks the protocol; each time the engine killed it, reaped its process group and restarted it".into(),
                fix: "read the last error and the worker's stderr log (DATA_DIR/workers/POOL.N.stderr.log)".into(),
            });
        }
    }
    for d in obs.devices.iter().filter(|d| d.telemetry && d.idle_ms >= th.gpu_idle_ms) {
        let holders: Vec<&HolderObs> =
            obs.holders.iter().filter(|h| h.devices.contains(&d.index) && h.kind != HolderKind::Instance).collect();
        let instances: Vec<&HolderObs> =
            obs.holders.iter().filter(|h| h.devices.contains(&d.index) && h.kind == HolderKind::Instance).collect();
        // An idle pool instance between tasks is fine; a task holding an idle device is not.
        if holders.is_empty() {
            continue;
        }
        let mut evidence = vec![
            ("device".into(), format!("gpu {} ({})", d.index, d.name)),
            ("utilisation".into(), format!("{} % for {}", d.utilization_pct, secs(d.idle_ms))),
            ("memory".into(), format!("{} of {} used", mib(d.memory_used), mib(d.memory_total))),
        ];
        for h in holders.iter().chain(instances.iter()) {
            let doing = match &h.main {
                Some(p) => format!("pid {} {}", p.pid, state_words(p.state)),
                None => h.note.clone().unwrap_or_else(|| "-".into()),
            };
            evidence
                .push(("holder".into(), format!("{} for {}: {doing}", h.holder, secs(now.saturating_sub(h.since_ms)))));
        }
        out.push(Finding {
            kind: FindingKind::GpuIdleUnderLease,
            subject: format!("gpu {}", d.index),
            summary: format!("GPU {} is leased but idle ({} % for {})", d.index, d.utilization_pct, secs(d.idle_ms)),
            evidence,
            cause: "the holder waits on something other than the GPU (CPU work, IO, a lock), or it is stuck while keeping its memory (report 000: 0 % with 52 GB held)".into(),
            fix: "see what the holder is doing (its process state above); split CPU work into its own stage; add a `timeout`".into(),
        });
    }
    for d in obs.devices.iter().filter(|d| d.telemetry && !d.foreign.is_empty()) {
        let total: u64 = d.foreign.iter().map(|(_, b, _)| b).sum();
        let mut evidence = vec![
            ("device".into(), format!("gpu {} ({})", d.index, d.name)),
            ("held outside any lease".into(), mib(total)),
        ];
        for (pid, bytes, what) in &d.foreign {
            evidence.push(("process".into(), format!("pid {pid}: {} ({what})", mib(*bytes))));
        }
        out.push(Finding {
            kind: FindingKind::GpuMemoryForeign,
            subject: format!("gpu {} foreign", d.index),
            summary: format!("GPU {}: {} is held by processes without a lease; it is kept out of the inventory", d.index, mib(total)),
            evidence,
            cause: "another program uses the device, or a killed process has not released its memory yet (report 000: VRAM still allocated after the work stopped)".into(),
            fix: "if it is a leftover, kill it (`kill -9 PID`) and the memory returns to the inventory by itself; if another program shares the device, give gpuflow a smaller virtual memory size or a dedicated device".into(),
        });
    }
    for q in obs.queues.iter().filter(|q| q.waiting > 0 && q.idle_ms >= th.queue_stall_ms) {
        let mut evidence = vec![
            ("waiting".into(), q.waiting.to_string()),
            ("head".into(), format!("{} waiting {}", q.head, secs(q.head_waited_ms))),
            ("head needs".into(), q.head_needs.clone()),
            ("nothing started for".into(), secs(q.idle_ms)),
        ];
        for b in &q.blockers {
            evidence.push(("held by".into(), b.clone()));
        }
        if let Some(p) = &q.pool_problem {
            evidence.push(("pool".into(), p.clone()));
        }
        let why = match (&q.pool_problem, q.blockers.first()) {
            (Some(p), _) => p.clone(),
            (None, Some(b)) => format!("its resources are held by {b}"),
            (None, None) => "nothing visible holds its resources".into(),
        };
        out.push(Finding {
            kind: FindingKind::QueueStalled,
            subject: format!("pipeline {}", q.pipeline),
            summary: format!("pipeline {}: {} waiting, nothing started for {}: {why}", q.pipeline, q.waiting, secs(q.idle_ms)),
            evidence,
            cause: "a holder that does not finish (report 000: a queue 'severely blocked' behind a stuck task), a pool with no healthy instance, or requests bigger than what frees up".into(),
            fix: "look at the holders above (and `gpuflow doctor` for them); cancel or time out the stuck one; fix the pool's worker".into(),
        });
    }
    for (pid, name) in &obs.zombies {
        out.push(Finding {
            kind: FindingKind::ZombieProcess,
            subject: format!("pid {pid}"),
            summary: format!("zombie process {pid} ({name}) under the engine"),
            evidence: vec![("pid".into(), pid.to_string()), ("command".into(), name.clone())],
            cause: "a child exited and nothing reaped it; gpuflow reaps its children and orphans, so this one escaped (e.g. re-parented before the engine became subreaper)".into(),
            fix: "report it; it disappears when its parent reaps it or exits".into(),
        });
    }
    if let Some(shm) = obs.shm_bytes.filter(|b| *b < th.shm_min_bytes) {
        out.push(Finding {
            kind: FindingKind::SharedMemorySmall,
            subject: "/dev/shm".into(),
            summary: format!("/dev/shm is {} (below {})", mib(shm), mib(th.shm_min_bytes)),
            evidence: vec![("size".into(), mib(shm))],
            cause: "PyTorch DataLoader workers pass tensors through /dev/shm; at Docker's default 64 MiB they fail or hang (report 000)".into(),
            fix: "run the container with `--shm-size=2g` (or `--ipc=host`)".into(),
        });
    }
    out
}

fn join(devices: &[u32]) -> String {
    let mut s = String::new();
    for (i, d) in devices.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{d}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn th() -> Thresholds {
        Thresholds {
            task_stall_ms: 5_000,
            gpu_idle_ms: 10_000,
            queue_stall_ms: 5_000,
            gpu_use_window_ms: 3_000,
            shm_min_bytes: 512 << 20,
            idle_utilization_pct: 2,
        }
    }

    fn task(devices: Vec<u32>, pids: Vec<u32>, state: char, flat: u64) -> HolderObs {
        HolderObs {
            kind: HolderKind::Task,
            holder: "job j/detect attempt 1".into(),
            since_ms: 0,
            devices,
            gpu_check: true,
            pids: pids.clone(),
            main: Some(ProcessObs { pid: pids[0], state, cpu_ms: 40, cpu_flat_ms: flat }),
            last_progress_ms: None,
            providers: None,
            cuda_overrides: vec![],
            note: None,
            failures: 0,
        }
    }

    fn device(util: u32, idle_ms: u64, processes: Vec<(u32, u64)>) -> DeviceObs {
        DeviceObs {
            index: 0,
            name: "H100".into(),
            telemetry: true,
            utilization_pct: util,
            idle_ms,
            memory_used: 52 << 30,
            memory_total: 80 << 30,
            processes,
            foreign: vec![],
        }
    }

    fn kinds(f: &[Finding]) -> Vec<FindingKind> {
        f.iter().map(|f| f.kind).collect()
    }

    #[test]
    fn report_000_gpu_idle_with_memory_held_and_a_stalled_holder() {
        // Recorded: 0 % for 60 s, 52 GB held by the holder, which sleeps without CPU time.
        let obs = Observation {
            now_ms: 60_000,
            holders: vec![task(vec![0], vec![4242], 'S', 55_000)],
            devices: vec![device(0, 60_000, vec![(4242, 52 << 30)])],
            ..Default::default()
        };
        let f = evaluate(&obs, &th());
        assert_eq!(kinds(&f), vec![FindingKind::TaskStalled, FindingKind::GpuIdleUnderLease]);
        let idle = &f[1];
        assert!(idle.evidence.iter().any(|(k, v)| k == "holder" && v.contains("pid 4242 sleeping")), "{idle:#?}");
        assert!(idle.evidence.iter().any(|(_, v)| v == "53248 MiB of 81920 MiB used"), "{idle:#?}");
    }

    #[test]
    fn a_running_process_is_not_stalled_and_a_busy_gpu_is_not_idle() {
        let obs = Observation {
            now_ms: 60_000,
            holders: vec![task(vec![0], vec![7], 'R', 60_000)],
            devices: vec![device(97, 0, vec![(7, 1 << 30)])],
            ..Default::default()
        };
        assert!(evaluate(&obs, &th()).is_empty());
    }

    #[test]
    fn report_004_gpu_declared_but_never_used() {
        let obs = Observation {
            now_ms: 4_000,
            holders: vec![task(vec![0], vec![10, 11], 'R', 0)],
            devices: vec![device(0, 4_000, vec![(99, 1 << 30)])],
            ..Default::default()
        };
        let f = evaluate(&obs, &th());
        assert_eq!(kinds(&f), vec![FindingKind::GpuUnused]);
        assert!(f[0].fix.contains("needs: {cpu: 1}"));
        // Inside the window, or once one of its processes shows up, nothing is flagged.
        let early = Observation { now_ms: 2_000, ..obs.clone() };
        assert!(evaluate(&early, &th()).is_empty());
        let used = Observation { devices: vec![device(40, 0, vec![(11, 1 << 30)])], ..obs };
        assert!(evaluate(&used, &th()).is_empty());
    }

    #[test]
    fn report_001_worker_reporting_cpu_providers_is_flagged_at_once() {
        let mut h = task(vec![0], vec![5], 'S', 0);
        h.kind = HolderKind::Instance;
        h.main = None;
        h.providers = Some(vec!["CPUExecutionProvider".into()]);
        let obs = Observation { now_ms: 100, holders: vec![h.clone()], ..Default::default() };
        let f = evaluate(&obs, &th());
        assert_eq!(kinds(&f), vec![FindingKind::GpuUnused]);
        assert!(f[0].summary.contains("runs on the CPU"));
        h.providers = Some(vec!["CUDAExecutionProvider".into(), "CPUExecutionProvider".into()]);
        assert!(evaluate(&Observation { now_ms: 100, holders: vec![h], ..Default::default() }, &th()).is_empty());
    }

    #[test]
    fn virtual_devices_without_telemetry_are_never_judged() {
        let mut d = device(0, 60_000, vec![]);
        d.telemetry = false;
        let obs = Observation {
            now_ms: 60_000,
            holders: vec![task(vec![0], vec![1], 'R', 0)],
            devices: vec![d],
            ..Default::default()
        };
        assert!(evaluate(&obs, &th()).is_empty());
    }

    #[test]
    fn queue_stall_names_the_blocker_and_the_pool() {
        let q = QueueObs {
            pipeline: "subtitles".into(),
            waiting: 7,
            head: "job k/ocr".into(),
            head_needs: "1 GPU".into(),
            head_waited_ms: 9_000,
            idle_ms: 9_000,
            blockers: vec!["job j/detect attempt 1 (pid 4242, sleeping)".into()],
            pool_problem: None,
        };
        let obs = Observation {
            now_ms: 9_000,
            queues: vec![q.clone()],
            zombies: vec![(77, "python3".into())],
            shm_bytes: Some(64 << 20),
            ..Default::default()
        };
        let f = evaluate(&obs, &th());
        assert_eq!(
            kinds(&f),
            vec![FindingKind::QueueStalled, FindingKind::ZombieProcess, FindingKind::SharedMemorySmall]
        );
        assert!(f[0].summary.contains("held by job j/detect"), "{}", f[0].summary);
        let fresh = Observation { now_ms: 1_000, queues: vec![QueueObs { idle_ms: 1_000, ..q }], ..Default::default() };
        assert!(evaluate(&fresh, &th()).is_empty());
    }
}
