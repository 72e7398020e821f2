//! `gpuflow check` on files with several mistakes: every error at once, each with the file's
//! name, line and column, a count, hints, the whole cycle; missing commands as warnings.

use std::process::Command;

use crate::fixture::*;

/// Runs `gpuflow check` on `yaml` saved as `NAME`; (success, stdout, stderr).
fn check(name: &str, yaml: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(name);
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new(bin()).arg("check").arg(&file).current_dir(dir.path()).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).replace(&format!("{}/", dir.path().display()), "");
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn check_reports_every_shape_error_with_the_file_name_and_hints() {
    let (ok, _, err) = check(
        "video.yaml",
        r#"resources: {gpus: none, cpu: 2}
listn: 127.0.0.1:7070
pipelines:
  video:
    stages:
      - name: extract
        command: echo hello
      - name: detect
        comand: [python3, detect.py]
        timeout: 10 s
      - {name: ocr, command: ["true"], gpu_check: warm}
"#,
    );
    assert!(!ok);
    for expected in [
        "video.yaml:2:1: unknown field `listn`",
        "did you mean `listen`?",
        "video.yaml:7:18: expected sequence start",
        r#"write `command: ["echo", "hello"]`"#,
        "video.yaml:9:9: unknown field `comand`",
        "did you mean `command`?",
        "video.yaml:11:51: unknown variant `warm`",
        "--> video.yaml:9:9",
        "4 errors in video.yaml",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert!(!err.contains("<input>"), "{err}");
}

#[test]
fn check_reports_the_whole_cycle_next_to_the_other_errors() {
    let (ok, _, err) = check(
        "cycle.yaml",
        r#"resources: {gpus: none, cpu: 2}
pipelines:
  video:
    inputs: {frames: {type: integer}}
    stages:
      - {name: extract, command: [python3, x.py, "{input.frmes}"]}
      - {name: a, command: ["true"], after: [extract, c]}
      - {name: b, command: ["true"], after: [a]}
      - {name: c, command: ["true"], after: [b, extrct]}
"#,
    );
    assert!(!ok);
    for expected in [
        "cycle.yaml:6:50: pipelines.video.stages[0].command[2]: `{input.frmes}`: input `frmes` is not declared",
        "did you mean `frames`?",
        "cycle.yaml:7:9: pipelines.video.stages: `after` edges form a cycle: a -> b -> c -> a",
        "cycle.yaml:9:49: pipelines.video.stages[3].after: unknown stage `extrct`",
        "did you mean `extract`?",
        "3 errors in cycle.yaml",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
}

#[test]
fn check_warns_about_commands_not_on_path_and_still_passes() {
    let (ok, out, err) = check(
        "tools.yaml",
        r#"resources: {gpus: none, cpu: 2}
pipelines:
  p:
    stages:
      - {name: transcode, command: [no-such-transcoder-xyz, "{job.dir}"]}
      - {name: noop, command: ["gpuflow:noop"]}
      - {name: shell, command: [sh, -c, "true"]}
"#,
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("tools.yaml: ok"), "{out}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(
        warnings[0].contains("tools.yaml:5:37: pipelines.p.stages[0].command[0]: stage `transcode`: command `no-such-transcoder-xyz` is not found"),
        "{err}"
    );
}

#[test]
fn every_example_pipeline_file_still_checks() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    // The GPU smoke test needs a GPU in the inventory; the others check anywhere.
    for file in ["quickstart.yaml", "chain/chain.yaml", "stall/stall.yaml", "subtitles/subtitles.yaml"] {
        let out = Command::new(bin()).arg("check").arg(root.join(file)).output().unwrap();
        assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("warning:"),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
