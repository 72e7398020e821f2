"""Reports what a stage can see of the GPUs, and fails if it is not what gpuflow leased.

`gpu`: CUDA_VISIBLE_DEVICES names one device; PyTorch sees exactly it and runs a matmul on it.
`cpu`: CUDA_VISIBLE_DEVICES is empty; PyTorch sees no device at all.
`hang`: holds 1 GiB of VRAM and ignores SIGTERM, to check that a kill frees it.
`fork` / `spawn`: initialises CUDA, then iterates a DataLoader whose 2 workers use that start
method and never return a batch (a fork after CUDA init is the hazard gpuflow must name).
`orphan PIDFILE [scrub]`: starts a child that holds 1.5 GiB of VRAM, writes "PARENT CHILD" to
PIDFILE and waits; the smoke script then `kill -9`s this parent. With `scrub` the child drops
its attempt marker from its environment, so only the engine's NVML reconciliation can find it.
`hold`: (the child) holds 1.5 GiB and sleeps."""
import json
import os
import sys
import time

import torch

mode = sys.argv[1]
if mode == "hang":
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    held = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    print(f"holding {held.numel()} bytes on {os.environ['CUDA_VISIBLE_DEVICES']}", file=sys.stderr, flush=True)
    while True:
        time.sleep(1)
if mode in ("fork", "spawn"):
    warm = torch.ones(1, device="cuda")  # CUDA is initialised before the workers start
    torch.cuda.synchronize()

    class Frames(torch.utils.data.Dataset):
        def __len__(self):
            return 150

        def __getitem__(self, i):
            time.sleep(3600)  # a loader that never delivers
            return i

    loader = torch.utils.data.DataLoader(Frames(), batch_size=1, num_workers=2, multiprocessing_context=mode)
    for batch in loader:
        pass
if mode == "hold":
    held = torch.empty(3 << 29, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    while True:
        time.sleep(1)
if mode == "orphan":
    import subprocess

    env = dict(os.environ)
    if sys.argv[3:] == ["scrub"]:
        env.pop("GPUFLOW_ATTEMPT_MARKER", None)
    child = subprocess.Popen([sys.executable, __file__, "hold"], env=env)
    time.sleep(8)  # time for the child to allocate
    with open(sys.argv[2] + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    os.rename(sys.argv[2] + ".tmp", sys.argv[2])
    child.wait()
visible = os.environ.get("CUDA_VISIBLE_DEVICES")
report = {"mode": mode, "CUDA_VISIBLE_DEVICES": visible, "device_count": torch.cuda.device_count()}
if mode == "gpu":
    assert visible and visible.startswith("GPU-"), f"expected a device UUID, got {visible!r}"
    assert torch.cuda.device_count() == 1, report
    a = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    start = time.time()
    for _ in range(20):
        b = a @ a
    torch.cuda.synchronize()
    report.update(name=torch.cuda.get_device_name(0), matmul_s=round(time.time() - start, 4), checksum=float(b.sum().item() != 0))
    report["budget_bytes"] = int(os.environ["GPUFLOW_GPU_MEMORY_BYTES"])
else:
    assert visible == "", f"a CPU stage must see no GPU, got {visible!r}"
    assert not torch.cuda.is_available(), report
with open(os.environ["GPUFLOW_OUTPUT"], "w") as f:
    json.dump(report, f)
