#!/usr/bin/env python3
"""gpuflow worker for the six-stage video OCR chain: simulates each stage by sleeping for its duration.

One script serves both pools (the CPU pool runs extract, stitch and finalize; the GPU pool
detect, crop and ocr): the task's stage name picks the duration. Durations are multiplied by
`--scale` (or `$CHAIN_SCALE`; default 1). Each result records when the work began and ended
on this worker's clock (`time.time()`), so a benchmark can measure how busy each device was
from the stages' own times rather than the engine's.
"""
import argparse
import os
import sys
import time

sys.dont_write_bytecode = True
# Runs from a checkout without `pip install ./python`.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))

import gpuflow  # noqa: E402

# Seconds per stage at scale 1.
SECONDS = {"extract": 2, "detect": 1, "crop": 2, "stitch": 1, "ocr": 3, "finalize": 1}


class ChainWorker(gpuflow.Worker):
    def __init__(self, scale):
        self.scale = scale

    def load(self):
        return {"scale": self.scale, "device": os.environ.get("CUDA_VISIBLE_DEVICES", "")}

    def handle(self, task):
        if task.stage not in SECONDS:
            raise gpuflow.PermanentError(f"unknown stage `{task.stage}`; this worker knows {', '.join(SECONDS)}")
        began = time.time()
        time.sleep(SECONDS[task.stage] * self.scale)
        return {"stage": task.stage, "began": began, "ended": time.time(),
                "device": os.environ.get("CUDA_VISIBLE_DEVICES", "")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=float(os.environ.get("CHAIN_SCALE", "1")),
                    help="multiply every stage's duration by this (default $CHAIN_SCALE or 1)")
    args = ap.parse_args()
    if not args.scale > 0:
        ap.error(f"--scale must be more than 0, got {args.scale}")
    gpuflow.serve(ChainWorker(args.scale))


if __name__ == "__main__":
    main()
