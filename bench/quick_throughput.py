#!/usr/bin/env python3
"""Engine throughput with a process spawned per stage, against a bare spawn loop measured in
the same run (fork/exec is the bound), plus submit-to-done latency on an idle engine.

Usage: python3 bench/quick_throughput.py [--jobs 1000] [--bin target/release/gpuflow]
Prints a table and writes bench/quick_throughput.json. Standard library only."""
import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import tempfile
import time

from engine import call, start, stop, wait_drained, write_config

ap = argparse.ArgumentParser()
ap.add_argument("--jobs", type=int, default=1000)
ap.add_argument("--bin", default="target/release/gpuflow")
ap.add_argument("--slots", type=int, default=2)
args = ap.parse_args()


def bare_spawn_rate(n, slots):
    """`true` spawned n times, `slots` at a time: the ceiling for process-per-stage."""
    start = time.perf_counter()
    running = []
    for _ in range(n):
        if len(running) >= slots:
            running.pop(0).wait()
        running.append(subprocess.Popen(["true"]))
    for p in running:
        p.wait()
    return n / (time.perf_counter() - start)


with tempfile.TemporaryDirectory() as d:
    cfg = write_config(d, f"""resources: {{gpus: none, cpu: {args.slots}}}
pipelines:
  noop:
    max_queued: {args.jobs + 10}
    stages: [{{name: s, command: ["true"], needs: {{cpu: 1}}}}]
""")
    engine, base = start(args.bin, cfg, d)
    try:

        # Submit-to-done for one job at a time on an idle engine.
        latencies = []
        for _ in range(30):
            t = time.perf_counter()
            job = call(base, "POST", "/v1/jobs", {"pipeline": "noop"})
            while call(base, "GET", f"/v1/jobs/{job['id']}")["state"] != "succeeded":
                time.sleep(0.001)
            latencies.append((time.perf_counter() - t) * 1000)

        began = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda _: call(base, "POST", "/v1/jobs", {"pipeline": "noop"})["id"], range(args.jobs)))
        submitted = time.perf_counter()
        wait_drained(base)
        finished = time.perf_counter()
    finally:
        stop(engine)

bare = bare_spawn_rate(args.jobs, args.slots)
engine_rate = args.jobs / (finished - began)
result = {
    "jobs": args.jobs,
    "cpu_slots": args.slots,
    "submit_rate_per_s": round(args.jobs / (submitted - began), 1),
    "completed_per_s": round(engine_rate, 1),
    "bare_spawn_per_s": round(bare, 1),
    "ratio_to_bare_spawn": round(engine_rate / bare, 3),
    "idle_submit_to_done_ms_p50": round(statistics.median(latencies), 2),
    "idle_submit_to_done_ms_max": round(max(latencies), 2),
}
print(f"{'metric':<32} value")
for k, v in result.items():
    print(f"{k:<32} {v}")
with open(os.path.join(os.path.dirname(__file__), "quick_throughput.json"), "w") as f:
    json.dump(result, f, indent=2)
