#!/usr/bin/env python3
"""The watchdog's own cost: engine CPU % with N running tasks at a 1 s diagnosis interval,
against the same engine and tasks with diagnosis effectively off (a 1 h interval), measured
in the same run.

Usage: python3 bench/watchdog_overhead.py [--tasks 100] [--seconds 20] [--bin target/release/gpuflow]"""
import argparse
import json
import os
import tempfile
import time

from engine import call, start, stop, write_config

ap = argparse.ArgumentParser()
ap.add_argument("--tasks", type=int, default=100)
ap.add_argument("--seconds", type=float, default=20)
ap.add_argument("--bin", default="target/release/gpuflow")
args = ap.parse_args()
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def measure(interval):
    with tempfile.TemporaryDirectory() as d:
        cfg = write_config(d, f"""resources: {{gpus: [{{memory: 80GiB, telemetry: {d}/gpu.json}}], cpu: 2}}
diagnosis: {{sample_interval: {interval}}}
pipelines:
  hold:
    max_queued: {args.tasks + 1}
    stages: [{{name: s, needs: {{}}, command: [sleep, "600"]}}]
""")
        with open(f"{d}/gpu.json", "w") as f:
            json.dump({"utilization": 50, "memory_used": 1 << 30, "processes": []}, f)
        engine, base = start(args.bin, cfg, d)
        try:
            for _ in range(args.tasks):
                call(base, "POST", "/v1/jobs", {"pipeline": "hold"})
            while len(call(base, "GET", "/v1/resources")["leases"]) < args.tasks:
                time.sleep(0.1)
            time.sleep(2)
            before, t0 = cpu_seconds(engine.pid), time.monotonic()
            time.sleep(args.seconds)
            used, wall = cpu_seconds(engine.pid) - before, time.monotonic() - t0
        finally:
            stop(engine)
    return 100.0 * used / wall


on = measure("1s")
off = measure("1h")
result = {"tasks": args.tasks, "seconds": args.seconds, "engine_cpu_pct_diagnosis_1hz": round(on, 2), "engine_cpu_pct_diagnosis_off": round(off, 2), "watchdog_cpu_pct": round(on - off, 2)}
for k, v in result.items():
    print(f"{k:<34} {v}")
with open(os.path.join(os.path.dirname(__file__), "watchdog_overhead.json"), "w") as f:
    json.dump(result, f, indent=2)
