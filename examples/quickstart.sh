#!/usr/bin/env bash
# Builds gpuflow, starts the engine on examples/quickstart.yaml (embedded SQLite, one virtual
# GPU), runs jobs through it with the CLI, shows the engine's view, and stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --bin gpuflow
bin=target/debug/gpuflow
log=$(mktemp)
"$bin" serve --config examples/quickstart.yaml 2>"$log" &
engine=$!
trap 'kill $engine 2>/dev/null; wait $engine 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 100); do
  curl -fsS http://127.0.0.1:7070/healthz >/dev/null 2>&1 && break
  kill -0 $engine 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.1
done
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
