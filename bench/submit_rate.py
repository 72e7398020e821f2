#!/usr/bin/env python3
"""Submission alone: jobs are accepted durably but none can start (their counter is held),
so this measures admission (HTTP, validation, one insert transaction, one scheduler step).

Usage: python3 bench/submit_rate.py [--bin target/release/gpuflow] [--jobs 1000]"""
import argparse
import concurrent.futures, json, os, subprocess, tempfile, time, urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default="target/release/gpuflow")
ap.add_argument("--jobs", type=int, default=1000)
args = ap.parse_args()
def call(base, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)
with tempfile.TemporaryDirectory() as d:
    cfg = os.path.join(d, "c.yaml")
    open(cfg, "w").write(f"""listen: 127.0.0.1:0
data_dir: {d}/data
resources: {{gpus: none, cpu: 2, counters: {{slot: 1}}}}
diagnosis: {{sample_interval: 1h}}
pipelines:
  p: {{max_queued: 1000000, stages: [{{name: s, needs: {{counters: {{slot: 1}}}}, command: [sleep, "600"]}}]}}
""")
    e = subprocess.Popen([args.bin, "serve", "--config", cfg], stderr=subprocess.DEVNULL)
    try:
        addr = os.path.join(d, "data", "listen.addr")
        while not os.path.exists(addr): time.sleep(0.05)
        time.sleep(0.2)
        base = "http://" + open(addr).read().strip()
        for threads in (1, 8):
            t = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda _: call(base, "POST", "/v1/jobs", {"pipeline": "p"}), range(args.jobs)))
            print(f"{threads} client threads: {args.jobs / (time.perf_counter() - t):.0f} submits/s (queued, nothing runs)")
    finally:
        e.terminate(); e.wait()
