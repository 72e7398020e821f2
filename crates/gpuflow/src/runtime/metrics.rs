//! Prometheus metrics (`GET /metrics`). Counters and histograms are updated as the loop acts;
//! gauges are refreshed from the loop's state at scrape time, so they are never stale.
//! Names follow Prometheus conventions; GPU gauges follow Triton's `nv_gpu_*` style.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use gpuflow_core::{AttemptResult, StageNext};

use super::*;

type Labels = Vec<(String, String)>;

/// The `resource` label of `gpuflow_lease_hold_seconds`.
const LEASE_KINDS: [&str; 4] = ["gpu", "gpu_memory", "cpu", "counter"];
/// The `state` label of `gpuflow_jobs_finished_total`.
const FINAL_STATES: [&str; 3] = ["succeeded", "failed", "cancelled"];
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// A metric whose HELP and TYPE are written even before its first series, so every family is
/// there from the engine's start (a family without series is valid OpenMetrics; the library
/// skips one by default).
#[derive(Clone, Debug)]
struct Always<M>(M);

impl<M: EncodeMetric> EncodeMetric for Always<M> {
    fn encode(&self, encoder: MetricEncoder) -> std::fmt::Result {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }
}

fn seconds_histogram() -> Histogram {
    // 5 ms .. ~3 h
    Histogram::new(exponential_buckets(0.005, 2.0, 22))
}

fn batch_histogram() -> Histogram {
    // 1, 2, 4 .. 1024 tasks
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

fn short_seconds_histogram() -> Histogram {
    // 0.5 ms .. ~35 min: a batch's queue delay is often a few milliseconds
    Histogram::new(exponential_buckets(0.0005, 2.0, 22))
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

pub(super) struct Metrics {
    registry: Registry,
    jobs_submitted: Family<Labels, Counter>,
    jobs_finished: Family<Labels, Counter>,
    queue_depth: Family<Labels, Gauge>,
    queue_wait: Histograms,
    running: Family<Labels, Gauge>,
    task_duration: Histograms,
    lease_hold: Histograms,
    retries: Family<Labels, Counter>,
    gpu_utilization: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    gpu_memory_used: Family<Labels, Gauge>,
    gpu_memory_total: Family<Labels, Gauge>,
    gpu_memory_leased: Family<Labels, Gauge>,
    pool_instances: Family<Labels, Gauge>,
    findings_open: Family<Labels, Gauge>,
    findings_opened: Family<Labels, Counter>,
    /// Worker tasks sent, batches sent, their sizes, and each task's wait from ready to sent
    /// (Triton's `nv_inference_count`, `nv_inference_exec_count`, batch sizes, queue time).
    inference_count: Family<Labels, Counter>,
    inference_exec_count: Family<Labels, Counter>,
    batch_size: Histograms,
    queue_duration: Histograms,
    /// Agent mode: writes refused because the claim's lease was no longer current.
    pub(super) fenced_writes: Counter,
    /// Agent mode: leases this agent found expired and re-queued (any agent's).
    pub(super) leases_expired: Counter,
    /// Per-pipeline handles into the families above, so a job's updates allocate no labels.
    handles: HashMap<String, PipelineHandles>,
}

/// One pipeline's counters and histograms, looked up by name without allocating.
#[derive(Default)]
struct PipelineHandles {
    submitted: Option<Counter>,
    finished: Vec<(&'static str, Counter)>,
    stages: HashMap<String, StageHandles>,
}

#[derive(Default)]
struct StageHandles {
    queue_wait: Option<Histogram>,
    retries: Option<Counter>,
    duration: Vec<(&'static str, Histogram)>,
    /// A worker stage's batch metrics, with the pool they were made for.
    batches: Option<(String, BatchHandles)>,
}

struct BatchHandles {
    tasks: Counter,
    batches: Counter,
    size: Histogram,
    queue: Histogram,
}

/// A handle from `list`, created through `make` on first use.
fn cached<M: Clone>(list: &mut Vec<(&'static str, M)>, key: &'static str, make: impl FnOnce() -> M) -> M {
    if let Some((_, m)) = list.iter().find(|(k, _)| *k == key) {
        return m.clone();
    }
    let m = make();
    list.push((key, m.clone()));
    m
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            jobs_submitted: Family::default(),
            jobs_finished: Family::default(),
            queue_depth: Family::default(),
            queue_wait: Family::new_with_constructor(seconds_histogram as fn() -> Histogram),
            running: Family::default(),
            task_duration: Family::new_with_constructor(seconds_histogram as fn() -> Histogram),
            lease_hold: Family::new_with_constructor(seconds_histogram as fn() -> Histogram),
            retries: Family::default(),
            gpu_utilization: Family::default(),
            gpu_memory_used: Family::default(),
            gpu_memory_total: Family::default(),
            gpu_memory_leased: Family::default(),
            pool_instances: Family::default(),
            findings_open: Family::default(),
            findings_opened: Family::default(),
            inference_count: Family::default(),
            inference_exec_count: Family::default(),
            batch_size: Family::new_with_constructor(batch_histogram as fn() -> Histogram),
            queue_duration: Family::new_with_constructor(short_seconds_histogram as fn() -> Histogram),
            fenced_writes: Counter::default(),
            leases_expired: Counter::default(),
            handles: HashMap::new(),
            registry: Registry::default(),
        };
        registry.register("gpuflow_jobs_submitted", "Jobs accepted", Always(m.jobs_submitted.clone()));
        registry.register(
            "gpuflow_fenced_writes",
            "Agent mode: writes refused because the claim's lease had expired (a stale agent)",
            Always(m.fenced_writes.clone()),
        );
        registry.register(
            "gpuflow_leases_expired",
            "Agent mode: expired leases this agent re-queued, whichever agent held them",
            Always(m.leases_expired.clone()),
        );
        registry.register(
            "gpuflow_jobs_finished",
            "Jobs that reached a final state, by state",
            Always(m.jobs_finished.clone()),
        );
        registry.register("gpuflow_queue_depth", "Stages waiting for resources", Always(m.queue_depth.clone()));
        registry.register(
            "gpuflow_queue_wait_seconds",
            "Time a stage waited for its resources",
            Always(m.queue_wait.clone()),
        );
        registry.register("gpuflow_running_tasks", "Attempts running now", Always(m.running.clone()));
        registry.register(
            "gpuflow_task_duration_seconds",
            "Attempt duration, by outcome",
            Always(m.task_duration.clone()),
        );
        registry.register(
            "gpuflow_lease_hold_seconds",
            "How long leases were held, by resource kind",
            Always(m.lease_hold.clone()),
        );
        registry.register("gpuflow_retries", "Attempts that ended in a retry", Always(m.retries.clone()));
        registry.register("nv_gpu_utilization_ratio", "GPU utilisation (0..1)", Always(m.gpu_utilization.clone()));
        registry.register(
            "nv_gpu_memory_used_bytes",
            "GPU memory used, as the device reports it",
            Always(m.gpu_memory_used.clone()),
        );
        registry.register("nv_gpu_memory_total_bytes", "GPU memory", Always(m.gpu_memory_total.clone()));
        registry.register(
            "gpuflow_gpu_memory_leased_bytes",
            "GPU memory leased by gpuflow",
            Always(m.gpu_memory_leased.clone()),
        );
        registry.register(
            "gpuflow_pool_instances",
            "Worker-pool instances, by state",
            Always(m.pool_instances.clone()),
        );
        registry.register("gpuflow_findings_open", "Open diagnosis findings, by kind", Always(m.findings_open.clone()));
        registry.register(
            "gpuflow_findings_opened",
            "Diagnosis findings opened, by kind",
            Always(m.findings_opened.clone()),
        );
        registry.register(
            "gpuflow_inference_count",
            "Worker tasks sent to pool instances (each task of a batch counts)",
            Always(m.inference_count.clone()),
        );
        registry.register(
            "gpuflow_inference_exec_count",
            "Batches sent to pool instances (a single task is a batch of one)",
            Always(m.inference_exec_count.clone()),
        );
        registry.register(
            "gpuflow_inference_batch_size",
            "Tasks per batch sent to a pool instance",
            Always(m.batch_size.clone()),
        );
        registry.register(
            "gpuflow_inference_queue_duration_seconds",
            "Time a worker task waited from ready to sent to an instance (queue and batch forming)",
            Always(m.queue_duration.clone()),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    fn pipeline(&mut self, pipeline: &str) -> &mut PipelineHandles {
        if !self.handles.contains_key(pipeline) {
            self.handles.insert(pipeline.to_string(), PipelineHandles::default());
        }
        self.handles.get_mut(pipeline).expect("inserted")
    }

    fn stage(&mut self, pipeline: &str, stage: &str) -> &mut StageHandles {
        let p = self.pipeline(pipeline);
        if !p.stages.contains_key(stage) {
            p.stages.insert(stage.to_string(), StageHandles::default());
        }
        p.stages.get_mut(stage).expect("inserted")
    }

    /// A batch of `size` tasks of `pipeline`.`stage` went to an instance of `pool`; `delays`
    /// are its tasks' waits from ready to sent, in ms.
    pub(super) fn batch_sent(&mut self, pool: &str, pipeline: &str, stage: &str, size: u32, delays: &[u64]) {
        let families = (
            self.inference_count.clone(),
            self.inference_exec_count.clone(),
            self.batch_size.clone(),
            self.queue_duration.clone(),
        );
        let handles = &mut self.stage(pipeline, stage).batches;
        if handles.as_ref().is_none_or(|(p, _)| p != pool) {
            let by_pool = labels(&[("pool", pool), ("pipeline", pipeline), ("stage", stage)]);
            let by_stage = labels(&[("pipeline", pipeline), ("stage", stage)]);
            *handles = Some((
                pool.to_string(),
                BatchHandles {
                    tasks: families.0.get_or_create_owned(&by_pool),
                    batches: families.1.get_or_create_owned(&by_pool),
                    size: families.2.get_or_create_owned(&by_pool),
                    queue: families.3.get_or_create_owned(&by_stage),
                },
            ));
        }
        let (_, h) = handles.as_ref().expect("set above");
        h.tasks.inc_by(size as u64);
        h.batches.inc();
        h.size.observe(size as f64);
        for d in delays {
            h.queue.observe(*d as f64 / 1000.0);
        }
    }

    pub(super) fn submitted(&mut self, pipeline: &str) {
        let family = self.jobs_submitted.clone();
        let handle = self
            .pipeline(pipeline)
            .submitted
            .get_or_insert_with(|| family.get_or_create_owned(&labels(&[("pipeline", pipeline)])));
        handle.inc();
    }

    pub(super) fn finished(&mut self, pipeline: &str, state: &'static str) {
        let family = self.jobs_finished.clone();
        let p = self.pipeline(pipeline);
        cached(&mut p.finished, state, || {
            family.get_or_create_owned(&labels(&[("pipeline", pipeline), ("state", state)]))
        })
        .inc();
    }

    pub(super) fn started(&mut self, pipeline: &str, stage: &str, queued_ms: u64) {
        let family = self.queue_wait.clone();
        let handle = self
            .stage(pipeline, stage)
            .queue_wait
            .get_or_insert_with(|| family.get_or_create_owned(&labels(&[("pipeline", pipeline), ("stage", stage)])));
        handle.observe(queued_ms as f64 / 1000.0);
    }

    pub(super) fn ended(
        &mut self,
        pipeline: &str,
        stage: &str,
        needs: &gpuflow_core::ResourceRequest,
        result: AttemptResult,
        next: StageNext,
        ran_ms: u64,
    ) {
        if result == AttemptResult::Interrupted {
            return;
        }
        let secs = ran_ms as f64 / 1000.0;
        let (durations, retries) = (self.task_duration.clone(), self.retries.clone());
        let handles = self.stage(pipeline, stage);
        let outcome = result.as_str();
        cached(&mut handles.duration, outcome, || {
            durations.get_or_create_owned(&labels(&[("pipeline", pipeline), ("stage", stage), ("outcome", outcome)]))
        })
        .observe(secs);
        if matches!(next, StageNext::Retry { .. }) {
            handles
                .retries
                .get_or_insert_with(|| {
                    retries.get_or_create_owned(&labels(&[("pipeline", pipeline), ("stage", stage)]))
                })
                .inc();
        }
        let held = [needs.gpus > 0, needs.gpu_memory > 0, needs.cpu > 0, !needs.counters.is_empty()];
        for (kind, held) in LEASE_KINDS.into_iter().zip(held) {
            if held {
                self.lease_hold.get_or_create(&labels(&[("resource", kind)])).observe(secs);
            }
        }
    }

    pub(super) fn finding_opened(&self, kind: &str) {
        self.findings_opened.get_or_create(&labels(&[("kind", kind)])).inc();
    }
}

impl<S: Store> Runtime<S> {
    /// Refreshes the gauges from the loop's state and renders the text format. Every series
    /// whose labels the configuration already names is there from the start, at 0, so a
    /// query never has to tell "nothing yet" from "no such series".
    pub(super) fn metrics_text(&self) -> String {
        let m = &self.metrics;
        m.queue_depth.clear();
        m.running.clear();
        for (name, def) in &self.config.pipelines {
            let _ = m.jobs_submitted.get_or_create_owned(&labels(&[("pipeline", name)]));
            for state in FINAL_STATES {
                let _ = m.jobs_finished.get_or_create_owned(&labels(&[("pipeline", name), ("state", state)]));
            }
            for stage in &def.core.stages {
                let by_stage = labels(&[("pipeline", name), ("stage", &stage.name)]);
                m.queue_depth.get_or_create(&by_stage).set(0);
                m.running.get_or_create(&by_stage).set(0);
                let _ = m.retries.get_or_create_owned(&by_stage);
            }
        }
        for kind in LEASE_KINDS {
            let _ = m.lease_hold.get_or_create_owned(&labels(&[("resource", kind)]));
        }
        for kind in gpuflow_core::diagnosis::FindingKind::ALL {
            let _ = m.findings_opened.get_or_create_owned(&labels(&[("kind", kind.as_str())]));
        }
        for w in self.state.waiting() {
            m.queue_depth
                .get_or_create(&labels(&[("pipeline", &w.pipeline.name), ("stage", &w.pipeline.stages[w.stage].name)]))
                .inc();
        }
        for l in self.state.leases() {
            m.running
                .get_or_create(&labels(&[("pipeline", &l.pipeline.name), ("stage", &l.pipeline.stages[l.stage].name)]))
                .inc();
        }
        let usage = self.state.inventory().usage();
        for (i, g) in self.config.gpus.iter().enumerate() {
            let id = g.cuda_id(i as u32);
            let gpu = labels(&[
                ("gpu_uuid", &id),
                ("gpu", &i.to_string()),
                ("source", if g.uuid.is_some() { "nvml" } else { "virtual" }),
            ]);
            m.gpu_memory_total.get_or_create(&gpu).set(g.memory as i64);
            let leased = if usage.gpu_exclusive.get(i).copied().unwrap_or(false) {
                g.memory
            } else {
                usage.gpu_memory_used.get(i).copied().unwrap_or(0)
            };
            m.gpu_memory_leased.get_or_create(&gpu).set(leased as i64);
            if let Some(s) = self.watchdog.devices.get(i).and_then(|t| t.latest()) {
                m.gpu_utilization.get_or_create(&gpu).set(s.utilization_pct as f64 / 100.0);
                m.gpu_memory_used.get_or_create(&gpu).set(s.memory_used as i64);
            }
        }
        m.pool_instances.clear();
        for pool in self.pool_views() {
            for inst in pool.instances {
                m.pool_instances.get_or_create(&labels(&[("pool", &pool.name), ("state", inst.state)])).inc();
            }
        }
        m.findings_open.clear();
        for kind in gpuflow_core::diagnosis::FindingKind::ALL {
            let open = self.watchdog.open.keys().filter(|(k, _)| *k == kind).count();
            m.findings_open.get_or_create(&labels(&[("kind", kind.as_str())])).set(open as i64);
        }
        let mut out = String::new();
        encode(&mut out, &m.registry).expect("writing to a String cannot fail");
        out
    }
}
