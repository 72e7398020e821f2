//! Request handlers.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use gpuflow_core::{JobState, StageState};

use super::dto::*;
use super::error::{ApiError, ErrorBody};
use super::{ApiJson, AppState};
use crate::config::{ArgLimits, CommandInputError, Config, PipelineDef};
use crate::runtime::{MAX_BATCH, StageProgress, SubmitRequest, job_id_of};
use crate::store::{IdPrefix, JobDetail, JobFilter, JobRecord};

fn time(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map(|t| t.to_string()).unwrap_or_default()
}

pub(crate) fn progress_view(p: StageProgress) -> ProgressView {
    ProgressView { fraction: p.fraction, message: p.message, at: time(p.at_ms as i64) }
}

/// A job id from a path: any form of UUID (with or without dashes, any case) is accepted and
/// given back in the one form jobs are stored under, so every form finds the same job.
pub(super) fn job_id_param(id: &str) -> Result<(gpuflow_core::JobId, String), ApiError> {
    let job = job_id_of(id).ok_or_else(|| ApiError::bad_request(format!("id: `{id}` is not a job id (a UUID)")))?;
    Ok((job, uuid::Uuid::from_u128(job.0).to_string()))
}

/// Submit a job.
#[utoipa::path(post, path = "/v1/jobs", request_body = SubmitJobRequest,
    responses(
        (status = 201, description = "Accepted and durable", body = SubmitJobResponse),
        (status = 200, description = "An earlier job with the same idempotency key", body = SubmitJobResponse),
        (status = 400, description = "Unknown pipeline, or an input that does not match the pipeline's `inputs`", body = ErrorBody),
        (status = 409, description = "The idempotency key was used for a different submission", body = ErrorBody),
        (status = 413, description = "Body larger than limits.max_request_body; send large inputs as file paths", body = ErrorBody),
        (status = 429, description = "Queue full; see Retry-After", body = ErrorBody),
        (status = 507, description = "The store cannot be written (full disk); see Retry-After", body = ErrorBody),
    ))]
pub async fn submit_job(
    State(app): State<AppState>,
    body: Result<ApiJson<SubmitJobRequest>, ApiError>,
) -> Result<impl IntoResponse, ApiError> {
    let ApiJson(body) = body?;
    let request = check_submission(&app.config.get(), body)?;
    let submitted = app.engine.submit(request).await?;
    let status = if submitted.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(SubmitJobResponse { id: submitted.id, state: submitted.state })))
}

/// The checks `POST /v1/jobs` makes before the engine sees a submission (the batch endpoint
/// makes the same ones per job): a known pipeline, a sane idempotency key, an input that
/// matches the pipeline's declared `inputs` and stays inside `allowed_roots`.
fn check_submission(config: &Config, body: SubmitJobRequest) -> Result<SubmitRequest, ApiError> {
    let Some(def) = config.pipelines.get(&body.pipeline) else {
        let known: Vec<&str> = config.pipelines.keys().map(String::as_str).collect();
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unknown_pipeline",
            format!("pipeline: unknown pipeline `{}`; known pipelines: {}", body.pipeline, known.join(", ")),
        ));
    };
    if body.idempotency_key.as_ref().is_some_and(|k| k.is_empty() || k.chars().count() > 200) {
        return Err(ApiError::bad_request("idempotency_key: must be 1 to 200 characters"));
    }
    // `input: null` is the same as leaving it out.
    let raw = if body.input.is_null() { serde_json::Value::Object(Default::default()) } else { body.input };
    let input = def
        .validate_input(&raw, &config.allowed_roots)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", e.to_string()))?;
    check_command_line(config, def, &input)?;
    Ok(SubmitRequest { pipeline: body.pipeline, input, priority: body.priority, idempotency_key: body.idempotency_key })
}

/// Refuses an input no stage process could be started with (a NUL byte in a command-line
/// value, a command line over the OS limits), instead of accepting it and failing the stage.
fn check_command_line(config: &Config, def: &PipelineDef, input: &serde_json::Value) -> Result<(), ApiError> {
    let jobs = config.data_dir.join("jobs");
    let jobs = std::path::absolute(&jobs).unwrap_or(jobs);
    let job_dir = format!("{}/", jobs.display());
    def.check_command_input(input, &job_dir, ArgLimits::of_this_os()).map_err(|e| match e {
        CommandInputError::Nul(_) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", e.to_string()),
        CommandInputError::TooLong(_) => ApiError::new(StatusCode::BAD_REQUEST, "command_too_long", e.to_string()),
    })
}

/// How much larger than `limits.max_request_body` a batch body may be. Each job of a batch
/// is still held to `max_request_body` on its own; the default 1MiB allows 16MiB batches,
/// about 16KiB per job at 1,000 jobs.
pub const BATCH_BODY_FACTOR: usize = 16;

/// Submit up to 1,000 jobs at once. Each job is checked as `POST /v1/jobs` checks it and gets
/// its own entry, in order: the accepted ones (`id`, `state`, `created`) are admitted
/// together, the refused ones get the error `POST /v1/jobs` would have answered, and one
/// refused job does not sink the others. The body may be up to 16 times
/// `limits.max_request_body`; each job in it, up to `max_request_body`.
#[utoipa::path(post, path = "/v1/jobs/batch", request_body = SubmitBatchRequest,
    responses(
        (status = 201, description = "One entry per job, in order; check each entry: some or all may be refused", body = SubmitBatchResponse),
        (status = 400, description = "Not 1 to 1,000 jobs, or not a batch at all", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (when `auth` is set)", body = ErrorBody),
        (status = 413, description = "Body over 16 x limits.max_request_body", body = ErrorBody),
        (status = 503, description = "Shutting down, or the store is unreachable; nothing was admitted", body = ErrorBody),
        (status = 507, description = "The store cannot be written (full disk); nothing was admitted", body = ErrorBody),
    ))]
pub async fn submit_batch(
    State(app): State<AppState>,
    body: Result<ApiJson<SubmitBatchRequest>, ApiError>,
) -> Result<impl IntoResponse, ApiError> {
    let config = app.config.get();
    let ApiJson(body) = body.map_err(|mut e| {
        if e.code == "payload_too_large" {
            e.message = format!(
                "batch body is larger than {BATCH_BODY_FACTOR} x limits.max_request_body ({} bytes); send fewer jobs per request",
                config.limits.max_request_body.saturating_mul(BATCH_BODY_FACTOR)
            );
        }
        e
    })?;
    let count = body.jobs.len();
    if !(1..=MAX_BATCH).contains(&count) {
        return Err(ApiError::bad_request(format!(
            "jobs: {count} jobs in one batch; send 1 to {MAX_BATCH} per request (split a longer list into several batches)"
        )));
    }
    let mut entries: Vec<Option<BatchEntry>> = Vec::with_capacity(count);
    let mut requests = Vec::new();
    let mut slots = Vec::new();
    for item in body.jobs {
        match parse_batch_item(item, config.limits.max_request_body).and_then(|job| check_submission(&config, job)) {
            Ok(request) => {
                slots.push(entries.len());
                requests.push(request);
                entries.push(None);
            }
            Err(e) => entries.push(Some(refused(e))),
        }
    }
    if !requests.is_empty() {
        // A failure of the whole call (shutting down, store unreachable) admitted nothing.
        let answers = app.engine.submit_batch(requests).await?;
        for (slot, answer) in slots.into_iter().zip(answers) {
            entries[slot] = Some(match answer {
                Ok(s) => BatchEntry::Accepted(BatchAccepted { id: s.id, state: s.state, created: s.created }),
                Err(e) => refused(e.into()),
            });
        }
    }
    let jobs = entries
        .into_iter()
        .map(|e| {
            e.unwrap_or_else(|| {
                refused(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error: the engine gave no answer for this job; look it up before resubmitting",
                ))
            })
        })
        .collect();
    Ok((StatusCode::CREATED, Json(SubmitBatchResponse { jobs })))
}

/// One job of a batch, read as `POST /v1/jobs` reads its body, and held to the same size limit.
fn parse_batch_item(item: serde_json::Value, max_bytes: usize) -> Result<SubmitJobRequest, ApiError> {
    let size = crate::runtime::json_size(&item);
    if size > max_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "this job is {size} bytes, larger than limits.max_request_body ({max_bytes}); send large inputs as file paths"
            ),
        ));
    }
    serde_path_to_error::deserialize(item).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        ApiError::bad_request(if path == "." { inner.to_string() } else { format!("{path}: {inner}") })
    })
}

fn refused(e: ApiError) -> BatchEntry {
    BatchEntry::Refused(BatchRefused {
        error: BatchItemError { code: e.code.to_string(), message: e.message, status: e.status.as_u16() },
    })
}

/// Submit a workflow in a gateway's chain shape: a chain of named stages from `workflows.stages`.
#[utoipa::path(post, path = "/v1/workflows", request_body = WorkflowRequest,
    responses(
        (status = 201, description = "Accepted and durable", body = WorkflowResponse),
        (status = 200, description = "An earlier job with the same idempotency key", body = WorkflowResponse),
        (status = 400, description = "No `workflows:` library, an unknown or repeated stage in the chain, or a `video_path` outside `allowed_roots`", body = ErrorBody),
        (status = 409, description = "The idempotency key was used for a different submission", body = ErrorBody),
        (status = 413, description = "Body larger than limits.max_request_body", body = ErrorBody),
        (status = 429, description = "Queue full; see Retry-After", body = ErrorBody),
        (status = 507, description = "The store cannot be written (full disk); see Retry-After", body = ErrorBody),
    ))]
pub async fn submit_workflow(
    State(app): State<AppState>,
    body: Result<ApiJson<WorkflowRequest>, ApiError>,
) -> Result<impl IntoResponse, ApiError> {
    let ApiJson(body) = body?;
    let config = app.config.get();
    let Some(library) = &config.workflows else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unknown_pipeline",
            "this engine has no `workflows:` library; declare one in the pipeline file",
        ));
    };
    let def = library
        .chain(&body.workflow_config.workflow_chain)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "unknown_stage", e))?;
    if body.idempotency_key.as_ref().is_some_and(|k| k.is_empty() || k.chars().count() > 200) {
        return Err(ApiError::bad_request("idempotency_key: must be 1 to 200 characters"));
    }
    let path = crate::config::check_path(&body.video_path, &config.allowed_roots)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", format!("video_path: {e}")))?;
    let mut input = serde_json::Map::new();
    input.insert(library.input_key.clone(), path.display().to_string().into());
    let input = serde_json::Value::from(input);
    check_command_line(&config, &def, &input)?;
    let submitted = app
        .engine
        .submit(SubmitRequest {
            pipeline: def.core.name.clone(),
            input,
            priority: body.priority,
            idempotency_key: body.idempotency_key,
        })
        .await?;
    let status = if submitted.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(WorkflowResponse { workflow_id: submitted.id.clone(), id: submitted.id, state: submitted.state })))
}

/// List jobs, newest first.
#[utoipa::path(get, path = "/v1/jobs", params(JobListQuery),
    responses((status = 200, description = "A page of jobs", body = JobList),
        (status = 400, description = "An unknown state, a limit out of range, a cursor not from a previous page, or an unknown parameter", body = ErrorBody)))]
pub async fn list_jobs(
    State(app): State<AppState>,
    query: Result<Query<JobListQuery>, QueryRejection>,
) -> Result<Json<JobList>, ApiError> {
    let Query(q) = query?;
    if q.id_prefix.is_some() || q.short_id.is_some() {
        return jobs_by_id_part(&app, &q).await;
    }
    if let Some(s) = &q.state
        && gpuflow_core::JobState::parse(s).is_none()
    {
        return Err(ApiError::bad_request(format!(
            "state: `{s}` is not a job state; use queued, running, succeeded, failed or cancelled"
        )));
    }
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request(format!("limit: `{limit}` is out of range; use 1 to 500")));
    }
    let before_seq = match &q.cursor {
        None => None,
        Some(c) => Some(
            c.parse::<i64>()
                .map_err(|_| ApiError::bad_request(format!("cursor: `{c}` is not a cursor from a previous page")))?,
        ),
    };
    let state = q.state.as_deref().and_then(gpuflow_core::JobState::parse);
    let filter = JobFilter { state, pipeline: q.pipeline, before_seq, limit: limit + 1 };
    let mut rows = app.reads.list_jobs(&filter).await?;
    let next_cursor = (rows.len() > limit as usize).then(|| {
        rows.truncate(limit as usize);
        rows.last().map(|r| r.seq.to_string()).unwrap_or_default()
    });
    Ok(Json(JobList { jobs: rows.into_iter().map(summary).collect(), next_cursor }))
}

/// `GET /v1/jobs?id_prefix=` or `?short_id=`: how the CLI resolves what people type for a job
/// id. One page, newest first; more than one job means what was typed is ambiguous.
async fn jobs_by_id_part(app: &AppState, q: &JobListQuery) -> Result<Json<JobList>, ApiError> {
    if q.state.is_some()
        || q.pipeline.is_some()
        || q.cursor.is_some()
        || (q.id_prefix.is_some() && q.short_id.is_some())
    {
        return Err(ApiError::bad_request(
            "id_prefix, short_id: pass one of them alone, without state, pipeline or cursor",
        ));
    }
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request(format!("limit: `{limit}` is out of range; use 1 to 500")));
    }
    let rows = match (&q.id_prefix, &q.short_id) {
        (Some(prefix), _) => {
            let Some(parsed) = IdPrefix::parse(prefix) else {
                return Err(ApiError::bad_request(format!(
                    "id_prefix: `{prefix}` is not the start of a job id; use 1 to 32 hex digits (dashes optional)"
                )));
            };
            app.reads.jobs_by_id_prefix(&parsed, limit).await?
        }
        (None, Some(short)) => {
            if short.len() != 8 || !short.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(ApiError::bad_request(format!(
                    "short_id: `{short}` is not a short id; use the last 8 hex digits of a job id"
                )));
            }
            app.reads.jobs_by_short_id(&short.to_ascii_lowercase(), limit).await?
        }
        (None, None) => Vec::new(),
    };
    Ok(Json(JobList { jobs: rows.into_iter().map(summary).collect(), next_cursor: None }))
}

fn summary(r: JobRecord) -> JobSummary {
    JobSummary {
        id: r.id,
        pipeline: r.pipeline,
        state: r.state.as_str().to_string(),
        priority: r.priority,
        created_at: time(r.created_at),
        finished_at: r.finished_at.map(time),
        error: r.error,
    }
}

/// A job, its stages and their attempts.
#[utoipa::path(get, path = "/v1/jobs/{id}", params(("id" = uuid::Uuid, Path, description = "Job id")),
    responses((status = 200, description = "The job, its stages and their attempts; a waiting stage says what it waits for", body = JobView),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 404, description = "No job with this id", body = ErrorBody)))]
pub async fn get_job(
    State(app): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<JobView>, ApiError> {
    let (job, id) = job_id_param(&id?.0)?;
    let detail = app
        .reads
        .job(&id)
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no job with id `{id}`")))?;
    // Only a job with a stage that may wait for resources costs a question to the loop.
    let waiting = if matches!(detail.job.state, JobState::Queued | JobState::Running)
        && detail.stages.iter().any(|s| s.state == StageState::Queued)
    {
        // A stopping engine still serves the job from the store, without the reason.
        app.engine.resources().await.map(|r| super::waiting::waiting_for_job(&r, &id)).unwrap_or_default()
    } else {
        Vec::new()
    };
    let links = app.reads.retry_links(&id).await?;
    let mut view = job_view(detail, app.engine.journal().progress().of_job(job), waiting);
    view.retry_of = links.retry_of;
    view.retried_by = links.retried_by;
    Ok(Json(view))
}

/// Retry a failed or cancelled job: a new job with its pipeline, input and priority, checked
/// as `POST /v1/jobs` checks a submission against the pipeline file as it is now, and linked
/// to it (`retry_of` on the new job, `retried_by` on the old one).
#[utoipa::path(post, path = "/v1/jobs/{id}/retry", params(("id" = uuid::Uuid, Path, description = "Job id")),
    responses(
        (status = 201, description = "The new job, accepted and durable", body = RetryResponse),
        (status = 400, description = "The id is not a UUID, or the input no longer matches the pipeline", body = ErrorBody),
        (status = 404, description = "No job with this id", body = ErrorBody),
        (status = 409, description = "The job has not failed or been cancelled", body = ErrorBody),
        (status = 429, description = "Queue full; see Retry-After", body = ErrorBody),
        (status = 507, description = "The store cannot be written (full disk); see Retry-After", body = ErrorBody),
    ))]
pub async fn retry_job(
    State(app): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let (_, id) = job_id_param(&id?.0)?;
    let old = app
        .reads
        .job(&id)
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no job with id `{id}`")))?
        .job;
    if !matches!(old.state.as_str(), "failed" | "cancelled") {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_retryable",
            format!(
                "job {id} {}; only a failed or cancelled job can be retried",
                match old.state.as_str() {
                    state @ ("queued" | "running") => format!("is {state}"),
                    state => state.to_string(),
                }
            ),
        ));
    }
    let body =
        SubmitJobRequest { pipeline: old.pipeline, input: old.input, priority: old.priority, idempotency_key: None };
    let request = check_submission(&app.config.get(), body)?;
    let submitted = app.engine.submit(request).await?;
    app.reads.set_retry_of(&submitted.id, &id).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!(
                "job {} was submitted to retry {id}, but the link between them was not recorded: {e}",
                submitted.id
            ),
        )
    })?;
    Ok((StatusCode::CREATED, Json(RetryResponse { id: submitted.id, state: submitted.state, retry_of: id })))
}

/// `progress`: the running attempts' latest reports, `(stage, attempt, report)`; `waiting`:
/// what the job's stages in the waiting queue wait for, by stage name.
fn job_view(
    d: JobDetail,
    mut progress: Vec<(usize, u32, StageProgress)>,
    mut waiting: Vec<(String, WaitingForView)>,
) -> JobView {
    let names: Vec<String> = d.stages.iter().map(|s| s.name.clone()).collect();
    let job_active = matches!(d.job.state, JobState::Queued | JobState::Running);
    let stages = d
        .stages
        .iter()
        .map(|s| {
            let retry_at = s.not_before.filter(|_| s.state == StageState::Backoff).map(time);
            let waiting_for = match s.state {
                StageState::Queued => {
                    waiting.iter().position(|(name, _)| *name == s.name).map(|i| waiting.swap_remove(i).1)
                }
                StageState::Pending if job_active => Some(super::waiting::dependency(
                    s.deps
                        .iter()
                        .filter(|p| d.stages[**p].state != StageState::Succeeded)
                        .map(|p| names[*p].clone())
                        .collect(),
                )),
                StageState::Backoff => Some(super::waiting::backoff(s.failures, retry_at.clone())),
                _ => None,
            };
            StageView {
                name: s.name.clone(),
                state: s.state.as_str().to_string(),
                after: s.deps.iter().map(|p| names[*p].clone()).collect(),
                attempts: s.attempts,
                failures: s.failures,
                retry_at,
                started_at: s.started_at.map(time),
                finished_at: s.finished_at.map(time),
                exit_code: s.exit_code,
                error: s.error.clone(),
                output: s.output.clone(),
                // Only the running attempt's: the store and the board are read at
                // different moments, and an ended attempt's report must not show.
                progress: progress
                    .iter()
                    .position(|(stage, attempt, _)| *stage == s.idx && *attempt == s.attempts)
                    .filter(|_| s.state == StageState::Running)
                    .map(|i| progress_view(progress.swap_remove(i).2)),
                waiting_for,
                attempt_history: d
                    .attempts
                    .iter()
                    .filter(|a| a.stage_idx == s.idx)
                    .map(|a| AttemptView {
                        attempt: a.attempt,
                        state: a.state.clone(),
                        started_at: time(a.started_at),
                        finished_at: a.finished_at.map(time),
                        exit_code: a.exit_code,
                        signal: a.signal,
                        error: a.error.clone(),
                        lease: a.grant.clone(),
                        batch_size: a.batch_size,
                    })
                    .collect(),
            }
        })
        .collect();
    let j = d.job;
    JobView {
        id: j.id,
        pipeline: j.pipeline,
        state: j.state.as_str().to_string(),
        priority: j.priority,
        input: j.input,
        output: j.output,
        error: j.error,
        idempotency_key: j.idempotency_key,
        created_at: time(j.created_at),
        started_at: j.started_at.map(time),
        finished_at: j.finished_at.map(time),
        stages,
        retry_of: None,
        retried_by: Vec::new(),
    }
}

/// Cancel a job: stages not started are cancelled, running ones are stopped.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", params(("id" = uuid::Uuid, Path, description = "Job id")),
    responses((status = 200, description = "Cancelling, or cancelled", body = CancelResponse),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 404, description = "No job with this id", body = ErrorBody),
        (status = 409, description = "Already finished", body = ErrorBody)))]
pub async fn cancel_job(
    State(app): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<CancelResponse>, ApiError> {
    let (_, id) = job_id_param(&id?.0)?;
    let state = app.engine.cancel(id.clone()).await?;
    Ok(Json(CancelResponse { id, state }))
}

/// The agents sharing this engine's PostgreSQL queue, newest first (409 `not_clustered` on
/// an engine with the embedded store).
#[utoipa::path(get, path = "/v1/agents", responses((status = 200, description = "The agents, newest first", body = AgentsView),
    (status = 409, description = "`not_clustered`: this engine uses the embedded store", body = ErrorBody)))]
pub async fn agents(State(app): State<AppState>) -> Result<Json<AgentsView>, ApiError> {
    let agents = app
        .engine
        .agents()
        .await?
        .into_iter()
        .map(|a| AgentView {
            id: a.id,
            name: a.name,
            host: a.host,
            pid: a.pid,
            api: a.api,
            state: a.state,
            started_at: time(a.started_at),
            last_heartbeat: time(a.heartbeat_at),
            heartbeat_age_ms: a.heartbeat_age_ms,
            leases: a.leases,
            resources: a.resources,
        })
        .collect();
    Ok(Json(AgentsView { agents }))
}

/// Capacity, the leases held now, and the waiting queue in order.
#[utoipa::path(get, path = "/v1/resources", responses((status = 200, description = "Capacity, leases, the waiting queue with what each entry waits for, and pools", body = ResourcesView)))]
pub async fn resources(State(app): State<AppState>) -> Result<Json<ResourcesView>, ApiError> {
    let s = app.engine.resources().await?;
    let mut waiting_for = super::waiting::waiting_for_all(&s).into_iter();
    let gpus = s
        .gpus
        .iter()
        .enumerate()
        .map(|(i, g)| GpuView {
            index: i as u32,
            name: g.name.clone(),
            uuid: g.uuid.clone(),
            source: g.source,
            memory_bytes: g.memory,
            memory_leased_bytes: if s.usage.gpu_exclusive[i] { g.memory } else { s.usage.gpu_memory_used[i] },
            memory_foreign_bytes: s.foreign.get(i).copied().unwrap_or(0),
            exclusive: s.usage.gpu_exclusive[i],
        })
        .collect();
    let counters = s
        .capacity
        .counters
        .iter()
        .map(|(k, cap)| {
            (k.clone(), CountView { capacity: *cap, leased: s.usage.counters.get(k).copied().unwrap_or(0) })
        })
        .collect();
    let leases = s
        .leases
        .into_iter()
        .map(|l| LeaseView {
            job: l.job,
            pipeline: l.pipeline,
            stage: l.stage,
            attempt: l.attempt,
            since: time(l.since_ms as i64),
            held_ms: s.now_ms.saturating_sub(l.since_ms),
            pid: l.pid,
            gpus: l.lease.gpus,
            gpu_memory: l.lease.gpu_memory.map(|g| GpuShareView { device: g.device, bytes: g.bytes }),
            cpu: l.lease.cpu,
            counters: l.lease.counters,
            stopping: l.stopping.map(str::to_string),
        })
        .collect();
    let waiting = s
        .waiting
        .into_iter()
        .filter_map(|w| Some((w, waiting_for.next()?)))
        .map(|(w, waiting_for)| WaitingView {
            job: w.job,
            pipeline: w.pipeline,
            stage: w.stage,
            priority: w.priority,
            since: time(w.since_ms as i64),
            waited_ms: s.now_ms.saturating_sub(w.since_ms),
            needs: NeedsView {
                gpu: w.needs.gpus,
                gpu_memory_bytes: w.needs.gpu_memory,
                cpu: w.needs.cpu,
                counters: w.needs.counters,
            },
            waiting_for,
        })
        .collect();
    let config = app.config.get();
    let pools = s
        .pools
        .into_iter()
        .map(|p| PoolView {
            instances: p
                .instances
                .into_iter()
                .map(|i| InstanceView {
                    index: i.index,
                    state: i.state.to_string(),
                    pid: i.pid,
                    gpu_memory_bytes: pool_memory_share(&config, &p.name).filter(|_| !i.devices.is_empty()),
                    devices: i.devices,
                    task: i.task,
                    queued: i.queued,
                    tasks_done: i.tasks_done,
                    restarts: i.restarts,
                    consecutive_failures: i.consecutive_failures,
                    last_error: i.last_error,
                    info: i.info,
                    progress: i.progress.map(progress_view),
                })
                .collect(),
            name: p.name,
        })
        .collect();
    let cpu = CountView { capacity: s.capacity.cpu as u64, leased: s.usage.cpu as u64 };
    Ok(Json(ResourcesView { gpus, cpu, counters, leases, waiting, pools }))
}

/// The memory share each instance of a pool holds on its device: `Some` for a pool that needs
/// `gpu_memory` and no whole GPU, so pages can say "6 GiB of GPU 0" instead of "whole device".
pub(crate) fn pool_memory_share(config: &Config, pool: &str) -> Option<u64> {
    let needs = &config.workers.get(pool)?.needs;
    (needs.gpus == 0 && needs.gpu_memory > 0).then_some(needs.gpu_memory)
}

/// Re-read the pipeline file. Changes that cannot apply while jobs run are refused (409) with
/// the reason, and the running configuration stays as it was.
#[utoipa::path(post, path = "/v1/reload",
    responses((status = 200, description = "Applied; what changed", body = ReloadResponse), (status = 409, description = "Refused; nothing changed", body = ErrorBody)))]
pub async fn reload(State(app): State<AppState>) -> Result<Json<ReloadResponse>, ApiError> {
    Ok(Json(ReloadResponse { applied: app.engine.reload().await? }))
}

/// What is wrong now: stalled tasks, unused or idle GPUs, stalled queues, zombies,
/// environment hazards, each with evidence, the likely cause and the fix (`gpuflow doctor`).
#[utoipa::path(get, path = "/v1/diagnosis", responses((status = 200, description = "Open findings, recent history and GPU readings", body = DiagnosisView)))]
pub async fn diagnosis(State(app): State<AppState>) -> Result<Json<DiagnosisView>, ApiError> {
    let snap = app.engine.diagnosis().await?;
    let evidence =
        |e: &[(String, String)]| e.iter().map(|(l, v)| EvidenceView { label: l.clone(), value: v.clone() }).collect();
    let open: Vec<FindingView> = snap
        .open
        .iter()
        .map(|o| FindingView {
            id: o.id,
            kind: o.finding.kind.as_str().to_string(),
            subject: o.finding.subject.clone(),
            summary: o.finding.summary.clone(),
            evidence: evidence(&o.finding.evidence),
            cause: o.finding.cause.clone(),
            fix: o.finding.fix.clone(),
            opened_at: time(o.opened_ms as i64),
            closed_at: None,
        })
        .collect();
    let recent = app
        .reads
        .findings(100)
        .await?
        .into_iter()
        .filter(|f| f.closed_at.is_some())
        .take(50)
        .map(|f| FindingView {
            id: f.id,
            kind: f.kind,
            subject: f.subject,
            summary: f.summary,
            evidence: evidence(&f.evidence),
            cause: f.cause,
            fix: f.fix,
            opened_at: time(f.opened_at),
            closed_at: f.closed_at.map(time),
        })
        .collect();
    let gpus = snap
        .devices
        .into_iter()
        .map(|d| GpuReadingView {
            index: d.index,
            name: d.name,
            source: d.source,
            telemetry: d.sample.is_some(),
            utilization_pct: d.sample.as_ref().map(|s| s.utilization_pct),
            memory_used_bytes: d.sample.as_ref().map(|s| s.memory_used),
            memory_bytes: d.memory_total,
            idle_ms: d.idle_ms,
            processes: d
                .sample
                .map(|s| {
                    s.processes.into_iter().map(|(pid, memory_bytes)| GpuProcessView { pid, memory_bytes }).collect()
                })
                .unwrap_or_default(),
            history: d.history.into_iter().map(|(t, u, m)| [t, u as u64, m]).collect(),
        })
        .collect();
    Ok(Json(DiagnosisView { checked_at: time(snap.now_ms as i64), open, recent, gpus }))
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Metrics in the OpenMetrics text format (version 1.0.0), which Prometheus reads", body = String, content_type = "application/openmetrics-text")))]
pub async fn metrics(State(app): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let text = app.engine.metrics().await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text))
}

/// Readiness. 503 `starting` until start-up (the sweep of a dead engine's processes and
/// recovery) is done, then 200 `ok`, or 200 `degraded` with a `reason` while the store cannot
/// be written. Not behind auth.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "`ok`, or `degraded` with the reason", body = Health),
    (status = 503, description = "`starting`: start-up (sweep and recovery) is not done", body = Health)))]
pub async fn healthz(State(app): State<AppState>) -> (StatusCode, Json<Health>) {
    let ready = app.engine.is_ready();
    let reason = app.engine.degraded();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    // Degraded stays 200: the engine runs its stages and serves reads; restarting it frees nothing.
    let word = match (ready, &reason) {
        (false, _) => "starting",
        (true, Some(_)) => "degraded",
        (true, None) => "ok",
    };
    (status, Json(Health { status: word.into(), version: env!("CARGO_PKG_VERSION").into(), reason }))
}
