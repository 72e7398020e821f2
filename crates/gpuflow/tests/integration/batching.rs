//! Dynamic batching with real Python workers (the SDK's `handle_batch`): every task of a batch
//! keeps its own result, error, retry and interruption; `max_batch` from `ready` caps batches;
//! a worker that did not announce `batch` gets single tasks; `batch_key` keeps keys apart.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::fixture::*;

/// Appends each batch it runs to `BATCH_LOG` (`size keys`), then answers per task. Inputs:
/// `n` (the output doubles it), `model` (a batch key), `mode`: `poison` returns an exception
/// for that task; `raise-once` raises for the whole batch on its first attempt; `crash-once`
/// kills the worker on its first attempt; `hang-once` deadlocks the whole batch on its first;
/// `slow-once` makes the batch take 10 s (beating) on its first.
const WORKER: &str = r#"
import os, threading, time
import gpuflow

class Batch(gpuflow.Worker):
    max_batch = int(os.environ["MAX_BATCH"]) if os.environ.get("MAX_BATCH") else None

    def load(self):
        return {"providers": ["CPUExecutionProvider"]}

    def handle_batch(self, tasks):
        models = sorted({str(t.input.get("model")) for t in tasks})
        with open(os.environ["BATCH_LOG"], "a") as f:
            f.write(f"{len(tasks)} {','.join(models)}\n")
        modes = [(t.input.get("mode"), t.attempt) for t in tasks]
        if ("raise-once", 1) in modes:
            raise RuntimeError("batch exploded: CUDA out of memory")
        if ("crash-once", 1) in modes:
            os._exit(3)
        if ("slow-once", 1) in modes:
            for _ in range(200):
                time.sleep(0.05)
                tasks[0].heartbeat()
        if ("hang-once", 1) in modes:
            lock = threading.Lock()
            lock.acquire()
            lock.acquire()  # a deadlock: the batch stops beating
        out = []
        for t in tasks:
            if t.input.get("mode") == "poison":
                out.append(ValueError(f"poisoned item {t.input['n']}"))
            else:
                out.append({"n": t.input["n"], "doubled": 2 * t.input["n"], "batch": len(tasks), "models": models, "pid": os.getpid()})
        return out

gpuflow.serve(Batch())
"#;

/// A worker written before batches, without the SDK: it announces no features. A `batch`
/// line would be a message it does not know: it records that and exits.
const OLD_WORKER: &str = r#"
import json, os, sys
proto = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
def send(m):
    proto.write(json.dumps(m) + "\n")
send({"type": "ready", "protocol": 1, "info": {"pid": os.getpid()}})
for line in sys.stdin:
    m = json.loads(line)
    if m["type"] == "shutdown":
        break
    if m["type"] != "task":
        open(os.environ["BATCH_LOG"], "a").write("unexpected " + m["type"] + "\n")
        sys.exit(9)
    open(os.environ["BATCH_LOG"], "a").write("1 single\n")
    n = m["input"]["n"]
    send({"type": "result", "task": m["task"], "output": {"n": n, "doubled": 2 * n, "batch": 1}})
"#;

fn config(pool: &str, env: &str, worker: &str, heartbeat: &str) -> String {
    // `batch_key` needs a pool that batches (`check` refuses it otherwise).
    let keyed = if pool.contains("batch:") {
        "  keyed:\n    stages:\n      - {name: infer, worker: model, batch_key: \"{input.model}\", retry: {max_attempts: 1}}\n"
    } else {
        ""
    };
    format!(
        r#"
resources: {{gpus: none, cpu: 2}}
workers:
  model:
    command: [python3, "{{DIR}}/{worker}"]
    heartbeat_timeout: {heartbeat}
    startup_timeout: 20s
    env: {{BATCH_LOG: "{{DIR}}/batches.log", {env}}}
    {pool}
pipelines:
  p:
    max_queued: 2000
    stages:
      - {{name: infer, worker: model, retry: {{max_attempts: 2, backoff: {{initial: 100ms}}}}}}
  once:
    stages:
      - {{name: infer, worker: model, retry: {{max_attempts: 1}}}}
  timed:
    stages:
      - {{name: infer, worker: model, timeout: 1s, retry: {{max_attempts: 2, backoff: {{initial: 100ms}}}}}}
{keyed}"#
    )
}

async fn start(pool: &str, env: &str, instances: usize) -> Engine {
    start_worker(pool, env, instances, "worker.py").await
}

async fn start_worker(pool: &str, env: &str, instances: usize, worker: &str) -> Engine {
    start_full(pool, env, instances, worker, "20s").await
}

async fn start_full(pool: &str, env: &str, instances: usize, worker: &str, heartbeat: &str) -> Engine {
    let files = [("worker.py", WORKER), ("old.py", OLD_WORKER)];
    let engine = Engine::start_with_files(&config(pool, env, worker, heartbeat), &files).await;
    engine
        .wait_until("pool instances ready", Duration::from_secs(30), async |e| {
            let r = e.resources().await;
            r["pools"][0]["instances"].as_array().unwrap().iter().filter(|i| i["state"] == "idle").count() == instances
        })
        .await;
    engine
}

/// Submits one job per input in one batch request; their ids in order.
async fn submit_all(engine: &Engine, pipeline: &str, inputs: Vec<Value>) -> Vec<String> {
    let jobs: Vec<Value> = inputs.into_iter().map(|i| json!({"pipeline": pipeline, "input": i})).collect();
    let mut ids = Vec::new();
    for chunk in jobs.chunks(500) {
        let (status, body) = engine.post("/v1/jobs/batch", json!({"jobs": chunk})).await;
        assert!(status == 200 || status == 201, "{status}: {body}");
        for entry in body["jobs"].as_array().unwrap_or_else(|| panic!("{body}")) {
            ids.push(entry["id"].as_str().unwrap_or_else(|| panic!("refused: {entry}")).to_string());
        }
    }
    ids
}

/// The sizes of the batches the worker ran, from its log, with each batch's keys.
fn batches(engine: &Engine) -> Vec<(usize, String)> {
    std::fs::read_to_string(engine.path("batches.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let (size, keys) = l.split_once(' ').unwrap();
            (size.parse().unwrap_or(0), keys.to_string())
        })
        .collect()
}

/// Waits for job `id` (input `n`) to end, asserts it succeeded with its own output, and
/// returns it.
async fn succeeded_with_its_own_output(engine: &Engine, id: &str, n: usize) -> Value {
    let job = engine.wait_final(id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["output"]["doubled"], 2 * n, "{job:#}");
    job
}

fn attempts(job: &Value) -> &Vec<Value> {
    job["stages"][0]["attempt_history"].as_array().unwrap()
}

#[tokio::test]
async fn four_hundred_jobs_through_a_batching_pool_each_get_their_own_output() {
    let engine = start("instances: 2\n    batch: {max_size: 32, max_wait: 20ms}", "", 2).await;
    let ids = submit_all(&engine, "p", (0..400).map(|n| json!({"n": n})).collect()).await;
    let mut sizes = BTreeSet::new();
    for (n, id) in ids.iter().enumerate() {
        let job = engine.wait_final(id, Duration::from_secs(60)).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
        assert_eq!(
            (job["output"]["n"].as_u64(), job["output"]["doubled"].as_u64()),
            (Some(n as u64), Some(2 * n as u64))
        );
        let history = attempts(&job);
        assert_eq!(history.len(), 1, "{job:#}");
        let size = history[0]["batch_size"].as_u64().unwrap();
        assert_eq!(size, job["output"]["batch"].as_u64().unwrap(), "the recorded batch size is the batch it ran in");
        assert!((1..=32).contains(&size), "{job:#}");
        sizes.insert(size);
    }
    let seen = batches(&engine);
    assert_eq!(seen.iter().map(|(s, _)| s).sum::<usize>(), 400, "every task ran exactly once: {seen:?}");
    assert!(seen.iter().any(|(s, _)| *s > 1), "the worker saw batches larger than 1: {seen:?}");
    assert!(sizes.iter().any(|s| *s > 1), "{sizes:?}");
    let metrics = reqwest::get(format!("{}/metrics", engine.base)).await.unwrap().text().await.unwrap();
    let count = metrics
        .lines()
        .find(|l| l.starts_with("gpuflow_inference_count_total{") && l.contains("pool=\"model\""))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(count.ends_with(" 400"), "{count}");
    let execs = metrics.lines().find(|l| l.starts_with("gpuflow_inference_exec_count_total{")).unwrap();
    assert!(execs.ends_with(&format!(" {}", seen.len())), "one per batch: {execs} vs {} batches", seen.len());
    assert!(metrics.contains("gpuflow_inference_batch_size_bucket{"), "{metrics}");
    assert!(
        metrics.contains("gpuflow_inference_queue_duration_seconds_count{pipeline=\"p\",stage=\"infer\"} 400"),
        "{metrics}"
    );
    engine.assert_all_capacity_free().await;
}

#[tokio::test]
async fn a_poisoned_item_fails_alone_while_the_rest_of_its_batch_succeeds() {
    // One instance and a long max_wait: the six tasks form one batch.
    let engine = start("instances: 1\n    batch: {max_size: 8, max_wait: 400ms}", "", 1).await;
    let inputs = (0..6).map(|n| if n == 3 { json!({"n": n, "mode": "poison"}) } else { json!({"n": n}) }).collect();
    let ids = submit_all(&engine, "once", inputs).await;
    for (n, id) in ids.iter().enumerate() {
        let job = engine.wait_final(id, Duration::from_secs(30)).await;
        let attempt = &attempts(&job)[0];
        assert_eq!(attempt["batch_size"], 6, "all six shared one batch: {job:#}");
        if n == 3 {
            assert_eq!(job["state"], "failed", "{job:#}");
            assert!(attempt["error"].as_str().unwrap().contains("ValueError: poisoned item 3"), "{attempt:#}");
        } else {
            assert_eq!(job["state"], "succeeded", "{job:#}");
            assert_eq!(job["output"]["doubled"], 2 * n, "{job:#}");
        }
    }
    assert_eq!(batches(&engine).len(), 1, "{:?}", batches(&engine));
}

#[tokio::test]
async fn a_batch_that_raises_fails_every_task_with_that_error_and_retries_each() {
    let engine = start("instances: 1\n    batch: {max_size: 8, max_wait: 300ms}", "", 1).await;
    let inputs = (0..4).map(|n| if n == 0 { json!({"n": n, "mode": "raise-once"}) } else { json!({"n": n}) }).collect();
    let ids = submit_all(&engine, "p", inputs).await;
    for (n, id) in ids.iter().enumerate() {
        let job = succeeded_with_its_own_output(&engine, id, n).await;
        let history = attempts(&job);
        assert_eq!(history.len(), 2, "{job:#}");
        assert_eq!(history[0]["state"], "failed", "{job:#}");
        assert_eq!(history[0]["batch_size"], 4, "{job:#}");
        assert!(
            history[0]["error"].as_str().unwrap().contains("RuntimeError: batch exploded: CUDA out of memory"),
            "{job:#}"
        );
        assert_eq!(job["stages"][0]["failures"], 1, "the failure spent a try: {job:#}");
        assert_eq!(history[1]["state"], "succeeded", "{job:#}");
    }
}

#[tokio::test]
async fn a_crash_mid_batch_requeues_every_task_without_spending_a_retry() {
    // `once`: one attempt allowed, so a spent retry would fail the job.
    let engine = start("instances: 1\n    batch: {max_size: 8, max_wait: 300ms}", "", 1).await;
    let inputs = (0..5).map(|n| if n == 2 { json!({"n": n, "mode": "crash-once"}) } else { json!({"n": n}) }).collect();
    let ids = submit_all(&engine, "once", inputs).await;
    for (n, id) in ids.iter().enumerate() {
        let job = succeeded_with_its_own_output(&engine, id, n).await;
        let history = attempts(&job);
        assert_eq!(history.len(), 2, "{job:#}");
        assert_eq!(history[0]["state"], "interrupted", "{job:#}");
        assert_eq!(history[0]["batch_size"], 5, "{job:#}");
        assert!(history[0]["error"].as_str().unwrap().contains("exited with status 3"), "{job:#}");
        assert_eq!(job["stages"][0]["failures"], 0, "{job:#}");
        // Interrupted once, each runs alone, so a task that kills its worker is found alone.
        assert_eq!(history[1]["batch_size"], 1, "{job:#}");
    }
    let seen = batches(&engine);
    assert_eq!(seen[0].0, 5, "{seen:?}");
    assert!(seen[1..].iter().all(|(s, _)| *s == 1), "{seen:?}");
}

#[tokio::test]
async fn max_batch_from_ready_caps_every_batch() {
    let engine = start("instances: 1\n    batch: {max_size: 32, max_wait: 200ms}", "MAX_BATCH: \"3\"", 1).await;
    let ids = submit_all(&engine, "p", (0..20).map(|n| json!({"n": n})).collect()).await;
    for id in &ids {
        let job = engine.wait_final(id, Duration::from_secs(30)).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
        assert!(attempts(&job)[0]["batch_size"].as_u64().unwrap() <= 3, "{job:#}");
    }
    let seen = batches(&engine);
    assert!(seen.iter().all(|(s, _)| *s <= 3), "{seen:?}");
    assert!(seen.iter().any(|(s, _)| *s == 3), "batches fill up to max_batch: {seen:?}");
}

#[tokio::test]
async fn a_worker_without_the_batch_feature_gets_single_tasks() {
    let engine = start_worker("instances: 1\n    batch: {max_size: 16, max_wait: 100ms}", "", 1, "old.py").await;
    let ids = submit_all(&engine, "p", (0..12).map(|n| json!({"n": n})).collect()).await;
    for (n, id) in ids.iter().enumerate() {
        let job = succeeded_with_its_own_output(&engine, id, n).await;
        assert_eq!(attempts(&job).len(), 1, "the worker never crashed: {job:#}");
        assert_eq!(attempts(&job)[0]["batch_size"], 1, "{job:#}");
    }
    let log = std::fs::read_to_string(engine.path("batches.log")).unwrap();
    assert_eq!(log.lines().filter(|l| *l == "1 single").count(), 12, "{log}");
    assert!(!log.contains("unexpected"), "{log}");
}

#[tokio::test]
async fn tasks_with_different_batch_keys_never_share_a_batch() {
    let engine = start("instances: 1\n    batch: {max_size: 16, max_wait: 300ms}", "", 1).await;
    let inputs = (0..12).map(|n| json!({"n": n, "model": if n % 3 == 0 { "a" } else { "b" }})).collect();
    let ids = submit_all(&engine, "keyed", inputs).await;
    for id in &ids {
        let job = engine.wait_final(id, Duration::from_secs(30)).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
        assert_eq!(job["output"]["models"].as_array().unwrap().len(), 1, "{job:#}");
    }
    let seen = batches(&engine);
    assert!(seen.iter().all(|(_, keys)| !keys.contains(',')), "{seen:?}");
    assert!(seen.iter().any(|(s, _)| *s > 1), "{seen:?}");
}

#[test]
fn bad_batch_config_is_refused_by_check_with_position_field_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    let yaml = "resources: {gpus: none, cpu: 1}\nworkers:\n  m:\n    command: [python3, w.py]\n    batch: {max_size: 0}\npipelines:\n  p:\n    stages:\n      - {name: s, worker: m, batch_key: \"{job.id}\"}\n";
    std::fs::write(&file, yaml).unwrap();
    let out = std::process::Command::new(bin()).arg("check").arg(&file).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("workers.m.batch.max_size") && text.contains("`0` is not a batch size"), "{text}");
    assert!(text.contains("pipelines.p.stages[0].batch_key") && text.contains("`{job.id}`"), "{text}");
    assert!(text.contains("p.yaml:"), "errors point into the file: {text}");
}

#[tokio::test]
async fn a_full_batch_goes_at_once_and_a_task_waiting_for_its_batch_is_cancelled_at_once() {
    // max_wait is far longer than the test: only a full batch or a cancel can end the wait.
    let engine = start("instances: 1\n    batch: {max_size: 4, max_wait: 1h}", "", 1).await;
    let lonely = engine.submit("once", json!({"n": 100})).await;
    engine
        .wait_until("its attempt started (waiting for its batch)", Duration::from_secs(10), async |e| {
            e.job(&lonely).await["stages"][0]["state"] == "running"
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(batches(&engine).is_empty(), "one task of four waits: {:?}", batches(&engine));
    let t = std::time::Instant::now();
    let (status, body) = engine.post(&format!("/v1/jobs/{lonely}/cancel"), json!({})).await;
    assert!(status < 300, "{status}: {body}");
    let job = engine.wait_final(&lonely, Duration::from_secs(10)).await;
    assert_eq!(job["state"], "cancelled", "{job:#}");
    assert!(t.elapsed() < Duration::from_secs(5), "ended without the instance: {:?}", t.elapsed());
    assert!(attempts(&job)[0]["batch_size"].is_null(), "it never reached a worker: {job:#}");

    let t = std::time::Instant::now();
    let ids = submit_all(&engine, "once", (0..4).map(|n| json!({"n": n})).collect()).await;
    for id in &ids {
        let job = engine.wait_final(id, Duration::from_secs(30)).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
        assert_eq!(attempts(&job)[0]["batch_size"], 4, "{job:#}");
    }
    assert!(t.elapsed() < Duration::from_secs(20), "a full batch does not wait for max_wait");
    assert_eq!(batches(&engine), vec![(4, "None".to_string())]);
    engine.assert_all_capacity_free().await;
}

#[tokio::test]
async fn a_hung_batch_is_killed_and_every_task_requeued_without_spending_a_retry() {
    let engine = start_full("instances: 1\n    batch: {max_size: 8, max_wait: 300ms}", "", 1, "worker.py", "1s").await;
    let inputs = (0..3).map(|n| if n == 1 { json!({"n": n, "mode": "hang-once"}) } else { json!({"n": n}) }).collect();
    let ids = submit_all(&engine, "once", inputs).await;
    for (n, id) in ids.iter().enumerate() {
        let job = succeeded_with_its_own_output(&engine, id, n).await;
        let history = attempts(&job);
        assert_eq!((history[0]["state"].as_str(), history[0]["batch_size"].as_u64()), (Some("interrupted"), Some(3)));
        assert!(history[0]["error"].as_str().unwrap().contains("no heartbeat or progress for 1s"), "{job:#}");
        assert_eq!(job["stages"][0]["failures"], 0, "{job:#}");
        assert_eq!(history[1]["batch_size"], 1, "{job:#}");
    }
}

#[tokio::test]
async fn a_batch_past_its_timeout_times_out_each_task_and_each_is_retried() {
    // The three tasks start together, so their timeouts expire together: the instance is
    // stopped once, each task times out (one try each) and each is retried.
    let engine = start("instances: 1\n    batch: {max_size: 8, max_wait: 300ms}", "", 1).await;
    let inputs = (0..3).map(|n| if n == 0 { json!({"n": n, "mode": "slow-once"}) } else { json!({"n": n}) }).collect();
    let ids = submit_all(&engine, "timed", inputs).await;
    for (n, id) in ids.iter().enumerate() {
        let job = succeeded_with_its_own_output(&engine, id, n).await;
        let history = attempts(&job);
        assert_eq!(history.len(), 2, "{job:#}");
        assert_eq!((history[0]["state"].as_str(), history[0]["batch_size"].as_u64()), (Some("timed_out"), Some(3)));
        assert_eq!(history[0]["error"], "timed out after 1000 ms", "{job:#}");
        assert_eq!(job["stages"][0]["failures"], 1, "{job:#}");
        assert_eq!(history[1]["state"], "succeeded", "{job:#}");
    }
    let inst = &engine.resources().await["pools"][0]["instances"][0];
    assert_eq!(inst["restarts"], 1, "stopped once for the whole batch: {inst:#}");
}

#[tokio::test]
async fn cancelling_one_task_of_a_running_batch_interrupts_the_others_without_spending_a_try() {
    let engine = start("instances: 1\n    batch: {max_size: 8, max_wait: 300ms}", "", 1).await;
    let inputs = (0..3).map(|n| if n == 0 { json!({"n": n, "mode": "slow-once"}) } else { json!({"n": n}) }).collect();
    let ids = submit_all(&engine, "once", inputs).await;
    engine.wait_until("the batch runs", Duration::from_secs(10), async |e| !batches(e).is_empty()).await;
    let (status, body) = engine.post(&format!("/v1/jobs/{}/cancel", ids[2]), json!({})).await;
    assert!(status < 300, "{status}: {body}");
    let cancelled = engine.wait_final(&ids[2], Duration::from_secs(30)).await;
    assert_eq!(cancelled["state"], "cancelled", "{cancelled:#}");
    for (n, id) in ids.iter().enumerate().take(2) {
        let job = engine.wait_final(id, Duration::from_secs(30)).await;
        assert_eq!(job["state"], "succeeded", "`once` allows one try, so none was spent: {job:#}");
        assert_eq!(job["output"]["doubled"], 2 * n, "{job:#}");
        let history = attempts(&job);
        assert_eq!((history[0]["state"].as_str(), history[0]["batch_size"].as_u64()), (Some("interrupted"), Some(3)));
        assert_eq!(history[1]["batch_size"], 1, "{job:#}");
    }
}

#[tokio::test]
async fn recycling_counts_tasks_not_batches() {
    let engine =
        start("instances: 1\n    max_tasks_per_instance: 10\n    batch: {max_size: 4, max_wait: 50ms}", "", 1).await;
    let ids = submit_all(&engine, "p", (0..30).map(|n| json!({"n": n})).collect()).await;
    let mut per_pid = std::collections::BTreeMap::<u64, usize>::new();
    for id in &ids {
        let job = engine.wait_final(id, Duration::from_secs(60)).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
        assert_eq!(attempts(&job).len(), 1, "recycling interrupts nothing: {job:#}");
        *per_pid.entry(job["output"]["pid"].as_u64().unwrap()).or_default() += 1;
    }
    assert!(per_pid.values().all(|n| *n <= 10), "no instance ran more than 10 tasks: {per_pid:?}");
    assert!(per_pid.len() >= 3, "{per_pid:?}");
    assert!(batches(&engine).iter().all(|(s, _)| *s <= 4), "{:?}", batches(&engine));
}

#[tokio::test]
async fn a_reload_turns_batching_on_for_the_running_pool() {
    let engine = start("instances: 1", "", 1).await;
    let ids = submit_all(&engine, "p", (0..6).map(|n| json!({"n": n})).collect()).await;
    for id in &ids {
        let job = engine.wait_final(id, Duration::from_secs(30)).await;
        assert_eq!(attempts(&job)[0]["batch_size"], 1, "no `batch:`, no batches: {job:#}");
    }
    engine.write_config(&config("instances: 1\n    batch: {max_size: 8, max_wait: 300ms}", "", "worker.py", "20s"));
    let (status, body) = engine.post("/v1/reload", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.to_string().contains("workers.model.batch"), "the reload says what changed: {body}");
    let ids = submit_all(&engine, "p", (0..6).map(|n| json!({"n": n})).collect()).await;
    for id in &ids {
        let job = engine.wait_final(id, Duration::from_secs(30)).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
        assert_eq!(attempts(&job)[0]["batch_size"], 6, "{job:#}");
    }
}
