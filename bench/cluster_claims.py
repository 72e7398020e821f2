"""Claim throughput of the shared PostgreSQL queue: no-op stages per second with 1 agent and
with 3 agents on this machine (issue #5).

The queue is filled straight in the database first (N one-stage jobs, claimable), then the
agents start; the figure is completed stages over the time from the first claim to the last
finish, read from the database's own timestamps. Each stage is a real process (`true`), so
the bound is the same spawn loop as `quick_throughput.py`; the ratio printed is agents(3) /
agents(1).

    python3 bench/cluster_claims.py [--jobs 2000] [--bin target/release/gpuflow]

Writes bench/cluster_claims.json (read by `bench/run.py cluster`).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
import engine as eng  # noqa: E402

ADMIN = os.environ.get("GPUFLOW_TEST_PG", "postgres://postgres@127.0.0.1:5432/postgres")

CONFIG = """
store: {url}
cluster: {{lease_ttl: 10s, poll_interval: 200ms}}
resources:
  gpus: none
  cpu: {cpu}
pipelines:
  noop:
    max_queued: 1000000
    stages:
      - {{name: only, command: ["true"], needs: {{cpu: 1}}}}
"""


def psql(url, sql):
    out = subprocess.run(["psql", url, "-AtXqc", sql], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def run(binary, agents, jobs, cpu):
    name = f"gpuflow_bench_{os.getpid()}_{agents}"
    base_url = ADMIN.rsplit("/", 1)[0]
    url = f"{base_url}/{name}"
    psql(ADMIN, f"DROP DATABASE IF EXISTS {name}")
    psql(ADMIN, f"CREATE DATABASE {name}")
    procs = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            body = CONFIG.format(url=url, cpu=cpu)
            # One agent creates the schema; stop it, fill the queue, then start them all.
            first_dir = os.path.join(tmp, "a0")
            os.makedirs(first_dir)
            p, _ = eng.start(binary, eng.write_config(first_dir, body), first_dir)
            eng.stop(p)
            text = "listen: 127.0.0.1:0\ndata_dir: x\n" + body
            psql(url, "INSERT INTO config_snapshots VALUES ('bench', $$" + text + "$$, 0)")
            psql(url, f"""
                INSERT INTO jobs (id, pipeline, input, priority, state, config_hash, created_at)
                SELECT 'job-' || g, 'noop', '{{}}', 0, 'queued', 'bench', 0 FROM generate_series(1, {jobs}) g;
                INSERT INTO stages (job_id, idx, name, deps, state, priority, job_seq)
                SELECT 'job-' || g, 0, 'only', '[]', 'queued', 0, g FROM generate_series(1, {jobs}) g;""")
            for i in range(agents):
                d = os.path.join(tmp, f"a{i}")
                os.makedirs(d, exist_ok=True)
                procs.append(eng.start(binary, eng.write_config(d, body), d)[0])
            deadline = time.time() + 600
            while psql(url, "SELECT count(*) FROM jobs WHERE state <> 'succeeded'") != "0":
                if time.time() > deadline:
                    raise RuntimeError("the queue did not drain")
                time.sleep(0.2)
            first, last, done = psql(url, "SELECT min(started_at), max(finished_at), count(*) FROM attempts WHERE state = 'succeeded'").split("|")
            extra = psql(url, "SELECT count(*) FROM attempts WHERE state <> 'succeeded'")
            seconds = (int(last) - int(first)) / 1000
            return {"agents": agents, "stages": int(done), "other_attempts": int(extra), "seconds": seconds, "stages_per_s": int(done) / seconds}
    finally:
        for p in procs:
            eng.stop(p)
        psql(ADMIN, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--cpu", type=int, default=4, help="CPU slots per agent")
    ap.add_argument("--bin", default="target/release/gpuflow")
    args = ap.parse_args()
    results = [run(args.bin, n, args.jobs, args.cpu) for n in (1, 3)]
    print(f"{'agents':>6} {'stages':>7} {'seconds':>8} {'stages/s':>9}")
    for r in results:
        print(f"{r['agents']:>6} {r['stages']:>7} {r['seconds']:>8.2f} {r['stages_per_s']:>9.0f}")
    ratio = results[1]["stages_per_s"] / results[0]["stages_per_s"]
    print(f"3 agents / 1 agent: {ratio:.2f} (2 cores: the agents and their processes share them)")
    eng.write_result("cluster_claims", {"runs": results, "ratio_3_to_1": ratio})


if __name__ == "__main__":
    main()
