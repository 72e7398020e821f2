//! `GET /metrics` from a real engine: every family `docs/pipelines.md` documents is there
//! from the start with its type, and the per-stage gauges read 0 when idle instead of
//! vanishing. (The same scrape goes through the Prometheus client's OpenMetrics parser, with
//! the naming rules, in `e2e/api/check_metrics.py`, run by `.ci/run`.)

use std::time::Duration;

use serde_json::json;

use crate::fixture::*;

const CONFIG: &str = r#"
resources: {gpus: [{memory: 16GiB}], cpu: 2}
pipelines:
  p:
    stages:
      - {name: prep, command: ["true"]}
      - {name: infer, needs: {gpu_memory: 1GiB}, command: ["true"], after: [prep]}
"#;

async fn scrape(engine: &Engine) -> String {
    let response = engine.http.get(format!("{}/metrics", engine.base)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("application/openmetrics-text"), "content type {content_type}");
    let text = response.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "OpenMetrics text ends with `# EOF`:\n{text}");
    text
}

/// `(name as documented, type)` from the metrics table of `docs/pipelines.md`.
fn documented() -> Vec<(String, String)> {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/pipelines.md")).unwrap();
    let table = docs.split("| family | type | labels | what |").nth(1).expect("the metrics table in docs/pipelines.md");
    let rows: Vec<(String, String)> = table
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_string(), cells[2].to_string())
        })
        .collect();
    assert!(rows.len() >= 20, "the metrics table lists {} families", rows.len());
    rows
}

fn assert_sample(text: &str, sample: &str) {
    assert!(text.lines().any(|l| l == sample), "no `{sample}` in:\n{text}");
}

#[tokio::test]
async fn every_documented_family_is_there_from_the_start_and_idle_gauges_read_zero() {
    let engine = Engine::start(CONFIG).await;
    let text = scrape(&engine).await;
    for (name, kind) in documented() {
        // A counter's family is named without the `_total` its samples carry.
        let family =
            if kind == "counter" { name.strip_suffix("_total").expect("counters end in _total") } else { &name };
        assert!(
            text.contains(&format!("\n# TYPE {family} {kind}\n")),
            "documented {kind} {name} missing at start:\n{text}"
        );
    }
    assert!(!text.contains("# TYPE nv_gpu_utilization gauge"), "renamed to nv_gpu_utilization_ratio");

    for stage in ["prep", "infer"] {
        for gauge in ["gpuflow_queue_depth", "gpuflow_running_tasks"] {
            assert_sample(&text, &format!(r#"{gauge}{{pipeline="p",stage="{stage}"}} 0"#));
        }
        assert_sample(&text, &format!(r#"gpuflow_retries_total{{pipeline="p",stage="{stage}"}} 0"#));
    }
    assert_sample(&text, r#"gpuflow_jobs_submitted_total{pipeline="p"} 0"#);
    for state in ["succeeded", "failed", "cancelled"] {
        assert_sample(&text, &format!(r#"gpuflow_jobs_finished_total{{pipeline="p",state="{state}"}} 0"#));
    }
    assert_sample(&text, r#"gpuflow_findings_opened_total{kind="task_stalled"} 0"#);

    // After a job: counted, and the gauges are back at 0 rather than gone.
    let id = engine.submit("p", json!({})).await;
    assert_eq!(engine.wait_final(&id, Duration::from_secs(30)).await["state"], "succeeded");
    let text = scrape(&engine).await;
    assert_sample(&text, r#"gpuflow_jobs_submitted_total{pipeline="p"} 1"#);
    assert_sample(&text, r#"gpuflow_jobs_finished_total{pipeline="p",state="succeeded"} 1"#);
    for stage in ["prep", "infer"] {
        for gauge in ["gpuflow_queue_depth", "gpuflow_running_tasks"] {
            assert_sample(&text, &format!(r#"{gauge}{{pipeline="p",stage="{stage}"}} 0"#));
        }
    }
}
