"""GPU stage (simulated): score each token. It reports the device it was given, which is
the one gpuflow leased to it through CUDA_VISIBLE_DEVICES."""
import hashlib
import json
import os
import sys
import time

device = os.environ.get("CUDA_VISIBLE_DEVICES", "")
if not device:
    sys.exit("no GPU granted: CUDA_VISIBLE_DEVICES is empty")
with open(sys.argv[1]) as f:
    tokens = json.load(f)
# Stands in for model inference, in batches; the dashboard e2e test stretches it to watch the
# lease. Each batch is reported to gpuflow by a line in the file named by GPUFLOW_PROGRESS
# (a fraction from 0 to 1, then a message), shown by the API, the dashboard and
# `gpuflow submit --wait`.
seconds = float(os.environ.get("QUICKSTART_INFER_SECONDS", "0.5"))
batches = 8
with open(os.environ["GPUFLOW_PROGRESS"], "a", buffering=1) as progress:
    for i in range(batches):
        progress.write(f"{i / batches:.3f} batch {i + 1}/{batches}\n")
        time.sleep(seconds / batches)
scores = {t: int(hashlib.sha256(t.encode()).hexdigest()[:4], 16) / 65535 for t in tokens}
path = os.path.join(os.environ["GPUFLOW_JOB_DIR"], "scores.json")
with open(path, "w") as f:
    json.dump(scores, f)
print(f"scored {len(tokens)} tokens on device {device}", file=sys.stderr)
with open(os.environ["GPUFLOW_OUTPUT"], "w") as f:
    json.dump({"scores_file": path, "device": device}, f)
