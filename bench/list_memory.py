#!/usr/bin/env python3
"""Memory of job listings with big inputs: 400 stored jobs with 900 KiB inputs, then 40
`GET /v1/jobs?limit=500`, 8 at a time. Reports the engine's RSS when idle (the baseline, in
the same run) and its peak during the listings, as a ratio and a difference. The bound is
peak - idle < 100 MiB.

Usage: python3 bench/list_memory.py [--bin target/release/gpuflow]"""
import argparse
import concurrent.futures
import tempfile
import threading
import time
import urllib.request

from engine import call, start, stop, write_config, write_result

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default="target/release/gpuflow")
ap.add_argument("--jobs", type=int, default=400)
ap.add_argument("--input-kib", type=int, default=900)
args = ap.parse_args()


def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


MIB = 1 << 20
with tempfile.TemporaryDirectory() as d:
    cfg = write_config(d, """resources: {gpus: none, cpu: 2}
limits: {max_request_body: 2MiB}
diagnosis: {sample_interval: 1h}
pipelines:
  big: {max_queued: 100000, stages: [{name: s, command: ["gpuflow:noop"]}]}
""")
    engine, base = start(args.bin, cfg, d)
    try:
        start_rss = rss(engine.pid)
        pad = "x" * (args.input_kib * 1024)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: call(base, "POST", "/v1/jobs", {"pipeline": "big", "input": {"pad": pad}}), range(args.jobs)))
        while call(base, "GET", "/v1/jobs?state=succeeded&limit=500")["jobs"].__len__() < args.jobs:
            time.sleep(0.1)
        time.sleep(0.5)
        idle = rss(engine.pid)
        peak = [idle]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss(engine.pid))
                time.sleep(0.002)

        sampler = threading.Thread(target=sample)
        sampler.start()
        sizes = []
        t = time.perf_counter()

        def listing(_):
            with urllib.request.urlopen(base + "/v1/jobs?limit=500", timeout=120) as r:
                return len(r.read())

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            sizes = list(pool.map(listing, range(40)))
        elapsed = time.perf_counter() - t
        done.set()
        sampler.join()
        result = {
            "jobs": args.jobs,
            "input_kib": args.input_kib,
            "rss_at_start_mib": round(start_rss / MIB, 1),
            "rss_idle_mib": round(idle / MIB, 1),
            "rss_peak_mib": round(peak[0] / MIB, 1),
            "peak_over_idle_mib": round((peak[0] - idle) / MIB, 1),
            "peak_to_idle_ratio": round(peak[0] / idle, 3),
            "response_bytes": max(sizes),
            "listings_per_s": round(40 / elapsed, 1),
        }
        for k, v in result.items():
            print(f"{k}: {v}")
        assert peak[0] - idle < 100 * MIB, "over the 100 MiB bound"
    finally:
        stop(engine)
write_result("list_memory", result)
