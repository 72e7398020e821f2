//! The dashboard's endpoints: the live feed (SSE) and the reads the page refreshes from
//! when the feed says something changed.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use super::dto::*;
use crate::api::AppState;
use crate::api::error::{ApiError, ErrorBody};
use crate::config::StageExec;
use crate::runtime::{EngineEvent, Published};

/// How often a comment is sent on an idle feed, so proxies do not cut it.
const KEEPALIVE: Duration = Duration::from_secs(15);
const LOG_TAIL_MAX: u64 = 256 * 1024;

/// The live feed: one SSE message per state change, published after it was committed.
/// Messages are small; fetch the detail from the other endpoints. A client that falls
/// behind gets `resync` (refetch everything) instead of a silent gap.
#[utoipa::path(get, path = "/v1/events", params(EventsQuery),
    responses(
        (status = 200, description = "Server-sent events; each `data:` is an EventView", content_type = "text/event-stream", body = EventView),
        (status = 400, description = "An unknown query parameter", body = ErrorBody),
    ))]
pub async fn events(
    State(app): State<AppState>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    // The token itself was checked by the auth middleware; this only refuses unknown keys.
    let Query(_) = query?;
    let stream = feed(app.engine.journal().subscribe()).map(|view| Ok::<_, Infallible>(sse(&view)));
    let mut response = Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEPALIVE)).into_response();
    // Tell buffering proxies (nginx) to pass messages through at once.
    response.headers_mut().insert("x-accel-buffering", axum::http::HeaderValue::from_static("no"));
    Ok(response)
}

/// `hello`, then one view per published event; `resync` in place of what a lagging
/// subscriber missed. Ends when the engine is gone.
fn feed(rx: broadcast::Receiver<Arc<Published>>) -> impl Stream<Item = EventView> {
    let hello = EventView { kind: "hello".into(), ..Default::default() };
    futures_util::stream::unfold((rx, Some(hello)), |(mut rx, first)| async move {
        if let Some(hello) = first {
            return Some((hello, (rx, None)));
        }
        let view = match rx.recv().await {
            Ok(published) => event_view(&published),
            Err(RecvError::Lagged(missed)) => {
                EventView { kind: "resync".into(), missed: Some(missed), ..Default::default() }
            }
            Err(RecvError::Closed) => return None,
        };
        Some((view, (rx, None)))
    })
}

fn sse(view: &EventView) -> Event {
    let event = Event::default().event(view.kind.clone());
    let event = match view.seq {
        Some(seq) => event.id(seq.to_string()),
        None => event,
    };
    event.data(serde_json::to_string(view).unwrap_or_default())
}

fn event_view(p: &Published) -> EventView {
    let base = EventView { kind: p.event.kind().into(), seq: Some(p.seq), at_ms: Some(p.at_ms), ..Default::default() };
    match p.event.clone() {
        EngineEvent::JobSubmitted { job, pipeline } => EventView { job: Some(job), pipeline: Some(pipeline), ..base },
        EngineEvent::JobFinished { job, pipeline, state } => {
            EventView { job: Some(job), pipeline: Some(pipeline), state: Some(state.into()), ..base }
        }
        EngineEvent::AttemptStarted { job, pipeline, stage, attempt } => {
            EventView { job: Some(job), pipeline: Some(pipeline), stage: Some(stage), attempt: Some(attempt), ..base }
        }
        EngineEvent::AttemptEnded { job, pipeline, stage, attempt, result, stage_state } => EventView {
            job: Some(job),
            pipeline: Some(pipeline),
            stage: Some(stage),
            attempt: Some(attempt),
            result: Some(result.into()),
            stage_state: Some(stage_state.into()),
            ..base
        },
        EngineEvent::StageCancelled { job, pipeline, stage } => {
            EventView { job: Some(job), pipeline: Some(pipeline), stage: Some(stage), ..base }
        }
        EngineEvent::Lease { job, stage, attempt, gpus, cpu, held } => EventView {
            job: Some(job),
            stage: Some(stage),
            attempt: Some(attempt),
            gpus: Some(gpus),
            cpu: Some(cpu),
            held: Some(held),
            ..base
        },
        EngineEvent::PoolInstance { pool, index, state, restarts } => EventView {
            pool: Some(pool),
            index: Some(index),
            state: Some(state.into()),
            restarts: Some(restarts),
            ..base
        },
        EngineEvent::Progress { job, pipeline, stage, attempt, fraction, message } => EventView {
            job: Some(job),
            pipeline: Some(pipeline),
            stage: Some(stage),
            attempt: Some(attempt),
            fraction,
            message,
            ..base
        },
        EngineEvent::Findings { open } => EventView { open: Some(open), ..base },
        EngineEvent::GpuSamples { at_ms, readings } => EventView {
            at_ms: Some(at_ms),
            samples: Some(readings.into_iter().map(|r| r.map(|(u, m)| [u as u64, m])).collect()),
            ..base
        },
    }
}

/// The GPU timeline: per device, who held it and when (recent lease intervals), with its
/// utilisation and memory samples.
#[utoipa::path(get, path = "/v1/gpus/timeline", params(TimelineQuery),
    responses((status = 200, description = "Per device: lease intervals and readings", body = TimelineView),
        (status = 400, description = "`window_s` out of range, or an unknown parameter", body = ErrorBody)))]
pub async fn gpu_timeline(
    State(app): State<AppState>,
    query: Result<Query<TimelineQuery>, QueryRejection>,
) -> Result<Json<TimelineView>, ApiError> {
    let Query(q) = query?;
    let window_s = q.window_s.unwrap_or(600);
    if !(10..=3600).contains(&window_s) {
        return Err(ApiError::bad_request(format!("window_s: `{window_s}` is out of range; use 10 to 3600 seconds")));
    }
    let snap = app.engine.diagnosis().await?;
    let config = app.config.get();
    let idle_pct = config.diagnosis.thresholds.idle_utilization_pct;
    let since_ms = snap.now_ms.saturating_sub(window_s * 1000);
    let mut by_device: BTreeMap<u32, Vec<LeaseIntervalView>> = BTreeMap::new();
    // Pipelines by name, looked up once per request (a workflow chain's is rebuilt).
    let mut pipelines: BTreeMap<String, Option<Arc<crate::config::PipelineDef>>> = BTreeMap::new();
    for i in app.engine.journal().lease_intervals(since_ms) {
        // A worker stage's interval is its instance's devices; the share is the pool's.
        let def = pipelines.entry(i.pipeline.clone()).or_insert_with(|| config.pipeline(&i.pipeline).ok());
        let pool = def.as_deref().and_then(|def| worker_pool(def, &i.stage));
        let memory_bytes = i
            .memory_bytes
            .or_else(|| pool.as_deref().and_then(|p| crate::api::handlers::pool_memory_share(&config, p)));
        by_device.entry(i.device).or_default().push(LeaseIntervalView {
            job: i.job,
            pipeline: i.pipeline,
            stage: i.stage,
            attempt: i.attempt,
            memory_bytes,
            pool,
            start_ms: i.start_ms,
            end_ms: i.end_ms,
            result: i.result.map(str::to_string),
            progress: i.progress.map(crate::api::handlers::progress_view),
        });
    }
    let devices = snap
        .devices
        .into_iter()
        .map(|d| {
            let leases = by_device.remove(&d.index).unwrap_or_default();
            let held_now = leases.iter().any(|l| l.end_ms.is_none());
            let idle_now = d.sample.as_ref().is_some_and(|s| s.utilization_pct <= idle_pct);
            TimelineDeviceView {
                index: d.index,
                name: d.name,
                source: d.source,
                memory_bytes: d.memory_total,
                telemetry: d.sample.is_some() || !d.history.is_empty(),
                leases,
                samples: d.history.into_iter().filter(|s| s.0 >= since_ms).map(|(t, u, m)| [t, u as u64, m]).collect(),
                idle_under_lease: held_now && idle_now,
                idle_ms: d.idle_ms,
            }
        })
        .collect();
    Ok(Json(TimelineView { now_ms: snap.now_ms, since_ms, idle_utilization_pct: idle_pct, devices }))
}

/// The tail of a stage attempt's stdout or stderr log.
#[utoipa::path(get, path = "/v1/jobs/{id}/stages/{stage}/log",
    params(("id" = uuid::Uuid, Path, description = "Job id"), ("stage" = String, Path, description = "Stage name"), LogQuery),
    responses((status = 200, description = "The tail of the log", body = LogView),
        (status = 400, description = "The id is not a UUID, an unknown stream, `tail_bytes` out of range, or an unknown parameter", body = ErrorBody),
        (status = 404, description = "No such job, stage, attempt or log", body = ErrorBody)))]
pub async fn stage_log(
    State(app): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<LogQuery>, QueryRejection>,
) -> Result<Json<LogView>, ApiError> {
    let Path((id, stage)) = path?;
    let Query(q) = query?;
    let (_, id) = crate::api::handlers::job_id_param(&id)?;
    let stream = q.stream.unwrap_or_else(|| "stderr".into());
    if stream != "stdout" && stream != "stderr" {
        return Err(ApiError::bad_request(format!("stream: `{stream}` is not a log stream; use stdout or stderr")));
    }
    let tail = q.tail_bytes.unwrap_or(16 * 1024);
    if !(1..=LOG_TAIL_MAX).contains(&tail) {
        return Err(ApiError::bad_request(format!("tail_bytes: `{tail}` is out of range; use 1 to {LOG_TAIL_MAX}")));
    }
    let detail = app
        .reads
        .job(&id)
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no job with id `{id}`")))?;
    let Some(record) = detail.stages.iter().find(|s| s.name == stage) else {
        let known: Vec<&str> = detail.stages.iter().map(|s| s.name.as_str()).collect();
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_stage",
            format!("stage: job {id} has no stage `{stage}`; its stages: {}", known.join(", ")),
        ));
    };
    let attempt = q.attempt.unwrap_or(record.attempts);
    let mut view = LogView { job: id.clone(), stage: stage.clone(), attempt, stream: stream.clone(), ..empty_log() };
    if attempt == 0 {
        view.note = Some("the stage has not started yet".into());
        return Ok(Json(view));
    }
    if !detail.attempts.iter().any(|a| a.stage_idx == record.idx && a.attempt == attempt) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("attempt: stage `{stage}` has no attempt {attempt}; it has {} attempt(s)", record.attempts),
        ));
    }
    let config = app.config.get();
    // `pipeline` also rebuilds a workflow chain's pipeline from the name its jobs record.
    if let Some(pool) = config.pipeline(&detail.job.pipeline).ok().and_then(|def| worker_pool(&def, &stage)) {
        view.note = Some(format!(
            "a worker stage: its output goes to the log of the pool `{pool}` instance that ran it ({}/workers/)",
            config.data_dir.display()
        ));
        return Ok(Json(view));
    }
    // The stage name comes from the store, not from the request, so it cannot leave the job dir.
    let file = config.data_dir.join("jobs").join(&id).join(".gpuflow").join(format!("{stage}.{attempt}.{stream}.log"));
    match read_tail(&file, tail).await {
        Ok((size, text)) => {
            view.size_bytes = size;
            view.truncated = size > tail;
            view.text = text;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            view.note = Some(format!("the attempt wrote nothing to {stream}"));
        }
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("cannot read {}: {e}", file.display()),
            ));
        }
    }
    Ok(Json(view))
}

/// The pool a pipeline's stage runs on, if it is a worker stage.
fn worker_pool(def: &crate::config::PipelineDef, stage: &str) -> Option<String> {
    let i = def.core.stages.iter().position(|s| s.name == stage)?;
    match &def.stages[i] {
        StageExec::Worker { pool, .. } => Some(pool.clone()),
        StageExec::Command { .. } => None,
    }
}

fn empty_log() -> LogView {
    LogView {
        job: String::new(),
        stage: String::new(),
        attempt: 0,
        stream: String::new(),
        size_bytes: 0,
        truncated: false,
        text: String::new(),
        note: None,
    }
}

/// The last `max` bytes of a file (a partial first character is dropped) and its size.
async fn read_tail(path: &std::path::Path, max: u64) -> std::io::Result<(u64, String)> {
    let mut file = tokio::fs::File::open(path).await?;
    let size = file.metadata().await?.len();
    file.seek(std::io::SeekFrom::Start(size.saturating_sub(max))).await?;
    let mut bytes = Vec::with_capacity(max.min(size) as usize);
    file.take(max).read_to_end(&mut bytes).await?;
    let text = String::from_utf8_lossy(&bytes);
    let text = if size > max { text.trim_start_matches('\u{FFFD}') } else { &text };
    Ok((size, text.to_string()))
}

/// Per pipeline: jobs by state, and jobs finished per minute over the last minutes.
#[utoipa::path(get, path = "/v1/overview", params(OverviewQuery),
    responses((status = 200, description = "Jobs by state and throughput per pipeline", body = OverviewView),
        (status = 400, description = "`minutes` out of range, or an unknown parameter", body = ErrorBody)))]
pub async fn overview(
    State(app): State<AppState>,
    query: Result<Query<OverviewQuery>, QueryRejection>,
) -> Result<Json<OverviewView>, ApiError> {
    let Query(q) = query?;
    let minutes = q.minutes.unwrap_or(15);
    if !(1..=120).contains(&minutes) {
        return Err(ApiError::bad_request(format!("minutes: `{minutes}` is out of range; use 1 to 120")));
    }
    let now_ms = jiff::Timestamp::now().as_millisecond();
    let first_minute = (now_ms / 60_000 - (minutes as i64 - 1)) * 60_000;
    let stats = app.reads.job_stats(first_minute).await?;
    let bucket = |_: &str| -> Vec<ThroughputView> {
        (0..minutes as i64)
            .map(|i| ThroughputView { minute_ms: first_minute + i * 60_000, succeeded: 0, failed: 0, cancelled: 0 })
            .collect()
    };
    let mut pipelines: BTreeMap<String, PipelineStatsView> =
        app.config.get().pipelines.keys().map(|name| (name.clone(), empty_stats(name, bucket(name)))).collect();
    for (pipeline, state, n) in stats.counts {
        let p = pipelines.entry(pipeline.clone()).or_insert_with(|| empty_stats(&pipeline, bucket(&pipeline)));
        match state.as_str() {
            "queued" => p.queued += n,
            "running" => p.running += n,
            "succeeded" => p.succeeded += n,
            "failed" => p.failed += n,
            "cancelled" => p.cancelled += n,
            _ => {}
        }
    }
    for (pipeline, state, minute, n) in stats.finished {
        let Some(p) = pipelines.get_mut(&pipeline) else { continue };
        let Some(b) = p.throughput.iter_mut().find(|b| b.minute_ms == minute) else { continue };
        match state.as_str() {
            "succeeded" => b.succeeded += n,
            "failed" => b.failed += n,
            "cancelled" => b.cancelled += n,
            _ => {}
        }
    }
    Ok(Json(OverviewView { now_ms: now_ms as u64, minutes, pipelines: pipelines.into_values().collect() }))
}

fn empty_stats(name: &str, throughput: Vec<ThroughputView>) -> PipelineStatsView {
    PipelineStatsView { name: name.into(), queued: 0, running: 0, succeeded: 0, failed: 0, cancelled: 0, throughput }
}

/// Pool instance state changes (starts, failures, restarts), newest first. Kept in memory
/// since the engine started.
#[utoipa::path(get, path = "/v1/pools/history", params(PoolHistoryQuery),
    responses((status = 200, description = "Pool instance state changes, newest first", body = PoolHistoryView),
        (status = 400, description = "`limit` out of range, or an unknown parameter", body = ErrorBody)))]
pub async fn pool_history(
    State(app): State<AppState>,
    query: Result<Query<PoolHistoryQuery>, QueryRejection>,
) -> Result<Json<PoolHistoryView>, ApiError> {
    let Query(q) = query?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request(format!("limit: `{limit}` is out of range; use 1 to 500")));
    }
    let transitions = app
        .engine
        .journal()
        .pool_transitions(limit as usize)
        .into_iter()
        .map(|t| PoolTransitionView {
            at_ms: t.at_ms,
            pool: t.pool,
            index: t.index,
            from: t.from.map(str::to_string),
            to: t.to.to_string(),
            restarts: t.restarts,
            last_error: t.last_error,
        })
        .collect();
    Ok(Json(PoolHistoryView { transitions }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::EngineEvent;

    #[tokio::test]
    async fn a_lagging_subscriber_is_told_to_resync_instead_of_missing_events_silently() {
        let (tx, rx) = broadcast::channel(4);
        for seq in 1..=10 {
            let event = EngineEvent::Findings { open: seq as usize };
            tx.send(Arc::new(Published { seq, at_ms: 0, event })).unwrap();
        }
        drop(tx);
        let views: Vec<EventView> = feed(rx).collect().await;
        let kinds: Vec<(&str, Option<u64>, Option<u64>)> =
            views.iter().map(|v| (v.kind.as_str(), v.seq, v.missed)).collect();
        assert_eq!(
            kinds,
            [
                ("hello", None, None),
                ("resync", None, Some(6)),
                ("findings", Some(7), None),
                ("findings", Some(8), None),
                ("findings", Some(9), None),
                ("findings", Some(10), None),
            ]
        );
    }
}
