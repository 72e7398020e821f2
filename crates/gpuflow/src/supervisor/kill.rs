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

/// Every PID on the system other than ours.
fn all_pids() -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()).filter(|pid| *pid != me).collect()
}

/// Those of `pids` whose environment contains `NAME=value` exactly.
fn with_env(pids: Vec<i32>, entry: &str) -> Vec<i32> {
    let needle = entry.as_bytes();
    pids.into_iter()
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
///
/// As child subreaper, every orphan of an attempt is re-parented to us, so only our own
/// children need looking at (killing one re-parents its children to us for the next round).
/// Without the subreaper bit, all of /proc is scanned.
pub async fn kill_marked(marker: &str) {
    let entry = format!("{}={marker}", super::ATTEMPT_MARKER);
    for _ in 0..20 {
        let candidates = if super::reap::is_subreaper() { super::reap::children() } else { all_pids() };
        let pids = with_env(candidates, &entry);
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
        let pids = with_env(all_pids(), &entry);
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
