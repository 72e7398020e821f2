//! The HTTP API: bad input is refused clearly and persists nothing; auth; the OpenAPI spec.

use std::time::Duration;

use serde_json::{Value, json};

use crate::fixture::*;

const PIPELINES: &str = r#"
resources: {gpus: none, cpu: 1}
allowed_roots: ["{DIR}/media"]
limits: {max_request_body: 1KiB}
pipelines:
  slow:
    max_queued: 1
    stages: [{name: s, command: [sleep, "30"]}]
  typed:
    inputs:
      n: {type: integer}
      video: {type: path, required: false}
    stages: [{name: s, command: ["true"]}]
"#;

async fn raw_post(engine: &Engine, body: &str) -> (u16, Value, reqwest::header::HeaderMap) {
    let r = engine
        .http
        .post(format!("{}/v1/jobs", engine.base))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, r.json().await.unwrap_or(Value::Null), headers)
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_nothing_is_persisted() {
    let engine = Engine::start(PIPELINES).await;
    std::fs::create_dir_all(engine.path("media")).unwrap();
    let cases: Vec<(&str, String, u16, &str, &str)> = vec![
        ("unknown pipeline", json!({"pipeline": "nope"}).to_string(), 400, "unknown_pipeline", "`nope`"),
        ("malformed JSON", r#"{"pipeline": "typed""#.to_string(), 400, "invalid_request", "malformed JSON"),
        ("wrong type", json!({"pipeline": "typed", "priority": "high"}).to_string(), 400, "invalid_request", "priority"),
        ("unknown field", json!({"pipeline": "typed", "colour": 1}).to_string(), 400, "invalid_request", "colour"),
        ("input of the wrong type", json!({"pipeline": "typed", "input": {"n": "seven"}}).to_string(), 400, "invalid_input", "input.n"),
        ("missing input", json!({"pipeline": "typed", "input": {}}).to_string(), 400, "invalid_input", "input.n: is required"),
        ("undeclared input", json!({"pipeline": "typed", "input": {"n": 1, "x": 2}}).to_string(), 400, "invalid_input", "input.x"),
        ("input not an object", json!({"pipeline": "typed", "input": [1]}).to_string(), 400, "invalid_input", "JSON object"),
        ("path outside the roots", json!({"pipeline": "typed", "input": {"n": 1, "video": "/etc/passwd"}}).to_string(), 400, "invalid_input", "outside the allowed roots"),
        ("path escaping with ..", json!({"pipeline": "typed", "input": {"n": 1, "video": engine.path("media/../secret").display().to_string()}}).to_string(), 400, "invalid_input", "outside the allowed roots"),
        ("body too large", json!({"pipeline": "typed", "input": {"n": 1, "pad": "x".repeat(4096)}}).to_string(), 413, "payload_too_large", "max_request_body"),
    ];
    for (what, body, status, code, needle) in cases {
        let (got, body, _) = raw_post(&engine, &body).await;
        assert_eq!(got, status, "{what}: {body}");
        assert_eq!(body["error"]["code"], code, "{what}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{what}: `{message}` should mention `{needle}`");
    }
    let (status, body) = engine.get("/v1/jobs").await;
    assert_eq!(status, 200);
    assert_eq!(body["jobs"], json!([]), "nothing was persisted");

    // A path inside the roots is accepted and resolved.
    let ok = engine.submit("typed", json!({"n": 1, "video": engine.path("media/a.mp4").display().to_string()})).await;
    assert_eq!(engine.wait_final(&ok, Duration::from_secs(20)).await["state"], "succeeded");

    // Admission control: the second unfinished job of `slow` is refused with Retry-After.
    let first = engine.submit("slow", json!({})).await;
    let (status, body, headers) = raw_post(&engine, &json!({"pipeline": "slow"}).to_string()).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "queue_full");
    assert!(headers.get("retry-after").is_some());
    let (_, list) = engine.get("/v1/jobs?pipeline=slow").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1, "the refused job was not persisted");
    engine.post(&format!("/v1/jobs/{first}/cancel"), json!({})).await;

    for (path, status) in [
        ("/v1/jobs/not-a-uuid", 400),
        ("/v1/jobs/01a1f4c4-0000-7000-8000-000000000000", 404),
        ("/v1/jobs?state=bogus", 400),
        ("/v1/jobs?limit=0", 400),
    ] {
        let (got, body) = engine.get(path).await;
        assert_eq!(got, status, "{path}: {body}");
        assert!(body["error"]["message"].is_string(), "{path}: {body}");
    }
}

/// Any form of a job's UUID (no dashes, upper case) names the same job, on every route that
/// takes one; what is not a UUID is a 400 naming the id.
#[tokio::test]
async fn every_form_of_a_jobs_uuid_names_the_same_job() {
    let engine = Engine::start(PIPELINES).await;
    let id = engine.submit("typed", json!({"n": 1})).await;
    engine.wait_final(&id, Duration::from_secs(20)).await;
    for form in [id.replace('-', ""), id.to_uppercase()] {
        let (status, job) = engine.get(&format!("/v1/jobs/{form}")).await;
        assert_eq!((status, job["id"].as_str()), (200, Some(id.as_str())), "{form}: {job}");
        let (status, log) = engine.get(&format!("/v1/jobs/{form}/stages/s/log")).await;
        assert_eq!(status, 200, "{form}: {log}");
        let (status, cancel) = engine.post(&format!("/v1/jobs/{form}/cancel"), json!({})).await;
        assert_eq!((status, cancel["error"]["code"].as_str()), (409, Some("already_finished")), "{form}: {cancel}");
    }
    let (status, error) = engine.get("/v1/jobs/not-a-uuid").await;
    assert_eq!(status, 400);
    assert!(error["error"]["message"].as_str().unwrap().contains("`not-a-uuid`"), "{error}");
}

#[tokio::test]
async fn jobs_are_listed_newest_first_with_filters_and_cursors() {
    let engine = Engine::start(PIPELINES).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(engine.submit("typed", json!({"n": n})).await);
    }
    for id in &ids {
        engine.wait_final(id, Duration::from_secs(20)).await;
    }
    let (_, page1) = engine.get("/v1/jobs?limit=2&state=succeeded&pipeline=typed").await;
    let got: Vec<&str> = page1["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(got, vec![ids[4].as_str(), ids[3].as_str()]);
    let cursor = page1["next_cursor"].as_str().unwrap();
    let (_, page2) = engine.get(&format!("/v1/jobs?limit=2&cursor={cursor}")).await;
    let got: Vec<&str> = page2["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(got, vec![ids[2].as_str(), ids[1].as_str()]);
    let (_, page3) = engine.get(&format!("/v1/jobs?limit=2&cursor={}", page2["next_cursor"].as_str().unwrap())).await;
    assert_eq!(page3["jobs"].as_array().unwrap().len(), 1);
    assert!(page3["next_cursor"].is_null());
}

#[tokio::test]
async fn idempotency_key_gives_the_same_job_and_refuses_a_different_request() {
    let engine = Engine::start(PIPELINES).await;
    let body = json!({"pipeline": "typed", "input": {"n": 1}, "idempotency_key": "k1"});
    let (s1, a) = engine.post("/v1/jobs", body.clone()).await;
    let (s2, b) = engine.post("/v1/jobs", body).await;
    assert_eq!((s1, s2), (201, 200));
    assert_eq!(a["id"], b["id"]);
    let (s3, c) =
        engine.post("/v1/jobs", json!({"pipeline": "typed", "input": {"n": 2}, "idempotency_key": "k1"})).await;
    assert_eq!(s3, 409, "{c}");
    assert_eq!(c["error"]["code"], "idempotency_conflict");
    let (_, list) = engine.get("/v1/jobs").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn bearer_token_is_enforced_when_configured() {
    let engine = Engine::start(
        r#"
auth: {token: "s3cret-token-of-enough-length"}
resources: {gpus: none, cpu: 1}
pipelines:
  p: {stages: [{name: s, command: ["true"]}]}
"#,
    )
    .await;
    let (status, body) = engine.post("/v1/jobs", json!({"pipeline": "p"})).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "unauthorized");
    let (status, body) = engine.post("/v1/jobs/batch", json!({"jobs": [{"pipeline": "p"}]})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("unauthorized")), "{body}");
    let wrong = engine
        .http
        .get(format!("{}/v1/jobs", engine.base))
        .bearer_auth("s3cret-token-of-enough-lengtX")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let right = engine
        .http
        .get(format!("{}/v1/jobs", engine.base))
        .bearer_auth("s3cret-token-of-enough-length")
        .send()
        .await
        .unwrap();
    assert_eq!(right.status().as_u16(), 200);
    assert_eq!(engine.get("/healthz").await.0, 200, "health stays open for probes");
}

#[tokio::test]
async fn openapi_spec_covers_every_route() {
    let engine = Engine::start(PIPELINES).await;
    let (status, spec) = engine.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    for (path, method) in [
        ("/v1/jobs", "post"),
        ("/v1/jobs", "get"),
        ("/v1/jobs/batch", "post"),
        ("/v1/jobs/{id}", "get"),
        ("/v1/jobs/{id}/cancel", "post"),
        ("/v1/resources", "get"),
        ("/healthz", "get"),
    ] {
        assert!(spec["paths"][path][method].is_object(), "{method} {path} missing from the spec");
    }
    assert!(spec["components"]["schemas"]["SubmitJobRequest"].is_object());
    let batch = &spec["paths"]["/v1/jobs/batch"]["post"]["responses"];
    for status in ["201", "400", "413", "503", "507"] {
        assert!(batch[status].is_object(), "POST /v1/jobs/batch documents no {status}: {batch}");
    }
    assert!(spec["components"]["schemas"]["SubmitBatchRequest"].is_object());
    assert!(spec["components"]["schemas"]["BatchEntry"].is_object());
    check_structure(&spec);
}

/// Every operation of the document, as `(path, method, operation)`.
fn operations(spec: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            out.push((path.clone(), method.clone(), op.clone()));
        }
    }
    out
}

/// What holds whether or not auth is on: path parameters match their templates, query
/// parameters are `in: query`, every response is described, ids are UUIDs.
fn check_structure(spec: &Value) {
    for (path, method, op) in operations(spec) {
        let template: Vec<&str> =
            path.split('/').filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}'))).collect();
        let params = op["parameters"].as_array().cloned().unwrap_or_default();
        let in_path: Vec<&str> =
            params.iter().filter(|p| p["in"] == "path").map(|p| p["name"].as_str().unwrap()).collect();
        assert_eq!(in_path, template, "{method} {path}: path parameters must be exactly those of its template");
        for p in &params {
            assert!(["path", "query"].contains(&p["in"].as_str().unwrap()), "{method} {path}: {p}");
            if p["in"] == "path" {
                assert_eq!(p["required"], true, "{method} {path}: {p}");
            }
            if p["name"] == "id" {
                assert_eq!(p["schema"]["format"], "uuid", "{method} {path}: a job id is a UUID: {p}");
            }
        }
        let responses = op["responses"].as_object().unwrap();
        for (status, response) in responses {
            let description = response["description"].as_str().unwrap_or("");
            assert!(!description.trim().is_empty(), "{method} {path} {status} has no description");
        }
        let statuses: Vec<&str> = responses.keys().map(String::as_str).collect();
        if path != "/healthz" {
            for status in ["500", "503"] {
                assert!(statuses.contains(&status), "{method} {path} documents no {status}: {statuses:?}");
            }
        }
        if op["requestBody"].is_object() {
            for status in ["400", "413"] {
                assert!(statuses.contains(&status), "{method} {path} documents no {status}: {statuses:?}");
            }
        }
    }
    let query: Vec<String> = operations(spec)
        .iter()
        .flat_map(|(_, _, op)| op["parameters"].as_array().cloned().unwrap_or_default())
        .filter(|p| p["in"] == "query")
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    for name in ["limit", "cursor", "state", "stream", "tail_bytes", "window_s", "access_token", "minutes"] {
        assert!(query.contains(&name.to_string()), "`{name}` is not a query parameter: {query:?}");
    }
    let responses = |path: &str, method: &str| spec["paths"][path][method]["responses"].clone();
    for status in ["400", "404", "409"] {
        assert!(responses("/v1/jobs/{id}/cancel", "post")[status].is_object(), "cancel documents no {status}");
    }
    for path in ["/v1/jobs", "/v1/workflows", "/v1/jobs/batch"] {
        assert!(responses(path, "post")["507"].is_object(), "{path} documents no 507");
    }
    let metrics = responses("/metrics", "get");
    assert!(metrics["200"]["content"]["application/openmetrics-text"].is_object(), "{metrics}");
    let schemas = &spec["components"]["schemas"];
    let input = &schemas["SubmitJobRequest"]["properties"]["input"];
    assert_eq!(input["type"], json!(["object", "null"]), "`input: null` is accepted: {input}");
    let chain = &schemas["WorkflowConfig"]["properties"]["workflow_chain"];
    assert_eq!((chain["minItems"].as_u64(), &chain["uniqueItems"]), (Some(1), &json!(true)), "{chain}");
    assert_eq!(schemas["JobView"]["properties"]["id"]["format"], "uuid");
}

#[tokio::test]
async fn the_spec_documents_bearer_auth_and_401_only_when_a_token_is_set_and_says_what_the_server_does() {
    let engine = Engine::start(&format!("{PIPELINES}workflows:\n  stages:\n    a: {{command: [\"true\"]}}\n")).await;
    let (_, spec) = engine.get("/openapi.json").await;
    assert!(spec.get("security").is_none(), "no auth configured, none documented: {}", spec["security"]);
    assert!(spec["components"]["securitySchemes"].get("bearer").is_none());
    for (path, method, op) in operations(&spec) {
        assert!(op["responses"].get("401").is_none(), "{method} {path} documents 401 without auth");
    }
    // What the document says of bodies is what the server does.
    let (status, body) = engine.post("/v1/jobs", json!({"pipeline": "typed", "input": null})).await;
    assert_eq!(status, 400, "`typed` requires n: {body}");
    let (status, body) = engine.post("/v1/jobs", json!({"pipeline": "slow", "input": null})).await;
    assert_eq!(status, 201, "`input: null` is `{{}}`: {body}");
    let (status, body) =
        engine.post("/v1/workflows", json!({"video_path": "x", "workflow_config": {"workflow_chain": []}})).await;
    assert_eq!(status, 400, "an empty chain is refused: {body}");
    let (status, _) = engine
        .post("/v1/workflows", json!({"video_path": "x", "workflow_config": {"workflow_chain": ["a", "a"]}}))
        .await;
    assert_eq!(status, 400, "a repeated stage is refused");
    let (status, body) = engine.post("/v1/jobs/not-a-uuid/cancel", json!({})).await;
    assert_eq!(status, 400, "{body}");
    let metrics = engine.http.get(format!("{}/metrics", engine.base)).send().await.unwrap();
    assert!(metrics.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));

    let secured = Engine::start(&format!("{PIPELINES}auth: {{token: \"s3cret-token-of-enough-length\"}}\n")).await;
    let spec: Value = secured
        .http
        .get(format!("{}/openapi.json", secured.base))
        .bearer_auth("s3cret-token-of-enough-length")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    check_structure(&spec);
    assert_eq!(spec["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    assert_eq!(spec["security"], json!([{"bearer": []}]));
    for (path, method, op) in operations(&spec) {
        if path == "/healthz" {
            assert_eq!(op["security"], json!([]), "/healthz is open");
            assert!(op["responses"].get("401").is_none());
        } else {
            let description = op["responses"]["401"]["description"].as_str().unwrap_or("");
            assert!(description.contains("Bearer"), "{method} {path} documents no 401: {op}");
        }
    }
}

#[tokio::test]
async fn report_004_workflow_requests_build_a_chain_from_named_stages() {
    let mut engine = Engine::start(
        r#"
resources: {gpus: [{memory: 16GiB}], cpu: 2}
allowed_roots: ["{DIR}"]
workflows:
  input: video
  stages:
    ffmpeg.extract_keyframes:
      command: [sh, -c, 'sleep 0.5; echo "{{\"frames\": 3, \"video\": \"$1\"}}" > $GPUFLOW_OUTPUT', sh, "{input.video}"]
    paddleocr.detect_subtitle_area:
      needs: {gpu: 1}
      command: [sh, -c, 'echo "{{\"area\": \"bottom\", \"frames\": $1}}" > $GPUFLOW_OUTPUT', sh, "{stages.ffmpeg_extract_keyframes.frames}"]
    postprocess.finalize:
      command: [sh, -c, 'echo "{{\"done\": true}}" > $GPUFLOW_OUTPUT']
"#,
    )
    .await;
    let video = engine.path("v.mp4").display().to_string();
    let body = json!({"video_path": video, "workflow_config": {"workflow_chain": ["ffmpeg.extract_keyframes", "paddleocr.detect_subtitle_area", "postprocess.finalize"]}});
    let (status, created) = engine.post("/v1/workflows", body.clone()).await;
    assert_eq!(status, 201, "{created}");
    let id = created["workflow_id"].as_str().unwrap().to_string();
    // The chain survives an engine crash: its name alone rebuilds it.
    engine.kill9();
    engine.restart().await;
    let job = engine.wait_final(&id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let names: Vec<&str> = job["stages"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["ffmpeg_extract_keyframes", "paddleocr_detect_subtitle_area", "postprocess_finalize"]);
    assert_eq!(job["stages"][0]["output"]["video"], video.as_str());
    assert_eq!(job["stages"][1]["output"], json!({"area": "bottom", "frames": 3}));

    let (status, err) = engine.post("/v1/workflows", json!({"video_path": video, "workflow_config": {"workflow_chain": ["ffmpeg.extract_keyframes", "paddleocr.perfrom_ocr"]}})).await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["code"], "unknown_stage");
    let message = err["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("workflow_chain[1]: unknown stage `paddleocr.perfrom_ocr`")
            && message.contains("postprocess.finalize"),
        "{message}"
    );

    // A chain whose template needs a stage that is not before it is refused up front.
    let (status, err) = engine
        .post(
            "/v1/workflows",
            json!({"video_path": video, "workflow_config": {"workflow_chain": ["paddleocr.detect_subtitle_area"]}}),
        )
        .await;
    assert_eq!(status, 400, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("ffmpeg_extract_keyframes"), "{err}");

    let (status, err) = engine
        .post(
            "/v1/workflows",
            json!({"video_path": "/etc/passwd", "workflow_config": {"workflow_chain": ["postprocess.finalize"]}}),
        )
        .await;
    assert_eq!((status, err["error"]["code"].as_str()), (400, Some("invalid_input")), "{err}");
}

const BATCH_PIPELINES: &str = r#"
resources: {gpus: none, cpu: 2}
allowed_roots: ["{DIR}/media"]
limits: {max_request_body: 16KiB}
pipelines:
  capped:
    max_queued: 3
    stages: [{name: s, command: [sleep, "30"]}]
  typed:
    inputs:
      n: {type: integer}
      video: {type: path, required: false}
    stages: [{name: s, command: ["true"]}]
"#;

fn error_code(entry: &Value) -> Option<&str> {
    entry["error"]["code"].as_str()
}

#[tokio::test]
async fn a_batch_answers_per_job_in_order_and_bad_jobs_do_not_sink_good_ones() {
    let engine = Engine::start(BATCH_PIPELINES).await;
    let jobs = json!([
        {"pipeline": "typed", "input": {"n": 1}},
        {"pipeline": "nope"},
        {"pipeline": "typed", "input": {"n": "seven"}},
        {"pipeline": "typed", "input": {"n": 2}, "idempotency_key": "dup"},
        {"pipeline": "typed", "input": {"n": 2}, "idempotency_key": "dup"},
        {"pipeline": "typed", "input": {"n": 3}, "colour": 1},
        {"pipeline": "typed", "input": {"n": 4}, "idempotency_key": ""},
        {"pipeline": "typed", "input": {"n": 5, "video": "/etc/passwd"}},
        {"pipeline": "typed", "input": {"n": 6}, "priority": 3},
        {"pipeline": "typed", "input": {"n": 7, "pad": "x".repeat(20_000)}},
        {"pipeline": "typed", "input": {"n": 8}, "idempotency_key": "dup"},
        {"pipeline": "typed", "priority": "high"},
        7,
    ]);
    let (status, body) = engine.post("/v1/jobs/batch", json!({"jobs": jobs})).await;
    assert_eq!(status, 201, "{body}");
    let entries = body["jobs"].as_array().unwrap();
    assert_eq!(entries.len(), 13, "{body:#}");
    let expect_error = |i: usize, code: &str, status: u64, needle: &str| {
        let e = &entries[i];
        assert_eq!(error_code(e), Some(code), "entry {i}: {e}");
        assert_eq!(e["error"]["status"], status, "entry {i}: {e}");
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "entry {i}: `{message}` should mention `{needle}`");
        assert!(e["id"].is_null(), "entry {i}: {e}");
    };
    expect_error(1, "unknown_pipeline", 400, "`nope`");
    expect_error(2, "invalid_input", 400, "input.n");
    expect_error(5, "invalid_request", 400, "colour");
    expect_error(6, "invalid_request", 400, "idempotency_key");
    expect_error(7, "invalid_input", 400, "outside the allowed roots");
    expect_error(9, "payload_too_large", 413, "max_request_body");
    expect_error(10, "idempotency_conflict", 409, "dup");
    expect_error(11, "invalid_request", 400, "priority");
    expect_error(12, "invalid_request", 400, "");

    let mut good = Vec::new();
    for i in [0, 3, 8] {
        let e = &entries[i];
        assert!(e["error"].is_null(), "entry {i}: {e}");
        assert_eq!(e["created"], true, "entry {i}: {e}");
        good.push(e["id"].as_str().unwrap().to_string());
    }
    // The repeated key: the engine returns the job accepted under it, or refuses the repeat.
    let dup = &entries[4];
    match error_code(dup) {
        None => assert_eq!((&dup["id"], &dup["created"]), (&entries[3]["id"], &json!(false)), "{dup}"),
        Some(code) => assert_eq!(code, "idempotency_conflict", "{dup}"),
    }

    for id in &good {
        assert_eq!(engine.wait_final(id, Duration::from_secs(30)).await["state"], "succeeded");
    }
    assert_eq!(engine.job(&good[2]).await["priority"], 3);
    let (_, list) = engine.get("/v1/jobs").await;
    let mut listed: Vec<String> =
        list["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_string()).collect();
    listed.sort();
    good.sort();
    assert_eq!(listed, good, "only the accepted jobs were persisted");
}

#[tokio::test]
async fn a_batch_over_max_queued_admits_the_first_jobs_and_refuses_the_rest_with_queue_full() {
    let engine = Engine::start(BATCH_PIPELINES).await;
    // 1,000 jobs of small inputs fit the batch body (16 x max_request_body).
    let jobs: Vec<Value> = (0..1000)
        .map(|i| {
            json!({"pipeline": "capped", "input": {"clip": format!("/data/videos/clip-{i:04}.mp4")}, "idempotency_key": format!("order-{i:04}")})
        })
        .collect();
    let (status, body) = engine.post("/v1/jobs/batch", json!({"jobs": jobs})).await;
    assert_eq!(status, 201, "{body}");
    let entries = body["jobs"].as_array().unwrap();
    assert_eq!(entries.len(), 1000);
    let accepted: Vec<&str> = entries[..3].iter().map(|e| e["id"].as_str().expect("accepted")).collect();
    for (i, e) in entries.iter().enumerate().skip(3) {
        assert_eq!(error_code(e), Some("queue_full"), "entry {i}: {e}");
        assert_eq!(e["error"]["status"], 429, "entry {i}: {e}");
    }
    assert!(entries[3]["error"]["message"].as_str().unwrap().contains("max_queued"), "{}", entries[3]);
    let (_, list) = engine.get("/v1/jobs?pipeline=capped").await;
    let mut listed: Vec<&str> = list["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    listed.sort();
    let mut expected = accepted.clone();
    expected.sort();
    assert_eq!(listed, expected, "the refused jobs were not persisted");
    // A single submission sees the same bound.
    let (status, body) = engine.post("/v1/jobs", json!({"pipeline": "capped"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("queue_full")), "{body}");
    for id in accepted {
        engine.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
    }
}

#[tokio::test]
async fn a_batch_must_hold_1_to_1000_jobs_and_fit_the_batch_body_limit() {
    let engine = Engine::start(BATCH_PIPELINES).await;
    let job = json!({"pipeline": "typed", "input": {"n": 1}});
    for count in [0usize, 1001] {
        let (status, body) = engine.post("/v1/jobs/batch", json!({"jobs": vec![job.clone(); count]})).await;
        assert_eq!((status, error_code(&body)), (400, Some("invalid_request")), "{count}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("jobs: ")
                && message.contains(&format!("{count} jobs"))
                && message.contains("1 to 1000"),
            "{message}"
        );
    }
    for (what, body) in [
        ("no jobs field", json!({})),
        ("unknown field", json!({"jobs": [job.clone()], "colour": 1})),
        ("jobs not a list", json!({"jobs": job.clone()})),
    ] {
        let (status, body) = engine.post("/v1/jobs/batch", body).await;
        assert_eq!((status, error_code(&body)), (400, Some("invalid_request")), "{what}: {body}");
    }
    // Over 16 x max_request_body (256KiB here) as a whole.
    let big: Vec<Value> =
        (0..40).map(|_| json!({"pipeline": "typed", "input": {"n": 1, "pad": "x".repeat(8_000)}})).collect();
    let (status, body) = engine.post("/v1/jobs/batch", json!({"jobs": big})).await;
    assert_eq!((status, error_code(&body)), (413, Some("payload_too_large")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("16 x limits.max_request_body"), "{body}");
    let (_, list) = engine.get("/v1/jobs").await;
    assert_eq!(list["jobs"], json!([]), "nothing was persisted");
}
