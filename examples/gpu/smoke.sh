#!/usr/bin/env bash
# Real-GPU check: NVML discovery (`gpus: auto`); stages see exactly what they lease; a stuck
# GPU stage that ignores SIGTERM is named by `task_stalled` for as long as it lives, then
# killed at its timeout, and its VRAM comes back; DataLoader workers forked after CUDA init
# are named by `fork_after_cuda` (spawned ones are not); a CUDA child orphaned by a `kill -9`
# of its stage's parent does not keep its VRAM, even one that dropped its attempt marker.
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

echo "--- hang: a stuck stage holding VRAM; task_stalled stays open while it lives, then its timeout kills it"
start=$(date +%s.%N)
cli submit hang >/dev/null
hang_job=$(last_job)
"$bin" --server "$server" doctor >/dev/null
python3 - "$bin" "$server" "$hang_job" <<'PY'
import json, subprocess, sys, time
bin, server, job = sys.argv[1:]
def cli(*args):
    return json.loads(subprocess.run([bin, "--server", server, *args], check=True, capture_output=True, text=True).stdout)
def stalled(d):
    return [f for f in d["open"] if f["kind"] == "task_stalled" and job in f["summary"]]
t0 = time.time()
while True:
    d = cli("doctor", "--json")
    if stalled(d):
        break
    assert time.time() - t0 < 40, f"task_stalled never opened: {json.dumps(d, indent=1)}"
    time.sleep(0.5)
print(f"task_stalled opened {time.time() - t0:.1f} s after submit: {stalled(d)[0]['summary']}")
kinds = {f["kind"] for f in d["open"]}
print("open findings:", sorted(kinds))
g = d["gpus"][0]
print("nvml reading:", g["utilization_pct"], "% busy,", g["memory_used_bytes"], "bytes used,", g["processes"])
assert {"task_stalled", "gpu_idle_under_lease"} <= kinds, kinds
opened_at, polls = stalled(d)[0]["opened_at"], 0
while cli("status", job, "--json")["state"] == "running":
    d = cli("doctor", "--json")
    live = stalled(d)
    assert live, f"gap: task_stalled closed while the stuck stage lives (poll {polls}): {json.dumps(d, indent=1)}"
    assert live[0]["opened_at"] == opened_at, f"reopened: {live[0]}"
    polls += 1
    time.sleep(0.5)
print(f"task_stalled stayed open, same opening, over {polls} polls until the stage was killed")
PY
cli doctor
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

echo "--- fork_cuda: DataLoader workers forked after CUDA init are a hazard; spawned ones are not"
open_of() { cli doctor --json | python3 -c 'import json,sys; job=sys.argv[1]; kind=sys.argv[2]; d=json.load(sys.stdin); f=[x for x in d["open"] if x["kind"]==kind and job in x["summary"]]; print(json.dumps(f[0]) if f else "")' "$1" "$2"; }
cli submit fork_cuda >/dev/null
fork_job=$(last_job)
cli submit spawn_cuda >/dev/null
spawn_job=$(last_job)
found=""
for _ in $(seq 60); do
  found=$(open_of "$fork_job" fork_after_cuda)
  [ -n "$found" ] && break
  sleep 0.5
done
[ -n "$found" ] || { echo "fork_after_cuda NOT FLAGGED"; cli doctor; exit 1; }
echo "$found" | python3 -c 'import json,sys; f=json.load(sys.stdin); print(f["summary"]); [print("  ", e["value"]) for e in f["evidence"]]'
sleep 3
[ -z "$(open_of "$spawn_job" fork_after_cuda)" ] || { echo "spawned DataLoader workers flagged as forked"; exit 1; }
echo "spawned workers: not flagged"
cli cancel "$fork_job" >/dev/null
cli cancel "$spawn_job" >/dev/null

# kill -9 the stage's parent; its CUDA child must give its VRAM back. Prints what NVML showed.
orphan_case() {
  pipeline=$1
  rm -f gpuflow-gpu-smoke/orphan.pids
  cli submit "$pipeline" >/dev/null
  for _ in $(seq 120); do [ -f gpuflow-gpu-smoke/orphan.pids ] && break; sleep 0.5; done
  read -r parent child < gpuflow-gpu-smoke/orphan.pids
  echo "NVML before: $(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader | tr '\n' ';')"
  nvidia-smi --query-compute-apps=pid --format=csv,noheader | grep -qw "$child" || { echo "child $child holds no VRAM"; exit 1; }
  t0=$(date +%s.%N)
  kill -9 "$parent"
  for _ in $(seq 60); do
    nvidia-smi --query-compute-apps=pid --format=csv,noheader | grep -qw "$child" || break
    sleep 0.25
  done
  t1=$(date +%s.%N)
  left=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader)
  echo "NVML after $(python3 -c "print(round($t1 - $t0, 2))") s: ${left:-no compute processes}"
  ! nvidia-smi --query-compute-apps=pid --format=csv,noheader | grep -qw "$child" || { echo "VRAM of orphan $child still held"; exit 1; }
}
echo "--- orphan: the CUDA child of a kill -9'd stage parent is killed with its attempt"
orphan_case orphan
echo "--- orphan_scrubbed: a child without its attempt marker is found through NVML and reclaimed"
orphan_case orphan_scrubbed
sleep 7
cli doctor --json | python3 -c 'import json,sys; d=json.load(sys.stdin); f=[x for x in d["open"]+d["recent"] if x["kind"]=="gpu_memory_orphaned"]; print(f[0]["summary"] if f else "gpu_memory_orphaned NOT SEEN"); [print("  ", e["value"]) for e in (f[0]["evidence"] if f else [])]; assert f'
