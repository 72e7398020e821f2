#!/usr/bin/env bash
# Starts the engine on examples/quickstart.yaml (embedded SQLite, one virtual GPU), runs jobs
# through it with the CLI, shows the engine's view, and stops it.
#
# GPUFLOW_BIN=/path/to/gpuflow uses that binary (e.g. an installed one); otherwise the
# debug build is built first. The CLI talks to the engine this script started, whatever
# GPUFLOW_SERVER says; GPUFLOW_STORE and GPUFLOW_CONFIG are ignored for the same reason.
set -euo pipefail
cd "$(dirname "$0")/.."
unset GPUFLOW_SERVER GPUFLOW_STORE GPUFLOW_CONFIG
if [ -n "${GPUFLOW_BIN:-}" ]; then
  bin=$GPUFLOW_BIN
  [ -x "$bin" ] || { echo "GPUFLOW_BIN=$bin is not an executable file" >&2; exit 1; }
else
  cargo build --quiet --bin gpuflow
  bin=${CARGO_TARGET_DIR:-target}/debug/gpuflow
fi
log=$(mktemp)
addr_file=gpuflow-data/listen.addr   # data_dir in quickstart.yaml; written once it listens
rm -f "$addr_file"
"$bin" serve --config examples/quickstart.yaml 2>"$log" &
engine=$!
trap 'kill $engine 2>/dev/null; wait $engine 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 100); do
  [ -s "$addr_file" ] && curl -fsS "http://$(cat "$addr_file")/healthz" >/dev/null 2>&1 && break
  kill -0 $engine 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.1
done
[ -s "$addr_file" ] || { echo "the engine did not start listening; its log:" >&2; cat "$log" >&2; exit 1; }
# This engine, not one GPUFLOW_SERVER may point at.
export GPUFLOW_SERVER="http://$(cat "$addr_file")"
"$bin" check examples/quickstart.yaml
echo "--- three jobs at once: GPU stages take turns on the one device, CPU stages overlap them"
pids=()
for text in "the quick brown fox" "subtitle frames to text" "gpus should never idle"; do
  "$bin" submit quickstart --input text="$text" --wait &
  pids+=($!)
done
sleep 1
"$bin" resources
for p in "${pids[@]}"; do wait "$p"; done
echo "--- jobs"
"$bin" jobs
