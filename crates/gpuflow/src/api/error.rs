//! API errors: `{"error": {"code", "message"}}` with a status from the error's stable code.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::runtime::EngineError;

#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `invalid_request`, `invalid_input`, `unknown_pipeline`,
    /// `unknown_stage`, `payload_too_large`, `queue_full`, `not_found`, `already_finished`,
    /// `idempotency_conflict`, `reload_refused`, `unauthorized`, `method_not_allowed`, `shutting_down`,
    /// `internal`.
    pub code: String,
    pub message: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), retry_after_s: None }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let status = match &e {
            EngineError::UnknownPipeline { .. } => StatusCode::BAD_REQUEST,
            EngineError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            EngineError::NotFound(_) => StatusCode::NOT_FOUND,
            EngineError::AlreadyFinished { .. }
            | EngineError::IdempotencyConflict { .. }
            | EngineError::ReloadRefused(_) => StatusCode::CONFLICT,
            EngineError::ShuttingDown | EngineError::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            EngineError::NotClustered => StatusCode::CONFLICT,
            EngineError::StoreUnwritable(_) => StatusCode::INSUFFICIENT_STORAGE,
            EngineError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let retry_after_s = match e {
            EngineError::QueueFull { .. } => Some(5),
            EngineError::StoreUnavailable(_) => Some(1),
            EngineError::StoreUnwritable(_) => Some(10),
            _ => None,
        };
        ApiError { status, code: e.code(), message: e.to_string(), retry_after_s }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        EngineError::from(e).into()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::BytesRejection(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "request body is larger than limits.max_request_body; send large inputs as file paths",
            ),
            JsonRejection::MissingJsonContentType(_) => {
                ApiError::bad_request("send the body as JSON with `Content-Type: application/json`")
            }
            JsonRejection::JsonSyntaxError(e) => ApiError::bad_request(format!("malformed JSON: {}", e.body_text())),
            JsonRejection::JsonDataError(e) => ApiError::bad_request(e.body_text()),
            other => ApiError::bad_request(other.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::bad_request(r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::bad_request(r.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: ErrorDetail { code: self.code.to_string(), message: self.message } };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after_s {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}
