"""A worker used by test_worker.py: each task's input names the behaviour to exercise."""

import os
import subprocess
import sys
import threading
import time

import gpuflow

# Printed before serve() takes over stdout: it must end up on stderr, not the protocol stream.
print("IMPORT-NOISE from worker_app")


def _step(n):
    # A small unit of Python work, one call per loop iteration.
    total = 0
    for i in range(n):
        total += i * i
    return total


class TestWorker(gpuflow.Worker):
    def load(self):
        if os.environ.get("GPUFLOW_TEST_LOAD_FAIL"):
            raise RuntimeError("weights missing: /nonexistent/model.onnx")
        return {
            "providers": ["CPUExecutionProvider"],
            "pool": os.environ.get("GPUFLOW_WORKER_POOL"),
            "instance": os.environ.get("GPUFLOW_WORKER_INSTANCE"),
        }

    tasks_done = 0

    def teardown(self):
        # Records each call, so the tests see when (and how often) it ran.
        path = os.environ.get("GPUFLOW_TEST_TEARDOWN_FILE")
        if not path:
            return
        with open(path, "a") as f:
            f.write(f"start after {self.tasks_done} tasks\n")
        time.sleep(float(os.environ.get("GPUFLOW_TEST_TEARDOWN_SECONDS", "0")))
        if os.environ.get("GPUFLOW_TEST_TEARDOWN_FAIL"):
            raise RuntimeError("could not release the session")
        with open(path, "a") as f:
            f.write("done\n")

    def handle(self, task):
        self.tasks_done += 1
        action = task.input.get("action")
        if action == "echo":
            return {
                "input": task.input,
                "stages": task.stages,
                "id": task.id,
                "job_id": task.job_id,
                "job_dir": task.job_dir,
                "stage": task.stage,
                "attempt": task.attempt,
            }
        if action == "raise":
            raise ValueError("boom 42")
        if action == "permanent":
            raise gpuflow.PermanentError("unreadable video: x.mp4")
        if action == "print":
            print("PRINTED-NOISE")
            sys.stdout.flush()
            os.write(1, b"FD1-NOISE\n")
            subprocess.run([sys.executable, "-c", "print('CHILD-NOISE')"], check=True)
            return "printed"
        if action == "progress_loop":
            steps = task.input["steps"]
            for i in range(steps):
                time.sleep(task.input["sleep"])
                task.progress(fraction=(i + 1) / steps, message=f"step {i + 1}/{steps}")
            return "done"
        if action == "progress_then_wait":
            # Two reports closer than the SDK's gap, then a long quiet stretch.
            task.progress(fraction=0.1, message="first")
            task.progress(fraction=0.5, message="second")
            threading.Event().wait(task.input["wait"])
            return "waited"
        if action == "compute":
            deadline = time.monotonic() + task.input["seconds"]
            while time.monotonic() < deadline:
                _step(2000)
            return "computed"
        if action == "heartbeat_wait":
            # Waits on one line the whole time: only the explicit heartbeats show progress.
            idle = threading.Event()
            for _ in range(task.input["rounds"]):
                idle.wait(task.input["wait"])
                task.heartbeat()
            return "waited"
        if action == "deadlock":
            lock = threading.Lock()
            lock.acquire()
            lock.acquire()  # never returns
            return "unreachable"
        if action == "unserialisable":
            return {"value": object()}
        if action == "nan":
            return float("nan")
        if action == "huge":
            return "x" * (2 * 1024 * 1024)
        if action == "bad_progress":
            task.progress(fraction=1.5)
            return "unreachable"
        raise gpuflow.PermanentError(f"unknown action {action!r}")


if __name__ == "__main__":
    gpuflow.serve(TestWorker())
