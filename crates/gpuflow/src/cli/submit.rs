//! Following a job: a progress bar per stage on a terminal, plain lines otherwise.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::Value;

use super::{Client, s};

pub async fn follow(client: &Client, id: &str) -> Result<ExitCode> {
    let tty = std::io::stderr().is_terminal();
    let bars = MultiProgress::new();
    let mut shown: HashMap<String, (String, Option<ProgressBar>)> = HashMap::new();
    loop {
        let job = client.job(id).await?;
        for stage in job["stages"].as_array().into_iter().flatten() {
            let name = s(&stage["name"]);
            let state = s(&stage["state"]);
            let line = match state.as_str() {
                "failed" | "backoff" => format!("{state} (attempt {}): {}", stage["attempts"], s(&stage["error"])),
                "running" => format!("running (attempt {})", stage["attempts"]),
                _ => state.clone(),
            };
            let entry = shown.entry(name.clone()).or_insert_with(|| {
                let bar = tty.then(|| {
                    let bar = bars.add(ProgressBar::new_spinner());
                    bar.set_style(
                        ProgressStyle::with_template("{spinner} {prefix:<24} {msg} [{elapsed}]")
                            .expect("valid template"),
                    );
                    bar.set_prefix(name.clone());
                    bar.enable_steady_tick(Duration::from_millis(120));
                    bar
                });
                (String::new(), bar)
            });
            if entry.0 != line {
                match &entry.1 {
                    Some(bar) => {
                        bar.set_message(line.clone());
                        if matches!(state.as_str(), "succeeded" | "failed" | "cancelled") {
                            bar.finish();
                        }
                    }
                    None => eprintln!("{name}: {line}"),
                }
                entry.0 = line;
            }
        }
        let state = s(&job["state"]);
        if matches!(state.as_str(), "succeeded" | "failed" | "cancelled") {
            for (_, bar) in shown.values() {
                if let Some(bar) = bar {
                    bar.finish();
                }
            }
            eprintln!("job {id} {state}");
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
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
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
