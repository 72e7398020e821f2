//! One store test suite, run against every backend: the embedded SQLite store and PostgreSQL.
//! Then the shared queue's claims, expiry and fencing, on PostgreSQL, without an engine.

use std::time::Duration;

use gpuflow::store::{
    AttemptDetails, Finish, JobFilter, NewJob, PgStore, RecoveryCursor, SharedCancel, SqliteStore, Store, StoreError,
    Write,
};
use gpuflow_core::cluster::{self, End, SharedStage, Transition};
use gpuflow_core::diagnosis::{Finding, FindingKind};
use gpuflow_core::{JobState, RetryPolicy};
use serde_json::json;

use crate::fixture::TestDb;

fn new_job(id: &str, key: Option<&str>, stages: Vec<(&str, Vec<usize>)>) -> NewJob {
    NewJob {
        seq: None,
        id: id.to_string(),
        pipeline: "p".into(),
        input: json!({"text": "héllo ✓", "n": 1}),
        priority: 0,
        idempotency_key: key.map(str::to_string),
        config_hash: "h1".into(),
        config_text: "pipelines: {}".into(),
        stages: stages.into_iter().map(|(n, d)| (n.to_string(), d)).collect(),
        created_at: 1_000,
    }
}

fn ended(job: &str, stage: usize, attempt: u32, result: &'static str, stage_state: &'static str) -> Write {
    Write::AttemptEnded {
        job: job.into(),
        stage,
        attempt,
        result,
        stage_state,
        not_before: None,
        error: (result != "succeeded").then(|| "boom".to_string()),
        output: (result == "succeeded").then(|| json!({"k": [1, 2]})),
        exit_code: Some(if result == "succeeded" { 0 } else { 3 }),
        signal: None,
        batch_size: Some(4),
        failures: u32::from(result != "succeeded"),
        interruptions: 0,
        at: 2_000,
    }
}

/// The behaviour every backend must share.
async fn conformance<S: Store>(store: S) {
    // Insert and read back, unicode and JSON intact.
    let seq1 = store.insert_job(&new_job("j1", Some("k1"), vec![("a", vec![]), ("b", vec![0])])).await.unwrap();
    let seq2 = store.insert_job(&new_job("j2", None, vec![("a", vec![])])).await.unwrap();
    assert!(seq2 > seq1, "arrival order");
    let d = store.job("j1").await.unwrap().unwrap();
    assert_eq!(d.job.input, json!({"text": "héllo ✓", "n": 1}));
    assert_eq!(d.job.state, "queued");
    assert_eq!(d.stages.len(), 2);
    assert_eq!(d.stages[1].deps, vec![0]);
    assert_eq!(store.config_snapshot("h1").await.unwrap().as_deref(), Some("pipelines: {}"));
    assert!(store.job("nope").await.unwrap().is_none());

    // Idempotency keys are unique.
    assert_eq!(store.job_by_idempotency_key("k1").await.unwrap().unwrap().id, "j1");
    let dup = store.insert_job(&new_job("j3", Some("k1"), vec![("a", vec![])])).await;
    assert!(matches!(dup, Err(StoreError::DuplicateKey(k)) if k == "k1"), "duplicate key refused");
    assert!(store.job("j3").await.unwrap().is_none(), "nothing half-written");

    // A running attempt is a held lease; its end releases it.
    let grant = json!({"gpus": [0], "cpu": 1});
    store
        .write(&[Write::AttemptStarted { job: "j1".into(), stage: 0, attempt: 1, grant: grant.to_string(), at: 1_500 }])
        .await
        .unwrap();
    let running = store.running_attempts().await.unwrap();
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].0, "j1");
    assert_eq!(running[0].1.grant, grant);
    assert_eq!(store.job("j1").await.unwrap().unwrap().job.state, "running");
    store.write(&[ended("j1", 0, 1, "succeeded", "succeeded")]).await.unwrap();
    assert!(store.running_attempts().await.unwrap().is_empty());
    let d = store.job("j1").await.unwrap().unwrap();
    assert_eq!(d.stages[0].state, "succeeded");
    assert_eq!(d.stages[0].output, Some(json!({"k": [1, 2]})));
    assert_eq!(d.attempts[0].state, "succeeded");
    assert_eq!(d.attempts[0].exit_code, Some(0));
    assert_eq!(d.attempts[0].batch_size, Some(4), "the batch size is kept with the attempt");

    // A batch is atomic: ending an attempt that is not running fails the whole batch.
    let bad = store
        .write(&[
            Write::AttemptStarted { job: "j1".into(), stage: 1, attempt: 1, grant: "{}".into(), at: 3_000 },
            ended("j1", 0, 7, "failed", "failed"),
        ])
        .await;
    assert!(matches!(bad, Err(StoreError::Corrupt(_))), "{bad:?}");
    let d = store.job("j1").await.unwrap().unwrap();
    assert_eq!(d.stages[1].state, "pending", "the first write of the failed batch was rolled back");
    assert!(store.running_attempts().await.unwrap().is_empty());

    // Finishing, listing and paging.
    store
        .write(&[Write::JobFinished {
            job: "j2".into(),
            state: "failed",
            error: Some("x".into()),
            output: None,
            at: 4_000,
        }])
        .await
        .unwrap();
    let unfinished: Vec<String> =
        store.unfinished_jobs(None, 100).await.unwrap().into_iter().map(|u| u.job.id).collect();
    assert_eq!(unfinished, vec!["j1"]);
    let all = store.list_jobs(&JobFilter { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(all.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), vec!["j2", "j1"], "newest first");
    assert!(all.iter().all(|j| j.input.is_null() && j.output.is_none()), "a listing read inputs or outputs");
    let failed =
        store.list_jobs(&JobFilter { state: Some("failed".into()), limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(failed.len(), 1);
    let page2 =
        store.list_jobs(&JobFilter { before_seq: Some(all[0].seq), limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(page2.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), vec!["j1"]);
    let other =
        store.list_jobs(&JobFilter { pipeline: Some("q".into()), limit: 10, ..Default::default() }).await.unwrap();
    assert!(other.is_empty());

    // Counts per pipeline and state, and jobs finished per minute (the dashboard's overview).
    let stats = store.job_stats(0).await.unwrap();
    let mut counts = stats.counts.clone();
    counts.sort();
    assert_eq!(counts, vec![("p".to_string(), "failed".to_string(), 1), ("p".to_string(), "running".to_string(), 1)]);
    assert_eq!(stats.finished, vec![("p".to_string(), "failed".to_string(), 0, 1)]);
    assert!(store.job_stats(60_000).await.unwrap().finished.is_empty());

    // Findings open, update, close, and list open ones first.
    let finding = Finding {
        kind: FindingKind::QueueStalled,
        subject: "pipeline p".into(),
        summary: "stuck".into(),
        evidence: vec![("waited".into(), "61 s".into())],
        cause: "c".into(),
        fix: "f".into(),
    };
    let a = store.open_finding(&finding, 10).await.unwrap();
    let b = store.open_finding(&finding, 11).await.unwrap();
    store.update_finding(a, &Finding { summary: "still stuck".into(), ..finding.clone() }, 12).await.unwrap();
    store.close_finding(b, 13).await.unwrap();
    let list = store.findings(10).await.unwrap();
    assert_eq!(list[0].id, a);
    assert_eq!(list[0].summary, "still stuck");
    assert_eq!(list[0].evidence, finding.evidence);
    assert_eq!(list[1].closed_at, Some(13));
    assert_eq!(store.close_open_findings(20).await.unwrap(), 1);
    // Recovery pages come in the order jobs are served: priority (high first), then arrival.
    for (id, priority) in [("r1", 0), ("r2", 5), ("r3", 0), ("r4", 5)] {
        store.insert_job(&NewJob { priority, ..new_job(id, None, vec![("a", vec![]), ("b", vec![0])]) }).await.unwrap();
    }
    let mut order = Vec::new();
    let mut after = None;
    while let Some(last) = store
        .unfinished_jobs(after, 2)
        .await
        .unwrap()
        .into_iter()
        .inspect(|u| {
            assert_eq!(u.stages.len(), 2, "a page carries its jobs' stages");
            order.push(u.job.id.clone());
        })
        .last()
    {
        after = Some(RecoveryCursor::of(&last.job));
    }
    assert_eq!(order, vec!["r2", "r4", "j1", "r1", "r3"]);
}

#[tokio::test]
async fn sqlite_passes_the_store_suite() {
    let dir = tempfile::tempdir().unwrap();
    conformance(SqliteStore::open(&dir.path().join("t.db")).await.unwrap()).await;
}

#[tokio::test]
async fn postgres_passes_the_store_suite() {
    let Some(db) = TestDb::create() else { return };
    conformance(PgStore::connect(&db.url, "agent-a").await.unwrap()).await;
}

fn claim_all(offered: &[gpuflow::store::ClaimCandidate]) -> Vec<usize> {
    (0..offered.len()).collect()
}

/// The rule `PgQueue::finish` applies: the core's, as the agent hands it over.
fn shared_rule(end: End) -> impl FnOnce(&[SharedStage], Option<JobState>, usize) -> Transition {
    move |stages, ending, stage| cluster::attempt_ended(stages, ending, stage, end, &RetryPolicy::default())
}

/// Claims go to one agent at a time, in priority order; an agent whose lease expired is
/// refused every later write, and the stage is re-queued with a new token.
#[tokio::test]
async fn postgres_claims_expire_and_fence_stale_agents() {
    let Some(db) = TestDb::create() else { return };
    let a_store = PgStore::connect(&db.url, "agent-a").await.unwrap();
    let (a, b) = (a_store.queue(), PgStore::connect(&db.url, "agent-b").await.unwrap().queue());
    for (store, name) in [(&a, "a"), (&b, "b")] {
        store.register_agent(name, "host", "http://x", &json!({}), cluster::lease_lost).await.unwrap();
    }
    let mut low = new_job("low", None, vec![("only", vec![])]);
    low.priority = 0;
    let mut high = new_job("high", None, vec![("first", vec![]), ("second", vec![0])]);
    high.priority = 5;
    a.insert_shared_job(&low, 10).await.unwrap();
    a.insert_shared_job(&high, 10).await.unwrap();

    // Priority first; a stage whose predecessor has not succeeded is not claimable.
    let mut seen = Vec::new();
    let claims = a
        .claim(10, 1_000, |offered| {
            seen.extend(offered.iter().map(|c| (c.job.clone(), c.stage)));
            vec![0]
        })
        .await
        .unwrap();
    assert_eq!(seen, vec![("high".to_string(), 0), ("low".to_string(), 0)]);
    assert_eq!(claims.len(), 1);
    let first = claims[0].clone();
    assert_eq!((first.job.as_str(), first.stage, first.attempt), ("high", 0, 1));
    // What is claimed is not offered again.
    let other = b.claim(10, 60_000, claim_all).await.unwrap();
    assert_eq!(other.iter().map(|c| c.job.as_str()).collect::<Vec<_>>(), vec!["low"]);

    // Agent a stops renewing; b re-queues the expired lease and claims attempt 2.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let held_b = b.heartbeat(60_000, &json!({})).await.unwrap();
    assert_eq!(held_b.len(), 1, "b's own lease is renewed");
    let lost = b.expire_leases(cluster::lease_lost).await.unwrap();
    assert_eq!(lost.len(), 1);
    assert_eq!((lost[0].agent.as_str(), lost[0].job.as_str(), lost[0].attempt), ("agent-a", "high", 1));
    let retaken = b.claim(10, 60_000, claim_all).await.unwrap();
    assert_eq!(retaken.len(), 1);
    assert_eq!((retaken[0].job.as_str(), retaken[0].stage, retaken[0].attempt), ("high", 0, 2));
    assert!(retaken[0].token > first.token, "a new, larger fencing token");

    // The stale agent: its renewal no longer returns the token, its writes are refused.
    assert!(a.heartbeat(1_000, &json!({})).await.unwrap().is_empty());
    assert!(!a.record_grant(first.token, &json!({"cpu": 1})).await.unwrap());
    let late = a.finish(first.token, "high", &AttemptDetails::default(), shared_rule(End::Succeeded)).await.unwrap();
    assert_eq!(late, Finish::Fenced);
    let detail = a_store.job("high").await.unwrap().unwrap();
    assert_eq!(detail.stages[0].state, "running", "the late success changed nothing");
    assert_eq!(detail.attempts[0].state, "interrupted");

    // The current holder's success readies the next stage; the last one finishes the job.
    let output =
        AttemptDetails { output: Some(json!({"v": 1})), exit_code: Some(0), signal: None, batch_size: Some(2) };
    let done = b.finish(retaken[0].token, "high", &output, shared_rule(End::Succeeded)).await.unwrap();
    assert_eq!(done, Finish::Applied { job_finished: None });
    let next = a.claim(10, 60_000, claim_all).await.unwrap();
    assert_eq!((next[0].job.as_str(), next[0].stage), ("high", 1));
    assert_eq!(next[0].outputs[0], Some(json!({"v": 1})), "outputs of earlier stages come with the claim");
    let done = a.finish(next[0].token, "high", &output, shared_rule(End::Succeeded)).await.unwrap();
    assert_eq!(done, Finish::Applied { job_finished: Some(JobState::Succeeded) });
    let detail = a_store.job("high").await.unwrap().unwrap();
    assert_eq!(detail.attempts.last().unwrap().batch_size, Some(2), "a fenced finish keeps the batch size");
    let job = detail.job;
    assert_eq!((job.state.as_str(), job.output), ("succeeded", Some(json!({"v": 1}))));

    // Cancel: the running stage is reported to its agent, and the job ends when it stops.
    assert_eq!(b.cancel_shared("low", cluster::cancel).await.unwrap(), SharedCancel::Accepted("cancelling"));
    let low_token = other[0].token;
    assert_eq!(b.leases_to_stop().await.unwrap(), vec![low_token]);
    let end = End::Cancelled { error: "cancelled".into() };
    let stopped = b.finish(low_token, "low", &AttemptDetails::default(), shared_rule(end)).await.unwrap();
    assert_eq!(stopped, Finish::Applied { job_finished: Some(JobState::Cancelled) });
    assert_eq!(
        b.cancel_shared("low", cluster::cancel).await.unwrap(),
        SharedCancel::AlreadyFinished("cancelled".into())
    );
    assert_eq!(b.cancel_shared("missing", cluster::cancel).await.unwrap(), SharedCancel::NotFound);
    assert_eq!(db.sql("SELECT count(*) FROM leases"), "0", "no lease left held");
}
