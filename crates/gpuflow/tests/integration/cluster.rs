//! Several agents share one PostgreSQL queue: real engines, a real database, virtual GPUs.
//! Each stage appends `STAGE JOB ATTEMPT start|end NANOS JOB_DIR PID` to one log; the job
//! dir names the agent that ran it. From that log and the database the tests check that
//! every job finishes, no stage that succeeded runs again, and no agent ever runs more than
//! its capacity at once.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::fixture::{Engine, TestDb, alive};

const TTL_MS: u64 = 2_000;

fn stage_command(log: &Path, seconds: &str) -> String {
    let log = log.display();
    format!(
        "[sh, -c, 'echo \"$GPUFLOW_STAGE $GPUFLOW_JOB_ID $GPUFLOW_ATTEMPT start $(date +%s%N) $GPUFLOW_JOB_DIR $$\" >> {log}; sleep {seconds}; echo \"$GPUFLOW_STAGE $GPUFLOW_JOB_ID $GPUFLOW_ATTEMPT end $(date +%s%N) $GPUFLOW_JOB_DIR $$\" >> {log}']"
    )
}

/// The same file for every agent (jobs carry the submitter's copy to whoever claims them).
fn agent_config(db: &TestDb, log: &Path, gpu_seconds: &str) -> String {
    format!(
        r#"
store: {url}
cluster: {{lease_ttl: {TTL_MS}ms, poll_interval: 200ms}}
limits: {{kill_grace: 1s}}
resources:
  gpus: [{{memory: 16GiB}}]
  cpu: 2
pipelines:
  chain:
    max_queued: 1000
    stages:
      - {{name: prep, command: {prep}, needs: {{cpu: 1}}}}
      - {{name: infer, command: {infer}, needs: {{gpu: 1}}}}
      - {{name: post, command: {post}, needs: {{cpu: 1}}}}
  long:
    stages:
      - {{name: only, command: {long}, needs: {{cpu: 1}}}}
  short:
    stages:
      - {{name: only, command: {short}, needs: {{cpu: 1}}}}
"#,
        url = db.url,
        prep = stage_command(log, "0.2"),
        infer = stage_command(log, gpu_seconds),
        post = stage_command(log, "0.2"),
        long = stage_command(log, "10"),
        short = stage_command(log, "1"),
    )
}

#[derive(Debug, Clone)]
struct Run {
    stage: String,
    job: String,
    attempt: u32,
    start: u128,
    end: Option<u128>,
    /// The temp dir of the agent that ran it.
    agent: String,
    pid: i32,
}

fn runs(log: &Path, agents: &[&Engine]) -> Vec<Run> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut out: Vec<Run> = Vec::new();
    for line in text.lines() {
        let p: Vec<&str> = line.split_whitespace().collect();
        let (stage, job, attempt, kind, t, dir, pid) = (p[0], p[1], p[2], p[3], p[4], p[5], p[6]);
        let agent = agents
            .iter()
            .find(|a| dir.starts_with(&a.dir.path().display().to_string()))
            .map(|a| a.dir.path().display().to_string())
            .unwrap_or_else(|| panic!("job dir {dir} belongs to no agent"));
        let (attempt, t) = (attempt.parse().unwrap(), t.parse().unwrap());
        if kind == "start" {
            out.push(Run {
                stage: stage.into(),
                job: job.into(),
                attempt,
                start: t,
                end: None,
                agent,
                pid: pid.parse().unwrap(),
            });
        } else if let Some(r) = out.iter_mut().find(|r| r.stage == stage && r.job == job && r.attempt == attempt) {
            r.end = Some(t);
        }
    }
    out
}

/// On each agent, replays every start and end in time order and checks the agent's
/// capacity (2 CPU slots, 1 GPU) was never exceeded.
fn assert_no_overcommit(runs: &[Run]) {
    let mut by_agent: BTreeMap<&str, Vec<(u128, i32, i32)>> = BTreeMap::new();
    for r in runs {
        let (cpu, gpu) = if r.stage == "infer" { (0, 1) } else { (1, 0) };
        let events = by_agent.entry(&r.agent).or_default();
        events.push((r.start, cpu, gpu));
        events.push((r.end.unwrap_or(u128::MAX), -cpu, -gpu));
    }
    for (agent, mut events) in by_agent {
        // Ends before starts at the same instant: a release precedes the grant it enables.
        events.sort_by_key(|(t, cpu, gpu)| (*t, *cpu + *gpu));
        let (mut cpu, mut gpu) = (0, 0);
        for (t, dc, dg) in events {
            cpu += dc;
            gpu += dg;
            assert!(cpu <= 2 && gpu <= 1, "agent {agent} over-committed at {t}: cpu {cpu}, gpu {gpu}");
        }
    }
}

/// Every stage succeeded exactly once, its last attempt, and nothing ran after it.
fn assert_each_stage_succeeded_once(db: &TestDb, runs: &[Run]) {
    let rows = db.sql("SELECT job_id, stage_idx, attempt, state FROM attempts ORDER BY job_id, stage_idx, attempt");
    let mut attempts: BTreeMap<(String, String), Vec<(u32, String)>> = BTreeMap::new();
    for line in rows.lines() {
        let p: Vec<&str> = line.split('|').collect();
        attempts.entry((p[0].into(), p[1].into())).or_default().push((p[2].parse().unwrap(), p[3].into()));
    }
    let stage_names = ["prep", "infer", "post"];
    for ((job, idx), list) in &attempts {
        let succeeded: Vec<u32> = list.iter().filter(|(_, s)| s == "succeeded").map(|(a, _)| *a).collect();
        assert_eq!(succeeded.len(), 1, "{job}/{idx}: {list:?}");
        let last = list.iter().map(|(a, _)| *a).max().unwrap();
        assert_eq!(succeeded[0], last, "{job}/{idx} ran again after it succeeded: {list:?}");
        let name = stage_names.get(idx.parse::<usize>().unwrap()).copied().unwrap_or("only");
        let later: Vec<&Run> = runs.iter().filter(|r| &r.job == job && r.stage == name && r.attempt > last).collect();
        assert!(later.is_empty(), "{job}/{name} started after its successful attempt: {later:?}");
    }
}

async fn start_agents(db: &TestDb, log: &Path, n: usize, gpu_seconds: &str) -> Vec<Engine> {
    let config = agent_config(db, log, gpu_seconds);
    let mut agents = Vec::new();
    for _ in 0..n {
        agents.push(Engine::start(&config).await);
    }
    agents
}

async fn wait_all_final(agent: &Engine, ids: &[String], within: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    for id in ids {
        out.push(agent.wait_final(id, within).await);
    }
    out
}

fn now_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()
}

#[tokio::test]
async fn killed_agent_work_is_rerun_by_the_others() {
    let Some(db) = TestDb::create() else { return };
    let shared = tempfile::tempdir().unwrap();
    let log = shared.path().join("runs.log");
    let mut agents = start_agents(&db, &log, 3, "1.5").await;

    // Any agent takes submissions and answers for every job.
    let mut ids = Vec::new();
    for i in 0..12 {
        ids.push(agents[i % 3].submit("chain", json!({})).await);
    }
    let (status, body) = agents[2].get("/v1/agents").await;
    assert_eq!(status, 200, "{body}");
    let listed = body["agents"].as_array().unwrap();
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|a| a["state"] == "running"), "{body:#}");

    // Kill agent 1 while it runs something.
    agents[1]
        .wait_until("agent 1 to hold a lease", Duration::from_secs(30), async |a| {
            a.resources().await["leases"].as_array().is_some_and(|l| !l.is_empty())
        })
        .await;
    let victim_dir = agents[1].dir.path().display().to_string();
    let killed_at = now_ns();
    agents[1].kill9();
    let t0 = Instant::now();

    let jobs = wait_all_final(&agents[0], &ids, Duration::from_secs(90)).await;
    for job in &jobs {
        assert_eq!(job["state"], "succeeded", "{job:#}");
    }
    let all = runs(&log, &[&agents[0], &agents[1], &agents[2]]);
    assert_no_overcommit(&all);
    assert_each_stage_succeeded_once(&db, &all);

    // The stages the dead agent held were re-run by the others, after its lease expired.
    let interrupted = db.sql("SELECT count(*) FROM attempts WHERE state = 'interrupted'");
    assert!(interrupted.parse::<u32>().unwrap() >= 1, "the kill hit no running stage");
    let rerun: Vec<&Run> = all
        .iter()
        .filter(|r| r.start > killed_at && r.agent != victim_dir)
        .filter(|r| {
            all.iter().any(|v| v.agent == victim_dir && v.job == r.job && v.stage == r.stage && v.attempt < r.attempt)
        })
        .collect();
    assert!(!rerun.is_empty(), "nothing of the dead agent was re-dispatched");
    let redispatch_ms = rerun.iter().map(|r| (r.start - killed_at) / 1_000_000).min().unwrap();
    eprintln!(
        "agent death -> re-dispatch: {redispatch_ms} ms with lease_ttl {TTL_MS} ms ({} stages re-run; all jobs final {:?} after the kill)",
        rerun.len(),
        t0.elapsed()
    );
    // The last renewal came at most TTL/3 before the kill, so expiry lands between 2/3 of the
    // TTL and the TTL after it; nothing may be re-dispatched before that.
    assert!(redispatch_ms as u64 >= TTL_MS * 2 / 3 - 100, "re-dispatched before the lease could have expired");
    assert!(redispatch_ms as u64 <= TTL_MS + 2_000, "re-dispatch took {redispatch_ms} ms");
    let (_, body) = agents[0].get("/v1/agents").await;
    let dead = body["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["api"] != agents[0].base && a["api"] != agents[2].base)
        .cloned();
    assert_eq!(dead.map(|d| d["state"].clone()), Some(json!("unresponsive")), "{body:#}");
    // The CLI lists the same.
    let out = std::process::Command::new(crate::fixture::bin())
        .arg("agents")
        .env("GPUFLOW_SERVER", &agents[2].base)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(text.lines().count(), 3, "{text}");
    assert_eq!(text.matches("[unresponsive]").count(), 1, "{text}");
    assert_eq!(text.matches("[running]").count(), 2, "{text}");
    assert_eq!(db.sql("SELECT count(*) FROM leases"), "0");
}

#[tokio::test]
async fn frozen_agent_is_fenced_and_its_processes_killed() {
    let Some(db) = TestDb::create() else { return };
    let shared = tempfile::tempdir().unwrap();
    let log = shared.path().join("runs.log");
    let config = agent_config(&db, &log, "1");
    let frozen = Engine::start(&config).await;
    let long = frozen.submit("long", json!({})).await;
    let short = frozen.submit("short", json!({})).await;
    frozen
        .wait_until("both stages to run on the first agent", Duration::from_secs(20), async |_| {
            std::fs::read_to_string(&log).unwrap_or_default().matches(" start ").count() == 2
        })
        .await;
    // Only now does a second agent join, so both stages are the first agent's.
    let other = Engine::start(&config).await;
    let first_runs = runs(&log, &[&frozen, &other]);
    assert!(first_runs.iter().all(|r| r.agent == frozen.dir.path().display().to_string() && r.attempt == 1));
    let long_pid = first_runs.iter().find(|r| r.job == long).unwrap().pid;

    frozen.signal(Signal::SIGSTOP);
    // Past the lease, the other agent re-queues and re-runs both; the short one's first run
    // ends meanwhile, with its agent unable to report it.
    other
        .wait_until("the other agent to re-run both", Duration::from_secs(20), async |o| {
            runs(&log, &[&frozen, o]).iter().filter(|r| r.attempt == 2).count() == 2
        })
        .await;
    frozen.signal(Signal::SIGCONT);
    // It knows at once that it was silent past its lease, and stops the stale run without
    // waiting for the database to say so.
    let resumed = Instant::now();
    while alive(long_pid) && resumed.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stopped_after = resumed.elapsed();
    assert!(
        stopped_after < Duration::from_millis(1_500),
        "the stale run was stopped {stopped_after:?} after the agent resumed"
    );
    // The tick after the signal records why.
    frozen
        .wait_until("the frozen agent to say why it stopped the run", Duration::from_secs(5), async |f| {
            f.log().contains("past lease_ttl")
        })
        .await;

    for id in [&short, &long] {
        let job = other.wait_final(id, Duration::from_secs(40)).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
    }
    // The late report of the short stage's first run was refused ...
    let text = frozen.log();
    assert!(text.contains("late write refused"), "{text}");
    let metrics = frozen.http.get(format!("{}/metrics", frozen.base)).send().await.unwrap().text().await.unwrap();
    let fenced: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("gpuflow_fenced_writes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no fenced-writes counter in:\n{metrics}"));
    assert!(fenced >= 1.0, "refused writes are counted: {fenced}");
    // ... and the long stage's first run was killed when its agent saw the lease gone.
    assert!(text.contains("lease lost"), "{text}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(long_pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!alive(long_pid), "the stale agent's process still runs");
    let all = runs(&log, &[&frozen, &other]);
    let long_first = all.iter().find(|r| r.job == long && r.attempt == 1).unwrap();
    assert!(long_first.end.is_none(), "the stale run was not cut short: {long_first:?}");

    // The store kept the current holder's results: attempt 1 interrupted, attempt 2 succeeded.
    for id in [&short, &long] {
        let states =
            db.sql(&format!("SELECT string_agg(state, ',' ORDER BY attempt) FROM attempts WHERE job_id = '{id}'"));
        assert_eq!(states, "interrupted,succeeded", "job {id}");
    }
    let fenced_agent = db.sql(&format!(
        "SELECT count(*) FROM attempts WHERE state = 'succeeded' AND agent_id IN (SELECT id FROM agents WHERE api = '{}')",
        frozen.base
    ));
    assert_eq!(fenced_agent, "0", "a success from the stale agent was recorded");
}

#[tokio::test]
async fn agents_ride_out_killed_database_connections() {
    let Some(db) = TestDb::create() else { return };
    let shared = tempfile::tempdir().unwrap();
    let log = shared.path().join("runs.log");
    let agents = start_agents(&db, &log, 3, "0.3").await;
    let mut ids = Vec::new();
    for i in 0..15 {
        ids.push(agents[i % 3].submit("chain", json!({})).await);
    }
    let mut killed = 0;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        killed += db.terminate_connections();
    }
    assert!(killed >= 3, "connections were killed: {killed}");
    // Submissions keep working once the agents have reconnected.
    let mut late = None;
    for _ in 0..50 {
        let (status, body) = agents[1].post("/v1/jobs", json!({"pipeline": "chain", "input": {}})).await;
        if status == 201 {
            late = Some(body["id"].as_str().unwrap().to_string());
            break;
        }
        assert_eq!(status, 503, "a lost connection is reported as unavailable: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ids.push(late.expect("the agent reconnected"));
    let jobs = wait_all_final(&agents[2], &ids, Duration::from_secs(90)).await;
    let states: HashMap<String, usize> = jobs.iter().fold(HashMap::new(), |mut m, j| {
        *m.entry(j["state"].as_str().unwrap().to_string()).or_default() += 1;
        m
    });
    assert_eq!(states.get("succeeded"), Some(&ids.len()), "{states:?}");
    let all = runs(&log, &[&agents[0], &agents[1], &agents[2]]);
    assert_no_overcommit(&all);
    assert_each_stage_succeeded_once(&db, &all);
    assert_eq!(db.sql("SELECT count(*) FROM leases"), "0");
    for a in &agents {
        assert!(a.log().contains("gpuflow") && !a.log().contains("panicked"), "{}", a.log());
    }
}

/// Puts a one-stage job straight into the shared queue under pipeline file `text` (as if an
/// agent with that file had accepted it).
fn insert_queued_job(db: &TestDb, id: &str, hash: &str, text: &str, pipeline: &str, stage: &str) {
    let text = text.replace('\'', "''");
    db.sql(&format!(
        "INSERT INTO config_snapshots VALUES ('{hash}', '{text}', 0) ON CONFLICT DO NOTHING; \
         INSERT INTO jobs (id, pipeline, input, priority, state, config_hash, created_at) \
         VALUES ('{id}', '{pipeline}', '{{}}', 0, 'queued', '{hash}', gpuflow_now_ms()); \
         INSERT INTO stages (job_id, idx, name, deps, state, priority, job_seq) \
         SELECT '{id}', 0, '{stage}', '[]', 'queued', 0, seq FROM jobs WHERE id = '{id}'; \
         SELECT pg_notify('gpuflow_queue', '')"
    ));
}

#[tokio::test]
async fn a_job_no_live_agent_can_run_fails_after_the_bound_saying_why() {
    let Some(db) = TestDb::create() else { return };
    let config = format!(
        r#"
store: {url}
cluster: {{lease_ttl: {TTL_MS}ms, poll_interval: 200ms, unrunnable_after: 1500ms}}
resources: {{gpus: none, cpu: 2}}
pipelines:
  short:
    stages:
      - {{name: only, command: [sleep, "0.1"], needs: {{cpu: 1}}}}
"#,
        url = db.url
    );
    let agents = [Engine::start(&config).await, Engine::start(&config).await];
    // A pipeline file that no agent can load, and one whose stage needs a worker pool that
    // no agent has (the file that accepted it declared one).
    let (unparsable, needs_pool) = (uuid::Uuid::now_v7().to_string(), uuid::Uuid::now_v7().to_string());
    insert_queued_job(&db, &unparsable, "broken", "pipelines: [this is not, a map", "x", "only");
    let with_pool = format!(
        "listen: 127.0.0.1:0\ndata_dir: /tmp/elsewhere\nstore: {}\nresources: {{gpus: none, cpu: 2}}\n\
         workers:\n  ocr:\n    command: [python3, /nonexistent/worker.py]\n    instances: 1\n\
         pipelines:\n  read:\n    stages:\n      - {{name: read, worker: ocr}}\n",
        db.url
    );
    insert_queued_job(&db, &needs_pool, "with-pool", &with_pool, "read", "read");
    let submitted = Instant::now();
    // Work that can run is not held up by the stages no agent takes.
    let ok = agents[0].submit("short", json!({})).await;
    assert_eq!(agents[1].wait_final(&ok, Duration::from_secs(20)).await["state"], "succeeded");

    for (id, why) in [(&unparsable, "does not load here"), (&needs_pool, "worker pool `ocr`")] {
        let job = agents[1].wait_final(id, Duration::from_secs(30)).await;
        assert_eq!(job["state"], "failed", "{job:#}");
        let error = job["error"].as_str().unwrap_or_default();
        assert!(error.contains("no live agent can run it") && error.contains(why), "{error}");
        // Both agents said why, by name.
        assert_eq!(error.matches(why).count(), 2, "{error}");
        assert_eq!(job["stages"][0]["state"], "failed", "{job:#}");
    }
    assert!(submitted.elapsed() >= Duration::from_millis(1_500), "failed before the bound");
    assert_eq!(db.sql("SELECT count(*) FROM cannot_run"), "0", "the marks are spent");
    let attempts = format!("SELECT count(*) FROM attempts WHERE job_id IN ('{unparsable}', '{needs_pool}')");
    assert_eq!(db.sql(&attempts), "0");
}

#[tokio::test]
async fn max_queued_is_exact_when_two_agents_admit_at_the_same_instant() {
    let Some(db) = TestDb::create() else { return };
    let config = format!(
        r#"
store: {url}
cluster: {{lease_ttl: {TTL_MS}ms, poll_interval: 200ms}}
resources: {{gpus: none, cpu: 1}}
pipelines:
  capped:
    max_queued: 5
    stages:
      - {{name: only, command: [sleep, "30"], needs: {{cpu: 1}}}}
"#,
        url = db.url
    );
    let agents = [Engine::start(&config).await, Engine::start(&config).await];
    for round in 0..3 {
        let mut posts = tokio::task::JoinSet::new();
        for i in 0..16 {
            let (http, base) = (agents[i % 2].http.clone(), agents[i % 2].base.clone());
            posts.spawn(async move {
                let r = http.post(format!("{base}/v1/jobs")).json(&json!({"pipeline": "capped"})).send().await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap_or_default())
            });
        }
        let answers = posts.join_all().await;
        let accepted = answers.iter().filter(|(status, _)| *status == 201).count();
        for (status, body) in &answers {
            assert!(*status == 201 || *status == 429, "{status} {body}");
        }
        if round == 0 {
            assert_eq!(accepted, 5, "{answers:?}");
        } else {
            assert_eq!(accepted, 0, "the queue is still full: {answers:?}");
        }
        assert_eq!(db.sql("SELECT count(*) FROM jobs WHERE pipeline = 'capped'"), "5");
    }
}

#[tokio::test]
async fn a_starving_stage_is_taken_before_smaller_ones_by_the_next_agent_that_fits_it() {
    let Some(db) = TestDb::create() else { return };
    let shared = tempfile::tempdir().unwrap();
    let log = shared.path().join("runs.log");
    let config = format!(
        r#"
store: {url}
cluster: {{lease_ttl: {TTL_MS}ms, poll_interval: 200ms}}
scheduling: {{reserve_after: 1s}}
resources: {{gpus: none, cpu: 2}}
pipelines:
  small:
    stages:
      - {{name: only, command: {small}, needs: {{cpu: 1}}}}
  big:
    stages:
      - {{name: only, command: {big}, needs: {{cpu: 2}}}}
"#,
        url = db.url,
        small = stage_command(&log, "0.4"),
        big = stage_command(&log, "0.1"),
    );
    let agents = [Engine::start(&config).await, Engine::start(&config).await];
    // Both agents busy with small stages, then the big one, then a long stream of younger
    // small ones that would otherwise keep one slot of each agent busy until they drain.
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(agents[i % 2].submit("small", json!({})).await);
    }
    let big = agents[0].submit("big", json!({})).await;
    let big_submitted = now_ns();
    let mut younger = Vec::new();
    for i in 0..60 {
        younger.push(agents[i % 2].submit("small", json!({})).await);
    }
    let job = agents[1].wait_final(&big, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    wait_all_final(&agents[0], &younger, Duration::from_secs(90)).await;
    let all = runs(&log, &[&agents[0], &agents[1]]);
    let big_start = all.iter().find(|r| r.job == big).unwrap().start;
    let waited_ms = (big_start - big_submitted) / 1_000_000;
    let overtaken = all.iter().filter(|r| younger.contains(&r.job) && r.start < big_start).count();
    // Past reserve_after (1 s) the next agent to free two slots takes it: with four slots
    // turning over every 0.4 s, that is well before the 60 younger stages (6 s of work) drain.
    assert!(overtaken < 40, "{overtaken} younger small stages started first; it waited {waited_ms} ms");
    assert!(waited_ms < 4_000, "the big stage waited {waited_ms} ms");
}

/// Processes whose command line mentions `needle`.
fn processes_with(needle: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            found.push(pid);
        }
    }
    found
}

#[tokio::test]
async fn worker_pool_stages_are_shared_by_agents_and_survive_a_kill9_mid_task() {
    let Some(db) = TestDb::create() else { return };
    let shared = tempfile::tempdir().unwrap();
    let go = shared.path().join("go");
    let config = format!(
        r#"
store: {url}
cluster: {{lease_ttl: {TTL_MS}ms, poll_interval: 200ms}}
limits: {{kill_grace: 500ms}}
resources: {{gpus: none, cpu: 4}}
workers:
  model:
    command: [python3, "{{DIR}}/worker.py"]
    instances: 1
    startup_timeout: 20s
pipelines:
  infer:
    stages:
      - {{name: infer, worker: model}}
"#,
        url = db.url
    );
    let files = [("worker.py", crate::pools::WORKER)];
    let mut agents = [Engine::start_with_files(&config, &files).await, Engine::start_with_files(&config, &files).await];
    for agent in &agents {
        agent
            .wait_until("the pool instance to be ready", Duration::from_secs(30), async |a| {
                a.resources().await["pools"][0]["instances"]
                    .as_array()
                    .is_some_and(|i| i.iter().any(|i| i["state"] != "starting"))
            })
            .await;
    }
    // Tasks that wait for a file: each agent's instance holds some when agent 0 is killed.
    let mut ids = Vec::new();
    for i in 0..6 {
        let input = json!({"mode": "wait-file", "go": go.display().to_string(), "n": i});
        ids.push(agents[i % 2].submit("infer", input).await);
    }
    for agent in &agents {
        agent
            .wait_until("a lease on each agent", Duration::from_secs(30), async |a| {
                a.resources().await["leases"].as_array().is_some_and(|l| !l.is_empty())
            })
            .await;
    }
    let victim = agents[0].dir.path().display().to_string();
    let victim_worker = format!("{victim}/worker.py");
    assert!(!processes_with(&victim_worker).is_empty(), "the victim's worker runs");
    agents[0].kill9();
    std::fs::write(&go, "").unwrap();

    let jobs = wait_all_final(&agents[1], &ids, Duration::from_secs(60)).await;
    for job in &jobs {
        assert_eq!(job["state"], "succeeded", "{job:#}");
        assert_eq!(job["output"]["n"], job["input"]["n"], "each job gets its own result: {job:#}");
    }
    // What the dead agent held was interrupted (no retry spent) and re-run by the survivor.
    let survivor = db.sql(&format!("SELECT id FROM agents WHERE api = '{}'", agents[1].base));
    let interrupted = db.sql("SELECT count(*) FROM attempts WHERE state = 'interrupted'");
    assert!(interrupted.parse::<u32>().unwrap() >= 1, "nothing was interrupted");
    let elsewhere =
        db.sql(&format!("SELECT count(*) FROM attempts WHERE state = 'succeeded' AND agent_id <> '{survivor}'"));
    let before_kill: u32 = elsewhere.parse().unwrap();
    assert_eq!(before_kill, 0, "the dead agent's tasks could not have succeeded (they waited for the file)");
    assert_eq!(db.sql("SELECT count(*) FROM leases"), "0");
    assert_eq!(db.sql("SELECT count(*) FROM stages WHERE failures > 0"), "0", "an interruption spends no retry");
    // The dead agent's worker does not outlive it for long: its pipe to the engine is gone.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !processes_with(&victim_worker).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(processes_with(&victim_worker).is_empty(), "the killed agent's worker still runs");
    agents[1].assert_all_capacity_free().await;
}

fn shared_job(id: &str, stages: Vec<(&str, Vec<usize>)>) -> gpuflow::store::NewJob {
    gpuflow::store::NewJob {
        seq: None,
        id: id.to_string(),
        pipeline: "p".into(),
        input: json!({"n": id}),
        priority: 0,
        idempotency_key: None,
        config_hash: "h1".into(),
        config_text: "pipelines: {}".into(),
        stages: stages.into_iter().map(|(n, d)| (n.to_string(), d)).collect(),
        created_at: 1_000,
    }
}

/// `PgQueue::sync` without an engine: a turn's ends in one transaction, decided in order
/// against the rows as the previous end left them, a stale token refused while the others
/// apply, and the claim in the same transaction seeing what those ends made claimable.
#[tokio::test]
async fn one_sync_settles_a_turns_ends_in_order_fences_the_stale_and_claims_what_they_readied() {
    use gpuflow::store::{AttemptDetails, ClaimAsk, Ending, Finish, PgStore, Store};
    use gpuflow_core::cluster::{self, End};
    use gpuflow_core::{JobState, RetryPolicy};

    let Some(db) = TestDb::create() else { return };
    let store = PgStore::connect(&db.url, "agent-a").await.unwrap();
    let queue = store.queue();
    queue.register_agent("a", "host", "http://x", &json!({}), cluster::lease_lost).await.unwrap();
    // A join: `left` and `right` run side by side, `join` needs both. And two one-stage jobs.
    let join = shared_job("join", vec![("left", vec![]), ("right", vec![]), ("join", vec![0, 1])]);
    for job in [join, shared_job("one", vec![("only", vec![])]), shared_job("two", vec![("only", vec![])])] {
        queue.insert_shared_job(&job, 100).await.unwrap();
    }
    let all = |offered: &[gpuflow::store::ClaimCandidate]| (0..offered.len()).collect::<Vec<_>>();
    let claims = queue.claim(10, 60_000, all).await.unwrap();
    assert_eq!(claims.len(), 4);
    let token = |job: &str, stage: usize| claims.iter().find(|c| c.job == job && c.stage == stage).unwrap().token;
    // "two" loses its lease: it is re-queued under a new token before the turn's write.
    db.sql(&format!("UPDATE leases SET expires_at = 0 WHERE token = {}", token("two", 0)));
    assert_eq!(queue.expire_leases(cluster::lease_lost).await.unwrap().len(), 1);

    let output = |v: i64| AttemptDetails { output: Some(json!({"v": v})), exit_code: Some(0), ..Default::default() };
    let endings = vec![
        Ending { token: token("join", 0), job: "join".into(), details: output(1) },
        Ending { token: token("one", 0), job: "one".into(), details: output(2) },
        Ending { token: token("join", 1), job: "join".into(), details: output(3) },
        Ending { token: token("two", 0), job: "two".into(), details: output(4) },
    ];
    let mut decided = Vec::new();
    let mut decide = |i: usize, stages: &[cluster::SharedStage], ending, stage| {
        decided.push((i, stages.iter().map(|s| s.state).collect::<Vec<_>>()));
        cluster::attempt_ended(stages, ending, stage, End::Succeeded, &RetryPolicy::default())
    };
    let mut offered = Vec::new();
    let ask = ClaimAsk {
        limit: 10,
        ttl_ms: 60_000,
        also: gpuflow::store::Also::Nothing,
        choose: Box::new(|candidates: &[gpuflow::store::ClaimCandidate]| {
            offered.extend(candidates.iter().map(|c| (c.job.clone(), c.stage)));
            (0..candidates.len()).collect()
        }),
    };
    let synced = queue.sync(&[], &endings, &mut decide, Some(ask)).await.unwrap();
    assert_eq!(
        synced.finishes,
        vec![
            Finish::Applied { job_finished: None },
            Finish::Applied { job_finished: Some(JobState::Succeeded) },
            Finish::Applied { job_finished: None },
            Finish::Fenced,
        ]
    );
    // The second end of `join` was decided after the first had succeeded: it readied `join`.
    use gpuflow_core::cluster::SharedStageState::*;
    assert_eq!(decided[2], (2, vec![Succeeded, Running, Pending]));
    // The claim in the same transaction saw `join` readied and `two` re-queued.
    offered.sort();
    assert_eq!(offered, vec![("join".to_string(), 2), ("two".to_string(), 0)]);
    let join_claim = synced.claims.iter().find(|c| c.job == "join").unwrap();
    assert_eq!(join_claim.outputs[..2], [Some(json!({"v": 1})), Some(json!({"v": 3}))]);
    let one = store.job("one").await.unwrap().unwrap();
    assert_eq!((one.job.state.as_str(), one.job.output), ("succeeded", Some(json!({"v": 2}))));
    assert_eq!(one.stages[0].state.as_str(), "succeeded");
    assert_eq!(one.attempts[0].state, "succeeded");
    let two = store.job("two").await.unwrap().unwrap();
    let states: Vec<&str> = two.attempts.iter().map(|a| a.state.as_str()).collect();
    assert_eq!(states, vec!["interrupted", "running"], "the stale success was not recorded");
    assert_eq!(db.sql("SELECT count(*) FROM leases"), "2", "join/2 and two/0 are held");
}
