//! Process supervision: no zombie, no survivor, even for grandchildren and stubborn stages.

use std::time::Duration;

use serde_json::json;

use crate::fixture::*;

#[tokio::test]
async fn grandchildren_and_stubborn_stages_leave_no_zombie_and_no_survivor() {
    let engine = Engine::start(
        r#"
resources: {gpus: none, cpu: 2}
limits: {kill_grace: 500ms}
pipelines:
  forks:
    stages:
      # Leaves a grandchild in its group and one that escaped into a new session.
      - name: fork
        command: [sh, -c, 'sleep 300 & echo $! > {DIR}/grandchild.pid; setsid sleep 300 & echo $! > {DIR}/escaped.pid; sleep 0.2; exit 0']
  stubborn:
    stages:
      # Ignores SIGTERM: the engine must escalate to SIGKILL after the grace period.
      - name: s
        command: [sh, -c, 'trap "" TERM; echo $$ > {DIR}/stubborn.pid; while true; do sleep 0.1; done']
        timeout: 1s
        retry: {max_attempts: 1}
"#,
    )
    .await;
    let forks = engine.submit("forks", json!({})).await;
    let stubborn = engine.submit("stubborn", json!({})).await;
    assert_eq!(engine.wait_final(&forks, Duration::from_secs(20)).await["state"], "succeeded");
    let job = engine.wait_final(&stubborn, Duration::from_secs(20)).await;
    assert_eq!(job["state"], "failed");
    assert_eq!(job["stages"][0]["attempt_history"][0]["state"], "timed_out");
    assert_eq!(job["stages"][0]["attempt_history"][0]["signal"], 9, "escalated to SIGKILL: {job:#}");

    let pids = ["grandchild.pid", "escaped.pid", "stubborn.pid"].map(|f| read_pid(&engine.path(f)));
    let engine_pid = engine.pid();
    engine
        .wait_until("no survivor and no zombie", Duration::from_secs(5), async |_| {
            pids.iter().all(|p| !alive(*p)) && zombie_children_of(engine_pid).is_empty()
        })
        .await;
    for p in pids {
        assert!(std::fs::metadata(format!("/proc/{p}")).is_err(), "pid {p} still exists (zombie?)");
    }
    engine.assert_all_capacity_free().await;
}

#[tokio::test]
async fn stage_gets_its_environment_and_templated_arguments_as_argv() {
    let engine = Engine::start(
        r#"
resources: {gpus: [{memory: 8GiB}], cpu: 1}
allowed_roots: ["{DIR}"]
pipelines:
  env:
    inputs:
      video: {type: path}
      title: {type: string, default: "untitled"}
    stages:
      - name: first
        command: [sh, -c, 'printf "{{\"n\": 7, \"argv\": \"%s|%s\"}}" "$1" "$2" > "$GPUFLOW_OUTPUT"', sh, "{input.video}", "{input.title}"]
      - name: second
        needs: {gpu_memory: 2GiB}
        command: [sh, -c, 'printf "%s\n" "$@" > $GPUFLOW_JOB_DIR/args; env | grep -E "^(GPUFLOW_|CUDA_)" | sort > $GPUFLOW_JOB_DIR/env', sh, "{stages.first.n}", "{stages.first.argv}", "{job.dir}"]
"#,
    )
    .await;
    let video = engine.path("clip; rm -rf x.mp4");
    std::fs::write(&video, b"").unwrap();
    let id = engine.submit("env", json!({"video": video.display().to_string(), "title": "a b $(c)"})).await;
    let job = engine.wait_final(&id, Duration::from_secs(20)).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let job_dir = engine.path("data").join("jobs").join(&id);
    let args = std::fs::read_to_string(job_dir.join("args")).unwrap();
    let expected = format!("7\n{}|a b $(c)\n{}\n", video.display(), job_dir.display());
    assert_eq!(args, expected, "each template is one argv element, nothing went through a shell");
    let env = std::fs::read_to_string(job_dir.join("env")).unwrap();
    for var in [
        format!("GPUFLOW_JOB_ID={id}"),
        format!("GPUFLOW_JOB_DIR={}", job_dir.display()),
        "GPUFLOW_ATTEMPT=1".to_string(),
        "GPUFLOW_STAGE=second".to_string(),
        "CUDA_VISIBLE_DEVICES=0".to_string(),
        format!("GPUFLOW_GPU_MEMORY_BYTES={}", 2u64 << 30),
    ] {
        assert!(env.lines().any(|l| l == var), "missing {var} in:\n{env}");
    }
    assert_eq!(job["stages"][0]["output"]["n"], 7);
    assert_eq!(
        job["stages"][1]["attempt_history"][0]["lease"]["gpu_memory"],
        json!({"device": 0, "bytes": 2u64 << 30})
    );
    assert!(job_dir.join(".gpuflow/first.1.output.json").is_file(), "outputs are kept beside the logs");
}

/// `command: [gpuflow:noop]` (for benchmarks of the engine alone) runs no process, yet each of
/// its transitions is recorded like any other attempt's, in DAG order.
#[tokio::test]
async fn a_builtin_noop_stage_spawns_nothing_and_is_recorded_like_any_attempt() {
    let engine = Engine::start(
        r#"
resources: {gpus: none, cpu: 1}
pipelines:
  p:
    stages:
      - {name: a, command: ["gpuflow:noop"]}
      - {name: b, command: ["gpuflow:noop"]}
      - {name: c, command: [sh, -c, "echo ran > {job.dir}/c"]}
"#,
    )
    .await;
    let id = engine.submit("p", json!({})).await;
    let job = engine.wait_final(&id, Duration::from_secs(20)).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let stages = job["stages"].as_array().unwrap();
    for s in &stages[..2] {
        let attempts = s["attempt_history"].as_array().unwrap();
        assert_eq!(attempts.len(), 1, "{s:#}");
        assert_eq!(attempts[0]["state"], "succeeded", "{s:#}");
        assert_eq!(attempts[0]["exit_code"], 0, "{s:#}");
        assert!(attempts[0]["finished_at"].is_string(), "{s:#}");
    }
    assert!(stages[0]["finished_at"].as_str() <= stages[1]["started_at"].as_str(), "b after a: {job:#}");
    let internal = engine.path(&format!("data/jobs/{id}/.gpuflow"));
    let logs: Vec<String> = std::fs::read_dir(&internal)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("a.") || n.starts_with("b."))
        .collect();
    assert!(logs.is_empty(), "a no-op stage writes no log or output file: {logs:?}");
    assert!(engine.path(&format!("data/jobs/{id}/c")).exists(), "the real stage after them ran");
    engine.assert_all_capacity_free().await;
}
