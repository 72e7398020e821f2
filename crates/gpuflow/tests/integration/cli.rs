//! The command line, run as a binary: `check` errors point at the file; `submit --wait`
//! exits with the outcome and names its job; short ids, `logs`, `retry`, typed inputs,
//! human units, closed pipes, completions and the engine's log format.

use std::process::Command;
use std::time::Duration;

use crate::fixture::*;

fn check(yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new(bin()).arg("check").arg(&file).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn check_points_at_line_column_and_field() {
    let (ok, out) = check(
        "resources: {gpus: none, cpu: 1}\npipelines:\n  p:\n    stages:\n      - name: a\n        command: [\"true\"]\n        timout: 5s\n",
    );
    assert!(!ok);
    assert!(out.contains("p.yaml:7:9") && out.contains("timout"), "{out}");

    let (ok, out) = check(
        "resources: {gpus: none, cpu: 1}\npipelines:\n  p:\n    stages:\n      - {name: a, command: [\"true\"]}\n      - {name: b, command: [\"true\"], after: [nope]}\n",
    );
    assert!(!ok);
    assert!(
        out.contains("p.yaml:6:")
            && out.contains("pipelines.p.stages[1].after")
            && out.contains("unknown stage `nope`; stages of this pipeline: a, b"),
        "{out}"
    );

    let (ok, out) = check(
        "resources: {gpus: [{memory: 24GiB}], cpu: 1}\npipelines:\n  p:\n    stages:\n      - {name: a, command: [\"true\"], needs: {gpu_memory: 40GiB}}\n",
    );
    assert!(!ok);
    assert!(
        out.contains("p.yaml:5:") && out.contains("largest device has 24GiB") && out.contains("never be granted"),
        "{out}"
    );

    let (ok, out) = check(
        "resources: {gpus: none, cpu: 1}\npipelines:\n  p:\n    stages:\n      - {name: a, command: [\"true\"], timeout: 10}\n",
    );
    assert!(!ok);
    assert!(out.contains("needs a unit"), "{out}");

    let (ok, out) = check(
        "resources: {gpus: none, cpu: 1}\npipelines:\n  p:\n    stages:\n      - {name: a, command: [echo, \"{stages.b.x}\"]}\n      - {name: b, command: [\"true\"]}\n",
    );
    assert!(!ok);
    assert!(out.contains("does not run before `a`"), "{out}");

    // A whole-GPU stage next to a pool that keeps a share of the only GPU could never start.
    let (ok, out) = check(
        "resources: {gpus: [{memory: 8GiB}], cpu: 2}\nworkers:\n  w: {command: [w], needs: {gpu_memory: 2GiB}}\npipelines:\n  p:\n    stages:\n      - {name: a, command: [\"true\"], needs: {gpu: 1}}\n",
    );
    assert!(!ok);
    assert!(out.contains("p.yaml:7:") && out.contains("next to the worker pools' instances"), "{out}");

    let (ok, out) = check(
        "resources: {gpus: [{memory: 8GiB}], cpu: 2}\npipelines:\n  p:\n    stages:\n      - {name: a, command: [\"true\"]}\n",
    );
    assert!(ok, "{out}");
    assert!(out.contains("gpu 0: virtual-gpu-0 8 GiB (Virtual)"), "{out}");
}

#[test]
fn the_quickstart_example_checks_clean() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(bin()).arg("check").arg(root.join("examples/quickstart.yaml")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn submit_wait_exit_code_reflects_the_outcome() {
    let engine = Engine::start(
        r#"
resources: {gpus: none, cpu: 2}
pipelines:
  ok: {stages: [{name: s, command: [sh, -c, 'echo "{{\"greeting\": \"hi $1\"}}" > $GPUFLOW_OUTPUT', sh, "{input.who}"]}]}
  bad: {stages: [{name: s, command: ["false"], retry: {max_attempts: 1}}]}
"#,
    )
    .await;
    let run = |args: &[&str]| {
        let out = Command::new(bin()).args(["--server", &engine.base]).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, stdout, stderr) = run(&["submit", "ok", "--input", "who=world", "--wait"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("\"greeting\": \"hi world\""), "{stdout}");
    assert!(stderr.contains("s: succeeded"), "plain progress lines when not on a terminal: {stderr}");
    let (code, _, stderr) = run(&["submit", "bad", "--wait"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("failed"), "{stderr}");
    let (code, _, stderr) = run(&["submit", "nope"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("unknown_pipeline"), "{stderr}");
    let (code, stdout, _) = run(&["jobs"]);
    assert_eq!(code, Some(0));
    assert_eq!(stdout.lines().count(), 3, "header and two jobs: {stdout}");
}

#[tokio::test]
async fn submit_from_a_jsonl_file_sends_batches_and_reports_each_line() {
    let engine = Engine::start(
        r#"
resources: {gpus: none, cpu: 2}
pipelines:
  ok: {stages: [{name: s, command: ["true"]}]}
  capped: {max_queued: 1, stages: [{name: s, command: [sleep, "30"]}]}
"#,
    )
    .await;
    let run = |args: &[&str], stdin: Option<&str>| {
        use std::io::Write;
        let mut child = Command::new(bin())
            .args(["--server", &engine.base])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        drop(pipe);
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };

    let file = engine.path("jobs.jsonl");
    std::fs::write(
        &file,
        [
            r#"{"pipeline": "ok", "input": {"n": 1}}"#,
            "",
            r#"{"pipeline": "ok", "input": {"n": 2}"#,
            r#"{"pipeline": "nope"}"#,
            r#"["not", "an", "object"]"#,
            r#"{"pipeline": "ok", "priority": 5, "idempotency_key": "k-5"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let (code, stdout, stderr) = run(&["submit", "--from", file.to_str().unwrap()], None);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 5, "one line per job: {stdout}");
    assert!(lines[0].starts_with("line 1: ") && lines[0].ends_with(" queued"), "{stdout}");
    assert!(lines[1].starts_with("line 3: error malformed: not JSON"), "{stdout}");
    assert!(lines[2].starts_with("line 4: error unknown_pipeline: ") && lines[2].contains("`nope`"), "{stdout}");
    assert!(lines[3].starts_with("line 5: error malformed: not a JSON object"), "{stdout}");
    assert!(lines[4].starts_with("line 6: ") && lines[4].ends_with(" queued"), "{stdout}");
    assert!(stderr.contains("3 of 5 jobs not submitted (lines 3, 4, 5); submitted 2 jobs"), "{stderr}");
    let (_, list) = engine.get("/v1/jobs").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 2, "only the good lines were sent: {list}");

    // From stdin, all good: exit 0. The repeated key gives the earlier job.
    let (code, stdout, stderr) = run(
        &["submit", "--from", "-"],
        Some("{\"pipeline\": \"ok\", \"priority\": 5, \"idempotency_key\": \"k-5\"}\n"),
    );
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let id6 = lines[4].split_whitespace().nth(2).unwrap();
    assert!(stdout.starts_with(&format!("line 1: {id6} ")) && stdout.contains("earlier job"), "{stdout}");
    assert!(stderr.contains("submitted 1 job"), "{stderr}");

    // More than one batch: 1,001 lines go in two requests, answered in input order.
    let many: String =
        (0..1001).map(|i| format!("{{\"pipeline\": \"capped\", \"input\": {{\"i\": {i}}}}}\n")).collect();
    let (code, stdout, stderr) = run(&["submit", "--from", "-"], Some(&many));
    assert_eq!(code, Some(2), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1001, "{stderr}");
    assert!(lines[0].starts_with("line 1: ") && lines[0].ends_with(" queued"), "{}", lines[0]);
    assert!(lines[1000].starts_with("line 1001: error queue_full: "), "{}", lines[1000]);
    assert!(stderr.contains("1000 of 1001 jobs not submitted"), "{stderr}");
    let capped = lines[0].split_whitespace().nth(2).unwrap();
    engine.post(&format!("/v1/jobs/{capped}/cancel"), serde_json::json!({})).await;

    // --from replaces the single-job arguments.
    for args in [
        &["submit", "ok", "--from", "-"][..],
        &["submit", "--from", "-", "--input", "a=1"][..],
        &["submit", "--from", "-", "--wait"][..],
    ] {
        let (code, _, stderr) = run(args, None);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("cannot be used with"), "{args:?}: {stderr}");
    }
    let (code, _, stderr) = run(&["submit"], None);
    assert_eq!(code, Some(2), "{stderr}");
}

/// Runs the CLI against `engine`; `(exit code, stdout, stderr)`.
fn cli(engine: &Engine, args: &[&str]) -> (Option<i32>, String, String) {
    cli_in(engine, args, None)
}

fn cli_in(engine: &Engine, args: &[&str], dir: Option<&std::path::Path>) -> (Option<i32>, String, String) {
    let mut command = Command::new(bin());
    command.args(["--server", &engine.base]).args(args).env_remove("GPUFLOW_TOKEN");
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let out = command.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn short(id: &str) -> &str {
    &id[id.len() - 8..]
}

#[tokio::test]
async fn short_ids_and_id_prefixes_name_a_job_and_an_ambiguous_one_lists_the_candidates() {
    let engine = Engine::start(
        "resources: {gpus: none, cpu: 2}\npipelines:\n  ok: {stages: [{name: s, command: [\"true\"]}]}\n",
    )
    .await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = engine.submit("ok", serde_json::json!({})).await;
        engine.wait_final(&id, Duration::from_secs(30)).await;
        ids.push(id);
    }
    let (code, stdout, stderr) = cli(&engine, &["jobs"]);
    assert_eq!(code, Some(0), "{stderr}");
    for id in &ids {
        assert!(stdout.lines().any(|l| l.starts_with(short(id))), "short id {} listed: {stdout}", short(id));
    }

    // The short id the dashboard shows, a unique prefix (any case, dashes or not), the whole id.
    let whole = ids[1].clone();
    let prefix = whole[..whole.len() - 1].to_uppercase();
    let undashed: String = whole.chars().filter(|c| *c != '-').take(31).collect();
    for typed in [short(&whole), prefix.as_str(), undashed.as_str(), whole.as_str()] {
        let (code, stdout, stderr) = cli(&engine, &["status", typed]);
        assert_eq!(code, Some(0), "{typed}: {stderr}");
        assert!(stdout.starts_with(&format!("job {whole} ")), "{typed}: {stdout}");
    }

    // UUIDv7s made moments apart share their leading (timestamp) digits.
    let common: String = ids[0].chars().zip(ids[2].chars()).take_while(|(a, b)| a == b).map(|(a, _)| a).collect();
    assert!(common.len() >= 4, "{ids:?}");
    let (code, _, stderr) = cli(&engine, &["status", &common]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains(&format!("job id `{common}` is ambiguous")), "{stderr}");
    for id in &ids {
        assert!(stderr.contains(id.as_str()), "every candidate listed: {stderr}");
    }

    let (code, _, stderr) = cli(&engine, &["cancel", "ffffffff"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("no job id starts or ends with `ffffffff`"), "{stderr}");
    let (code, _, stderr) = cli(&engine, &["logs", "not-an-id"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("job id `not-an-id` is not a job id"), "{stderr}");

    // The API behind it refuses what it cannot look up, naming the parameter.
    let (status, body) = engine.get("/v1/jobs?id_prefix=xyz").await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().starts_with("id_prefix: `xyz`"), "{body}");
    let (status, body) = engine.get(&format!("/v1/jobs?id_prefix={common}&state=queued")).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = engine.get("/v1/jobs?short_id=123").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = engine.get(&format!("/v1/jobs?short_id={}", short(&ids[2]))).await;
    assert_eq!(status, 200);
    assert_eq!(body["jobs"].as_array().unwrap().len(), 1, "{body}");
    assert_eq!(body["jobs"][0]["id"], ids[2].as_str());
}

#[tokio::test]
async fn retry_submits_the_input_again_linked_to_the_failed_job() {
    let engine = Engine::start(
        r#"
resources: {gpus: none, cpu: 2}
pipelines:
  flaky: {stages: [{name: s, command: [sh, -c, 'test -e "$0"', "{input.flag}"], retry: {max_attempts: 1}}]}
"#,
    )
    .await;
    let flag = engine.path("flag");
    let input = format!("flag={}", flag.display());
    let (code, _, stderr) = cli(&engine, &["submit", "flaky", "-i", &input, "--wait"]);
    assert_eq!(code, Some(1), "{stderr}");
    let failed = stderr.lines().next().unwrap().strip_prefix("submitted ").unwrap().to_string();

    std::fs::write(&flag, "").unwrap();
    let (code, _, stderr) = cli(&engine, &["retry", short(&failed), "--wait"]);
    assert_eq!(code, Some(0), "{stderr}");
    let first = stderr.lines().next().unwrap();
    assert!(first.starts_with("submitted ") && first.ends_with(&format!(" to retry {failed}")), "{stderr}");
    let retry = first.split_whitespace().nth(1).unwrap().to_string();
    assert_ne!(retry, failed);

    let (_, stdout, _) = cli(&engine, &["status", short(&retry)]);
    assert!(stdout.contains(&format!("retry of {failed}")), "{stdout}");
    let (_, stdout, _) = cli(&engine, &["status", short(&failed)]);
    assert!(stdout.contains(&format!("retried by {retry}")), "{stdout}");
    let job = engine.job(&retry).await;
    assert_eq!(job["input"]["flag"], flag.display().to_string(), "the same input: {job}");
    assert_eq!(job["retry_of"], failed.as_str());

    // Only a failed or cancelled job can be retried.
    let (code, _, stderr) = cli(&engine, &["retry", &retry]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("not_retryable (409)")
            && stderr.contains(&format!("job {retry} succeeded; only a failed or cancelled job")),
        "{stderr}"
    );
}

#[tokio::test]
async fn logs_print_each_stage_and_follow_until_the_job_ends() {
    let engine = Engine::start(
        r#"
resources: {gpus: none, cpu: 2}
pipelines:
  two:
    stages:
      - {name: a, command: [sh, -c, 'echo out-a; echo err-a >&2']}
      - {name: b, after: [a], command: [sh, -c, 'for i in 1 2 3 4; do echo line-$i; sleep 0.4; done']}
"#,
    )
    .await;
    let id = engine.submit("two", serde_json::json!({})).await;
    let follower = Command::new(bin())
        .args(["--server", &engine.base, "logs", short(&id), "--follow"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = follower.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(engine.job(&id).await["state"], "succeeded", "--follow ends with the job");
    let at = |needle: &str| stdout.find(needle).unwrap_or_else(|| panic!("{needle} in: {stdout}"));
    assert!(at("==> a attempt 1 stdout <==") < at("out-a"), "{stdout}");
    assert!(at("==> a attempt 1 stderr <==") < at("err-a"), "{stdout}");
    assert!(at("==> b attempt 1 stdout <==") < at("line-1"), "{stdout}");
    assert!(at("line-1") < at("line-2") && at("line-2") < at("line-3") && at("line-3") < at("line-4"), "{stdout}");
    assert_eq!(stdout.matches("line-2").count(), 1, "each line once: {stdout}");

    // One log: just its text.
    let (code, stdout, stderr) = cli(&engine, &["logs", &id, "b", "--stream", "stdout"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "line-1\nline-2\nline-3\nline-4\n");
    let (code, _, stderr) = cli(&engine, &["logs", &id, "nope"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("has no stage `nope`; its stages: a, b"), "{stderr}");
    let (code, _, stderr) = cli(&engine, &["logs", &id, "a", "--attempt", "2"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("has no attempt 2"), "{stderr}");
}

#[tokio::test]
async fn typed_inputs_take_json_and_relative_paths_are_resolved_here() {
    let engine = Engine::start(
        r#"
resources: {gpus: none, cpu: 2}
allowed_roots: ["{DIR}"]
pipelines:
  typed:
    inputs: {frames: {type: integer}, clip: {type: path}}
    stages: [{name: s, command: [echo, "{input.frames}", "{input.clip}"]}]
"#,
    )
    .await;
    let here = engine.path("clips");
    std::fs::create_dir(&here).unwrap();
    std::fs::write(here.join("clip.mp4"), "").unwrap();
    let clip = here.join("clip.mp4").display().to_string();

    let (code, _, stderr) = cli(&engine, &["submit", "typed", "-i", "frames=6", "-i", &format!("clip={clip}")]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("input.frames") && stderr.contains("write `-i frames:=6`"), "{stderr}");

    for relative in ["clip.mp4", "./clip.mp4", "../clips/clip.mp4"] {
        let (code, stdout, stderr) =
            cli_in(&engine, &["submit", "typed", "-i", "frames:=6", "-i", &format!("clip={relative}")], Some(&here));
        assert_eq!(code, Some(0), "{relative}: {stderr}");
        let job = engine.job(stdout.trim()).await;
        assert_eq!(job["input"]["frames"], 6);
        assert_eq!(job["input"]["clip"], clip.as_str(), "{relative}");
    }
    let (code, _, stderr) = cli(&engine, &["submit", "typed", "-i", "frames:=six"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("`six` is not JSON"), "{stderr}");
}

#[tokio::test]
async fn resources_speak_in_units_and_concurrent_waits_name_their_job() {
    let engine = Engine::start(
        r#"
resources: {gpus: [{memory: 16GiB}], cpu: 4}
pipelines:
  share: {stages: [{name: hold, command: [sleep, "30"], needs: {gpu_memory: 6GiB}}]}
  whole: {stages: [{name: run, command: ["true"], needs: {gpu: 1}}]}
  quick: {stages: [{name: one, command: [sleep, "0.3"]}, {name: two, after: [one], command: ["true"]}]}
"#,
    )
    .await;
    let holder = engine.submit("share", serde_json::json!({})).await;
    engine
        .wait_until("the share is held", Duration::from_secs(30), async |e| {
            e.resources().await["leases"].as_array().is_some_and(|l| !l.is_empty())
        })
        .await;
    let waiter = engine.submit("whole", serde_json::json!({})).await;
    engine
        .wait_until("the whole-GPU stage waits", Duration::from_secs(30), async |e| {
            e.resources().await["waiting"].as_array().is_some_and(|w| !w.is_empty())
        })
        .await;
    let (code, stdout, stderr) = cli(&engine, &["resources"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("16 GiB") && stdout.contains("6 GiB of GPU 0"), "{stdout}");
    assert!(stdout.contains(short(&holder)) && stdout.contains(short(&waiter)), "{stdout}");
    assert!(stdout.contains("needs 1 GPU"), "{stdout}");
    assert!(!stdout.contains("bytes") && !stdout.contains('{'), "no raw maps or byte counts: {stdout}");
    for id in [&holder, &waiter] {
        engine.post(&format!("/v1/jobs/{id}/cancel"), serde_json::json!({})).await;
    }

    // Three waits at once: each line of each starts with its own job's short id.
    let waits: Vec<_> = (0..3)
        .map(|_| {
            Command::new(bin())
                .args(["--server", &engine.base, "submit", "quick", "--wait"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut shorts = std::collections::HashSet::new();
    for wait in waits {
        let out = wait.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let id = stderr.lines().next().unwrap().strip_prefix("submitted ").unwrap().to_string();
        let stage_lines: Vec<&str> = stderr.lines().filter(|l| l.contains(": ")).collect();
        assert!(stage_lines.iter().any(|l| l.ends_with("two: succeeded")), "{stderr}");
        for line in stage_lines {
            assert!(line.starts_with(&format!("{} ", short(&id))), "`{line}` names job {id}: {stderr}");
        }
        shorts.insert(short(&id).to_string());
    }
    assert_eq!(shorts.len(), 3);
}

#[tokio::test]
async fn closed_pipes_end_quietly_and_completions_are_printed() {
    let engine = Engine::start(
        "resources: {gpus: none, cpu: 1}\npipelines:\n  ok: {stages: [{name: s, command: [\"true\"]}]}\n",
    )
    .await;
    for args in [&["openapi"][..], &["completions", "bash"][..], &["jobs", "--json"][..]] {
        use std::io::Read;
        let mut child = Command::new(bin())
            .args(["--server", &engine.base])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Read a little, as `| head -c 10` does, then go away.
        let mut first = [0u8; 10];
        child.stdout.take().unwrap().read_exact(&mut first).unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_ne!(out.status.code(), Some(101), "{args:?}: {stderr}");
    }
    let (code, stdout, _) = cli(&engine, &["completions", "bash"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("_gpuflow()") && stdout.contains("retry") && stdout.contains("logs"), "{stdout}");
    let (code, stdout, _) = cli(&engine, &["completions", "zsh"]);
    assert_eq!(code, Some(0));
    assert!(stdout.starts_with("#compdef gpuflow"), "{stdout}");
    let (code, _, stderr) = cli(&engine, &["completions", "tcsh"]);
    assert_eq!(code, Some(2), "{stderr}");
}

#[tokio::test]
async fn the_engine_log_is_plain_off_a_terminal_and_json_on_request() {
    let mut engine = Engine::start(
        "resources: {gpus: none, cpu: 1}\npipelines:\n  ok: {stages: [{name: s, command: [\"true\"]}]}\n",
    )
    .await;
    let plain = engine.log();
    assert!(plain.contains("gpuflow listening on"), "{plain}");
    assert!(!plain.contains('\u{1b}'), "no ANSI codes in a file: {plain:?}");

    engine.kill9();
    let before = engine.log().len();
    engine.env.push(("GPUFLOW_LOG_FORMAT".into(), "json".into()));
    engine.restart().await;
    let log = engine.log();
    let json_lines: Vec<serde_json::Value> =
        log[before..].lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    assert!(
        json_lines
            .iter()
            .any(|l| l["level"] == "INFO"
                && l["message"].as_str().is_some_and(|m| m.starts_with("gpuflow listening on"))),
        "{log}"
    );
}
