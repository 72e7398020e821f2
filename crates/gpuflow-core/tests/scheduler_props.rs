//! Property tests of the scheduler's invariants: all-or-nothing, no over-commit, every lease
//! returns, dependency order, no starvation (a stage past `reserve_after` is not overtaken by
//! one with more work left that takes what it needs), no idle GPU while a GPU stage could run
//! on it; and a differential test: the shape-indexed scheduling pass decides exactly what the
//! linear reference pass decided.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use gpuflow_core::*;
use proptest::prelude::*;

const GIB: u64 = 1 << 30;

fn capacity_strategy() -> impl Strategy<Value = Capacity> {
    (prop::collection::vec(prop::sample::select(vec![8u64, 24, 40, 80]), 0..=3), 1u32..=4, 1u64..=3).prop_map(
        |(gpus, cpu, counter)| Capacity {
            gpus: gpus.iter().enumerate().map(|(i, m)| GpuDevice { index: i as u32, memory: m * GIB }).collect(),
            cpu,
            counters: BTreeMap::from([("nvenc".to_string(), counter)]),
        },
    )
}

/// A request that fits the given capacity (impossible ones are refused at config time).
fn request_strategy(cap: Capacity) -> impl Strategy<Value = ResourceRequest> {
    let gpus = cap.gpus.len() as u32;
    let max_mem = cap.gpus.iter().map(|g| g.memory / GIB).max().unwrap_or(0);
    let cpu = cap.cpu;
    (0u8..5, 0..=gpus.min(2), 1..=max_mem.max(1), 0..=cpu, 0u64..=1).prop_map(move |(kind, g, mem, c, n)| {
        let mut r = ResourceRequest { cpu: c, ..Default::default() };
        match kind {
            0 if gpus > 0 => r.gpus = g.max(1),
            1 if max_mem > 0 => r.gpu_memory = mem * GIB,
            2 => r.counters.insert("nvenc".into(), n).map_or((), |_| ()),
            _ => {}
        }
        r
    })
}

fn pipeline_strategy(cap: Capacity) -> impl Strategy<Value = Pipeline> {
    prop::collection::vec(
        (
            request_strategy(cap),
            prop::collection::vec(any::<prop::sample::Index>(), 0..=2),
            1u32..=3,
            prop::option::of(200u64..3_000),
            prop::option::of(0u64..5_000),
        ),
        1..=4,
    )
    .prop_map(|stages| {
        let specs = stages
            .into_iter()
            .enumerate()
            .map(|(i, (needs, after, max_attempts, timeout_ms, expected_ms))| {
                let mut after: Vec<usize> = if i == 0 { vec![] } else { after.iter().map(|ix| ix.index(i)).collect() };
                after.sort();
                after.dedup();
                StageSpec {
                    name: format!("s{i}"),
                    needs,
                    after,
                    timeout_ms,
                    retry: RetryPolicy {
                        max_attempts,
                        initial_backoff_ms: 100,
                        multiplier: 2.0,
                        max_backoff_ms: 1_000,
                    },
                    expected_ms,
                }
            })
            .collect();
        Pipeline::new("p", specs).expect("edges only point backwards")
    })
}

/// One step of a scenario: an event (every kind of `Event`), or a scheduling pass on its own.
#[derive(Clone, Debug)]
enum Op {
    Submit {
        pipeline: usize,
        priority: i32,
    },
    /// A job recovered after a restart; per stage `(kind, interruptions)` (see `restored_stages`).
    Restore {
        pipeline: usize,
        priority: i32,
        stages: Vec<(u8, u32)>,
    },
    Exit {
        lease: prop::sample::Index,
        outcome: u8,
    },
    /// A policy stop (`Event::StopAttempt`) of a running attempt.
    Stop {
        lease: prop::sample::Index,
    },
    Cancel {
        job: prop::sample::Index,
    },
    /// Time passes; with `tick` the timers fire (`Event::Tick`), else time just moves on.
    Advance {
        ms: u64,
        tick: bool,
    },
    /// The counter's available units change (`Event::CounterAvailable`).
    Counter {
        available: u64,
    },
    /// Memory held outside any lease on a device (`Event::GpuForeign`).
    Foreign {
        device: prop::sample::Index,
        gib: u64,
    },
    /// `State::schedule_pass` on its own, after events that were only handled.
    Pass,
    /// The runtime reports how long an attempt of a stage ran (`State::record_duration`).
    Duration {
        stage: prop::sample::Index,
        ms: u64,
    },
}

/// An op, and whether its event is only handled (`State::handle`, as the runtime does for all
/// but the last event of a turn) instead of applied with a pass.
type Step = (Op, bool);

fn op_strategy(pipelines: usize) -> impl Strategy<Value = Step> {
    let op = prop_oneof![
        6 => (0..pipelines, -1i32..=1).prop_map(|(pipeline, priority)| Op::Submit { pipeline, priority }),
        1 => (0..pipelines, -1i32..=1, prop::collection::vec((0u8..5, 0u32..=6), 4))
            .prop_map(|(pipeline, priority, stages)| Op::Restore { pipeline, priority, stages }),
        8 => (any::<prop::sample::Index>(), 0u8..6).prop_map(|(lease, outcome)| Op::Exit { lease, outcome }),
        1 => any::<prop::sample::Index>().prop_map(|lease| Op::Stop { lease }),
        2 => any::<prop::sample::Index>().prop_map(|job| Op::Cancel { job }),
        4 => (1u64..2_000, any::<bool>()).prop_map(|(ms, tick)| Op::Advance { ms, tick }),
        1 => (0u64..=4).prop_map(|available| Op::Counter { available }),
        1 => (any::<prop::sample::Index>(), prop::sample::select(vec![0u64, 4, 30, 90]))
            .prop_map(|(device, gib)| Op::Foreign { device, gib }),
        1 => Just(Op::Pass),
        3 => (any::<prop::sample::Index>(), 0u64..6_000).prop_map(|(stage, ms)| Op::Duration { stage, ms }),
    ];
    (op, prop::bool::weighted(0.25))
}

fn scenario() -> impl Strategy<Value = (Capacity, Vec<Pipeline>, Vec<Step>)> {
    capacity_strategy().prop_flat_map(|cap| {
        (Just(cap.clone()), prop::collection::vec(pipeline_strategy(cap), 1..=3)).prop_flat_map(|(cap, pipelines)| {
            let n = pipelines.len();
            (Just(cap), Just(pipelines), prop::collection::vec(op_strategy(n), 1..160))
        })
    })
}

/// What a restart recovered, consistent with the pipeline: a stage has succeeded, was running
/// or waits to retry only if all its predecessors succeeded.
fn restored_stages(pipeline: &Pipeline, choices: &[(u8, u32)], now: u64) -> Vec<RestoredStage> {
    let mut stages: Vec<RestoredStage> = Vec::new();
    for (i, spec) in pipeline.stages.iter().enumerate() {
        let (kind, interruptions) = choices[i % choices.len()];
        let ready = spec.after.iter().all(|p| stages[*p].status == RestoredStatus::Succeeded);
        let not_started =
            RestoredStage { status: RestoredStatus::NotStarted, attempts: 0, failures: 0, interruptions: 0 };
        stages.push(match kind {
            _ if !ready => not_started,
            1 => RestoredStage { status: RestoredStatus::Succeeded, attempts: 1, failures: 0, interruptions },
            2 => RestoredStage {
                status: RestoredStatus::WasRunning { attempt: 2 },
                attempts: 2,
                failures: 1,
                interruptions,
            },
            3 => RestoredStage {
                status: RestoredStatus::Backoff { until: now + 50 * u64::from(interruptions) },
                attempts: 1,
                failures: 1,
                interruptions: 0,
            },
            _ => not_started,
        });
    }
    stages
}

/// The waiting queue as the API shows it.
fn waiting(state: &State) -> Vec<(JobId, usize, i32, u64)> {
    state.waiting().map(|w| (w.job, w.stage, w.priority, w.since)).collect()
}

/// Tracks what the state machine said, and checks every invariant after each step.
struct Harness {
    state: State,
    /// The same scenario on the reference (linear) scheduler: it must decide identically.
    reference: Option<State>,
    now: u64,
    next_id: u128,
    submitted: BTreeSet<JobId>,
    finished: BTreeMap<JobId, JobState>,
    succeeded: BTreeSet<(JobId, usize)>,
    /// With reservations off, nothing that fits may be left waiting after any event.
    check_work_conserving: bool,
    /// A free GPU that fits a waiting GPU stage is only left idle for a starving stage.
    check_gpu_busy: bool,
    reserve_after_ms: u64,
}

impl Harness {
    fn apply(&mut self, event: Event) {
        self.step(Some(event), false);
    }

    /// Applies an event (only handles it with `defer`), or runs a pass on its own (`None`),
    /// on the state and on the reference, and checks what they said.
    fn step(&mut self, event: Option<Event>, defer: bool) {
        let now = self.now;
        let run = |state: &mut State, event: Option<Event>| match event {
            Some(event) if defer => state.handle(event, now).expect("valid event"),
            Some(event) => state.apply(event, now).expect("valid event"),
            None => state.schedule_pass(now),
        };
        let before: BTreeMap<(JobId, usize), (i32, u64)> =
            self.state.waiting().map(|w| ((w.job, w.stage), (w.priority, w.since))).collect();
        let actions = run(&mut self.state, event.clone());
        if let Some(reference) = &mut self.reference {
            let expected = run(reference, event);
            assert_eq!(actions, expected, "the indexed pass decided differently from the linear pass");
            assert_eq!(waiting(&self.state), waiting(reference), "the waiting queues differ");
            assert_eq!(self.state.inventory().usage(), reference.inventory().usage());
            assert_eq!(self.state.next_wakeup(), reference.next_wakeup());
        }
        for action in &actions {
            match action {
                Action::Start { job, stage, grant, .. } => {
                    let run = self.state.job(*job).expect("started job is active");
                    let spec = &run.pipeline.stages[*stage];
                    assert!(grant.satisfies(&spec.needs), "grant {grant:?} is not exactly {:?}", spec.needs);
                    for p in &spec.after {
                        assert!(self.succeeded.contains(&(*job, *p)), "stage {stage} started before predecessor {p}");
                    }
                    assert!(!self.succeeded.contains(&(*job, *stage)), "a succeeded stage started again");
                }
                Action::AttemptEnded { job, stage, next: StageNext::Succeeded, .. } => {
                    self.succeeded.insert((*job, *stage));
                }
                Action::JobFinished { job, state, .. } => {
                    assert!(state.is_final());
                    assert!(self.finished.insert(*job, *state).is_none(), "job finished twice");
                    assert!(self.state.job(*job).is_none(), "finished job still active");
                }
                _ => {}
            }
        }
        self.check_capacity();
        if !defer {
            self.check_not_overtaken(&actions, &before);
        }
        if self.check_gpu_busy && !defer {
            self.check_no_idle_gpu();
        }
        // Work conservation holds after a pass, not between handled events.
        if self.check_work_conserving && !defer {
            for w in self.state.waiting() {
                let mut inventory = self.state.inventory().clone();
                let none = inventory.new_reservation();
                let needs = &w.pipeline.stages[w.stage].needs;
                assert!(inventory.try_grant(needs, &none).is_none(), "{needs:?} fits but was left waiting");
            }
        }
    }

    fn starving(&self, since: u64) -> bool {
        self.now.saturating_sub(since) >= self.reserve_after_ms
    }

    /// No starvation: the first stage in line that has waited past `reserve_after` (highest
    /// priority, then earliest job) was not overtaken by a stage of its priority or lower that
    /// had not waited that long (whatever work it had left) and took what it needed: without
    /// that stage's grant, it still would not fit. Nothing ahead of it reserves, so nothing
    /// else can excuse it.
    fn check_not_overtaken(&self, actions: &[Action], before: &BTreeMap<(JobId, usize), (i32, u64)>) {
        let first = self
            .state
            .waiting()
            .filter(|w| self.starving(w.since))
            .min_by_key(|w| (std::cmp::Reverse(w.priority), w.job, w.stage));
        let Some(s) = first else { return };
        let needs = &s.pipeline.stages[s.stage].needs;
        for action in actions {
            let Action::Start { job, stage, grant, .. } = action else { continue };
            // Only stages that waited before this step have a place in the queue to compare.
            let Some(&(priority, since)) = before.get(&(*job, *stage)) else { continue };
            if self.starving(since) || priority > s.priority {
                continue;
            }
            let mut inventory = self.state.inventory().clone();
            inventory.release(grant);
            assert!(
                inventory.try_grant(needs, &inventory.new_reservation()).is_none(),
                "stage {stage} of {job:?} (waiting since {since}) took what the starving stage {} of {:?} (waiting since {}) needed",
                s.stage,
                s.job,
                s.since
            );
        }
    }

    /// After a pass, a waiting GPU stage that fits the free inventory is held back only by a
    /// reservation, which only a starving stage makes.
    fn check_no_idle_gpu(&self) {
        let any_starving = self.state.waiting().any(|w| self.starving(w.since));
        for w in self.state.waiting() {
            let needs = &w.pipeline.stages[w.stage].needs;
            if needs.gpus == 0 && needs.gpu_memory == 0 {
                continue;
            }
            let mut inventory = self.state.inventory().clone();
            let none = inventory.new_reservation();
            if inventory.try_grant(needs, &none).is_some() {
                assert!(any_starving, "a GPU that fits {needs:?} is idle and no starving stage reserves it");
            }
        }
    }

    /// No over-commit, and the inventory's books equal the sum of the leases actually held.
    fn check_capacity(&self) {
        let cap = self.state.inventory().capacity().clone();
        let mut exclusive = vec![false; cap.gpus.len()];
        let mut memory = vec![0u64; cap.gpus.len()];
        let mut cpu = 0u32;
        let mut counters: BTreeMap<String, u64> = cap.counters.keys().map(|k| (k.clone(), 0)).collect();
        for lease in self.state.leases() {
            let g = &lease.attempt.grant;
            for d in &g.gpus {
                assert!(!exclusive[*d as usize], "device {d} granted whole twice");
                exclusive[*d as usize] = true;
            }
            if let Some((d, bytes)) = g.gpu_memory {
                memory[d as usize] += bytes;
            }
            cpu += g.cpu;
            for (k, v) in &g.counters {
                *counters.get_mut(k).unwrap() += v;
            }
        }
        for (d, gpu) in cap.gpus.iter().enumerate() {
            assert!(!(exclusive[d] && memory[d] > 0), "device {d} both whole and shared");
            assert!(memory[d] <= gpu.memory, "device {d} memory over-committed");
        }
        assert!(cpu <= cap.cpu, "cpu over-committed");
        for (k, v) in &counters {
            assert!(*v <= cap.counters[k], "counter {k} over-committed");
        }
        let usage = self.state.inventory().usage();
        assert_eq!(usage.gpu_exclusive, exclusive);
        assert_eq!(usage.gpu_memory_used, memory);
        assert_eq!(usage.cpu, cpu);
        assert_eq!(usage.counters, counters);
    }

    fn running(&self) -> Vec<(JobId, usize, u32)> {
        self.state.leases().map(|l| (l.job, l.stage, l.attempt.attempt)).collect()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_for_any_sequence((cap, pipelines, ops) in scenario()) {
        run_scenario(cap, pipelines, ops, false)?;
    }

    #[test]
    fn nothing_that_fits_is_left_waiting((cap, pipelines, ops) in scenario()) {
        run_scenario(cap, pipelines, ops, true)?;
    }

    /// After every pass, no free GPU fits a waiting GPU stage, unless a starving stage
    /// reserved it; with random declared and measured durations reordering the queue.
    #[test]
    fn no_gpu_idles_while_a_gpu_stage_could_run(
        (cap, pipelines, ops) in scenario(),
        reserve_after_ms in prop::sample::select(vec![0u64, 200, 1_500, u64::MAX]),
    ) {
        run_ops(cap, pipelines, ops, Checks { reserve_after_ms, gpu_busy: true, ..Checks::default() })?;
    }

    /// The shape-indexed pass against the linear pass it replaced (kept as the reference): the
    /// same random events, every kind of them, must give identical actions after every event,
    /// with reservations for starving stages on, off, immediate or late, and random declared
    /// and measured durations (the critical-path order).
    #[test]
    fn indexed_queue_matches_the_linear_pass(
        (cap, pipelines, ops) in scenario(),
        reserve_after_ms in prop::sample::select(vec![0u64, 200, 1_500, 5_000, u64::MAX]),
    ) {
        run_differential(cap, pipelines, ops, reserve_after_ms)?;
    }

    /// A whole-GPU request behind a steady stream of small memory shares starts within the
    /// reservation bound plus the longest small stage, even when the small ones have more
    /// work left (declared, or measured) and so go before it in the critical-path order.
    #[test]
    fn large_request_is_not_starved(
        durations in prop::collection::vec(100u64..2_000, 30..60),
        small_expected in prop::option::of(0u64..600_000),
        big_measured in prop::option::of(0u64..10_000),
    ) {
        let reserve_after = 5_000;
        let cap = Capacity { gpus: vec![GpuDevice { index: 0, memory: 80 * GIB }], cpu: 64, counters: BTreeMap::new() };
        let mut state = State::new(cap, SchedulerConfig { reserve_after_ms: reserve_after });
        let small = Arc::new(Pipeline::new("small", vec![StageSpec {
            name: "s".into(), needs: ResourceRequest { gpu_memory: 20 * GIB, ..Default::default() },
            after: vec![], timeout_ms: None, retry: RetryPolicy::no_retry(), expected_ms: small_expected }]).unwrap());
        if let Some(ms) = big_measured {
            state.record_duration("big", "b", ms);
        }
        let big = Arc::new(Pipeline::new("big", vec![StageSpec {
            name: "b".into(), needs: ResourceRequest { gpus: 1, ..Default::default() },
            after: vec![], timeout_ms: None, retry: RetryPolicy::no_retry(), expected_ms: None }]).unwrap());
        let mut now = 0;
        let mut next = 1u128;
        let mut running: Vec<(JobId, u64)> = Vec::new(); // (job, ends at)
        let submit = |state: &mut State, p: &Arc<Pipeline>, now: u64, next: &mut u128| {
            let job = JobId(*next);
            *next += 1;
            (job, state.apply(Event::Submitted { job, seq: job.0 as u64, priority: 0, pipeline: p.clone() }, now).unwrap())
        };
        // Two small ones hold the device, then the big one arrives.
        let mut started = Vec::new();
        for _ in 0..2 { started.extend(submit(&mut state, &small, now, &mut next).1); }
        let (big_id, a) = submit(&mut state, &big, now, &mut next);
        started.extend(a);
        let mut big_started_at = None;
        let longest = *durations.iter().max().unwrap();
        let mut durations = durations.into_iter();
        while big_started_at.is_none() && now < 100_000 {
            for action in std::mem::take(&mut started) {
                if let Action::Start { job, .. } = action {
                    if job == big_id { big_started_at = Some(now); }
                    else { running.push((job, now + durations.next().unwrap_or(1_000))); }
                }
            }
            // Keep the small stream flowing: one new small job every 100 ms.
            now += 100;
            started.extend(submit(&mut state, &small, now, &mut next).1);
            let (done, still): (Vec<_>, Vec<_>) = running.iter().partition(|(_, end)| *end <= now);
            running = still;
            for (job, _) in done {
                started.extend(state.apply(Event::AttemptExited { job, stage: 0, attempt: 1, outcome: Outcome::Succeeded }, now).unwrap());
            }
        }
        let at = big_started_at.expect("big request never started");
        prop_assert!(at <= reserve_after + longest + 200, "started at {at} ms, bound {}", reserve_after + longest);
    }
}

/// What a scenario run checks besides the invariants every run checks.
#[derive(Default)]
struct Checks {
    reserve_after_ms: u64,
    work_conserving: bool,
    gpu_busy: bool,
    differential: bool,
}

fn run_scenario(
    cap: Capacity,
    pipelines: Vec<Pipeline>,
    ops: Vec<Step>,
    check_work_conserving: bool,
) -> Result<(), TestCaseError> {
    // Reservations hold capacity back on purpose, so work conservation is checked without them.
    let reserve_after_ms = if check_work_conserving { u64::MAX } else { 1_500 };
    run_ops(
        cap,
        pipelines,
        ops,
        Checks { reserve_after_ms, work_conserving: check_work_conserving, ..Checks::default() },
    )
}

fn run_differential(
    cap: Capacity,
    pipelines: Vec<Pipeline>,
    ops: Vec<Step>,
    reserve_after_ms: u64,
) -> Result<(), TestCaseError> {
    run_ops(cap, pipelines, ops, Checks { reserve_after_ms, differential: true, ..Checks::default() })
}

fn run_ops(cap: Capacity, pipelines: Vec<Pipeline>, ops: Vec<Step>, checks: Checks) -> Result<(), TestCaseError> {
    let Checks { reserve_after_ms, work_conserving: check_work_conserving, gpu_busy, differential } = checks;
    let pipelines: Vec<Arc<Pipeline>> = pipelines.into_iter().map(Arc::new).collect();
    let config = SchedulerConfig { reserve_after_ms };
    let reference = differential.then(|| {
        let mut state = State::new(cap.clone(), config.clone());
        state.set_reference_scheduler(true);
        state
    });
    let devices = cap.gpus.len();
    let counter = cap.counters["nvenc"];
    let mut h = Harness {
        state: State::new(cap, config),
        reference,
        check_work_conserving,
        check_gpu_busy: gpu_busy,
        reserve_after_ms,
        now: 1_000,
        next_id: 1,
        submitted: BTreeSet::new(),
        finished: BTreeMap::new(),
        succeeded: BTreeSet::new(),
    };
    for (op, defer) in ops {
        match op {
            Op::Submit { pipeline, priority } => {
                let job = JobId(h.next_id);
                h.next_id += 1;
                h.submitted.insert(job);
                let seq = job.0 as u64;
                h.step(Some(Event::Submitted { job, seq, priority, pipeline: pipelines[pipeline].clone() }), defer);
            }
            Op::Restore { pipeline, priority, stages } => {
                let job = JobId(h.next_id);
                h.next_id += 1;
                h.submitted.insert(job);
                let pipeline = pipelines[pipeline].clone();
                let stages = restored_stages(&pipeline, &stages, h.now);
                for (i, s) in stages.iter().enumerate() {
                    if s.status == RestoredStatus::Succeeded {
                        h.succeeded.insert((job, i));
                    }
                }
                h.step(Some(Event::Restored { job, seq: job.0 as u64, priority, pipeline, stages }), defer);
            }
            Op::Exit { lease, outcome } => {
                let running = h.running();
                if running.is_empty() {
                    continue;
                }
                let (job, stage, attempt) = running[lease.index(running.len())];
                let outcome = match outcome {
                    0 | 1 => Outcome::Succeeded,
                    2 => Outcome::Failed { error: "exit status 1".into(), retryable: true },
                    3 => Outcome::Failed { error: "bad input".into(), retryable: false },
                    4 => Outcome::Interrupted { error: "its worker instance crashed".into(), ran: true },
                    _ => Outcome::Interrupted { error: "queued on a worker that crashed".into(), ran: false },
                };
                h.step(Some(Event::AttemptExited { job, stage, attempt, outcome }), defer);
            }
            Op::Stop { lease } => {
                let running = h.running();
                if running.is_empty() {
                    continue;
                }
                let (job, stage, attempt) = running[lease.index(running.len())];
                h.step(Some(Event::StopAttempt { job, stage, attempt, error: "gpu_check: fail".into() }), defer);
            }
            Op::Cancel { job } => {
                let active: Vec<JobId> = h.state.jobs().map(|j| j.id).collect();
                if active.is_empty() {
                    continue;
                }
                h.step(Some(Event::CancelRequested { job: active[job.index(active.len())] }), defer);
            }
            Op::Advance { ms, tick } => {
                h.now += ms;
                if tick {
                    h.step(Some(Event::Tick), defer);
                }
            }
            Op::Counter { available } => {
                h.step(Some(Event::CounterAvailable { name: "nvenc".into(), available }), defer);
            }
            Op::Foreign { device, gib } => {
                let device = if devices == 0 { 0 } else { device.index(devices) as u32 };
                h.step(Some(Event::GpuForeign { device, bytes: gib * GIB }), defer);
            }
            Op::Pass => h.step(None, false),
            Op::Duration { stage, ms } => {
                // Any stage of any pipeline (they share the name `p`, as one pipeline would
                // after a reload).
                let stages: Vec<&str> =
                    pipelines.iter().flat_map(|p| p.stages.iter().map(|s| s.name.as_str())).collect();
                let name = stages[stage.index(stages.len())];
                h.state.record_duration("p", name, ms);
                if let Some(reference) = &mut h.reference {
                    reference.record_duration("p", name, ms);
                }
            }
        }
    }
    // Whatever was only handled gets its pass; then the devices and the counter come back whole.
    h.step(None, false);
    for device in 0..devices as u32 {
        h.apply(Event::GpuForeign { device, bytes: 0 });
    }
    h.apply(Event::CounterAvailable { name: "nvenc".into(), available: counter });
    // Drain: everything that runs exits (killed ones exit as failed), time moves on.
    for _ in 0..2_000 {
        if h.state.jobs().next().is_none() {
            break;
        }
        for (job, stage, attempt) in h.running() {
            h.apply(Event::AttemptExited { job, stage, attempt, outcome: Outcome::Succeeded });
        }
        h.now += 1_000;
        h.apply(Event::Tick);
    }
    prop_assert!(h.state.jobs().next().is_none(), "some job never finished");
    prop_assert!(h.state.inventory().is_idle(), "a lease was not returned: {:?}", h.state.inventory().usage());
    prop_assert_eq!(h.state.next_wakeup().is_some_and(|t| t > h.now + 10_000), false);
    let finished: BTreeSet<JobId> = h.finished.keys().copied().collect();
    prop_assert_eq!(finished, h.submitted);
    Ok(())
}

fn stage(name: &str, needs: ResourceRequest, after: Vec<usize>) -> StageSpec {
    StageSpec { name: name.into(), needs, after, timeout_ms: None, retry: RetryPolicy::no_retry(), expected_ms: None }
}

#[test]
fn failure_cancels_pending_and_stops_running_siblings() {
    let cap = Capacity { gpus: vec![], cpu: 4, counters: BTreeMap::new() };
    let mut state = State::new(cap, SchedulerConfig::default());
    let cpu = ResourceRequest { cpu: 1, ..Default::default() };
    // a and b run in parallel; c needs both.
    let p = Arc::new(
        Pipeline::new(
            "p",
            vec![stage("a", cpu.clone(), vec![]), stage("b", cpu.clone(), vec![]), stage("c", cpu, vec![0, 1])],
        )
        .unwrap(),
    );
    let job = JobId(1);
    let started = state.apply(Event::Submitted { job, seq: 1, priority: 0, pipeline: p }, 0).unwrap();
    assert_eq!(started.iter().filter(|a| matches!(a, Action::Start { .. })).count(), 2);
    let actions = state
        .apply(
            Event::AttemptExited {
                job,
                stage: 0,
                attempt: 1,
                outcome: Outcome::Failed { error: "boom".into(), retryable: false },
            },
            10,
        )
        .unwrap();
    assert!(actions.contains(&Action::StageCancelled { job, stage: 2 }));
    assert!(actions.contains(&Action::Kill { job, stage: 1, attempt: 1, reason: KillReason::JobFailed }));
    assert!(!actions.iter().any(|a| matches!(a, Action::JobFinished { .. })), "job ends only when b has exited");
    let actions = state
        .apply(
            Event::AttemptExited {
                job,
                stage: 1,
                attempt: 1,
                outcome: Outcome::Failed { error: "SIGTERM".into(), retryable: true },
            },
            20,
        )
        .unwrap();
    let finished = actions.iter().find_map(|a| match a {
        Action::JobFinished { state, error, .. } => Some((*state, error.clone().unwrap())),
        _ => None,
    });
    let (final_state, error) = finished.expect("job finished");
    assert_eq!(final_state, JobState::Failed);
    assert!(error.contains("stage `a` failed: boom"), "{error}");
    assert!(state.inventory().is_idle());
}

#[test]
fn timeout_kills_then_retries_with_backoff() {
    let cap = Capacity { gpus: vec![GpuDevice { index: 0, memory: 16 * GIB }], cpu: 1, counters: BTreeMap::new() };
    let mut state = State::new(cap, SchedulerConfig::default());
    let mut spec = stage("slow", ResourceRequest { gpus: 1, ..Default::default() }, vec![]);
    spec.timeout_ms = Some(1_000);
    spec.retry = RetryPolicy { max_attempts: 2, initial_backoff_ms: 500, multiplier: 2.0, max_backoff_ms: 10_000 };
    let job = JobId(7);
    state
        .apply(
            Event::Submitted { job, seq: 1, priority: 0, pipeline: Arc::new(Pipeline::new("p", vec![spec]).unwrap()) },
            0,
        )
        .unwrap();
    assert_eq!(state.next_wakeup(), Some(1_000));
    let kill = state.apply(Event::Tick, 1_000).unwrap();
    assert_eq!(kill, vec![Action::Kill { job, stage: 0, attempt: 1, reason: KillReason::Timeout }]);
    // The GPU stays leased until the process has really exited.
    assert!(!state.inventory().is_idle());
    let ended = state
        .apply(
            Event::AttemptExited {
                job,
                stage: 0,
                attempt: 1,
                outcome: Outcome::Failed { error: "signal 15".into(), retryable: true },
            },
            1_200,
        )
        .unwrap();
    assert!(matches!(
        ended[0],
        Action::AttemptEnded { result: AttemptResult::TimedOut, next: StageNext::Retry { at: 1_700 }, .. }
    ));
    assert!(state.inventory().is_idle());
    let restarted = state.apply(Event::Tick, 1_700).unwrap();
    assert!(matches!(restarted[0], Action::Start { attempt: 2, .. }));
}

#[test]
fn restore_requeues_interrupted_attempts_without_spending_retries() {
    let cap = Capacity { gpus: vec![], cpu: 1, counters: BTreeMap::new() };
    let mut state = State::new(cap, SchedulerConfig::default());
    let cpu = ResourceRequest { cpu: 1, ..Default::default() };
    let p = Arc::new(Pipeline::new("p", vec![stage("a", cpu.clone(), vec![]), stage("b", cpu, vec![0])]).unwrap());
    let job = JobId(3);
    let stages = vec![
        RestoredStage { status: RestoredStatus::Succeeded, attempts: 1, failures: 0, interruptions: 0 },
        RestoredStage { status: RestoredStatus::WasRunning { attempt: 1 }, attempts: 1, failures: 0, interruptions: 0 },
    ];
    let actions = state.apply(Event::Restored { job, seq: 1, priority: 0, pipeline: p, stages }, 50).unwrap();
    assert!(matches!(
        actions[0],
        Action::AttemptEnded {
            stage: 1,
            result: AttemptResult::Interrupted,
            counters: StageCounters { failures: 0, interruptions: 1 },
            ..
        }
    ));
    // Stage a succeeded before the crash and is not started again; b gets attempt 2.
    assert_eq!(actions.iter().filter(|a| matches!(a, Action::Start { .. })).count(), 1);
    assert!(actions.iter().any(|a| matches!(a, Action::Start { stage: 1, attempt: 2, .. })));
}

#[test]
fn higher_priority_goes_first_then_arrival() {
    let cap = Capacity { gpus: vec![GpuDevice { index: 0, memory: GIB }], cpu: 8, counters: BTreeMap::new() };
    let mut state = State::new(cap, SchedulerConfig::default());
    let gpu = Arc::new(
        Pipeline::new("g", vec![stage("g", ResourceRequest { gpus: 1, ..Default::default() }, vec![])]).unwrap(),
    );
    for (id, priority) in [(1u128, 0), (2, 0), (3, 5), (4, 0)] {
        state.apply(Event::Submitted { job: JobId(id), seq: id as u64, priority, pipeline: gpu.clone() }, 0).unwrap();
    }
    let order: Vec<JobId> = state.waiting().map(|w| w.job).collect();
    assert_eq!(order, vec![JobId(3), JobId(2), JobId(4)], "job 1 runs; 3 has priority; then arrival order");
}

/// Drains 50,000 queued single-CPU stages through 2 CPU slots, one exit at a time, and prints
/// how long it took. Timing only, no assertion: run it with
/// `cargo test -p gpuflow-core --release -- --ignored drain_timing --nocapture`.
#[test]
#[ignore = "timing; run by hand in release"]
fn drain_timing() {
    const JOBS: u128 = 50_000;
    let cap = Capacity { gpus: vec![], cpu: 2, counters: BTreeMap::new() };
    let mut state = State::new(cap, SchedulerConfig::default());
    let p = Arc::new(
        Pipeline::new("p", vec![stage("s", ResourceRequest { cpu: 1, ..Default::default() }, vec![])]).unwrap(),
    );
    let mut now = 0;
    let mut running = std::collections::VecDeque::new();
    let started_at = std::time::Instant::now();
    let collect = |actions: Vec<Action>, running: &mut std::collections::VecDeque<(JobId, usize, u32)>| {
        for a in actions {
            if let Action::Start { job, stage, attempt, .. } = a {
                running.push_back((job, stage, attempt));
            }
        }
    };
    for id in 1..=JOBS {
        now += 1;
        let actions = state
            .apply(Event::Submitted { job: JobId(id), seq: id as u64, priority: 0, pipeline: p.clone() }, now)
            .unwrap();
        collect(actions, &mut running);
    }
    let submitted = started_at.elapsed();
    let mut finished = 0;
    while let Some((job, stage, attempt)) = running.pop_front() {
        now += 1;
        let actions =
            state.apply(Event::AttemptExited { job, stage, attempt, outcome: Outcome::Succeeded }, now).unwrap();
        finished += actions.iter().filter(|a| matches!(a, Action::JobFinished { .. })).count();
        collect(actions, &mut running);
    }
    assert_eq!(finished as u128, JOBS);
    assert!(state.inventory().is_idle());
    println!(
        "drain_timing: {JOBS} single-CPU stages on 2 slots: submit {:?}, drain {:?}, total {:?}",
        submitted,
        started_at.elapsed() - submitted,
        started_at.elapsed()
    );
}
