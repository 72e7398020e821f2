"""CPU stage: reduce the scores to the job's result."""
import json
import os
import sys

with open(sys.argv[1]) as f:
    scores = json.load(f)
best = max(scores, key=scores.get) if scores else None
with open(os.environ["GPUFLOW_OUTPUT"], "w") as f:
    json.dump({"tokens": len(scores), "top_token": best, "top_score": scores.get(best)}, f)
