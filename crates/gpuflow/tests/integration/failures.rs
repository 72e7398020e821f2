//! Every failure path returns its lease: non-zero exit, timeout, cancel, spawn failure.

use std::time::Duration;

use serde_json::json;

use crate::fixture::*;

#[tokio::test]
async fn every_failure_path_returns_its_lease() {
    let engine = Engine::start(
        r#"
resources:
  gpus: [{memory: 16GiB}]
  cpu: 2
limits:
  kill_grace: 500ms
pipelines:
  crash:
    stages:
      - {name: s, command: [sh, -c, 'echo boom >&2; exit 3'], needs: {gpu: 1}, retry: {max_attempts: 1}}
  hang:
    stages:
      - {name: s, command: [sleep, "30"], needs: {gpu: 1}, timeout: 1s, retry: {max_attempts: 1}}
  long:
    stages:
      - {name: s, command: [sleep, "30"], needs: {gpu: 1}}
  missing:
    stages:
      - {name: s, command: [/nonexistent/program], needs: {gpu: 1}}
  flaky:
    stages:
      - {name: s, command: [sh, -c, 'test "$GPUFLOW_ATTEMPT" -ge 2'], needs: {gpu: 1}, retry: {max_attempts: 2, backoff: {initial: 100ms}}}
"#,
    )
    .await;
    let wait = Duration::from_secs(30);

    let job = engine.wait_final(&engine.submit("crash", json!({})).await, wait).await;
    assert_eq!(job["state"], "failed");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("exited with status 3") && error.contains("boom"), "{error}");
    assert_eq!(job["stages"][0]["exit_code"], 3);
    engine.assert_all_capacity_free().await;

    let job = engine.wait_final(&engine.submit("hang", json!({})).await, wait).await;
    assert_eq!(job["state"], "failed");
    assert_eq!(job["stages"][0]["attempt_history"][0]["state"], "timed_out", "{job:#}");
    engine.assert_all_capacity_free().await;

    let id = engine.submit("long", json!({})).await;
    engine.wait_until("running", wait, async |e| e.job(&id).await["stages"][0]["state"] == "running").await;
    let (status, body) = engine.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
    assert_eq!(status, 200, "{body}");
    let job = engine.wait_final(&id, wait).await;
    assert_eq!(job["state"], "cancelled");
    assert_eq!(job["stages"][0]["attempt_history"][0]["state"], "cancelled");
    engine.assert_all_capacity_free().await;
    let (status, body) = engine.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("already_finished")));

    let job = engine.wait_final(&engine.submit("missing", json!({})).await, wait).await;
    assert_eq!(job["state"], "failed");
    assert!(job["error"].as_str().unwrap().contains("program not found"), "{job:#}");
    assert_eq!(job["stages"][0]["attempts"], 1, "a spawn failure is not retried");
    engine.assert_all_capacity_free().await;

    let job = engine.wait_final(&engine.submit("flaky", json!({})).await, wait).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["stages"][0]["attempts"], 2);
    assert_eq!(job["stages"][0]["attempt_history"][0]["state"], "failed");
    engine.assert_all_capacity_free().await;
}

#[tokio::test]
async fn a_failed_stage_cancels_the_rest_of_its_job() {
    let engine = Engine::start(
        r#"
resources:
  gpus: none
  cpu: 4
pipelines:
  fan:
    stages:
      - {name: a, command: [sh, -c, 'sleep 0.2; exit 1'], retry: {max_attempts: 1}, after: []}
      - {name: b, command: [sleep, "30"], after: []}
      - {name: c, command: ["true"], after: [a, b]}
"#,
    )
    .await;
    let job = engine.wait_final(&engine.submit("fan", json!({})).await, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "failed");
    assert_eq!(job["stages"][1]["state"], "cancelled", "the running sibling was stopped: {job:#}");
    assert_eq!(job["stages"][2]["state"], "cancelled");
    assert!(job["error"].as_str().unwrap().starts_with("stage `a` failed"), "{job:#}");
    engine.assert_all_capacity_free().await;
}
