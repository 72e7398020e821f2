//! Following a job: a progress bar per stage on a terminal (its fraction and message), and
//! plain lines otherwise, each naming the job, so several `submit --wait` in one log can be
//! told apart.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::Value;

use super::{Client, s};

/// How often the job is read.
const POLL: Duration = Duration::from_millis(250);
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

pub async fn follow(client: &Client, id: &str) -> Result<ExitCode> {
    let tty = std::io::stderr().is_terminal();
    let bars = MultiProgress::new();
    let mut shown: HashMap<String, Bar> = HashMap::new();
    let mut plain: HashMap<String, Plain> = HashMap::new();
    loop {
        let job = client.job(id).await?;
        let done = matches!(s(&job["state"]).as_str(), "succeeded" | "failed" | "cancelled");
        for stage in job["stages"].as_array().into_iter().flatten() {
            let name = s(&stage["name"]);
            let line = StageLine::of(stage);
            let ended = matches!(s(&stage["state"]).as_str(), "succeeded" | "failed" | "cancelled");
            if tty {
                let entry = shown.entry(name.clone()).or_insert_with(|| {
                    let bar = bars.add(ProgressBar::new(BAR_LEN));
                    bar.set_style(spinner_style());
                    bar.set_prefix(name.clone());
                    bar.enable_steady_tick(Duration::from_millis(120));
                    Bar { bar, with_fraction: false }
                });
                show_bar(entry, &line, s(&stage["state"]) == "succeeded", ended);
            } else {
                print_plain(&mut plain, id, &name, line);
            }
        }
        if done {
            for entry in shown.values() {
                entry.bar.finish();
            }
            let state = s(&job["state"]);
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
        tokio::time::sleep(POLL).await;
    }
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
/// `PLAIN_PROGRESS_GAP`. Each line names the job.
fn print_plain(plain: &mut HashMap<String, Plain>, id: &str, name: &str, line: StageLine) {
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
        self::line(&format!("{id} {name}: {}", line.state));
    } else {
        self::line(&format!("{id} {name}: {} {progress}", line.state));
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
    if let Some(e) = job["error"].as_str() {
        println!("error: {e}");
    }
    println!("{:<24} {:<10} {:>8}  {:<25} ERROR", "STAGE", "STATE", "ATTEMPTS", "FINISHED");
    for st in job["stages"].as_array().into_iter().flatten() {
        println!(
            "{:<24} {:<10} {:>8}  {:<25} {}",
            s(&st["name"]),
            s(&st["state"]),
            s(&st["attempts"]),
            s(&st["finished_at"]),
            s(&st["error"])
        );
    }
    if !job["output"].is_null() {
        println!("output: {}", job["output"]);
    }
}

pub fn print_agents(r: &Value) {
    for a in r["agents"].as_array().into_iter().flatten() {
        let res = &a["resources"];
        println!(
            "{} {} [{}] heartbeat {} ms ago, {} leases, {} GPUs, cpu {}/{} used, api {}",
            s(&a["name"]),
            s(&a["id"]),
            s(&a["state"]),
            s(&a["heartbeat_age_ms"]),
            s(&a["leases"]),
            res["gpus"].as_array().map(|g| g.len()).unwrap_or(0),
            s(&res["cpu_used"]),
            s(&res["cpu"]),
            s(&a["api"]),
        );
    }
}

pub fn print_resources(r: &Value) {
    for g in r["gpus"].as_array().into_iter().flatten() {
        println!(
            "gpu {} {} [{}]: {} of {} bytes leased{}",
            s(&g["index"]),
            s(&g["name"]),
            s(&g["source"]),
            s(&g["memory_leased_bytes"]),
            s(&g["memory_bytes"]),
            if g["exclusive"] == Value::Bool(true) { " (whole device)" } else { "" }
        );
    }
    println!("cpu: {} of {} slots leased", s(&r["cpu"]["leased"]), s(&r["cpu"]["capacity"]));
    println!("leases:");
    for l in r["leases"].as_array().into_iter().flatten() {
        println!(
            "  {} {}/{} attempt {} pid {} held {} ms",
            s(&l["pipeline"]),
            s(&l["job"]),
            s(&l["stage"]),
            s(&l["attempt"]),
            s(&l["pid"]),
            s(&l["held_ms"])
        );
    }
    for p in r["pools"].as_array().into_iter().flatten() {
        println!("pool {}:", s(&p["name"]));
        for i in p["instances"].as_array().into_iter().flatten() {
            println!(
                "  #{} {} pid {} task {} done {} restarts {}{}",
                s(&i["index"]),
                s(&i["state"]),
                s(&i["pid"]),
                s(&i["task"]),
                s(&i["tasks_done"]),
                s(&i["restarts"]),
                i["last_error"].as_str().map(|e| format!(" last error: {e}")).unwrap_or_default()
            );
        }
    }
    println!("waiting:");
    for w in r["waiting"].as_array().into_iter().flatten() {
        println!(
            "  {} {}/{} waited {} ms, needs {}",
            s(&w["pipeline"]),
            s(&w["job"]),
            s(&w["stage"]),
            s(&w["waited_ms"]),
            w["needs"]
        );
    }
}

pub fn print_diagnosis(d: &Value) {
    let open = d["open"].as_array().cloned().unwrap_or_default();
    for g in d["gpus"].as_array().into_iter().flatten() {
        let reading = if g["telemetry"] == Value::Bool(true) {
            format!(
                "{} % busy, {} of {} bytes used, {} process(es)",
                s(&g["utilization_pct"]),
                s(&g["memory_used_bytes"]),
                s(&g["memory_bytes"]),
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
