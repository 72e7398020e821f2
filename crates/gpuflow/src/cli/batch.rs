//! `gpuflow submit --from FILE.jsonl`: many jobs through `POST /v1/jobs/batch`.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{Client, s};
use crate::runtime::MAX_BATCH;

/// One non-empty line of the file: the job object, or why it is not one.
struct Line {
    number: usize,
    job: Result<Value, String>,
}

/// Reads the job objects of a JSON Lines file (`-`: stdin). Blank lines are skipped; a line
/// that is not a JSON object is kept as an error to report under its line number.
fn read_lines(file: &Path) -> Result<Vec<Line>> {
    let text = if file == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("reading jobs from stdin")?;
        text
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| Line {
            number: i + 1,
            job: match serde_json::from_str::<Value>(l) {
                Ok(v @ Value::Object(_)) => Ok(v),
                Ok(_) => Err("not a JSON object; write one {\"pipeline\": ..., \"input\": {...}} per line".into()),
                Err(e) => Err(format!("not JSON: {e}")),
            },
        })
        .collect();
    Ok(lines)
}

/// Submits every well-formed line, `MAX_BATCH` per request, and prints one line per job in
/// input order: `line N: ID STATE`, or `line N: error CODE: MESSAGE`. Exits 2 when any job
/// was refused or malformed, after saying how many on stderr.
pub async fn submit_from(client: &Client, file: &Path) -> Result<ExitCode> {
    let lines = read_lines(file)?;
    if lines.is_empty() {
        bail!("{}: no jobs in it; write one JSON object per line", file.display());
    }
    let sendable: Vec<usize> = (0..lines.len()).filter(|&i| lines[i].job.is_ok()).collect();
    let mut printed = 0;
    let mut refused = Vec::new();
    let mut accepted = 0usize;
    let print_malformed_before = |end: usize, printed: &mut usize, refused: &mut Vec<usize>| {
        while *printed < end {
            let line = &lines[*printed];
            if let Err(e) = &line.job {
                println!("line {}: error malformed: {e}", line.number);
                refused.push(line.number);
            }
            *printed += 1;
        }
    };
    for chunk in sendable.chunks(MAX_BATCH) {
        let jobs: Vec<Value> = chunk.iter().map(|&i| lines[i].job.clone().expect("sendable")).collect();
        let answer = match client.submit_batch(&jobs).await {
            Ok(answer) => answer,
            Err(e) => {
                let first = lines[chunk[0]].number;
                bail!(
                    "{e:#}\nlines {first} onward were not submitted{}; with idempotency keys it is safe to resubmit the whole file",
                    if accepted > 0 { format!(" ({accepted} jobs before them were)") } else { String::new() }
                );
            }
        };
        let entries = answer["jobs"].as_array().cloned().unwrap_or_default();
        if entries.len() != chunk.len() {
            bail!(
                "the engine answered {} entries for {} jobs; look the jobs up before resubmitting",
                entries.len(),
                chunk.len()
            );
        }
        for (&i, entry) in chunk.iter().zip(&entries) {
            print_malformed_before(i, &mut printed, &mut refused);
            let number = lines[i].number;
            if entry["error"].is_object() {
                println!("line {number}: error {}: {}", s(&entry["error"]["code"]), s(&entry["error"]["message"]));
                refused.push(number);
            } else {
                let earlier = if entry["created"] == Value::Bool(false) { " (earlier job with this key)" } else { "" };
                println!("line {number}: {} {}{earlier}", s(&entry["id"]), s(&entry["state"]));
                accepted += 1;
            }
            printed = i + 1;
        }
    }
    print_malformed_before(lines.len(), &mut printed, &mut refused);
    let jobs = |n: usize| if n == 1 { "1 job".to_string() } else { format!("{n} jobs") };
    if refused.is_empty() {
        eprintln!("submitted {}", jobs(accepted));
        return Ok(ExitCode::SUCCESS);
    }
    let shown: Vec<String> = refused.iter().take(20).map(usize::to_string).collect();
    let more = if refused.len() > 20 { ", ..." } else { "" };
    eprintln!(
        "{} of {} not submitted (lines {}{more}); submitted {}",
        refused.len(),
        jobs(lines.len()),
        shown.join(", "),
        jobs(accepted)
    );
    Ok(ExitCode::from(2))
}
