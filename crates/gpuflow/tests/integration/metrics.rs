//! `GET /metrics` from a real engine, read by a real OpenMetrics parser: the format is valid,
//! names follow Prometheus' rules, every family `docs/pipelines.md` documents is there from
//! the start, and the gauges read 0 when idle instead of vanishing.

use std::time::Duration;

use openmetrics_parser::{MetricFamily, MetricsExposition, OpenMetricsType, OpenMetricsValue};
use serde_json::json;

use crate::fixture::*;

type Families = MetricsExposition<OpenMetricsType, OpenMetricsValue>;
type Family = MetricFamily<OpenMetricsType, OpenMetricsValue>;

const CONFIG: &str = r#"
resources: {gpus: [{memory: 16GiB}], cpu: 2}
pipelines:
  p:
    stages:
      - {name: prep, command: ["true"]}
      - {name: infer, needs: {gpu_memory: 1GiB}, command: ["true"], after: [prep]}
"#;

async fn scrape(engine: &Engine) -> Families {
    let response = engine.http.get(format!("{}/metrics", engine.base)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("application/openmetrics-text"), "content type {content_type}");
    let text = response.text().await.unwrap();
    openmetrics_parser::openmetrics::parse_openmetrics(&text)
        .unwrap_or_else(|e| panic!("/metrics is not valid OpenMetrics: {e:?}\n{text}"))
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

/// The family a documented name belongs to (a counter's family drops `_total`).
fn family<'a>(families: &'a Families, name: &str, kind: &str) -> &'a Family {
    let family_name = if kind == "counter" { name.strip_suffix("_total").expect("counters end in _total") } else { name };
    families.families.get(family_name).unwrap_or_else(|| {
        let mut names: Vec<&String> = families.families.keys().collect();
        names.sort();
        panic!("documented family {name} is not in /metrics; it has {names:?}")
    })
}

/// The value of the sample whose labels include `labels`.
fn value(family: &Family, labels: &[(&str, &str)]) -> Option<f64> {
    family.iter_samples().find_map(|s| {
        let set = s.get_labelset().ok()?;
        labels.iter().all(|(k, v)| set.get_label_value(k) == Some(*v)).then(|| match &s.value {
            OpenMetricsValue::Gauge(n) | OpenMetricsValue::Unknown(n) => n.as_f64(),
            OpenMetricsValue::Counter(c) => c.value.as_f64(),
            _ => f64::NAN,
        })
    })
}

/// Prometheus naming: what a family measures shows in its name's suffix.
fn check_naming(name: &str, family: &Family) {
    assert!(
        name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
        "{name}: names are lower-case snake case"
    );
    let help = family.help.to_lowercase();
    for unit in ["_ms", "_milliseconds", "_pct", "_percent"] {
        assert!(!name.ends_with(unit), "{name}: use base units (seconds, bytes, ratios), not {unit}");
    }
    if help.contains("0..1") || help.contains("fraction") {
        assert!(name.ends_with("_ratio"), "{name}: a 0..1 value ends in _ratio ({help})");
    }
    if help.contains("time ") || help.contains("how long") || help.contains("duration") {
        assert!(name.ends_with("_seconds"), "{name}: a time ends in _seconds ({help})");
    }
    if help.contains("memory") {
        assert!(name.ends_with("_bytes"), "{name}: a size ends in _bytes ({help})");
    }
    if family.family_type == OpenMetricsType::Counter {
        assert!(!name.ends_with("_total"), "{name}: the family of a counter is named without _total (its samples add it)");
    }
}

#[tokio::test]
async fn metrics_are_valid_openmetrics_named_by_the_rules_and_every_documented_family_is_there_from_the_start() {
    let engine = Engine::start(CONFIG).await;
    let families = scrape(&engine).await;

    for (name, family) in &families.families {
        check_naming(name, family);
    }
    for (name, kind) in documented() {
        let f = family(&families, &name, &kind);
        assert_eq!(f.family_type.to_string(), kind, "{name} is documented as a {kind}");
    }

    // Idle: the gauges read 0 for every stage the file declares, the counters too.
    for stage in ["prep", "infer"] {
        for gauge in ["gpuflow_queue_depth", "gpuflow_running_tasks"] {
            let v = value(family(&families, gauge, "gauge"), &[("pipeline", "p"), ("stage", stage)]);
            assert_eq!(v, Some(0.0), "{gauge} for p/{stage} at start");
        }
        let retries = value(family(&families, "gpuflow_retries_total", "counter"), &[("pipeline", "p"), ("stage", stage)]);
        assert_eq!(retries, Some(0.0), "retries for p/{stage} at start");
    }
    let submitted = family(&families, "gpuflow_jobs_submitted_total", "counter");
    assert_eq!(value(submitted, &[("pipeline", "p")]), Some(0.0));
    let finished = family(&families, "gpuflow_jobs_finished_total", "counter");
    for state in ["succeeded", "failed", "cancelled"] {
        assert_eq!(value(finished, &[("pipeline", "p"), ("state", state)]), Some(0.0), "finished {state} at start");
    }
    let findings = family(&families, "gpuflow_findings_opened_total", "counter");
    assert_eq!(value(findings, &[("kind", "task_stalled")]), Some(0.0));

    // After a job: counted, and the gauges are back at 0 rather than gone.
    let id = engine.submit("p", json!({})).await;
    assert_eq!(engine.wait_final(&id, Duration::from_secs(30)).await["state"], "succeeded");
    let families = scrape(&engine).await;
    assert_eq!(value(family(&families, "gpuflow_jobs_submitted_total", "counter"), &[("pipeline", "p")]), Some(1.0));
    let finished = family(&families, "gpuflow_jobs_finished_total", "counter");
    assert_eq!(value(finished, &[("pipeline", "p"), ("state", "succeeded")]), Some(1.0));
    for stage in ["prep", "infer"] {
        for gauge in ["gpuflow_queue_depth", "gpuflow_running_tasks"] {
            let v = value(family(&families, gauge, "gauge"), &[("pipeline", "p"), ("stage", stage)]);
            assert_eq!(v, Some(0.0), "{gauge} for p/{stage} when idle again");
        }
    }
}
