#!/usr/bin/env python3
"""The same OCR as the `ocr` worker, over the same frames, in a plain Python loop (no engine).

    direct_baseline.py FRAMES.json [--out OCR.json] [--repeat N]
    direct_baseline.py --video VIDEO [--fps 2] [--band 0.25] [--out OCR.json]

FRAMES.json is the `extract_keyframes` stage's output (in a job: DATA_DIR/jobs/ID/.gpuflow/
extract_keyframes.1.output.json). With --video it runs extract_keyframes.py itself into a
temporary directory first. Loads the models once (ocr_engine.SubtitleOCR, same settings and
provider rule as the worker), OCRs every frame, prints the time of each and a summary:
model load time, mean/median/max OCR ms per frame, frames per second. Compare the mean with
the worker's `ocr_ms_mean` and with (ocr stage wall time / frames) to see the engine's
per-task overhead. --out writes the same ocr.json the worker writes, which write_srt.py reads.
--repeat N OCRs the frame list N times (after the first pass the file cache is warm).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, HERE)
from ocr_engine import SubtitleOCR  # noqa: E402


def extract(video, fps, band, tmp):
    env = dict(os.environ, GPUFLOW_JOB_DIR=tmp, GPUFLOW_OUTPUT=os.path.join(tmp, "extract.json"))
    subprocess.run([sys.executable, os.path.join(HERE, "extract_keyframes.py"), video,
                    "--fps", str(fps), "--band", str(band)], check=True, env=env)
    with open(env["GPUFLOW_OUTPUT"]) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser(description="OCR the frames in a plain loop, no engine")
    ap.add_argument("frames_json", nargs="?")
    ap.add_argument("--video")
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--band", type=float, default=0.25)
    ap.add_argument("--out", help="write the worker's ocr.json format here")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--quiet", action="store_true", help="summary only, no line per frame")
    args = ap.parse_args()
    if bool(args.frames_json) == bool(args.video):
        ap.error("give FRAMES.json or --video, not both")

    with tempfile.TemporaryDirectory() as tmp:
        if args.video:
            meta = extract(args.video, args.fps, args.band, tmp)
        else:
            with open(args.frames_json) as f:
                meta = json.load(f)
        frames = meta["frames"]

        t0 = time.perf_counter()
        ocr = SubtitleOCR()
        load_s = time.perf_counter() - t0
        info = ocr.info()
        print(f"baseline: providers {info['providers']} ({info['provider_reason']}); "
              f"onnxruntime {info['onnxruntime']}; model load {load_s:.3f} s "
              f"(incl. warm-up {info['warmup_s']:.3f} s)")

        times, out_frames = [], []
        wall0 = time.perf_counter()
        for rep in range(args.repeat):
            for fr in frames:
                text, score, ms = ocr(fr["file"])
                times.append(ms)
                if rep == 0:
                    out_frames.append({"t": fr["t"], "text": text,
                                       "score": None if score is None else round(score, 4),
                                       "ocr_ms": round(ms, 2)})
                if not args.quiet:
                    print(f"  t={fr['t']:7.2f}s  {ms:7.1f} ms  {text!r}")
        wall = time.perf_counter() - wall0

    n = len(times)
    print(f"baseline: {n} frame OCRs in {wall:.2f} s: mean {statistics.mean(times):.1f} ms, "
          f"median {statistics.median(times):.1f} ms, min {min(times):.1f} ms, max {max(times):.1f} ms "
          f"per frame; {n / wall:.2f} frames/s")
    if args.out:
        doc = {"fps": meta.get("fps"), "interval": meta.get("interval"), "duration": meta.get("duration"),
               "providers": ocr.primary_providers(), "count": len(out_frames),
               "ocr_ms_total": round(sum(f["ocr_ms"] for f in out_frames), 2),
               "ocr_ms_mean": round(statistics.mean(f["ocr_ms"] for f in out_frames), 2),
               "frames": out_frames}
        with open(args.out, "w") as f:
            json.dump(doc, f)
        print(f"baseline: wrote {args.out}")


if __name__ == "__main__":
    main()
