//! Chaos: the engine is `kill -9`ed at random moments (mid-commit included) while jobs flow,
//! and restarted, many times. Afterwards, from the store and an append-only log each stage
//! writes: every accepted job is final, no stage that committed success ran again, no lease is
//! left held, and SQLite's integrity check passes.
//!
//! `GPUFLOW_CHAOS_ITERATIONS` sets the number of kills (default 200); `GPUFLOW_CHAOS_SEED`
//! replays a run.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use crate::fixture::*;
use gpuflow::store::{SqliteStore, Store};

/// A small deterministic generator, so a failing run can be replayed from its seed.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self, below: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

/// `GPUFLOW_CHAOS_SEED`, or a fresh one (printed by each test, so a failure can be replayed).
pub fn seed() -> u64 {
    std::env::var("GPUFLOW_CHAOS_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    })
}

/// A count from the environment (the long form of a chaos run), or the CI default.
pub fn env_count(var: &str, default: u64) -> u64 {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::test]
async fn random_kill9_loop_loses_nothing_and_reruns_no_committed_success() {
    let iterations = env_count("GPUFLOW_CHAOS_ITERATIONS", 200);
    let seed = seed();
    eprintln!("chaos: {iterations} kills, seed {seed} (GPUFLOW_CHAOS_SEED={seed} replays it)");
    let mut rng = Lcg(seed);
    let stage =
        "[sh, -c, 'echo \"$GPUFLOW_JOB_ID $GPUFLOW_STAGE $GPUFLOW_ATTEMPT\" >> {DIR}/runs; sleep 0.0$((RANDOM % 5))']";
    let mut engine = Engine::start(&format!(
        r#"
resources: {{gpus: [{{memory: 16GiB}}], cpu: 2}}
diagnosis: {{sample_interval: 1h}}
pipelines:
  chain:
    max_queued: 100000
    stages:
      - {{name: a, command: {stage}, needs: {{cpu: 1}}, retry: {{max_attempts: 1}}}}
      - {{name: b, command: {stage}, needs: {{gpu: 1}}, retry: {{max_attempts: 1}}}}
      - {{name: c, command: {stage}, needs: {{gpu_memory: 4GiB, cpu: 1}}, retry: {{max_attempts: 1}}}}
"#
    ))
    .await;
    let mut accepted = Vec::new();
    for _ in 0..iterations {
        for _ in 0..rng.next(4) {
            // A submit that races the kill may fail; only a 201 counts as accepted.
            let r =
                engine.http.post(format!("{}/v1/jobs", engine.base)).json(&json!({"pipeline": "chain"})).send().await;
            if let Ok(r) = r
                && r.status().as_u16() == 201
            {
                accepted.push(r.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_string());
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.next(120))).await;
        engine.kill9();
        engine.restart().await;
    }
    for id in &accepted {
        let job = engine.wait_final(id, Duration::from_secs(120)).await;
        assert_eq!(job["state"], "succeeded", "seed {seed}: {job:#}");
    }
    // No stage ran after the attempt that committed its success.
    let runs = std::fs::read_to_string(engine.path("runs")).unwrap_or_default();
    let mut last_run: HashMap<(String, String), u32> = HashMap::new();
    for line in runs.lines() {
        let p: Vec<&str> = line.split_whitespace().collect();
        if p.len() == 3 {
            let e = last_run.entry((p[0].to_string(), p[1].to_string())).or_default();
            *e = (*e).max(p[2].parse().unwrap());
        }
    }
    for id in &accepted {
        for s in engine.job(id).await["stages"].as_array().unwrap() {
            let succeeded = s["attempt_history"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["state"] == "succeeded")
                .expect("a succeeded attempt");
            let committed = succeeded["attempt"].as_u64().unwrap() as u32;
            let ran = last_run[&(id.clone(), s["name"].as_str().unwrap().to_string())];
            assert_eq!(
                ran, committed,
                "seed {seed}: {id}/{} ran attempt {ran} after attempt {committed} committed success",
                s["name"]
            );
        }
    }
    engine.assert_all_capacity_free().await;
    let db = engine.path("data/gpuflow.db");
    engine.kill9();
    let store = SqliteStore::open(&db).await.unwrap();
    assert_eq!(store.running_attempts().await.unwrap(), vec![], "seed {seed}: a lease is still recorded as held");
    assert_eq!(store.integrity_check().await.unwrap(), "ok");
    eprintln!("chaos: {} jobs accepted over {iterations} kills, all succeeded", accepted.len());
}
