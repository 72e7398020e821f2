//! Spawning an attempt and watching it until it and everything it started are gone.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::kill::{kill_group, kill_marked};
use super::logs::{copy_capped, tail};
use super::*;

/// Runs one attempt to the end. `pid_tx` gets the child's PID once it runs; a message on
/// `stop_rx` stops it (TERM to the group, then KILL after the grace period).
pub async fn run_attempt(
    registry: ChildRegistry,
    spec: AttemptSpec,
    pid_tx: oneshot::Sender<u32>,
    mut stop_rx: mpsc::UnboundedReceiver<StopRequest>,
) -> AttemptReport {
    if let Some(dir) = spec.output_path.parent()
        && let Err(e) = tokio::fs::create_dir_all(dir).await
    {
        let status = ExitStatus::SpawnFailed(format!("cannot create {}: {e}", dir.display()));
        return AttemptReport { status, output: Ok(None), stderr_tail: String::new() };
    }
    let _ = tokio::fs::remove_file(&spec.output_path).await;
    let mut command = supervised_command(&spec.argv, &spec.env, &spec.marker, spec.cwd.as_deref(), Stdio::null());
    let mut child = match registry.spawn(&mut command) {
        Ok(child) => child,
        Err(e) => {
            let message = spawn_error(&spec.argv[0], &e);
            return AttemptReport {
                status: ExitStatus::SpawnFailed(message),
                output: Ok(None),
                stderr_tail: String::new(),
            };
        }
    };
    let pid = child.id().expect("running child has a pid") as i32;
    let _ = pid_tx.send(pid as u32);

    let stdout = tokio::spawn(copy_capped(child.stdout.take().expect("piped"), spec.stdout_log.clone(), spec.log_max));
    let stderr = tokio::spawn(copy_capped(child.stderr.take().expect("piped"), spec.stderr_log.clone(), spec.log_max));

    let status = tokio::select! {
        status = child.wait() => status,
        _ = stop_rx.recv() => {
            kill_group(pid, Signal::SIGTERM);
            tokio::select! {
                status = child.wait() => status,
                _ = tokio::time::sleep(Duration::from_millis(spec.kill_grace_ms)) => {
                    tracing::warn!(pid, "attempt ignored SIGTERM for {} ms; sending SIGKILL", spec.kill_grace_ms);
                    kill_group(pid, Signal::SIGKILL);
                    child.wait().await
                }
            }
        }
    };
    registry.forget(pid);

    // The attempt is over: nothing it started may outlive it (a leftover could hold GPU memory).
    kill_group(pid, Signal::SIGKILL);
    kill_marked(&spec.marker).await;
    // The pipes close once every holder is gone; don't wait forever on one that hid itself.
    for copier in [stdout, stderr] {
        let _ = tokio::time::timeout(Duration::from_secs(2), copier).await;
    }

    let status = exit_status(status);
    AttemptReport {
        status,
        output: read_output(&spec.output_path, spec.output_max),
        stderr_tail: tail(&spec.stderr_log, 2_000),
    }
}

fn read_output(path: &std::path::Path, max: u64) -> Result<Option<Value>, String> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read $GPUFLOW_OUTPUT: {e}")),
    };
    if meta.len() > max {
        return Err(format!(
            "$GPUFLOW_OUTPUT is {} bytes, over the {max}-byte limit (limits.output_max); write large results to files under $GPUFLOW_JOB_DIR and return their paths",
            meta.len()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read $GPUFLOW_OUTPUT: {e}"))?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str(&text).map(Some).map_err(|e| format!("$GPUFLOW_OUTPUT is not valid JSON: {e}"))
}
