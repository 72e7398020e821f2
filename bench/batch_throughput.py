#!/usr/bin/env python3
"""Tasks/s through a pool of no-op batching workers (bench/batch_worker.py) with
`batch: {max_size: 32}`, against the same pool without `batch:` in the same run (the same
worker, one task per message): the goal is a ratio of at least 5.

One-stage jobs `{worker: noop}` submitted through the batch endpoint (1,000 per request), every
transition durable (SQLite WAL, synchronous=FULL), the pool's default `prefetch: 1`. Each
figure is jobs / (last job final - first submission).
Usage: python3 bench/batch_throughput.py [--jobs 10000] [--instances 2] [--max-size 32]
       [--max-wait 2ms] [--bin target/release/gpuflow]
Prints a table and writes bench/batch_throughput.json. Standard library only."""
import argparse
import os
import sys
import tempfile
import time

from engine import call, start, stop, submit_batches, wait_drained, with_sdk_on_path, write_config, write_result

GOAL = 5.0
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "batch_worker.py")


def rate(binary, n, instances, batch):
    """Completed jobs/s through the pool; `batch` is the pool's `batch:` line or ''."""
    with tempfile.TemporaryDirectory() as d:
        cfg = write_config(d, f"""resources: {{gpus: none, cpu: 2}}
diagnosis: {{sample_interval: 1h}}
workers:
  noop: {{command: [{sys.executable}, {WORKER}], instances: {instances}, needs: {{}}, heartbeat_timeout: 30s{batch}}}
pipelines:
  p: {{max_queued: {n + 10}, stages: [{{name: s, worker: noop}}]}}
""")
        engine, base = start(binary, cfg, d)
        try:
            while sum(i["state"] == "idle" for i in call(base, "GET", "/v1/resources")["pools"][0]["instances"]) < instances:
                time.sleep(0.05)
            t = time.perf_counter()
            ids = submit_batches(base, "p", n, threads=2)
            wait_drained(base)
            done = time.perf_counter()
            assert len(ids) == n
            failed = call(base, "GET", "/v1/jobs?state=failed&limit=1")["jobs"]
            assert not failed, failed
            sizes = [call(base, "GET", f"/v1/jobs/{i}")["stages"][0]["attempt_history"][0]["batch_size"] for i in ids[:: max(1, n // 200)]]
        finally:
            stop(engine)
    return n / (done - t), sum(sizes) / len(sizes)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10000)
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--max-size", type=int, default=32)
    ap.add_argument("--max-wait", default="2ms")
    ap.add_argument("--bin", default="target/release/gpuflow")
    args = ap.parse_args(argv)
    with_sdk_on_path()
    unbatched, _ = rate(args.bin, args.jobs, args.instances, "")
    batched, mean_size = rate(args.bin, args.jobs, args.instances, f", batch: {{max_size: {args.max_size}, max_wait: {args.max_wait}}}")
    result = {
        "jobs": args.jobs,
        "instances": args.instances,
        "max_size": args.max_size,
        "max_wait": args.max_wait,
        "unbatched_per_s": round(unbatched, 1),
        "batched_per_s": round(batched, 1),
        "mean_batch_size_sampled": round(mean_size, 1),
        "ratio": round(batched / unbatched, 2),
        "goal_ratio": GOAL,
    }
    for k, v in result.items():
        print(f"{k:<26} {v}")
    return write_result("batch_throughput", result)


if __name__ == "__main__":
    main()
