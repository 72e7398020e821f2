#!/usr/bin/env python3
"""One stage of the six-stage video OCR chain as a fresh process (command-stage mode): sleeps for the
stage's duration times `$CHAIN_SCALE` (default 1).

Usage: stage.py STAGE. Writes {"stage", "began", "ended"} to `$GPUFLOW_OUTPUT`, where `began`
is taken as soon as the interpreter runs this file, so `began` minus the attempt's start in
the API is the process start-up.
"""
import time

BEGAN = time.time()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

SECONDS = {"extract": 2, "detect": 1, "crop": 2, "stitch": 1, "ocr": 3, "finalize": 1}

if len(sys.argv) != 2 or sys.argv[1] not in SECONDS:
    sys.exit(f"usage: stage.py STAGE, with STAGE one of {', '.join(SECONDS)}")
stage = sys.argv[1]
scale = float(os.environ.get("CHAIN_SCALE", "1"))
time.sleep(SECONDS[stage] * scale)
out = {"stage": stage, "began": BEGAN, "ended": time.time()}
if os.environ.get("GPUFLOW_OUTPUT"):
    with open(os.environ["GPUFLOW_OUTPUT"], "w") as f:
        json.dump(out, f)
