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
import urllib.request

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


def call(base, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


with tempfile.TemporaryDirectory() as d:
    cfg = os.path.join(d, "bench.yaml")
    with open(cfg, "w") as f:
        f.write(f"""listen: 127.0.0.1:0
data_dir: {d}/data
resources: {{gpus: none, cpu: {args.slots}}}
pipelines:
  noop:
    max_queued: {args.jobs + 10}
    stages: [{{name: s, command: ["true"], needs: {{cpu: 1}}}}]
""")
    engine = subprocess.Popen([args.bin, "serve", "--config", cfg], stderr=subprocess.DEVNULL, env={**os.environ, "GPUFLOW_LOG": "warn"})
    try:
        addr = os.path.join(d, "data", "listen.addr")
        while not os.path.exists(addr):
            time.sleep(0.05)
        time.sleep(0.1)
        base = "http://" + open(addr).read().strip()

        # Submit-to-done for one job at a time on an idle engine.
        latencies = []
        for _ in range(30):
            t = time.perf_counter()
            job = call(base, "POST", "/v1/jobs", {"pipeline": "noop"})
            while call(base, "GET", f"/v1/jobs/{job['id']}")["state"] != "succeeded":
                time.sleep(0.001)
            latencies.append((time.perf_counter() - t) * 1000)

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda _: call(base, "POST", "/v1/jobs", {"pipeline": "noop"})["id"], range(args.jobs)))
        submitted = time.perf_counter()
        # Done when nothing is queued or running any more.
        while any(call(base, "GET", f"/v1/jobs?state={s}&limit=1")["jobs"] for s in ("queued", "running")):
            time.sleep(0.01)
        finished = time.perf_counter()
    finally:
        engine.terminate()
        engine.wait()

bare = bare_spawn_rate(args.jobs, args.slots)
engine_rate = args.jobs / (finished - start)
result = {
    "jobs": args.jobs,
    "cpu_slots": args.slots,
    "submit_rate_per_s": round(args.jobs / (submitted - start), 1),
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
