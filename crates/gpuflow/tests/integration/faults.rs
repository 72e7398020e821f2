//! Faults the engine must ride out: bad bytes refused at the door, slow clients, paths that
//! change after admission.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::fixture::*;

async fn post_as(engine: &Engine, auth: Option<&str>, body: Value) -> (u16, Value) {
    let mut r = engine.http.post(format!("{}/v1/jobs", engine.base)).json(&body);
    if let Some(a) = auth {
        r = r.header("authorization", a);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn bad_bytes_are_refused_at_the_door() {
    let engine = Engine::start(
        r#"
auth: {token: "s3cret-token-of-enough-length"}
resources: {gpus: none, cpu: 1}
allowed_roots: ["{DIR}/media"]
limits: {max_request_body: 8MiB}
pipelines:
  echo:
    stages: [{name: say, command: [sh, -c, 'printf %s "$1" | wc -c > {job.dir}/n', sh, "{input.text}"]}]
  many:
    stages: [{name: wide, command: [echo, "{input.a}", "{input.a}", "{input.a}", "{input.a}", "{input.a}", "{input.a}", "{input.a}", "{input.a}", "{input.a}", "{input.a}", "{input.a}", "{input.a}", "{input.a}", "{input.a}", "{input.a}", "{input.a}", "{input.a}"]}]
  typed:
    inputs:
      name: {type: string}
      video: {type: path, required: false}
    stages: [{name: s, command: ["true"]}]
"#,
    )
    .await;
    std::fs::create_dir_all(engine.path("media")).unwrap();
    let bearer = "Bearer s3cret-token-of-enough-length";
    let auth = Some(bearer);
    let cases: Vec<(&str, Value, &str, Vec<String>)> = vec![
        (
            "NUL in an argv value",
            json!({"pipeline": "echo", "input": {"text": "a\u{0}b"}}),
            "invalid_input",
            vec!["input.text".into(), "NUL".into(), "`say`".into()],
        ),
        (
            "NUL in a declared string",
            json!({"pipeline": "typed", "input": {"name": "x\u{0}"}}),
            "invalid_input",
            vec!["input.name".into(), "NUL".into()],
        ),
        (
            "NUL in a path",
            json!({"pipeline": "typed", "input": {"name": "x", "video": format!("{}/a\u{0}b", engine.path("media").display())}}),
            "invalid_input",
            vec!["input.video".into(), "NUL".into()],
        ),
        (
            "one argument over the OS limit",
            json!({"pipeline": "echo", "input": {"text": "y".repeat(200_000)}}),
            "command_too_long",
            vec!["stage `say`".into(), "200000 bytes".into(), "131071".into()],
        ),
        (
            "the whole command line over ARG_MAX",
            json!({"pipeline": "many", "input": {"a": "z".repeat(130_000)}}),
            "command_too_long",
            vec!["stage `wide`".into(), "command line would be".into(), "ARG_MAX".into()],
        ),
    ];
    for (what, body, code, needles) in cases {
        let (status, body) = post_as(&engine, auth, body).await;
        assert_eq!(status, 400, "{what}: {body}");
        assert_eq!(body["error"]["code"], code, "{what}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        for needle in needles {
            assert!(message.contains(&needle), "{what}: `{message}` should mention `{needle}`");
        }
    }
    // The same refusals in a batch, per job.
    let r = engine
        .http
        .post(format!("{}/v1/jobs/batch", engine.base))
        .header("authorization", bearer)
        .json(&json!({"jobs": [{"pipeline": "echo", "input": {"text": "\u{0}"}}, {"pipeline": "echo", "input": {"text": "ok"}}]}))
        .send()
        .await
        .unwrap();
    let batch: Value = r.json().await.unwrap();
    assert_eq!(batch["jobs"][0]["error"]["code"], "invalid_input", "{batch}");
    assert!(batch["jobs"][1]["id"].is_string(), "{batch}");

    // The scheme is case-insensitive; the token is not.
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let (status, body) = post_as(
            &engine,
            Some(&format!("{scheme} s3cret-token-of-enough-length")),
            json!({"pipeline": "typed", "input": {"name": "n"}}),
        )
        .await;
        assert_eq!(status, 201, "{scheme}: {body}");
    }
    let (status, _) = post_as(
        &engine,
        Some("bearer S3CRET-TOKEN-OF-ENOUGH-LENGTH"),
        json!({"pipeline": "typed", "input": {"name": "n"}}),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = post_as(
        &engine,
        Some("Basic s3cret-token-of-enough-length"),
        json!({"pipeline": "typed", "input": {"name": "n"}}),
    )
    .await;
    assert_eq!(status, 401);

    // `input: null` is `{}`: accepted, and refused only for what `{}` lacks.
    let (status, body) = post_as(&engine, auth, json!({"pipeline": "typed", "input": null})).await;
    assert_eq!(
        (status, body["error"]["message"].as_str().map(|m| m.contains("input.name: is required"))),
        (400, Some(true)),
        "{body}"
    );
    let (status, body) = post_as(&engine, auth, json!({"pipeline": "echo", "input": null})).await;
    assert_eq!(status, 201, "{body}");

    // Just under the per-argument limit is accepted and really runs: the bound is not too tight.
    let (status, body) =
        post_as(&engine, auth, json!({"pipeline": "echo", "input": {"text": "w".repeat(120_000)}})).await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let client = reqwest::Client::builder()
        .default_headers([(reqwest::header::AUTHORIZATION, bearer.parse().unwrap())].into_iter().collect())
        .build()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let job = loop {
        let job: Value =
            client.get(format!("{}/v1/jobs/{id}", engine.base)).send().await.unwrap().json().await.unwrap();
        if job["state"] == "succeeded" || job["state"] == "failed" {
            break job;
        }
        assert!(std::time::Instant::now() < deadline, "{job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(job["state"], "succeeded", "{job}");
    let n = std::fs::read_to_string(engine.path(&format!("data/jobs/{id}/n"))).unwrap();
    assert_eq!(n.trim(), "120000");

    // Nothing refused was stored: 1 batch job, 3 bearer jobs, 1 null, 1 big.
    let list: Value =
        client.get(format!("{}/v1/jobs?limit=100", engine.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["jobs"].as_array().unwrap().len(), 6, "{list}");
}

/// Reads until the peer closes; true if it closed (EOF or reset) within `within`.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn slow_and_idle_clients_are_cut_off_while_others_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let engine = Engine::start(
        r#"
resources: {gpus: none, cpu: 1}
limits: {header_read_timeout: 1s, idle_timeout: 2s, max_connections: 12}
pipelines:
  p: {stages: [{name: s, command: ["true"]}]}
"#,
    )
    .await;
    let addr = engine.base.trim_start_matches("http://").to_string();

    // Eight clients trickle a request head, one byte every 200 ms.
    let started = std::time::Instant::now();
    let mut trickles = Vec::new();
    for _ in 0..8 {
        let addr = addr.clone();
        trickles.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
            for byte in head {
                if s.write_all(&[*byte]).await.is_err() {
                    return started.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            panic!("the whole head went through in {:?}: never cut off", started.elapsed());
        }));
    }
    // Meanwhile others are served, promptly.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..10 {
        let t = std::time::Instant::now();
        let (status, _) = engine.get("/v1/jobs").await;
        assert_eq!(status, 200);
        assert!(t.elapsed() < Duration::from_millis(500), "a normal request took {:?}", t.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for t in trickles {
        let cut = t.await.unwrap();
        // Cut at the 1 s header deadline (checked every 250 ms), seen on the next write.
        assert!(cut >= Duration::from_millis(900) && cut < Duration::from_secs(4), "cut off after {cut:?}");
    }

    // A keep-alive connection that went quiet after its request is closed after idle_timeout,
    // not before.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert!(!closed_within(&mut s, Duration::from_millis(1500)).await, "closed before idle_timeout");
    assert!(closed_within(&mut s, Duration::from_secs(3)).await, "still open well after idle_timeout");

    // The live feed is a request in flight, not an idle connection: it outlives idle_timeout.
    // (A client that keeps idle connections longer than idle_timeout may pick one the engine
    // is closing; from here on, one without a pool.)
    let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let mut feed = fresh.get(format!("{}/v1/events", engine.base)).send().await.unwrap();
    assert_eq!(feed.status(), 200);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let r = fresh.post(format!("{}/v1/jobs", engine.base)).json(&json!({"pipeline": "p"})).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        let mut text = String::new();
        while let Some(chunk) = feed.chunk().await.unwrap() {
            text.push_str(&String::from_utf8_lossy(&chunk));
            if text.contains(&id) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(got, Ok(true), "the feed was cut");
    drop(feed);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Over max_connections: 503 with Retry-After, and the held slots come back.
    let mut held = Vec::new();
    for _ in 0..12 {
        held.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), extra.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 1") && answer.contains("limits.max_connections"), "{answer}");
    // The silent ones are closed at idle_timeout; then everyone is served again.
    for s in &mut held {
        assert!(closed_within(s, Duration::from_secs(4)).await, "a silent connection was never closed");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let health = fresh.get(format!("{}/healthz", engine.base)).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
}

#[tokio::test]
async fn a_symlink_planted_after_admission_fails_the_stage_instead_of_escaping_the_root() {
    let engine = Engine::start(
        r#"
resources: {gpus: none, cpu: 2}
allowed_roots: ["{DIR}/media"]
pipelines:
  read:
    inputs:
      video: {type: path}
    stages:
      - {name: wait, command: [sleep, "1.5"]}
      - {name: copy, command: [cp, "{input.video}", "{job.dir}/copied"]}
"#,
    )
    .await;
    std::fs::create_dir_all(engine.path("media")).unwrap();
    std::fs::write(engine.path("secret"), "outside the root").unwrap();
    std::fs::write(engine.path("media/real.mp4"), "inside").unwrap();

    // Neither path exists outside the root at admission: `later.mp4` does not exist yet.
    let later = engine.path("media/later.mp4");
    let escaping = engine.submit("read", json!({"video": later.display().to_string()})).await;
    let honest = engine.submit("read", json!({"video": engine.path("media/real.mp4").display().to_string()})).await;
    // While `wait` runs, a symlink out of the root appears under the admitted name.
    std::os::unix::fs::symlink(engine.path("secret"), &later).unwrap();

    let job = engine.wait_final(&escaping, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "failed", "{job}");
    let copy = &job["stages"][1];
    assert_eq!(copy["state"], "failed", "{job}");
    let error = copy["error"].as_str().unwrap();
    for needle in ["input.video", "checked again", "outside the allowed roots"] {
        assert!(error.contains(needle), "`{error}` should mention `{needle}`");
    }
    assert_eq!(copy["attempts"], 1, "not retried: it would escape again: {job}");
    assert!(!engine.path(&format!("data/jobs/{escaping}/copied")).exists(), "the stage ran and read outside the root");

    // A path that stayed inside runs as before.
    let job = engine.wait_final(&honest, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(std::fs::read_to_string(engine.path(&format!("data/jobs/{honest}/copied"))).unwrap(), "inside");
}

/// A tmpfs mounted for one test; unmounted (lazily) when dropped.
struct SmallDisk {
    at: std::path::PathBuf,
}

impl SmallDisk {
    /// Mounts a `size` tmpfs at `at`, or says why it cannot (not root, no mount permission).
    fn mount(at: &std::path::Path, size: &str) -> Result<SmallDisk, String> {
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".into());
        }
        std::fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!("mount failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(SmallDisk { at: at.to_path_buf() })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.at).status();
        if let Some(parent) = self.at.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

/// Fills the file system holding `dir` with one file, until it is full.
fn fill(path: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![7u8; 16 * 1024];
    while f.write_all(&block).is_ok() {}
    let mut small = [7u8; 512];
    while f.write_all(&small[..]).is_ok() {}
    small[0] = 0;
    while f.write_all(&small[..1]).is_ok() {}
    let _ = f.sync_all();
}

#[tokio::test]
async fn a_full_disk_degrades_the_engine_instead_of_killing_it_and_it_resumes_when_space_returns() {
    let mut disk = Err(String::new());
    let engine = Engine::start_prepared(
        r#"
resources: {gpus: none, cpu: 4}
pipelines:
  long: {stages: [{name: s, command: [sleep, "4"]}]}
  quick: {stages: [{name: s, command: ["true"]}]}
"#,
        &[],
        |dir| disk = SmallDisk::mount(&dir.join("data"), "4m"),
    )
    .await;
    if let Err(why) = &disk {
        // CI runs as root: there the real full disk must run, not be skipped.
        assert!(std::env::var_os("CI").is_none(), "CI must run the real full-disk test, but: {why}");
        eprintln!("skipped: the real full-disk run needs a small tmpfs ({why}); the in-process test covers the logic");
        return;
    }
    let data = engine.path("data");
    let pid = engine.pid() as i32;
    let long = engine.submit("long", json!({})).await;
    engine
        .wait_until("the long stage runs", Duration::from_secs(10), async |e| e.job(&long).await["state"] == "running")
        .await;

    fill(&data.join("filler"));
    // Submit until the store says it is full. The submission whose write failed first is
    // held (answered once written), so its request may not answer now.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(3)).build().unwrap();
    let pad = "p".repeat(64 * 1024);
    let mut accepted = Vec::new();
    let mut refusal = None;
    for _ in 0..200 {
        let r = client
            .post(format!("{}/v1/jobs", engine.base))
            .json(&json!({"pipeline": "quick", "input": {"pad": pad}}))
            .send()
            .await;
        let Ok(r) = r else { continue };
        let status = r.status().as_u16();
        let retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
        let body: Value = r.json().await.unwrap();
        match status {
            201 => accepted.push(body["id"].as_str().unwrap().to_string()),
            507 => {
                refusal = Some((body, retry_after));
                break;
            }
            other => panic!("a full disk answered {other}: {body}"),
        }
    }
    let (body, retry_after) = refusal.expect("never refused although the disk is full");
    assert_eq!(body["error"]["code"], "store_unwritable", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    let canonical = std::path::absolute(&data).unwrap().display().to_string();
    assert!(message.contains(&canonical) && message.contains("free"), "{message}");
    assert_eq!(retry_after.as_deref(), Some("10"));

    // Degraded, not dead: health says why, reads work, the finding is open.
    let (status, health) = engine.get("/healthz").await;
    assert_eq!((status, health["status"].as_str()), (200, Some("degraded")), "{health}");
    assert!(health["reason"].as_str().unwrap().contains(&canonical), "{health}");
    assert_eq!(engine.get(&format!("/v1/jobs/{long}")).await.0, 200, "reads keep working");
    let (_, diagnosis) = engine.get("/v1/diagnosis").await;
    assert!(diagnosis.to_string().contains("store_unwritable"), "{diagnosis}");
    // The long stage ends while the disk is full; the engine is still there after it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(alive(pid), "the engine exited on a full disk:\n{}", engine.log());
    assert_eq!(engine.get("/healthz").await.1["status"], "degraded");

    // Space returns: the engine resumes by itself.
    std::fs::remove_file(data.join("filler")).unwrap();
    engine
        .wait_until("health is ok again", Duration::from_secs(15), async |e| {
            e.get("/healthz").await.1["status"] == "ok"
        })
        .await;
    assert_eq!(engine.wait_final(&long, Duration::from_secs(20)).await["state"], "succeeded", "the report was kept");
    for id in &accepted {
        assert_eq!(engine.wait_final(id, Duration::from_secs(30)).await["state"], "succeeded");
    }
    let fresh = engine.submit("quick", json!({})).await;
    assert_eq!(engine.wait_final(&fresh, Duration::from_secs(20)).await["state"], "succeeded");
    let (_, findings) = engine.get("/v1/diagnosis").await;
    assert!(alive(pid));
    drop(findings);
}

fn gc(engine: &Engine, config: &str, dry_run: bool) -> String {
    let path = engine.path("gc.yaml");
    let text = format!(
        "data_dir: {}\nresources: {{gpus: none}}\n{config}pipelines: {{p: {{stages: [{{name: s, command: [\"true\"]}}]}}}}\n",
        engine.path("data").display()
    );
    std::fs::write(&path, text).unwrap();
    let mut cmd = std::process::Command::new(bin());
    cmd.args(["gc", "--config"]).arg(&path);
    if dry_run {
        cmd.arg("--dry-run");
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "gc failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn retention_removes_expired_jobs_rows_and_directories_and_gc_dry_run_lists_them() {
    let engine = Engine::start(
        r#"
resources: {gpus: none, cpu: 2}
retention: {succeeded: 6s, failed: keep, cancelled: keep, interval: 300ms}
pipelines:
  ok: {stages: [{name: s, command: [sh, -c, "echo hello"]}]}
  bad: {stages: [{name: s, command: [sh, -c, "echo oops >&2; exit 1"], retry: {max_attempts: 1}}]}
"#,
    )
    .await;
    let mut ok = Vec::new();
    for _ in 0..3 {
        ok.push(engine.submit("ok", json!({})).await);
    }
    let bad = engine.submit("bad", json!({})).await;
    for id in &ok {
        assert_eq!(engine.wait_final(id, Duration::from_secs(20)).await["state"], "succeeded");
    }
    assert_eq!(engine.wait_final(&bad, Duration::from_secs(20)).await["state"], "failed");
    let dir = |id: &str| engine.path(&format!("data/jobs/{id}"));
    assert!(ok.iter().all(|id| dir(id).exists()) && dir(&bad).exists(), "job directories exist");

    // A dry run with a shorter retention lists exactly the succeeded jobs and removes nothing.
    let listed = gc(&engine, "retention: {succeeded: 1ms, failed: keep}\n", true);
    for id in &ok {
        assert!(listed.contains(&format!("would remove {id} succeeded")), "{listed}");
    }
    assert!(!listed.contains(&bad), "a kept job was listed: {listed}");
    assert!(listed.contains("3 jobs"), "{listed}");
    for id in &ok {
        assert_eq!(engine.get(&format!("/v1/jobs/{id}")).await.0, 200, "a dry run removed {id}");
        assert!(dir(id).exists());
    }

    // The engine's own pass removes the succeeded jobs once past 6 s: rows and directories.
    engine
        .wait_until("succeeded jobs expire", Duration::from_secs(20), async |e| {
            let mut gone = true;
            for id in &ok {
                gone &= e.get(&format!("/v1/jobs/{id}")).await.0 == 404;
            }
            gone
        })
        .await;
    assert!(ok.iter().all(|id| !dir(id).exists()), "a directory outlived its job");
    assert_eq!(engine.get(&format!("/v1/jobs/{bad}")).await.0, 200, "`failed: keep` kept the failed job");
    assert!(dir(&bad).exists());
    let (_, list) = engine.get("/v1/jobs").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1, "{list}");

    // `gpuflow gc` (not a dry run) removes now, beside the running engine.
    let removed = gc(&engine, "retention: {failed: 1ms}\n", false);
    assert!(removed.contains(&format!("removed {bad} failed")), "{removed}");
    assert_eq!(engine.get(&format!("/v1/jobs/{bad}")).await.0, 404);
    assert!(!dir(&bad).exists());
    // The engine carries on.
    let fresh = engine.submit("ok", json!({})).await;
    assert_eq!(engine.wait_final(&fresh, Duration::from_secs(20)).await["state"], "succeeded");
}

/// Listing jobs reads only the columns it shows: with 400 stored jobs of 900 KiB inputs, 40
/// listings of 500 jobs, 8 at a time, keep the engine's RSS within 100 MiB of its idle value.
#[tokio::test]
async fn listing_jobs_with_big_inputs_keeps_memory_within_100_mib_of_idle() {
    let engine = Engine::start(
        r#"
resources: {gpus: none, cpu: 2}
limits: {max_request_body: 2MiB}
diagnosis: {sample_interval: 1h}
pipelines:
  big: {max_queued: 1000, stages: [{name: s, command: ["gpuflow:noop"]}]}
"#,
    )
    .await;
    let ids = submit_big_inputs(&engine, 400).await;
    assert_eq!(ids.len(), 400);
    for id in &ids {
        assert_eq!(engine.wait_final(id, Duration::from_secs(60)).await["state"], "succeeded");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = engine.pid();
    let idle = rss_bytes(pid);

    let peak = Arc::new(std::sync::atomic::AtomicU64::new(idle));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(rss_bytes(pid), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let mut bytes = 0;
    for _ in 0..5 {
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (http, base) = (engine.http.clone(), engine.base.clone());
            tasks.push(tokio::spawn(async move {
                let r = http.get(format!("{base}/v1/jobs?limit=500")).send().await.unwrap();
                assert_eq!(r.status().as_u16(), 200);
                let body = r.bytes().await.unwrap();
                let list: Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(list["jobs"].as_array().unwrap().len(), 400);
                body.len()
            }));
        }
        for t in tasks {
            bytes = t.await.unwrap();
        }
    }
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!("idle {:.1} MiB, peak {:.1} MiB during 40 listings (response {} bytes)", mib(idle), mib(peak), bytes);
    assert!(bytes < 1 << 20, "a listing carried the inputs: {bytes} bytes");
    assert!(peak < idle + (100 << 20), "RSS rose from {:.1} to {:.1} MiB", mib(idle), mib(peak));
}

/// Submits `n` jobs of pipeline `big` with a 900 KiB pad and `{"n": k}`, 8 at a time; their
/// ids in order.
async fn submit_big_inputs(engine: &Engine, n: usize) -> Vec<String> {
    let pad = "x".repeat(900 * 1024);
    let mut ids = Vec::new();
    for chunk in 0..n / 8 {
        let mut tasks = Vec::new();
        for k in 0..8 {
            let (http, base, pad) = (engine.http.clone(), engine.base.clone(), pad.clone());
            tasks.push(tokio::spawn(async move {
                let r = http
                    .post(format!("{base}/v1/jobs"))
                    .json(&json!({"pipeline": "big", "input": {"pad": pad, "n": chunk * 8 + k}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 201, "job {}", chunk * 8 + k);
                r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string()
            }));
        }
        for t in tasks {
            ids.push(t.await.unwrap());
        }
    }
    ids
}

/// Queued jobs do not keep large inputs in the engine's memory: 400 jobs with 900 KiB inputs
/// wait behind a held counter, and RSS stays within 100 MiB of its value before they came,
/// also after a restart restores them. Once released, every stage renders its own job's input,
/// read back from the store when it starts.
#[tokio::test]
async fn queued_jobs_keep_big_inputs_in_the_store_until_a_stage_starts() {
    let mut engine = Engine::start(
        r#"
resources: {gpus: none, cpu: 4, counters: {gate: 1}}
limits: {max_request_body: 2MiB}
diagnosis: {sample_interval: 1h}
pipelines:
  hold: {stages: [{name: s, needs: {counters: {gate: 1}}, command: [sleep, "600"]}]}
  big:
    max_queued: 1000
    stages:
      - {name: s, needs: {cpu: 1, counters: {gate: 1}}, command: [sh, -c, 'echo "$0" >> {DIR}/seen', "{input.n}"]}
"#,
    )
    .await;
    let holder = engine.submit("hold", json!({})).await;
    engine.wait_leased("the holder runs", Duration::from_secs(10)).await;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let before = rss_bytes(engine.pid());
    submit_big_inputs(&engine, 400).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let queued = rss_bytes(engine.pid());
    eprintln!("RSS {:.1} MiB before, {:.1} MiB with 400 queued 900 KiB inputs", mib(before), mib(queued));
    assert!(queued < before + (100 << 20), "RSS rose from {:.1} to {:.1} MiB", mib(before), mib(queued));

    engine.kill9();
    engine.restart().await;
    engine.wait_leased("the holder runs again", Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restored = rss_bytes(engine.pid());
    eprintln!("RSS {:.1} MiB after a restart restored them", mib(restored));
    assert!(restored < before + (100 << 20), "RSS after recovery {:.1} MiB", mib(restored));

    let (status, _) = engine.post(&format!("/v1/jobs/{holder}/cancel"), json!({})).await;
    assert_eq!(status, 200);
    let seen = engine.path("seen");
    engine
        .wait_until("every queued job ran", Duration::from_secs(120), async |_| {
            std::fs::read_to_string(&seen).unwrap_or_default().lines().count() >= 400
        })
        .await;
    let text = std::fs::read_to_string(&seen).unwrap();
    let mut ns: Vec<usize> = text
        .lines()
        .map(|l| l.trim().parse().unwrap_or_else(|_| panic!("a stage saw input.n = {l:?} (file: {text:?})")))
        .collect();
    ns.sort_unstable();
    assert_eq!(ns, (0..400).collect::<Vec<_>>(), "each stage saw its own job's input once");
}

#[tokio::test]
async fn a_stage_dies_with_its_engine_on_kill_9() {
    let mut engine = Engine::start(
        r#"
resources: {gpus: none, cpu: 1}
pipelines:
  long: {stages: [{name: s, command: [sh, -c, 'echo $$ > {DIR}/stage.pid; exec sleep 60']}]}
"#,
    )
    .await;
    let id = engine.submit("long", json!({})).await;
    let pid_file = engine.path("stage.pid");
    engine
        .wait_until("the stage runs", Duration::from_secs(20), async |e| {
            e.path("stage.pid").exists() && e.job(&id).await["state"] == "running"
        })
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let pid = read_pid(&pid_file);
    assert!(alive(pid));
    engine.kill9();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while alive(pid) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!alive(pid), "the stage outlived its engine (no restart has swept it yet)");
}

/// Three agents on PostgreSQL; one is `kill -9`ed while it holds GPU stages. Each stage logs
/// a tick every 100 ms while it runs; from those logs no stage ran on two agents at
/// overlapping times, and the dead agent's stages stopped ticking when it died.
#[tokio::test]
async fn a_killed_agents_gpu_stages_die_with_it_and_never_overlap_their_reruns() {
    let Some(db) = TestDb::create() else { return };
    let shared = tempfile::tempdir().unwrap();
    let log = shared.path().join("ticks.log");
    let ticking = format!(
        "[sh, -c, 'i=0; while [ $i -lt 25 ]; do echo \"$GPUFLOW_STAGE $GPUFLOW_JOB_ID $GPUFLOW_ATTEMPT $(date +%s%N) $GPUFLOW_JOB_DIR\" >> {}; i=$((i+1)); sleep 0.1; done']",
        log.display()
    );
    let config = format!(
        r#"
store: {url}
cluster: {{lease_ttl: 2000ms, poll_interval: 200ms}}
limits: {{kill_grace: 1s}}
resources:
  gpus: [{{memory: 16GiB}}, {{memory: 16GiB}}]
  cpu: 2
pipelines:
  gpu:
    max_queued: 1000
    stages: [{{name: infer, command: {ticking}, needs: {{gpu: 1}}}}]
"#,
        url = db.url
    );
    let mut agents = Vec::new();
    for _ in 0..3 {
        agents.push(Engine::start(&config).await);
    }
    let mut ids = Vec::new();
    for i in 0..9 {
        ids.push(agents[i % 3].submit("gpu", json!({})).await);
    }
    agents[1]
        .wait_until("agent 1 holds GPU stages", Duration::from_secs(30), async |a| {
            a.resources().await["leases"].as_array().is_some_and(|l| !l.is_empty())
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let victim = agents[1].dir.path().display().to_string();
    let killed_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    agents[1].kill9();
    for id in &ids {
        assert_eq!(agents[0].wait_final(id, Duration::from_secs(120)).await["state"], "succeeded");
    }

    // (job, stage, attempt) -> (agent, first tick, last tick)
    let mut runs: std::collections::BTreeMap<(String, String, u32), (String, u128, u128)> = Default::default();
    for line in std::fs::read_to_string(&log).unwrap().lines() {
        let p: Vec<&str> = line.split_whitespace().collect();
        let (stage, job, attempt, t, dir) = (p[0], p[1], p[2].parse().unwrap(), p[3].parse::<u128>().unwrap(), p[4]);
        let agent = agents.iter().map(|a| a.dir.path().display().to_string()).find(|d| dir.starts_with(d)).unwrap();
        let run = runs.entry((job.into(), stage.into(), attempt)).or_insert((agent, t, t));
        run.1 = run.1.min(t);
        run.2 = run.2.max(t);
    }
    let victim_runs: Vec<_> = runs.iter().filter(|(_, (a, _, _))| *a == victim).collect();
    assert!(
        victim_runs.iter().any(|(_, (_, _, last))| *last + 150_000_000 >= killed_at),
        "the kill hit no running stage"
    );
    for ((job, stage, attempt), (_, _, last)) in &victim_runs {
        assert!(
            *last < killed_at + 150_000_000,
            "{job}/{stage}/{attempt} kept running {} ms after its agent died",
            (last - killed_at) / 1_000_000
        );
    }
    let mut twice = 0;
    for ((job, stage, a1), (agent1, s1, e1)) in &runs {
        for ((job2, stage2, a2), (agent2, s2, e2)) in &runs {
            if job == job2 && stage == stage2 && a1 < a2 && agent1 != agent2 && s2 <= e1 && s1 <= e2 {
                twice += 1;
                eprintln!("{job}/{stage}: attempt {a1} on {agent1} overlapped attempt {a2} on {agent2}");
            }
        }
    }
    assert_eq!(twice, 0, "stages ran on two agents at once");
}
