//! Progress everywhere: a running stage's latest report (a real Python worker's
//! `task.progress`, a command stage's `$GPUFLOW_PROGRESS` lines from Python and from the
//! shell) in `GET /v1/jobs/{id}`, on the live feed at most 4 a second per attempt with the
//! last one before the end, and in `gpuflow submit --wait` off a terminal.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::dashboard::Feed;
use crate::fixture::*;

/// Reports a fraction and a message, then waits for the job's `go` file.
const WORKER: &str = r#"
import os, time
import gpuflow

class W(gpuflow.Worker):
    def handle(self, task):
        if task.input.get("mode") == "steps":
            for i in range(1, 11):
                task.progress(i / 10, f"batch {i}/10")
                time.sleep(0.1)
            return {"steps": 10}
        task.progress(0.5, "frame 2/4")
        while not os.path.exists(task.input["go"]):
            time.sleep(0.05)
            task.heartbeat()
        return {"ok": True}

gpuflow.serve(W())
"#;

/// A Python command stage: a plain line, a JSON line, a bad line, then waits for `go`.
const STAGE_WAIT: &str = r#"
import json, os, sys, time
go = sys.argv[1]
with open(os.environ["GPUFLOW_PROGRESS"], "a", buffering=1) as p:
    p.write("0.3 loading\n")
    p.write(json.dumps({"fraction": 0.6, "message": "frame 3/5"}) + "\n")
    p.write("this is not progress\n")
    while not os.path.exists(go):
        time.sleep(0.05)
"#;

/// A Python command stage that reports `n` steps `gap` seconds apart, then `1 done` and exits.
const STAGE_STEPS: &str = r#"
import os, sys, time
n, gap = int(sys.argv[1]), float(sys.argv[2])
with open(os.environ["GPUFLOW_PROGRESS"], "a", buffering=1) as p:
    for i in range(n):
        p.write(f"{i / n:.4f} step {i + 1}/{n}\n")
        time.sleep(gap)
    p.write("1 done\n")
"#;

const CONFIG: &str = r#"
resources: {gpus: none, cpu: 5}
workers:
  model:
    command: [python3, "{DIR}/worker.py"]
    instances: 1
    needs: {cpu: 1}
    startup_timeout: 20s
pipelines:
  mixed:
    stages:
      - {name: worker, worker: model}
      - {name: python, after: [], command: [python3, "{DIR}/stage_wait.py", "{input.go}"]}
      - name: shell
        after: []
        command: [sh, -c, 'echo "40% halfway there" >> "$GPUFLOW_PROGRESS"; while [ ! -e "$1" ]; do sleep 0.05; done', sh, "{input.go}"]
  steps:
    stages:
      - {name: count, command: [python3, "{DIR}/stage_steps.py", "{input.n}", "{input.gap}"]}
      - {name: worker, after: [], worker: model}
"#;

async fn start() -> Engine {
    let engine = Engine::start_with_files(
        CONFIG,
        &[("worker.py", WORKER), ("stage_wait.py", STAGE_WAIT), ("stage_steps.py", STAGE_STEPS)],
    )
    .await;
    engine
        .wait_until("the worker to be ready", Duration::from_secs(30), async |e| {
            e.resources().await["pools"][0]["instances"][0]["state"] == "idle"
        })
        .await;
    engine
}

#[tokio::test]
async fn a_running_stage_shows_its_latest_progress_from_a_python_worker_and_from_command_stages() {
    let engine = start().await;
    let go = engine.path("go");
    let before = jiff::Timestamp::now();
    let id = engine.submit("mixed", json!({"go": go.display().to_string()})).await;
    let expected = [
        ("worker", json!(0.5), "frame 2/4"),
        ("python", json!(0.6), "frame 3/5"),
        ("shell", json!(0.4), "halfway there"),
    ];
    engine
        .wait_until("every stage to report its progress", Duration::from_secs(30), async |e| {
            let job = e.job(&id).await;
            expected.iter().all(|(name, fraction, message)| {
                let p = &stage(&job, name)["progress"];
                p["fraction"] == *fraction && p["message"] == *message
            })
        })
        .await;
    let job = engine.job(&id).await;
    for (name, _, _) in &expected {
        let s = stage(&job, name);
        assert_eq!(s["state"], "running", "{s:#}");
        let at: jiff::Timestamp = s["progress"]["at"].as_str().unwrap().parse().unwrap();
        assert!(at >= before && at <= jiff::Timestamp::now(), "{name}: `at` {at} is not when it was reported");
    }
    // The python stage's bad line after its JSON line changed nothing.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(stage(&engine.job(&id).await, "python")["progress"]["fraction"], 0.6);
    // The pool shows it with the instance too.
    let instance = &engine.resources().await["pools"][0]["instances"][0];
    assert_eq!(instance["progress"]["message"], "frame 2/4", "{instance:#}");

    std::fs::write(&go, "").unwrap();
    let job = engine.wait_final(&id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    for (name, _, _) in &expected {
        assert_eq!(stage(&job, name)["progress"], Value::Null, "{name}: an ended attempt shows no progress");
    }
    assert_eq!(engine.resources().await["pools"][0]["instances"][0]["progress"], Value::Null);
}

/// The progress events of each of the job's stages (first attempts), in feed order, until
/// `stages` attempts ended; each checked to come between its attempt's start and end.
async fn progress_events(feed: &mut Feed, id: &str, stages: &[&str]) -> Vec<Vec<Value>> {
    let mut events = vec![Vec::new(); stages.len()];
    let mut started = vec![false; stages.len()];
    let mut ended = vec![false; stages.len()];
    while !ended.iter().all(|e| *e) {
        let e = feed.next(Duration::from_secs(30)).await;
        let Some(i) = stages.iter().position(|s| e["stage"] == *s).filter(|_| e["job"] == id) else { continue };
        match e["type"].as_str().unwrap() {
            "attempt_started" => started[i] = true,
            "progress" => {
                assert!(started[i] && !ended[i], "progress outside its attempt: {e}");
                assert_eq!((e["attempt"].as_u64(), e["pipeline"].as_str()), (Some(1), Some("steps")), "{e}");
                events[i].push(e);
            }
            "attempt_ended" => ended[i] = true,
            _ => {}
        }
    }
    events
}

/// Events are at least 250 ms apart, except the held-back last one, sent right
/// before the attempt's end.
fn assert_rate(events: &[Value], what: &str) {
    let at: Vec<u64> = events.iter().map(|e| e["at_ms"].as_u64().unwrap()).collect();
    for pair in at[..at.len().saturating_sub(1)].windows(2) {
        assert!(pair[1] - pair[0] >= 250, "{what}: two progress events {} ms apart: {at:?}", pair[1] - pair[0]);
    }
}

#[tokio::test]
async fn the_feed_carries_progress_at_most_four_a_second_per_attempt_and_the_last_one_before_the_end() {
    let engine = start().await;
    let mut feed = Feed::open(&engine, "").await;
    assert_eq!(feed.next(Duration::from_secs(5)).await["type"], "hello");
    // 150 reports in 1.5 s (100 a second), then the last one and the exit right after it.
    let t0 = Instant::now();
    let id = engine.submit("steps", json!({"n": 150, "gap": 0.01, "mode": "steps"})).await;
    let mut both = progress_events(&mut feed, &id, &["count", "worker"]).await;
    let ran = t0.elapsed().as_secs_f64();
    let events = both.remove(0);
    let most = (ran * 4.0).ceil() as usize + 1;
    assert!(events.len() >= 3, "too few progress events: {events:?}");
    assert!(events.len() <= most, "{} progress events in {ran:.1} s: more than 4 a second", events.len());
    assert_rate(&events, "command stage");
    let fractions: Vec<f64> = events.iter().map(|e| e["fraction"].as_f64().unwrap()).collect();
    assert!(fractions.windows(2).all(|w| w[0] <= w[1]), "latest wins, in order: {fractions:?}");
    let last = events.last().unwrap();
    assert_eq!((last["fraction"].as_f64(), last["message"].as_str()), (Some(1.0), Some("done")), "{events:?}");

    // A worker's reports go the same way (the SDK sends at most 5 a second itself).
    let events = both.remove(0);
    assert!(events.len() >= 2, "a worker's progress is on the feed: {events:?}");
    assert_rate(&events, "worker stage");
    assert!(events.iter().all(|e| e["message"].as_str().unwrap().starts_with("batch ")), "{events:?}");
    assert_eq!(engine.wait_final(&id, Duration::from_secs(30)).await["state"], "succeeded");
}

#[tokio::test]
async fn submit_wait_off_a_terminal_prints_throttled_progress_lines_that_name_their_job() {
    let engine = start().await;
    // Two at once, as two `submit --wait` in one CI log: each line must say whose it is.
    let spawn = || {
        Command::new(bin())
            .args([
                "--server",
                &engine.base,
                "submit",
                "steps",
                "-i",
                "n:=12",
                "-i",
                "gap:=0.25",
                "-i",
                "mode=steps",
                "--wait",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let outs: Vec<(String, String)> = tokio::task::spawn_blocking(move || {
        [a, b]
            .into_iter()
            .map(|c| {
                let out = c.wait_with_output().unwrap();
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                (String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
            })
            .collect()
    })
    .await
    .unwrap();
    let ids: Vec<String> = outs
        .iter()
        .map(|(_, err)| err.lines().next().unwrap().strip_prefix("submitted ").expect(err).to_string())
        .collect();
    assert_ne!(ids[0], ids[1]);
    for ((stdout, stderr), (id, other)) in outs.iter().zip([(&ids[0], &ids[1]), (&ids[1], &ids[0])]) {
        assert!(stdout.contains("\"steps\": 10"), "{stdout}");
        let lines: Vec<&str> = stderr.lines().skip(1).collect();
        // Lines name the job by its short id, its last 8 characters, as the dashboard does.
        let (short, other) = (&id[id.len() - 8..], &other[other.len() - 8..]);
        for line in &lines {
            assert!(line.contains(short) && !line.contains(other), "a line without its job: {line}");
        }
        let count: Vec<&&str> = lines.iter().filter(|l| l.starts_with(&format!("{short} count: "))).collect();
        let progress: Vec<&&str> = count.iter().filter(|l| l.contains("% step ")).copied().collect();
        // 12 reports over 3 s, printed at most once a second (state changes always).
        assert!(progress.len() >= 2, "progress lines: {stderr}");
        assert!(progress.len() <= 5, "not throttled: {stderr}");
        assert!(progress.iter().all(|l| l.contains(": running (attempt 1) ")), "{stderr}");
        let done = count.iter().position(|l| l.ends_with("count: succeeded")).expect(stderr);
        assert!(count.iter().position(|l| l.contains("% step ")).unwrap() < done, "{stderr}");
        assert!(lines.iter().any(|l| *l == format!("job {id} succeeded")), "{stderr}");
    }
}
