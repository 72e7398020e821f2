"""A "generation" worker that hangs the way GPU inference services hang in production.

Each task is 150 frame batches. The worker initialises CUDA in `load()`, then for each task
forks 4 DataLoader-like children with the `fork` start method. A helper thread happens to be
inside the dataset's lock at the moment of the fork; the children that need that lock inherit
it locked, with no thread left to release it, and block forever. The two that do not need it
deliver 10 batches between them and exit, and nobody reaps them. The handler reports progress
per batch and then waits forever for batch 11.

Without a GPU, "initialising CUDA" maps a stand-in file named `libcuda.so.1` (STALL_DRIVER),
which is what gpuflow's fork check looks for; with a GPU and STALL_DRIVER unset, it calls
cuInit through the real driver library.
"""

import ctypes
import mmap
import multiprocessing as mp
import os
import threading
import time

import gpuflow

BATCHES = 150
CHILDREN = 4
PER_FREE_CHILD = 5  # 2 children that do not need the lock: 10 batches in all


def init_cuda():
    path = os.environ.get("STALL_DRIVER")
    if not path:
        lib = ctypes.CDLL("libcuda.so.1")
        if lib.cuInit(0) != 0:
            raise RuntimeError("cuInit failed")
        return lib
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"\0" * 8192)
    f = open(path, "rb")
    return f, mmap.mmap(f.fileno(), 4096, access=mmap.ACCESS_READ)


dataset_lock = threading.Lock()


def loader(index, queue):
    if index >= 2:
        with dataset_lock:  # inherited locked from the parent: never returns
            pass
    time.sleep(0.5)  # decoding frames
    for _ in range(PER_FREE_CHILD):
        queue.put(b"frame batch")
    queue.close()
    queue.join_thread()  # flush the batches to the pipe before exiting
    os._exit(0)  # exits at once; its parent never joins it


class Generation(gpuflow.Worker):
    def load(self):
        self.driver = init_cuda()
        # Like a CUDA runtime thread: wakes every 0.5 s for about 2 ms.
        def helper():
            while True:
                end = time.perf_counter() + 0.002
                while time.perf_counter() < end:
                    pass
                time.sleep(0.5)
        threading.Thread(target=helper, daemon=True).start()
        return {"providers": ["CUDAExecutionProvider"]}

    def handle(self, task):
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        inside = threading.Event()

        def prefetch():
            with dataset_lock:
                inside.set()
                time.sleep(1.0)

        threading.Thread(target=prefetch, daemon=True).start()
        inside.wait()
        children = [ctx.Process(target=loader, args=(i, queue), daemon=True) for i in range(CHILDREN)]
        for child in children:
            child.start()
        for n in range(1, BATCHES + 1):
            queue.get()
            time.sleep(0.25)  # generating on the GPU
            task.progress(n / BATCHES, f"{n} of {BATCHES} batches")
        return {"batches": BATCHES}


gpuflow.serve(Generation())
