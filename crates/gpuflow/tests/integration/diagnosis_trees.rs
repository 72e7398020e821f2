//! Diagnosis that looks at whole process trees: a stall rule that holds on a deadlocked
//! process whose helper thread still wakes (as CUDA runtime threads do), with findings that
//! neither flap nor close early; and zombies anywhere under an attempt or a pool instance.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::diagnosis::evidence;
use crate::fixture::*;

/// Thresholds of a few seconds; a finding closes 1 s after its condition clears.
const THRESHOLDS: &str = "diagnosis: {sample_interval: 200ms, task_stall: 2s, queue_stall: 2s, finding_clear: 1s}";

/// The main thread deadlocks on a lock; a helper thread wakes every 0.5 s and spins 2 ms,
/// like a CUDA runtime thread. `BUSY` instead works at about 10 % of a core, never sending a
/// heartbeat either.
const STUCK: &str = r#"
import os, sys, threading, time
with open(sys.argv[1] + "." + os.environ["GPUFLOW_JOB_ID"], "w") as f:
    f.write(str(os.getpid()))
def helper(spin, every):
    while True:
        end = time.perf_counter() + spin
        while time.perf_counter() < end:
            pass
        time.sleep(every)
if sys.argv[2] == "stuck":
    threading.Thread(target=helper, args=(0.002, 0.5), daemon=True).start()
    lock = threading.Lock()
    lock.acquire()
    lock.acquire()
else:
    helper(0.005, 0.045)
"#;

async fn diagnosis(engine: &Engine) -> Value {
    engine.get("/v1/diagnosis").await.1
}

fn find<'a>(list: &'a Value, kind: &str, needle: &str) -> Option<&'a Value> {
    list.as_array().unwrap().iter().find(|f| f["kind"] == kind && f["summary"].as_str().unwrap().contains(needle))
}

async fn wait_open(engine: &Engine, kind: &str, needle: &str, since: Instant, within: Duration) -> (Value, Duration) {
    loop {
        let d = diagnosis(engine).await;
        if let Some(f) = find(&d["open"], kind, needle) {
            return (f.clone(), since.elapsed());
        }
        assert!(since.elapsed() < within + Duration::from_secs(5), "no `{kind}` about `{needle}`:\n{d:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_deadlocked_process_with_a_waking_helper_thread_is_stalled_without_a_gap_and_closes_after() {
    let engine = Engine::start_with_files(
        &format!(
            r#"
resources: {{gpus: [{{memory: 16GiB}}], cpu: 4}}
{THRESHOLDS}
pipelines:
  stuck:
    stages: [{{name: generate, needs: {{gpu: 1}}, command: [python3, "{{DIR}}/stuck.py", "{{DIR}}/stuck", stuck]}}]
  busy:
    stages: [{{name: crunch, needs: {{cpu: 1}}, command: [python3, "{{DIR}}/stuck.py", "{{DIR}}/busy", busy]}}]
"#
        ),
        &[("stuck.py", STUCK)],
    )
    .await;
    let stuck = engine.submit("stuck", json!({})).await;
    let busy = engine.submit("busy", json!({})).await;
    let pid_file = engine.path(&format!("stuck.{stuck}"));
    engine.wait_until("the stuck stage runs", Duration::from_secs(10), async |_| pid_file.exists()).await;
    let started = Instant::now();
    let pid = read_pid(&pid_file);
    let behind = engine.submit("stuck", json!({})).await;

    let (f, took) = wait_open(&engine, "task_stalled", &stuck, started, Duration::from_secs(4)).await;
    assert!(took <= Duration::from_secs(4), "named after {took:?}, over 2x the 2 s threshold");
    assert!(evidence(&f, "process")[0].contains(&format!("pid {pid} is sleeping")), "{f:#}");
    assert!(f["fix"].as_str().unwrap().contains("timeout"), "{f:#}");
    let (q, _) =
        wait_open(&engine, "queue_stalled", "pipeline stuck: 1 waiting", started, Duration::from_secs(4)).await;
    assert!(q["summary"].as_str().unwrap().contains(&format!("held by job {stuck}/generate")), "{q:#}");

    // While it stays stuck, the same finding stays open: no close, no second opening.
    let opened_at = f["opened_at"].clone();
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(6) {
        let d = diagnosis(&engine).await;
        let open = find(&d["open"], "task_stalled", &stuck).unwrap_or_else(|| panic!("gap in the finding:\n{d:#}"));
        assert_eq!(open["opened_at"], opened_at, "reopened: {d:#}");
        assert!(find(&d["recent"], "task_stalled", &stuck).is_none(), "closed while stuck: {d:#}");
        // The busy stage sends no heartbeat either, but works: never stalled.
        assert!(find(&d["open"], "task_stalled", &busy).is_none(), "busy work taken for a stall: {d:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Past Python's start-up, the window holds only the helper thread's wake-ups.
    let f = find(&diagnosis(&engine).await["open"], "task_stalled", &stuck).unwrap().clone();
    let cpu = &evidence(&f, "cpu of its process tree")[0];
    let pct: f64 = cpu.split('(').nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(pct < 1.5, "the helper thread's CPU is well under the 2 % floor: {cpu}");

    // Once it is gone, the finding closes after staying clear for 1 s; it is recorded as
    // closed when the condition ended, not when the close was decided.
    engine.post(&format!("/v1/jobs/{stuck}/cancel"), json!({})).await;
    let cancelled = Instant::now();
    engine
        .wait_until("the stall closed", Duration::from_secs(10), async |e| {
            find(&diagnosis(e).await["recent"], "task_stalled", &stuck).is_some()
        })
        .await;
    assert!(cancelled.elapsed() >= Duration::from_millis(900), "closed before the 1 s clear time");
    let d = diagnosis(&engine).await;
    let closed = find(&d["recent"], "task_stalled", &stuck).unwrap();
    assert!(find(&d["open"], "task_stalled", &stuck).is_none(), "{d:#}");
    let ms = |v: &Value| v.as_str().unwrap().parse::<jiff::Timestamp>().unwrap().as_millisecond();
    let open_for = ms(&closed["closed_at"]) - ms(&closed["opened_at"]);
    assert!(open_for >= 6_000, "open for the whole stall, {open_for} ms: {closed:#}");
    // Closed when the stage was gone (cancel, kill, reap: well under 2 s), not 1 s later.
    let closed_ago = jiff::Timestamp::now().as_millisecond() - ms(&closed["closed_at"]);
    assert!(closed_ago as u128 >= 900, "the close time is when the condition ended: {closed:#}");
    for id in [busy, behind] {
        engine.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
    }
}

/// A worker whose handler forks children and never waits for them; `reap` collects them,
/// `orphan` leaves a grandchild to the engine (its parent exits at once).
const FORKER: &str = r#"
import os, time
import gpuflow

class Forker(gpuflow.Worker):
    def handle(self, task):
        mode = task.input["mode"]
        if mode == "fork":
            pids = []
            for _ in range(4):
                pid = os.fork()
                if pid == 0:
                    os._exit(0)
                pids.append(pid)
            return {"pid": os.getpid(), "children": pids}
        if mode == "reap":
            n = 0
            while True:
                try:
                    pid, _ = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                n += 1
            return {"reaped": n}
        if mode == "orphan":
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                grandchild = os.fork()
                if grandchild == 0:
                    time.sleep(0.5)
                    os._exit(0)
                os.write(w, str(grandchild).encode())
                os._exit(0)
            os.waitpid(pid, 0)
            return {"grandchild": int(os.read(r, 32))}

gpuflow.serve(Forker())
"#;

#[tokio::test]
async fn zombies_under_a_live_pool_worker_are_named_with_owner_parent_and_count() {
    let engine = Engine::start_with_files(
        &format!(
            r#"
resources: {{gpus: none, cpu: 2}}
{THRESHOLDS}
workers:
  gen:
    command: [python3, "{{DIR}}/forker.py"]
    instances: 1
    startup_timeout: 20s
pipelines:
  run:
    stages: [{{name: step, worker: gen}}]
"#
        ),
        &[("forker.py", FORKER)],
    )
    .await;
    let job = engine.wait_final(&engine.submit("run", json!({"mode": "fork"})).await, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let started = Instant::now();
    let worker = job["stages"][0]["output"]["pid"].as_u64().unwrap() as u32;
    assert_eq!(zombie_children_of(worker).len(), 4, "the worker left 4 defunct children");

    // A zombie counts after 2 s defunct; it is named well within 2x that.
    let (f, took) = wait_open(&engine, "zombie_process", "pool gen #0", started, Duration::from_secs(4)).await;
    assert!(took <= Duration::from_secs(4), "took {took:?}");
    assert_eq!(evidence(&f, "owner"), vec!["pool gen #0"], "{f:#}");
    assert_eq!(evidence(&f, "count"), vec!["4"], "{f:#}");
    assert!(evidence(&f, "parent")[0].starts_with(&format!("pid {worker} (python3) is sleeping")), "{f:#}");
    assert!(f["summary"].as_str().unwrap().contains("4 exited child process(es) never reaped"), "{f:#}");
    let fix = f["fix"].as_str().unwrap();
    assert!(fix.contains("waitpid") && fix.contains("join()") && fix.contains("spawn"), "{fix}");

    // Open without a gap while they stay defunct.
    let opened_at = f["opened_at"].clone();
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(3) {
        let d = diagnosis(&engine).await;
        let open = find(&d["open"], "zombie_process", "pool gen #0").unwrap_or_else(|| panic!("gap:\n{d:#}"));
        assert_eq!(open["opened_at"], opened_at, "{d:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The worker reaps them: the finding closes once clear for 1 s.
    let reap = engine.wait_final(&engine.submit("run", json!({"mode": "reap"})).await, Duration::from_secs(30)).await;
    assert_eq!(reap["stages"][0]["output"]["reaped"], 4, "{reap:#}");
    assert!(zombie_children_of(worker).is_empty());
    engine
        .wait_until("the zombie finding closed", Duration::from_secs(5), async |e| {
            find(&diagnosis(e).await["recent"], "zombie_process", "pool gen #0").is_some()
        })
        .await;

    // A grandchild orphaned under the worker is re-parented to the engine (its subreaper) and
    // reaped as soon as it exits: it never lingers as a zombie, and no finding opens.
    let orphan =
        engine.wait_final(&engine.submit("run", json!({"mode": "orphan"})).await, Duration::from_secs(30)).await;
    let grandchild = orphan["stages"][0]["output"]["grandchild"].as_i64().unwrap() as i32;
    engine
        .wait_until("the orphaned grandchild is reaped", Duration::from_secs(3), async |_| {
            !std::path::Path::new(&format!("/proc/{grandchild}")).exists()
        })
        .await;
    assert!(zombie_children_of(engine.pid()).is_empty());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let d = diagnosis(&engine).await;
    assert!(find(&d["open"], "zombie_process", "").is_none(), "{d:#}");
}

/// Loads a stand-in for the CUDA driver library (any file named `libcuda.so.1`, mapped as the
/// real driver would be), then starts two children with the given start method, each mapping
/// it too, and waits. Writes the children's pids once they run.
const FORKS: &str = r#"
import mmap, multiprocessing as mp, os, sys, time

def load_driver(path):
    f = open(path, "rb")
    return f, mmap.mmap(f.fileno(), 4096, access=mmap.ACCESS_READ)

def child(path):
    handle = load_driver(path)
    time.sleep(60)

if __name__ == "__main__":
    lib, method, out = sys.argv[1], sys.argv[2], sys.argv[3]
    driver = load_driver(lib)
    ctx = mp.get_context(method)
    kids = [ctx.Process(target=child, args=(lib,)) for _ in range(2)]
    for k in kids:
        k.start()
    time.sleep(0.5)
    with open(out + ".tmp", "w") as f:
        f.write(" ".join(str(k.pid) for k in kids))
    os.rename(out + ".tmp", out)
    for k in kids:
        k.join()
"#;

#[tokio::test]
async fn a_fork_after_the_driver_is_loaded_is_a_hazard_and_spawn_is_not() {
    let engine = Engine::start_with_files(
        &format!(
            r#"
resources: {{gpus: [{{memory: 16GiB}}, {{memory: 16GiB}}], cpu: 2}}
{THRESHOLDS}
pipelines:
  load:
    stages: [{{name: loader, needs: {{gpu: 1}}, command: [python3, "{{DIR}}/forks.py", "{{DIR}}/driver/libcuda.so.1", "{{input.method}}", "{{DIR}}/kids.{{input.method}}"]}}]
"#
        ),
        &[("forks.py", FORKS)],
    )
    .await;
    std::fs::create_dir_all(engine.path("driver")).unwrap();
    std::fs::write(engine.path("driver/libcuda.so.1"), vec![0u8; 8192]).unwrap();
    let forked = engine.submit("load", json!({"method": "fork"})).await;
    let spawned = engine.submit("load", json!({"method": "spawn"})).await;
    for method in ["fork", "spawn"] {
        let out = engine.path(&format!("kids.{method}"));
        engine.wait_until("the children run", Duration::from_secs(20), async |_| out.exists()).await;
    }
    let started = Instant::now();
    let kids = std::fs::read_to_string(engine.path("kids.fork")).unwrap();
    let kids: Vec<&str> = kids.split_whitespace().collect();

    let (f, took) = wait_open(&engine, "fork_after_cuda", &forked, started, Duration::from_secs(1)).await;
    assert!(took <= Duration::from_secs(2), "took {took:?}");
    let summary = f["summary"].as_str().unwrap();
    assert!(summary.contains(&format!("2 process(es) (pid {}, {})", kids[0], kids[1])), "{f:#}");
    for e in evidence(&f, "forked after CUDA") {
        assert!(e.contains("without exec") && e.contains("driver/libcuda.so.1 at the same address"), "{e}");
    }
    let fix = f["fix"].as_str().unwrap();
    assert!(fix.contains(r#"multiprocessing_context="spawn""#) && fix.contains("num_workers=0"), "{fix}");

    // Children started with `spawn` map the library themselves, after an exec: no hazard.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let d = diagnosis(&engine).await;
    assert!(find(&d["open"], "fork_after_cuda", &spawned).is_none(), "{d:#}");
    assert!(find(&d["open"], "fork_after_cuda", &forked).is_some(), "still open: {d:#}");

    // Once the forked children are gone, it closes.
    engine.post(&format!("/v1/jobs/{forked}/cancel"), json!({})).await;
    engine
        .wait_until("the hazard closed", Duration::from_secs(5), async |e| {
            find(&diagnosis(e).await["recent"], "fork_after_cuda", &forked).is_some()
        })
        .await;
    engine.post(&format!("/v1/jobs/{spawned}/cancel"), json!({})).await;
}

/// Writes the virtual device's readings atomically, as NVML would report them.
fn telemetry(engine: &Engine, processes: &[(u32, u64)]) {
    let procs: Vec<Value> = processes.iter().map(|(pid, bytes)| json!({"pid": pid, "used_memory": bytes})).collect();
    let used: u64 = processes.iter().map(|(_, b)| b).sum();
    let body = json!({"utilization": 0, "memory_used": used, "processes": procs});
    std::fs::write(engine.path("gpu0.json.tmp"), body.to_string()).unwrap();
    std::fs::rename(engine.path("gpu0.json.tmp"), engine.path("gpu0.json")).unwrap();
}

#[tokio::test]
async fn gpu_memory_of_our_leftover_is_reclaimed_and_a_foreign_process_is_left_alone() {
    use std::os::unix::process::CommandExt;
    let engine = Engine::start(&format!(
        r#"
resources: {{gpus: [{{memory: 80GiB, telemetry: "{{DIR}}/gpu0.json"}}], cpu: 2}}
{THRESHOLDS}
pipelines:
  marker: {{stages: [{{name: s, command: [sh, -c, 'printf %s "$GPUFLOW_ENGINE_MARKER" > {{DIR}}/marker']}}]}}
"#
    ))
    .await;
    telemetry(&engine, &[]);
    let id = engine.submit("marker", json!({})).await;
    assert_eq!(engine.wait_final(&id, Duration::from_secs(10)).await["state"], "succeeded");
    let marker = std::fs::read_to_string(engine.path("marker")).unwrap();
    assert!(!marker.is_empty());

    // A leftover of an attempt that has ended (it escaped the engine's own clean-up: here the
    // test starts it, with the engine's markers), and a process that is not ours.
    let mut leftover = std::process::Command::new("sleep")
        .arg("300")
        .env("GPUFLOW_ENGINE_MARKER", &marker)
        .env("GPUFLOW_ATTEMPT_MARKER", format!("{id}/s/1"))
        .process_group(0)
        .spawn()
        .unwrap();
    let mut stranger = std::process::Command::new("sleep").arg("300").spawn().unwrap();
    telemetry(&engine, &[(leftover.id(), 3 << 30), (stranger.id(), 1 << 30)]);
    let started = Instant::now();

    let (f, took) = wait_open(&engine, "gpu_memory_orphaned", "3072 MiB", started, Duration::from_secs(1)).await;
    assert!(took <= Duration::from_secs(2), "took {took:?}");
    let process = &evidence(&f, "process")[0];
    assert!(
        process.contains(&format!(
            "pid {}: 3072 MiB (left by job {id}/s attempt 1, which has ended; killed)",
            leftover.id()
        )),
        "{f:#}"
    );
    engine
        .wait_until("the leftover is killed", Duration::from_secs(3), async |_| leftover.try_wait().unwrap().is_some())
        .await;
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(leftover.try_wait().unwrap().unwrap().signal(), Some(9));
    // The stranger is only reported, never touched; both stay out of the inventory until the
    // device reports the memory free.
    let (g, _) = wait_open(&engine, "gpu_memory_foreign", "1024 MiB", started, Duration::from_secs(1)).await;
    assert!(evidence(&g, "process")[0].contains("not started by this engine"), "{g:#}");
    assert_eq!(engine.resources().await["gpus"][0]["memory_foreign_bytes"], 4u64 << 30);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(stranger.try_wait().unwrap().is_none(), "a process that is not ours is never killed");
    // Dead but still listed by the device (memory not yet freed): still orphaned, still held.
    let d = diagnosis(&engine).await;
    let open = find(&d["open"], "gpu_memory_orphaned", "3072 MiB").unwrap_or_else(|| panic!("closed early: {d:#}"));
    assert_eq!(open["opened_at"], f["opened_at"], "{d:#}");
    assert!(find(&d["open"], "gpu_memory_foreign", "4096 MiB").is_none(), "the leftover is not foreign: {d:#}");

    // NVML no longer lists the dead leftover: the memory is back, the finding closes.
    telemetry(&engine, &[(stranger.id(), 1 << 30)]);
    engine
        .wait_until("the orphaned finding closed", Duration::from_secs(5), async |e| {
            find(&diagnosis(e).await["recent"], "gpu_memory_orphaned", "3072 MiB").is_some()
        })
        .await;
    engine
        .wait_until("the memory is back in the inventory", Duration::from_secs(2), async |e| {
            e.resources().await["gpus"][0]["memory_foreign_bytes"] == 1u64 << 30
        })
        .await;
    stranger.kill().unwrap();
    stranger.wait().unwrap();
}

/// `examples/stall/`: a generation worker that forks 4 loaders after "initialising CUDA" (the
/// stand-in library), deadlocks after 10 of 150 batches and leaves 2 zombies, with a job queued
/// behind it. `gpuflow doctor` names all of it within 2x the example's 5 s thresholds.
#[tokio::test]
async fn the_stall_example_is_named_by_doctor_within_twice_its_thresholds() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let yaml = std::fs::read_to_string(root.join("examples/stall/stall.yaml")).unwrap();
    let body: String = yaml
        .lines()
        .filter(|l| !l.starts_with("listen:") && !l.starts_with("data_dir:"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("examples/stall/", &format!("{}/examples/stall/", root.display()))
        .replace("./gpuflow-stall-data/", "{DIR}/");
    let engine = Engine::start(&body).await;
    engine
        .wait_until("the generation worker is ready", Duration::from_secs(30), async |e| {
            e.resources().await["pools"][0]["instances"][0]["state"] == "idle"
        })
        .await;
    let started = Instant::now();
    let stuck = engine.submit("generate", json!({})).await;
    let behind = engine.submit("generate", json!({})).await;
    // 2.5 s of batches, then 2x the 5 s thresholds.
    let within = Duration::from_millis(2_500 + 10_000);
    let (_, took) = wait_open(&engine, "task_stalled", "last progress: 10 of 150 batches", started, within).await;
    assert!(took <= within, "took {took:?}");
    for kind in ["queue_stalled", "zombie_process", "fork_after_cuda"] {
        let (_, took) = wait_open(&engine, kind, "", started, within).await;
        assert!(took <= within, "{kind} took {took:?}");
    }

    let out = std::process::Command::new(bin()).args(["--server", &engine.base, "doctor"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let has = |needle: &str| assert!(text.contains(needle), "doctor lacks `{needle}`:\n{text}");
    has(&format!("[task_stalled] job {stuck}/generate attempt 1 is stuck"));
    has("last progress: 10 of 150 batches (7 % done)");
    assert_eq!(text.matches("is zombie (exited, never reaped)").count(), 2, "{text}");
    assert!(text.matches("  child: pid ").count() >= 4, "the 4 children and their states:\n{text}");
    has("[zombie_process] pool gen #0: 2 exited child process(es) never reaped");
    has("count: 2");
    has("[fork_after_cuda] pool gen #0: 2 process(es)");
    has("driver/libcuda.so.1 at the same address");
    has("[queue_stalled] pipeline generate: 1 waiting");
    has(&format!("held by job {stuck}/generate attempt 1"));
    has(r#"multiprocessing_context="spawn""#);
    has("heartbeat_timeout");
    assert!(!text.to_lowercase().contains("report 0"), "{text}");
    for id in [stuck, behind] {
        engine.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
    }
}

/// A command stage that reports progress through `$GPUFLOW_PROGRESS` while using almost no
/// CPU (it waits on a device, say) is not stalled; once its reports stop, it is, and the
/// finding quotes its last report.
#[tokio::test]
async fn a_command_stage_reporting_progress_is_not_stalled_until_its_reports_stop() {
    let engine = Engine::start(&format!(
        r#"
resources: {{gpus: none, cpu: 2}}
{THRESHOLDS}
pipelines:
  frames:
    stages:
      - name: render
        command: [sh, -c, 'for i in 1 2 3 4 5 6 7 8; do echo "0.$i frame $i/10" >> "$GPUFLOW_PROGRESS"; sleep 1; done; touch {{DIR}}/quiet; exec sleep 60']
"#
    ))
    .await;
    let id = engine.submit("frames", json!({})).await;
    let started = Instant::now();
    // 8 s of reports, 1 s apart, under a 2 s threshold: never stalled.
    while !engine.path("quiet").exists() {
        let d = diagnosis(&engine).await;
        assert!(find(&d["open"], "task_stalled", &id).is_none(), "stalled while reporting: {d:#}");
        assert!(started.elapsed() < Duration::from_secs(20), "the stage never went quiet");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let quiet = Instant::now();
    let (f, took) = wait_open(&engine, "task_stalled", &id, quiet, Duration::from_secs(4)).await;
    assert!(took <= Duration::from_secs(4), "took {took:?}");
    assert!(f["summary"].as_str().unwrap().contains("last progress: frame 8/10 (80 % done)"), "{f:#}");
    assert!(!evidence(&f, "no heartbeat or progress for")[0].contains("never wrote"), "{f:#}");
    engine.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
}
