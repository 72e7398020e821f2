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
# Stands in for model inference; the dashboard e2e test stretches it to watch the lease.
time.sleep(float(os.environ.get("QUICKSTART_INFER_SECONDS", "0.5")))
scores = {t: int(hashlib.sha256(t.encode()).hexdigest()[:4], 16) / 65535 for t in tokens}
path = os.path.join(os.environ["GPUFLOW_JOB_DIR"], "scores.json")
with open(path, "w") as f:
    json.dump(scores, f)
print(f"scored {len(tokens)} tokens on device {device}", file=sys.stderr)
with open(os.environ["GPUFLOW_OUTPUT"], "w") as f:
    json.dump({"scores_file": path, "device": device}, f)
