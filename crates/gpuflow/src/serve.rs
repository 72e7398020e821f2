//! `gpuflow serve`: wires the store, the supervisor, the runtime loop and the API together.

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::api::{self, AppState};
use crate::config::StoreSetting;
use crate::config::{Config, SharedConfig};
use crate::runtime::Runtime;
use crate::store::{PgStore, SqliteStore, Store};
use crate::supervisor::{self, ChildRegistry};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("another gpuflow engine is using {0}; stop it first, or give this one another `data_dir`")]
    Locked(PathBuf),
    #[error("cannot listen on {addr}: {source} (change `listen` in the pipeline file)")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("GPUFLOW_STORE: {0}")]
    Setting(String),
    #[error("runtime: {0}")]
    Runtime(#[from] crate::runtime::RuntimeError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Holds an exclusive lock on the data directory for the engine's lifetime: two engines on
/// one SQLite file would each think they own every lease.
struct DataDirLock(#[allow(dead_code)] std::fs::File);

fn lock_data_dir(dir: &Path) -> Result<DataDirLock, ServeError> {
    let path = dir.join("engine.lock");
    let mut file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
    // After a `kill -9` the lock can outlive the engine by a moment: a child forked just before
    // the kill holds a copy of the descriptor until it execs (or dies). Wait that out briefly;
    // a live engine still holding it after that is a real conflict.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        if std::time::Instant::now() >= deadline {
            return Err(ServeError::Locked(dir.to_path_buf()));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    file.set_len(0)?;
    writeln!(file, "{}", std::process::id())?;
    Ok(DataDirLock(file))
}

pub async fn serve(config: Config) -> Result<(), ServeError> {
    let config = Arc::new(config);
    let data_dir = &config.data_dir;
    std::fs::create_dir_all(data_dir).map_err(|source| ServeError::DataDir { path: data_dir.clone(), source })?;
    let _lock = lock_data_dir(data_dir)?;

    if let Err(e) = supervisor::become_subreaper() {
        tracing::warn!("cannot become child subreaper ({e}); orphaned grandchildren will be reaped by init instead");
    }
    let registry = ChildRegistry::default();
    let _reaper = supervisor::spawn_reaper(registry.clone())?;

    let addr_file = data_dir.join("listen.addr");
    let _ = std::fs::remove_file(&addr_file);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Listen { addr: config.listen, source })?;
    let bound = listener.local_addr()?;
    if !bound.ip().is_loopback() && config.auth_token.is_none() {
        tracing::warn!(%bound, "listening beyond loopback WITHOUT auth: anyone who can reach this port can run jobs; set `auth.token`");
    }
    std::fs::write(&addr_file, bound.to_string())?;
    let devices: Vec<String> = config.gpus.iter().map(|g| format!("{} ({:?})", g.name, g.source)).collect();
    tracing::info!(
        "gpuflow listening on http://{bound}; data in {}; GPUs: [{}]; CPU slots: {}",
        data_dir.display(),
        devices.join(", "),
        config.capacity.cpu
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
        }
        let _ = stop_tx.send(true);
    });
    let parts = Parts { config, registry, listener, bound, stop_rx };
    // `GPUFLOW_STORE` overrides `store:`, so one file can serve both a laptop and a cluster.
    let setting = match std::env::var("GPUFLOW_STORE") {
        Ok(v) if !v.trim().is_empty() => StoreSetting::parse(&v).map_err(ServeError::Setting)?,
        _ => parts.config.store.clone(),
    };
    match setting {
        StoreSetting::Sqlite => {
            let store = SqliteStore::open(&parts.config.data_dir.join("gpuflow.db")).await?;
            run_engine(parts, store, |runtime| runtime).await
        }
        StoreSetting::Postgres(url) => {
            let agent = uuid::Uuid::now_v7().to_string();
            let store = PgStore::connect(&url, &agent).await?;
            let settings = parts.config.cluster.clone();
            let data_dir = std::fs::canonicalize(&parts.config.data_dir).unwrap_or(parts.config.data_dir.clone());
            let name = settings.name.clone().unwrap_or_else(|| format!("{}:{}", hostname(), data_dir.display()));
            tracing::info!(%name, agent = %agent, "agent mode: sharing the queue in PostgreSQL");
            let agent_store = store.clone();
            run_engine(parts, store, move |runtime| runtime.with_cluster(agent_store, settings, name)).await
        }
    }
}

/// What `serve` prepared before it knew which store to open.
struct Parts {
    config: Arc<Config>,
    registry: ChildRegistry,
    listener: tokio::net::TcpListener,
    bound: SocketAddr,
    stop_rx: watch::Receiver<bool>,
}

async fn run_engine<S: Store + crate::store::JobLinks>(
    parts: Parts,
    store: S,
    setup: impl FnOnce(Runtime<S>) -> Runtime<S>,
) -> Result<(), ServeError> {
    let Parts { config, registry, listener, bound, stop_rx } = parts;
    let wait_stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let shared = SharedConfig::new(config.clone());
    let (runtime, engine) = Runtime::new(shared.clone(), store.clone(), registry);
    let runtime = setup(runtime.with_api_address(format!("http://{bound}")));

    // SIGHUP re-reads the pipeline file, like `gpuflow reload`.
    let mut sighup = signal(SignalKind::hangup())?;
    let reloader = engine.clone();
    tokio::spawn(async move {
        while sighup.recv().await.is_some() {
            match reloader.reload().await {
                Ok(applied) => tracing::info!(?applied, "SIGHUP: configuration reloaded"),
                Err(e) => tracing::error!("SIGHUP: {e}"),
            }
        }
    });
    tokio::spawn(crate::retention::run(store.clone(), shared.clone(), stop_rx.clone()));
    let app = api::router(AppState { engine, reads: Arc::new(store), config: shared.clone() });
    let server = tokio::spawn(api::listener::serve(listener, app, shared, stop_rx.clone()));
    let result = runtime.run(wait_stop(stop_rx)).await;
    server.abort();
    result?;
    tracing::info!("stopped");
    Ok(())
}

/// This machine's name, for naming agents.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}
