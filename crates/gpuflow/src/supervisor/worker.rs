//! Running one worker-pool instance: a long-lived child that speaks newline-delimited JSON on
//! stdin/stdout. This file only moves bytes and signals; the runtime decides what they mean.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::kill::{kill_group, kill_marked};
use super::logs::{copy_capped, tail};
use super::*;

#[derive(Clone, Debug)]
pub struct InstanceSpec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    pub stderr_log: PathBuf,
    pub marker: String,
    pub log_max: u64,
    pub kill_grace_ms: u64,
    /// Longest protocol line accepted; a longer one is a protocol error.
    pub max_line: usize,
}

/// How to stop an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstanceStop {
    /// SIGTERM to the group, then SIGKILL after the grace period.
    Graceful,
    /// SIGKILL to the group now (a hung instance: its state is worthless).
    Now,
}

#[derive(Debug)]
pub enum InstanceEvent {
    Spawned {
        pid: u32,
    },
    /// One protocol line: parsed JSON, or why it is not.
    Line(Result<Value, String>),
    Exited {
        status: ExitStatus,
        stderr_tail: String,
    },
}

/// A line for the worker; for a task, the job directory it may write into, created just
/// before the line is written (here, off the engine's loop: a `mkdir` per task on the loop
/// took half its time at a few thousand tasks a second).
pub struct ToWorker {
    pub line: String,
    /// Job directories to create before the line is written (one per task of a batch).
    pub job_dirs: Vec<std::path::PathBuf>,
}

impl ToWorker {
    pub fn line(line: String) -> ToWorker {
        ToWorker { line, job_dirs: Vec::new() }
    }
}

/// Runs one instance until it exits, reporting through `report`. Lines queued on `stdin`
/// are written to the worker, in order; a message on `stop` stops it.
pub async fn run_instance(
    registry: ChildRegistry,
    spec: InstanceSpec,
    report: impl Fn(InstanceEvent) + Send + Sync + 'static,
    mut stdin: mpsc::UnboundedReceiver<ToWorker>,
    mut stop: mpsc::UnboundedReceiver<InstanceStop>,
) {
    if let Some(dir) = spec.stderr_log.parent() {
        let _ = tokio::fs::create_dir_all(dir).await;
    }
    let mut command = supervised_command(&spec.argv, &spec.env, &spec.marker, spec.cwd.as_deref(), Stdio::piped());
    let mut child = match registry.spawn(&mut command) {
        Ok(child) => child,
        Err(e) => {
            let status = ExitStatus::SpawnFailed(spawn_error(&spec.argv[0], &e));
            report(InstanceEvent::Exited { status, stderr_tail: String::new() });
            return;
        }
    };
    let pid = child.id().expect("running child has a pid") as i32;
    report(InstanceEvent::Spawned { pid: pid as u32 });
    let report = std::sync::Arc::new(report);

    let stderr = tokio::spawn(copy_capped(child.stderr.take().expect("piped"), spec.stderr_log.clone(), spec.log_max));
    let mut to_worker = child.stdin.take().expect("piped");
    let writer = tokio::spawn(async move {
        while let Some(ToWorker { line, job_dirs }) = stdin.recv().await {
            for dir in job_dirs {
                if let Err(e) = tokio::fs::create_dir_all(&dir).await {
                    tracing::warn!("cannot create the job directory {}: {e}", dir.display());
                }
            }
            if to_worker.write_all(line.as_bytes()).await.is_err() || to_worker.write_all(b"\n").await.is_err() {
                break;
            }
            let _ = to_worker.flush().await;
        }
    });
    let from_worker = child.stdout.take().expect("piped");
    let lines_report = report.clone();
    let reader =
        tokio::spawn(read_lines(from_worker, spec.max_line, move |line| lines_report(InstanceEvent::Line(line))));

    let status = tokio::select! {
        status = child.wait() => status,
        Some(how) = stop.recv() => {
            let mut how = how;
            loop {
                if how == InstanceStop::Now {
                    kill_group(pid, Signal::SIGKILL);
                    break child.wait().await;
                }
                kill_group(pid, Signal::SIGTERM);
                tokio::select! {
                    status = child.wait() => break status,
                    next = stop.recv() => how = next.unwrap_or(InstanceStop::Now),
                    _ = tokio::time::sleep(Duration::from_millis(spec.kill_grace_ms)) => how = InstanceStop::Now,
                }
            }
        }
    };
    registry.forget(pid);
    kill_group(pid, Signal::SIGKILL);
    kill_marked(&spec.marker).await;
    writer.abort();
    // Deliver every line the worker wrote before it died, then the exit.
    let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), stderr).await;
    let status = exit_status(status);
    report(InstanceEvent::Exited { status, stderr_tail: tail(&spec.stderr_log, 2_000) });
}

/// Splits a byte stream into JSON lines, refusing lines longer than `max` without buffering
/// them (a worker must not be able to exhaust the engine's memory).
async fn read_lines(mut from: impl tokio::io::AsyncRead + Unpin, max: usize, emit: impl Fn(Result<Value, String>)) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut discarding = false;
    loop {
        let n = match from.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in &chunk[..n] {
            if b == b'\n' {
                if !discarding {
                    let line = std::mem::take(&mut buf);
                    if !line.iter().all(u8::is_ascii_whitespace) {
                        emit(parse_line(&line));
                    }
                }
                buf.clear();
                discarding = false;
            } else if !discarding {
                buf.push(b);
                if buf.len() > max {
                    emit(Err(format!("a protocol line is longer than {max} bytes")));
                    buf.clear();
                    discarding = true;
                }
            }
        }
    }
    if !buf.is_empty() && !discarding {
        emit(parse_line(&buf));
    }
}

fn parse_line(line: &[u8]) -> Result<Value, String> {
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        let shown: String = String::from_utf8_lossy(line).chars().take(200).collect();
        format!("not JSON ({e}): {shown}")
    })?;
    if !value.is_object() {
        return Err(format!("a message must be a JSON object, got {value}"));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[tokio::test]
    async fn lines_are_split_parsed_and_capped() {
        let input: &[u8] = b"{\"type\":\"ready\"}\n\nnot json\n[1]\n{\"a\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}\n{\"type\":\"result\"}";
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        read_lines(input, 40, move |l| sink.lock().unwrap().push(l)).await;
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 5, "{seen:?}");
        assert_eq!(seen[0].as_ref().unwrap()["type"], "ready");
        assert!(seen[1].as_ref().unwrap_err().starts_with("not JSON"));
        assert!(seen[2].as_ref().unwrap_err().contains("must be a JSON object"));
        assert!(seen[3].as_ref().unwrap_err().contains("longer than 40 bytes"));
        assert_eq!(seen[4].as_ref().unwrap()["type"], "result", "a last line without a newline still counts");
    }
}
