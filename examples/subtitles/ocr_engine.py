"""The OCR shared by ocr_worker.py (under gpuflow) and direct_baseline.py (a plain loop).

PP-OCRv4 detection + recognition, as the ONNX models that ship inside the
`rapidocr-onnxruntime` wheel (nothing is downloaded). ONNX Runtime's CUDA execution provider
is asked for only when this onnxruntime build has it AND CUDA_VISIBLE_DEVICES names a device
(gpuflow sets it empty for a process granted no GPU); otherwise the CPU provider. What the
created InferenceSessions actually use is read back from them, not assumed.

Tuned for subtitle strips (frames already cropped to the bottom band):
  - detection resizes so the longer side is at most 960 px (`limit_type: max`), instead of
    the package default that scales the SHORTER side up to 736 px (a 640x90 strip would
    become 5234x736, ~60x the pixels, for no gain on large caption text);
  - the text-direction classifier is off: burned-in subtitles are never upside down.
On CUDA, a `gpu_memory` grant (GPUFLOW_GPU_MEMORY_BYTES) caps the CUDA memory arenas: half of
the budget to each of the two sessions. Environment knobs: OCR_THREADS (ONNX Runtime intra-op
threads; default: its own choice), OCR_DISABLE_CUDA=1 (force the CPU provider).
"""
import os
import time

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
MIN_SCORE = 0.65  # recognition confidence below which a text box is ignored
MIN_REL_HEIGHT = 0.6  # boxes shorter than this fraction of the tallest one are ignored


def want_cuda():
    """(use_cuda, reason) by the rule above."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if os.environ.get("OCR_DISABLE_CUDA") == "1":
        return False, "OCR_DISABLE_CUDA=1"
    if CUDA_EP not in available:
        return False, f"this onnxruntime has no {CUDA_EP} (available: {available})"
    if not visible:
        return False, "CUDA_VISIBLE_DEVICES is empty or unset (no GPU granted)"
    return True, f"{CUDA_EP} available and CUDA_VISIBLE_DEVICES={visible}"


def _cap_cuda_arena():
    """Make rapidocr's sessions honour GPUFLOW_GPU_MEMORY_BYTES (it hardcodes its CUDA options)."""
    from rapidocr_onnxruntime.utils import infer_engine

    budget = os.environ.get("GPUFLOW_GPU_MEMORY_BYTES", "").strip()
    cls = infer_engine.OrtInferSession
    if not budget.isdigit() or getattr(cls, "_gpuflow_capped", False):
        return
    original = cls._get_ep_list

    def _get_ep_list(self):
        eps = original(self)
        for name, opts in eps:
            if name == CUDA_EP:
                opts["gpu_mem_limit"] = int(budget) // 2  # two sessions: det and rec
        return eps

    cls._get_ep_list = _get_ep_list
    cls._gpuflow_capped = True


class SubtitleOCR:
    """Loads the models once; `__call__(path)` OCRs one frame."""

    def __init__(self):
        import onnxruntime
        from rapidocr_onnxruntime import RapidOCR

        t0 = time.perf_counter()
        self.use_cuda, self.reason = want_cuda()
        if self.use_cuda:
            _cap_cuda_arena()
        kwargs = dict(
            det_use_cuda=self.use_cuda,
            cls_use_cuda=self.use_cuda,
            rec_use_cuda=self.use_cuda,
            det_limit_type="max",
            det_limit_side_len=960,
            use_cls=False,
        )
        threads = os.environ.get("OCR_THREADS")
        if threads:
            kwargs["intra_op_num_threads"] = int(threads)
        self.engine = RapidOCR(**kwargs)
        self.load_s = time.perf_counter() - t0
        self.onnxruntime_version = onnxruntime.__version__
        self.sessions = {
            "det": self.engine.text_det.infer.session,
            "rec": self.engine.text_rec.session.session,
        }
        # Warm up once so the first real frame's time is not the sessions' first-run cost.
        import numpy as np

        t1 = time.perf_counter()
        self.engine(np.full((90, 640, 3), 127, dtype=np.uint8), use_cls=False)
        self.warmup_s = time.perf_counter() - t1

    def providers(self):
        """{session: [providers in priority order]} as the sessions report them."""
        return {name: list(s.get_providers()) for name, s in self.sessions.items()}

    def primary_providers(self):
        """The distinct first (actually used) provider of each session."""
        return sorted({p[0] for p in self.providers().values()})

    def info(self):
        return {
            "providers": self.primary_providers(),
            "session_providers": self.providers(),
            "cuda_requested": self.use_cuda,
            # asked for CUDA but a session runs on something else: say so, never silently
            "provider_fallback": self.use_cuda and any(
                p[0] != CUDA_EP for p in self.providers().values()),
            "provider_reason": self.reason,
            "onnxruntime": self.onnxruntime_version,
            "models": "PP-OCRv4 det + rec (rapidocr-onnxruntime)",
            "gpu_memory_budget": os.environ.get("GPUFLOW_GPU_MEMORY_BYTES") or None,
            "load_s": round(self.load_s, 3),
            "warmup_s": round(self.warmup_s, 3),
        }

    def __call__(self, path):
        """OCR one frame: (text, min_score, ms). Lines are read top to bottom, left to right.

        Boxes scoring under MIN_SCORE, or much shorter than the tallest box in the frame
        (subtitle lines share one font size; background clutter gives small boxes), are dropped.
        """
        t0 = time.perf_counter()
        result, _ = self.engine(path, use_cls=False, text_score=MIN_SCORE)
        ms = (time.perf_counter() - t0) * 1000.0
        if not result:
            return "", None, ms
        # result: [[box (4 points), text, score], ...], already sorted top-to-bottom.
        def height(box):
            ys = [p[1] for p in box]
            return max(ys) - min(ys)

        tallest = max(height(r[0]) for r in result)
        kept = [r for r in result if r[1].strip() and height(r[0]) >= MIN_REL_HEIGHT * tallest]
        if not kept:
            return "", None, ms
        text = " ".join(r[1].strip() for r in kept)
        return text, min(float(r[2]) for r in kept), ms
