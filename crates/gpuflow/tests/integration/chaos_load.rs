//! Chaos, load: bursts of submissions far beyond a pipeline's `max_queued`. The API must answer
//! 429 `queue_full` with a `Retry-After`, the engine's memory must stay bounded burst after
//! burst, and every job it accepted (201) must reach a final state: nothing accepted is lost,
//! and the store holds exactly the accepted jobs.
//!
//! `GPUFLOW_CHAOS_LOAD_BURSTS` sets the number of bursts (default 3) and
//! `GPUFLOW_CHAOS_LOAD_BURST` their size (default 1000 submissions from 32 clients).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::chaos::env_count;
use crate::fixture::*;

const MAX_QUEUED: u64 = 40;

#[derive(Default)]
struct Tally {
    accepted: Vec<String>,
    refused: u64,
}

/// `n` submissions from `clients` concurrent clients, as fast as they go.
async fn burst(engine: &Engine, n: u64, clients: u64) -> Tally {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, url, next) = (engine.http.clone(), format!("{}/v1/jobs", engine.base), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                let r = http.post(&url).json(&json!({"pipeline": "p"})).send().await.unwrap();
                let status = r.status().as_u16();
                let retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
                let body: Value = r.json().await.unwrap();
                match status {
                    201 => tally.accepted.push(body["id"].as_str().unwrap().to_string()),
                    429 => {
                        assert_eq!(body["error"]["code"], "queue_full", "{body}");
                        assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("max_queued")), "{body}");
                        let secs: u64 = retry_after
                            .as_deref()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or_else(|| panic!("429 without a numeric Retry-After: {retry_after:?}"));
                        assert!((1..=60).contains(&secs), "Retry-After {secs}");
                        tally.refused += 1;
                    }
                    other => panic!("submit under load answered {other}: {body}"),
                }
            }
            tally
        }));
    }
    let mut total = Tally::default();
    for t in tasks {
        let t = t.await.unwrap();
        total.accepted.extend(t.accepted);
        total.refused += t.refused;
    }
    total
}

#[tokio::test]
async fn bursts_beyond_max_queued_get_429_with_retry_after_bounded_memory_and_lose_nothing() {
    let bursts = env_count("GPUFLOW_CHAOS_LOAD_BURSTS", 3);
    let size = env_count("GPUFLOW_CHAOS_LOAD_BURST", 1000);
    let engine = Engine::start(&format!(
        r#"
resources: {{gpus: none, cpu: 2}}
diagnosis: {{sample_interval: 1h}}
pipelines:
  p:
    max_queued: {MAX_QUEUED}
    stages: [{{name: s, command: [sleep, "0.02"], needs: {{cpu: 1}}}}]
"#
    ))
    .await;
    let mut accepted = BTreeSet::new();
    let mut refused = 0;
    let mut rss = Vec::new();
    for b in 0..bursts {
        let tally = burst(&engine, size, 32).await;
        let unfinished = engine.get("/v1/jobs?state=queued&limit=500").await.1["jobs"].as_array().unwrap().len()
            + engine.get("/v1/jobs?state=running&limit=500").await.1["jobs"].as_array().unwrap().len();
        assert!(unfinished as u64 <= MAX_QUEUED, "burst {b}: {unfinished} unfinished jobs, over max_queued");
        rss.push(rss_bytes(engine.pid()) / 1024);
        eprintln!(
            "load burst {b}: {} accepted, {} refused (429), engine RSS {} KiB",
            tally.accepted.len(),
            tally.refused,
            rss.last().unwrap()
        );
        assert!(tally.refused > 0, "a burst of {size} against max_queued {MAX_QUEUED} must be refused in part");
        assert!(!tally.accepted.is_empty(), "the queue drains between bursts, so some are accepted");
        refused += tally.refused;
        for id in tally.accepted {
            assert!(accepted.insert(id), "an id was handed out twice");
        }
        // Let the queue drain so the next burst is accepted in part again.
        engine
            .wait_until("the queue drains", Duration::from_secs(60), async |e| {
                e.get("/v1/jobs?state=queued&limit=1").await.1["jobs"].as_array().unwrap().is_empty()
            })
            .await;
    }
    // Refused requests must cost nothing that stays: memory after the last burst is within a
    // small margin of memory after the first, whatever the number of bursts.
    let (first, last) = (rss[0], *rss.last().unwrap());
    assert!(last <= first + 16 * 1024, "RSS grew from {first} KiB to {last} KiB over {bursts} bursts: {rss:?}");
    assert!(last < 256 * 1024, "RSS {last} KiB");
    for id in &accepted {
        let job = engine.wait_final(id, Duration::from_secs(120)).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
    }
    // The store holds exactly the accepted jobs: a refused submission persisted nothing.
    let mut stored = BTreeSet::new();
    let mut cursor = String::new();
    loop {
        let (status, page) = engine.get(&format!("/v1/jobs?limit=500{cursor}")).await;
        assert_eq!(status, 200, "{page}");
        stored.extend(page["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_string()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(stored, accepted, "stored jobs differ from the accepted ones");
    engine.assert_all_capacity_free().await;
    eprintln!("load: {} accepted, {refused} refused over {bursts} bursts, RSS {rss:?} KiB", accepted.len());
}
