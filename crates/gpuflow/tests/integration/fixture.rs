//! Boots the real `gpuflow serve` binary in a temp dir and talks to it over HTTP.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub struct Engine {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub base: String,
    pub http: reqwest::Client,
    /// Extra environment for the engine process, applied at the next (re)start.
    pub env: Vec<(String, String)>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_gpuflow")
}

impl Engine {
    /// `body` is the pipeline file without `listen` and `data_dir`; `{DIR}` stands for the
    /// test's temp dir.
    pub async fn start(body: &str) -> Engine {
        Engine::start_with_files(body, &[]).await
    }

    /// Like `start`, with `(name, contents)` files written into the temp dir first (worker
    /// scripts, which run as soon as the engine starts).
    pub async fn start_with_files(body: &str, files: &[(&str, &str)]) -> Engine {
        Engine::start_prepared(body, files, |_| {}).await
    }

    /// Like `start_with_files`, with `prepare` run on the temp dir before the engine starts
    /// (e.g. to mount a small file system as its data directory).
    pub async fn start_prepared(body: &str, files: &[(&str, &str)], prepare: impl FnOnce(&Path)) -> Engine {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, contents) in files {
            std::fs::write(dir.path().join(name), contents).unwrap();
        }
        prepare(dir.path());
        let mut engine =
            Engine { dir, child: None, base: String::new(), http: reqwest::Client::new(), env: Vec::new() };
        engine.write_config(body);
        engine.boot().await;
        engine
    }

    /// Writes the pipeline file (as `start` does), e.g. before a reload.
    pub fn write_config(&self, body: &str) {
        let dir = self.dir.path();
        let text = format!(
            "listen: 127.0.0.1:0\ndata_dir: {}\n{}",
            dir.join("data").display(),
            body.replace("{DIR}", &dir.display().to_string())
        );
        std::fs::write(dir.join("gpuflow.yaml"), text).unwrap();
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn boot(&mut self) {
        if !self.try_boot().await {
            panic!("engine exited:\n{}", self.log());
        }
    }

    /// Starts the engine; false when it exited before it was up.
    pub async fn try_boot(&mut self) -> bool {
        let addr_file = self.path("data/listen.addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.path("engine.log")).unwrap();
        let child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(self.path("gpuflow.yaml"))
            .env("GPUFLOW_LOG", "info,gpuflow=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            // Workers import the SDK from the source tree.
            .env("PYTHONPATH", std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../python"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn gpuflow");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(addr) = std::fs::read_to_string(&addr_file) {
                self.base = format!("http://{}", addr.trim());
                // 200 only once start-up (sweep, recovery) is done.
                if self.http.get(format!("{}/healthz", self.base)).send().await.is_ok_and(|r| r.status().is_success()) {
                    return true;
                }
            }
            if self.child.as_mut().unwrap().try_wait().unwrap().is_some() {
                return false;
            }
            assert!(Instant::now() < deadline, "engine did not come up:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("engine.log")).unwrap_or_default()
    }

    /// `kill -9`: no chance to clean up.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the engine first");
        self.boot().await;
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self.http.post(format!("{}{path}", self.base)).json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(format!("{}{path}", self.base)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn submit(&self, pipeline: &str, input: Value) -> String {
        let (status, body) = self.post("/v1/jobs", json!({"pipeline": pipeline, "input": input})).await;
        assert_eq!(status, 201, "submit failed: {body}");
        body["id"].as_str().unwrap().to_string()
    }

    pub async fn job(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/v1/jobs/{id}")).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    pub async fn resources(&self) -> Value {
        self.get("/v1/resources").await.1
    }

    /// Waits until the job is final and returns it.
    pub async fn wait_final(&self, id: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let job = self.job(id).await;
            if matches!(job["state"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
                return job;
            }
            assert!(Instant::now() < deadline, "job {id} not final in time: {job:#}\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_until(&self, what: &str, within: Duration, mut check: impl AsyncFnMut(&Engine) -> bool) {
        let deadline = Instant::now() + within;
        while !check(self).await {
            assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }

    /// Waits until the engine holds a lease (a holder job's stage runs).
    pub async fn wait_leased(&self, what: &str, within: Duration) {
        self.wait_until(what, within, async |e| !e.resources().await["leases"].as_array().unwrap().is_empty()).await;
    }

    /// Asserts the engine holds no lease and all capacity is free.
    pub async fn assert_all_capacity_free(&self) {
        let r = self.resources().await;
        assert_eq!(r["leases"], json!([]), "leases still held: {r:#}");
        assert_eq!(r["cpu"]["leased"], 0, "{r:#}");
        for g in r["gpus"].as_array().unwrap() {
            assert_eq!(g["memory_leased_bytes"], 0, "{r:#}");
            assert_eq!(g["exclusive"], false, "{r:#}");
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- engine log ----\n{}", self.log());
        }
    }
}

/// Whether a process exists and is not a zombie.
/// A job's stage by name, from `GET /v1/jobs/{id}`.
pub fn stage<'a>(job: &'a Value, name: &str) -> &'a Value {
    job["stages"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap()
}

/// A process's resident memory (`VmRSS`), in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kib * 1024
}

pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')).unwrap_or(false),
        Err(_) => false,
    }
}

/// Zombie children of a process.
pub fn zombie_children_of(pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for child in children.split_whitespace().filter_map(|c| c.parse::<i32>().ok()) {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            if stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')) {
                out.push(child);
            }
        }
    }
    out
}

pub fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).trim().parse().unwrap()
}

/// A stage command that logs `STAGE JOB ATTEMPT start|end NANOS CUDA` around a sleep.
pub fn timed_stage(log: &str, seconds: &str) -> String {
    format!(
        "[sh, -c, 'echo \"$GPUFLOW_STAGE $GPUFLOW_JOB_ID $GPUFLOW_ATTEMPT start $(date +%s%N) dev=$CUDA_VISIBLE_DEVICES mem=$GPUFLOW_GPU_MEMORY_BYTES\" >> {log}; sleep {seconds}; echo \"$GPUFLOW_STAGE $GPUFLOW_JOB_ID $GPUFLOW_ATTEMPT end $(date +%s%N)\" >> {log}']"
    )
}

#[derive(Debug, Clone)]
pub struct Interval {
    pub stage: String,
    pub job: String,
    pub start: u128,
    pub end: u128,
    pub start_line: String,
}

/// Pairs the start and end lines written by `timed_stage`.
pub fn intervals(log: &Path) -> Vec<Interval> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut open: Vec<(String, String, String, u128, String)> = Vec::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let (stage, job, attempt, kind, t) =
            (parts[0], parts[1], parts[2], parts[3], parts[4].parse::<u128>().unwrap());
        if kind == "start" {
            open.push((stage.into(), job.into(), attempt.into(), t, line.to_string()));
        } else if let Some(i) = open.iter().position(|o| o.0 == stage && o.1 == job && o.2 == attempt) {
            let o = open.remove(i);
            out.push(Interval { stage: o.0, job: o.1, start: o.3, end: t, start_line: o.4 });
        }
    }
    out
}

impl Engine {
    /// Whether the engine process has exited on its own.
    pub fn exited(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_some())
    }

    /// Collects an engine that already exited on its own.
    pub fn kill9_if_exited(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A fresh PostgreSQL database for one test, dropped afterwards. The server is
/// `GPUFLOW_TEST_PG` (default: the local one, trust auth). Without a server the test is
/// skipped, except under CI, where it fails.
pub struct TestDb {
    pub url: String,
    pub name: String,
    admin: String,
}

impl TestDb {
    pub fn create() -> Option<TestDb> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let admin =
            std::env::var("GPUFLOW_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("gpuflow_test_{}_{n}", std::process::id());
        let ok = Command::new("psql")
            .args([admin.as_str(), "-qc", &format!("CREATE DATABASE {name}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            assert!(std::env::var_os("CI").is_none(), "CI must run the PostgreSQL tests, but {admin} is unreachable");
            eprintln!("skipped: no PostgreSQL at {admin} (set GPUFLOW_TEST_PG)");
            return None;
        }
        let base = admin.rsplit_once('/').map(|(b, _)| b.to_string()).unwrap_or(admin.clone());
        Some(TestDb { url: format!("{base}/{name}"), name, admin })
    }

    /// Runs SQL in this database and returns psql's unaligned output.
    pub fn sql(&self, sql: &str) -> String {
        let out = Command::new("psql").args([self.url.as_str(), "-AtXqc", sql]).output().expect("psql");
        assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Kills every connection to this database (what a server restart does to clients).
    pub fn terminate_connections(&self) -> usize {
        let out = Command::new("psql")
            .args([
                self.admin.as_str(),
                "-AtXqc",
                &format!(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{}' AND pid <> pg_backend_pid()",
                    self.name
                ),
            ])
            .output()
            .expect("psql");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([self.admin.as_str(), "-qc", &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)])
            .output();
    }
}

impl Engine {
    /// Sends a signal to the engine process (SIGSTOP freezes it, SIGCONT resumes it).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), signal).unwrap();
    }
}
