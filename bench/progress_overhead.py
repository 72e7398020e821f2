#!/usr/bin/env python3
"""What progress costs the engine: N command stages each append 100 progress lines a second to
$GPUFLOW_PROGRESS while a client follows the live feed, against the same N stages running the
same loop without writing, measured in the same run. Also checks the feed's rate limit from
the outside: progress events per attempt per second (at most 4).

Usage: python3 bench/progress_overhead.py [--stages 16] [--seconds 20] [--bin target/release/gpuflow]"""
import argparse
import json
import os
import tempfile
import threading
import time
import urllib.request

from engine import call, start, stop, write_config, write_result

ap = argparse.ArgumentParser()
ap.add_argument("--stages", type=int, default=16)
ap.add_argument("--seconds", type=float, default=20)
ap.add_argument("--bin", default="target/release/gpuflow")
args = ap.parse_args()
TICKS = os.sysconf("SC_CLK_TCK")

STAGE = """
import os, sys, time
report, seconds = sys.argv[1] == "report", float(sys.argv[2])
out = open(os.environ["GPUFLOW_PROGRESS"], "a", buffering=1) if report else None
end, i = time.monotonic() + seconds, 0
while time.monotonic() < end:
    i += 1
    if out:
        out.write(f"{(i % 1000) / 1000} step {i}\\n")
    time.sleep(0.01)
"""


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def follow(base, events, stop_flag):
    """Counts `progress` events per attempt from the live feed until stopped."""
    with urllib.request.urlopen(base + "/v1/events", timeout=args.seconds + 120) as r:
        for raw in r:
            if stop_flag.is_set():
                return
            line = raw.decode().strip()
            if line.startswith("data:"):
                e = json.loads(line[5:])
                if e.get("type") == "progress":
                    events.setdefault((e["job"], e["stage"], e["attempt"]), []).append(e["at_ms"])


def measure(mode):
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/stage.py", "w") as f:
            f.write(STAGE)
        run_s = args.seconds + 10
        cfg = write_config(d, f"""resources: {{gpus: none, cpu: {args.stages}}}
pipelines:
  p:
    max_queued: {args.stages + 1}
    stages: [{{name: s, needs: {{cpu: 1}}, command: [python3, "{d}/stage.py", "{mode}", "{run_s}"]}}]
""")
        engine, base = start(args.bin, cfg, d)
        events, stop_flag = {}, threading.Event()
        threading.Thread(target=follow, args=(base, events, stop_flag), daemon=True).start()
        try:
            time.sleep(0.5)
            for _ in range(args.stages):
                call(base, "POST", "/v1/jobs", {"pipeline": "p"})
            while len(call(base, "GET", "/v1/resources")["leases"]) < args.stages:
                time.sleep(0.1)
            time.sleep(2)
            before, t0 = cpu_seconds(engine.pid), time.monotonic()
            seen_before = sum(len(v) for v in events.values())
            time.sleep(args.seconds)
            used, wall = cpu_seconds(engine.pid) - before, time.monotonic() - t0
            seen = sum(len(v) for v in events.values()) - seen_before
            # The tightest gap between two events of one attempt.
            gaps = [b - a for v in events.values() for a, b in zip(v, v[1:])]
        finally:
            stop_flag.set()
            stop(engine)
    per_attempt = seen / wall / args.stages
    return 100.0 * used / wall, per_attempt, min(gaps) if gaps else None


silent, _, _ = measure("silent")
reporting, per_attempt, min_gap = measure("report")
result = {
    "stages": args.stages,
    "seconds": args.seconds,
    "progress_lines_per_s_written": args.stages * 100,
    "engine_cpu_pct_silent": round(silent, 2),
    "engine_cpu_pct_reporting": round(reporting, 2),
    "progress_cpu_pct": round(reporting - silent, 2),
    "feed_progress_events_per_attempt_per_s": round(per_attempt, 2),
    "feed_min_gap_ms_between_events_of_one_attempt": min_gap,
}
for k, v in result.items():
    print(f"{k:<48} {v}")
write_result("progress_overhead", result)
