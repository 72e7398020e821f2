#!/usr/bin/env python3
"""The engine alone: jobs/s with the built-in no-op executor (`command: [gpuflow:noop]`: no
process, no file, every transition committed: SQLite WAL, synchronous=FULL). Goal: >= 30,000
one-stage jobs/s completed on this 2-core machine.

Two readings per pipeline shape (1 stage, 3 stages):
  - drain: N jobs, submitted with the batch endpoint (1,000 per request), wait behind a counter
    held by `--gate` holder jobs; the holders are cancelled and the time until every job is final
    is measured. That is the scheduler and the store with no HTTP in the way (the rate the goal
    is about).
  - end to end: N/4 jobs submitted through the batch endpoint by 2 client threads until all are
    final (admission and execution overlap).
  - admission: the rate of the drain's batch submissions (jobs/s acknowledged, i.e. committed).
Baseline in the same run, on the same file system: SQLite itself (Python's sqlite3, WAL,
synchronous=FULL) committing one small row per transaction, and 100 rows per transaction. The
engine commits once per turn (group commit), so the batched rows/s is the bound it is set
against: a one-stage job writes 3 rows (job, stage, attempt) in its turn.
Usage: python3 bench/noop_throughput.py [--jobs 50000] [--gate 8] [--bin target/release/gpuflow]"""
import argparse
import os
import sqlite3
import tempfile
import time

from engine import call, start, stop, submit_batches, submit_many, wait_drained, write_config, write_result

GOAL = 30000.0
GOAL_3_STAGES = 10000.0


def sqlite_commits(n=2000, batch=1):
    """Rows/s committed by SQLite alone, `batch` rows per transaction (WAL, synchronous=FULL)."""
    with tempfile.TemporaryDirectory() as d:
        db = sqlite3.connect(os.path.join(d, "b.db"), isolation_level=None)
        db.execute("pragma journal_mode=wal")
        db.execute("pragma synchronous=full")
        db.execute("create table t (id integer primary key, job text, state text, at integer)")
        t = time.perf_counter()
        for i in range(n // batch):
            db.execute("begin")
            for k in range(batch):
                db.execute("insert into t (job, state, at) values (?, 'running', ?)", (f"job-{i}-{k}", i))
            db.execute("commit")
        rate = (n // batch) * batch / (time.perf_counter() - t)
        db.close()
    return rate


def drain(binary, n, stages, gate):
    with tempfile.TemporaryDirectory() as d:
        rest = "".join(f", {{name: s{i}, command: [\"gpuflow:noop\"], needs: {{}}}}" for i in range(1, stages))
        cfg = write_config(d, f"""resources: {{gpus: none, cpu: 2, counters: {{gate: {gate}}}}}
diagnosis: {{sample_interval: 1h}}
pipelines:
  hold: {{max_queued: {gate}, stages: [{{name: s, needs: {{counters: {{gate: 1}}}}, command: [sleep, "3600"]}}]}}
  p: {{max_queued: {n + 10}, stages: [{{name: s0, command: ["gpuflow:noop"], needs: {{counters: {{gate: 1}}}}}}{rest}]}}
""")
        engine, base = start(binary, cfg, d)
        try:
            holders = submit_many(base, "hold", gate, 1)
            while len(call(base, "GET", "/v1/resources")["leases"]) < gate:
                time.sleep(0.01)
            t = time.perf_counter()
            submit_batches(base, "p", n)
            admitted = n / (time.perf_counter() - t)
            t0 = time.perf_counter()
            for h in holders:
                call(base, "POST", f"/v1/jobs/{h}/cancel", {})
            wait_drained(base, interval=0.01)
            elapsed = time.perf_counter() - t0
            assert not call(base, "GET", "/v1/jobs?state=failed&limit=1")["jobs"]
        finally:
            stop(engine)
    return n / elapsed, admitted


def end_to_end(binary, n, stages):
    with tempfile.TemporaryDirectory() as d:
        rest = "".join(f", {{name: s{i}, command: [\"gpuflow:noop\"], needs: {{}}}}" for i in range(1, stages))
        cfg = write_config(d, f"""resources: {{gpus: none, cpu: 2}}
diagnosis: {{sample_interval: 1h}}
pipelines:
  p: {{max_queued: {n + 10}, stages: [{{name: s0, command: ["gpuflow:noop"], needs: {{}}}}{rest}]}}
""")
        engine, base = start(binary, cfg, d)
        try:
            t = time.perf_counter()
            submit_batches(base, "p", n)
            wait_drained(base, interval=0.01)
            elapsed = time.perf_counter() - t
            assert not call(base, "GET", "/v1/jobs?state=failed&limit=1")["jobs"]
        finally:
            stop(engine)
    return n / elapsed


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=50000)
    ap.add_argument("--gate", type=int, default=8, help="holder jobs (and concurrent no-op stages)")
    ap.add_argument("--bin", default="target/release/gpuflow")
    args = ap.parse_args(argv)
    result = {"jobs": args.jobs, "goal_per_s": GOAL}
    for stages in (1, 3):
        rate, admitted = drain(args.bin, args.jobs, stages, args.gate)
        result[f"drain_{stages}_stage_jobs_per_s"] = round(rate, 1)
        result[f"drain_{stages}_stage_stages_per_s"] = round(rate * stages, 1)
        result[f"admission_{stages}_stage_jobs_per_s"] = round(admitted, 1)
        result[f"end_to_end_{stages}_stage_jobs_per_s"] = round(end_to_end(args.bin, args.jobs // 4, stages), 1)
    single, batched = sqlite_commits(2000, 1), sqlite_commits(50000, 100)
    result["sqlite_single_row_commits_per_s"] = round(single, 1)
    result["sqlite_rows_per_s_batched_100"] = round(batched, 1)
    result["ratio_to_goal_1_stage"] = round(result["drain_1_stage_jobs_per_s"] / GOAL, 4)
    result["ratio_to_goal_3_stage"] = round(result["drain_3_stage_jobs_per_s"] / GOAL_3_STAGES, 4)
    # Group commit: SQLite's batched row rate is the bound; a one-stage job writes 3 rows.
    result["ratio_to_sqlite_batched_rows_1_stage"] = round(result["drain_1_stage_jobs_per_s"] / batched, 3)
    result["ratio_to_sqlite_batched_rows_1_stage_3_rows_per_job"] = round(
        3 * result["drain_1_stage_jobs_per_s"] / batched, 3
    )
    for k, v in result.items():
        print(f"{k:<36} {v}")
    return write_result("noop_throughput", result)


if __name__ == "__main__":
    main()
