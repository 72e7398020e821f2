//! The command line: `serve` and `check` run locally; the rest are clients of the HTTP API.

mod batch;
mod client;
mod human;
mod ids;
mod logs;
mod submit;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde_json::Value;

pub use client::Client;

#[derive(Parser)]
#[command(name = "gpuflow", version, about = "Run AI inference pipelines on GPUs without stalling.")]
pub struct Cli {
    /// Engine address for client commands.
    #[arg(long, global = true, env = "GPUFLOW_SERVER", default_value = "http://127.0.0.1:7070")]
    pub server: String,
    /// Bearer token for client commands, when the engine has `auth` set.
    #[arg(long, global = true, env = "GPUFLOW_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The engine's log format on stderr: text (coloured only on a terminal) or json lines.
    ///
    /// `GPUFLOW_LOG` sets the level (default `info`).
    #[arg(long, global = true, env = "GPUFLOW_LOG_FORMAT", value_enum, ignore_case = true, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the engine.
    Serve {
        #[arg(long, short, env = "GPUFLOW_CONFIG", default_value = "gpuflow.yaml")]
        config: PathBuf,
    },
    /// Check a pipeline file and print what it declares.
    Check { file: PathBuf },
    /// Submit a job, or many with `--from FILE.jsonl`.
    Submit {
        /// The pipeline to run (not with --from).
        #[arg(required_unless_present = "from")]
        pipeline: Option<String>,
        /// `key=value` (a string) or `key:=JSON` (a number, list, object...). Repeatable.
        /// A relative path (`./clip.mp4`, or a name that exists here) is sent as an absolute
        /// one, resolved against the current directory.
        #[arg(long = "input", short = 'i')]
        inputs: Vec<String>,
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i32,
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Follow the job until it ends; the exit code reflects the outcome
        /// (0 succeeded, 1 failed, 3 cancelled).
        #[arg(long)]
        wait: bool,
        /// Submit the jobs of a JSON Lines file (`-` for stdin), one
        /// `{"pipeline", "input", "priority", "idempotency_key"}` object per line, in batches of
        /// 1,000. Prints one line per job in input order; exits 2 if any was refused.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["pipeline", "inputs", "priority", "idempotency_key", "wait"])]
        from: Option<PathBuf>,
    },
    /// Show a job and its stages.
    Status {
        /// The job: its id, its short id (the last 8 characters), or the first characters of its id.
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// List jobs, newest first.
    Jobs {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        pipeline: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job.
    Cancel {
        /// The job: its id, its short id, or the first characters of its id.
        id: String,
    },
    /// Submit a failed or cancelled job again, linked to it.
    ///
    /// The new job has the same pipeline, input and priority; `gpuflow status` shows
    /// `retry of` on it and `retried by` on the old one.
    Retry {
        /// The job: its id, its short id, or the first characters of its id.
        id: String,
        /// Follow the new job until it ends, as `submit --wait` does.
        #[arg(long)]
        wait: bool,
    },
    /// Print what a job's stages wrote to stdout and stderr.
    Logs {
        /// The job: its id, its short id, or the first characters of its id.
        id: String,
        /// Only this stage (default: every stage).
        stage: Option<String>,
        /// Which attempt (default: each stage's latest).
        #[arg(long)]
        attempt: Option<u32>,
        /// Which output.
        #[arg(long, value_enum, default_value_t = logs::Streams::Both)]
        stream: logs::Streams,
        /// Keep printing what is written until the job ends.
        #[arg(long, short)]
        follow: bool,
    },
    /// Print a shell completion script.
    ///
    /// For example `gpuflow completions bash > /etc/bash_completion.d/gpuflow`.
    Completions { shell: clap_complete::Shell },
    /// Show capacity, leases and the waiting queue.
    Resources {
        #[arg(long)]
        json: bool,
    },
    /// List the agents sharing a PostgreSQL queue: state, last heartbeat, leases, resources.
    Agents {
        #[arg(long)]
        json: bool,
    },
    /// Re-read the engine's pipeline file (as SIGHUP does).
    Reload,
    /// What is wrong now, with evidence, likely cause and fix.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// Remove finished jobs past their `retention` now (rows and directories), as the engine
    /// does in the background; with --dry-run, only list them.
    Gc {
        #[arg(long, short, env = "GPUFLOW_CONFIG", default_value = "gpuflow.yaml")]
        config: PathBuf,
        /// List what would be removed, and remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the OpenAPI document.
    Openapi,
}

/// Parses `key=value` / `key:=json` pairs into a JSON object. A `key=value` whose value is a
/// relative path (`./x`, `../x`, or a name that exists in `cwd`) becomes an absolute one:
/// the engine resolves paths against its own directory, not the caller's, so it refuses them.
pub fn parse_inputs(pairs: &[String], cwd: &std::path::Path) -> Result<Value> {
    let mut map = serde_json::Map::new();
    for pair in pairs {
        if pair.starts_with('=') || pair.starts_with(":=") {
            anyhow::bail!("--input {pair}: the key is empty; write `key=value` or `key:=JSON`");
        }
        // `:=` before `=`: in `k:=v` the first `=` is part of `:=`.
        let json = pair.find(":=").filter(|&i| pair.find('=').is_some_and(|first| first == i + 1));
        if let Some(i) = json {
            let (k, v) = (&pair[..i], &pair[i + 2..]);
            let value = serde_json::from_str(v).with_context(|| {
                format!("--input {pair}: `{v}` is not JSON; write key=value for a string, or quote it: {k}:='\"{v}\"'")
            })?;
            map.insert(k.to_string(), value);
        } else if let Some((k, v)) = pair.split_once('=') {
            map.insert(k.to_string(), Value::String(absolute_if_relative_path(v, cwd)));
        } else {
            anyhow::bail!("--input {pair}: write `key=value` (a string) or `key:=JSON` (a number, list, object...)");
        }
    }
    Ok(Value::Object(map))
}

fn absolute_if_relative_path(value: &str, cwd: &std::path::Path) -> String {
    let path = std::path::Path::new(value);
    let explicit = value.starts_with("./") || value.starts_with("../") || value == "." || value == "..";
    if value.is_empty() || path.is_absolute() || !(explicit || cwd.join(path).exists()) {
        return value.to_string();
    }
    // Lexically, as the engine compares paths with `allowed_roots` after resolving them itself.
    let mut out = cwd.to_path_buf();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(p) => out.push(p),
            _ => {}
        }
    }
    out.display().to_string()
}

/// A refused submission, with a hint when a `key=value` string went where the pipeline wants
/// a number, boolean, list or object.
fn with_input_hint(error: anyhow::Error, pairs: &[String]) -> anyhow::Error {
    let text = format!("{error:#}");
    let typed = ["number", "integer", "boolean", "array", "object"];
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else { continue };
        if key.ends_with(':') || !text.contains(&format!("input.{key}:")) || !typed.iter().any(|t| text.contains(t)) {
            continue;
        }
        return anyhow::anyhow!(
            "{text}\nhint: `-i {key}={value}` sends the string \"{value}\"; write `-i {key}:={value}` to send it as JSON (a number, boolean, list or object)"
        );
    }
    error
}

pub async fn run(cli: Cli) -> Result<ExitCode> {
    let client = || Client::new(&cli.server, cli.token.clone());
    match cli.command {
        Command::Serve { config } => {
            let config =
                crate::config::Config::load(&config, &crate::gpu::NvmlProbe).map_err(|e| anyhow::anyhow!("{e}"))?;
            crate::serve::serve(config).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { file } => check(&file),
        Command::Submit { from: Some(file), .. } => batch::submit_from(&client()?, &file).await,
        Command::Submit { pipeline, inputs, priority, idempotency_key, wait, from: None } => {
            let pipeline = pipeline.context("name a pipeline, or pass --from FILE.jsonl")?;
            let cwd = std::env::current_dir().context("reading the current directory")?;
            let input = parse_inputs(&inputs, &cwd)?;
            let client = client()?;
            // Opened before submitting, so no event about the job can be missed.
            let feed = if wait { client.events().await.ok() } else { None };
            let submitted = client
                .submit(&pipeline, input, priority, idempotency_key.as_deref())
                .await
                .map_err(|e| with_input_hint(e, &inputs))?;
            let id = s(&submitted["id"]);
            if !wait {
                println!("{id}");
                return Ok(ExitCode::SUCCESS);
            }
            submit::line(&format!("submitted {id}"));
            submit::follow(&client, &id, feed).await
        }
        Command::Status { id, json } => {
            let client = client()?;
            let id = ids::resolve(&client, &id).await?;
            let job = client.job(&id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&job)?);
            } else {
                submit::print_job(&job);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Jobs { state, pipeline, limit, json } => {
            let list = client()?.jobs(state.as_deref(), pipeline.as_deref(), limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                submit::print_jobs(&list);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cancel { id } => {
            let client = client()?;
            let id = ids::resolve(&client, &id).await?;
            let r = client.cancel(&id).await?;
            println!("{} {}", s(&r["id"]), s(&r["state"]));
            Ok(ExitCode::SUCCESS)
        }
        Command::Retry { id, wait } => {
            let client = client()?;
            let id = ids::resolve(&client, &id).await?;
            let feed = if wait { client.events().await.ok() } else { None };
            let r = client.retry(&id).await?;
            let new = s(&r["id"]);
            if !wait {
                println!("{new}");
                return Ok(ExitCode::SUCCESS);
            }
            submit::line(&format!("submitted {new} to retry {id}"));
            submit::follow(&client, &new, feed).await
        }
        Command::Logs { id, stage, attempt, stream, follow } => {
            let client = client()?;
            let id = ids::resolve(&client, &id).await?;
            logs::logs(&client, &id, stage.as_deref(), attempt, stream, follow).await
        }
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "gpuflow", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Resources { json } => {
            let r = client()?.resources().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                submit::print_resources(&r);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Agents { json } => {
            let r = client()?.agents().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                submit::print_agents(&r);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Doctor { json } => {
            let d = client()?.diagnosis().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                submit::print_diagnosis(&d);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload => {
            let r = client()?.reload().await?;
            let applied = r["applied"].as_array().cloned().unwrap_or_default();
            if applied.is_empty() {
                println!("reloaded: nothing changed");
            }
            for change in applied {
                println!("applied: {}", s(&change));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Gc { config, dry_run } => gc(&config, dry_run).await,
        Command::Openapi => {
            println!("{}", crate::api::openapi_json());
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn gc(file: &std::path::Path, dry_run: bool) -> Result<ExitCode> {
    use crate::config::StoreSetting;
    let config = crate::config::Config::load(file, &crate::gpu::NvmlProbe).map_err(|e| anyhow::anyhow!("{e}"))?;
    let retention = &config.retention;
    if retention.expiring().is_empty() {
        println!("{}: `retention` keeps every finished job; nothing to remove", file.display());
        return Ok(ExitCode::SUCCESS);
    }
    let data_dir = std::path::absolute(&config.data_dir).unwrap_or_else(|_| config.data_dir.clone());
    let setting = match std::env::var("GPUFLOW_STORE") {
        Ok(v) if !v.trim().is_empty() => StoreSetting::parse(&v).map_err(|e| anyhow::anyhow!("GPUFLOW_STORE: {e}"))?,
        _ => config.store.clone(),
    };
    match setting {
        StoreSetting::Sqlite => {
            let db = data_dir.join("gpuflow.db");
            anyhow::ensure!(db.exists(), "no store at {}: check `data_dir` in {}", db.display(), file.display());
            let store = crate::store::SqliteStore::open(&db).await?;
            crate::retention::gc(&store, retention, &data_dir, dry_run).await?;
        }
        StoreSetting::Postgres(url) => {
            let store = crate::store::PgStore::connect(&url, &format!("gc-{}", uuid::Uuid::now_v7())).await?;
            crate::retention::gc(&store, retention, &data_dir, dry_run).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn check(file: &std::path::Path) -> Result<ExitCode> {
    match crate::config::Config::load(file, &crate::gpu::NvmlProbe) {
        Ok(config) => {
            println!("{}: ok", file.display());
            for warning in &config.warnings {
                eprintln!("warning: {warning}");
            }
            println!("  listen {}  data_dir {}", config.listen, config.data_dir.display());
            for (i, g) in config.gpus.iter().enumerate() {
                println!("  gpu {i}: {} {} ({:?})", g.name, human::bytes(g.memory), g.source);
            }
            println!("  cpu slots: {}", config.capacity.cpu);
            for (name, p) in &config.pipelines {
                let stages: Vec<&str> = p.core.stages.iter().map(|s| s.name.as_str()).collect();
                println!("  pipeline {name}: {}", stages.join(" -> "));
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            eprintln!("{errors}");
            Ok(ExitCode::FAILURE)
        }
    }
}

pub(crate) fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}
