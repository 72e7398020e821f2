//! The web dashboard: static HTML, CSS and JS modules compiled into the binary and served at
//! `/`, plus the endpoints it reads (`handlers.rs`). The page itself is public (it holds no
//! data and must be able to ask for a token); everything it shows comes from `/v1`, behind
//! the same auth as the rest of the API.

pub mod dto;
pub mod handlers;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::ApiError;

/// Nothing from anywhere but this origin: no CDN, no inline script or style.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `(file name, content type, contents)`.
const ASSETS: &[(&str, &str, &str)] = &[
    ("index.html", "text/html; charset=utf-8", include_str!("assets/index.html")),
    ("style.css", "text/css; charset=utf-8", include_str!("assets/style.css")),
    ("app.js", "text/javascript; charset=utf-8", include_str!("assets/app.js")),
    ("api.js", "text/javascript; charset=utf-8", include_str!("assets/api.js")),
    ("format.js", "text/javascript; charset=utf-8", include_str!("assets/format.js")),
    ("views.js", "text/javascript; charset=utf-8", include_str!("assets/views.js")),
    ("gpus.js", "text/javascript; charset=utf-8", include_str!("assets/gpus.js")),
    ("job.js", "text/javascript; charset=utf-8", include_str!("assets/job.js")),
    ("favicon.svg", "image/svg+xml", include_str!("assets/favicon.svg")),
];

/// Whether a path is part of the page (served without a token).
pub fn is_public(path: &str) -> bool {
    path == "/" || path.starts_with("/ui/")
}

pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/", get(|| async { asset("index.html") })).route("/ui/{file}", get(ui_file))
}

async fn ui_file(Path(file): Path<String>) -> Response {
    asset(&file)
}

fn asset(name: &str) -> Response {
    let Some((_, content_type, body)) = ASSETS.iter().find(|(n, _, _)| *n == name) else {
        let known: Vec<&str> = ASSETS.iter().map(|(n, _, _)| *n).collect();
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no dashboard file `{name}`; files: {}", known.join(", ")),
        )
        .into_response();
    };
    let mut response = (*body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // Assets change with the binary; a cheap revalidation keeps an upgraded engine's page fresh.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
