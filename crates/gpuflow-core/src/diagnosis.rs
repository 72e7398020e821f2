//! Stall and GPU-truth diagnosis as pure rules: an `Observation` of what the engine holds and
//! what the machine shows goes in, `Finding`s come out. The runtime gathers the observation
//! (from `/proc` and NVML) and keeps findings open while their condition holds.

use std::fmt::Write as _;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FindingKind {
    /// A running task makes no progress: no heartbeat or progress report, and its whole
    /// process tree stays under the CPU floor.
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
    /// A process forked without exec from one that had loaded the NVIDIA driver.
    ForkAfterCuda,
    /// GPU memory held by a leftover of ours (engine marker, no live lease): being reclaimed.
    GpuMemoryOrphaned,
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
            FindingKind::ForkAfterCuda => "fork_after_cuda",
            FindingKind::GpuMemoryOrphaned => "gpu_memory_orphaned",
            FindingKind::StoreUnwritable => "store_unwritable",
        }
    }

    pub const ALL: [FindingKind; 12] = [
        FindingKind::GpuMemoryForeign,
        FindingKind::TaskStalled,
        FindingKind::GpuUnused,
        FindingKind::GpuIdleUnderLease,
        FindingKind::QueueStalled,
        FindingKind::ZombieProcess,
        FindingKind::SharedMemorySmall,
        FindingKind::CudaDevicesOverridden,
        FindingKind::WorkerUnhealthy,
        FindingKind::ForkAfterCuda,
        FindingKind::GpuMemoryOrphaned,
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
    /// How long a task must go without heartbeat or progress, with its process tree under
    /// `stall_cpu_floor_pct`, before it counts as stalled.
    pub task_stall_ms: u64,
    pub gpu_idle_ms: u64,
    pub queue_stall_ms: u64,
    pub gpu_use_window_ms: u64,
    pub shm_min_bytes: u64,
    /// At or below this utilisation a device counts as idle.
    pub idle_utilization_pct: u32,
    /// A task's whole process tree using less than this share of one core over the
    /// `task_stall` window counts as doing nothing: helper threads that wake now and then (CUDA
    /// runtime threads, a watchdog thread) stay under it, real work does not.
    pub stall_cpu_floor_pct: f64,
    /// A finding closes only after its condition has been clear this long, so a condition
    /// that blinks off for one sample does not close and reopen it.
    pub finding_clear_ms: u64,
    /// A defunct process counts once it has stayed defunct this long (a parent that reaps
    /// promptly is fine).
    pub zombie_grace_ms: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            // A stuck holder is named about 21 s after it stops (threshold + one sample),
            // and the queue behind it at the same time.
            task_stall_ms: 20_000,
            gpu_idle_ms: 120_000,
            queue_stall_ms: 20_000,
            gpu_use_window_ms: 30_000,
            shm_min_bytes: 512 << 20,
            idle_utilization_pct: 2,
            stall_cpu_floor_pct: 2.0,
            finding_clear_ms: 5_000,
            zombie_grace_ms: 2_000,
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
    /// `(at, cumulative CPU ms)` of its whole process tree, oldest first, covering at least
    /// the `task_stall` window once it has run that long. Processes that exit keep what they
    /// used, so the series never goes down.
    pub cpu_samples: Vec<(u64, u64)>,
    /// Progress the task last reported, in words (e.g. "10 of 150 batches"), for evidence.
    pub progress: Option<String>,
    /// Its processes other than the main one: `(pid, command, state)`.
    pub children: Vec<(u32, String, char)>,
    /// Processes of its tree forked without exec from a parent that had loaded the NVIDIA
    /// driver.
    pub forked_after_cuda: Vec<ForkObs>,
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
    /// `(pid, bytes, whose leftover)` of processes that carry this engine's marker but belong
    /// to no live attempt or instance: the runtime kills them; their memory stays out of the
    /// inventory until the device reports it free.
    pub orphaned: Vec<(u32, u64, String)>,
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

/// A defunct process: exited, but its parent has not collected its exit status.
#[derive(Clone, Debug, PartialEq)]
pub struct ZombieObs {
    pub pid: u32,
    pub command: String,
    pub ppid: u32,
    pub parent_command: String,
    pub parent_state: char,
    /// The holder whose tree it is in (`job …/stage attempt N`, `pool NAME #I`); `None` for
    /// a direct child of the engine outside any holder.
    pub owner: Option<String>,
    /// How long it has been defunct.
    pub defunct_ms: u64,
}

/// A child that shares its parent's executable and its parent's mapping of the NVIDIA driver
/// at the same address: it was forked after the driver was loaded and never exec'd.
#[derive(Clone, Debug, PartialEq)]
pub struct ForkObs {
    pub child: u32,
    pub child_command: String,
    pub child_state: char,
    pub parent: u32,
    pub parent_command: String,
    /// What of the driver both map, e.g. `/usr/lib/x86_64-linux-gnu/libcuda.so.1`.
    pub marker: String,
}

/// Why a task counts as stalled.
#[derive(Clone, Debug, PartialEq)]
pub struct Stall {
    /// Since the last heartbeat or progress report (or since it started, if none).
    pub quiet_ms: u64,
    /// The CPU window that was judged, and the CPU its tree used in it.
    pub window_ms: u64,
    pub cpu_used_ms: u64,
}

impl Stall {
    pub fn cpu_pct(&self) -> f64 {
        if self.window_ms == 0 { 0.0 } else { self.cpu_used_ms as f64 * 100.0 / self.window_ms as f64 }
    }
}

/// The stall rule: no heartbeat or progress for `task_stall`, and the whole process tree
/// under the CPU floor over the last `task_stall`. "CPU time moved" alone is not progress: a
/// deadlocked CUDA process still has runtime threads that wake now and then. `None` until
/// the samples cover the whole window.
pub fn stall(h: &HolderObs, now: u64, th: &Thresholds) -> Option<Stall> {
    if h.kind == HolderKind::Instance {
        return None;
    }
    let quiet_since = h.last_progress_ms.unwrap_or(h.since_ms).max(h.since_ms);
    let quiet_ms = now.saturating_sub(quiet_since);
    if quiet_ms < th.task_stall_ms {
        return None;
    }
    let window_start = now.saturating_sub(th.task_stall_ms);
    let base = h.cpu_samples.iter().rev().find(|(at, _)| *at <= window_start)?;
    let last = h.cpu_samples.last()?;
    let window_ms = last.0.saturating_sub(base.0);
    if window_ms == 0 {
        return None;
    }
    let cpu_used_ms = last.1.saturating_sub(base.1);
    let s = Stall { quiet_ms, window_ms, cpu_used_ms };
    (s.cpu_pct() < th.stall_cpu_floor_pct).then_some(s)
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observation {
    pub now_ms: u64,
    pub holders: Vec<HolderObs>,
    pub devices: Vec<DeviceObs>,
    pub queues: Vec<QueueObs>,
    /// Defunct processes in the engine's trees.
    pub zombies: Vec<ZombieObs>,
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

fn ev(label: &str, value: impl Into<String>) -> (String, String) {
    (label.to_string(), value.into())
}

/// Applies every rule to one observation.
pub fn evaluate(obs: &Observation, th: &Thresholds) -> Vec<Finding> {
    let mut out = Vec::new();
    let now = obs.now_ms;
    for h in &obs.holders {
        let held = now.saturating_sub(h.since_ms);
        if let Some(st) = stall(h, now, th) {
            let mut evidence = vec![
                ev("holder", h.holder.clone()),
                ev("running for", secs(held)),
                ev(
                    "no heartbeat or progress for",
                    match (h.kind, h.last_progress_ms) {
                        (HolderKind::Task, None) => {
                            format!("{} (it never wrote to $GPUFLOW_PROGRESS)", secs(st.quiet_ms))
                        }
                        _ => secs(st.quiet_ms),
                    },
                ),
                ev(
                    "cpu of its process tree",
                    format!(
                        "{} ms in the last {} ({:.1} % of one core, floor {} %)",
                        st.cpu_used_ms,
                        secs(st.window_ms),
                        st.cpu_pct(),
                        th.stall_cpu_floor_pct
                    ),
                ),
            ];
            if let Some(p) = &h.progress {
                evidence.push(ev("last progress", p.clone()));
            }
            if let Some(p) = &h.main {
                evidence.push(ev("process", format!("pid {} is {}", p.pid, state_words(p.state))));
            }
            if let Some(n) = &h.note {
                evidence.push(ev("runs", n.clone()));
            }
            for (pid, comm, state) in h.children.iter().take(16) {
                evidence.push(ev("child", format!("pid {pid} ({comm}) is {}", state_words(*state))));
            }
            let progress = h.progress.as_deref().map(|p| format!(", last progress: {p}")).unwrap_or_default();
            out.push(Finding {
                kind: FindingKind::TaskStalled,
                subject: h.holder.clone(),
                summary: format!(
                    "{} is stuck: no heartbeat or progress for {} and its processes use {:.1} % of one core{progress}",
                    h.holder,
                    secs(st.quiet_ms),
                    st.cpu_pct()
                ),
                evidence,
                cause: "the task waits for something that never happens: a lock that is never released (often in a process forked after CUDA was initialised), a pipe or queue nobody writes to, or a child process that never exits. It still holds its GPU and its place in the queue.".into(),
                fix: "see where it waits: `py-spy dump --pid PID` for Python, `cat /proc/PID/stack` for a process in state D. Give the stage a `timeout` (or the pool a `heartbeat_timeout`) so gpuflow kills it and frees its GPU. If it forks worker processes after using CUDA, use the `spawn` start method instead of `fork`.".into(),
            });
        }
        // A GPU holder that reports only CPU execution providers.
        if h.gpu_check && !h.devices.is_empty() {
            if let Some(providers) = h.providers.as_ref().filter(|p| !p.iter().any(|x| gpu_provider(x))) {
                out.push(Finding {
                    kind: FindingKind::GpuUnused,
                    subject: h.holder.clone(),
                    summary: format!("{} holds GPU {} but runs on the CPU", h.holder, join(&h.devices)),
                    evidence: vec![ev("holder", h.holder.clone()), ev("devices", join(&h.devices)), ev("reported providers", providers.join(", "))],
                    cause: "the model runtime fell back to the CPU: for example ONNX Runtime without its CUDA provider (the `onnxruntime` package instead of `onnxruntime-gpu`), missing CUDA or cuDNN libraries, or code that changed CUDA_VISIBLE_DEVICES".into(),
                    fix: "install the GPU build of the runtime (e.g. onnxruntime-gpu) matching the CUDA version, check `onnxruntime.get_available_providers()` in the worker, and fail `load()` when the GPU provider is missing".into(),
                });
            } else if held >= th.gpu_use_window_ms {
                let devices: Vec<&DeviceObs> =
                    obs.devices.iter().filter(|d| h.devices.contains(&d.index) && d.telemetry).collect();
                let seen = devices.iter().any(|d| d.processes.iter().any(|(pid, _)| h.pids.contains(pid)));
                if !devices.is_empty() && !seen {
                    let mut evidence = vec![
                        ev("holder", h.holder.clone()),
                        ev("devices", join(&h.devices)),
                        ev("held for", secs(held)),
                    ];
                    evidence
                        .push(ev("its processes", h.pids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")));
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
                        cause: "the stage declares a GPU but does CPU work, so it blocks GPU stages for nothing; or its code silently runs on the CPU".into(),
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
                    ev("holder", h.holder.clone()),
                    ev("granted", join(&h.devices)),
                    ev("seen", seen.join("; ")),
                ],
                cause:
                    "the code sets CUDA_VISIBLE_DEVICES itself, so it may use a device leased to someone else, or none"
                        .into(),
                fix: "remove the override: gpuflow sets CUDA_VISIBLE_DEVICES to the leased devices".into(),
            });
        }
        if !h.forked_after_cuda.is_empty() {
            let mut evidence = vec![ev("holder", h.holder.clone())];
            for f in &h.forked_after_cuda {
                evidence.push(ev(
                    "forked after CUDA",
                    format!(
                        "pid {} ({}, {}) forked from pid {} ({}) without exec; both map {} at the same address",
                        f.child,
                        f.child_command,
                        state_words(f.child_state),
                        f.parent,
                        f.parent_command,
                        f.marker
                    ),
                ));
            }
            let pids: Vec<String> = h.forked_after_cuda.iter().map(|f| f.child.to_string()).collect();
            let parents: Vec<String> = {
                let mut p: Vec<u32> = h.forked_after_cuda.iter().map(|f| f.parent).collect();
                p.dedup();
                p.iter().map(u32::to_string).collect()
            };
            out.push(Finding {
                kind: FindingKind::ForkAfterCuda,
                subject: h.holder.clone(),
                summary: format!(
                    "{}: {} process(es) (pid {}) were forked from pid {} after it loaded the CUDA driver",
                    h.holder,
                    pids.len(),
                    pids.join(", "),
                    parents.join(", ")
                ),
                evidence,
                cause: "a process that has initialised CUDA was copied with `fork` (the default start method of Python's multiprocessing on Linux, and of PyTorch DataLoader workers). The copy inherits the driver's state but not its threads, so CUDA calls in it, and locks the parent held at the moment of the fork, can hang forever.".into(),
                fix: "start workers with the `spawn` start method: `multiprocessing.set_start_method(\"spawn\")`, or `DataLoader(..., multiprocessing_context=\"spawn\")`; or load data in the main process with `DataLoader(num_workers=0)`; or create the workers before the first CUDA call.".into(),
            });
        }
        if h.kind == HolderKind::Instance && h.failures > 0 {
            out.push(Finding {
                kind: FindingKind::WorkerUnhealthy,
                subject: h.holder.clone(),
                summary: format!("{} failed {} time(s) in a row", h.holder, h.failures),
                evidence: vec![ev("holder", h.holder.clone()), ev("last error", h.note.clone().unwrap_or_default())],
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
            ev("device", format!("gpu {} ({})", d.index, d.name)),
            ev("utilisation", format!("{} % for {}", d.utilization_pct, secs(d.idle_ms))),
            ev("memory", format!("{} of {} used", mib(d.memory_used), mib(d.memory_total))),
        ];
        for h in holders.iter().chain(instances.iter()) {
            let doing = match &h.main {
                Some(p) => format!("pid {} {}", p.pid, state_words(p.state)),
                None => h.note.clone().unwrap_or_else(|| "-".into()),
            };
            evidence.push(ev("holder", format!("{} for {}: {doing}", h.holder, secs(now.saturating_sub(h.since_ms)))));
        }
        out.push(Finding {
            kind: FindingKind::GpuIdleUnderLease,
            subject: format!("gpu {}", d.index),
            summary: format!("GPU {} is leased but idle ({} % for {})", d.index, d.utilization_pct, secs(d.idle_ms)),
            evidence,
            cause: "the holder waits on something other than the GPU (CPU work, IO, a lock), or it is stuck while keeping its GPU memory allocated".into(),
            fix: "see what the holder is doing (its process state above); split CPU work into its own stage; add a `timeout`".into(),
        });
    }
    for d in obs.devices.iter().filter(|d| d.telemetry && !d.foreign.is_empty()) {
        let total: u64 = d.foreign.iter().map(|(_, b, _)| b).sum();
        let mut evidence =
            vec![ev("device", format!("gpu {} ({})", d.index, d.name)), ev("held outside any lease", mib(total))];
        for (pid, bytes, what) in &d.foreign {
            evidence.push(ev("process", format!("pid {pid}: {} ({what})", mib(*bytes))));
        }
        out.push(Finding {
            kind: FindingKind::GpuMemoryForeign,
            subject: format!("gpu {} foreign", d.index),
            summary: format!("GPU {}: {} is held by processes without a lease; it is kept out of the inventory", d.index, mib(total)),
            evidence,
            cause: "another program uses the device, or a killed process has not released its GPU memory yet".into(),
            fix: "if it is a leftover, kill it (`kill -9 PID`) and the memory returns to the inventory by itself; if another program shares the device, give gpuflow a smaller virtual memory size or a dedicated device".into(),
        });
    }
    for d in obs.devices.iter().filter(|d| d.telemetry && !d.orphaned.is_empty()) {
        let total: u64 = d.orphaned.iter().map(|(_, b, _)| b).sum();
        let mut evidence =
            vec![ev("device", format!("gpu {} ({})", d.index, d.name)), ev("held by our leftovers", mib(total))];
        for (pid, bytes, whose) in &d.orphaned {
            evidence.push(ev("process", format!("pid {pid}: {} (left by {whose}; killed)", mib(*bytes))));
        }
        out.push(Finding {
            kind: FindingKind::GpuMemoryOrphaned,
            subject: format!("gpu {} orphaned", d.index),
            summary: format!(
                "GPU {}: {} is held by processes gpuflow started for work that has ended; they were killed and the memory is reclaimed once the device frees it",
                d.index,
                mib(total)
            ),
            evidence,
            cause: "a process of a finished or killed attempt (or of a replaced pool instance) outlived it and kept its GPU memory: a child that escaped its process group, or one stuck in the driver while exiting".into(),
            fix: "nothing to do if the finding closes by itself: gpuflow killed the leftover's process group, and the memory returns to the inventory when the device reports it free. If it stays open, the process is stuck in the driver (state D); see `nvidia-smi` and the kernel log.".into(),
        });
    }
    for q in obs.queues.iter().filter(|q| q.waiting > 0 && q.idle_ms >= th.queue_stall_ms) {
        let mut evidence = vec![
            ev("waiting", q.waiting.to_string()),
            ev("head", format!("{} waiting {}", q.head, secs(q.head_waited_ms))),
            ev("head needs", q.head_needs.clone()),
            ev("nothing started for", secs(q.idle_ms)),
        ];
        for b in &q.blockers {
            evidence.push(ev("held by", b.clone()));
        }
        if let Some(p) = &q.pool_problem {
            evidence.push(ev("pool", p.clone()));
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
            cause: "work is queued behind a holder that does not finish (see its own finding), a pool with no healthy instance, or a request bigger than what ever frees up".into(),
            fix: "look at the holders named above (`gpuflow doctor` shows their own findings); cancel the stuck one or give its stage a `timeout`; fix the pool's worker".into(),
        });
    }
    zombie_findings(obs, th, &mut out);
    if let Some(shm) = obs.shm_bytes.filter(|b| *b < th.shm_min_bytes) {
        out.push(Finding {
            kind: FindingKind::SharedMemorySmall,
            subject: "/dev/shm".into(),
            summary: format!("/dev/shm is {} (below {})", mib(shm), mib(th.shm_min_bytes)),
            evidence: vec![ev("size", mib(shm))],
            cause:
                "PyTorch DataLoader workers pass tensors through /dev/shm; at Docker's default 64 MiB they fail or hang"
                    .into(),
            fix: "run the container with `--shm-size=2g` (or `--ipc=host`)".into(),
        });
    }
    out
}

/// One finding per owner, counting its defunct processes by parent.
fn zombie_findings(obs: &Observation, th: &Thresholds, out: &mut Vec<Finding>) {
    let mut owners: Vec<Option<&str>> = Vec::new();
    let lasting: Vec<&ZombieObs> = obs.zombies.iter().filter(|z| z.defunct_ms >= th.zombie_grace_ms).collect();
    for z in &lasting {
        if !owners.contains(&z.owner.as_deref()) {
            owners.push(z.owner.as_deref());
        }
    }
    for owner in owners {
        let mine: Vec<&&ZombieObs> = lasting.iter().filter(|z| z.owner.as_deref() == owner).collect();
        let who = owner.unwrap_or("the engine itself");
        let mut parents: Vec<u32> = mine.iter().map(|z| z.ppid).collect();
        parents.sort_unstable();
        parents.dedup();
        let mut evidence = vec![ev("owner", who), ev("count", mine.len().to_string())];
        let mut parent_words = Vec::new();
        for ppid in &parents {
            let of: Vec<&&&ZombieObs> = mine.iter().filter(|z| z.ppid == *ppid).collect();
            let first = of[0];
            let words = format!("pid {ppid} ({}) is {}", first.parent_command, state_words(first.parent_state));
            evidence.push(ev("parent", words.clone()));
            parent_words.push(words);
            let pids: Vec<String> = of.iter().map(|z| format!("{} ({})", z.pid, z.command)).collect();
            evidence.push(ev("defunct children", format!("{} of pid {ppid}: {}", of.len(), pids.join(", "))));
        }
        let longest = mine.iter().map(|z| z.defunct_ms).max().unwrap_or(0);
        evidence.push(ev("defunct for", format!("up to {}", secs(longest))));
        out.push(Finding {
            kind: FindingKind::ZombieProcess,
            subject: format!("zombies under {who}"),
            summary: format!(
                "{who}: {} exited child process(es) never reaped by their parent ({})",
                mine.len(),
                parent_words.join("; ")
            ),
            evidence,
            cause: "a process started children and never collected their exit status, so each stays in the process table as `<defunct>`. This usually means the parent is stuck (it would otherwise wait for them) or forgets to `wait`; a growing count exhausts the pid limit.".into(),
            fix: "reap children in the parent: `Popen.wait()` / `os.waitpid`, or `Process.join()` for `multiprocessing`; close a `multiprocessing.Pool` with `close()` and `join()`. Prefer the `spawn` start method (`multiprocessing.set_start_method(\"spawn\")`) to `fork`, above all once CUDA is initialised. If the parent is stuck, see its `task_stalled` finding.".into(),
        });
    }
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
            stall_cpu_floor_pct: 2.0,
            finding_clear_ms: 2_000,
            zombie_grace_ms: 2_000,
        }
    }

    /// Samples once a second from 0 to `until`, the tree's CPU time given by `cpu(t)`.
    fn samples(until: u64, cpu: impl Fn(u64) -> u64) -> Vec<(u64, u64)> {
        (0..=until / 1000).map(|s| (s * 1000, cpu(s * 1000))).collect()
    }

    fn task(devices: Vec<u32>, pids: Vec<u32>, state: char, flat: u64) -> HolderObs {
        // `flat`: CPU time has not grown for this long (before that, one core busy).
        let now = 60_000u64;
        HolderObs {
            kind: HolderKind::Task,
            holder: "job j/detect attempt 1".into(),
            since_ms: 0,
            devices,
            gpu_check: true,
            pids: pids.clone(),
            main: Some(ProcessObs { pid: pids[0], state, cpu_ms: 40 }),
            last_progress_ms: None,
            cpu_samples: samples(now, |t| t.min(now - flat)),
            progress: None,
            children: vec![],
            forked_after_cuda: vec![],
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
            orphaned: vec![],
        }
    }

    fn kinds(f: &[Finding]) -> Vec<FindingKind> {
        f.iter().map(|f| f.kind).collect()
    }

    #[test]
    fn gpu_idle_with_memory_held_and_a_stalled_holder() {
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
            holders: vec![task(vec![0], vec![7], 'R', 0)],
            devices: vec![device(97, 0, vec![(7, 1 << 30)])],
            ..Default::default()
        };
        assert!(evaluate(&obs, &th()).is_empty());
    }

    #[test]
    fn gpu_declared_but_never_used() {
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
    fn worker_reporting_cpu_providers_is_flagged_at_once() {
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
            zombies: vec![zombie(77, 70, Some("job j/detect attempt 1"), 3_000)],
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

    fn zombie(pid: u32, ppid: u32, owner: Option<&str>, defunct_ms: u64) -> ZombieObs {
        ZombieObs {
            pid,
            command: "python3".into(),
            ppid,
            parent_command: "python3".into(),
            parent_state: 'S',
            owner: owner.map(str::to_string),
            defunct_ms,
        }
    }

    fn stalled_at(h: &HolderObs, now: u64) -> bool {
        let obs = Observation { now_ms: now, holders: vec![h.clone()], ..Default::default() };
        evaluate(&obs, &th()).iter().any(|f| f.kind == FindingKind::TaskStalled)
    }

    /// Recorded from a deadlocked CUDA process (and from a Python process whose main thread
    /// waits on a lock while a helper thread wakes every 0.5 s for 2 ms): its CPU time ticks by
    /// one 10 ms clock tick every 2-3 s. The old rule ("CPU time has not grown for the
    /// threshold") reset at every tick and the finding flapped; this one holds.
    #[test]
    fn a_cuda_like_process_whose_cpu_time_ticks_is_stalled_without_a_gap() {
        let ticks = [2_300u64, 4_700, 7_200, 9_600, 12_100, 14_500, 17_000, 19_400, 21_900, 24_300, 26_800, 29_200];
        let mut h = task(vec![0], vec![4242], 'S', 0);
        h.cpu_samples = samples(30_000, |t| 1_200 + 10 * ticks.iter().filter(|k| **k <= t).count() as u64);
        // Under the threshold: not yet.
        for now in (0..5_000).step_by(1_000) {
            assert!(!stalled_at(&h, now), "at {now} ms, before the 5 s threshold");
        }
        // From the threshold on, at every sample: open, no gap.
        for now in (5_000..=30_000).step_by(1_000) {
            assert!(stalled_at(&h, now), "gap at {now} ms");
        }
        let f = evaluate(&Observation { now_ms: 30_000, holders: vec![h], ..Default::default() }, &th());
        let cpu = &f[0].evidence.iter().find(|(k, _)| k == "cpu of its process tree").unwrap().1;
        assert!(cpu.starts_with("20 ms in the last 5.0 s (0.4 % of one core"), "{cpu}");
        assert!(f[0].fix.contains("timeout") && f[0].fix.contains("spawn"), "{:?}", f[0].fix);
    }

    #[test]
    fn a_busy_task_is_not_stalled_however_long_it_sends_nothing() {
        // One core at 30 %: real work, even with no heartbeat at all.
        let mut h = task(vec![0], vec![1], 'S', 0);
        h.cpu_samples = samples(60_000, |t| t * 3 / 10);
        assert!(!stalled_at(&h, 60_000));
        // Just above the floor (2.5 %) is still work; just below (1.5 %) is not.
        h.cpu_samples = samples(60_000, |t| t / 40);
        assert!(!stalled_at(&h, 60_000));
        h.cpu_samples = samples(60_000, |t| t * 15 / 1000);
        assert!(stalled_at(&h, 60_000));
    }

    #[test]
    fn a_worker_task_that_reports_progress_is_not_stalled_while_idle_on_cpu() {
        let mut h = task(vec![], vec![1], 'S', 0);
        h.kind = HolderKind::WorkerTask;
        h.cpu_samples = samples(20_000, |_| 50);
        h.last_progress_ms = Some(17_000);
        assert!(!stalled_at(&h, 20_000), "progress 3 s ago, under the 5 s threshold");
        assert!(stalled_at(&h, 22_000), "5 s without progress and no CPU");
        h.progress = Some("10 of 150 batches".into());
        let f = evaluate(&Observation { now_ms: 22_000, holders: vec![h], ..Default::default() }, &th());
        assert!(f[0].summary.contains("last progress: 10 of 150 batches"), "{}", f[0].summary);
    }

    #[test]
    fn a_task_that_worked_then_deadlocked_is_named_one_window_later() {
        // Busy (one full core) until 12 s, then nothing.
        let mut h = task(vec![0], vec![1], 'S', 0);
        h.cpu_samples = samples(30_000, |t| t.min(12_000));
        assert!(!stalled_at(&h, 16_000), "the busy part is still in the window");
        assert!(stalled_at(&h, 17_000), "the window is clear of work from 17 s on");
        // Without samples covering the window, nothing is judged.
        h.cpu_samples = samples(30_000, |_| 0).into_iter().filter(|(t, _)| *t >= 27_000).collect();
        assert!(!stalled_at(&h, 30_000));
    }

    #[test]
    fn zombies_are_counted_per_owner_with_their_parent_and_only_once_they_last() {
        let obs = Observation {
            now_ms: 10_000,
            zombies: vec![
                zombie(101, 100, Some("pool gen #0"), 5_000),
                zombie(102, 100, Some("pool gen #0"), 5_000),
                zombie(103, 100, Some("pool gen #0"), 2_500),
                zombie(104, 100, Some("pool gen #0"), 500),
                zombie(201, 1, None, 9_000),
            ],
            ..Default::default()
        };
        let f = evaluate(&obs, &th());
        assert_eq!(kinds(&f), vec![FindingKind::ZombieProcess, FindingKind::ZombieProcess]);
        assert_eq!(f[0].subject, "zombies under pool gen #0");
        assert!(f[0].summary.starts_with("pool gen #0: 3 exited child"), "{}", f[0].summary);
        assert!(f[0].summary.contains("pid 100 (python3) is sleeping"), "{}", f[0].summary);
        assert!(f[0].evidence.contains(&ev("count", "3")), "{:?}", f[0].evidence);
        assert!(f[0].fix.contains("join()") && f[0].fix.contains("spawn"), "{}", f[0].fix);
        assert_eq!(f[1].subject, "zombies under the engine itself");
    }

    #[test]
    fn a_fork_after_cuda_names_the_pids_and_the_spawn_fix() {
        let mut h = task(vec![0], vec![10, 11, 12], 'S', 0);
        h.forked_after_cuda = [11, 12]
            .map(|c| ForkObs {
                child: c,
                child_command: "pt_data_worker".into(),
                child_state: 'S',
                parent: 10,
                parent_command: "python3".into(),
                marker: "/usr/lib/x86_64-linux-gnu/libcuda.so.1".into(),
            })
            .to_vec();
        let f = evaluate(&Observation { now_ms: 1_000, holders: vec![h.clone()], ..Default::default() }, &th());
        assert_eq!(kinds(&f), vec![FindingKind::ForkAfterCuda]);
        assert!(f[0].summary.contains("2 process(es) (pid 11, 12) were forked from pid 10"), "{}", f[0].summary);
        assert!(f[0].evidence[1].1.contains("libcuda.so.1 at the same address"), "{:?}", f[0].evidence);
        for fix in ["spawn", "multiprocessing_context=\"spawn\"", "num_workers=0"] {
            assert!(f[0].fix.contains(fix), "{}", f[0].fix);
        }
        h.forked_after_cuda.clear();
        assert!(evaluate(&Observation { now_ms: 1_000, holders: vec![h], ..Default::default() }, &th()).is_empty());
    }

    #[test]
    fn no_user_facing_text_cites_internal_reports() {
        let mut h = task(vec![0], vec![1], 'S', 60_000);
        h.providers = Some(vec!["CPUExecutionProvider".into()]);
        h.cuda_overrides = vec![(1, "3".into())];
        h.forked_after_cuda = vec![ForkObs {
            child: 2,
            child_command: "python3".into(),
            child_state: 'S',
            parent: 1,
            parent_command: "python3".into(),
            marker: "/usr/lib/libcuda.so.1".into(),
        }];
        let mut inst = task(vec![0], vec![2], 'S', 0);
        inst.kind = HolderKind::Instance;
        inst.failures = 2;
        let mut d = device(0, 60_000, vec![]);
        d.foreign = vec![(9, 1 << 30, "x".into())];
        d.orphaned = vec![(8, 1 << 30, "job j/s attempt 1".into())];
        let obs = Observation {
            now_ms: 60_000,
            holders: vec![h, inst],
            devices: vec![d],
            queues: vec![QueueObs {
                pipeline: "p".into(),
                waiting: 1,
                head: "h".into(),
                head_needs: "1 GPU".into(),
                head_waited_ms: 60_000,
                idle_ms: 60_000,
                blockers: vec![],
                pool_problem: None,
            }],
            zombies: vec![zombie(5, 4, None, 10_000)],
            shm_bytes: Some(1),
        };
        let f = evaluate(&obs, &th());
        let mut seen: Vec<FindingKind> = kinds(&f);
        seen.sort();
        seen.dedup();
        // `store_unwritable` is raised by the runtime when a commit fails, not by `evaluate`.
        let evaluated: Vec<FindingKind> =
            FindingKind::ALL.into_iter().filter(|k| *k != FindingKind::StoreUnwritable).collect();
        assert_eq!(seen.len(), evaluated.len(), "every kind is exercised: {seen:?}");
        for x in &f {
            for text in [&x.summary, &x.cause, &x.fix] {
                assert!(!text.to_lowercase().contains("report 0"), "{:?}: {text}", x.kind);
            }
        }
    }
}
