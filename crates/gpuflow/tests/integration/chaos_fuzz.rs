//! Chaos, API fuzzing: a property-based fuzz of every endpoint over raw HTTP (so paths reach the
//! server byte for byte: `../`, `%2e%2e`, `%00`, invalid UTF-8, very long ids), with arbitrary
//! JSON, wrong types, huge and unicode values, wrong methods and content types. Checks: no 5xx,
//! every error body is `{"error": {"code", "message"}}`, the engine still answers `/healthz`
//! and has not exited, and nothing is half-written: the store holds exactly the jobs that got a
//! 201, each with all of its stages, and passes SQLite's integrity check.
//!
//! `GPUFLOW_FUZZ_CASES` sets the number of requests (default 300); `GPUFLOW_CHAOS_SEED` replays
//! a run (it seeds proptest's generator).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::chaos::{env_count, seed};
use crate::fixture::*;
use gpuflow::store::{JobFilter, SqliteStore, Store};

const CONFIG: &str = r#"
resources: {gpus: [{memory: 16GiB}], cpu: 2}
limits: {max_request_body: 64KiB}
allowed_roots: ["{DIR}"]
diagnosis: {sample_interval: 1h}
pipelines:
  p:
    inputs: {text: {type: string}, count: {type: integer, default: 1}, file: {type: path, required: false}}
    stages:
      - {name: a, command: [echo, "{input.text}"], needs: {cpu: 1}}
      - {name: b, command: ["true"], needs: {gpu_memory: 1GiB}}
  q: {stages: [{name: s, command: ["true"]}]}
workflows:
  input: video
  stages:
    ffmpeg.extract: {command: ["true"]}
    ocr.run: {command: [echo, "{input.video}"]}
"#;

#[derive(Clone, Debug)]
struct Request {
    method: &'static str,
    target: String,
    json: bool,
    body: Vec<u8>,
}

/// Every byte outside the unreserved set as %XX, so any string makes a well-formed target.
fn encode(s: &[u8]) -> String {
    s.iter()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (*b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        "\\PC{0,40}".prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        (0usize..20_000).prop_map(|n| Value::from("ü".repeat(n))),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(
                prop_oneof![Just("pipeline".to_string()), Just("input".to_string()), "\\PC{0,12}"],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn submit_body() -> impl Strategy<Value = Value> {
    let pipeline = prop_oneof![
        4 => Just(json!("p")),
        2 => Just(json!("q")),
        1 => "\\PC{0,30}".prop_map(Value::from),
        1 => json_value(),
    ];
    let input = prop_oneof![
        3 => "\\PC{0,60}".prop_map(|t| json!({"text": t})),
        1 => ("\\PC{0,10}", json_value()).prop_map(|(t, c)| json!({"text": t, "count": c})),
        1 => ("\\PC{0,10}", "\\PC{0,30}").prop_map(|(t, f)| json!({"text": t, "file": f})),
        1 => json_value(),
    ];
    let optional = |s: BoxedStrategy<Value>| prop::option::weighted(0.3, s);
    (
        pipeline,
        prop::option::weighted(0.9, input),
        optional(prop_oneof![any::<i32>().prop_map(Value::from), json_value()].boxed()),
        optional(prop_oneof!["\\PC{0,250}".prop_map(Value::from), json_value()].boxed()),
        prop::option::weighted(0.1, ("\\PC{1,10}", json_value())),
    )
        .prop_map(|(pipeline, input, priority, key, extra)| {
            let mut m = serde_json::Map::new();
            m.insert("pipeline".into(), pipeline);
            if let Some(v) = input {
                m.insert("input".into(), v);
            }
            if let Some(v) = priority {
                m.insert("priority".into(), v);
            }
            if let Some(v) = key {
                m.insert("idempotency_key".into(), v);
            }
            if let Some((k, v)) = extra {
                m.insert(k, v);
            }
            Value::Object(m)
        })
}

fn batch_body() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => prop::collection::vec(submit_body(), 0..8).prop_map(|jobs| json!({"jobs": jobs})),
        1 => prop::collection::vec(json_value(), 0..4).prop_map(|jobs| json!({"jobs": jobs})),
        1 => json_value(),
    ]
}

fn workflow_body() -> impl Strategy<Value = Value> {
    let chain = prop_oneof![
        3 => prop::sample::subsequence(vec!["ffmpeg.extract", "ocr.run"], 0..=2)
            .prop_map(|c| json!(c)),
        1 => prop::collection::vec("\\PC{0,20}", 0..4).prop_map(|c| json!(c)),
        1 => json_value(),
    ];
    let path =
        prop_oneof![Just("{DIR}/gpuflow.yaml".to_string()), Just("{DIR}/../../etc/passwd".to_string()), "\\PC{0,40}",];
    (path, chain, prop::option::weighted(0.2, json_value())).prop_map(|(p, c, extra)| {
        let mut body = json!({"video_path": p, "workflow_config": {"workflow_chain": c}});
        if let Some(v) = extra {
            body["priority"] = v;
        }
        body
    })
}

fn id_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).to_string()),
        any::<Vec<u8>>().prop_map(|b| encode(&b)),
        "\\PC{0,20}".prop_map(|s| encode(s.as_bytes())),
        prop::sample::select(vec![
            "..",
            "%2e%2e",
            "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
            "..%2f..%2f",
            "%00",
            "a%00b",
            "%ff%fe",
            "%",
            "%zz",
            ";",
            "..;/",
            "%2F",
        ])
        .prop_map(str::to_string),
        (1usize..12_000).prop_map(|n| "a".repeat(n)),
    ]
}

fn query() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("state".to_string()),
        Just("pipeline".to_string()),
        Just("limit".to_string()),
        Just("cursor".to_string()),
        "\\PC{0,8}".prop_map(|s| encode(s.as_bytes())),
    ];
    let value = prop_oneof![
        prop::sample::select(vec!["queued", "succeeded", "0", "1", "-1", "501", "99999999999999999999", "p", ""])
            .prop_map(str::to_string),
        "\\PC{0,20}".prop_map(|s| encode(s.as_bytes())),
        any::<Vec<u8>>().prop_map(|b| encode(&b)),
    ];
    prop::collection::vec((key, value), 0..4)
        .prop_map(|kv| kv.into_iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&"))
}

fn target() -> impl Strategy<Value = String> {
    let fixed = prop::sample::select(vec![
        "/v1/jobs",
        "/v1/jobs/batch",
        "/v1/workflows",
        "/v1/resources",
        "/v1/diagnosis",
        "/v1/reload",
        "/metrics",
        "/healthz",
        "/openapi.json",
        "/",
        "/v1",
        "/v1/jobs/",
        "//v1//jobs",
        "/v1/../v1/jobs",
        "/v1/%2e%2e/v1/jobs",
        "/V1/JOBS",
    ])
    .prop_map(str::to_string);
    prop_oneof![
        3 => fixed,
        3 => id_piece().prop_map(|id| format!("/v1/jobs/{id}")),
        2 => id_piece().prop_map(|id| format!("/v1/jobs/{id}/cancel")),
        2 => query().prop_map(|q| format!("/v1/jobs?{q}")),
        1 => prop::collection::vec(id_piece(), 1..4).prop_map(|segs| format!("/{}", segs.join("/"))),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    let method = prop_oneof![
        5 => Just("POST"),
        4 => Just("GET"),
        1 => prop::sample::select(vec!["PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    ];
    let body = prop_oneof![
        4 => submit_body().prop_map(|v| v.to_string().into_bytes()),
        2 => workflow_body().prop_map(|v| v.to_string().into_bytes()),
        1 => batch_body().prop_map(|v| v.to_string().into_bytes()),
        1 => json_value().prop_map(|v| v.to_string().into_bytes()),
        1 => any::<Vec<u8>>(),
        1 => (64usize * 1024..80 * 1024).prop_map(|n| json!({"pipeline": "q", "input": {"text": "x".repeat(n)}}).to_string().into_bytes()),
        1 => Just(Vec::new()),
    ];
    let anything = (method, target(), prop::bool::weighted(0.9), body)
        .prop_map(|(method, target, json, body)| Request { method, target, json, body });
    // Half the requests are aimed where a body is read, so that many get past parsing.
    let submit = submit_body().prop_map(|v| Request {
        method: "POST",
        target: "/v1/jobs".into(),
        json: true,
        body: v.to_string().into_bytes(),
    });
    let workflow = workflow_body().prop_map(|v| Request {
        method: "POST",
        target: "/v1/workflows".into(),
        json: true,
        body: v.to_string().into_bytes(),
    });
    let batch = batch_body().prop_map(|v| Request {
        method: "POST",
        target: "/v1/jobs/batch".into(),
        json: true,
        body: v.to_string().into_bytes(),
    });
    prop_oneof![3 => submit, 1 => workflow, 1 => batch, 4 => anything]
}

struct Response {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// One request on its own connection, bytes as given; `None` if the connection failed.
async fn send(addr: &str, r: &Request, dir: &str) -> Option<Response> {
    let body = String::from_utf8(r.body.clone())
        .map(|s| s.replace("{DIR}", dir).into_bytes())
        .unwrap_or_else(|_| r.body.clone());
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\nContent-Length: {}\r\n",
        r.method,
        r.target,
        body.len()
    );
    if r.json {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str("\r\n");
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let _ = stream.write_all(head.as_bytes()).await;
    // The server may answer (413) and close before reading a large body.
    let _ = stream.write_all(&body).await;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw)).await.ok()?.ok()?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        body = dechunk(&body);
    }
    Some(Response { status, headers, body })
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
    out
}

#[test]
fn fuzzed_requests_never_get_a_5xx_always_get_the_error_shape_and_write_nothing_half() {
    let cases = env_count("GPUFLOW_FUZZ_CASES", 300) as u32;
    let seed = seed();
    eprintln!("api fuzz: {cases} requests, seed {seed} (GPUFLOW_CHAOS_SEED={seed} replays it)");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut engine = rt.block_on(Engine::start(CONFIG));
    let addr = engine.base.trim_start_matches("http://").to_string();
    let dir = engine.dir.path().display().to_string();
    let pid = engine.pid();
    // id -> the number of stages it must have in the store.
    let created: RefCell<BTreeMap<String, usize>> = RefCell::default();
    let statuses: RefCell<BTreeMap<u16, u32>> = RefCell::default();

    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config { cases, failure_persistence: None, max_shrink_iters: 64, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes));
    let result = runner.run(&request(), |req| {
        let Some(resp) = rt.block_on(send(&addr, &req, &dir)) else {
            return Err(TestCaseError::fail(format!("no HTTP answer to {} {}", req.method, req.target)));
        };
        *statuses.borrow_mut().entry(resp.status).or_default() += 1;
        prop_assert!(
            resp.status < 500,
            "{} {} -> {}: {}",
            req.method,
            req.target,
            resp.status,
            String::from_utf8_lossy(&resp.body)
        );
        prop_assert!(alive(pid as i32), "the engine exited after {} {}", req.method, req.target);
        if resp.status >= 400 && req.method != "HEAD" {
            let body: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
            let shaped = body["error"]["code"].as_str().is_some_and(|c| !c.is_empty())
                && body["error"]["message"].as_str().is_some()
                && body.as_object().is_some_and(|o| o.len() == 1);
            prop_assert!(
                shaped,
                "{} {} -> {} without the error shape: {:?}",
                req.method,
                req.target,
                resp.status,
                String::from_utf8_lossy(&resp.body)
            );
            if resp.status == 429 {
                prop_assert!(resp.headers.contains_key("retry-after"));
            }
        }
        if resp.status == 201 && req.method == "POST" {
            let body: Value = serde_json::from_slice(&resp.body).unwrap();
            let sent: Value = serde_json::from_slice(&req.body).unwrap();
            if req.target == "/v1/jobs/batch" {
                // serde also reads a struct from a list of its fields: `[[job, ...]]`, `["p", {...}]`.
                let field = |v: &Value, name: &str| v.get(name).or_else(|| v.get(0)).cloned().unwrap_or(Value::Null);
                let jobs = field(&sent, "jobs").as_array().cloned().unwrap_or_default();
                let entries = body["jobs"].as_array().cloned().unwrap_or_default();
                prop_assert_eq!(jobs.len(), entries.len(), "one entry per job: {}", body);
                for (job, entry) in jobs.iter().zip(&entries) {
                    if let Some(id) = entry["id"].as_str() {
                        let stages = if field(job, "pipeline") == "p" { 2 } else { 1 };
                        created.borrow_mut().entry(id.to_string()).or_insert(stages);
                    } else {
                        let e = &entry["error"];
                        prop_assert!(
                            e["code"].as_str().is_some_and(|c| !c.is_empty())
                                && e["message"].is_string()
                                && e["status"].as_u64().is_some_and(|s| (400..500).contains(&s)),
                            "batch entry without the error shape or with a 5xx: {}",
                            entry
                        );
                    }
                }
                return Ok(());
            }
            let stages = if req.target == "/v1/workflows" {
                sent["workflow_config"]["workflow_chain"].as_array().unwrap().len()
            } else if sent["pipeline"] == "p" {
                2
            } else {
                1
            };
            created.borrow_mut().insert(body["id"].as_str().unwrap().to_string(), stages);
        }
        Ok(())
    });
    let (created, statuses) = (created.into_inner(), statuses.into_inner());
    eprintln!("api fuzz: statuses {statuses:?}, {} jobs created", created.len());
    if let Err(e) = result {
        panic!("seed {seed}: {e}");
    }
    rt.block_on(async {
        let (status, health) = engine.get("/healthz").await;
        assert_eq!((status, &health["status"]), (200, &json!("ok")), "{health}");
    });
    assert!(alive(pid as i32), "the engine exited");
    engine.kill9();
    rt.block_on(async {
        let store = SqliteStore::open(&engine.path("data/gpuflow.db")).await.unwrap();
        let stored = store.list_jobs(&JobFilter { limit: 1_000_000, ..Default::default() }).await.unwrap();
        let ids: Vec<&String> = stored.iter().map(|j| &j.id).collect();
        assert_eq!(ids.len(), created.len(), "seed {seed}: jobs in the store vs 201 answers");
        for (id, stages) in &created {
            let detail = store.job(id).await.unwrap().unwrap_or_else(|| panic!("seed {seed}: job {id} not stored"));
            assert_eq!(detail.stages.len(), *stages, "seed {seed}: job {id} has a partial set of stages");
        }
        assert_eq!(store.integrity_check().await.unwrap(), "ok");
    });
}

/// Regression (found by the fuzz above): an unknown path or a wrong method got axum's default
/// empty 404/405 body instead of the API's error shape.
#[tokio::test]
async fn unknown_paths_and_methods_answer_in_the_error_shape() {
    let engine =
        Engine::start("resources: {gpus: none, cpu: 1}\npipelines: {q: {stages: [{name: s, command: [\"true\"]}]}}\n")
            .await;
    let addr = engine.base.trim_start_matches("http://").to_string();
    for (method, target, status, code) in [
        ("GET", "/v2/jobs", 404, "not_found"),
        ("GET", "/v1/jobs/..%2F..%2Fetc/passwd", 404, "not_found"),
        ("DELETE", "/v1/jobs", 405, "method_not_allowed"),
        ("PUT", "/v1/resources", 405, "method_not_allowed"),
    ] {
        let req = Request { method, target: target.to_string(), json: false, body: Vec::new() };
        let resp = send(&addr, &req, "").await.expect("an answer");
        let body: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
        assert_eq!(resp.status, status, "{method} {target}: {body}");
        assert_eq!(body["error"]["code"], code, "{method} {target}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("/openapi.json"), "{body}");
    }
}
