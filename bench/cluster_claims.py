"""Claim throughput of the shared PostgreSQL queue: stages claimed and finished per second
with 1 agent and with 3 agents on one PostgreSQL (issues #5, #15).

The queue is filled straight in the database first (N one-stage jobs, claimable), then the
agents start; the figure is completed stages over the time from the first claim to the last
finish, read from the database's own timestamps.

Two stage kinds: `noop` (`command: ["gpuflow:noop"]`, no process: the claim, the local turn
and the fenced finish alone; goals: 1 agent >= 1,000/s, 3 agents >= 2,000/s) and `true` (a
real process per stage, bounded by spawning). The baseline, measured in the same run: raw
PostgreSQL round trips per second from one connection (`pgbench -S`, one SELECT per
transaction), and the load average.

    python3 bench/cluster_claims.py [--jobs 2000] [--kind noop|true|both] [--bin target/release/gpuflow]

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
      - {{name: only, command: ["{command}"], needs: {{cpu: 1}}}}
"""


def pgbench_round_trips(seconds=5):
    """Round trips per second from one connection: `pgbench -S` (one SELECT per transaction),
    in a database of its own."""
    name = f"gpuflow_bench_rtt_{os.getpid()}"
    url = f"{ADMIN.rsplit('/', 1)[0]}/{name}"
    psql(ADMIN, f"DROP DATABASE IF EXISTS {name}")
    psql(ADMIN, f"CREATE DATABASE {name}")
    try:
        subprocess.run(["pgbench", "-i", "-s", "1", "-q", url], check=True, capture_output=True)
        out = subprocess.run(["pgbench", "-n", "-S", "-c", "1", "-T", str(seconds), url], check=True, capture_output=True, text=True).stdout
        tps = next(l for l in out.splitlines() if l.startswith("tps"))
        return float(tps.split("=")[1].split()[0])
    finally:
        psql(ADMIN, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def psql(url, sql):
    out = subprocess.run(["psql", url, "-AtXqc", sql], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def run(binary, agents, jobs, cpu, command):
    name = f"gpuflow_bench_{os.getpid()}_{agents}"
    base_url = ADMIN.rsplit("/", 1)[0]
    url = f"{base_url}/{name}"
    psql(ADMIN, f"DROP DATABASE IF EXISTS {name}")
    psql(ADMIN, f"CREATE DATABASE {name}")
    procs = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            body = CONFIG.format(url=url, cpu=cpu, command=command)
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
            # Polled gently: the poll's own queries compete with the agents for PostgreSQL.
            while psql(url, "SELECT EXISTS (SELECT 1 FROM jobs WHERE state <> 'succeeded')") == "t":
                if time.time() > deadline:
                    raise RuntimeError("the queue did not drain")
                time.sleep(0.5)
            first, last, done = psql(url, "SELECT min(started_at), max(finished_at), count(*) FROM attempts WHERE state = 'succeeded'").split("|")
            extra = psql(url, "SELECT count(*) FROM attempts WHERE state <> 'succeeded'")
            seconds = (int(last) - int(first)) / 1000
            return {"agents": agents, "kind": command, "cpu": cpu, "stages": int(done), "other_attempts": int(extra), "seconds": seconds,
                    "stages_per_s": int(done) / seconds, "load": os.getloadavg()[0]}
    finally:
        for p in procs:
            eng.stop(p)
        psql(ADMIN, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2000, help="jobs per run of `true` stages (no-op runs use 10x)")
    ap.add_argument("--cpu", type=int, default=4, help="CPU slots per agent for `true` stages")
    ap.add_argument("--noop-cpu", type=int, default=64, help="CPU slots per agent for no-op stages")
    ap.add_argument("--kind", choices=["noop", "true", "both"], default="both")
    ap.add_argument("--bin", default="target/release/gpuflow")
    args = ap.parse_args()
    rtt = pgbench_round_trips()
    results = []
    kinds = ["gpuflow:noop", "true"] if args.kind == "both" else ["gpuflow:noop" if args.kind == "noop" else "true"]
    for command in kinds:
        noop = command == "gpuflow:noop"
        for n in (1, 3):
            results.append(run(args.bin, n, args.jobs * (10 if noop else 1), args.noop_cpu if noop else args.cpu, command))
    print(f"baseline: {rtt:.0f} PostgreSQL round trips/s from one connection (pgbench -S)")
    print(f"{'stage':>13} {'agents':>6} {'slots':>5} {'stages':>7} {'seconds':>8} {'stages/s':>9} {'load':>5}")
    for r in results:
        print(f"{r['kind']:>13} {r['agents']:>6} {r['cpu']:>5} {r['stages']:>7} {r['seconds']:>8.2f} {r['stages_per_s']:>9.0f} {r['load']:>5.1f}")
    eng.write_result("cluster_claims", {"runs": results, "pg_round_trips_per_s": rtt})


if __name__ == "__main__":
    main()
