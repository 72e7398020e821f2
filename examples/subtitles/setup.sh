#!/usr/bin/env bash
# Installs what the subtitles example needs, on Debian 12, idempotently and quietly:
#   - ffmpeg (frame extraction, test video), the DejaVu font (test video captions), and the
#     two shared libraries opencv-python loads (libGL, glib);
#   - rapidocr-onnxruntime, pinned: it ships the PP-OCRv4 detection/recognition ONNX models
#     inside the wheel, so nothing is downloaded at run time (checked below);
#   - the gpuflow worker SDK from ./python, when it is there.
# Re-running it does nothing that is already done. Run from anywhere; needs root for apt.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
RAPIDOCR_VERSION=1.4.4
ONNXRUNTIME_VERSION=1.32.0   # the CPU build; the version this example was verified with
PY=${PYTHON:-python3}

say() { echo "setup: $*" >&2; }
log=$(mktemp); trap 'rm -f "$log"' EXIT
quiet() { "$@" >"$log" 2>&1 || { cat "$log" >&2; say "failed: $*"; exit 1; }; }
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive

# --- Debian packages ---------------------------------------------------------------------
apt_pkgs=(ffmpeg fonts-dejavu-core libgl1 libglib2.0-0)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  say "apt-get install ${missing[*]}"
  quiet $sudo apt-get update -qq
  quiet $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- Python packages ---------------------------------------------------------------------
if ! "$PY" -m pip --version >/dev/null 2>&1; then
  say "apt-get install python3-pip"
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  quiet $sudo apt-get update -qq
  quiet $sudo apt-get install -y -qq python3-pip
fi
pip_flags=(--quiet)
# Debian's own python3 refuses pip installs (PEP 668) unless told; a venv or pyenv python does not.
if "$PY" -c 'import sys,sysconfig,os; sys.exit(0 if sys.prefix==sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path("stdlib"),"EXTERNALLY-MANAGED")) else 1)'; then
  pip_flags+=(--break-system-packages)
fi

have_rapidocr() {
  "$PY" - "$RAPIDOCR_VERSION" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if version("rapidocr-onnxruntime") == sys.argv[1] else 1)
PYEOF
}
if ! have_rapidocr; then
  if "$PY" -c 'import onnxruntime' 2>/dev/null; then
    # Some onnxruntime build (onnxruntime-gpu, say) is there already: keep it.
    say "pip install rapidocr-onnxruntime==$RAPIDOCR_VERSION (keeping the installed onnxruntime)"
    quiet "$PY" -m pip install "${pip_flags[@]}" "rapidocr-onnxruntime==$RAPIDOCR_VERSION"
  else
    say "pip install rapidocr-onnxruntime==$RAPIDOCR_VERSION onnxruntime==$ONNXRUNTIME_VERSION"
    # The pinned onnxruntime may have no wheel for this Python: then take what pip picks.
    "$PY" -m pip install "${pip_flags[@]}" "rapidocr-onnxruntime==$RAPIDOCR_VERSION" \
        "onnxruntime==$ONNXRUNTIME_VERSION" >"$log" 2>&1 \
      || quiet "$PY" -m pip install "${pip_flags[@]}" "rapidocr-onnxruntime==$RAPIDOCR_VERSION"
  fi
fi

# It must import, and ship its models (no download at run time).
"$PY" - <<'PYEOF'
import os, sys
import onnxruntime
import rapidocr_onnxruntime
models = os.path.join(os.path.dirname(rapidocr_onnxruntime.__file__), "models")
onnx = sorted(f for f in os.listdir(models) if f.endswith(".onnx")) if os.path.isdir(models) else []
need = ("det", "rec")
if not all(any(k in f for f in onnx) for k in need):
    sys.exit(f"setup: rapidocr_onnxruntime ships no det/rec ONNX models in {models}: {onnx}")
print(f"setup: rapidocr_onnxruntime ok, onnxruntime {onnxruntime.__version__}, "
      f"providers available {onnxruntime.get_available_providers()}, models {onnx}", file=sys.stderr)
PYEOF

# --- the gpuflow worker SDK --------------------------------------------------------------
if [ -f "$repo/python/pyproject.toml" ] || [ -f "$repo/python/setup.py" ]; then
  # Always (re)install: the SDK sits in this repo and may have changed since the last run.
  # Build from a copy so no build/ or egg-info lands in the source tree.
  sdk=$(mktemp -d); trap 'rm -f "$log"; rm -rf "$sdk"' EXIT
  cp -r "$repo/python/." "$sdk/"
  rm -rf "$sdk/build" "$sdk"/*.egg-info
  "$PY" -m pip install "${pip_flags[@]}" --no-build-isolation "$sdk" >"$log" 2>&1 \
    || quiet "$PY" -m pip install "${pip_flags[@]}" "$sdk"
  "$PY" -c 'import gpuflow' || { say "the gpuflow SDK does not import after install"; exit 1; }
else
  say "no SDK at $repo/python yet; skipping (the ocr worker needs 'import gpuflow')"
fi
say "done"
