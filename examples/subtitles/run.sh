#!/usr/bin/env bash
# The subtitles example, end to end, in one command (from anywhere):
#   bash examples/subtitles/run.sh
# 1. setup.sh: ffmpeg, the DejaVu font, rapidocr-onnxruntime (ships the PP-OCRv4 models), the SDK
# 2. a test video with burned-in subtitles of known text and timing -> examples/subtitles/testdata/
# 3. builds gpuflow, starts the engine on examples/subtitles/subtitles.yaml (127.0.0.1:7072,
#    data in ./gpuflow-subtitles-data), submits one job and follows it to the end
# 4. checks the produced .srt against the ground truth (check_srt.py); exit status = the check's
# 5. reports the OCR provider in use, OCR time per frame, and the same OCR in a plain loop
#    (direct_baseline.py) to show the engine's per-task overhead
# Overrides, for testing: GPUFLOW_BIN (skip the build), SUBTITLES_CONFIG, SUBTITLES_TESTDATA.
set -euo pipefail
cd "$(dirname "$0")/../.."
ex=examples/subtitles
config=${SUBTITLES_CONFIG:-$ex/subtitles.yaml}
testdata=${SUBTITLES_TESTDATA:-$ex/testdata}

echo "=== setup"
bash $ex/setup.sh

echo "=== test video"
python3 $ex/make_test_video.py --out-dir "$testdata"
video=$(cd "$testdata" && pwd)/test.mp4
truth=$(cd "$testdata" && pwd)/test.truth.json

if [ -n "${GPUFLOW_BIN:-}" ]; then
  bin=$GPUFLOW_BIN
else
  cargo build --quiet --bin gpuflow
  bin=target/debug/gpuflow
fi
"$bin" check "$config" >&2
listen=$("$bin" check "$config" | sed -n 's/^  listen \([^ ]*\).*/\1/p')
server="http://$listen"
healthy() { python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/healthz", timeout=1)' "$server" 2>/dev/null; }
if healthy; then
  echo "something already answers on $server; stop it first" >&2
  exit 1
fi

work=$(mktemp -d)
echo "=== engine on $server (log: $work/engine.log)"
"$bin" serve --config "$config" 2>"$work/engine.log" &
engine=$!
cleanup() {
  kill "$engine" 2>/dev/null || true
  wait "$engine" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 300); do
  healthy && break
  kill -0 "$engine" 2>/dev/null || { cat "$work/engine.log" >&2; exit 1; }
  sleep 0.1
done
healthy || { echo "engine did not come up" >&2; tail -50 "$work/engine.log" >&2; exit 1; }

echo "=== job"
set +e
"$bin" submit subtitles --input video="$video" --wait --server "$server" >"$work/output.json" 2> >(tee "$work/submit.err" >&2)
rc=$?
set -e
sleep 0.2  # let the tee'd stderr land
id=$(sed -n 's/^submitted \([^ ]*\).*/\1/p' "$work/submit.err" | head -1)
[ -n "$id" ] || { echo "no job id in submit's output" >&2; exit 1; }
"$bin" status "$id" --json --server "$server" >"$work/job.json"
if [ "$rc" != 0 ]; then
  echo "job $id did not succeed (submit exit $rc)" >&2
  python3 $ex/job_report.py "$work/job.json" >&2 || true
  echo "--- engine log (end)" >&2; tail -40 "$work/engine.log" >&2
  exit 1
fi
cat "$work/output.json"
srt=$(python3 $ex/job_report.py "$work/job.json" --print srt)
echo "--- $srt"
cat "$srt"

echo "=== check"
fps=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["input"].get("fps", 2))' "$work/job.json")
set +e
python3 $ex/check_srt.py "$srt" "$truth" --fps "$fps"
check=$?
set -e

echo "=== OCR timing: engine vs a plain loop over the same frames"
python3 $ex/job_report.py "$work/job.json" --print frames_json >"$work/frames.json"
python3 $ex/direct_baseline.py "$work/frames.json" --quiet | tee "$work/baseline.txt"
base_ms=$(sed -n 's/.* mean \([0-9.]*\) ms.*/\1/p' "$work/baseline.txt" | tail -1)
python3 $ex/job_report.py "$work/job.json" ${base_ms:+--baseline-ms "$base_ms"}
echo "--- engine resources (the ocr pool's instance)"
"$bin" resources --server "$server" || true
exit "$check"
