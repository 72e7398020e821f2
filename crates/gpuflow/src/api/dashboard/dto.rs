//! Wire types of the dashboard's endpoints (the live feed and the reads it refreshes from).

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::gpu::GpuSource;

/// One message of `GET /v1/events` (the SSE `data:`; the SSE `event:` is the same `type`).
/// Only the fields of its type are present.
#[derive(Serialize, ToSchema, Default)]
pub struct EventView {
    /// job_submitted, attempt_started, attempt_ended, stage_cancelled, job_finished, lease,
    /// pool_instance, progress, findings, gpu_samples; `hello` on connect and `resync` after falling behind (refetch
    /// everything).
    #[serde(rename = "type")]
    pub kind: String,
    /// Increases by one per event; absent on hello and resync.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Unix ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// job_finished: the job's final state; pool_instance: the instance's state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// attempt_ended: succeeded, failed, timed_out, cancelled, interrupted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// attempt_ended: the stage's state after it (succeeded, backoff, failed, cancelled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage_state: Option<String>,
    /// lease: the devices it touches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpus: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<u32>,
    /// lease: true when granted, false when returned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restarts: Option<u32>,
    /// findings: how many are open now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open: Option<usize>,
    /// gpu_samples: `[utilisation %, memory used bytes]` per device (null where unknown), taken at `at_ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<Vec<Option<[u64; 2]>>>,
    /// progress: how much of the attempt is done, 0 to 1 (absent when it reported only a
    /// message). At most 4 progress events per attempt a second: newer reports replace
    /// held-back ones, and the latest is sent before the attempt's `attempt_ended`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
    /// progress: the attempt's short status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// resync: how many events were missed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missed: Option<u64>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// The bearer token, for clients that cannot set headers (the browser's EventSource).
    /// Accepted on this endpoint only.
    pub access_token: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TimelineQuery {
    /// How far back, in seconds: 10 to 3600, default 600.
    pub window_s: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub struct LeaseIntervalView {
    pub job: String,
    pub pipeline: String,
    pub stage: String,
    pub attempt: u32,
    /// Bytes of the device's memory held; absent when the whole device was held. For a worker
    /// stage, the share its pool instance holds.
    pub memory_bytes: Option<u64>,
    /// The worker pool whose instance ran it; absent for a command stage.
    pub pool: Option<String>,
    pub start_ms: u64,
    /// Absent while held.
    pub end_ms: Option<u64>,
    /// How the attempt ended.
    pub result: Option<String>,
    /// While held: the holder's latest progress.
    pub progress: Option<crate::api::dto::ProgressView>,
}

#[derive(Serialize, ToSchema)]
pub struct TimelineDeviceView {
    pub index: u32,
    pub name: String,
    /// `virtual`: declared in the pipeline file, no physical device behind it.
    pub source: GpuSource,
    pub memory_bytes: u64,
    /// False when nothing can be read (a virtual device without telemetry): no curves.
    pub telemetry: bool,
    /// Leases on this device in the window, oldest first.
    pub leases: Vec<LeaseIntervalView>,
    /// `[unix ms, utilisation %, memory used bytes]`, oldest first.
    pub samples: Vec<[u64; 3]>,
    /// Held by a lease now while its utilisation is at or below the idle threshold.
    pub idle_under_lease: bool,
    /// How long its utilisation has been at or below the idle threshold.
    pub idle_ms: u64,
}

#[derive(Serialize, ToSchema)]
pub struct TimelineView {
    pub now_ms: u64,
    pub since_ms: u64,
    /// `diagnosis.thresholds.idle_utilization_pct`: at or below it a device counts as idle.
    pub idle_utilization_pct: u32,
    pub devices: Vec<TimelineDeviceView>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    /// stdout or stderr (default).
    pub stream: Option<String>,
    /// Default: the stage's latest attempt.
    pub attempt: Option<u32>,
    /// 1 to 262144, default 16384: how many bytes from the end.
    pub tail_bytes: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub struct LogView {
    pub job: String,
    pub stage: String,
    pub attempt: u32,
    pub stream: String,
    /// Size of the log file now (0 when the stage wrote nothing).
    pub size_bytes: u64,
    /// True when only the tail is returned.
    pub truncated: bool,
    pub text: String,
    /// Why there is no log, when there is none (e.g. a worker stage, or no attempt yet).
    pub note: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct OverviewQuery {
    /// Throughput window in minutes: 1 to 120, default 15.
    pub minutes: Option<u32>,
}

#[derive(Serialize, ToSchema)]
pub struct ThroughputView {
    /// Start of the minute, unix ms.
    pub minute_ms: i64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
}

#[derive(Serialize, ToSchema)]
pub struct PipelineStatsView {
    pub name: String,
    pub queued: u64,
    pub running: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// Jobs finished per minute, one entry per minute of the window, oldest first.
    pub throughput: Vec<ThroughputView>,
}

#[derive(Serialize, ToSchema)]
pub struct OverviewView {
    pub now_ms: u64,
    pub minutes: u32,
    pub pipelines: Vec<PipelineStatsView>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PoolHistoryQuery {
    /// 1 to 500, default 100.
    pub limit: Option<u32>,
}

#[derive(Serialize, ToSchema)]
pub struct PoolTransitionView {
    pub at_ms: u64,
    pub pool: String,
    pub index: usize,
    /// Absent for the first state seen.
    pub from: Option<String>,
    pub to: String,
    /// Restarts of this instance so far.
    pub restarts: u32,
    pub last_error: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct PoolHistoryView {
    /// Newest first.
    pub transitions: Vec<PoolTransitionView>,
}
