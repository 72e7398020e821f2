"""The worker every pool benchmark runs (SDK, standard library only).

By default a task is a no-op. A task input may ask for a fault on its first attempt, after
writing the wall-clock time (ns) to `stamp`: `crash` exits at once (os._exit), `hang` blocks
forever on a lock (report 003's deadlock). Every later attempt writes its own arrival time to
`stamp` + ".retry" and succeeds, so a benchmark can time death -> re-dispatch from outside."""
import os
import threading
import time

import gpuflow


def _stamp(path):
    with open(path, "w") as f:
        f.write(str(time.time_ns()))


class Bench(gpuflow.Worker):
    def load(self):
        return {"providers": ["CPUExecutionProvider"]}

    def handle(self, task):
        fault = task.input.get("fault")
        if fault is None:
            return None
        if task.attempt > 1:
            _stamp(task.input["stamp"] + ".retry")
            return {"attempt": task.attempt}
        _stamp(task.input["stamp"])
        if fault == "crash":
            os._exit(3)
        if fault == "hang":
            lock = threading.Lock()
            lock.acquire()
            lock.acquire()
        raise ValueError(f"unknown fault {fault!r}")


if __name__ == "__main__":
    gpuflow.serve(Bench())
