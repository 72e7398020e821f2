//! Leasing: GPU stages take turns, CPU stages run beside them, memory shares pack a device.

use std::time::Duration;

use serde_json::json;

use crate::fixture::*;

#[tokio::test]
async fn gpu_stages_never_overlap_and_cpu_stages_run_beside_them() {
    let log = "{DIR}/events";
    let engine = Engine::start(&format!(
        r#"
resources:
  gpus: [{{memory: 24GiB}}]
  cpu: 4
pipelines:
  mixed:
    stages:
      - {{name: decode, command: {cpu}, needs: {{cpu: 1}}}}
      - {{name: infer, command: {gpu}, needs: {{gpu: 1}}}}
      - {{name: encode, command: {cpu}, needs: {{cpu: 1}}}}
"#,
        cpu = timed_stage(log, "0.3"),
        gpu = timed_stage(log, "0.3"),
    ))
    .await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(engine.submit("mixed", json!({})).await);
    }
    for id in &ids {
        let job = engine.wait_final(id, Duration::from_secs(60)).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
    }
    let all = intervals(&engine.path("events"));
    assert_eq!(all.len(), 18, "every stage ran exactly once");
    let gpu: Vec<_> = all.iter().filter(|i| i.stage == "infer").collect();
    for (i, a) in gpu.iter().enumerate() {
        assert!(a.start_line.contains("dev=0 "), "GPU stage saw its device: {}", a.start_line);
        for b in &gpu[i + 1..] {
            assert!(a.end <= b.start || b.end <= a.start, "GPU stages overlapped: {a:?} {b:?}");
        }
    }
    let cpu: Vec<_> = all.iter().filter(|i| i.stage != "infer").collect();
    for c in &cpu {
        assert!(c.start_line.contains("dev= "), "CPU stage must see no GPU: {}", c.start_line);
    }
    let overlapping = cpu.iter().any(|c| gpu.iter().any(|g| g.job != c.job && c.start < g.end && g.start < c.end));
    assert!(overlapping, "no CPU stage of another job ran while a GPU stage ran: {all:#?}");
    engine.assert_all_capacity_free().await;
}

#[tokio::test]
async fn two_40gib_stages_share_an_80gib_device_and_a_third_waits() {
    let engine = Engine::start(&format!(
        r#"
resources:
  gpus: [{{memory: 80GiB}}]
  cpu: 8
pipelines:
  half:
    stages:
      - {{name: infer, command: {}, needs: {{gpu_memory: 40GiB}}}}
"#,
        timed_stage("{DIR}/events", "1.5")
    ))
    .await;
    let ids = [
        engine.submit("half", json!({})).await,
        engine.submit("half", json!({})).await,
        engine.submit("half", json!({})).await,
    ];
    engine
        .wait_until("two leases", Duration::from_secs(10), async |e| {
            e.resources().await["leases"].as_array().unwrap().len() == 2
        })
        .await;
    let r = engine.resources().await;
    for lease in r["leases"].as_array().unwrap() {
        assert_eq!(lease["gpu_memory"], json!({"device": 0, "bytes": 40u64 << 30}), "{r:#}");
    }
    assert_eq!(r["gpus"][0]["memory_leased_bytes"], 80u64 << 30);
    assert_eq!(r["waiting"].as_array().unwrap().len(), 1, "the third waits: {r:#}");
    assert_eq!(r["waiting"][0]["needs"]["gpu_memory_bytes"], 40u64 << 30);
    for id in &ids {
        assert_eq!(engine.wait_final(id, Duration::from_secs(30)).await["state"], "succeeded");
    }
    let all = intervals(&engine.path("events"));
    assert!(
        all.iter().all(|i| i.start_line.contains(&format!("mem={}", 40u64 << 30))),
        "budget variable set: {all:#?}"
    );
    let max_concurrent =
        all.iter().map(|a| all.iter().filter(|b| b.start <= a.start && a.start < b.end).count()).max().unwrap();
    assert_eq!(max_concurrent, 2, "{all:#?}");
    engine.assert_all_capacity_free().await;
}

/// Regression (found by the no-op benchmark): the loop served its internal events first, so
/// while finished attempts kept starting new ones, API commands waited until the whole queue
/// had drained. Here a cancel and a resources read must be answered while jobs still wait.
#[tokio::test]
async fn api_commands_are_served_while_a_backlog_drains() {
    let engine = Engine::start(
        r#"
resources: {gpus: none, cpu: 1, counters: {gate: 1}}
diagnosis: {sample_interval: 1h}
pipelines:
  hold: {stages: [{name: s, needs: {counters: {gate: 1}}, command: [sleep, "600"]}]}
  p:
    max_queued: 100000
    stages:
      - {name: a, command: ["gpuflow:noop"], needs: {counters: {gate: 1}}}
      - {name: b, command: ["gpuflow:noop"], needs: {}}
      - {name: c, command: ["gpuflow:noop"], needs: {}}
"#,
    )
    .await;
    let holder = engine.submit("hold", json!({})).await;
    engine.wait_leased("the holder runs", Duration::from_secs(10)).await;
    // Enough jobs that the drain takes many turns (a turn decides at most a few thousand
    // actions), so the read below lands in the middle of it.
    let n = 4_000;
    let mut tasks = Vec::new();
    for k in 0..8 {
        let (http, url) = (engine.http.clone(), format!("{}/v1/jobs", engine.base));
        tasks.push(tokio::spawn(async move {
            for _ in (k..n).step_by(8) {
                let r = http.post(&url).json(&json!({"pipeline": "p"})).send().await.unwrap();
                assert_eq!(r.status().as_u16(), 201);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Releasing the gate starts a chain of steps, each starting the next job. Once the first
    // job is done (read from the store, not through the loop), the drain is under way.
    let (status, _) = engine.post(&format!("/v1/jobs/{holder}/cancel"), json!({})).await;
    assert_eq!(status, 200);
    engine
        .wait_until("the drain starts", Duration::from_secs(30), async |e| {
            !e.get("/v1/jobs?state=succeeded&pipeline=p&limit=1").await.1["jobs"].as_array().unwrap().is_empty()
        })
        .await;
    let (status, r) = engine.get("/v1/resources").await;
    assert_eq!(status, 200);
    let waiting = r["waiting"].as_array().unwrap().len();
    assert!(waiting > 0, "the resources read was answered only after the backlog of {n} jobs drained");
    engine
        .wait_until("the backlog drains", Duration::from_secs(120), async |e| {
            e.get("/v1/jobs?state=queued&limit=1").await.1["jobs"].as_array().unwrap().is_empty()
                && e.get("/v1/jobs?state=running&limit=1").await.1["jobs"].as_array().unwrap().is_empty()
        })
        .await;
    engine.assert_all_capacity_free().await;
}
