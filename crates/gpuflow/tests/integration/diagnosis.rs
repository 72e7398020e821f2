//! The field reports' failure scenarios, reproduced on a virtual GPU whose NVML readings come
//! from a telemetry file: each is detected and named within 2x its configured threshold.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fixture::*;
use crate::pools::WORKER;

const THRESHOLDS: &str = "diagnosis: {sample_interval: 200ms, task_stall: 1s, gpu_idle: 1s, queue_stall: 1s, gpu_use_window: 1s, finding_clear: 1s}";

/// Writes the virtual device's readings atomically.
fn telemetry(engine: &Engine, utilization: u32, processes: &[(i32, u64)]) {
    let procs: Vec<Value> = processes.iter().map(|(pid, bytes)| json!({"pid": pid, "used_memory": bytes})).collect();
    let used: u64 = processes.iter().map(|(_, b)| b).sum();
    let body = json!({"utilization": utilization, "memory_used": used, "processes": procs});
    let tmp = engine.path("gpu0.json.tmp");
    std::fs::write(&tmp, body.to_string()).unwrap();
    std::fs::rename(tmp, engine.path("gpu0.json")).unwrap();
}

async fn open_findings(engine: &Engine) -> Vec<Value> {
    engine.get("/v1/diagnosis").await.1["open"].as_array().unwrap().clone()
}

/// Waits for an open finding of `kind` whose summary contains `needle`; returns it and how long it took.
async fn wait_finding(
    engine: &Engine,
    kind: &str,
    needle: &str,
    since: Instant,
    within: Duration,
) -> (Value, Duration) {
    loop {
        if let Some(f) = open_findings(engine)
            .await
            .into_iter()
            .find(|f| f["kind"] == kind && f["summary"].as_str().unwrap().contains(needle))
        {
            return (f, since.elapsed());
        }
        assert!(
            since.elapsed() < within + Duration::from_secs(5),
            "no `{kind}` finding mentioning `{needle}` after {:?}:\n{:#}",
            since.elapsed(),
            engine.get("/v1/diagnosis").await.1
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The values of a finding's evidence rows with this label.
pub(crate) fn evidence(f: &Value, label: &str) -> Vec<String> {
    f["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["label"] == label)
        .map(|e| e["value"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn report_000_a_stuck_holder_an_idle_leased_gpu_and_a_blocked_queue_are_named() {
    let engine = Engine::start(&format!(
        r#"
resources: {{gpus: [{{memory: 80GiB, telemetry: "{{DIR}}/gpu0.json"}}], cpu: 4}}
{THRESHOLDS}
pipelines:
  dh:
    stages:
      - name: drive
        needs: {{gpu: 1}}
        command: [sh, -c, 'echo $$ > {{DIR}}/holder.$GPUFLOW_JOB_ID; exec sleep 60']
"#
    ))
    .await;
    telemetry(&engine, 0, &[]);
    let first = engine.submit("dh", json!({})).await;
    let pid_file = engine.path(&format!("holder.{first}"));
    engine.wait_until("the holder runs", Duration::from_secs(10), async |_| pid_file.exists()).await;
    let holder = read_pid(&pid_file);
    // Report 000: 0 % utilisation while 52 GB stay allocated by the holder.
    telemetry(&engine, 0, &[(holder, 52 << 30)]);
    let started = Instant::now();
    let second = engine.submit("dh", json!({})).await;
    engine.submit("dh", json!({})).await;

    let (stalled, t1) = wait_finding(&engine, "task_stalled", &first, started, Duration::from_secs(2)).await;
    assert!(evidence(&stalled, "process")[0].contains(&format!("pid {holder} is sleeping")), "{stalled:#}");
    let (idle, t2) = wait_finding(&engine, "gpu_idle_under_lease", "GPU 0", started, Duration::from_secs(2)).await;
    assert!(evidence(&idle, "holder")[0].contains(&first), "the idle GPU's holder is named: {idle:#}");
    assert!(evidence(&idle, "memory")[0].starts_with("53248 MiB of 81920 MiB"), "{idle:#}");
    let (queue, t3) =
        wait_finding(&engine, "queue_stalled", "pipeline dh: 2 waiting", started, Duration::from_secs(2)).await;
    assert!(queue["summary"].as_str().unwrap().contains(&format!("held by job {first}/drive")), "{queue:#}");
    for (what, t) in [("task_stalled", t1), ("gpu_idle_under_lease", t2), ("queue_stalled", t3)] {
        assert!(t <= Duration::from_secs(2), "{what} took {t:?}, over 2x its 1 s threshold");
    }

    // doctor says the same, readably.
    let out = std::process::Command::new(bin()).args(["--server", &engine.base, "doctor"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in ["[task_stalled]", "[gpu_idle_under_lease]", "[queue_stalled]", "likely cause:", "fix:"] {
        assert!(text.contains(needle), "doctor output lacks {needle}:\n{text}");
    }

    // Cancelling the stuck holder clears the stall; its findings close and stay in the history.
    engine.post(&format!("/v1/jobs/{first}/cancel"), json!({})).await;
    telemetry(&engine, 95, &[]);
    engine
        .wait_until("findings about the first job closed", Duration::from_secs(10), async |e| {
            !open_findings(e).await.iter().any(|f| f["summary"].as_str().unwrap().contains(&first))
        })
        .await;
    let d = engine.get("/v1/diagnosis").await.1;
    assert!(
        d["recent"].as_array().unwrap().iter().any(|f| f["kind"] == "task_stalled" && !f["closed_at"].is_null()),
        "{d:#}"
    );
    engine.post(&format!("/v1/jobs/{second}/cancel"), json!({})).await;
}

#[tokio::test]
async fn report_004_a_cpu_stage_that_declares_a_gpu_is_flagged_and_fails_under_gpu_check_fail() {
    let engine = Engine::start(&format!(
        r#"
resources: {{gpus: [{{memory: 80GiB, telemetry: "{{DIR}}/gpu0.json"}}], cpu: 4}}
{THRESHOLDS}
pipelines:
  warn:
    stages: [{{name: stitch, needs: {{gpu: 1}}, command: [sleep, "60"]}}]
  strict:
    stages: [{{name: stitch, needs: {{gpu: 1}}, gpu_check: fail, command: [sleep, "60"]}}]
"#
    ))
    .await;
    telemetry(&engine, 0, &[]);
    let started = Instant::now();
    let warn = engine.submit("warn", json!({})).await;
    let (f, t) = wait_finding(&engine, "gpu_unused", &warn, started, Duration::from_secs(2)).await;
    assert!(t <= Duration::from_secs(2), "took {t:?}");
    assert!(f["summary"].as_str().unwrap().contains("never used it"), "{f:#}");
    assert!(f["fix"].as_str().unwrap().contains("needs: {cpu: 1}"), "{f:#}");
    assert_eq!(engine.job(&warn).await["state"], "running", "warn only reports");
    engine.post(&format!("/v1/jobs/{warn}/cancel"), json!({})).await;
    engine.wait_final(&warn, Duration::from_secs(10)).await;

    let strict = engine.submit("strict", json!({})).await;
    let job = engine.wait_final(&strict, Duration::from_secs(15)).await;
    assert_eq!(job["state"], "failed", "{job:#}");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("gpu_check: fail") && error.contains("never used it"), "{error}");
    assert_eq!(job["stages"][0]["attempts"], 1, "not retried");
    engine.assert_all_capacity_free().await;
}

#[tokio::test]
async fn report_001_a_gpu_worker_that_reports_only_cpu_providers_is_flagged_at_once() {
    let engine = Engine::start_with_files(
        &format!(
            r#"
resources: {{gpus: [{{memory: 80GiB, telemetry: "{{DIR}}/gpu0.json"}}], cpu: 2}}
{THRESHOLDS}
workers:
  ocr: {{command: [python3, "{{DIR}}/worker.py"], needs: {{gpu_memory: 4GiB}}}}
pipelines:
  p: {{stages: [{{name: s, worker: ocr}}]}}
"#
        ),
        &[("worker.py", WORKER)],
    )
    .await;
    telemetry(&engine, 0, &[]);
    let started = Instant::now();
    let (f, t) = wait_finding(&engine, "gpu_unused", "pool ocr #0", started, Duration::from_secs(1)).await;
    assert!(f["summary"].as_str().unwrap().contains("runs on the CPU"), "{f:#}");
    assert_eq!(evidence(&f, "reported providers"), vec!["CPUExecutionProvider".to_string()]);
    assert!(t <= Duration::from_secs(5), "flagged as soon as the instance is ready: {t:?}");
}

#[tokio::test]
async fn report_003_a_deadlocked_worker_with_children_is_named_then_killed_and_reported() {
    let engine = Engine::start_with_files(
        &format!(
            r#"
resources: {{gpus: none, cpu: 2}}
{THRESHOLDS}
workers:
  # No task sent ahead: the second job must wait in the queue, for `queue_stalled` to see it.
  model: {{command: [python3, "{{DIR}}/worker.py"], heartbeat_timeout: 4s, prefetch: 0}}
pipelines:
  p: {{stages: [{{name: s, worker: model, retry: {{max_attempts: 1}}}}]}}
"#
        ),
        &[("worker.py", WORKER)],
    )
    .await;
    engine
        .wait_until("ready", Duration::from_secs(20), async |e| {
            e.resources().await["pools"][0]["instances"][0]["state"] == "idle"
        })
        .await;
    let started = Instant::now();
    let stuck = engine.submit("p", json!({"mode": "deadlock-once"})).await;
    let waiting = engine.submit("p", json!({})).await;
    let (f, t) = wait_finding(&engine, "task_stalled", &stuck, started, Duration::from_secs(2)).await;
    assert!(t <= Duration::from_secs(2), "took {t:?}");
    assert!(!evidence(&f, "no heartbeat or progress for")[0].contains("never wrote"), "{f:#}");
    assert!(evidence(&f, "runs")[0].starts_with("on pool model #0 (pid "), "{f:#}");
    let (q, _) = wait_finding(&engine, "queue_stalled", "pipeline p", started, Duration::from_secs(2)).await;
    assert!(q["summary"].as_str().unwrap().contains(&stuck), "the queue names the stuck task: {q:#}");
    // The pool's heartbeat timeout then kills and replaces the instance; that is reported too.
    let (u, _) = wait_finding(&engine, "worker_unhealthy", "pool model #0", started, Duration::from_secs(6)).await;
    assert!(evidence(&u, "last error")[0].contains("no heartbeat or progress for 4s"), "{u:#}");
    assert_eq!(engine.wait_final(&stuck, Duration::from_secs(20)).await["state"], "failed");
    assert_eq!(engine.wait_final(&waiting, Duration::from_secs(20)).await["state"], "succeeded");
    assert!(zombie_children_of(engine.pid()).is_empty());
}

#[tokio::test]
async fn a_small_dev_shm_is_an_environment_hazard() {
    let engine = Engine::start(
        r#"
resources: {gpus: none, cpu: 1}
diagnosis: {sample_interval: 200ms, shm_min: 1024TiB}
pipelines:
  p: {stages: [{name: s, command: ["true"]}]}
"#,
    )
    .await;
    let (f, _) = wait_finding(&engine, "shm_too_small", "/dev/shm", Instant::now(), Duration::from_secs(2)).await;
    assert!(f["fix"].as_str().unwrap().contains("--shm-size"), "{f:#}");
}

#[tokio::test]
async fn metrics_expose_queues_tasks_leases_gpus_pools_and_findings() {
    let engine = Engine::start_with_files(
        r#"
resources: {gpus: [{memory: 80GiB, telemetry: "{DIR}/gpu0.json"}], cpu: 2}
diagnosis: {sample_interval: 200ms, shm_min: 1024TiB}
workers:
  model: {command: [python3, "{DIR}/worker.py"], needs: {gpu_memory: 4GiB}, gpu_check: off}
pipelines:
  p:
    stages:
      - {name: prep, command: ["true"]}
      - {name: infer, worker: model}
      - {name: flaky, needs: {gpu_memory: 1GiB}, gpu_check: off, command: [sh, -c, 'test "$GPUFLOW_ATTEMPT" -ge 2'], retry: {max_attempts: 2, backoff: {initial: 50ms}}}
"#,
        &[("worker.py", WORKER)],
    )
    .await;
    telemetry(&engine, 37, &[]);
    let id = engine.submit("p", json!({})).await;
    assert_eq!(engine.wait_final(&id, Duration::from_secs(30)).await["state"], "succeeded");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = engine.http.get(format!("{}/metrics", engine.base)).send().await.unwrap().text().await.unwrap();
    for needle in [
        r#"gpuflow_jobs_submitted_total{pipeline="p"} 1"#,
        r#"gpuflow_jobs_finished_total{pipeline="p",state="succeeded"} 1"#,
        r#"gpuflow_task_duration_seconds_count{pipeline="p",stage="flaky",outcome="failed"} 1"#,
        r#"gpuflow_task_duration_seconds_count{pipeline="p",stage="infer",outcome="succeeded"} 1"#,
        r#"gpuflow_retries_total{pipeline="p",stage="flaky"} 1"#,
        r#"gpuflow_queue_wait_seconds_count{pipeline="p",stage="prep"} 1"#,
        r#"gpuflow_lease_hold_seconds_count{resource="gpu_memory"} 2"#,
        r#"nv_gpu_utilization_ratio{gpu_uuid="0",gpu="0",source="virtual"} 0.37"#,
        r#"nv_gpu_memory_total_bytes{gpu_uuid="0",gpu="0",source="virtual"} 85899345920"#,
        r#"gpuflow_gpu_memory_leased_bytes{gpu_uuid="0",gpu="0",source="virtual"} 4294967296"#,
        r#"gpuflow_pool_instances{pool="model",state="idle"} 1"#,
        r#"gpuflow_findings_open{kind="shm_too_small"} 1"#,
        r#"gpuflow_findings_opened_total{kind="shm_too_small"} 1"#,
    ] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
}

#[tokio::test]
async fn gpu_memory_held_outside_any_lease_is_never_double_booked() {
    let engine = Engine::start(&format!(
        r#"
resources: {{gpus: [{{memory: 80GiB, telemetry: "{{DIR}}/gpu0.json"}}], cpu: 2}}
{THRESHOLDS}
pipelines:
  half: {{stages: [{{name: s, needs: {{gpu_memory: 40GiB}}, gpu_check: off, command: ["true"]}}]}}
"#
    ))
    .await;
    // 60 GiB held by a process that is not ours (pid 1 stands in for another program).
    telemetry(&engine, 0, &[(1, 60 << 30)]);
    let started = Instant::now();
    let (f, _) = wait_finding(&engine, "gpu_memory_foreign", "61440 MiB", started, Duration::from_secs(2)).await;
    assert!(evidence(&f, "process")[0].contains("pid 1: 61440 MiB (not started by this engine)"), "{f:#}");
    assert_eq!(engine.resources().await["gpus"][0]["memory_foreign_bytes"], 60u64 << 30);
    let id = engine.submit("half", json!({})).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        engine.job(&id).await["stages"][0]["state"],
        "queued",
        "40 GiB does not fit next to 60 GiB held outside any lease"
    );
    // The memory is released: the stage runs, and the finding closes.
    telemetry(&engine, 0, &[]);
    assert_eq!(engine.wait_final(&id, Duration::from_secs(10)).await["state"], "succeeded");
    engine
        .wait_until("finding closed", Duration::from_secs(5), async |e| {
            !open_findings(e).await.iter().any(|f| f["kind"] == "gpu_memory_foreign")
        })
        .await;
}

#[tokio::test]
async fn a_stage_that_overrides_cuda_visible_devices_is_flagged() {
    let engine = Engine::start(&format!(
        r#"
resources: {{gpus: [{{memory: 80GiB}}, {{memory: 80GiB}}], cpu: 2}}
{THRESHOLDS}
pipelines:
  p: {{stages: [{{name: s, needs: {{gpu: 1}}, command: [sh, -c, 'CUDA_VISIBLE_DEVICES=0,1 sleep 30']}}]}}
"#
    ))
    .await;
    let id = engine.submit("p", json!({})).await;
    let (f, t) =
        wait_finding(&engine, "cuda_visible_devices_overridden", &id, Instant::now(), Duration::from_secs(2)).await;
    assert!(evidence(&f, "seen")[0].contains("\"0,1\""), "{f:#}");
    assert!(t <= Duration::from_secs(2));
    engine.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
}
