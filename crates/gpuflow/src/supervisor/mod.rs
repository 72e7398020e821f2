//! Child processes: spawn each attempt in its own process group, stop it (TERM, grace, KILL),
//! clean up whatever it left behind, and reap every child and orphan. One file per operation.
//!
//! The supervisor never decides anything: it runs what the runtime asks and reports back.

mod kill;
mod logs;
mod progress;
mod reap;
mod spawn;
mod worker;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde_json::Value;

pub use kill::{kill_group, kill_marked, sweep_leftovers};
pub use progress::{MESSAGE_MAX_CHARS, PROGRESS_POLL, Progress, ProgressTail};
pub use reap::{become_subreaper, spawn_reaper};
pub use spawn::run_attempt;
pub use worker::{InstanceEvent, InstanceSpec, InstanceStop, ToWorker, run_instance};

/// Environment variable that tags every process of one attempt, inherited by its descendants,
/// so leftovers can be found even when they escaped the process group.
pub const ATTEMPT_MARKER: &str = "GPUFLOW_ATTEMPT_MARKER";
/// Tags every process started by the engine that owns a data directory, so a restarted engine
/// can find what the previous one left running.
pub const ENGINE_MARKER: &str = "GPUFLOW_ENGINE_MARKER";

/// PIDs of children that tokio owns and will reap itself. The reaper must not steal their exit
/// status, so it only reaps children that are not in this set.
#[derive(Clone, Default)]
pub struct ChildRegistry {
    owned: Arc<Mutex<HashSet<i32>>>,
}

impl ChildRegistry {
    /// Spawns `command` and registers its PID while holding the registry, so the reaper
    /// never sees the PID unregistered.
    pub(crate) fn spawn(&self, command: &mut tokio::process::Command) -> std::io::Result<tokio::process::Child> {
        let mut owned = self.owned.lock().expect("registry lock");
        command.spawn().inspect(|child| {
            if let Some(pid) = child.id() {
                owned.insert(pid as i32);
            }
        })
    }

    /// Forgets a PID once tokio has reaped it.
    pub(crate) fn forget(&self, pid: i32) {
        self.owned.lock().expect("registry lock").remove(&pid);
    }
}

/// A supervised child: its argv (never through a shell), environment tagged with `marker`,
/// stdout and stderr piped, and its own process group, so a signal to the group reaches every
/// process it forks.
pub(crate) fn supervised_command(
    argv: &[String],
    env: &[(String, String)],
    marker: &str,
    cwd: Option<&std::path::Path>,
    stdin: std::process::Stdio,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env(ATTEMPT_MARKER, marker)
        .stdin(stdin)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    die_with_the_engine(&mut command);
    command
}

/// The process gets SIGKILL when the engine dies, `kill -9` included, so a dead agent's
/// stages cannot run on while the others re-run them. Linux sends it when the *thread* that
/// spawned the child exits: spawns happen on the runtime's worker threads, which live as long
/// as the engine. It covers the stage's own process; processes that stage starts are not
/// covered unless they `exec` in its place or are killed by it (a known limit).
fn die_with_the_engine(command: &mut tokio::process::Command) {
    #[cfg(target_os = "linux")]
    {
        let engine = std::process::id();
        // SAFETY: prctl, getppid and _exit are async-signal-safe, as pre_exec requires.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The engine died between fork and prctl: the signal will never come.
                if libc::getppid() as u32 != engine {
                    libc::_exit(137);
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

/// Why a program could not be started, in words a user can act on.
pub(crate) fn spawn_error(program: &str, e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => {
            format!("cannot start `{program}`: program not found (check `command` and PATH)")
        }
        std::io::ErrorKind::PermissionDenied => format!("cannot start `{program}`: permission denied"),
        _ => format!("cannot start `{program}`: {e}"),
    }
}

/// How a waited-for child ended.
pub(crate) fn exit_status(status: std::io::Result<std::process::ExitStatus>) -> ExitStatus {
    match status {
        Ok(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
            (Some(code), _) => ExitStatus::Code(code),
            (None, Some(sig)) => ExitStatus::Signal(sig),
            (None, None) => ExitStatus::Code(-1),
        },
        Err(e) => ExitStatus::SpawnFailed(format!("lost track of the process: {e}")),
    }
}

/// What to run for one attempt.
#[derive(Clone, Debug)]
pub struct AttemptSpec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    pub stdout_log: PathBuf,
    pub stderr_log: PathBuf,
    /// Where the stage writes its JSON output (`$GPUFLOW_OUTPUT`).
    pub output_path: PathBuf,
    pub marker: String,
    pub log_max: u64,
    pub output_max: u64,
    pub kill_grace_ms: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
    /// The program could not be started at all.
    SpawnFailed(String),
}

#[derive(Clone, Debug)]
pub struct AttemptReport {
    pub status: ExitStatus,
    /// The parsed `$GPUFLOW_OUTPUT`: `Ok(None)` when the stage wrote none.
    pub output: Result<Option<Value>, String>,
    /// The last lines of stderr, for error messages.
    pub stderr_tail: String,
}

/// Asks a running attempt to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopRequest;
