#!/usr/bin/env python3
"""Report 004's six-stage chain against the ideal makespan bound.

extract (CPU 2), detect (GPU 1), crop (GPU 2), stitch (CPU 1), ocr (GPU 3), finalize (CPU 1),
as sleep commands scaled by --scale seconds per unit. For N jobs on G virtual GPUs and C CPU
slots the lower bound is max(total GPU work / G, total CPU work / C, one job's critical path);
the run reports the measured makespan, its ratio to the bound, and the GPU busy fraction.
The same workload with every stage declaring `gpu: 1` (report 004's global lock) runs too.

Usage: python3 bench/mixed_bound.py [--scale 0.1] [--bin target/release/gpuflow]
Writes bench/mixed_bound.json. Standard library only."""
import argparse
import concurrent.futures
import datetime
import json
import os
import tempfile

from engine import call, start, stop, wait_drained, write_config

ap = argparse.ArgumentParser()
ap.add_argument("--scale", type=float, default=0.1)
ap.add_argument("--bin", default="target/release/gpuflow")
ap.add_argument("--cpu", type=int, default=2)
args = ap.parse_args()

CHAIN = [("extract", "cpu", 2), ("detect", "gpu", 1), ("crop", "gpu", 2), ("stitch", "cpu", 1), ("ocr", "gpu", 3), ("finalize", "cpu", 1)]


def ts(s):
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def run(n, gpus, global_lock):
    stages = []
    for name, kind, units in CHAIN:
        needs = "{gpu: 1}" if (kind == "gpu" or global_lock) else "{cpu: 1}"
        stages.append(f'      - {{name: {name}, needs: {needs}, command: [sleep, "{units * args.scale:.3f}"]}}')
    with tempfile.TemporaryDirectory() as d:
        cfg = write_config(d, f"""resources:
  gpus: [{", ".join(["{memory: 80GiB}"] * gpus)}]
  cpu: {args.cpu}
diagnosis: {{sample_interval: 1h}}
pipelines:
  chain:
    max_queued: {n + 1}
    stages:
""" + "\n".join(stages) + "\n")
        engine, base = start(args.bin, cfg, d)
        try:
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                ids = list(pool.map(lambda _: call(base, "POST", "/v1/jobs", {"pipeline": "chain"})["id"], range(n)))
            wait_drained(base)
            jobs = [call(base, "GET", f"/v1/jobs/{i}") for i in ids]
        finally:
            stop(engine)
    assert all(j["state"] == "succeeded" for j in jobs), [j["state"] for j in jobs]
    spans = [(s["name"], ts(s["started_at"]), ts(s["finished_at"])) for j in jobs for s in j["stages"]]
    first = min(a for _, a, _ in spans)
    end = max(b for _, _, b in spans)
    makespan = end - first
    gpu_units = sum(u for _, k, u in CHAIN if k == "gpu") * n * args.scale
    cpu_units = sum(u for _, k, u in CHAIN if k == "cpu") * n * args.scale
    critical = sum(u for _, _, u in CHAIN) * args.scale
    # Under the global lock every stage holds a GPU: the bound is all work on the GPUs.
    bound = max((gpu_units + cpu_units) / gpus, critical) if global_lock else max(gpu_units / gpus, cpu_units / args.cpu, critical)
    gpu_busy = sum(b - a for name, a, b in spans if global_lock or dict((c[0], c[1]) for c in CHAIN)[name] == "gpu")
    return {
        "jobs": n,
        "gpus": gpus,
        "cpu_slots": args.cpu,
        "global_lock": global_lock,
        "bound_s": round(bound, 3),
        "makespan_s": round(makespan, 3),
        "ratio": round(makespan / bound, 4),
        "gpu_busy_fraction": round(gpu_busy / (makespan * gpus), 4),
    }


results = []
for n in (6, 24):
    for gpus in (1, 2):
        results.append(run(n, gpus, False))
results.append(run(24, 1, True))
results.append(run(24, 2, True))
print(f"scale {args.scale} s/unit, goal: ratio <= 1.03 at N = 24")
print(f"{'N':>3} {'GPUs':>4} {'lock':>5} {'bound s':>8} {'makespan s':>10} {'ratio':>7} {'GPU busy':>8}")
for r in results:
    print(f"{r['jobs']:>3} {r['gpus']:>4} {('yes' if r['global_lock'] else 'no'):>5} {r['bound_s']:>8} {r['makespan_s']:>10} {r['ratio']:>7} {r['gpu_busy_fraction']:>8}")
with open(os.path.join(os.path.dirname(__file__), "mixed_bound.json"), "w") as f:
    json.dump({"scale_s_per_unit": args.scale, "results": results}, f, indent=2)
