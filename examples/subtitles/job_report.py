#!/usr/bin/env python3
"""Summarise a finished `subtitles` job from `gpuflow status ID --json` (used by run.sh).

    job_report.py JOB.json [--baseline-ms MS] [--print srt|frames_json]

Prints each stage's state, attempts and wall time; the OCR worker's providers and its OCR time
per frame; and, given the plain-loop baseline's mean OCR ms per frame (direct_baseline.py),
the engine's overhead per OCR task. `--print srt` prints only the .srt path from the job
output; `--print frames_json` writes the extract stage's output to stdout (baseline input).
"""
import argparse
import json
import re
import sys
from datetime import datetime


def ts(text):
    if not text:
        return None
    m = re.match(r"(.*?T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:?\d\d)?$", text)
    if not m:
        return None
    base, frac, tz = m.groups()
    frac = (frac or ".0")[:7]
    tz = "+00:00" if tz in (None, "Z") else tz
    return datetime.fromisoformat(base + frac + tz)


def wall(stage):
    a, b = ts(stage.get("started_at")), ts(stage.get("finished_at"))
    return (b - a).total_seconds() if a and b else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("job_json")
    ap.add_argument("--baseline-ms", type=float)
    ap.add_argument("--print", choices=["srt", "frames_json"])
    args = ap.parse_args()
    with open(args.job_json) as f:
        job = json.load(f)
    stages = {s["name"]: s for s in job.get("stages", [])}

    if args.print == "srt":
        out = job.get("output") or {}
        srt = out.get("srt") or (stages.get("write_srt", {}).get("output") or {}).get("srt")
        if not srt:
            sys.exit("job_report: the job output names no srt")
        print(srt)
        return
    if args.print == "frames_json":
        json.dump(stages["extract_keyframes"]["output"], sys.stdout)
        return

    print(f"job {job.get('id')}: {job.get('state')}"
          + (f" error: {job['error']}" if job.get("error") else ""))
    for s in job.get("stages", []):
        w = wall(s)
        print(f"  {s['name']:<18} {s['state']:<10} attempts {s.get('attempts')}  "
              f"wall {'%.2f s' % w if w is not None else '-'}"
              + (f"  error: {s['error']}" if s.get("error") else ""))
    ocr = (stages.get("ocr") or {}).get("output") or {}
    if ocr:
        n = ocr.get("count") or 0
        print(f"  ocr: providers {ocr.get('providers')}; {n} frames; OCR time per frame "
              f"mean {ocr.get('ocr_ms_mean')} ms, max {ocr.get('ocr_ms_max')} ms; handler wall "
              f"{ocr.get('wall_s')} s; worker pid {ocr.get('worker_pid')}, its task #{ocr.get('worker_task_number')}")
        w = wall(stages["ocr"])
        if w is not None and n:
            print(f"  ocr stage wall per frame (engine view, incl. dispatch): {1000 * w / n:.1f} ms; "
                  f"engine + protocol overhead for the task: {w - (ocr.get('wall_s') or 0):.3f} s")
        if args.baseline_ms and ocr.get("ocr_ms_mean") and w is not None and n:
            print(f"  plain-loop baseline: {args.baseline_ms:.1f} ms per frame -> the engine's stage took "
                  f"{w:.2f} s vs {n * args.baseline_ms / 1000:.2f} s of baseline OCR "
                  f"({w - n * args.baseline_ms / 1000:+.2f} s)")


if __name__ == "__main__":
    main()
