"""Reports what a stage can see of the GPUs, and fails if it is not what gpuflow leased.

`gpu`: CUDA_VISIBLE_DEVICES names one device; PyTorch sees exactly it and runs a matmul on it.
`cpu`: CUDA_VISIBLE_DEVICES is empty; PyTorch sees no device at all.
`hang`: holds 1 GiB of VRAM and ignores SIGTERM, to check that a kill frees it."""
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
