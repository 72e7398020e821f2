//! The HTTP API (axum). Handlers validate, then either read the store or ask the runtime
//! loop; they never change state themselves. The OpenAPI spec is generated from these
//! handlers and types, so it cannot drift from them.

pub mod dashboard;
pub mod dto;
pub mod error;
mod handlers;
pub mod listener;
mod spec;
mod waiting;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::SharedConfig;
use crate::runtime::EngineHandle;
use crate::store::{
    FindingRecord, IdPrefix, JobDetail, JobFilter, JobLinks, JobRecord, JobStats, RetryLinks, Store, StoreResult,
};
pub use error::ApiError;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The read side of the store, object-safe so handlers need not be generic.
pub trait Reads: Send + Sync {
    fn job<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StoreResult<Option<JobDetail>>>;
    fn list_jobs<'a>(&'a self, filter: &'a JobFilter) -> BoxFuture<'a, StoreResult<Vec<JobRecord>>>;
    fn findings(&self, limit: u32) -> BoxFuture<'_, StoreResult<Vec<FindingRecord>>>;
    fn job_stats(&self, since_ms: i64) -> BoxFuture<'_, StoreResult<JobStats>>;
    fn jobs_by_id_prefix<'a>(&'a self, prefix: &'a IdPrefix, limit: u32) -> BoxFuture<'a, StoreResult<Vec<JobRecord>>>;
    fn jobs_by_short_id<'a>(&'a self, short_id: &'a str, limit: u32) -> BoxFuture<'a, StoreResult<Vec<JobRecord>>>;
    fn retry_links<'a>(&'a self, job: &'a str) -> BoxFuture<'a, StoreResult<RetryLinks>>;
    /// The one write the API makes itself: the link from a retry to the job it retries, after
    /// the engine admitted the retry.
    fn set_retry_of<'a>(&'a self, job: &'a str, of: &'a str) -> BoxFuture<'a, StoreResult<()>>;
}

impl<S: Store + JobLinks> Reads for S {
    fn job<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StoreResult<Option<JobDetail>>> {
        Box::pin(Store::job(self, id))
    }
    fn list_jobs<'a>(&'a self, filter: &'a JobFilter) -> BoxFuture<'a, StoreResult<Vec<JobRecord>>> {
        Box::pin(Store::list_jobs(self, filter))
    }
    fn findings(&self, limit: u32) -> BoxFuture<'_, StoreResult<Vec<FindingRecord>>> {
        Box::pin(Store::findings(self, limit))
    }
    fn job_stats(&self, since_ms: i64) -> BoxFuture<'_, StoreResult<JobStats>> {
        Box::pin(Store::job_stats(self, since_ms))
    }
    fn jobs_by_id_prefix<'a>(&'a self, prefix: &'a IdPrefix, limit: u32) -> BoxFuture<'a, StoreResult<Vec<JobRecord>>> {
        Box::pin(JobLinks::jobs_by_id_prefix(self, prefix, limit))
    }
    fn jobs_by_short_id<'a>(&'a self, short_id: &'a str, limit: u32) -> BoxFuture<'a, StoreResult<Vec<JobRecord>>> {
        Box::pin(JobLinks::jobs_by_short_id(self, short_id, limit))
    }
    fn retry_links<'a>(&'a self, job: &'a str) -> BoxFuture<'a, StoreResult<RetryLinks>> {
        Box::pin(JobLinks::retry_links(self, job))
    }
    fn set_retry_of<'a>(&'a self, job: &'a str, of: &'a str) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(JobLinks::set_retry_of(self, job, of))
    }
}

#[derive(Clone)]
pub struct AppState {
    pub engine: EngineHandle,
    pub reads: Arc<dyn Reads>,
    pub config: SharedConfig,
}

#[derive(OpenApi)]
#[openapi(info(title = "gpuflow", description = "Run AI inference pipelines on GPUs without stalling."))]
struct ApiDoc;

/// The routes, with the OpenAPI document they generate. `max_body` is
/// `limits.max_request_body`; the batch endpoint alone accepts `BATCH_BODY_FACTOR` times it.
fn routes(max_body: usize) -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (schemas, paths, batch) = routes!(handlers::submit_batch);
    // The innermost body limit wins, so this one overrides the router-wide one below.
    let batch = batch.layer(DefaultBodyLimit::max(max_body.saturating_mul(handlers::BATCH_BODY_FACTOR)));
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(handlers::submit_job, handlers::list_jobs))
        .routes((schemas, paths, batch))
        .routes(routes!(handlers::get_job))
        .routes(routes!(handlers::submit_workflow))
        .routes(routes!(handlers::cancel_job))
        .routes(routes!(handlers::retry_job))
        .routes(routes!(handlers::resources))
        .routes(routes!(handlers::agents))
        .routes(routes!(handlers::reload))
        .routes(routes!(handlers::diagnosis))
        .routes(routes!(handlers::metrics))
        .routes(routes!(handlers::healthz))
        .routes(routes!(dashboard::handlers::events))
        .routes(routes!(dashboard::handlers::gpu_timeline))
        .routes(routes!(dashboard::handlers::stage_log))
        .routes(routes!(dashboard::handlers::overview))
        .routes(routes!(dashboard::handlers::pool_history))
        .split_for_parts()
}

/// The OpenAPI document of an engine without `auth` (what `gpuflow openapi` prints).
pub fn openapi_json() -> String {
    openapi_document(false).to_pretty_json().unwrap_or_default()
}

/// The OpenAPI document an engine serves: `auth` says whether `auth.token` is set, so bearer
/// auth and its 401 are documented only where a client will meet them.
pub fn openapi_document(auth: bool) -> utoipa::openapi::OpenApi {
    let mut doc = routes(0).1;
    spec::complete(&mut doc, auth);
    doc
}

pub fn router(state: AppState) -> Router {
    // Read once: a reload that changes it is refused (it needs a restart).
    let limit = state.config.get().limits.max_request_body;
    let router = routes(limit).0;
    // Both variants up front: a reload may set or clear the token.
    let documents = Arc::new([openapi_document(false), openapi_document(true)]);
    router
        .route(
            "/openapi.json",
            get(move |State(app): State<AppState>| async move {
                Json(documents[app.config.get().auth_token.is_some() as usize].clone())
            }),
        )
        .merge(dashboard::routes())
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Unknown paths and methods answer in the API's error shape too (axum's defaults send an
/// empty body, which clients cannot parse as an error; found by the API fuzz).
async fn no_route(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        "not_found",
        format!("no endpoint at `{}`; the endpoints are listed in /openapi.json", uri.path()),
    )
}

async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("`{}` does not accept {method}; the endpoints are listed in /openapi.json", uri.path()),
    )
}

/// Bearer-token check when `auth` is configured. `/healthz` stays open for probes, and the
/// dashboard's static files too (they hold no data; the page asks for the token). The live
/// feed also takes the token as `?access_token=`, since a browser's EventSource cannot set
/// headers; no other endpoint does, so tokens stay out of URLs elsewhere.
async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Result<Response, ApiError> {
    let config = state.config.get();
    let Some(expected) = config.auth_token.as_deref() else { return Ok(next.run(request).await) };
    let path = request.uri().path();
    if path == "/healthz" || dashboard::is_public(path) {
        return Ok(next.run(request).await);
    }
    let from_query = (path == "/v1/events")
        .then(|| request.uri().query())
        .flatten()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("access_token=")))
        .map(percent_decode);
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme is case-insensitive (RFC 9110); the token is not.
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim_start().to_string())
        .or(from_query);
    let presented = presented.as_deref();
    match presented {
        Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => Ok(next.run(request).await),
        _ => Err(ApiError::new(
            axum::http::StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token; send `Authorization: Bearer TOKEN` (the CLI reads GPUFLOW_TOKEN)",
        )),
    }
}

/// Decodes `%XX` escapes (and `+`) in a query value.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `Json` whose rejections use our error shape.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Json::<T>::from_request(req, state).await.map(|Json(v)| ApiJson(v)).map_err(ApiError::from)
    }
}
