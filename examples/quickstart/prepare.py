"""CPU stage: split the input text into tokens and store them in the job directory."""
import json
import os
import sys

text = sys.argv[1]
tokens = text.lower().split()
path = os.path.join(os.environ["GPUFLOW_JOB_DIR"], "tokens.json")
with open(path, "w") as f:
    json.dump(tokens, f)
# A stage's output is the JSON it writes to $GPUFLOW_OUTPUT; later stages template it.
with open(os.environ["GPUFLOW_OUTPUT"], "w") as f:
    json.dump({"tokens_file": path, "count": len(tokens)}, f)
