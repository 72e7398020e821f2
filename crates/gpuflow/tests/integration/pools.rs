//! Worker pools with real Python workers (the SDK in `python/`): exceptions, crashes,
//! deadlocks, children that outlive their worker, SIGTERM ignored, protocol garbage, and
//! tasks sent ahead (`prefetch`): re-queued on a crash, cancelled in place, never sent to a
//! worker that did not announce the feature.

use std::time::Duration;

use serde_json::{Value, json};

use crate::fixture::*;

/// One worker script; each job's `mode` input picks a misbehaviour.
pub const WORKER: &str = r#"
import os, signal, subprocess, sys, threading, time
import gpuflow

class Test(gpuflow.Worker):
    def load(self):
        if os.environ.get("IGNORE_TERM"):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return {"providers": ["CPUExecutionProvider"], "device": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def handle(self, task):
        mode = task.input.get("mode", "ok")
        first = task.attempt == 1
        if mode == "raise":
            raise ValueError(f"bad frame {task.input.get('n')}")
        if mode == "crash-once" and first:
            os._exit(3)
        if mode == "deadlock-once" and first:
            lock = threading.Lock()
            lock.acquire()
            lock.acquire()  # report 003: blocks forever
        if mode == "fork-then-crash" and first:
            child = subprocess.Popen(["sleep", "300"])
            with open(task.input["pidfile"], "w") as f:
                f.write(str(child.pid))
            os._exit(1)
        if mode == "crash-when-told" and first:
            while not os.path.exists(task.input["go"]):
                time.sleep(0.02)
                task.heartbeat()
            os._exit(3)
        if mode == "wait-file":
            while not os.path.exists(task.input["go"]):
                time.sleep(0.02)
                task.heartbeat()
        if mode == "slow":
            for i in range(600):
                time.sleep(0.05)
                task.progress(i / 600)
        print("this goes to stderr, not the protocol")
        return {"pid": os.getpid(), "attempt": task.attempt, "n": task.input.get("n")}

gpuflow.serve(Test())
"#;

fn config(extra_env: &str, heartbeat: &str) -> String {
    config_with(extra_env, heartbeat, "")
}

fn config_with(extra_env: &str, heartbeat: &str, pool_extra: &str) -> String {
    format!(
        r#"
resources: {{gpus: [{{memory: 16GiB}}], cpu: 2}}
limits: {{kill_grace: 500ms}}
workers:
  model:
    command: [python3, "{{DIR}}/worker.py"]
    instances: 2
    needs: {{gpu_memory: 4GiB}}
    startup_timeout: 20s
    heartbeat_timeout: {heartbeat}
    env: {{{extra_env}}}
    {pool_extra}
pipelines:
  infer:
    stages:
      - {{name: infer, worker: model, timeout: 3s, retry: {{max_attempts: 2, backoff: {{initial: 100ms}}}}}}
  once:
    stages:
      - {{name: infer, worker: model, retry: {{max_attempts: 1}}}}
"#
    )
}

async fn start(extra_env: &str, heartbeat: &str) -> Engine {
    start_with(&config(extra_env, heartbeat)).await
}

async fn start_with(config: &str) -> Engine {
    let engine = Engine::start_with_files(config, &[("worker.py", WORKER)]).await;
    wait_ready(&engine, 2).await;
    engine
}

fn instances(r: &Value) -> Vec<Value> {
    r["pools"][0]["instances"].as_array().unwrap().clone()
}

async fn wait_ready(engine: &Engine, n: usize) {
    engine
        .wait_until("pool instances ready", Duration::from_secs(30), async |e| {
            instances(&e.resources().await).iter().filter(|i| i["state"] == "idle").count() == n
        })
        .await;
}

/// Both instances idle, no task held, memory shares still held by the instances only.
async fn assert_pool_whole(engine: &Engine) {
    wait_ready(engine, 2).await;
    let r = engine.resources().await;
    assert_eq!(r["leases"], json!([]), "{r:#}");
    assert_eq!(r["gpus"][0]["memory_leased_bytes"], 8u64 << 30, "two 4 GiB standing leases: {r:#}");
    assert!(zombie_children_of(engine.pid()).is_empty(), "zombies left");
}

#[tokio::test]
async fn instances_start_with_their_device_and_report_ready_info() {
    let engine = start("", "5s").await;
    let r = engine.resources().await;
    for inst in instances(&r) {
        assert_eq!(inst["info"]["providers"], json!(["CPUExecutionProvider"]));
        assert_eq!(inst["info"]["device"], "0", "CUDA_VISIBLE_DEVICES is the instance's device");
        assert_eq!(inst["devices"], json!([0]));
    }
    let job = engine.wait_final(&engine.submit("infer", json!({"n": 7})).await, Duration::from_secs(20)).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["output"]["n"], 7);
    let worker_log = std::fs::read_to_string(engine.path("data/workers/model.0.stderr.log")).unwrap_or_default()
        + &std::fs::read_to_string(engine.path("data/workers/model.1.stderr.log")).unwrap_or_default();
    assert!(worker_log.contains("this goes to stderr"), "print() goes to the log, not the protocol");
    assert_pool_whole(&engine).await;
}

#[tokio::test]
async fn a_thousand_failing_tasks_leave_the_pool_whole() {
    let engine = start("", "5s").await;
    let mut ids = Vec::new();
    for n in 0..1000 {
        ids.push(engine.submit("once", json!({"mode": "raise", "n": n})).await);
    }
    for id in &ids {
        let job = engine.wait_final(id, Duration::from_secs(120)).await;
        assert_eq!(job["state"], "failed");
        assert!(job["error"].as_str().unwrap().contains("ValueError: bad frame"), "{job:#}");
    }
    let r = engine.resources().await;
    for inst in instances(&r) {
        assert_eq!(inst["restarts"], 0, "an exception must not cost an instance: {inst:#}");
    }
    let done: u64 = instances(&r).iter().map(|i| i["tasks_done"].as_u64().unwrap()).sum();
    assert_eq!(done, 1000);
    assert_pool_whole(&engine).await;
    let job = engine.wait_final(&engine.submit("once", json!({})).await, Duration::from_secs(20)).await;
    assert_eq!(job["state"], "succeeded");
}

#[tokio::test]
async fn a_crash_retries_the_task_on_a_restarted_instance() {
    let engine = start("", "5s").await;
    let job =
        engine.wait_final(&engine.submit("infer", json!({"mode": "crash-once"})).await, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let first = &job["stages"][0]["attempt_history"][0];
    assert_eq!(first["state"], "interrupted", "a worker crash spends no retry: {first:#}");
    assert!(first["error"].as_str().unwrap().contains("exited with status 3"), "{first:#}");
    assert_eq!(job["output"]["attempt"], 2);
    assert_pool_whole(&engine).await;
    let restarts: u64 = instances(&engine.resources().await).iter().map(|i| i["restarts"].as_u64().unwrap()).sum();
    assert_eq!(restarts, 1, "the crashed instance was restarted, once");
}

#[tokio::test]
async fn a_deadlocked_handler_is_detected_killed_and_its_task_retried() {
    let engine = start("", "1s").await;
    let started = std::time::Instant::now();
    let job = engine
        .wait_final(&engine.submit("infer", json!({"mode": "deadlock-once"})).await, Duration::from_secs(30))
        .await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let first = &job["stages"][0]["attempt_history"][0];
    assert!(first["error"].as_str().unwrap().contains("no heartbeat or progress for 1s"), "{first:#}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "detected within ~2x the heartbeat timeout: {:?}",
        started.elapsed()
    );
    assert_pool_whole(&engine).await;
}

#[tokio::test]
async fn children_of_a_crashed_worker_do_not_outlive_it() {
    let engine = start("", "5s").await;
    let pidfile = engine.path("child.pid");
    let input = json!({"mode": "fork-then-crash", "pidfile": pidfile.display().to_string()});
    let job = engine.wait_final(&engine.submit("infer", input).await, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let child = read_pid(&pidfile);
    engine.wait_until("the orphaned child is gone", Duration::from_secs(5), async |_| !alive(child)).await;
    assert_pool_whole(&engine).await;
}

#[tokio::test]
async fn a_worker_that_ignores_sigterm_is_killed_when_its_task_times_out() {
    let engine = start("IGNORE_TERM: \"1\"", "5s").await;
    let before: Vec<Value> = instances(&engine.resources().await);
    let job = engine.wait_final(&engine.submit("infer", json!({"mode": "slow"})).await, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "failed", "two attempts, each past its 3 s timeout: {job:#}");
    for attempt in job["stages"][0]["attempt_history"].as_array().unwrap() {
        assert_eq!(attempt["state"], "timed_out", "{job:#}");
    }
    assert_pool_whole(&engine).await;
    let after = instances(&engine.resources().await);
    let restarted: u64 = after.iter().map(|i| i["restarts"].as_u64().unwrap()).sum();
    assert_eq!(restarted, 2, "each timed-out task cost its instance a restart");
    for old in before {
        let pid = old["pid"].as_i64().unwrap() as i32;
        if !after.iter().any(|i| i["pid"] == old["pid"]) {
            assert!(!alive(pid), "the stopped instance {pid} is gone, SIGTERM ignored or not");
        }
    }
}

/// A worker written without the SDK: `before_ready` runs first; a task's first attempt runs
/// `on_first_attempt` instead of answering when that is not empty; every other task answers
/// `{"ok": true}`.
fn raw_worker(before_ready: &str, on_first_attempt: &str) -> String {
    let first = if on_first_attempt.is_empty() {
        String::new()
    } else {
        format!("    if msg[\"attempt\"] == 1:\n        {on_first_attempt}\n        continue\n")
    };
    format!(
        r#"import json, sys
{before_ready}
print(json.dumps({{"type": "ready", "protocol": 1, "info": {{"sdk": False}}}}), flush=True)
for line in sys.stdin:
    msg = json.loads(line)
    if msg["type"] == "shutdown":
        break
{first}    print(json.dumps({{"type": "result", "task": msg["task"], "output": {{"ok": True}}}}), flush=True)
"#
    )
}

#[tokio::test]
async fn protocol_garbage_fails_the_task_and_replaces_the_instance() {
    // It answers its first task with garbage.
    let raw = raw_worker("", r#"print("this is not JSON", flush=True)"#);
    let engine = Engine::start_with_files(
        r#"
resources: {gpus: none, cpu: 1}
workers:
  raw: {command: [python3, "{DIR}/raw.py"], instances: 1}
pipelines:
  p: {stages: [{name: s, worker: raw, retry: {max_attempts: 2, backoff: {initial: 50ms}}}]}
"#,
        &[("raw.py", raw.as_str())],
    )
    .await;
    let job = engine.wait_final(&engine.submit("p", json!({})).await, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let first = job["stages"][0]["attempt_history"][0]["error"].as_str().unwrap();
    assert!(first.contains("protocol error") && first.contains("not JSON"), "{first}");
    assert_eq!(instances(&engine.resources().await)[0]["restarts"], 1);
}

/// Stray stdout before `ready` (a library printing while the model loads, unbuffered) is
/// ignored; the same after `ready` is a protocol error (above).
#[tokio::test]
async fn stdout_noise_before_ready_is_ignored() {
    let noisy = raw_worker("print(\"Loading checkpoint shards: 100%\", flush=True)\nprint(flush=True)", "");
    let engine = Engine::start_with_files(
        r#"
resources: {gpus: none, cpu: 1}
workers:
  noisy: {command: [python3, "{DIR}/noisy.py"], instances: 1}
pipelines:
  p: {stages: [{name: s, worker: noisy, retry: {max_attempts: 1}}]}
"#,
        &[("noisy.py", noisy.as_str())],
    )
    .await;
    let job = engine.wait_final(&engine.submit("p", json!({})).await, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(instances(&engine.resources().await)[0]["restarts"], 0, "the noise cost a restart");
    assert!(engine.log().contains("worker wrote to stdout before `ready`, ignored"), "{}", engine.log());
}

#[tokio::test]
async fn instances_are_recycled_after_max_tasks() {
    let engine = start_with(&config_with("", "5s", "max_tasks_per_instance: 2")).await;
    let mut pids = std::collections::BTreeSet::new();
    for n in 0..6 {
        let job = engine.wait_final(&engine.submit("infer", json!({"n": n})).await, Duration::from_secs(20)).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
        pids.insert(job["output"]["pid"].as_i64().unwrap());
    }
    assert!(pids.len() >= 3, "6 tasks at 2 per incarnation need at least 3 processes: {pids:?}");
    assert_pool_whole(&engine).await;
    for pid in pids {
        let still_serving = instances(&engine.resources().await).iter().any(|i| i["pid"].as_i64() == Some(pid));
        assert!(still_serving || !alive(pid as i32), "recycled instance {pid} is gone");
    }
}

#[tokio::test]
async fn a_worker_task_in_flight_survives_an_engine_kill() {
    let mut engine = start("", "5s").await;
    let id = engine.submit("once", json!({"mode": "slow"})).await;
    engine
        .wait_until("the task runs", Duration::from_secs(10), async |e| {
            e.job(&id).await["stages"][0]["state"] == "running"
        })
        .await;
    let old: Vec<i32> =
        instances(&engine.resources().await).iter().filter_map(|i| i["pid"].as_i64()).map(|p| p as i32).collect();
    engine.kill9();
    engine.restart().await;
    for pid in old {
        assert!(!alive(pid), "the dead engine's instance {pid} was swept before new ones started");
    }
    // `once` allows one attempt; an interruption does not spend it, so the task runs again.
    engine
        .wait_until("re-dispatched", Duration::from_secs(20), async |e| e.job(&id).await["stages"][0]["attempts"] == 2)
        .await;
    let job = engine.job(&id).await;
    assert_eq!(job["stages"][0]["attempt_history"][0]["state"], "interrupted", "{job:#}");
    engine.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
    assert_eq!(engine.wait_final(&id, Duration::from_secs(20)).await["state"], "cancelled");
    assert_pool_whole(&engine).await;
}

#[tokio::test]
async fn a_worker_that_cannot_load_is_restarted_with_backoff_and_reported() {
    let engine = Engine::start(
        r#"
resources: {gpus: none, cpu: 1}
workers:
  broken: {command: [python3, -c, "import sys; print('model file missing', file=sys.stderr); sys.exit(1)"]}
pipelines:
  p: {stages: [{name: s, worker: broken}]}
"#,
    )
    .await;
    engine
        .wait_until("two failed starts", Duration::from_secs(10), async |e| {
            instances(&e.resources().await)[0]["consecutive_failures"].as_u64().unwrap() >= 2
        })
        .await;
    let inst = instances(&engine.resources().await)[0].clone();
    let error = inst["last_error"].as_str().unwrap();
    assert!(error.contains("exited with status 1") && error.contains("model file missing"), "{inst:#}");
    assert!(inst["restarts"].as_u64().unwrap() <= 3, "restarts back off, not as fast as possible: {inst:#}");
    // A job for it waits (no ready instance) instead of failing or hanging a slot.
    let id = engine.submit("p", json!({})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = engine.resources().await;
    assert_eq!(r["waiting"][0]["job"], id.as_str(), "{r:#}");
}

/// One instance (so a second task can only be sent ahead to it), prefetch 1 unless given.
fn one_instance(pool_extra: &str) -> String {
    format!(
        r#"
resources: {{gpus: none, cpu: 2}}
limits: {{kill_grace: 500ms}}
workers:
  model:
    command: [python3, "{{DIR}}/worker.py"]
    instances: 1
    startup_timeout: 20s
    heartbeat_timeout: 5s
    {pool_extra}
pipelines:
  once:
    stages:
      - {{name: infer, worker: model, retry: {{max_attempts: 1}}}}
"#
    )
}

/// Waits until the one instance runs `running` with `queued` sent ahead to it.
async fn wait_held(engine: &Engine, running: &str, queued: &str) -> Value {
    let mut seen = Value::Null;
    engine
        .wait_until("a task running and one sent ahead", Duration::from_secs(20), async |e| {
            seen = instances(&e.resources().await)[0].clone();
            seen["task"].as_str().is_some_and(|t| t.starts_with(running))
                && seen["queued"].as_array().is_some_and(|q| q.len() == 1 && q[0].as_str().unwrap().starts_with(queued))
        })
        .await;
    seen
}

#[tokio::test]
async fn a_crash_with_a_prefetched_task_requeues_both_without_spending_retries() {
    let engine = Engine::start_with_files(&one_instance("prefetch: 1"), &[("worker.py", WORKER)]).await;
    wait_ready(&engine, 1).await;
    let go = engine.path("go").display().to_string();
    // `once` allows one attempt: a spent retry would fail the job.
    let crashing = engine.submit("once", json!({"mode": "crash-when-told", "go": go, "n": 1})).await;
    let waiting = engine.submit("once", json!({"n": 2})).await;
    let before = wait_held(&engine, &crashing, &waiting).await;
    std::fs::write(&go, "").unwrap();

    for (id, n) in [(&crashing, 1), (&waiting, 2)] {
        let job = engine.wait_final(id, Duration::from_secs(30)).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
        assert_eq!(job["output"]["n"], n, "{job:#}");
        assert_ne!(job["output"]["pid"], before["pid"], "it ran on the restarted instance: {job:#}");
        let stage = &job["stages"][0];
        assert_eq!(stage["attempts"], 2, "{job:#}");
        let first = &stage["attempt_history"][0];
        assert_eq!(first["state"], "interrupted", "{job:#}");
        assert!(first["error"].as_str().unwrap().contains("exited with status 3"), "{first:#}");
        assert_eq!(stage["attempt_history"][1]["state"], "succeeded", "{job:#}");
    }
    let waiting_error = engine.job(&waiting).await["stages"][0]["attempt_history"][0]["error"].clone();
    assert!(waiting_error.as_str().unwrap().contains("not started"), "{waiting_error}");
    let inst = &instances(&engine.resources().await)[0];
    assert_eq!(inst["restarts"], 1, "{inst:#}");
    wait_ready(&engine, 1).await;
    engine.assert_all_capacity_free().await;
}

#[tokio::test]
async fn a_prefetched_task_is_cancelled_without_restarting_the_instance() {
    let engine = Engine::start_with_files(&one_instance("prefetch: 1"), &[("worker.py", WORKER)]).await;
    wait_ready(&engine, 1).await;
    let go = engine.path("go").display().to_string();
    let running = engine.submit("once", json!({"mode": "wait-file", "go": go, "n": 1})).await;
    let ahead = engine.submit("once", json!({"n": 2})).await;
    let before = wait_held(&engine, &running, &ahead).await;

    let (status, body) = engine.post(&format!("/v1/jobs/{ahead}/cancel"), json!({})).await;
    assert!(status < 300, "{status} {body}");
    let cancelled = engine.wait_final(&ahead, Duration::from_secs(10)).await;
    assert_eq!(cancelled["state"], "cancelled", "{cancelled:#}");
    assert_eq!(cancelled["stages"][0]["attempt_history"][0]["state"], "cancelled", "{cancelled:#}");
    // Its lease returned at once, while the running task still runs on the same process.
    let inst = instances(&engine.resources().await)[0].clone();
    assert_eq!(inst["pid"], before["pid"], "the instance was not restarted: {inst:#}");
    assert_eq!(inst["restarts"], 0, "{inst:#}");
    assert!(inst["task"].as_str().unwrap().starts_with(&running), "{inst:#}");
    assert_eq!(inst["queued"], json!([]), "{inst:#}");

    std::fs::write(&go, "").unwrap();
    let job = engine.wait_final(&running, Duration::from_secs(20)).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["output"]["pid"], before["pid"], "{job:#}");
    assert_eq!(job["stages"][0]["attempts"], 1, "{job:#}");
    wait_ready(&engine, 1).await;
    let inst = instances(&engine.resources().await)[0].clone();
    assert_eq!((inst["pid"].clone(), inst["restarts"].clone()), (before["pid"].clone(), json!(0)), "{inst:#}");
    assert_eq!(inst["tasks_done"], 1, "the cancelled task never ran: {inst:#}");
    let log = std::fs::read_to_string(engine.path("data/workers/model.0.stderr.log")).unwrap_or_default();
    assert!(log.contains("was cancelled before it started"), "the worker skipped it: {log}");
    engine.assert_all_capacity_free().await;
    // The instance still serves.
    let job = engine.wait_final(&engine.submit("once", json!({"n": 3})).await, Duration::from_secs(20)).await;
    assert_eq!((job["state"].clone(), job["output"]["pid"].clone()), (json!("succeeded"), before["pid"].clone()));
}

#[tokio::test]
async fn a_worker_that_does_not_announce_prefetch_gets_one_task_at_a_time() {
    // A worker without the SDK, as docs/worker-protocol.md shows: no `features` in `ready`.
    // It reads stdin itself (no read-ahead), so it can tell whether another line arrived
    // while it held a task.
    let raw = r#"
import json, os, select, sys, time
proto = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
buf = b""
def readline():
    global buf
    while b"\n" not in buf:
        chunk = os.read(0, 65536)
        if not chunk:
            return None
        buf += chunk
    line, buf = buf.split(b"\n", 1)
    return line
proto.write(json.dumps({"type": "ready", "protocol": 1, "info": {"pid": os.getpid()}}) + "\n")
while True:
    line = readline()
    if line is None:
        break
    msg = json.loads(line)
    if msg["type"] == "shutdown":
        break
    if msg["type"] != "task":
        continue
    time.sleep(0.1)
    overlap = bool(buf.strip()) or bool(select.select([0], [], [], 0)[0])
    proto.write(json.dumps({"type": "result", "task": msg["task"], "output": {"n": msg["input"]["n"], "overlap": overlap}}) + "\n")
"#;
    let engine = Engine::start_with_files(
        r#"
resources: {gpus: none, cpu: 2}
workers:
  raw: {command: [python3, "{DIR}/raw.py"], instances: 1, prefetch: 4}
pipelines:
  p: {stages: [{name: s, worker: raw, retry: {max_attempts: 1}}]}
"#,
        &[("raw.py", raw)],
    )
    .await;
    wait_ready(&engine, 1).await;
    let mut ids = Vec::new();
    for n in 0..6 {
        ids.push(engine.submit("p", json!({"n": n})).await);
    }
    let r = engine.resources().await;
    assert!(r["leases"].as_array().unwrap().len() <= 1, "one task at a time holds the pool: {r:#}");
    assert_eq!(instances(&r)[0]["queued"], json!([]), "{r:#}");
    for (n, id) in ids.iter().enumerate() {
        let job = engine.wait_final(id, Duration::from_secs(30)).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
        assert_eq!(job["output"], json!({"n": n, "overlap": false}), "no task was sent while one ran: {job:#}");
    }
    engine.assert_all_capacity_free().await;
}

#[tokio::test]
async fn with_prefetch_every_job_gets_its_own_result() {
    let engine = start_with(&config_with("", "5s", "prefetch: 3")).await;
    let mut ids = Vec::new();
    for n in 0..60 {
        ids.push(engine.submit("once", json!({"n": n})).await);
    }
    let mut pids = std::collections::BTreeSet::new();
    for (n, id) in ids.iter().enumerate() {
        let job = engine.wait_final(id, Duration::from_secs(60)).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
        assert_eq!(job["output"]["n"], n, "job {n} got another job's result: {job:#}");
        assert_eq!(job["stages"][0]["attempts"], 1, "{job:#}");
        pids.insert(job["output"]["pid"].as_i64().unwrap());
    }
    assert_eq!(pids.len(), 2, "both instances served, neither restarted");
    let r = engine.resources().await;
    let done: u64 = instances(&r).iter().map(|i| i["tasks_done"].as_u64().unwrap()).sum();
    assert_eq!(done, 60);
    assert_eq!(r["counters"]["pool:model"]["capacity"], 8, "2 instances x (1 + prefetch 3): {r:#}");
    assert_pool_whole(&engine).await;
}
