//! The command line: `check` errors point at the file; `submit --wait` exits with the outcome.

use std::process::Command;

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
    assert!(out.contains("gpu 0: virtual-gpu-0 8GiB (Virtual)"), "{out}");
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
