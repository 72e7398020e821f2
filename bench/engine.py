"""What every benchmark needs: start a real `gpuflow serve` on a temp dir, and call its API.
Standard library only."""
import json
import os
import subprocess
import time
import urllib.error
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


def start(binary, config, directory, ready=True):
    """Starts the engine and waits until it answers (with `ready`, until start-up, recovery
    included, is done); returns (process, base URL)."""
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
            except urllib.error.HTTPError:
                if not ready:
                    return engine, base  # it answers: 503 while it is still starting
            except OSError:
                pass
        time.sleep(0.005)


def stop(engine):
    engine.terminate()
    engine.wait()


def wait_ready(base):
    """Waits until `/healthz` answers 200 (start-up and recovery done)."""
    while True:
        try:
            call(base, "GET", "/healthz", timeout=1)
            return
        except OSError:
            time.sleep(0.01)


def wait_drained(base, interval=0.01):
    """Waits until no job is queued or running."""
    while any(call(base, "GET", f"/v1/jobs?state={s}&limit=1")["jobs"] for s in ("queued", "running")):
        time.sleep(interval)


def submit_many(base, pipeline, n, threads=8, input_of=None):
    """Submits n jobs from `threads` client threads; returns their ids in order."""
    import concurrent.futures

    def one(i):
        body = {"pipeline": pipeline}
        if input_of is not None:
            body["input"] = input_of(i)
        return call(base, "POST", "/v1/jobs", body)["id"]

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(n)))


def submit_batches(base, pipeline, n, chunk=1000, threads=2):
    """Submits n jobs through `POST /v1/jobs/batch`, `chunk` per request; returns their ids."""
    import concurrent.futures

    def one(k):
        size = min(chunk, n - k)
        answer = call(base, "POST", "/v1/jobs/batch", {"jobs": [{"pipeline": pipeline}] * size})
        refused = [e["error"] for e in answer["jobs"] if "error" in e]
        if refused:
            raise RuntimeError(f"{len(refused)} of {size} refused, first: {refused[0]}")
        return [e["id"] for e in answer["jobs"]]

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return [i for ids in pool.map(one, range(0, n, chunk)) for i in ids]


def ts_ms(iso):
    """An API timestamp (RFC 3339) as epoch milliseconds."""
    import datetime

    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000.0


def percentile(values, p):
    """Nearest-rank percentile, p in [0, 100]."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def with_sdk_on_path():
    """Worker scripts import the SDK from the source tree, as the integration tests do."""
    sdk = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "python"))
    os.environ["PYTHONPATH"] = sdk + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    return sdk


def write_result(name, result):
    """Writes bench/NAME.json (each script's own output) and returns the result."""
    with open(os.path.join(os.path.dirname(__file__), f"{name}.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result
