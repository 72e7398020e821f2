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
