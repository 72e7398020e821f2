//! The engine as child subreaper: orphaned grandchildren are re-parented to us, and we reap
//! them. As PID 1 in a container the same loop does what an init does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};

use super::ChildRegistry;

/// Makes orphans of our descendants our children instead of init's, so none is left a zombie
/// and none escapes notice.
pub fn become_subreaper() -> nix::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)?;
    SUBREAPER.store(true, Ordering::Relaxed);
    Ok(())
}

static SUBREAPER: AtomicBool = AtomicBool::new(false);

pub(super) fn is_subreaper() -> bool {
    SUBREAPER.load(Ordering::Relaxed)
}

/// Our direct children, as the kernel lists them.
pub(super) fn children() -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return out };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(text.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    out
}

/// Reaps children that tokio does not own. Never `waitpid(-1)`: that would steal the exit
/// status of tokio's own children.
fn reap_orphans(registry: &ChildRegistry) {
    let owned = registry.owned.lock().expect("registry lock");
    for pid in children() {
        if owned.contains(&pid) {
            continue;
        }
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(status) => tracing::debug!(pid, ?status, "reaped an orphaned process"),
            Err(_) => {}
        }
    }
}

/// Reaps on every SIGCHLD, and once a second in case signals were coalesced.
pub fn spawn_reaper(registry: ChildRegistry) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut sigchld = signal(SignalKind::child())?;
    Ok(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = sigchld.recv() => {}
                _ = tick.tick() => {}
            }
            reap_orphans(&registry);
        }
    }))
}
