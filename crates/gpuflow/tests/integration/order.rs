//! The critical-path order end to end: durations measured from real Python workers reorder
//! the queue, so a job with more work left goes before the last stage of an earlier job.

use std::time::Duration;

use serde_json::{Value, json};

use crate::fixture::*;

const WORKER: &str = r#"
import time
import gpuflow

SECONDS = {"long": 0.4, "short": 0.05}

class Sleeper(gpuflow.Worker):
    def handle(self, task):
        time.sleep(SECONDS[task.stage])
        return {"stage": task.stage}

gpuflow.serve(Sleeper())
"#;

/// One instance and no task sent ahead, so each task is chosen when the instance frees.
const CONFIG: &str = r#"
resources: {gpus: none, cpu: 2}
workers:
  m: {command: [python3, "{DIR}/worker.py"], instances: 1, prefetch: 0, startup_timeout: 20s}
pipelines:
  p:
    stages:
      - {name: long, worker: m}
      - {name: short, worker: m}
"#;

fn started_ms(job: &Value, stage: &str) -> String {
    crate::fixture::stage(job, stage)["started_at"].as_str().unwrap().to_string()
}

/// Submits two jobs back to back and returns (first job's `short`, second job's `long`)
/// start times (RFC 3339 strings compare in time order).
async fn pair(engine: &Engine) -> (String, String) {
    let first = engine.submit("p", json!({})).await;
    let second = engine.submit("p", json!({})).await;
    let first = engine.wait_final(&first, Duration::from_secs(30)).await;
    let second = engine.wait_final(&second, Duration::from_secs(30)).await;
    assert_eq!(first["state"], "succeeded", "{first:#}");
    assert_eq!(second["state"], "succeeded", "{second:#}");
    (started_ms(&first, "short"), started_ms(&second, "long"))
}

#[tokio::test]
async fn measured_worker_durations_put_the_job_with_more_work_left_first() {
    let engine = Engine::start_with_files(CONFIG, &[("worker.py", WORKER)]).await;
    engine
        .wait_until("the instance is ready", Duration::from_secs(30), async |e| {
            e.resources().await["pools"][0]["instances"][0]["state"] == "idle"
        })
        .await;
    // Nothing measured yet: when the first job's `long` ends, its `short` and the second
    // job's `long` wait together, and arrival order decides.
    let (first_short, second_long) = pair(&engine).await;
    assert!(first_short < second_long, "arrival order: {first_short} then {second_long}");
    // Now the engine has measured both stages: the second job's `long` (0.4 s, then 0.05 s
    // left) goes before the first job's `short` (0.05 s left).
    let (first_short, second_long) = pair(&engine).await;
    assert!(second_long < first_short, "more work left first: {second_long} then {first_short}");
    engine.assert_all_capacity_free().await;
}
