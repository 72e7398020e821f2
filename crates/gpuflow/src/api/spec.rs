//! Completes the OpenAPI document utoipa generates from the handlers with what every
//! operation shares: the errors any of them can answer (401 when auth is on, 500, 503, and
//! 400/413 for a body), a description on every response, and bearer auth only when the
//! engine has a token, so the document says what the server really does.

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, Response, ResponseBuilder};

/// Endpoints that answer without the token.
const OPEN_PATHS: &[&str] = &["/healthz"];

pub(super) fn complete(doc: &mut OpenApi, auth: bool) {
    for (path, item) in doc.paths.paths.iter_mut() {
        let open = OPEN_PATHS.contains(&path.as_str());
        let operations = [
            item.get.as_mut(),
            item.put.as_mut(),
            item.post.as_mut(),
            item.delete.as_mut(),
            item.options.as_mut(),
            item.head.as_mut(),
            item.patch.as_mut(),
            item.trace.as_mut(),
        ];
        for op in operations.into_iter().flatten() {
            let responses = &mut op.responses.responses;
            if auth && !open {
                let how = if path == "/v1/events" {
                    "send `Authorization: Bearer TOKEN`, or `?access_token=TOKEN` on this endpoint"
                } else {
                    "send `Authorization: Bearer TOKEN`"
                };
                responses.insert("401".into(), error(&format!("Missing or wrong bearer token; {how}")));
            } else {
                responses.remove("401");
            }
            // An open endpoint overrides the document-wide requirement with none.
            op.security = (auth && open).then(Vec::new);
            if op.request_body.is_some() {
                responses.entry("400".into()).or_insert_with(|| error(description(400)));
                responses.entry("413".into()).or_insert_with(|| error(description(413)));
            }
            if !open {
                responses.entry("500".into()).or_insert_with(|| error(description(500)));
                responses.entry("503".into()).or_insert_with(|| error(description(503)));
            }
            for (status, response) in responses.iter_mut() {
                if let RefOr::T(r) = response
                    && r.description.trim().is_empty()
                {
                    r.description = description(status.parse().unwrap_or(0)).to_string();
                }
            }
        }
    }
    if auth {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
        doc.security = Some(vec![SecurityRequirement::new("bearer", Vec::<String>::new())]);
    } else {
        doc.security = None;
        if let Some(components) = doc.components.as_mut() {
            components.security_schemes.remove("bearer");
        }
    }
}

/// An error response in the API's shape, `{"error": {"code", "message"}}`.
fn error(description: &str) -> RefOr<Response> {
    let content = ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build();
    RefOr::T(ResponseBuilder::new().description(description).content("application/json", content).build())
}

/// What a status means when the operation says nothing more specific.
fn description(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Invalid request; the message names the field, the value and the fix",
        401 => "Missing or wrong bearer token",
        404 => "Not found",
        409 => "Conflict with the current state; the message says which",
        413 => "Request body larger than limits.max_request_body",
        429 => "Queue full; retry after Retry-After seconds",
        500 => "Internal error; the message says what failed",
        503 => "Shutting down, or the store is unreachable (see Retry-After); nothing was changed",
        507 => "The store cannot be written (full disk); see Retry-After",
        _ => "See the error's code and message",
    }
}
