//! Config reload: live changes apply, the rest is refused with the reason and nothing changes.

use std::time::Duration;

use serde_json::{Value, json};

use crate::fixture::*;
use crate::pools::WORKER;

fn config(instances: u32, cpu: u32, extra_pipeline: bool) -> String {
    let extra = if extra_pipeline { "  extra: {stages: [{name: s, command: [\"true\"]}]}\n" } else { "" };
    format!(
        r#"
resources: {{gpus: [{{memory: 16GiB}}], cpu: {cpu}}}
limits: {{kill_grace: 500ms}}
workers:
  model:
    command: [python3, "{{DIR}}/worker.py"]
    instances: {instances}
    needs: {{gpu_memory: 4GiB}}
pipelines:
  infer: {{stages: [{{name: infer, worker: model}}]}}
{extra}"#
    )
}

fn live(r: &Value) -> Vec<Value> {
    r["pools"][0]["instances"].as_array().unwrap().clone()
}

async fn reload(engine: &Engine) -> (u16, Value) {
    engine.post("/v1/reload", json!({})).await
}

#[tokio::test]
async fn reload_applies_live_changes_and_refuses_the_rest() {
    let engine = Engine::start_with_files(&config(1, 2, false), &[("worker.py", WORKER)]).await;
    let (status, _) = engine.post("/v1/jobs", json!({"pipeline": "extra"})).await;
    assert_eq!(status, 400, "not declared yet");

    // Grow the pool and add a pipeline.
    engine.write_config(&config(2, 2, true));
    let (status, body) = reload(&engine).await;
    assert_eq!(status, 200, "{body}");
    let applied: Vec<&str> = body["applied"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(
        applied.contains(&"pipelines.extra: added") && applied.contains(&"workers.model.instances: 1 -> 2"),
        "{applied:?}"
    );
    engine
        .wait_until("two idle instances", Duration::from_secs(30), async |e| {
            live(&e.resources().await).iter().filter(|i| i["state"] == "idle").count() == 2
        })
        .await;
    assert_eq!(
        engine.resources().await["gpus"][0]["memory_leased_bytes"],
        8u64 << 30,
        "the new instance took its standing lease"
    );
    assert_eq!(
        engine.wait_final(&engine.submit("extra", json!({})).await, Duration::from_secs(20)).await["state"],
        "succeeded"
    );

    // Shrink it again, by SIGHUP this time: one instance retires and returns its lease.
    let pids: Vec<i32> = live(&engine.resources().await).iter().map(|i| i["pid"].as_i64().unwrap() as i32).collect();
    engine.write_config(&config(1, 2, true));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(engine.pid() as i32), nix::sys::signal::Signal::SIGHUP).unwrap();
    engine
        .wait_until("one instance and 4 GiB leased", Duration::from_secs(20), async |e| {
            let r = e.resources().await;
            live(&r).len() == 1 && r["gpus"][0]["memory_leased_bytes"] == 4u64 << 30
        })
        .await;
    let survivor = live(&engine.resources().await)[0]["pid"].as_i64().unwrap() as i32;
    for pid in pids.into_iter().filter(|p| *p != survivor) {
        engine.wait_until("the retired instance exits", Duration::from_secs(10), async |_| !alive(pid)).await;
    }
    assert_eq!(
        engine.wait_final(&engine.submit("infer", json!({})).await, Duration::from_secs(20)).await["state"],
        "succeeded"
    );

    // A change that needs a restart is refused, and nothing of the file is applied.
    engine.write_config(&config(2, 4, false));
    let (status, body) = reload(&engine).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "reload_refused");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("`resources.cpu` changed; that needs a restart"),
        "{body}"
    );
    assert_eq!(live(&engine.resources().await).len(), 1, "the pool size in the refused file was not applied");
    assert_eq!(
        engine.wait_final(&engine.submit("extra", json!({})).await, Duration::from_secs(20)).await["state"],
        "succeeded"
    );

    // A file with errors is refused with them.
    engine.write_config("pipelines: [oops\n");
    let (status, body) = reload(&engine).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("gpuflow.yaml:"),
        "the error points into the file: {body}"
    );

    // The CLI says what a reload changed.
    engine.write_config(&config(1, 2, true));
    let out = std::process::Command::new(bin()).args(["--server", &engine.base, "reload"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "reloaded: nothing changed");
}
