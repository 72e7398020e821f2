//! The dashboard's endpoints: the live feed (order, commit-before-publish, auth), the GPU
//! timeline, stage log tails, the overview, and the embedded page itself.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fixture::*;

const PIPELINE: &str = r#"
resources: {gpus: [{memory: 16GiB, name: vgpu}], cpu: 2}
pipelines:
  two:
    stages:
      - name: prep
        command: [sh, -c, 'for i in $(seq 1 200); do echo "err line $i" >&2; done; echo "out only"']
        needs: {cpu: 1}
      - name: infer
        command: [sleep, "1"]
        needs: {gpu: 1}
"#;

/// An open `GET /v1/events` stream, read message by message.
pub struct Feed {
    response: reqwest::Response,
    buffer: String,
}

impl Feed {
    pub async fn open(engine: &Engine, query: &str) -> Feed {
        let response = engine.http.get(format!("{}/v1/events{query}", engine.base)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{:?}", response.headers());
        let content_type = response.headers()["content-type"].to_str().unwrap().to_string();
        assert!(content_type.starts_with("text/event-stream"), "{content_type}");
        Feed { response, buffer: String::new() }
    }

    /// The next message's `data:` as JSON (keepalive comments are skipped).
    pub async fn next(&mut self, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let data: Vec<&str> = block.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim).collect();
                if data.is_empty() {
                    continue;
                }
                return serde_json::from_str(&data.join("\n")).unwrap();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = tokio::time::timeout(left, self.response.chunk())
                .await
                .expect("no event in time")
                .unwrap()
                .expect("feed closed");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

#[tokio::test]
async fn the_feed_reports_a_job_in_order_and_only_after_it_is_recorded() {
    let engine = Engine::start(PIPELINE).await;
    let mut feed = Feed::open(&engine, "").await;
    assert_eq!(feed.next(Duration::from_secs(5)).await["type"], "hello");
    let id = engine.submit("two", json!({})).await;

    let mut seen = Vec::new();
    let mut last_seq = 0;
    loop {
        let e = feed.next(Duration::from_secs(30)).await;
        if e["type"] == "gpu_samples" || e["type"] == "findings" || e["job"] != id.as_str() {
            continue;
        }
        let seq = e["seq"].as_u64().unwrap();
        assert!(seq > last_seq, "seq must increase: {seq} after {last_seq}");
        last_seq = seq;
        // Published after the commit: what the event says is already in the store.
        let job = engine.job(&id).await;
        let stage = |name: &str| job["stages"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap().clone();
        match e["type"].as_str().unwrap() {
            "attempt_started" => assert_eq!(stage(e["stage"].as_str().unwrap())["attempts"], e["attempt"], "{job:#}"),
            "attempt_ended" => {
                assert_eq!(e["result"], "succeeded", "{e}");
                assert_eq!(stage(e["stage"].as_str().unwrap())["state"], "succeeded", "{job:#}");
            }
            "job_finished" => assert_eq!(job["state"], "succeeded", "{job:#}"),
            _ => {}
        }
        let label = match e["type"].as_str().unwrap() {
            "lease" => format!(
                "lease {} {} gpus={}",
                if e["held"] == true { "granted" } else { "released" },
                e["stage"].as_str().unwrap(),
                e["gpus"]
            ),
            "job_submitted" | "job_finished" => e["type"].as_str().unwrap().to_string(),
            kind => format!("{kind} {}", e["stage"].as_str().unwrap()),
        };
        seen.push(label);
        if e["type"] == "job_finished" {
            break;
        }
    }
    assert_eq!(
        seen,
        [
            "job_submitted",
            "lease granted prep gpus=[]",
            "attempt_started prep",
            "attempt_ended prep",
            "lease released prep gpus=[]",
            "lease granted infer gpus=[0]",
            "attempt_started infer",
            "attempt_ended infer",
            "lease released infer gpus=[0]",
            "job_finished",
        ]
    );
}

#[tokio::test]
async fn the_feed_and_every_read_need_the_token_but_the_page_does_not() {
    let engine = Engine::start(&format!("auth: {{token: \"dash-token-of-enough-length\"}}\n{PIPELINE}")).await;
    let get = async |path: &str, bearer: Option<&str>| {
        let mut request = engine.http.get(format!("{}{path}", engine.base));
        if let Some(t) = bearer {
            request = request.bearer_auth(t);
        }
        request.send().await.unwrap()
    };
    for path in ["/v1/events", "/v1/events?access_token=wrong-token", "/v1/gpus/timeline", "/v1/overview"] {
        let r = get(path, None).await;
        assert_eq!(r.status(), 401, "{path}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "unauthorized", "{path}");
    }
    // The query token is for EventSource on the feed only.
    assert_eq!(get("/v1/overview?access_token=dash-token-of-enough-length", None).await.status(), 401);
    let mut feed = Feed::open(&engine, "?access_token=dash-token-of-enough-length").await;
    assert_eq!(feed.next(Duration::from_secs(5)).await["type"], "hello");
    assert_eq!(get("/v1/events", Some("dash-token-of-enough-length")).await.status(), 200);
    // Unknown query keys are refused, naming the key.
    let r = get("/v1/events?since=3", Some("dash-token-of-enough-length")).await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("since"));

    // The page and its modules are served without a token, with a CSP that forbids other origins.
    let page = get("/", None).await;
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"src="/ui/app.js""#) && !html.contains("http://") && !html.contains("https://"), "{html}");
    let js = get("/ui/app.js", None).await;
    assert_eq!(js.headers()["content-type"], "text/javascript; charset=utf-8");
    assert_eq!(get("/ui/style.css", None).await.headers()["content-type"], "text/css; charset=utf-8");
    let missing = get("/ui/nope.js", None).await;
    assert_eq!(missing.status(), 404);
    assert!(missing.text().await.unwrap().contains("app.js"), "the 404 lists the files");
}

#[tokio::test]
async fn log_tails_are_bounded_and_bad_queries_name_the_field() {
    let engine = Engine::start(PIPELINE).await;
    let id = engine.submit("two", json!({})).await;
    engine.wait_final(&id, Duration::from_secs(30)).await;
    let log = async |query: &str| engine.get(&format!("/v1/jobs/{id}/stages/{query}")).await;

    let (status, body) = log("prep/log").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["stream"].as_str(), body["attempt"].as_u64(), body["truncated"].as_bool()),
        (Some("stderr"), Some(1), Some(false))
    );
    let text = body["text"].as_str().unwrap();
    assert!(text.starts_with("err line 1\n") && text.trim_end().ends_with("err line 200"), "{text}");

    let (_, body) = log("prep/log?tail_bytes=30").await;
    assert_eq!(body["truncated"], true);
    assert!(body["size_bytes"].as_u64().unwrap() > 1000, "{body}");
    let text = body["text"].as_str().unwrap();
    assert!(text.len() <= 30 && text.trim_end().ends_with("err line 200"), "{text:?}");

    let (_, body) = log("prep/log?stream=stdout&attempt=1").await;
    assert_eq!(body["text"].as_str().unwrap().trim(), "out only");
    let (_, body) = log("infer/log").await;
    assert_eq!(body["text"], "");
    assert!(body["note"].as_str().unwrap().contains("wrote nothing"), "{body}");

    for (query, status, needle) in [
        ("prep/log?stream=both", 400, "stream: `both`"),
        ("prep/log?tail_bytes=0", 400, "tail_bytes: `0`"),
        ("prep/log?tail_bytes=999999999", 400, "tail_bytes"),
        ("prep/log?lines=3", 400, "lines"),
        ("prep/log?attempt=7", 404, "no attempt 7"),
        ("nope/log", 404, "its stages: prep, infer"),
    ] {
        let (got, body) = log(query).await;
        assert_eq!(got, status, "{query}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(needle), "{query}: {body}");
    }
    let (status, body) = engine.get("/v1/jobs/not-a-uuid/stages/prep/log").await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_request")));
}

#[tokio::test]
async fn the_gpu_timeline_holds_the_lease_interval_and_the_overview_counts_the_job() {
    let engine = Engine::start(PIPELINE).await;
    let id = engine.submit("two", json!({})).await;
    let lease_of =
        |t: &Value| t["devices"][0]["leases"].as_array().unwrap().iter().find(|l| l["job"] == id.as_str()).cloned();

    // While the GPU stage runs: an open interval, and the device is labelled virtual.
    let mut open = None;
    engine
        .wait_until("an open lease on the timeline", Duration::from_secs(20), async |e| {
            let (_, t) = e.get("/v1/gpus/timeline").await;
            open = lease_of(&t).filter(|l| l["end_ms"].is_null());
            open.is_some()
        })
        .await;
    let open = open.unwrap();
    assert_eq!(
        (open["stage"].as_str(), open["attempt"].as_u64(), open["memory_bytes"].as_u64()),
        (Some("infer"), Some(1), None)
    );

    engine.wait_final(&id, Duration::from_secs(30)).await;
    let (status, t) = engine.get("/v1/gpus/timeline?window_s=60").await;
    assert_eq!(status, 200, "{t}");
    let device = &t["devices"][0];
    assert_eq!((device["source"].as_str(), device["name"].as_str()), (Some("virtual"), Some("vgpu")));
    assert_eq!(device["telemetry"], false, "a virtual device without telemetry has no readings");
    let closed = lease_of(&t).expect("the finished lease stays on the timeline");
    let (start, end) = (closed["start_ms"].as_u64().unwrap(), closed["end_ms"].as_u64().unwrap());
    assert_eq!(start, open["start_ms"].as_u64().unwrap());
    assert!((900..10_000).contains(&(end - start)), "held {} ms for a 1 s stage", end - start);
    assert_eq!(closed["result"], "succeeded");
    assert!(t["since_ms"].as_u64().unwrap() <= start && end <= t["now_ms"].as_u64().unwrap());
    let (status, body) = engine.get("/v1/gpus/timeline?window_s=5").await;
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().unwrap().contains("window_s: `5`"), "{body}");

    let (status, o) = engine.get("/v1/overview?minutes=5").await;
    assert_eq!(status, 200, "{o}");
    let p = &o["pipelines"][0];
    assert_eq!(
        (p["name"].as_str(), p["succeeded"].as_u64(), p["queued"].as_u64(), p["running"].as_u64()),
        (Some("two"), Some(1), Some(0), Some(0))
    );
    let buckets = p["throughput"].as_array().unwrap();
    assert_eq!(buckets.len(), 5);
    assert_eq!(buckets.iter().map(|b| b["succeeded"].as_u64().unwrap()).sum::<u64>(), 1, "{o}");
    assert_eq!(engine.get("/v1/overview?minutes=0").await.0, 400);

    let (status, h) = engine.get("/v1/pools/history").await;
    assert_eq!((status, h["transitions"].clone()), (200, json!([])));

    // Every new endpoint is in the OpenAPI document.
    let (_, spec) = engine.get("/openapi.json").await;
    for path in
        ["/v1/events", "/v1/gpus/timeline", "/v1/jobs/{id}/stages/{stage}/log", "/v1/overview", "/v1/pools/history"]
    {
        assert!(spec["paths"][path]["get"].is_object(), "{path} missing from /openapi.json");
    }
}

#[tokio::test]
async fn a_pool_instance_share_is_reported_on_the_instance_and_on_its_stages_timeline_interval() {
    let config = r#"
resources: {gpus: [{memory: 16GiB, name: vgpu}], cpu: 2}
workers:
  model:
    command: [python3, "{DIR}/worker.py"]
    instances: 1
    needs: {gpu_memory: 6GiB}
    startup_timeout: 20s
pipelines:
  pooled:
    stages:
      - {name: infer, worker: model}
  plain:
    stages:
      - {name: infer, command: [sleep, "0.3"], needs: {gpu_memory: 2GiB}}
allowed_roots: ["{DIR}"]
workflows:
  stages:
    model.infer: {worker: model}
"#;
    let engine =
        Engine::start_with_files(config, &[("worker.py", crate::pools::WORKER), ("video.mp4", "not a video")]).await;
    let instance = |r: &Value| {
        r["pools"].as_array().unwrap().iter().find(|p| p["name"] == "model").unwrap()["instances"][0].clone()
    };
    engine
        .wait_until("the pool instance ready", Duration::from_secs(30), async |e| {
            instance(&e.resources().await)["state"] == "idle"
        })
        .await;
    let r = engine.resources().await;
    assert_eq!(instance(&r)["gpu_memory_bytes"], 6u64 << 30, "the instance's standing share: {r:#}");
    assert_eq!(r["gpus"][0]["memory_leased_bytes"], 6u64 << 30, "{r:#}");

    let pooled = engine.submit("pooled", json!({})).await;
    let plain = engine.submit("plain", json!({})).await;
    let video = engine.path("video.mp4").display().to_string();
    let (status, body) = engine
        .post("/v1/workflows", json!({"video_path": video, "workflow_config": {"workflow_chain": ["model.infer"]}}))
        .await;
    assert_eq!(status, 201, "{body}");
    let chained = body["id"].as_str().unwrap().to_string();
    for job in [&pooled, &plain, &chained] {
        engine.wait_final(job, Duration::from_secs(30)).await;
    }
    let (status, t) = engine.get("/v1/gpus/timeline?window_s=60").await;
    assert_eq!(status, 200, "{t}");
    let leases = t["devices"][0]["leases"].as_array().unwrap();
    let of = |job: &str| {
        leases.iter().find(|l| l["job"] == job).cloned().unwrap_or_else(|| panic!("no interval for {job}: {t:#}"))
    };
    // A worker stage holds its instance's share, not the whole device.
    let worker = of(&pooled);
    assert_eq!(
        (worker["memory_bytes"].as_u64(), worker["pool"].as_str()),
        (Some(6u64 << 30), Some("model")),
        "{worker:#}"
    );
    // Also in a workflow chain, whose pipeline is rebuilt from the name its job records.
    let chain_worker = of(&chained);
    assert_eq!(
        (chain_worker["memory_bytes"].as_u64(), chain_worker["pool"].as_str()),
        (Some(6u64 << 30), Some("model"))
    );
    let (_, log) = engine.get(&format!("/v1/jobs/{chained}/stages/model_infer/log")).await;
    assert!(log["note"].as_str().unwrap_or_default().contains("pool `model`"), "{log}");
    let command = of(&plain);
    assert_eq!((command["memory_bytes"].as_u64(), command["pool"].as_str()), (Some(2u64 << 30), None), "{command:#}");
}
