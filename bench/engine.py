"""What every benchmark needs: start a real `gpuflow serve` on a temp dir, and call its API.
Standard library only."""
import json
import os
import subprocess
import time
import urllib.request


def call(base, method, path, body=None, timeout=60):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def write_config(directory, body):
    """Writes a pipeline file listening on a free loopback port, with its data in `directory`."""
    path = os.path.join(directory, "bench.yaml")
    with open(path, "w") as f:
        f.write(f"listen: 127.0.0.1:0\ndata_dir: {directory}/data\n{body}")
    return path


def start(binary, config, directory):
    """Starts the engine and waits until it answers; returns (process, base URL)."""
    addr = os.path.join(directory, "data", "listen.addr")
    if os.path.exists(addr):
        os.remove(addr)
    engine = subprocess.Popen([binary, "serve", "--config", config], stderr=subprocess.DEVNULL, env={**os.environ, "GPUFLOW_LOG": "warn"})
    while True:
        if engine.poll() is not None:
            raise RuntimeError(f"the engine exited with status {engine.returncode}")
        if os.path.exists(addr):
            base = "http://" + open(addr).read().strip()
            try:
                call(base, "GET", "/healthz", timeout=1)
                return engine, base
            except OSError:
                pass
        time.sleep(0.005)


def stop(engine):
    engine.terminate()
    engine.wait()


def wait_drained(base):
    """Waits until no job is queued or running."""
    while any(call(base, "GET", f"/v1/jobs?state={s}&limit=1")["jobs"] for s in ("queued", "running")):
        time.sleep(0.01)
