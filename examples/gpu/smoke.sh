#!/usr/bin/env bash
# Real-GPU check: NVML discovery (`gpus: auto`); stages see exactly what they lease; a stuck
# GPU stage that ignores SIGTERM is killed at its timeout and its VRAM comes back.
# Usage: examples/gpu/smoke.sh [path/to/gpuflow]   (needs an NVIDIA driver and PyTorch)
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${1:-target/release/gpuflow}
server=http://127.0.0.1:7071
cli() { "$bin" --server "$server" "$@"; }
last_job() { cli jobs --limit 1 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["id"])'; }
rm -rf gpuflow-gpu-smoke
"$bin" check examples/gpu/smoke.yaml
"$bin" serve --config examples/gpu/smoke.yaml 2>gpu-smoke-engine.log &
engine=$!
trap 'kill $engine 2>/dev/null; wait $engine 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -f gpuflow-gpu-smoke/listen.addr ] && break; sleep 0.1; done
sleep 0.3
cli resources

echo "--- smoke: GPU stage on its leased device, CPU stage sees no GPU"
cli submit smoke --wait
cli status "$(last_job)" --json | python3 -c 'import json,sys; [print(s["name"], json.dumps(s["output"])) for s in json.load(sys.stdin)["stages"]]'

echo "--- hang: a stuck stage holding VRAM; doctor names it, then its timeout kills it"
start=$(date +%s.%N)
cli submit hang >/dev/null
sleep 10
cli doctor
cli doctor --json > gpu-smoke-doctor.json
python3 - <<'PY'
import json
d = json.load(open("gpu-smoke-doctor.json"))
kinds = {f["kind"] for f in d["open"]}
print("open findings:", sorted(kinds))
g = d["gpus"][0]
print("nvml reading:", g["utilization_pct"], "% busy,", g["memory_used_bytes"], "bytes used,", g["processes"])
assert {"task_stalled", "gpu_idle_under_lease"} <= kinds, kinds
PY
while [ "$(cli status "$(last_job)" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')" = running ]; do sleep 0.5; done
end=$(date +%s.%N)
cli status "$(last_job)" --json | python3 -c 'import json,sys; a=json.load(sys.stdin)["stages"][0]["attempt_history"][0]; print("attempt:", a["state"], "signal:", a["signal"])'
echo "submit-to-final: $(python3 -c "print(round($end - $start, 2))") s (timeout 15s + kill_grace 5s + start-up)"
left=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader)
echo "GPU compute processes left: ${left:-none}"
[ -z "$left" ] || { echo "VRAM still held after the kill"; exit 1; }
cli resources

echo "--- cpu_only: a CPU stage that declares a GPU is flagged as not using it"
cli submit cpu_only >/dev/null
sleep 5
cli doctor --json | python3 -c 'import json,sys; d=json.load(sys.stdin); f=[x for x in d["open"] if x["kind"]=="gpu_unused"]; print(f[0]["summary"] if f else "NOT FLAGGED"); assert f'
