//! Chaos: randomised worker faults in a stream of jobs on a real pool (SDK workers): an
//! exception, a crash (`os._exit`), a hang (deadlock), children forked then the worker exits
//! (one of them escaped with `setsid`), SIGTERM ignored past the task's timeout, an output over
//! the protocol's line limit, and a flood of stderr. Afterwards: capacity is what it was before,
//! no zombie is left under the engine, no forked child survives, the worker's log stayed within
//! its cap, and every job is final with the cause its fault implies.
//!
//! `GPUFLOW_CHAOS_WORKER_JOBS` sets the stream's length (default 32); `GPUFLOW_CHAOS_SEED`
//! replays a run.

use std::time::Duration;

use serde_json::{Value, json};

use crate::chaos::{Lcg, env_count, seed};
use crate::fixture::*;

const WORKER: &str = r#"
import os, signal, subprocess, sys, threading, time
import gpuflow

class Chaos(gpuflow.Worker):
    def load(self):
        return {"providers": ["CPUExecutionProvider"]}

    def handle(self, task):
        fault, n = task.input["fault"], task.input["n"]
        if fault == "exception":
            raise ValueError(f"fault {n}")
        if fault == "crash":
            os._exit(7)
        if fault == "hang":
            lock = threading.Lock()
            lock.acquire()
            lock.acquire()
        if fault == "fork":
            a = subprocess.Popen(["sleep", "300"])
            b = subprocess.Popen(["sleep", "300"], start_new_session=True)
            with open(task.input["pids"], "w") as f:
                f.write(f"{a.pid} {b.pid}")
            os._exit(5)
        if fault == "sigterm":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:  # alive and beating: only the stage timeout can stop it
                time.sleep(0.05)
                task.progress()
        if fault == "huge-output":
            return {"blob": "x" * (2 * 1024 * 1024)}
        if fault == "huge-stderr":
            chunk = "e" * 65535 + "\n"
            for _ in range(64):
                sys.stderr.write(chunk)
            sys.stderr.flush()
        return {"n": n}

gpuflow.serve(Chaos())
"#;

const FAULTS: [&str; 8] = ["ok", "exception", "crash", "hang", "fork", "sigterm", "huge-output", "huge-stderr"];

/// The final job state and attempt state a fault must lead to, and a piece of its error.
/// A fault that takes the instance down (crash, fork-and-exit) first interrupts the task: it
/// is re-queued without spending a retry; the second time it fails it. A hang is the task's
/// own doing: it fails at once. The attempt state given is the last one's.
fn expected(fault: &str, n: u64) -> (&'static str, &'static str, Option<String>) {
    match fault {
        "ok" | "huge-stderr" => ("succeeded", "succeeded", None),
        "exception" => ("failed", "failed", Some(format!("ValueError: fault {n}"))),
        "crash" => ("failed", "failed", Some("exited with status 7".into())),
        "hang" => ("failed", "failed", Some("no heartbeat or progress for 1s".into())),
        "fork" => ("failed", "failed", Some("exited with status 5".into())),
        "sigterm" => ("failed", "timed_out", Some("timed out after 2000 ms".into())),
        "huge-output" => ("failed", "failed", Some("line limit".into())),
        _ => unreachable!(),
    }
}

fn idle_instances(r: &Value) -> usize {
    r["pools"][0]["instances"].as_array().unwrap().iter().filter(|i| i["state"] == "idle").count()
}

/// The parts of `/v1/resources` that say what is free: they must read the same at the end.
fn capacity(r: &Value) -> Value {
    let gpus: Vec<Value> =
        r["gpus"].as_array().unwrap().iter().map(|g| json!([g["memory_leased_bytes"], g["exclusive"]])).collect();
    json!({"cpu": r["cpu"], "gpus": gpus, "leases": r["leases"], "waiting": r["waiting"], "idle": idle_instances(r)})
}

#[tokio::test]
async fn random_worker_faults_leave_capacity_whole_no_zombie_and_every_job_with_its_cause() {
    let jobs = env_count("GPUFLOW_CHAOS_WORKER_JOBS", 32);
    let seed = seed();
    eprintln!("worker chaos: {jobs} jobs, seed {seed} (GPUFLOW_CHAOS_SEED={seed} replays it)");
    let mut rng = Lcg(seed);
    let engine = Engine::start_with_files(
        r#"
resources: {gpus: [{memory: 16GiB}], cpu: 2}
limits: {kill_grace: 300ms, log_max: 1MiB}
diagnosis: {sample_interval: 1h}
workers:
  model:
    command: [python3, "{DIR}/worker.py"]
    instances: 2
    needs: {gpu_memory: 4GiB}
    startup_timeout: 20s
    heartbeat_timeout: 1s
pipelines:
  once:
    max_queued: 100000
    stages:
      - {name: infer, worker: model, timeout: 2s, retry: {max_attempts: 1}}
"#,
        &[("worker.py", WORKER)],
    )
    .await;
    engine
        .wait_until("both instances ready", Duration::from_secs(30), async |e| {
            idle_instances(&e.resources().await) == 2
        })
        .await;
    let before = capacity(&engine.resources().await);

    // Every fault at least once, in a random order, then random ones.
    let mut kinds: Vec<&str> = FAULTS.to_vec();
    for i in (1..kinds.len()).rev() {
        kinds.swap(i, rng.next(i as u64 + 1) as usize);
    }
    while (kinds.len() as u64) < jobs {
        kinds.push(FAULTS[rng.next(FAULTS.len() as u64) as usize]);
    }
    let mut submitted = Vec::new();
    for (n, fault) in kinds.iter().enumerate() {
        let pids = engine.path(&format!("fork{n}.pids")).display().to_string();
        let id = engine.submit("once", json!({"fault": fault, "n": n, "pids": pids})).await;
        submitted.push((id, *fault, n as u64));
        tokio::time::sleep(Duration::from_millis(rng.next(40))).await;
    }

    for (id, fault, n) in &submitted {
        let job = engine.wait_final(id, Duration::from_secs(180)).await;
        let (state, attempt_state, cause) = expected(fault, *n);
        assert_eq!(job["state"], state, "seed {seed}: fault {fault}: {job:#}");
        // A task sent ahead (prefetch) to an instance that another task took down is re-queued
        // as interrupted without having run: a bystander's attempt, costing nothing.
        let history = job["stages"][0]["attempt_history"].as_array().unwrap();
        let (bystander, own): (Vec<&Value>, Vec<&Value>) = history.iter().partition(|a| {
            a["state"] == "interrupted" && a["error"].as_str().is_some_and(|e| e.contains("(not started)"))
        });
        // A crash costs one free interruption, then the attempt fails.
        let crashes = matches!(*fault, "crash" | "fork");
        let runs = if crashes { 2 } else { 1 };
        assert_eq!(own.len(), runs, "seed {seed}: max_attempts is 1 ({bystander:?} not started): {job:#}");
        assert_eq!(job["stages"][0]["attempts"], history.len(), "seed {seed}: {job:#}");
        if crashes {
            assert_eq!(own[0]["state"], "interrupted", "seed {seed}: fault {fault}: {job:#}");
        }
        let attempt = own[runs - 1];
        assert_eq!(attempt["state"], attempt_state, "seed {seed}: fault {fault}: {job:#}");
        if let Some(cause) = cause {
            for a in &own {
                let error = a["error"].as_str().unwrap_or_default();
                assert!(error.contains(&cause), "seed {seed}: fault {fault} should fail with `{cause}`, got: {error}");
            }
            let error = job["error"].as_str().unwrap_or_default();
            assert!(error.contains(&cause), "seed {seed}: the job's error names the cause: {error}");
        } else {
            assert_eq!(job["output"]["n"], *n, "seed {seed}: {job:#}");
        }
    }

    engine
        .wait_until("both instances ready again", Duration::from_secs(90), async |e| {
            idle_instances(&e.resources().await) == 2
        })
        .await;
    assert_eq!(capacity(&engine.resources().await), before, "seed {seed}: capacity changed");
    assert!(zombie_children_of(engine.pid()).is_empty(), "seed {seed}: zombies under the engine");
    for (_, fault, n) in &submitted {
        if *fault == "fork" {
            let text = std::fs::read_to_string(engine.path(&format!("fork{n}.pids"))).unwrap();
            for pid in text.split_whitespace().map(|p| p.parse::<i32>().unwrap()) {
                engine
                    .wait_until("the dead worker's children are gone", Duration::from_secs(5), async |_| !alive(pid))
                    .await;
            }
        }
    }
    // log_max 1 MiB, rotated once: each file stays within the cap however much a worker writes.
    for name in ["model.0.stderr.log", "model.1.stderr.log", "model.0.stderr.log.1", "model.1.stderr.log.1"] {
        let log = engine.path(&format!("data/workers/{name}"));
        let size = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        assert!(size <= 1 << 20, "seed {seed}: {} is {size} bytes, over log_max", log.display());
    }
    // The pool still works.
    let id = engine.submit("once", json!({"fault": "ok", "n": 999})).await;
    assert_eq!(engine.wait_final(&id, Duration::from_secs(30)).await["state"], "succeeded");
}
