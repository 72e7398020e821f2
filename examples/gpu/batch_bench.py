#!/usr/bin/env python3
"""ResNet-18 images/s: through gpuflow with dynamic batching, through gpuflow without it, and a
direct loop without batching (plus the model alone at the batch size, for reference), each with
the GPU's utilisation from NVML.

The model is torchvision's ResNet-18 with random weights (nothing is downloaded), fed synthetic
224x224 images. On a host with an NVIDIA GPU and PyTorch it runs on the GPU; with CPU-only
PyTorch, on the CPU. Without PyTorch, `--stand-in` replaces the model by a sleep of a fixed
overhead plus a cost per image (defaults fitted to ResNet-18 on an H200: 2.12 ms per call plus
0.0027 ms per image, i.e. ~470 images/s at batch 1 and ~14,500 at batch 32), so the whole path
(engine, protocol, SDK, batching) is exercised without the model; its figures are then about
gpuflow, not about the GPU.

Usage:
    python3 examples/gpu/batch_bench.py [--images 4096] [--max-size 32] [--max-wait 5ms]
        [--bin target/release/gpuflow] [--stand-in [--overhead-ms 2.12 --per-image-ms 0.0027]]
Prints a table and writes batch_bench.json in the current directory. Utilisation comes from
pynvml if installed, else `nvidia-smi`, else it is reported as "n/a".
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.join(ROOT, "python"))


# ---- the model (or its stand-in) -----------------------------------------------------------

class Model:
    """ResNet-18 on synthetic images, or a sleep standing in for it."""

    def __init__(self, stand_in, overhead_ms, per_image_ms, max_size):
        self.stand_in = stand_in
        self.overhead_s = overhead_ms / 1000.0
        self.per_image_s = per_image_ms / 1000.0
        if stand_in:
            self.device = "stand-in"
            return
        import torch
        import torchvision

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.net = torchvision.models.resnet18(weights=None).eval().to(self.device)
        # Synthetic images, made once: the benchmark is the model and the path, not a decoder.
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(max_size, 3, 224, 224, generator=generator).to(self.device)
        self.run(1)  # warm-up: cuDNN picks its kernels on the first call
        self.run(max_size)

    def run(self, n):
        """Classes of n images in one forward pass."""
        if self.stand_in:
            time.sleep(self.overhead_s + self.per_image_s * n)
            return [0] * n
        with self.torch.inference_mode():
            out = self.net(self.images[:n])
            return out.argmax(dim=1).tolist()  # .tolist() waits for the GPU


def worker_main(args):
    import gpuflow

    class ResNetWorker(gpuflow.Worker):
        max_batch = args.max_size

        def load(self):
            self.model = Model(args.stand_in, args.overhead_ms, args.per_image_ms, args.max_size)
            return {"providers": [self.model.device]}

        def handle_batch(self, tasks):
            classes = self.model.run(len(tasks))
            return [{"class": c} for c in classes]

    gpuflow.serve(ResNetWorker())


# ---- GPU utilisation ------------------------------------------------------------------------

class Utilisation(threading.Thread):
    """Samples GPU 0's utilisation every 100 ms while a phase runs: pynvml, else nvidia-smi."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples = []
        self.stop = threading.Event()
        self.read = self._reader()

    @staticmethod
    def _reader():
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:
            pass
        if shutil.which("nvidia-smi"):
            def smi():
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                    capture_output=True, text=True, timeout=5,
                )
                return float(out.stdout.strip().splitlines()[0])
            try:
                smi()
                return smi
            except Exception:
                pass
        return None

    def run(self):
        while self.read and not self.stop.wait(0.1):
            try:
                self.samples.append(self.read())
            except Exception:
                return

    def mean(self):
        self.stop.set()
        self.join(timeout=2)
        if not self.samples:
            return "n/a"
        return round(sum(self.samples) / len(self.samples), 1)


def measured(fn):
    util = Utilisation()
    util.start()
    t = time.perf_counter()
    n = fn()
    elapsed = time.perf_counter() - t
    return {"images_per_s": round(n / elapsed, 1), "gpu_util_percent": util.mean(), "seconds": round(elapsed, 2)}


# ---- the runs -------------------------------------------------------------------------------

def direct(model, images, batch):
    def loop():
        done = 0
        while done < images:
            n = min(batch, images - done)
            model.run(n)
            done += n
        return images
    return measured(loop)


def through_gpuflow(args, batched, gpu):
    from engine import call, start, stop, submit_batches, wait_drained, write_config

    worker = [sys.executable, os.path.abspath(__file__), "--worker", "--max-size", str(args.max_size),
              "--overhead-ms", str(args.overhead_ms), "--per-image-ms", str(args.per_image_ms)]
    if args.stand_in:
        worker.append("--stand-in")
    batch = f"\n    batch: {{max_size: {args.max_size}, max_wait: {args.max_wait}}}" if batched else ""
    resources = "resources: {gpus: auto, cpu: 2}" if gpu else "resources: {gpus: none, cpu: 2}"
    needs = "{gpu: 1}" if gpu else "{}"
    with tempfile.TemporaryDirectory() as d:
        cfg = write_config(d, f"""{resources}
diagnosis: {{sample_interval: 1h}}
workers:
  resnet:
    command: {json.dumps(worker)}
    instances: 1
    needs: {needs}
    startup_timeout: 5m
    heartbeat_timeout: 60s{batch}
pipelines:
  classify: {{max_queued: {args.images + 10}, stages: [{{name: classify, worker: resnet}}]}}
""")
        engine, base = start(args.bin, cfg, d)
        try:
            deadline = time.monotonic() + 300
            while call(base, "GET", "/v1/resources")["pools"][0]["instances"][0]["state"] != "idle":
                if time.monotonic() > deadline:
                    raise RuntimeError("the ResNet worker did not become ready within 5 minutes")
                time.sleep(0.1)

            def run():
                submit_batches(base, "classify", args.images, threads=2)
                wait_drained(base)
                failed = call(base, "GET", "/v1/jobs?state=failed&limit=1")["jobs"]
                if failed:
                    raise RuntimeError(f"a job failed: {failed[0]}")
                return args.images

            return measured(run)
        finally:
            stop(engine)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--max-size", type=int, default=32)
    ap.add_argument("--max-wait", default="5ms")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/gpuflow"))
    ap.add_argument("--stand-in", action="store_true", help="a sleep instead of the model (no PyTorch needed)")
    ap.add_argument("--overhead-ms", type=float, default=2.12, help="stand-in: fixed cost per forward pass")
    ap.add_argument("--per-image-ms", type=float, default=0.0027, help="stand-in: cost per image")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args)
    if not args.stand_in:
        try:
            import torch  # noqa: F401
            import torchvision  # noqa: F401
        except ImportError:
            sys.exit("PyTorch and torchvision are not installed; install them, or run with --stand-in "
                     "(a sleep in place of the model, to exercise gpuflow's batching path)")
    os.environ["PYTHONPATH"] = os.path.join(ROOT, "python") + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")

    model = Model(args.stand_in, args.overhead_ms, args.per_image_ms, args.max_size)
    gpu = model.device == "cuda"
    results = {
        "device": model.device,
        "images": args.images,
        "max_size": args.max_size,
        "max_wait": args.max_wait,
        "direct, batch 1": direct(model, args.images, 1),
        f"direct, batch {args.max_size} (the model alone)": direct(model, args.images, args.max_size),
    }
    del model  # free the GPU for the worker
    results["gpuflow, unbatched"] = through_gpuflow(args, False, gpu)
    results[f"gpuflow, batch max_size {args.max_size}"] = through_gpuflow(args, True, gpu)
    batched = results[f"gpuflow, batch max_size {args.max_size}"]["images_per_s"]
    results["ratio: gpuflow batched / direct batch 1"] = round(batched / results["direct, batch 1"]["images_per_s"], 2)
    results["ratio: gpuflow batched / gpuflow unbatched"] = round(batched / results["gpuflow, unbatched"]["images_per_s"], 2)

    print(f"device: {results['device']}{' (a sleep stands in for the model)' if args.stand_in else ''}; {args.images} images")
    print(f"{'run':<40} {'images/s':>10} {'GPU util %':>11}")
    for name, r in results.items():
        if isinstance(r, dict):
            print(f"{name:<40} {r['images_per_s']:>10} {str(r['gpu_util_percent']):>11}")
    for name, r in results.items():
        if name.startswith("ratio"):
            print(f"{name}: {r}")
    with open("batch_bench.json", "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
