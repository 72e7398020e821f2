#!/usr/bin/env python3
"""The six-stage video OCR chain (examples/chain) against its makespan bound, fill and drain included.

The chain: extract (CPU 2), detect (GPU 1), crop (GPU 2), stitch (CPU 1), ocr (GPU 3),
finalize (CPU 1), in units of --scale seconds, as examples/chain/ runs it: N jobs on warm pools
(a CPU pool of 4 instances and a GPU pool with one instance per GPU, each holding its device,
stage work simulated by the SDK worker sleeping), or with --commands a fresh process per stage
(examples/chain/stage.py, 4 CPU slots).

The bound. Take e, d, c, s, o, f for the six durations, G GPUs and C = 4 CPU slots. No GPU
stage can start before some job's extract has run (fill: e), the GPUs have N(d + c + o) of work
between them, and the job whose GPU stage ends last still has at least its finalize to run
after it (drain: f). The CPU side and a single job give two more lower bounds:

    bound = max(e + N(d + c + o) / G + f,   N(e + s + f) / C,   e + d + c + s + o + f)

With --commands every stage also pays its process start-up inside its lease. Measured per
attempt as the time its process first ran (`began`, taken by stage.py on its first line) minus
the attempt's start in the API, the mean start-up of each stage is added to that stage's
duration in the bound above ("bound + measured process start-ups").

bench/mixed_bound.py runs the same chain as `sleep` commands against a bound without fill and
drain (max(GPU work / G, CPU work / C, one job)); this one is the chain of examples/chain/.

Figures: makespan (first stage start to last stage end, from the API) / bound, and the GPU busy
fraction: the GPU stages' own working time (`began` to `ended`, written by the worker or the
stage process) over G × makespan. The goal rows of issue #12 run with --goals.

Usage: python3 bench/chain.py [--jobs 6] [--gpus 1] [--scale 1] [--commands]
                              [--goals] [--bin target/release/gpuflow] [--json bench/chain.json]
Standard library only."""
import argparse
import concurrent.futures
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine import call, start, stop, ts_ms, wait_drained, with_sdk_on_path, write_config  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
EXAMPLE = os.path.join(ROOT, "examples", "chain")
CHAIN = [("extract", "cpu", 2), ("detect", "gpu", 1), ("crop", "gpu", 2), ("stitch", "cpu", 1), ("ocr", "gpu", 3), ("finalize", "cpu", 1)]
KIND = {name: kind for name, kind, _ in CHAIN}
CPU_SLOTS = 4
# issue #12's goal rows: (commands, gpus, jobs, scale, goal)
GOALS = [(False, 2, 24, 0.25, 1.02), (False, 1, 6, 1.0, 1.01), (False, 1, 24, 0.25, 1.01), (True, 1, 6, 1.0, 1.03)]


def config(gpus, scale, jobs, commands):
    devices = ", ".join(["{memory: 80GiB}"] * gpus)
    head = f"resources:\n  gpus: [{devices}]\n  cpu: {CPU_SLOTS if commands else CPU_SLOTS + gpus}\ndiagnosis: {{sample_interval: 1h}}\n"
    stages = []
    if commands:
        for name, kind, _ in CHAIN:
            needs = "{gpu: 1}" if kind == "gpu" else "{cpu: 1}"
            stages.append(f'      - {{name: {name}, needs: {needs}, command: [python3, "{EXAMPLE}/stage.py", {name}], env: {{CHAIN_SCALE: "{scale}"}}}}')
        pools = ""
    else:
        worker = f'[python3, "{EXAMPLE}/chain_worker.py"]'
        pools = (f"workers:\n"
                 f"  cpu: {{command: {worker}, instances: {CPU_SLOTS}, needs: {{cpu: 1}}, env: {{CHAIN_SCALE: \"{scale}\"}}}}\n"
                 f"  gpu: {{command: {worker}, per_gpu: 1, needs: {{gpu: 1}}, env: {{CHAIN_SCALE: \"{scale}\"}}}}\n")
        for name, kind, _ in CHAIN:
            stages.append(f"      - {{name: {name}, worker: {kind}}}")
    return head + pools + f"pipelines:\n  chain:\n    max_queued: {jobs + 1}\n    stages:\n" + "\n".join(stages) + "\n"


def bound(jobs, gpus, seconds):
    """The formula of the docstring, with `seconds` the six stage durations by name."""
    e, d, c, s, o, f = (seconds[name] for name, _, _ in CHAIN)
    return max(e + jobs * (d + c + o) / gpus + f, jobs * (e + s + f) / CPU_SLOTS, e + d + c + s + o + f)


def run(binary, jobs, gpus, scale, commands):
    with tempfile.TemporaryDirectory() as d:
        cfg = write_config(d, config(gpus, scale, jobs, commands))
        engine, base = start(binary, cfg, d)
        try:
            if not commands:
                # Warm pools: every instance has sent `ready` before the clock starts.
                while True:
                    pools = call(base, "GET", "/v1/resources").get("pools", [])
                    states = [i.get("state") for p in pools for i in p.get("instances", [])]
                    if len(states) == CPU_SLOTS + gpus and all(s == "idle" for s in states):
                        break
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                ids = list(pool.map(lambda _: call(base, "POST", "/v1/jobs", {"pipeline": "chain"})["id"], range(jobs)))
            wait_drained(base)
            done = [call(base, "GET", f"/v1/jobs/{i}") for i in ids]
        finally:
            stop(engine)
    bad = [j["state"] for j in done if j["state"] != "succeeded"]
    if bad:
        raise RuntimeError(f"{len(bad)} jobs did not succeed: {bad[:3]}")
    stages = [s for j in done for s in j["stages"]]
    first = min(ts_ms(s["started_at"]) for s in stages) / 1000.0
    last = max(ts_ms(s["finished_at"]) for s in stages) / 1000.0
    makespan = last - first
    seconds = {name: units * scale for name, _, units in CHAIN}
    ideal = bound(jobs, gpus, seconds)
    startups = {}
    if commands:
        for name, _, _ in CHAIN:
            ups = [s["output"]["began"] - ts_ms(s["started_at"]) / 1000.0 for s in stages if s["name"] == name]
            startups[name] = sum(ups) / len(ups)
        measured = bound(jobs, gpus, {n: seconds[n] + startups[n] for n in seconds})
    else:
        measured = ideal
    gpu_work = sum(s["output"]["ended"] - s["output"]["began"] for s in stages if KIND[s["name"]] == "gpu")
    return {
        "mode": "commands" if commands else "pools",
        "jobs": jobs,
        "gpus": gpus,
        "scale": scale,
        "bound_s": round(ideal, 3),
        "startup_ms": {n: round(v * 1000, 1) for n, v in startups.items()},
        "bound_with_startups_s": round(measured, 3),
        "makespan_s": round(makespan, 3),
        "ratio": round(makespan / measured, 4),
        "gpu_busy_fraction": round(gpu_work / (gpus * makespan), 4),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--gpus", type=int, default=1, help="virtual GPUs in the inventory (one GPU instance each)")
    ap.add_argument("--scale", type=float, default=1.0, help="seconds per unit of stage duration")
    ap.add_argument("--commands", action="store_true", help="a fresh process per stage instead of warm pools")
    ap.add_argument("--goals", action="store_true", help="run issue #12's four goal rows")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "gpuflow"))
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "chain.json"),
                    help="where to write the results (default bench/chain.json)")
    args = ap.parse_args()
    for name, value in (("--jobs", args.jobs), ("--gpus", args.gpus)):
        if value < 1:
            ap.error(f"{name} must be at least 1, got {value}")
    if not args.scale > 0:
        ap.error(f"--scale must be more than 0, got {args.scale}")
    with_sdk_on_path()
    rows = GOALS if args.goals else [(args.commands, args.gpus, args.jobs, args.scale, None)]
    results = []
    print(f"{'mode':>8} {'N':>3} {'GPUs':>4} {'scale':>5} {'bound s':>8} {'+start-ups':>10} {'makespan s':>10} {'ratio':>7} {'goal':>5} {'GPU busy':>8}")
    for commands, gpus, jobs, scale, goal in rows:
        r = run(args.bin, jobs, gpus, scale, commands)
        r["goal"] = goal
        results.append(r)
        ups = f"{r['bound_with_startups_s']:>10}" if commands else f"{'':>10}"
        print(f"{r['mode']:>8} {jobs:>3} {gpus:>4} {scale:>5} {r['bound_s']:>8} {ups} {r['makespan_s']:>10} {r['ratio']:>7} {goal or '':>5} {r['gpu_busy_fraction']:>8}", flush=True)
    with open(args.json, "w") as f:
        json.dump({"binary": args.bin, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
