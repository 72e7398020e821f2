"""A batching worker used by test_batch.py: `handle_batch` answers per task; inputs choose
faults. `GPUFLOW_TEST_MAX_BATCH` sets the `max_batch` it announces."""

import os
import time

import gpuflow


class BatchWorker(gpuflow.Worker):
    max_batch = int(os.environ["GPUFLOW_TEST_MAX_BATCH"]) if os.environ.get("GPUFLOW_TEST_MAX_BATCH") else None

    def load(self):
        return {"providers": ["CPUExecutionProvider"]}

    def handle_batch(self, tasks):
        actions = [t.input.get("action") for t in tasks]
        if "sleep" in actions:
            deadline = time.monotonic() + max(t.input.get("seconds", 0) for t in tasks)
            while time.monotonic() < deadline:
                sum(i * i for i in range(2000))  # moving Python code: the batch beats
        if "raise_batch" in actions:
            raise ValueError("the whole batch failed: out of memory")
        if "permanent_batch" in actions:
            raise gpuflow.PermanentError("the batch's model file is unreadable")
        if "short" in actions:
            return [{"n": 0}]
        out = []
        for t in tasks:
            action = t.input.get("action")
            if action == "poison":
                out.append(ValueError(f"poisoned item {t.input.get('n')}"))
            elif action == "bad":
                out.append(gpuflow.PermanentError(f"unusable input {t.input.get('n')}"))
            else:
                out.append({"n": t.input.get("n"), "batch": len(tasks), "id": t.id})
        return out


if __name__ == "__main__":
    gpuflow.serve(BatchWorker())
