//! `kill -9` of the engine with jobs in flight, then a restart.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use crate::fixture::*;

#[tokio::test]
async fn kill9_then_restart_finishes_every_job_and_never_reruns_finished_stages() {
    // Each stage appends `JOB STAGE ATTEMPT` when it starts: an append-only record of runs.
    let stage = "[sh, -c, 'echo \"$GPUFLOW_JOB_ID $GPUFLOW_STAGE $GPUFLOW_ATTEMPT\" >> {DIR}/runs; sleep 0.4']";
    let mut engine = Engine::start(&format!(
        r#"
resources:
  gpus: [{{memory: 16GiB}}]
  cpu: 2
pipelines:
  chain:
    stages:
      - {{name: one, command: {stage}, needs: {{cpu: 1}}}}
      - {{name: two, command: {stage}, needs: {{gpu: 1}}}}
      - {{name: three, command: {stage}, needs: {{cpu: 1}}}}
"#
    ))
    .await;
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(engine.submit("chain", json!({})).await);
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // What had finished before the kill. A stage may finish between this read and the kill;
    // that is fine: it must not run again either, and it is checked below with the rest.
    let mut finished_before = Vec::new();
    for id in &ids {
        for stage in engine.job(id).await["stages"].as_array().unwrap() {
            if stage["state"] == "succeeded" {
                finished_before.push((id.clone(), stage["name"].as_str().unwrap().to_string()));
            }
        }
    }
    assert!(!finished_before.is_empty(), "some stages should have finished before the kill");
    let old_pid = engine.pid();
    engine.kill9();
    assert!(!alive(old_pid as i32));
    engine.restart().await;

    for id in &ids {
        let job = engine.wait_final(id, Duration::from_secs(60)).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
        for stage in job["stages"].as_array().unwrap() {
            for attempt in stage["attempt_history"].as_array().unwrap() {
                assert_ne!(attempt["state"], "running", "a lease is still recorded as held: {job:#}");
            }
        }
    }
    let runs = std::fs::read_to_string(engine.path("runs")).unwrap();
    let mut count: HashMap<(String, String), usize> = HashMap::new();
    for line in runs.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        *count.entry((parts[0].to_string(), parts[1].to_string())).or_default() += 1;
    }
    for key in &finished_before {
        assert_eq!(count[key], 1, "stage {key:?} had finished before the kill but ran again");
    }
    // Stages interrupted by the kill ran again, and that shows as an interruption, not a failure.
    let interrupted: usize = count.values().filter(|c| **c > 1).count();
    let mut seen_interruption = false;
    for id in &ids {
        for stage in engine.job(id).await["stages"].as_array().unwrap() {
            assert_eq!(stage["failures"], 0);
            seen_interruption |=
                stage["attempt_history"].as_array().unwrap().iter().any(|a| a["state"] == "interrupted");
        }
    }
    assert_eq!(seen_interruption, interrupted > 0);
    engine.assert_all_capacity_free().await;
}

#[tokio::test]
async fn state_survives_a_graceful_restart_and_idempotency_holds_across_it() {
    let mut engine = Engine::start(
        r#"
resources: {gpus: none, cpu: 1}
pipelines:
  p:
    stages: [{name: s, command: ["true"]}]
"#,
    )
    .await;
    let (status, first) = engine.post("/v1/jobs", json!({"pipeline": "p", "idempotency_key": "order-17"})).await;
    assert_eq!(status, 201);
    let id = first["id"].as_str().unwrap().to_string();
    engine.wait_final(&id, Duration::from_secs(20)).await;
    let pid = engine.pid();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    engine.wait_until("engine exit", Duration::from_secs(15), async |_| !alive(pid as i32)).await;
    engine.kill9_if_exited();
    engine.restart().await;
    let (status, again) = engine.post("/v1/jobs", json!({"pipeline": "p", "idempotency_key": "order-17"})).await;
    assert_eq!((status, again["id"].as_str()), (200, Some(id.as_str())), "same key, same job");
    assert_eq!(engine.job(&id).await["state"], "succeeded");
}

#[tokio::test]
async fn a_restarted_engine_kills_what_the_dead_one_left_running_and_reruns_it() {
    // Attempt 1 hangs (it would hold its GPU forever); attempt 2 finishes.
    let mut engine = Engine::start(
        r#"
resources: {gpus: [{memory: 16GiB}], cpu: 1}
pipelines:
  p:
    stages:
      - name: s
        needs: {gpu: 1}
        retry: {max_attempts: 1}
        command: [sh, -c, 'if [ "$GPUFLOW_ATTEMPT" = 1 ]; then sleep 300 & echo $! > {DIR}/attempt-1.pid; wait; fi']
"#,
    )
    .await;
    let id = engine.submit("p", json!({})).await;
    let pid_file = engine.path("attempt-1.pid");
    engine.wait_until("attempt 1 running", Duration::from_secs(10), async |_| pid_file.exists()).await;
    let orphan = read_pid(&pid_file);
    engine.kill9();
    // The stage's own process dies with the engine; what it started does not.
    assert!(alive(orphan), "the stage's child outlives a kill -9 of the engine");
    engine.restart().await;
    let job = engine.wait_final(&id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "max_attempts 1, yet the interruption did not spend it: {job:#}");
    let history = job["stages"][0]["attempt_history"].as_array().unwrap();
    assert_eq!(history[0]["state"], "interrupted");
    assert_eq!(history[1]["state"], "succeeded");
    assert!(!alive(orphan), "the restarted engine must kill the orphan (pid {orphan}) before re-leasing its GPU");
    engine.assert_all_capacity_free().await;
}

/// The engine dies right after a commit and before acting on it (the test hook
/// `GPUFLOW_TEST_ABORT_AFTER_COMMIT=N` aborts after the Nth commit, as a `kill -9` would):
/// after a restart every acknowledged job succeeds, and no stage whose success was committed
/// runs again.
#[tokio::test]
async fn a_kill_between_a_commit_and_its_effects_loses_nothing_and_reruns_no_success() {
    let stage = "[sh, -c, 'echo \"$GPUFLOW_JOB_ID $GPUFLOW_STAGE $GPUFLOW_ATTEMPT\" >> {DIR}/runs; sleep 0.05']";
    let mut engine = Engine::start(&format!(
        r#"
resources: {{gpus: none, cpu: 2}}
pipelines:
  chain:
    stages:
      - {{name: one, command: {stage}, needs: {{cpu: 1}}}}
      - {{name: two, command: ["gpuflow:noop"]}}
      - {{name: three, command: {stage}, needs: {{cpu: 1}}}}
"#
    ))
    .await;
    let mut acknowledged = Vec::new();
    let mut aborted = 0;
    for after in [1, 2, 3, 4, 6, 9] {
        engine.kill9_if_exited();
        engine.env = vec![("GPUFLOW_TEST_ABORT_AFTER_COMMIT".into(), format!("{after}"))];
        if engine.try_boot().await {
            for _ in 0..3 {
                let url = format!("{}/v1/jobs", engine.base);
                let sent = engine.http.post(url).json(&json!({"pipeline": "chain"})).send().await;
                if let Ok(r) = sent
                    && r.status().as_u16() == 201
                {
                    acknowledged.push(r.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_string());
                }
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !engine.exited() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        aborted += engine.exited() as usize;
    }
    assert!(aborted >= 4, "the hook aborted the engine in only {aborted} of 6 rounds");
    assert!(!acknowledged.is_empty());
    engine.kill9_if_exited();
    engine.env.clear();
    engine.restart().await;
    for id in &acknowledged {
        let job = engine.wait_final(id, Duration::from_secs(60)).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
    }
    // Every run was recorded at its start; none came after the stage's committed success.
    let runs = std::fs::read_to_string(engine.path("runs")).unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut last_run: HashMap<(String, String), u64> = HashMap::new();
    for line in runs.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        assert!(seen.insert(line.to_string()), "attempt ran twice: {line}");
        let attempt: u64 = parts[2].parse().unwrap();
        let last = last_run.entry((parts[0].to_string(), parts[1].to_string())).or_default();
        *last = (*last).max(attempt);
    }
    for id in &acknowledged {
        for stage in engine.job(id).await["stages"].as_array().unwrap() {
            let history = stage["attempt_history"].as_array().unwrap();
            let succeeded: Vec<u64> =
                history.iter().filter(|a| a["state"] == "succeeded").map(|a| a["attempt"].as_u64().unwrap()).collect();
            assert_eq!(succeeded.len(), 1, "{stage:#}");
            assert_eq!(stage["failures"], 0, "an abort counted as a failure: {stage:#}");
            let name = stage["name"].as_str().unwrap().to_string();
            if let Some(last) = last_run.get(&(id.clone(), name)) {
                assert_eq!(*last, succeeded[0], "ran again after its success was committed: {stage:#}");
            }
        }
    }
    engine.assert_all_capacity_free().await;
}
