//! Following a job: on a terminal, a group of bars per job (a line naming the job, then a bar
//! per stage with its fraction and message); otherwise plain lines, each starting with the
//! job's short id, so several `submit --wait` in one log can be told apart. The job is read
//! again when the event feed says something about it, not on a timer.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;
use futures_util::{FutureExt, StreamExt};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::Value;

use super::client::EventFeed;
use super::human::{bytes, duration_ms, holds, needs, print_table, short_id, table};
use super::{Client, s};

/// Without the event feed (an engine that refuses it), how often the job is read.
const POLL: Duration = Duration::from_millis(250);
/// With the feed, the job is still read this often, for what no event announces.
const REFRESH: Duration = Duration::from_secs(5);
/// Plain lines: a stage's progress is printed at most this often (state changes always are).
const PLAIN_PROGRESS_GAP: Duration = Duration::from_secs(1);
/// Bar resolution: a fraction is shown in thousandths.
const BAR_LEN: u64 = 1000;

/// What a stage shows now.
#[derive(Clone, Debug, Default, PartialEq)]
struct StageLine {
    /// Its state in words (`running (attempt 1)`, `failed (attempt 2): ...`).
    state: String,
    /// Its running attempt's latest progress.
    fraction: Option<f64>,
    message: Option<String>,
}

impl StageLine {
    fn of(stage: &Value) -> StageLine {
        let state = s(&stage["state"]);
        let text = match state.as_str() {
            "failed" | "backoff" => format!("{state} (attempt {}): {}", stage["attempts"], s(&stage["error"])),
            "running" => format!("running (attempt {})", stage["attempts"]),
            // What it waits for, as the engine words it (e.g. a crash-looping pool).
            "queued" => match stage["waiting_for"]["sentence"].as_str() {
                Some(why) => format!("queued: {why}"),
                None => state.clone(),
            },
            _ => state.clone(),
        };
        let progress = &stage["progress"];
        StageLine {
            state: text,
            fraction: progress["fraction"].as_f64().map(|f| f.clamp(0.0, 1.0)),
            message: progress["message"].as_str().map(str::to_string),
        }
    }

    /// `40% frame 10/25`, or empty without progress.
    fn progress_text(&self) -> String {
        let pct = self.fraction.map(|f| format!("{:.0}%", f * 100.0));
        [pct, self.message.clone()].into_iter().flatten().collect::<Vec<_>>().join(" ")
    }
}

/// One stage on a terminal: a bar while it reports a fraction, a spinner otherwise.
struct Bar {
    bar: ProgressBar,
    with_fraction: bool,
}

/// One stage as plain lines: what was printed last, and when.
struct Plain {
    printed: StageLine,
    at: Instant,
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {prefix:<24} {msg} [{elapsed}]").expect("valid template")
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("  {prefix:<24} [{bar:30}] {percent:>3}% {msg} [{elapsed}]")
        .expect("valid template")
        .progress_chars("=> ")
}

/// Follows job `id` until it ends, reading it again on each event about it. `feed` is the
/// event feed opened before the job was submitted, so no event about it was missed; without
/// one the job is polled.
pub async fn follow(client: &Client, id: &str, mut feed: Option<EventFeed>) -> Result<ExitCode> {
    let tty = std::io::stderr().is_terminal();
    let short = short_id(id).to_string();
    let bars = MultiProgress::new();
    let mut header: Option<ProgressBar> = None;
    let mut shown: HashMap<String, Bar> = HashMap::new();
    let mut plain: HashMap<String, Plain> = HashMap::new();
    loop {
        let job = client.job(id).await?;
        let state = s(&job["state"]);
        let done = matches!(state.as_str(), "succeeded" | "failed" | "cancelled");
        if tty {
            // The group's first line names the job; its stages are indented under it.
            let header = header.get_or_insert_with(|| {
                let bar = bars.add(ProgressBar::new_spinner());
                bar.set_style(spinner_style());
                bar.set_prefix(format!("{short} {}", s(&job["pipeline"])));
                bar.enable_steady_tick(Duration::from_millis(120));
                bar
            });
            header.set_message(state.clone());
        }
        for stage in job["stages"].as_array().into_iter().flatten() {
            let name = s(&stage["name"]);
            let line = StageLine::of(stage);
            let ended = matches!(s(&stage["state"]).as_str(), "succeeded" | "failed" | "cancelled");
            if tty {
                let entry = shown.entry(name.clone()).or_insert_with(|| {
                    let bar = bars.add(ProgressBar::new(BAR_LEN));
                    bar.set_style(spinner_style());
                    bar.set_prefix(format!("  {name}"));
                    bar.enable_steady_tick(Duration::from_millis(120));
                    Bar { bar, with_fraction: false }
                });
                show_bar(entry, &line, s(&stage["state"]) == "succeeded", ended);
            } else {
                print_plain(&mut plain, &short, &name, line);
            }
        }
        if done {
            for entry in shown.values() {
                entry.bar.finish();
            }
            if let Some(header) = &header {
                header.finish();
            }
            line(&format!("job {id} {state}"));
            if let Some(e) = job["error"].as_str() {
                eprintln!("error: {e}");
            }
            if !job["output"].is_null() {
                println!("{}", serde_json::to_string_pretty(&job["output"])?);
            }
            return Ok(match state.as_str() {
                "succeeded" => ExitCode::SUCCESS,
                "cancelled" => ExitCode::from(3),
                _ => ExitCode::FAILURE,
            });
        }
        next_change(client, &mut feed, id).await;
    }
}

/// Waits until the feed has an event about job `id` (or a `resync`, or a lease returned,
/// which may let its stages start), then takes every event already there too, so a burst
/// of progress costs one read of the job. A broken feed is opened again; without one, this
/// is a short sleep.
async fn next_change(client: &Client, feed: &mut Option<EventFeed>, id: &str) {
    let Some(events) = feed else {
        tokio::time::sleep(POLL).await;
        return;
    };
    let relevant = |kind: &str, data: &Value| data["job"] == id || kind == "resync" || kind == "lease";
    let deadline = tokio::time::sleep(REFRESH);
    tokio::pin!(deadline);
    let broken = loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(e)) if relevant(&e.kind, &e.data) => break false,
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => break true,
            },
            () = &mut deadline => return,
        }
    };
    if broken {
        // Whatever happened while it was down is read with the job next.
        *feed = client.events().await.ok();
        return;
    }
    while let Some(Some(Ok(_))) = events.next().now_or_never() {}
}

fn show_bar(entry: &mut Bar, line: &StageLine, succeeded: bool, ended: bool) {
    if entry.bar.is_finished() {
        return;
    }
    // A stage that reports a fraction gets a bar; it keeps it once it has one.
    if line.fraction.is_some() && !entry.with_fraction {
        entry.with_fraction = true;
        entry.bar.set_style(bar_style());
    }
    if let Some(f) = line.fraction {
        entry.bar.set_position((f * BAR_LEN as f64).round() as u64);
    }
    if succeeded && entry.with_fraction {
        entry.bar.set_position(BAR_LEN);
    }
    let progress = line.progress_text();
    let message = match (&line.message, entry.with_fraction) {
        // The bar shows the percentage; the text adds the message.
        (Some(m), true) => format!("{} {m}", line.state),
        (_, true) => line.state.clone(),
        (_, false) if progress.is_empty() => line.state.clone(),
        (_, false) => format!("{} {progress}", line.state),
    };
    entry.bar.set_message(message);
    if ended {
        entry.bar.finish();
    }
}

/// A line when the stage's state changed; for progress alone, at most one per
/// `PLAIN_PROGRESS_GAP`. Each line starts with the job's short id.
fn print_plain(plain: &mut HashMap<String, Plain>, short: &str, name: &str, line: StageLine) {
    let now = Instant::now();
    let due = match plain.get(name) {
        None => true,
        Some(p) if p.printed.state != line.state => true,
        Some(p) if p.printed == line => false,
        Some(p) => now.duration_since(p.at) >= PLAIN_PROGRESS_GAP,
    };
    if !due {
        return;
    }
    let progress = line.progress_text();
    if progress.is_empty() {
        self::line(&format!("{short} {name}: {}", line.state));
    } else {
        self::line(&format!("{short} {name}: {} {progress}", line.state));
    }
    plain.insert(name.to_string(), Plain { printed: line, at: now });
}

/// One line to stderr in one write, so lines of several `submit --wait` sharing a terminal or
/// a log do not interleave mid-line (`eprintln!` may write a line in pieces).
pub fn line(text: &str) {
    let _ = std::io::stderr().lock().write_all(format!("{text}\n").as_bytes());
}

pub fn print_job(job: &Value) {
    println!("job {}  pipeline {}  state {}", s(&job["id"]), s(&job["pipeline"]), s(&job["state"]));
    if let Some(of) = job["retry_of"].as_str() {
        println!("retry of {of}");
    }
    let retried_by: Vec<String> = job["retried_by"].as_array().into_iter().flatten().map(s).collect();
    if !retried_by.is_empty() {
        println!("retried by {}", retried_by.join(", "));
    }
    if let Some(e) = job["error"].as_str() {
        println!("error: {e}");
    }
    let mut table = table(&["STAGE", "STATE", "ATTEMPTS", "FINISHED", "ERROR"], &[2]);
    for st in job["stages"].as_array().into_iter().flatten() {
        table.add_row([s(&st["name"]), s(&st["state"]), s(&st["attempts"]), s(&st["finished_at"]), s(&st["error"])]);
    }
    print_table(&table);
    if !job["output"].is_null() {
        println!("output: {}", job["output"]);
    }
}

/// `gpuflow jobs`: one row per job, with the short id the dashboard shows.
pub fn print_jobs(list: &Value) {
    let mut table = table(&["ID", "PIPELINE", "STATE", "CREATED", "ERROR"], &[]);
    for j in list["jobs"].as_array().into_iter().flatten() {
        table.add_row([
            short_id(&s(&j["id"])).to_string(),
            s(&j["pipeline"]),
            s(&j["state"]),
            s(&j["created_at"]),
            j["error"].as_str().unwrap_or_default().to_string(),
        ]);
    }
    print_table(&table);
}

/// One line per agent, its state in brackets.
pub fn print_agents(r: &Value) {
    for a in r["agents"].as_array().into_iter().flatten() {
        let res = &a["resources"];
        let gpus = res["gpus"].as_array().map(|g| g.len()).unwrap_or(0);
        println!(
            "{} {} [{}] heartbeat {} ago, {} leases, {}, {} of {} CPU used, api {}",
            s(&a["name"]),
            s(&a["id"]),
            s(&a["state"]),
            duration_ms(a["heartbeat_age_ms"].as_u64().unwrap_or(0)),
            s(&a["leases"]),
            if gpus == 1 { "1 GPU".to_string() } else { format!("{gpus} GPUs") },
            s(&res["cpu_used"]),
            s(&res["cpu"]),
            s(&a["api"]),
        );
    }
}

pub fn print_resources(r: &Value) {
    let mut gpus = table(&["GPU", "NAME", "SOURCE", "MEMORY", "LEASED", "FOREIGN", ""], &[0, 3, 4, 5]);
    for g in r["gpus"].as_array().into_iter().flatten() {
        let size = |key: &str| bytes(g[key].as_u64().unwrap_or(0));
        gpus.add_row([
            s(&g["index"]),
            s(&g["name"]),
            s(&g["source"]),
            size("memory_bytes"),
            size("memory_leased_bytes"),
            size("memory_foreign_bytes"),
            if g["exclusive"] == Value::Bool(true) { "whole device leased".into() } else { String::new() },
        ]);
    }
    print_table(&gpus);
    println!("cpu: {} of {} slots leased", s(&r["cpu"]["leased"]), s(&r["cpu"]["capacity"]));
    for (name, c) in r["counters"].as_object().into_iter().flatten() {
        println!("{name}: {} of {} leased", s(&c["leased"]), s(&c["capacity"]));
    }
    let leases = r["leases"].as_array().cloned().unwrap_or_default();
    println!();
    if leases.is_empty() {
        println!("leases: none");
    } else {
        println!("leases:");
        let mut table =
            table(&["JOB", "STAGE", "PIPELINE", "ATTEMPT", "PID", "HOLDS", "HELD FOR", "STOPPING"], &[3, 4]);
        for l in &leases {
            table.add_row([
                short_id(&s(&l["job"])).to_string(),
                s(&l["stage"]),
                s(&l["pipeline"]),
                s(&l["attempt"]),
                s(&l["pid"]),
                holds(l),
                duration_ms(l["held_ms"].as_u64().unwrap_or(0)),
                l["stopping"].as_str().unwrap_or_default().to_string(),
            ]);
        }
        print_table(&table);
    }
    for p in r["pools"].as_array().into_iter().flatten() {
        println!();
        println!("pool {}:", s(&p["name"]));
        let mut table = table(&["#", "STATE", "PID", "TASK", "DONE", "RESTARTS", "LAST ERROR"], &[0, 4, 5]);
        for i in p["instances"].as_array().into_iter().flatten() {
            table.add_row([
                s(&i["index"]),
                s(&i["state"]),
                s(&i["pid"]),
                s(&i["task"]),
                s(&i["tasks_done"]),
                s(&i["restarts"]),
                i["last_error"].as_str().unwrap_or_default().to_string(),
            ]);
        }
        print_table(&table);
    }
    let waiting = r["waiting"].as_array().cloned().unwrap_or_default();
    println!();
    if waiting.is_empty() {
        println!("waiting: none");
    } else {
        println!("waiting, in the order they will be served:");
        let mut table = table(&["JOB", "STAGE", "PIPELINE", "PRIORITY", "WAITED", "NEEDS"], &[3]);
        for w in &waiting {
            table.add_row([
                short_id(&s(&w["job"])).to_string(),
                s(&w["stage"]),
                s(&w["pipeline"]),
                s(&w["priority"]),
                duration_ms(w["waited_ms"].as_u64().unwrap_or(0)),
                needs(&w["needs"]),
            ]);
        }
        print_table(&table);
    }
}

pub fn print_diagnosis(d: &Value) {
    let open = d["open"].as_array().cloned().unwrap_or_default();
    for g in d["gpus"].as_array().into_iter().flatten() {
        let reading = if g["telemetry"] == Value::Bool(true) {
            format!(
                "{} % busy, {} of {} used, {} process(es)",
                s(&g["utilization_pct"]),
                bytes(g["memory_used_bytes"].as_u64().unwrap_or(0)),
                bytes(g["memory_bytes"].as_u64().unwrap_or(0)),
                g["processes"].as_array().map(|p| p.len()).unwrap_or(0)
            )
        } else {
            "no telemetry (virtual device)".to_string()
        };
        println!("gpu {} {} [{}]: {reading}", s(&g["index"]), s(&g["name"]), s(&g["source"]));
    }
    if open.is_empty() {
        println!("No problems found.");
    } else {
        println!("{} problem(s):", open.len());
    }
    for f in &open {
        println!();
        println!("[{}] {}", s(&f["kind"]), s(&f["summary"]));
        println!("  since {}", s(&f["opened_at"]));
        for e in f["evidence"].as_array().into_iter().flatten() {
            println!("  {}: {}", s(&e["label"]), s(&e["value"]));
        }
        println!("  likely cause: {}", s(&f["cause"]));
        println!("  fix: {}", s(&f["fix"]));
    }
    let recent = d["recent"].as_array().cloned().unwrap_or_default();
    if !recent.is_empty() {
        println!();
        println!("recently cleared:");
        for f in recent.iter().take(5) {
            println!("  {} .. {} [{}] {}", s(&f["opened_at"]), s(&f["closed_at"]), s(&f["kind"]), s(&f["summary"]));
        }
    }
}
