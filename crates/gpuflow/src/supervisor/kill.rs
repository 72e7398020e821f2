//! Stopping process groups, and finding processes by the marker in their environment.

use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// Signals a whole process group. A group that is already gone is not an error.
pub fn kill_group(pgid: i32, signal: Signal) {
    match killpg(Pid::from_raw(pgid), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => tracing::warn!(pgid, %signal, "killpg failed: {e}"),
    }
}

/// PIDs (other than ours) whose environment contains `NAME=value` exactly.
pub fn pids_with_env(entry: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let needle = entry.as_bytes();
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|b| *b == 0).any(|var| var == needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Kills every process tagged with this attempt's marker, including ones that left the
/// attempt's process group (e.g. with `setsid`). Repeats until none is left, since killing a
/// parent can expose children.
pub async fn kill_marked(marker: &str) {
    let entry = format!("{}={marker}", super::ATTEMPT_MARKER);
    for _ in 0..20 {
        let pids = pids_with_env(&entry);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            tracing::info!(pid, marker, "killing a process the attempt left behind");
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::warn!(marker, "processes of the attempt are still alive after repeated SIGKILL (uninterruptible sleep?)");
}

/// At start-up: kills whatever a previous engine on the same data directory left running
/// (after a `kill -9` its children survive, and may hold GPUs).
pub async fn sweep_leftovers(engine_marker: &str) -> usize {
    let entry = format!("{}={engine_marker}", super::ENGINE_MARKER);
    let mut killed = 0;
    for _ in 0..20 {
        let pids = pids_with_env(&entry);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            killed += 1;
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    killed
}
