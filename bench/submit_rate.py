#!/usr/bin/env python3
"""Submission alone: jobs are accepted durably but none can start (their counter is held),
so this measures admission (HTTP, validation, one insert transaction, one scheduler step).

Usage: python3 bench/submit_rate.py [--bin target/release/gpuflow] [--jobs 1000]"""
import argparse
import concurrent.futures
import tempfile
import time

from engine import call, start, stop, write_config, write_result

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default="target/release/gpuflow")
ap.add_argument("--jobs", type=int, default=1000)
args = ap.parse_args()

with tempfile.TemporaryDirectory() as d:
    cfg = write_config(d, """resources: {gpus: none, cpu: 2, counters: {slot: 1}}
diagnosis: {sample_interval: 1h}
pipelines:
  p: {max_queued: 1000000, stages: [{name: s, needs: {counters: {slot: 1}}, command: [sleep, "600"]}]}
""")
    engine, base = start(args.bin, cfg, d)
    result = {"jobs": args.jobs}
    try:
        for threads in (1, 8):
            t = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda _: call(base, "POST", "/v1/jobs", {"pipeline": "p"}), range(args.jobs)))
            rate = args.jobs / (time.perf_counter() - t)
            result[f"submits_per_s_{threads}_threads"] = round(rate, 1)
            print(f"{threads} client threads: {rate:.0f} submits/s (queued, nothing runs)")
    finally:
        stop(engine)
write_result("submit_rate", result)
