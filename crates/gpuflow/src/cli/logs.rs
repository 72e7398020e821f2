//! `gpuflow logs JOB [STAGE] [--attempt N] [--stream S] [--follow]`: a stage attempt's stdout
//! and stderr, from `GET /v1/jobs/{id}/stages/{stage}/log`.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use serde_json::Value;

use super::{Client, s};

/// The most the engine returns per request (`tail_bytes`).
const TAIL_MAX: u64 = 256 * 1024;
/// How often `--follow` reads the logs again.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Streams {
    Stdout,
    Stderr,
    Both,
}

impl Streams {
    fn names(self) -> &'static [&'static str] {
        match self {
            Streams::Stdout => &["stdout"],
            Streams::Stderr => &["stderr"],
            Streams::Both => &["stdout", "stderr"],
        }
    }
}

/// One log being shown: a stage's stream, the attempt it is from, and how far it was printed.
struct Shown {
    stage: String,
    stream: &'static str,
    attempt: u32,
    printed_to: u64,
    /// How much it grew between the last two reads: the next read asks for twice that.
    growth: u64,
    /// Whether the engine's note on this attempt (a worker stage's log is elsewhere) was shown.
    noted: bool,
}

pub async fn logs(
    client: &Client,
    id: &str,
    stage: Option<&str>,
    attempt: Option<u32>,
    streams: Streams,
    follow: bool,
) -> Result<ExitCode> {
    let job = client.job(id).await?;
    let stages: Vec<&Value> = job["stages"].as_array().into_iter().flatten().collect();
    let names: Vec<String> = match stage {
        Some(name) => {
            if !stages.iter().any(|st| st["name"] == name) {
                let known: Vec<String> = stages.iter().map(|st| s(&st["name"])).collect();
                bail!("stage: job {id} has no stage `{name}`; its stages: {}", known.join(", "));
            }
            vec![name.to_string()]
        }
        None => stages.iter().map(|st| s(&st["name"])).collect(),
    };
    let mut shown: Vec<Shown> = names
        .iter()
        .flat_map(|name| {
            streams.names().iter().map(|stream| Shown {
                stage: name.clone(),
                stream,
                attempt: 0,
                printed_to: 0,
                growth: 0,
                noted: false,
            })
        })
        .collect();
    // Headers, as `tail` prints them, when more than one log is shown.
    let headers = shown.len() > 1;
    let mut last_header: Option<(String, &str, u32)> = None;
    let mut job = job;
    loop {
        let finished = matches!(s(&job["state"]).as_str(), "succeeded" | "failed" | "cancelled");
        for log in &mut shown {
            let latest = job["stages"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|st| st["name"] == log.stage.as_str())
                .and_then(|st| st["attempts"].as_u64())
                .unwrap_or(0) as u32;
            let wanted = attempt.unwrap_or(latest);
            if wanted == 0 {
                continue;
            }
            if wanted != log.attempt {
                log.attempt = wanted;
                log.printed_to = 0;
                log.noted = false;
            }
            // The first read takes the most the engine gives; later ones what is likely new.
            let tail = if log.printed_to == 0 { TAIL_MAX } else { TAIL_MAX.min((2 * log.growth).max(64 * 1024)) };
            let view = client.log(id, &log.stage, log.stream, Some(log.attempt), tail).await?;
            if let Some(note) = view["note"].as_str() {
                // Said once per stage, not once per stream or per read; among several logs,
                // an empty one goes unmentioned.
                let empty = note.starts_with("the attempt wrote nothing");
                if !log.noted && log.stream == streams.names()[0] && !(headers && empty) {
                    eprintln!("{} attempt {}: {note}", log.stage, log.attempt);
                }
                log.noted = true;
                continue;
            }
            let size = view["size_bytes"].as_u64().unwrap_or(0);
            let text = view["text"].as_str().unwrap_or_default().as_bytes();
            if size < log.printed_to {
                // Shorter than what was printed: a new file; start over.
                log.printed_to = 0;
            }
            if size == log.printed_to {
                continue;
            }
            let starts_at = size.saturating_sub(text.len() as u64);
            let mut out = std::io::stdout().lock();
            let this = (log.stage.clone(), log.stream, log.attempt);
            if headers && last_header.as_ref() != Some(&this) {
                writeln!(
                    out,
                    "{}==> {} attempt {} {} <==",
                    if last_header.is_some() { "\n" } else { "" },
                    this.0,
                    this.2,
                    this.1
                )?;
                last_header = Some(this);
            }
            let new = if log.printed_to >= starts_at {
                &text[((log.printed_to - starts_at) as usize).min(text.len())..]
            } else {
                let skipped = starts_at - log.printed_to;
                if log.printed_to > 0 || view["truncated"] == Value::Bool(true) {
                    writeln!(out, "[... {} not shown ...]", super::human::bytes(skipped))?;
                }
                text
            };
            out.write_all(new)?;
            out.flush()?;
            log.growth = size - log.printed_to;
            log.printed_to = size;
        }
        if !follow || finished {
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
        job = client.job(id).await?;
    }
}
