#!/usr/bin/env python3
"""Jobs/s through a real worker pool of no-op Python workers (SDK, worker protocol), against
the protocol's own bound measured in the same run: the same worker processes driven directly
over their pipes by a tiny Python driver speaking the NDJSON protocol (no engine, no store).

One-stage jobs `{worker: noop}` submitted through the batch endpoint; every transition durable
(SQLite WAL, synchronous=FULL); the pool's default `prefetch: 1` (each instance holds its next
task while it runs the current one). The direct driver feeds one task at a time.
Usage: python3 bench/pool_throughput.py [--jobs 2000] [--instances 2] [--bin target/release/gpuflow]
Prints a table and writes bench/pool_throughput.json. Standard library only."""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from engine import call, start, stop, submit_batches, wait_drained, with_sdk_on_path, write_config, write_result

GOAL = 5000.0
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_worker.py")


def direct_rate(n, instances):
    """The bound of the protocol itself: `instances` workers, each fed tasks over its pipe one
    at a time (send `task`, read `result`), as the engine does, by one driver thread each."""
    env = {**os.environ, "GPUFLOW_HEARTBEAT_INTERVAL_MS": "7500"}
    procs = [subprocess.Popen([sys.executable, WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env) for _ in range(instances)]
    for p in procs:
        assert json.loads(p.stdout.readline())["type"] == "ready"
    per = n // instances

    def drive(p, k):
        for i in range(per):
            task = {"type": "task", "task": f"{k}/s/{i}", "job_id": str(i), "job_dir": "/tmp", "stage": "s", "attempt": 1, "input": {}, "stages": {}}
            p.stdin.write((json.dumps(task) + "\n").encode())
            p.stdin.flush()
            reply = json.loads(p.stdout.readline())
            assert reply["type"] == "result", reply

    threads = [threading.Thread(target=drive, args=(p, k)) for k, p in enumerate(procs)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t
    for p in procs:
        p.stdin.write(b'{"type":"shutdown"}\n')
        p.stdin.flush()
        p.wait()
    return per * instances / elapsed


def engine_rate(binary, n, instances, threads, prefetch):
    with tempfile.TemporaryDirectory() as d:
        cfg = write_config(d, f"""resources: {{gpus: none, cpu: 2}}
diagnosis: {{sample_interval: 1h}}
workers:
  noop: {{command: [{sys.executable}, {WORKER}], instances: {instances}, prefetch: {prefetch}, needs: {{}}, heartbeat_timeout: 30s}}
pipelines:
  p: {{max_queued: {n + 10}, stages: [{{name: s, worker: noop}}]}}
""")
        engine, base = start(binary, cfg, d)
        try:
            while sum(i["state"] == "idle" for i in call(base, "GET", "/v1/resources")["pools"][0]["instances"]) < instances:
                time.sleep(0.05)
            t = time.perf_counter()
            ids = submit_batches(base, "p", n, threads=threads)
            submitted = time.perf_counter()
            wait_drained(base)
            done = time.perf_counter()
            failed = call(base, "GET", "/v1/jobs?state=failed&limit=1")["jobs"]
            assert not failed, failed
            assert len(ids) == n
        finally:
            stop(engine)
    return n / (submitted - t), n / (done - t)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10000)
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="client threads submitting batches of 1,000")
    ap.add_argument("--prefetch", type=int, default=1, help="the pool's prefetch (tasks held ahead per instance)")
    ap.add_argument("--bin", default="target/release/gpuflow")
    args = ap.parse_args(argv)
    with_sdk_on_path()
    submit_rate, completed = engine_rate(args.bin, args.jobs, args.instances, args.threads, args.prefetch)
    bound = direct_rate(args.jobs, args.instances)
    result = {
        "jobs": args.jobs,
        "instances": args.instances,
        "prefetch": args.prefetch,
        "submitted_per_s": round(submit_rate, 1),
        "completed_per_s": round(completed, 1),
        "goal_per_s": GOAL,
        "ratio_to_goal": round(completed / GOAL, 3),
        "direct_protocol_per_s": round(bound, 1),
        "ratio_to_direct_protocol": round(completed / bound, 3),
    }
    for k, v in result.items():
        print(f"{k:<28} {v}")
    return write_result("pool_throughput", result)


if __name__ == "__main__":
    main()
