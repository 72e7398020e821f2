#!/usr/bin/env python3
"""Memory with many queued jobs, and recovery: `kill -9` of the engine to its first dispatch
after a restart, with that many jobs queued.

Jobs are one-stage jobs whose counter is held by a job that never ends, so they stay queued.
Usage: python3 bench/scale_100k.py [--jobs 100000] [--bin target/release/gpuflow]"""
import argparse
import json
import os
import signal
import tempfile
import time

from engine import call, start, stop, submit_batches, wait_ready, write_config

ap = argparse.ArgumentParser()
ap.add_argument("--jobs", type=int, default=100_000)
ap.add_argument("--bin", default="target/release/gpuflow")
args = ap.parse_args()


def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


with tempfile.TemporaryDirectory() as d:
    cfg = write_config(d, f"""resources: {{gpus: none, cpu: 2, counters: {{slot: 1}}}}
diagnosis: {{sample_interval: 1h}}
pipelines:
  hold: {{stages: [{{name: s, needs: {{counters: {{slot: 1}}}}, command: [sleep, "3600"]}}]}}
  queued: {{max_queued: {args.jobs + 1}, stages: [{{name: s, needs: {{counters: {{slot: 1}}}}, command: ["true"]}}]}}
""")
    engine, base = start(args.bin, cfg, d)
    rss_idle = rss_mib(engine.pid)
    holder = call(base, "POST", "/v1/jobs", {"pipeline": "hold"})["id"]
    t = time.perf_counter()
    submit_batches(base, "queued", args.jobs)
    submit_s = time.perf_counter() - t
    time.sleep(1)
    rss_queued = rss_mib(engine.pid)
    waiting = len(call(base, "GET", "/v1/resources")["waiting"])
    engine.send_signal(signal.SIGKILL)
    engine.wait()
    # The holder's `sleep` dies with the restart's sweep; its stage is re-queued first.
    killed_at = time.perf_counter()
    engine, base = start(args.bin, cfg, d, ready=False)
    try:
        # The holder comes first in served order: its interrupted attempt is re-run first. Its
        # second attempt, once recorded, is the first dispatch (read from the store; the API
        # answers reads while recovery runs).
        while len(call(base, "GET", f"/v1/jobs/{holder}")["stages"][0]["attempt_history"]) < 2:
            time.sleep(0.005)
        first_dispatch_s = time.perf_counter() - killed_at
        wait_ready(base)
        recovered_s = time.perf_counter() - killed_at
        rss_recovered = rss_mib(engine.pid)
    finally:
        stop(engine)

result = {
    "queued_jobs": args.jobs,
    "waiting_in_queue": waiting,
    "submit_s": round(submit_s, 1),
    "rss_idle_mib": round(rss_idle, 1),
    "rss_with_queue_mib": round(rss_queued, 1),
    "rss_after_recovery_mib": round(rss_recovered, 1),
    "kill9_to_first_dispatch_s": round(first_dispatch_s, 3),
    "kill9_to_recovered_s": round(recovered_s, 3),
}
for k, v in result.items():
    print(f"{k:<28} {v}")
with open(os.path.join(os.path.dirname(__file__), "scale_100k.json"), "w") as f:
    json.dump(result, f, indent=2)
