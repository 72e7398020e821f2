//! Why a stage waits, from the API: `GET /v1/resources` (each waiting entry's `waiting_for`)
//! and `GET /v1/jobs/{id}` (each waiting stage's), one test per situation the scheduler can
//! be in, and `gpuflow submit --wait` saying a stage waits behind a crash-looping pool.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::fixture::*;

/// Holds one GPU, one CPU slot and the one `license` until `{DIR}/go` exists.
const HOLD: &str = r#"{name: hold, needs: {gpu: 1, cpu: 1, counters: {license: 1}}, command: [sh, -c, 'while [ ! -e "{DIR}/go" ]; do sleep 0.05; done']}"#;

fn config() -> String {
    format!(
        r#"
resources: {{gpus: [{{memory: 16GiB}}], cpu: 2, counters: {{license: 1}}}}
pipelines:
  hold:
    stages:
      - {HOLD}
      - {{name: after, command: ["true"]}}
  whole:
    stages: [{{name: whole, needs: {{gpu: 1}}, command: ["true"]}}]
  share:
    stages: [{{name: share, needs: {{gpu_memory: 8GiB}}, command: ["true"]}}]
  lic:
    stages: [{{name: lic, needs: {{counters: {{license: 1}}}}, command: ["true"]}}]
  cpu2:
    stages: [{{name: cpu2, needs: {{cpu: 2}}, command: ["true"]}}]
  flaky:
    stages: [{{name: flaky, command: [sh, -c, "exit 1"], retry: {{max_attempts: 2, backoff: {{initial: 10m}}}}}}]
"#
    )
}

fn entry<'a>(resources: &'a Value, job: &str) -> &'a Value {
    resources["waiting"].as_array().unwrap().iter().find(|w| w["job"] == job).unwrap_or(&Value::Null)
}

/// Waits until `job`'s stage is in `state` and says why.
async fn waiting_stage(engine: &Engine, job: &str, name: &str, state: &str) -> Value {
    engine
        .wait_until(&format!("{name} {state} with a reason"), Duration::from_secs(20), async |e| {
            let j = e.job(job).await;
            stage(&j, name)["state"] == state && stage(&j, name)["waiting_for"].is_object()
        })
        .await;
    stage(&engine.job(job).await, name).clone()
}

fn holder_job(reason: &Value) -> Vec<String> {
    reason["held_by"].as_array().unwrap().iter().map(|h| h["job"].as_str().unwrap_or("").to_string()).collect()
}

#[tokio::test]
async fn each_blocked_resource_is_named_with_its_numbers_and_holder() {
    let engine = Engine::start(&config()).await;
    let hold = engine.submit("hold", json!({})).await;
    engine
        .wait_until("hold running", Duration::from_secs(20), async |e| {
            stage(&e.job(&hold).await, "hold")["state"] == "running"
        })
        .await;
    let short = &hold[hold.len() - 8..];

    // Its next stage waits for it.
    let after = waiting_stage(&engine, &hold, "after", "pending").await;
    let reason = &after["waiting_for"]["reasons"][0];
    assert_eq!(reason["kind"], "dependency", "{after:#}");
    assert_eq!(reason["after"], json!(["hold"]));
    assert_eq!(after["waiting_for"]["sentence"], "Waits for stage hold to finish");

    let whole = engine.submit("whole", json!({})).await;
    let share = engine.submit("share", json!({})).await;
    let lic = engine.submit("lic", json!({})).await;
    let cpu2 = engine.submit("cpu2", json!({})).await;

    let w = waiting_stage(&engine, &whole, "whole", "queued").await;
    let r = &w["waiting_for"]["reasons"][0];
    assert_eq!((r["kind"].as_str(), r["needs"].as_u64(), r["free"].as_u64()), (Some("gpu"), Some(1), Some(0)), "{w:#}");
    assert_eq!(holder_job(r), [hold.as_str()]);
    assert_eq!(w["waiting_for"]["sentence"], format!("Needs 1 GPU, the only one is held by {short}/hold"));

    let s = waiting_stage(&engine, &share, "share", "queued").await;
    let r = &s["waiting_for"]["reasons"][0];
    assert_eq!(r["kind"], "gpu_memory", "{s:#}");
    assert_eq!((r["needs_bytes"].as_u64(), r["free_at_most_bytes"].as_u64()), (Some(8 << 30), Some(0)));
    assert_eq!(
        s["waiting_for"]["sentence"],
        format!("Needs 8 GiB of GPU memory, at most 0 B free; held by {short}/hold")
    );

    let l = waiting_stage(&engine, &lic, "lic", "queued").await;
    let r = &l["waiting_for"]["reasons"][0];
    assert_eq!((r["kind"].as_str(), r["name"].as_str()), (Some("counter"), Some("license")), "{l:#}");
    assert_eq!(holder_job(r), [hold.as_str()]);
    assert_eq!(l["waiting_for"]["sentence"], format!("Needs 1 of counter license, 1 of 1 held by {short}/hold"));

    let c = waiting_stage(&engine, &cpu2, "cpu2", "queued").await;
    let r = &c["waiting_for"]["reasons"][0];
    assert_eq!(
        (r["kind"].as_str(), r["free"].as_u64(), r["capacity"].as_u64()),
        (Some("cpu"), Some(1), Some(2)),
        "{c:#}"
    );
    assert_eq!(c["waiting_for"]["sentence"], format!("Needs 2 CPU slots, 1 of 2 held by {short}/hold"));

    // The waiting queue says the same, entry by entry.
    let resources = engine.resources().await;
    for (job, st) in [(&whole, &w), (&share, &s), (&lic, &l), (&cpu2, &c)] {
        assert_eq!(entry(&resources, job)["waiting_for"], st["waiting_for"], "{resources:#}");
    }

    // Once the holder is gone, nothing waits and no stage carries a reason.
    std::fs::write(engine.path("go"), "").unwrap();
    for job in [&hold, &whole, &share, &lic, &cpu2] {
        let done = engine.wait_final(job, Duration::from_secs(20)).await;
        assert_eq!(done["state"], "succeeded", "{done:#}");
        assert!(done["stages"].as_array().unwrap().iter().all(|s| s.get("waiting_for").is_none()), "{done:#}");
    }
    assert!(engine.resources().await["waiting"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn a_stage_in_backoff_says_when_it_is_retried() {
    let engine = Engine::start(&config()).await;
    let flaky = engine.submit("flaky", json!({})).await;
    let st = waiting_stage(&engine, &flaky, "flaky", "backoff").await;
    let r = &st["waiting_for"]["reasons"][0];
    assert_eq!((r["kind"].as_str(), r["failures"].as_u64()), (Some("backoff"), Some(1)), "{st:#}");
    assert_eq!(r["retry_at"], st["retry_at"]);
    assert_eq!(st["waiting_for"]["sentence"], format!("Failed once; retries at {}", st["retry_at"].as_str().unwrap()));
}

#[tokio::test]
async fn free_resources_held_back_for_a_starving_stage_say_the_queue_goes_first() {
    // `first` waits for the GPU past `reserve_after` and then reserves the free CPU slot, so
    // `second`, which needs only that slot, waits though the slot is not leased.
    let engine = Engine::start(
        r#"
resources: {gpus: [{memory: 16GiB}], cpu: 2}
scheduling: {reserve_after: 200ms}
pipelines:
  hold:
    stages: [{name: hold, needs: {gpu: 1, cpu: 1}, command: [sh, -c, 'while [ ! -e "{DIR}/go" ]; do sleep 0.05; done']}]
  first:
    stages: [{name: first, needs: {gpu: 1, cpu: 1}, command: ["true"]}]
  second:
    stages: [{name: second, needs: {cpu: 1}, command: ["true"]}]
"#,
    )
    .await;
    let hold = engine.submit("hold", json!({})).await;
    engine
        .wait_until("hold running", Duration::from_secs(20), async |e| {
            stage(&e.job(&hold).await, "hold")["state"] == "running"
        })
        .await;
    let first = engine.submit("first", json!({})).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let second = engine.submit("second", json!({})).await;
    let st = waiting_stage(&engine, &second, "second", "queued").await;
    let r = &st["waiting_for"]["reasons"][0];
    assert_eq!((r["kind"].as_str(), r["ahead"].as_u64()), (Some("queue"), Some(1)), "{st:#}");
    assert_eq!(st["waiting_for"]["sentence"], "Its resources are free; 1 earlier entry goes first");
    let resources = engine.resources().await;
    assert_eq!(entry(&resources, &first)["waiting_for"]["reasons"][0]["kind"], "gpu", "{resources:#}");
    std::fs::write(engine.path("go"), "").unwrap();
    for job in [&hold, &first, &second] {
        assert_eq!(engine.wait_final(job, Duration::from_secs(20)).await["state"], "succeeded");
    }
}

const WORKER: &str = r#"
import os, time
import gpuflow

class Holder(gpuflow.Worker):
    def handle(self, task):
        while not os.path.exists(os.path.join(os.environ["GO_DIR"], "go")):
            time.sleep(0.05)
        return {}

gpuflow.serve(Holder())
"#;

#[tokio::test]
async fn a_busy_pool_names_its_task_and_a_crash_looping_one_its_last_error_also_in_submit_wait() {
    let engine = Engine::start_with_files(
        r#"
resources: {gpus: none, cpu: 2}
workers:
  good: {command: [python3, "{DIR}/worker.py"], instances: 1, prefetch: 0, startup_timeout: 20s, env: {GO_DIR: "{DIR}"}}
  broken: {command: [sh, -c, "echo 'ImportError: no module named paddle' >&2; exit 1"], instances: 1, startup_timeout: 20s}
pipelines:
  good:
    stages: [{name: run, worker: good}]
  broken:
    stages: [{name: ocr, worker: broken}]
"#,
        &[("worker.py", WORKER)],
    )
    .await;

    // Before its fifth failure in a row the broken pool is only not ready.
    let early = engine.submit("broken", json!({})).await;
    let st = waiting_stage(&engine, &early, "ocr", "queued").await;
    let kind = st["waiting_for"]["reasons"][0]["kind"].clone();
    assert!(kind == "pool_not_ready" || kind == "pool_crash_looping", "{st:#}");
    if kind == "pool_not_ready" {
        assert_eq!(
            st["waiting_for"]["sentence"],
            "Pool broken has no ready instance yet (1 instance, starting or restarting)"
        );
    }

    engine
        .wait_until("pool good ready", Duration::from_secs(30), async |e| {
            e.resources().await["pools"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "good" && p["instances"].as_array().unwrap().iter().any(|i| i["state"] == "idle"))
        })
        .await;
    let busy = engine.submit("good", json!({})).await;
    engine
        .wait_until("good task running", Duration::from_secs(20), async |e| {
            stage(&e.job(&busy).await, "run")["state"] == "running"
        })
        .await;
    let behind = engine.submit("good", json!({})).await;
    let st = waiting_stage(&engine, &behind, "run", "queued").await;
    let r = &st["waiting_for"]["reasons"][0];
    assert_eq!(
        (r["kind"].as_str(), r["pool"].as_str(), r["ready"].as_u64()),
        (Some("pool_busy"), Some("good"), Some(1)),
        "{st:#}"
    );
    assert_eq!(holder_job(r), [busy.as_str()]);
    assert_eq!(
        st["waiting_for"]["sentence"],
        format!("Needs an idle instance of pool good; its ready instance is busy with {}/run", &busy[busy.len() - 8..])
    );

    // Five failures in a row take about 8 s (0.5 + 1 + 2 + 4 s between restarts).
    let crash_looping = "Pool broken has no ready instance: its instance is crash-looping";
    engine
        .wait_until("the broken pool crash-looping", Duration::from_secs(40), async |e| {
            e.job(&early).await["stages"][0]["waiting_for"]["sentence"]
                .as_str()
                .is_some_and(|s| s.starts_with(crash_looping))
        })
        .await;
    let st = stage(&engine.job(&early).await, "ocr").clone();
    let r = &st["waiting_for"]["reasons"][0];
    assert_eq!(
        (r["kind"].as_str(), r["instances"].as_u64(), r["crash_looping"].as_u64()),
        (Some("pool_crash_looping"), Some(1), Some(1)),
        "{st:#}"
    );
    assert!(r["failures"].as_u64().unwrap() >= 5, "{st:#}");
    assert!(r["last_error"].as_str().unwrap().contains("ImportError: no module named paddle"), "{st:#}");
    assert!(st["waiting_for"]["sentence"].as_str().unwrap().contains("ImportError: no module named paddle"), "{st:#}");
    assert_eq!(entry(&engine.resources().await, &early)["waiting_for"], st["waiting_for"]);

    // `submit --wait` says so, not just `queued`.
    let mut wait = Command::new(bin())
        .args(["submit", "broken", "--wait"])
        .env("GPUFLOW_SERVER", &engine.base)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = wait.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stderr).lines().map_while(Result::ok).find(|l| l.contains(" ocr: queued: "))
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !reader.is_finished() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = wait.kill();
    let _ = wait.wait();
    let line = reader.join().unwrap().expect("submit --wait printed no `queued:` line for the stage");
    assert!(line.contains(&format!("ocr: queued: {crash_looping}")), "{line}");
    assert!(line.contains("ImportError: no module named paddle"), "{line}");

    std::fs::write(engine.path("go"), "").unwrap();
    assert_eq!(engine.wait_final(&busy, Duration::from_secs(20)).await["state"], "succeeded");
    assert_eq!(engine.wait_final(&behind, Duration::from_secs(20)).await["state"], "succeeded");
}
