//! The loop in the test process, stepped one phase at a time: gather inputs, decide, commit,
//! act. A store wrapper injects a failed commit. These prove the turn's rules: nothing is
//! acted on, replied or published before its commit; a failed commit performs none of its
//! turn; a reply describes what was committed.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::*;
use crate::config::Config;
use crate::gpu::{GpuInfo, GpuProbe};
use crate::store::{
    AttemptRecord, FindingRecord, JobDetail, JobFilter, JobRecord, JobStats, RecoveryCursor, SqliteStore, StoreResult,
    UnfinishedJob,
};
use gpuflow_core::JobState;

struct NoGpus;

impl GpuProbe for NoGpus {
    fn discover(&self) -> Vec<GpuInfo> {
        Vec::new()
    }
}

/// SQLite, with a switch that makes the next turn's commit fail.
#[derive(Clone)]
struct FaultyStore {
    inner: SqliteStore,
    fail_next_commit: Arc<AtomicBool>,
    /// While set, every write fails as on a full disk.
    unwritable: Arc<AtomicBool>,
    commits: Arc<AtomicUsize>,
    /// While set, reading job inputs back fails.
    fail_input_reads: Arc<AtomicBool>,
}

impl FaultyStore {
    fn check_writable(&self) -> StoreResult<()> {
        if self.unwritable.load(Ordering::SeqCst) {
            return Err(StoreError::Unwritable("injected: database or disk is full".into()));
        }
        Ok(())
    }
}

impl Store for FaultyStore {
    async fn write_turn(&self, jobs: &[NewJob], batch: &[Write]) -> StoreResult<()> {
        if self.fail_next_commit.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Corrupt("injected commit failure".into()));
        }
        self.check_writable()?;
        self.inner.write_turn(jobs, batch).await?;
        self.commits.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn next_job_seq(&self) -> StoreResult<i64> {
        self.inner.next_job_seq().await
    }
    async fn insert_job(&self, job: &NewJob) -> StoreResult<i64> {
        self.inner.insert_job(job).await
    }
    async fn job_by_idempotency_key(&self, key: &str) -> StoreResult<Option<JobRecord>> {
        self.inner.job_by_idempotency_key(key).await
    }
    async fn write(&self, batch: &[Write]) -> StoreResult<()> {
        self.inner.write(batch).await
    }
    async fn job(&self, id: &str) -> StoreResult<Option<JobDetail>> {
        self.inner.job(id).await
    }
    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<JobRecord>> {
        self.inner.list_jobs(filter).await
    }
    async fn unfinished_jobs(&self, after: Option<RecoveryCursor>, limit: u32) -> StoreResult<Vec<UnfinishedJob>> {
        self.inner.unfinished_jobs(after, limit).await
    }
    async fn job_inputs(&self, ids: &[String]) -> StoreResult<Vec<(String, Value)>> {
        if self.fail_input_reads.load(Ordering::SeqCst) {
            return Err(StoreError::Corrupt("injected: input read failed".into()));
        }
        self.inner.job_inputs(ids).await
    }
    async fn config_snapshot(&self, hash: &str) -> StoreResult<Option<String>> {
        self.inner.config_snapshot(hash).await
    }
    async fn open_finding(&self, f: &gpuflow_core::diagnosis::Finding, at: i64) -> StoreResult<i64> {
        self.check_writable()?;
        self.inner.open_finding(f, at).await
    }
    async fn update_finding(&self, id: i64, f: &gpuflow_core::diagnosis::Finding, at: i64) -> StoreResult<()> {
        self.inner.update_finding(id, f, at).await
    }
    async fn close_finding(&self, id: i64, at: i64) -> StoreResult<()> {
        self.inner.close_finding(id, at).await
    }
    async fn close_open_findings(&self, at: i64) -> StoreResult<u64> {
        self.inner.close_open_findings(at).await
    }
    async fn findings(&self, limit: u32) -> StoreResult<Vec<FindingRecord>> {
        self.inner.findings(limit).await
    }
    async fn running_attempts(&self) -> StoreResult<Vec<(String, AttemptRecord)>> {
        self.inner.running_attempts().await
    }
    async fn job_stats(&self, since_ms: i64) -> StoreResult<JobStats> {
        self.inner.job_stats(since_ms).await
    }
    async fn expired_jobs(&self, state: &str, before: i64, limit: u32) -> StoreResult<Vec<(String, i64)>> {
        self.inner.expired_jobs(state, before, limit).await
    }
    async fn delete_finished_jobs(&self, ids: &[String]) -> StoreResult<u64> {
        self.check_writable()?;
        self.inner.delete_finished_jobs(ids).await
    }
}

struct Harness {
    rt: Runtime<FaultyStore>,
    commands: mpsc::Sender<Command>,
    handle: EngineHandle,
    store: FaultyStore,
    dir: tempfile::TempDir,
}

impl Harness {
    async fn start(resources: &str, pipelines: &str) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let text = format!("data_dir: {}\nresources: {resources}\npipelines:\n{pipelines}", data.display());
        let config = Config::parse(&text, "test.yaml", &NoGpus).unwrap();
        let inner = SqliteStore::open(&dir.path().join("gpuflow.db")).await.unwrap();
        let store = FaultyStore {
            inner,
            fail_next_commit: Arc::default(),
            unwritable: Arc::default(),
            commits: Arc::default(),
            fail_input_reads: Arc::default(),
        };
        let (mut rt, handle) =
            Runtime::new(SharedConfig::new(Arc::new(config)), store.clone(), ChildRegistry::default());
        rt.next_seq = store.next_job_seq().await.unwrap() as u64;
        Harness { rt, commands: handle.tx.clone(), handle, store, dir }
    }

    fn submit(&self, pipeline: &str) -> oneshot::Receiver<Result<Submitted, EngineError>> {
        self.submit_input(pipeline, json())
    }

    fn submit_input(&self, pipeline: &str, input: Value) -> oneshot::Receiver<Result<Submitted, EngineError>> {
        let (reply, rx) = oneshot::channel();
        let request = SubmitRequest { pipeline: pipeline.into(), input, priority: 0, idempotency_key: None };
        self.commands.try_send(Command::Submit { request, reply }).unwrap_or_else(|_| panic!("queue full"));
        rx
    }

    fn cancel(&self, id: &str) -> oneshot::Receiver<Result<String, EngineError>> {
        let (reply, rx) = oneshot::channel();
        self.commands.try_send(Command::Cancel { id: id.into(), reply }).unwrap_or_else(|_| panic!("queue full"));
        rx
    }

    /// Gathers the waiting inputs and decides them: the turn is ready to commit.
    async fn decide(&mut self) -> Turn {
        self.rt.drain_ready().await.unwrap();
        self.rt.decide();
        std::mem::take(&mut self.rt.turn)
    }

    /// A whole turn, as the loop runs it.
    async fn turn(&mut self) {
        self.rt.drain_ready().await.unwrap();
        self.rt.run_turn().await.unwrap();
    }

    /// Runs the loop (child exits, timers, turns) until the stored job `id` satisfies `done`,
    /// for at most 20 s; the stored job either way.
    async fn run_until(&mut self, id: &str, done: impl Fn(&JobDetail) -> bool) -> JobDetail {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let stored = self.stored(id).await.unwrap();
            if done(&stored) || tokio::time::Instant::now() > deadline {
                return stored;
            }
            tokio::select! {
                Some(msg) = self.rt.internal_rx.recv() => self.rt.on_internal(msg).await.unwrap(),
                _ = tokio::time::sleep(Duration::from_millis(20)) => self.rt.step(Event::Tick),
            }
            self.turn().await;
        }
    }

    async fn stored(&self, id: &str) -> Option<JobDetail> {
        self.store.job(id).await.unwrap()
    }

    async fn stored_count(&self) -> usize {
        let filter = JobFilter { limit: 100_000, ..Default::default() };
        self.store.list_jobs(&filter).await.unwrap().len()
    }
}

fn json() -> Value {
    Value::Object(Default::default())
}

const SLEEPER: &str = "  sleeper: {stages: [{name: s, needs: {cpu: 1}, command: [sleep, \"30\"]}]}\n";
const NOOP: &str = "  noop: {max_queued: 100000, stages: [{name: s, command: [\"gpuflow:noop\"]}]}\n";

#[tokio::test]
async fn effects_reply_and_feed_come_only_after_the_commit() {
    let mut h = Harness::start("{gpus: none, cpu: 1}", SLEEPER).await;
    let mut feed = h.rt.journal.subscribe();
    let mut reply = h.submit("sleeper");

    let turn = h.decide().await;
    assert_eq!(turn.jobs.len(), 1, "the submission joined the turn");
    assert!(turn.actions.iter().any(|a| matches!(a, Action::Start { .. })), "the stage was decided to start");
    assert!(reply.try_recv().is_err(), "replied before the commit");
    assert!(h.rt.processes.is_empty(), "spawned before the commit");
    assert!(feed.try_recv().is_err(), "published before the commit");
    assert_eq!(h.stored_count().await, 0);

    h.rt.commit(&turn).await.unwrap();
    let id = turn.jobs[0].id.clone();
    let stored = h.stored(&id).await.expect("committed");
    assert_eq!(stored.stages[0].state, StageState::Running);
    assert_eq!(stored.attempts[0].state, "running", "the lease is recorded before the process exists");
    assert!(reply.try_recv().is_err(), "replied before acting");
    assert!(h.rt.processes.is_empty());

    h.rt.act(turn);
    let submitted = reply.try_recv().expect("replied once committed").unwrap();
    assert_eq!(submitted.id, id, "the reply names the committed job");
    assert_eq!(h.rt.processes.len(), 1, "the attempt was spawned");
    assert!(feed.try_recv().is_ok(), "the submission was published");
    h.rt.stop_all().await;
}

#[tokio::test]
async fn a_failed_commit_spawns_replies_and_publishes_nothing() {
    let mut h = Harness::start("{gpus: none, cpu: 2}", &format!("{SLEEPER}{NOOP}")).await;
    let mut feed = h.rt.journal.subscribe();
    let first = h.submit("sleeper");
    let second = h.submit("noop");
    h.store.fail_next_commit.store(true, Ordering::SeqCst);

    h.rt.drain_ready().await.unwrap();
    let result = h.rt.run_turn().await;
    assert!(result.is_err(), "a failed commit stops the loop");
    for mut reply in [first, second] {
        let answer = reply.try_recv().expect("the caller is told");
        let error = answer.expect_err("a job that was not recorded was acknowledged");
        assert_eq!(error.code(), "internal");
        assert!(error.to_string().contains("injected commit failure"), "{error}");
    }
    assert!(h.rt.processes.is_empty(), "spawned for a turn that was not committed");
    assert!(feed.try_recv().is_err(), "published a turn that was not committed");
    assert_eq!(h.stored_count().await, 0);
    assert!(!h.dir.path().join("data/jobs").exists(), "a job directory was created");
}

#[tokio::test]
async fn a_burst_of_ten_thousand_submissions_is_one_commit_then_ten_thousand_replies() {
    let mut h = Harness::start("{gpus: none, cpu: 2}", NOOP).await;
    let mut replies = Vec::new();
    for _ in 0..10 {
        let (reply, rx) = oneshot::channel();
        let requests = (0..1_000)
            .map(|_| SubmitRequest { pipeline: "noop".into(), input: json(), priority: 0, idempotency_key: None })
            .collect();
        h.commands.try_send(Command::SubmitBatch { requests, reply }).unwrap_or_else(|_| panic!("queue full"));
        replies.push(rx);
    }
    let commits_before = h.store.commits.load(Ordering::SeqCst);
    let turn = h.decide().await;
    assert_eq!(turn.jobs.len(), 10_000, "every submission joined one turn");
    assert!(replies.iter_mut().all(|r| r.try_recv().is_err()), "replied before the commit");
    h.rt.commit(&turn).await.unwrap();
    assert_eq!(h.store.commits.load(Ordering::SeqCst), commits_before + 1, "one transaction");
    h.rt.act(turn);

    let mut ids = HashSet::new();
    for mut reply in replies {
        for answer in reply.try_recv().expect("replied after the commit") {
            assert!(ids.insert(answer.expect("accepted").id), "an id was given twice");
        }
    }
    assert_eq!(ids.len(), 10_000);
    // Durable: a fresh connection to the file sees every acknowledged job.
    let reopened = SqliteStore::open(&h.dir.path().join("gpuflow.db")).await.unwrap();
    let stored = reopened.list_jobs(&JobFilter { limit: 100_000, ..Default::default() }).await.unwrap();
    let stored: HashSet<String> = stored.into_iter().map(|j| j.id).collect();
    assert_eq!(stored, ids);

    // The backlog then drains over further turns, a bounded number of actions each.
    for _ in 0..100 {
        if h.rt.jobs.is_empty() {
            break;
        }
        h.turn().await;
    }
    assert!(h.rt.jobs.is_empty(), "the no-op jobs did not drain");
    let stats = reopened.job_stats(0).await.unwrap();
    assert_eq!(stats.counts, vec![("noop".to_string(), "succeeded".to_string(), 10_000)]);
}

#[tokio::test]
async fn a_cancel_reply_describes_the_committed_state() {
    let mut h = Harness::start("{gpus: none, cpu: 1}", SLEEPER).await;
    let mut holder = h.submit("sleeper");
    let mut waiting = h.submit("sleeper");
    h.turn().await;
    let holder = holder.try_recv().unwrap().unwrap().id;
    let waiting = waiting.try_recv().unwrap().unwrap().id;

    // The queued job ends within its turn; the running one must wait for its process.
    let mut queued_cancel = h.cancel(&waiting);
    let mut running_cancel = h.cancel(&holder);
    let turn = h.decide().await;
    h.rt.commit(&turn).await.unwrap();
    h.rt.act(turn);
    assert_eq!(queued_cancel.try_recv().unwrap().unwrap(), "cancelled");
    assert_eq!(h.stored(&waiting).await.unwrap().job.state, JobState::Cancelled);
    assert_eq!(running_cancel.try_recv().unwrap().unwrap(), "cancelling");
    assert_eq!(h.stored(&holder).await.unwrap().job.state, JobState::Running);
    h.rt.stop_all().await;
}

/// The engine records what the core holds: a stage without predecessors is `queued` from its
/// admission, one waiting for predecessors `pending`, and a success that readies a stage
/// records it `queued` in the same transaction.
#[tokio::test]
async fn stored_stage_states_say_pending_for_predecessors_and_queued_for_resources() {
    let pipelines = format!(
        "{SLEEPER}  ready: {{stages: [{{name: a, command: [\"gpuflow:noop\"]}}, {{name: b, after: [a], needs: {{cpu: 2}}, command: [sleep, \"30\"]}}]}}\n  \
         wide: {{stages: [{{name: w, needs: {{cpu: 2}}, command: [sleep, \"30\"]}}, {{name: z, after: [w], command: [\"gpuflow:noop\"]}}]}}\n"
    );
    let mut h = Harness::start("{gpus: none, cpu: 2}", &pipelines).await;
    let mut holder = h.submit("sleeper");
    h.turn().await;
    holder.try_recv().unwrap().unwrap();
    let mut job = h.submit("ready");
    h.turn().await;
    let id = job.try_recv().unwrap().unwrap().id;
    let states = |d: JobDetail| d.stages.iter().map(|s| s.state).collect::<Vec<_>>();
    for _ in 0..20 {
        if h.stored(&id).await.unwrap().stages[0].state == StageState::Succeeded {
            break;
        }
        h.turn().await;
    }
    // `b` needs both CPUs and the sleeper holds one: ready, waiting for resources.
    assert_eq!(states(h.stored(&id).await.unwrap()), vec![StageState::Succeeded, StageState::Queued]);
    // `w` needs both CPUs too: queued from its admission; `z` waits for it.
    let mut wide = h.submit("wide");
    h.turn().await;
    let wide = wide.try_recv().unwrap().unwrap().id;
    assert_eq!(states(h.stored(&wide).await.unwrap()), vec![StageState::Queued, StageState::Pending]);
    h.rt.stop_all().await;
}

/// A full disk: the turn that could not be written is held, not dropped, and the loop goes on.
/// Admission is refused at once with the data directory and its free space, reads work, the
/// running stage runs to its end, and when writing works again the held turn and the stage's
/// report are both recorded, with no restart.
#[tokio::test]
async fn an_unwritable_store_holds_the_turn_refuses_admission_and_resumes_by_itself() {
    const SHORT: &str = "  short: {stages: [{name: s, needs: {cpu: 1}, command: [sleep, \"0.3\"]}]}\n";
    let mut h = Harness::start("{gpus: none, cpu: 2}", SHORT).await;
    let mut first = h.submit("short");
    h.turn().await;
    let first = first.try_recv().unwrap().unwrap().id;
    assert_eq!(h.rt.processes.len(), 1, "the first stage runs");

    // The disk fills: the next submission's turn cannot be written.
    h.store.unwritable.store(true, Ordering::SeqCst);
    let mut held = h.submit("short");
    h.rt.drain_ready().await.unwrap();
    h.rt.run_turn().await.expect("the loop rides out a full disk");
    assert!(h.rt.is_stalled());
    assert!(held.try_recv().is_err(), "answered before it was written");
    assert_eq!(h.rt.processes.len(), 1, "spawned for a turn that was not written");
    let reason = h.handle.degraded().expect("degraded");
    let data = std::path::absolute(h.dir.path().join("data")).unwrap();
    assert!(reason.contains(&data.display().to_string()) && reason.contains("free"), "{reason}");

    // Meanwhile: admission is refused at once (507 in the API), reads are served, the
    // finding is open.
    let refused = h
        .handle
        .submit(SubmitRequest { pipeline: "short".into(), input: json(), priority: 0, idempotency_key: None })
        .await;
    let error = refused.expect_err("admitted while the store cannot be written");
    assert_eq!(error.code(), "store_unwritable");
    assert!(h.stored(&first).await.is_some(), "reads keep working");
    let open = h.rt.diagnosis_snapshot().open;
    assert!(open.iter().any(|f| f.finding.kind.as_str() == "store_unwritable"), "no store_unwritable finding");

    // The running stage ends; its report waits in memory.
    let msg = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let msg = h.rt.internal_rx.recv().await.unwrap();
            if matches!(msg, Internal::Exited { .. }) {
                return msg;
            }
            h.rt.on_internal(msg).await.unwrap();
        }
    })
    .await
    .expect("the stage kept running and exited");
    h.rt.on_internal(msg).await.unwrap();
    h.rt.run_turn().await.unwrap();
    assert!(h.rt.is_stalled(), "still unwritable");
    assert_eq!(h.stored(&first).await.unwrap().job.state, JobState::Running, "the store cannot have it yet");

    // Space returns: at the next retry the held turn is written and acted on, then the report.
    h.store.unwritable.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    h.rt.run_turn().await.unwrap();
    assert!(!h.rt.is_stalled(), "did not resume");
    assert!(h.handle.degraded().is_none());
    let second = held.try_recv().expect("answered once written").expect("accepted").id;
    assert!(h.stored(&second).await.is_some(), "the held submission was written");
    assert_eq!(h.rt.processes.len(), 1, "the held turn's stage started");
    h.turn().await;
    assert_eq!(h.stored(&first).await.unwrap().job.state, JobState::Succeeded, "the report was recorded");
    let findings = h.store.findings(10).await.unwrap();
    assert!(
        findings.iter().any(|f| f.kind == "store_unwritable" && f.closed_at.is_some()),
        "the episode is in the findings history"
    );
    h.rt.stop_all().await;
}

/// A queued job's large input is not in memory; the turn that starts its stage reads it back.
/// A failed read fails that attempt retryably (a store fault, not the job's), and the retry
/// gets the input.
#[tokio::test]
async fn a_large_input_is_read_back_when_its_stage_starts_and_a_failed_read_is_retried() {
    let pipelines = format!(
        "{SLEEPER}  big: {{stages: [{{name: s, needs: {{cpu: 1}}, retry: {{max_attempts: 3, backoff: {{initial: 10ms}}}}, command: [sh, -c, 'echo \"$0\" > \"$1\"', \"{{input.n}}\", \"{{job.dir}}/n\"]}}]}}\n"
    );
    let mut h = Harness::start("{gpus: none, cpu: 1}", &pipelines).await;
    let mut sleeper = h.submit("sleeper");
    h.turn().await;
    let sleeper = sleeper.try_recv().unwrap().unwrap().id;
    let pad = "x".repeat(super::INPUT_KEPT_BYTES + 1);
    let mut big = h.submit_input("big", serde_json::json!({"pad": pad, "n": 7}));
    let mut small = h.submit_input("big", serde_json::json!({"n": 8}));
    h.turn().await;
    let (big, small) = (big.try_recv().unwrap().unwrap().id, small.try_recv().unwrap().unwrap().id);
    let held = |h: &Harness, id: &str| h.rt.jobs.values().find(|a| a.id() == id).map(|a| a.input.is_some());
    assert_eq!(held(&h, &big), Some(false), "a queued job kept its large input in memory");
    assert_eq!(held(&h, &small), Some(true), "a small input is kept (no read needed)");

    h.store.fail_input_reads.store(true, Ordering::SeqCst);
    let mut cancelled = h.cancel(&sleeper);
    let stored = h.run_until(&big, |j| j.attempts.iter().any(|a| a.state == "failed")).await;
    cancelled.try_recv().unwrap().unwrap();
    let error = stored.attempts[0].error.clone().unwrap_or_default();
    assert!(error.contains("input could not be read"), "{:?}", stored.attempts);
    assert_ne!(stored.job.state, gpuflow_core::JobState::Failed, "a store fault failed the job for good");

    h.store.fail_input_reads.store(false, Ordering::SeqCst);
    let done = h.run_until(&big, |j| j.job.state == gpuflow_core::JobState::Succeeded).await;
    assert_eq!(done.job.state, gpuflow_core::JobState::Succeeded, "{:?}", done.attempts);
    let seen = std::fs::read_to_string(h.rt.job_dir(&big).join("n")).unwrap();
    assert_eq!(seen.trim(), "7", "the retried stage rendered its own input");
    assert_eq!(held(&h, &big), None, "the finished job is no longer active");
    h.rt.stop_all().await;
}
