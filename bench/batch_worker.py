"""The no-op batching worker of bench/batch_throughput.py (SDK, standard library only).

It overrides `handle_batch`, so it announces the `batch` feature: a pool with `batch:` sends it
up to `max_size` tasks per message; a pool without it sends one task at a time, each still
answered through `handle_batch` (a list of one)."""
import gpuflow


class NoopBatch(gpuflow.Worker):
    def load(self):
        return {"providers": ["CPUExecutionProvider"]}

    def handle_batch(self, tasks):
        return [None] * len(tasks)


if __name__ == "__main__":
    gpuflow.serve(NoopBatch())
