#!/usr/bin/env python3
"""gpuflow worker `ocr`: a long-lived process that loads PP-OCRv4 once and OCRs many jobs.

Started by the engine from the pipeline's `workers.ocr.command`; speaks gpuflow's worker
protocol through the SDK (`gpuflow.serve`). See ocr_engine.py for the models, the provider
choice (CUDA only when onnxruntime has it and CUDA_VISIBLE_DEVICES names a device, else CPU)
and the tuning for subtitle strips.

load()   -> the ready message's info: {"providers": [...actually in use...], "session_providers",
            "provider_reason", "onnxruntime", "load_s", ...}
handle() -> for the frames listed by the `extract_keyframes` stage (task.stages), OCR each,
            report progress after each frame, write JSON to JOB_DIR/ocr.json and return
            {"ocr_file", "count", "fps", "interval", "duration", "providers", "ocr_ms_total",
             "ocr_ms_mean", "ocr_ms_max", "frames": [{"t", "text", "score", "ocr_ms"}, ...]}.
Bad input (no frame list, a listed frame missing or unreadable) raises PermanentError.
If CUDA was requested but a session fell back to another provider, load() logs a warning and
the ready info says `"provider_fallback": true`; with OCR_REQUIRE_CUDA=1 it fails instead.
"""
import json
import os
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpuflow  # noqa: E402
from ocr_engine import SubtitleOCR  # noqa: E402

EXTRACT_STAGE = "extract_keyframes"
MAX_INLINE_FRAMES = 2000  # beyond this the per-frame list stays in ocr.json only (output size limit)


class OcrWorker(gpuflow.Worker):
    def load(self):
        self.ocr = SubtitleOCR()
        self.tasks_done = 0
        info = self.ocr.info()
        print(f"ocr_worker: loaded, providers {info['providers']} ({info['provider_reason']})",
              file=sys.stderr, flush=True)
        if info["provider_fallback"]:
            # ONNX Runtime can run on the CPU without saying so. Say so, loudly.
            msg = (f"CUDA was requested but the sessions run on {info['session_providers']}: "
                   "check onnxruntime-gpu and its CUDA/cuDNN libraries")
            if os.environ.get("OCR_REQUIRE_CUDA") == "1":
                raise RuntimeError(msg + " (OCR_REQUIRE_CUDA=1: refusing to start)")
            print(f"ocr_worker: WARNING: {msg}", file=sys.stderr, flush=True)
        return info

    def handle(self, task):
        frames, meta = self._frames(task)
        n = len(frames)
        out_frames = []
        started = time.perf_counter()
        for i, fr in enumerate(frames):
            path = fr["file"]
            if not os.path.isfile(path):
                raise gpuflow.PermanentError(f"frame {i} listed by {EXTRACT_STAGE} is missing: {path}")
            try:
                text, score, ms = self.ocr(path)
            except Exception as e:  # the image loader's errors mean a bad file, not a flaky run
                if type(e).__name__ in ("LoadImageError", "UnidentifiedImageError"):
                    raise gpuflow.PermanentError(f"frame {path} is not a readable image: {e}") from e
                raise
            out_frames.append({
                "t": fr["t"],
                "text": text,
                "score": None if score is None else round(score, 4),
                "ocr_ms": round(ms, 2),
            })
            task.progress(fraction=(i + 1) / n, message=f"frame {i + 1}/{n} t={fr['t']:.2f}s")
        wall = time.perf_counter() - started
        self.tasks_done += 1

        times = [f["ocr_ms"] for f in out_frames]
        doc = {
            "fps": meta.get("fps"),
            "interval": meta.get("interval"),
            "duration": meta.get("duration"),
            "providers": self.ocr.primary_providers(),
            "count": n,
            "ocr_ms_total": round(sum(times), 2),
            "ocr_ms_mean": round(sum(times) / n, 2),
            "ocr_ms_max": round(max(times), 2),
            "wall_s": round(wall, 3),
            "worker_pid": os.getpid(),
            "worker_task_number": self.tasks_done,
            "frames": out_frames,
        }
        job_dir = task.job_dir or os.environ.get("GPUFLOW_JOB_DIR") or "."
        ocr_file = os.path.join(os.path.abspath(job_dir), "ocr.json")
        tmp = ocr_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, ocr_file)
        doc["ocr_file"] = ocr_file
        if n > MAX_INLINE_FRAMES:
            doc["frames"] = None
            doc["frames_note"] = f"{n} frames: see ocr_file"
        return doc

    @staticmethod
    def _frames(task):
        stages = task.stages or {}
        meta = stages.get(EXTRACT_STAGE)
        if not isinstance(meta, dict):
            raise gpuflow.PermanentError(
                f"no output from stage {EXTRACT_STAGE!r} in the task (have: {sorted(stages)})")
        frames = meta.get("frames")
        if not isinstance(frames, list) or not frames:
            raise gpuflow.PermanentError(f"stage {EXTRACT_STAGE!r} listed no frames")
        for i, fr in enumerate(frames):
            if not (isinstance(fr, dict) and isinstance(fr.get("file"), str)
                    and isinstance(fr.get("t"), (int, float))):
                raise gpuflow.PermanentError(f"frame entry {i} is not {{file, t}}: {fr!r}")
        return frames, meta


if __name__ == "__main__":
    gpuflow.serve(OcrWorker())
