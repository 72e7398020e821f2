#!/usr/bin/env python3
"""The disk-full run, by hand (needs root for the tmpfs): the data directory on an 8 MiB tmpfs,
jobs with 20 KB inputs submitted until the store refuses 20 times, then the tmpfs grown to
64 MiB; checks the engine stays up, answers 507 and `degraded`, resumes by itself, loses no
acknowledged job, and still has them all after a restart.

Usage: sudo python3 bench/disk_full.py target/release/gpuflow"""
import json, os, subprocess, sys, time, urllib.request, urllib.error, tempfile
binary = sys.argv[1]
d = tempfile.mkdtemp()
data = os.path.join(d, "data"); os.makedirs(data)
subprocess.check_call(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", data])
cfg = os.path.join(d, "g.yaml")
open(cfg, "w").write(f"listen: 127.0.0.1:0\ndata_dir: {data}\nresources: {{gpus: none, cpu: 2}}\npipelines:\n  p: {{max_queued: 100000, stages: [{{name: s, command: [sleep, '0.2']}}]}}\n")
eng = subprocess.Popen([binary, "serve", "--config", cfg], stderr=open(os.path.join(d, "log"), "w"))
while not os.path.exists(os.path.join(data, "listen.addr")): time.sleep(0.05)
time.sleep(0.5)
base = "http://" + open(os.path.join(data, "listen.addr")).read().strip()
def req(method, path, body=None, timeout=5):
    r = urllib.request.Request(base + path, data=json.dumps(body).encode() if body is not None else None, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(r, timeout=timeout) as x: return x.status, json.load(x), dict(x.headers)
    except urllib.error.HTTPError as e: return e.code, json.load(e), dict(e.headers)
acked, statuses = [], {}
pad = "x" * 20000
t0 = time.time(); first_refusal = None
for i in range(2000):
    try:
        s, b, h = req("POST", "/v1/jobs", {"pipeline": "p", "input": {"pad": pad}}, timeout=3)
    except Exception as e:
        statuses["timeout(held)"] = statuses.get("timeout(held)", 0) + 1; continue
    statuses[s] = statuses.get(s, 0) + 1
    if s == 201: acked.append(b["id"])
    elif first_refusal is None: first_refusal = (s, b["error"]["message"], h.get("retry-after") or h.get("Retry-After")); 
    if statuses.get(507, 0) >= 20: break
print("statuses", statuses, "acked", len(acked))
print("first refusal", first_refusal)
print("healthz", req("GET", "/healthz")[:2])
print("list status", req("GET", "/v1/jobs?limit=5")[0])
time.sleep(3); print("engine alive after 3s:", eng.poll() is None)
# free space: delete WAL-unrelated files? drop the job dirs (logs) to make room
t_free = time.time()
subprocess.call(["mount", "-o", "remount,size=64m", data])
while req("GET", "/healthz")[1]["status"] != "ok": time.sleep(0.05)
print("resumed %.2f s after space returned" % (time.time() - t_free))
deadline = time.time() + 120
while time.time() < deadline:
    s, b, _ = req("GET", "/v1/jobs?state=succeeded&limit=500")
    if len(b["jobs"]) >= len(acked): break
    time.sleep(0.5)
s, b, _ = req("GET", "/v1/jobs?limit=500")
ids = {j["id"] for j in b["jobs"]}
print("acked", len(acked), "stored", len(ids), "acked missing", len(set(acked) - ids), "succeeded", sum(1 for j in b["jobs"] if j["state"] == "succeeded"))
eng.terminate(); eng.wait()
eng = subprocess.Popen([binary, "serve", "--config", cfg], stderr=open(os.path.join(d, "log2"), "w"))
time.sleep(2)
base = "http://" + open(os.path.join(data, "listen.addr")).read().strip()
s, b, _ = req("GET", "/v1/jobs?limit=500")
print("after restart: stored", len(b["jobs"]), "acked missing", len(set(acked) - {j["id"] for j in b["jobs"]}))
eng.terminate(); eng.wait()
subprocess.call(["umount", "-l", data])
