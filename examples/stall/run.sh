#!/usr/bin/env bash
# Starts gpuflow on examples/stall/stall.yaml, submits two generation jobs (the first hangs
# after 10 of 150 batches, the second waits behind it), waits twice the 5 s thresholds, and
# prints `gpuflow doctor`.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --quiet --bin gpuflow
bin=target/debug/gpuflow
rm -rf ./gpuflow-stall-data
log=$(mktemp)
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
"$bin" serve --config examples/stall/stall.yaml 2>"$log" &
engine=$!
trap 'kill $engine 2>/dev/null; wait $engine 2>/dev/null; rm -f "$log"' EXIT
export GPUFLOW_SERVER=http://127.0.0.1:7071
for _ in $(seq 300); do
  curl -fsS "$GPUFLOW_SERVER/healthz" >/dev/null 2>&1 && break
  kill -0 $engine 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.1
done
"$bin" submit generate >/dev/null
"$bin" submit generate >/dev/null
sleep 10
"$bin" doctor
