//! The store suite: each behaviour every backend must share is one generic async fn, and
//! `store_suite!` makes one `#[tokio::test]` of it per backend, so a failure names both the
//! behaviour and the backend (`store_suite::postgres::retention_deletes_only_finished_jobs`).
//! Each PostgreSQL test gets a database of its own (`TestDb`); without a server those tests
//! are skipped, except under `CI`, where they fail. Then the shared queue's claims, expiry and
//! fencing, on PostgreSQL, without an engine.

use std::time::Duration;

use gpuflow::store::{
    AttemptDetails, Finish, JobFilter, NewJob, PgStore, RecoveryCursor, SharedCancel, Store, StoreError, Write,
};
use gpuflow_core::JobState::{self, Failed, Queued, Running, Succeeded};
use gpuflow_core::cluster::{self, End, SharedStage, Transition};
use gpuflow_core::diagnosis::{Finding, FindingKind};
use gpuflow_core::{RetryPolicy, StageState};
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

fn ended(job: &str, stage: usize, attempt: u32, result: &'static str, stage_state: StageState) -> Write {
    Write::AttemptEnded {
        job: job.into(),
        stage,
        attempt,
        result,
        stage_state,
        readied: Vec::new(),
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

fn started(job: &str, stage: usize, attempt: u32, at: i64) -> Write {
    Write::AttemptStarted { job: job.into(), stage, attempt, grant: json!({"gpus": [0], "cpu": 1}).to_string(), at }
}

fn job_finished(job: &str, state: JobState, at: i64) -> Write {
    Write::JobFinished { job: job.into(), state, error: (state != Succeeded).then(|| "x".into()), output: None, at }
}

/// Runs a job's only stage to `state` and finishes the job so at `at`.
async fn finish_job<S: Store>(store: &S, id: &str, state: JobState, at: i64) {
    store.insert_job(&new_job(id, None, vec![("a", vec![])])).await.unwrap();
    let (result, stage_state) =
        if state == Succeeded { ("succeeded", StageState::Succeeded) } else { ("failed", StageState::Failed) };
    let mut end = ended(id, 0, 1, result, stage_state);
    if let Write::AttemptEnded { at: a, .. } = &mut end {
        *a = at;
    }
    store.write(&[started(id, 0, 1, at - 1), end, job_finished(id, state, at)]).await.unwrap();
}

/// One `#[tokio::test]` per behaviour per backend, in a module named after the backend.
macro_rules! store_suite {
    ($($behaviour:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $behaviour() {
                    let dir = tempfile::tempdir().unwrap();
                    let store = gpuflow::store::SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
                    super::$behaviour(store).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $behaviour() {
                    let Some(db) = crate::fixture::TestDb::create() else { return };
                    let store = gpuflow::store::PgStore::connect(&db.url, "agent-a").await.unwrap();
                    super::$behaviour(store).await;
                }
            )*
        }
    };
}

store_suite!(
    jobs_are_found_by_id_prefix_and_short_id_and_retries_are_linked,
    inserted_jobs_read_back_intact,
    idempotency_keys_are_unique,
    a_running_attempt_is_a_held_lease,
    a_failed_batch_writes_nothing,
    a_turn_admits_and_writes_in_one_transaction,
    listings_are_newest_first_filtered_and_paged,
    job_stats_count_by_pipeline_state_and_minute,
    findings_open_update_close_and_list_open_first,
    recovery_pages_follow_serving_order,
    retention_finds_and_deletes_only_finished_jobs,
    arrival_numbers_only_grow,
    pending_waits_for_predecessors_and_queued_is_ready,
    large_inputs_stay_out_of_recovery_pages_and_are_read_by_id,
);

/// Insert and read back, unicode and JSON intact, in arrival order.
async fn inserted_jobs_read_back_intact<S: Store>(store: S) {
    let seq1 = store.insert_job(&new_job("j1", Some("k1"), vec![("a", vec![]), ("b", vec![0])])).await.unwrap();
    let seq2 = store.insert_job(&new_job("j2", None, vec![("a", vec![])])).await.unwrap();
    assert!(seq2 > seq1, "arrival order");
    let d = store.job("j1").await.unwrap().unwrap();
    assert_eq!(d.job.input, json!({"text": "héllo ✓", "n": 1}));
    assert_eq!(d.job.state, Queued);
    assert_eq!((d.job.seq, d.job.pipeline.as_str(), d.job.created_at), (seq1, "p", 1_000));
    assert_eq!(d.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), vec!["a", "b"]);
    assert_eq!(d.stages[1].deps, vec![0]);
    assert!(d.attempts.is_empty());
    assert_eq!(store.config_snapshot("h1").await.unwrap().as_deref(), Some("pipelines: {}"));
    assert_eq!(store.config_snapshot("h2").await.unwrap(), None);
    assert!(store.job("nope").await.unwrap().is_none());
}

/// A second job under a used key is refused whole, and the key finds the first.
async fn idempotency_keys_are_unique<S: Store>(store: S) {
    store.insert_job(&new_job("j1", Some("k1"), vec![("a", vec![])])).await.unwrap();
    assert_eq!(store.job_by_idempotency_key("k1").await.unwrap().unwrap().id, "j1");
    assert!(store.job_by_idempotency_key("k2").await.unwrap().is_none());
    let dup = store.insert_job(&new_job("j3", Some("k1"), vec![("a", vec![])])).await;
    assert!(matches!(&dup, Err(StoreError::DuplicateKey(k)) if k == "k1"), "duplicate key refused: {dup:?}");
    assert!(store.job("j3").await.unwrap().is_none(), "nothing half-written");
}

/// A running attempt is a held lease; its end releases it and records how it went.
async fn a_running_attempt_is_a_held_lease<S: Store>(store: S) {
    store.insert_job(&new_job("j1", None, vec![("a", vec![]), ("b", vec![0])])).await.unwrap();
    store.write(&[started("j1", 0, 1, 1_500)]).await.unwrap();
    let running = store.running_attempts().await.unwrap();
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].0, "j1");
    assert_eq!(running[0].1.grant, json!({"gpus": [0], "cpu": 1}));
    let d = store.job("j1").await.unwrap().unwrap();
    assert_eq!((d.job.state, d.job.started_at), (Running, Some(1_500)));
    assert_eq!((d.stages[0].state, d.stages[0].attempts), (StageState::Running, 1));
    store.write(&[ended("j1", 0, 1, "succeeded", StageState::Succeeded)]).await.unwrap();
    assert!(store.running_attempts().await.unwrap().is_empty());
    let d = store.job("j1").await.unwrap().unwrap();
    assert_eq!(d.stages[0].state, StageState::Succeeded);
    assert_eq!(d.stages[0].output, Some(json!({"k": [1, 2]})));
    assert_eq!(d.stages[0].finished_at, Some(2_000));
    assert_eq!(d.attempts[0].state, "succeeded");
    assert_eq!(d.attempts[0].exit_code, Some(0));
    assert_eq!(d.attempts[0].batch_size, Some(4), "the batch size is kept with the attempt");
}

/// A batch is atomic: ending an attempt that is not running fails the whole batch.
async fn a_failed_batch_writes_nothing<S: Store>(store: S) {
    store.insert_job(&new_job("j1", None, vec![("a", vec![]), ("b", vec![0])])).await.unwrap();
    let bad = store.write(&[started("j1", 1, 1, 3_000), ended("j1", 0, 7, "failed", StageState::Failed)]).await;
    assert!(matches!(bad, Err(StoreError::Corrupt(_))), "{bad:?}");
    let d = store.job("j1").await.unwrap().unwrap();
    assert_eq!(d.stages[1].state, StageState::Pending, "the first write of the failed batch was rolled back");
    assert_eq!(d.job.state, Queued);
    assert!(store.running_attempts().await.unwrap().is_empty());
}

/// A turn's admissions and state changes land together; a job admitted, run and finished in
/// one turn is stored in its final state.
async fn a_turn_admits_and_writes_in_one_transaction<S: Store>(store: S) {
    let job = new_job("t1", None, vec![("a", vec![])]);
    store
        .write_turn(
            std::slice::from_ref(&job),
            &[
                started("t1", 0, 1, 1_100),
                ended("t1", 0, 1, "succeeded", StageState::Succeeded),
                job_finished("t1", Succeeded, 2_100),
            ],
        )
        .await
        .unwrap();
    let d = store.job("t1").await.unwrap().unwrap();
    assert_eq!((d.job.state, d.job.started_at, d.job.finished_at), (Succeeded, Some(1_100), Some(2_100)));
    assert_eq!(d.stages[0].state, StageState::Succeeded);
    assert_eq!(d.attempts.len(), 1);
    // A turn whose write fails admits nothing either.
    let bad = store
        .write_turn(&[new_job("t2", None, vec![("a", vec![])])], &[ended("t1", 0, 9, "failed", StageState::Failed)])
        .await;
    assert!(bad.is_err(), "ending an attempt that never ran is refused");
    assert!(store.job("t2").await.unwrap().is_none(), "the turn's admission was rolled back");
}

/// Listings: newest first, by state, by pipeline, a page before a cursor, without inputs.
async fn listings_are_newest_first_filtered_and_paged<S: Store>(store: S) {
    store.insert_job(&new_job("j1", None, vec![("a", vec![])])).await.unwrap();
    finish_job(&store, "j2", Failed, 4_000).await;
    store.insert_job(&NewJob { pipeline: "q".into(), ..new_job("j3", None, vec![("a", vec![])]) }).await.unwrap();
    let ids = |jobs: Vec<gpuflow::store::JobRecord>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
    let all = store.list_jobs(&JobFilter { limit: 10, ..Default::default() }).await.unwrap();
    assert!(all.iter().all(|j| j.input.is_null() && j.output.is_none()), "a listing read inputs or outputs");
    assert_eq!(ids(all.clone()), vec!["j3", "j2", "j1"], "newest first");
    let failed = JobFilter { state: Some(Failed), limit: 10, ..Default::default() };
    assert_eq!(ids(store.list_jobs(&failed).await.unwrap()), vec!["j2"]);
    let of_p = JobFilter { pipeline: Some("p".into()), limit: 10, ..Default::default() };
    assert_eq!(ids(store.list_jobs(&of_p).await.unwrap()), vec!["j2", "j1"]);
    let queued_q = JobFilter { state: Some(Queued), pipeline: Some("q".into()), limit: 10, ..Default::default() };
    assert_eq!(ids(store.list_jobs(&queued_q).await.unwrap()), vec!["j3"]);
    let page2 = JobFilter { before_seq: Some(all[1].seq), limit: 10, ..Default::default() };
    assert_eq!(ids(store.list_jobs(&page2).await.unwrap()), vec!["j1"]);
    let first = JobFilter { limit: 1, ..Default::default() };
    assert_eq!(ids(store.list_jobs(&first).await.unwrap()), vec!["j3"], "the limit holds");
    let none = JobFilter { pipeline: Some("nope".into()), limit: 10, ..Default::default() };
    assert!(store.list_jobs(&none).await.unwrap().is_empty());
}

/// Counts per pipeline and state, and jobs finished per minute (the dashboard's overview).
async fn job_stats_count_by_pipeline_state_and_minute<S: Store>(store: S) {
    finish_job(&store, "j1", Failed, 4_000).await;
    finish_job(&store, "j2", Succeeded, 61_000).await;
    store.insert_job(&new_job("j3", None, vec![("a", vec![])])).await.unwrap();
    let stats = store.job_stats(0).await.unwrap();
    let mut counts = stats.counts.clone();
    counts.sort();
    let count = |state: &str| ("p".to_string(), state.to_string(), 1);
    assert_eq!(counts, vec![count("failed"), count("queued"), count("succeeded")]);
    let minute = |state: &str, at: i64| ("p".to_string(), state.to_string(), at, 1);
    assert_eq!(stats.finished, vec![minute("failed", 0), minute("succeeded", 60_000)], "oldest minute first");
    assert_eq!(store.job_stats(60_000).await.unwrap().finished, vec![minute("succeeded", 60_000)]);
    assert!(store.job_stats(120_000).await.unwrap().finished.is_empty());
}

/// Findings open, update, close, list open ones first, and a restart closes what was open.
async fn findings_open_update_close_and_list_open_first<S: Store>(store: S) {
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
    assert_ne!(a, b);
    store.update_finding(a, &Finding { summary: "still stuck".into(), ..finding.clone() }, 12).await.unwrap();
    store.close_finding(b, 13).await.unwrap();
    let list = store.findings(10).await.unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!((list[0].id, list[0].summary.as_str(), list[0].updated_at), (a, "still stuck", 12));
    assert_eq!(list[0].kind, FindingKind::QueueStalled.as_str());
    assert_eq!(list[0].evidence, finding.evidence);
    assert_eq!((list[1].id, list[1].closed_at), (b, Some(13)));
    assert_eq!(store.findings(1).await.unwrap().len(), 1, "the limit holds");
    assert_eq!(store.close_open_findings(20).await.unwrap(), 1);
    assert!(store.findings(10).await.unwrap().iter().all(|f| f.closed_at.is_some()));
}

/// Recovery pages come in the order jobs are served (priority, high first, then arrival),
/// with their stages, and leave finished jobs out.
async fn recovery_pages_follow_serving_order<S: Store>(store: S) {
    finish_job(&store, "done", Succeeded, 2_000).await;
    for (id, priority) in [("r1", 0), ("r2", 5), ("r3", 0), ("r4", 5), ("r5", -2)] {
        store.insert_job(&NewJob { priority, ..new_job(id, None, vec![("a", vec![]), ("b", vec![0])]) }).await.unwrap();
    }
    store.write(&[started("r3", 0, 1, 1_500)]).await.unwrap();
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
    assert_eq!(order, vec!["r2", "r4", "r1", "r3", "r5"], "a running job is recovered too; a finished one is not");
}

/// Recovery reads a large input (over 64 KiB of text) as null, so restoring queued jobs does
/// not load their inputs; `job_inputs` reads them whole, by id, when a stage starts.
async fn large_inputs_stay_out_of_recovery_pages_and_are_read_by_id<S: Store>(store: S) {
    let big = json!({"pad": "é".repeat(40 * 1024), "n": 2});
    store.insert_job(&NewJob { input: big.clone(), ..new_job("big", None, vec![("a", vec![])]) }).await.unwrap();
    store.insert_job(&new_job("small", None, vec![("a", vec![])])).await.unwrap();
    let page = store.unfinished_jobs(None, 10).await.unwrap();
    let input_of = |id: &str| page.iter().find(|u| u.job.id == id).map(|u| u.job.input.clone());
    assert_eq!(input_of("big"), Some(serde_json::Value::Null), "recovery loaded a large input");
    assert_eq!(input_of("small"), Some(json!({"text": "héllo ✓", "n": 1})), "a small input comes back whole");
    let mut inputs = store.job_inputs(&["big".into(), "small".into(), "absent".into()]).await.unwrap();
    inputs.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(inputs, vec![("big".to_string(), big), ("small".to_string(), json!({"text": "héllo ✓", "n": 1}))]);
}

/// Retention finds jobs that ended in a state before a time, and deletes them with their
/// stages and attempts; a job that has not finished is never deleted.
async fn retention_finds_and_deletes_only_finished_jobs<S: Store>(store: S) {
    finish_job(&store, "old", Succeeded, 1_000).await;
    finish_job(&store, "new", Succeeded, 9_000).await;
    finish_job(&store, "bad", Failed, 1_000).await;
    store.insert_job(&new_job("live", None, vec![("a", vec![])])).await.unwrap();
    assert_eq!(store.expired_jobs("succeeded", 5_000, 10).await.unwrap(), vec![("old".to_string(), 1_000)]);
    assert_eq!(store.expired_jobs("succeeded", 10_000, 1).await.unwrap().len(), 1, "the limit holds");
    assert_eq!(store.expired_jobs("failed", 5_000, 10).await.unwrap(), vec![("bad".to_string(), 1_000)]);
    assert_eq!(store.delete_finished_jobs(&[]).await.unwrap(), 0);
    let ids = ["old", "bad", "live", "missing"].map(String::from);
    assert_eq!(store.delete_finished_jobs(&ids).await.unwrap(), 2, "only the finished jobs go");
    assert!(store.job("old").await.unwrap().is_none());
    assert!(store.job("bad").await.unwrap().is_none());
    assert!(store.job("live").await.unwrap().is_some(), "an unfinished job is left alone");
    let new = store.job("new").await.unwrap().unwrap();
    assert_eq!((new.stages.len(), new.attempts.len()), (1, 1), "a job not named keeps its rows");
    // The deleted job's stages and attempts went with it: its id can be admitted again.
    store.insert_job(&new_job("old", None, vec![("a", vec![])])).await.unwrap();
    let again = store.job("old").await.unwrap().unwrap();
    assert!(again.attempts.is_empty(), "no attempt of the deleted job is left behind");
}

/// The next arrival number is past every number used, even when the newest job was deleted.
async fn arrival_numbers_only_grow<S: Store>(store: S) {
    assert_eq!(store.next_job_seq().await.unwrap(), 1, "an empty store starts at 1");
    store.insert_job(&new_job("j1", None, vec![("a", vec![])])).await.unwrap();
    finish_job(&store, "j2", Succeeded, 1_000).await;
    let last = store.job("j2").await.unwrap().unwrap().job.seq;
    assert_eq!(store.next_job_seq().await.unwrap(), last + 1);
    assert_eq!(store.delete_finished_jobs(&["j2".to_string()]).await.unwrap(), 1);
    assert_eq!(store.next_job_seq().await.unwrap(), last + 1, "a deletion gives no number back");
    let seq = store.insert_job(&new_job("j3", None, vec![("a", vec![])])).await.unwrap();
    assert!(seq > last, "the next job comes after the deleted one");
}

/// `pending` waits for predecessors and `queued` is ready, on every backend: a stage without
/// predecessors is queued from admission, a success queues the stages it readied, a retry due
/// at once is queued and a later one waits in `backoff` with its time.
async fn pending_waits_for_predecessors_and_queued_is_ready<S: Store>(store: S) {
    use StageState::{Backoff, Pending, Queued as Ready, Succeeded as Done};
    store.insert_job(&new_job("j", None, vec![("a", vec![]), ("b", vec![]), ("c", vec![0, 1])])).await.unwrap();
    let states = |d: gpuflow::store::JobDetail| d.stages.iter().map(|s| s.state).collect::<Vec<_>>();
    assert_eq!(states(store.job("j").await.unwrap().unwrap()), vec![Ready, Ready, Pending]);
    store.write(&[started("j", 0, 1, 1_100), ended("j", 0, 1, "succeeded", Done)]).await.unwrap();
    assert_eq!(states(store.job("j").await.unwrap().unwrap()), vec![Done, Ready, Pending], "c still waits for b");
    // b fails: retried at once, then after a delay.
    store.write(&[started("j", 1, 1, 1_200), ended("j", 1, 1, "failed", Ready)]).await.unwrap();
    assert_eq!(states(store.job("j").await.unwrap().unwrap()), vec![Done, Ready, Pending]);
    let mut later = ended("j", 1, 2, "failed", Backoff);
    if let Write::AttemptEnded { not_before, .. } = &mut later {
        *not_before = Some(9_000);
    }
    store.write(&[started("j", 1, 2, 1_300), later]).await.unwrap();
    let d = store.job("j").await.unwrap().unwrap();
    assert_eq!((d.stages[1].state, d.stages[1].not_before), (Backoff, Some(9_000)));
    // b's success readies c.
    let mut readying = ended("j", 1, 3, "succeeded", Done);
    if let Write::AttemptEnded { readied, .. } = &mut readying {
        *readied = vec![2];
    }
    store.write(&[started("j", 1, 3, 9_100), readying]).await.unwrap();
    assert_eq!(states(store.job("j").await.unwrap().unwrap()), vec![Done, Done, Ready]);
}

/// A database written before `queued` was recorded for ready stages: the migration records
/// them so, and leaves stages that wait for predecessors, and finished jobs, as they were.
#[tokio::test]
async fn sqlite_migration_records_ready_stages_as_queued() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=rwc", path.display())).await.unwrap();
    let mut schema =
        String::from("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL);\n");
    for (version, sql) in [
        (1, include_str!("../../migrations/sqlite/0001_init.sql")),
        (2, include_str!("../../migrations/sqlite/0002_findings.sql")),
        (3, include_str!("../../migrations/sqlite/0003_recovery_order.sql")),
        (4, include_str!("../../migrations/sqlite/0004_batch_size.sql")),
    ] {
        schema.push_str(sql);
        schema.push_str(&format!("\nINSERT INTO schema_migrations VALUES ({version}, 0);\n"));
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(schema)).execute(&mut conn).await.unwrap();
    sqlx::raw_sql(OLD_ROWS).execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();

    let store = gpuflow::store::SqliteStore::open(&path).await.unwrap();
    let states = |d: gpuflow::store::JobDetail| d.stages.iter().map(|s| s.state).collect::<Vec<_>>();
    use StageState::{Cancelled, Pending, Queued as Ready, Succeeded as Done};
    assert_eq!(states(store.job("live").await.unwrap().unwrap()), vec![Done, Ready, Pending, Ready]);
    assert_eq!(states(store.job("over").await.unwrap().unwrap()), vec![Done, Cancelled]);
    assert_eq!(store.findings(10).await.unwrap().len(), 1, "findings keep their rows");
}

/// The same on PostgreSQL, for jobs admitted through `Store::insert_job` before.
#[tokio::test]
async fn postgres_migration_records_ready_stages_as_queued() {
    let Some(db) = TestDb::create() else { return };
    db.sql(include_str!("../../migrations/postgres/0001_init.sql"));
    db.sql(include_str!("../../migrations/postgres/0004_batch_size.sql"));
    db.sql(
        "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL); \
         INSERT INTO schema_migrations VALUES (1, 0), (4, 0);",
    );
    db.sql(
        &OLD_ROWS
            .replace("INSERT INTO findings (kind,", "INSERT INTO findings (agent_id, kind,")
            .replace("VALUES ('queue_stalled',", "VALUES ('agent-a', 'queue_stalled',"),
    );
    let store = PgStore::connect(&db.url, "agent-a").await.unwrap();
    let states = |d: gpuflow::store::JobDetail| d.stages.iter().map(|s| s.state).collect::<Vec<_>>();
    use StageState::{Cancelled, Pending, Queued as Ready, Succeeded as Done};
    assert_eq!(states(store.job("live").await.unwrap().unwrap()), vec![Done, Ready, Pending, Ready]);
    assert_eq!(states(store.job("over").await.unwrap().unwrap()), vec![Done, Cancelled]);
    assert_eq!(db.sql("SELECT string_agg(version::text, ',' ORDER BY version) FROM schema_migrations"), "1,4,5,6,7");
}

/// Rows as the embedded engine wrote them before: ready stages left `pending`.
const OLD_ROWS: &str = "
INSERT INTO config_snapshots (hash, text, created_at) VALUES ('h', 'pipelines: {}', 0);
INSERT INTO jobs (seq, id, pipeline, input, priority, state, config_hash, created_at) VALUES
    (1, 'live', 'p', '{}', 0, 'running', 'h', 0),
    (2, 'over', 'p', '{}', 0, 'failed', 'h', 0);
INSERT INTO stages (job_id, idx, name, deps, state) VALUES
    ('live', 0, 'a', '[]', 'succeeded'),
    ('live', 1, 'b', '[0]', 'pending'),
    ('live', 2, 'c', '[0,1]', 'pending'),
    ('live', 3, 'd', '[]', 'pending'),
    ('over', 0, 'a', '[]', 'succeeded'),
    ('over', 1, 'b', '[0]', 'cancelled');
INSERT INTO findings (kind, subject, summary, evidence, cause, fix, opened_at, updated_at)
    VALUES ('queue_stalled', 's', 's', '[]', 'c', 'f', 0, 0);
";

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
    assert_eq!(detail.stages[0].state, StageState::Running, "the late success changed nothing");
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

/// Id prefixes, short ids and retry links (`JobLinks`).
async fn jobs_are_found_by_id_prefix_and_short_id_and_retries_are_linked<S: Store + gpuflow::store::JobLinks>(
    store: S,
) {
    use gpuflow::store::{IdPrefix, RetryLinks};
    // Two ids sharing their first 13 characters, a third apart; last 8 digits all different.
    let ids = [
        "0193b5f2-7c1e-7d3a-9f00-1234567890ab",
        "0193b5f2-7c1e-7aaa-8000-0000000000cd",
        "0193b5f3-0000-7000-8000-0000000000ef",
    ];
    for id in ids {
        store.insert_job(&new_job(id, None, vec![("a", vec![])])).await.unwrap();
    }
    let found = |rows: Vec<gpuflow::store::JobRecord>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
    let by_prefix = async |p: &str| found(store.jobs_by_id_prefix(&IdPrefix::parse(p).unwrap(), 10).await.unwrap());
    assert_eq!(by_prefix("0193b5f2-7c1e").await, vec![ids[1], ids[0]], "newest first");
    assert_eq!(by_prefix("0193B5F27C1E7D").await, vec![ids[0]]);
    assert_eq!(by_prefix("0193b5f").await.len(), 3);
    assert_eq!(by_prefix(ids[2]).await, vec![ids[2]], "a whole id is its own prefix");
    assert!(by_prefix("0193b5f4").await.is_empty());
    assert_eq!(found(store.jobs_by_id_prefix(&IdPrefix::parse("0193").unwrap(), 2).await.unwrap()).len(), 2, "limit");
    assert_eq!(found(store.jobs_by_short_id("000000cd", 10).await.unwrap()), vec![ids[1]]);
    assert!(store.jobs_by_short_id("0193b5f2", 10).await.unwrap().is_empty(), "a short id is the end of an id");

    assert_eq!(store.retry_links(ids[0]).await.unwrap(), RetryLinks::default());
    store.set_retry_of(ids[1], ids[0]).await.unwrap();
    store.set_retry_of(ids[2], ids[0]).await.unwrap();
    let links = store.retry_links(ids[0]).await.unwrap();
    assert_eq!(links, RetryLinks { retry_of: None, retried_by: vec![ids[1].to_string(), ids[2].to_string()] });
    assert_eq!(store.retry_links(ids[2]).await.unwrap().retry_of.as_deref(), Some(ids[0]));
}
