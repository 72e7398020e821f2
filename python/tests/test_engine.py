"""The clients against a real engine: `gpuflow serve` as a child process, with command stages,
a worker pool running worker_app.py, a workflow library and a bearer token.

The binary is $GPUFLOW_BIN, else target/debug/gpuflow (built with cargo when missing).
"""

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
PYTHON_DIR = TESTS_DIR.parent
REPO = PYTHON_DIR.parent
sys.path.insert(0, str(PYTHON_DIR))

import gpuflow  # noqa: E402

TOKEN = "engine-test-token-0123456789"
PYTHON = sys.executable


def engine_binary():
    given = os.environ.get("GPUFLOW_BIN")
    if given:
        return Path(given)
    path = REPO / "target" / "debug" / "gpuflow"
    if not path.exists():
        subprocess.run(["cargo", "build", "--quiet", "--bin", "gpuflow"], cwd=REPO, check=True)
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_text(tmp, port):
    greet = (
        "import json, os, sys; print('out:' + sys.argv[1]); print('err:' + sys.argv[1], file=sys.stderr); "
        "json.dump(dict(greeting='hi ' + sys.argv[1]), open(os.environ['GPUFLOW_OUTPUT'], 'w'))"
    )
    size = "import json, os, sys; json.dump(dict(bytes=os.path.getsize(sys.argv[1])), open(os.environ['GPUFLOW_OUTPUT'], 'w'))"
    # No braces in the stage programs: `{...}` in a command is a template.
    return f"""
listen: 127.0.0.1:{port}
data_dir: {tmp}/data
resources:
  gpus: [{{memory: 16GiB, name: v0}}]
  cpu: 4
auth:
  token: "{TOKEN}"
allowed_roots: [{tmp}/videos]
limits:
  kill_grace: 3s
workers:
  ocr:
    command: [{json.dumps(PYTHON)}, {json.dumps(str(TESTS_DIR / "worker_app.py"))}]
    instances: 1
    needs: {{cpu: 1}}
    # worker_app.py prints at import, before serve() guards stdout: that needs a buffered stdout.
    env: {{PYTHONPATH: {json.dumps(str(PYTHON_DIR))}, PYTHONUNBUFFERED: "", GPUFLOW_TEST_TEARDOWN_FILE: {json.dumps(str(tmp / "teardown.log"))}}}
pipelines:
  hello:
    inputs:
      text: {{type: string}}
    stages:
      - name: greet
        needs: {{cpu: 1}}
        command: [{json.dumps(PYTHON)}, -c, {json.dumps(greet)}, "{{input.text}}"]
  slow:
    stages:
      - {{name: nap, needs: {{cpu: 1}}, command: [sleep, "{{input.seconds}}"]}}
  broken:
    stages:
      - name: fail
        needs: {{cpu: 1}}
        retry: {{max_attempts: 1}}
        command: [{json.dumps(PYTHON)}, -c, "import sys; print('bad things', file=sys.stderr); sys.exit(3)"]
  on_worker:
    stages:
      - {{name: ocr, worker: ocr}}
workflows:
  input: video
  stages:
    probe.size: {{command: [{json.dumps(PYTHON)}, -c, {json.dumps(size)}, "{{input.video}}"], needs: {{cpu: 1}}}}
"""


class Engine:
    """`gpuflow serve` on a temp directory; `stop()` sends SIGTERM, as an operator would."""

    def __init__(self, tmp, port):
        self.tmp = tmp
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.config = tmp / "pipeline.yaml"
        self.config.write_text(config_text(tmp, port))
        (tmp / "videos").mkdir(exist_ok=True)
        self.log = open(tmp / "engine.log", "ab")
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [str(engine_binary()), "serve", "--config", str(self.config)], cwd=REPO, stdout=self.log, stderr=self.log
        )
        deadline = time.monotonic() + 60
        with gpuflow.Client(self.url, token=TOKEN, timeout=2) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"engine exited with {self.proc.returncode}:\n{self.log_text()}")
                try:
                    if client.health().status == "ok":
                        return
                except gpuflow.GpuflowError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"engine not ready within 60s:\n{self.log_text()}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_text(self):
        self.log.flush()
        return (self.tmp / "engine.log").read_text(errors="replace")[-4000:]


class EngineTestCase(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="gpuflow-sdk-"))
        cls.engine = Engine(cls.tmp, free_port())
        cls.engine.start()

    @classmethod
    def tearDownClass(cls):
        cls.engine.stop()
        cls.engine.log.close()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def setUp(self):
        self.client = gpuflow.Client(self.engine.url, token=TOKEN)
        self.addCleanup(self.client.close)


class ClientOnEngineTest(EngineTestCase):
    def test_submit_and_wait_give_typed_jobs(self):
        submitted = self.client.submit("hello", {"text": "world"}, idempotency_key="sdk-hello-1")
        self.assertTrue(submitted.created)
        job = self.client.wait(submitted.id, timeout=60)
        self.assertIsInstance(job, gpuflow.Job)
        self.assertEqual((job.id, job.state, job.pipeline), (submitted.id, "succeeded", "hello"))
        self.assertEqual(job.output, {"greeting": "hi world"})
        greet = job.stage("greet")
        self.assertEqual((greet.state, greet.attempts, greet.exit_code), ("succeeded", 1, 0))
        self.assertEqual([a.state for a in greet.attempt_history], ["succeeded"])
        again = self.client.submit("hello", {"text": "world"}, idempotency_key="sdk-hello-1")
        self.assertEqual((again.id, again.created), (submitted.id, False))
        page = self.client.jobs(pipeline="hello", limit=50)
        self.assertIn(submitted.id, [j.id for j in page.jobs])

    def test_logs_of_a_command_stage(self):
        job = self.client.wait(self.client.submit("hello", {"text": "logs"}).id, timeout=60)
        err = self.client.logs(job.id, "greet")
        self.assertEqual((err.stream, err.attempt, err.text, err.truncated), ("stderr", 1, "err:logs\n", False))
        out = self.client.logs(job.id, "greet", stream="stdout", attempt=1, tail_bytes=4)
        self.assertEqual((out.text, out.size_bytes, out.truncated), ("ogs\n", 9, True))
        with self.assertRaises(gpuflow.NotFoundError) as caught:
            self.client.logs(job.id, "nope")
        self.assertEqual(caught.exception.code, "unknown_stage")
        self.assertIn("greet", caught.exception.message)

    def test_a_failed_job_and_its_log(self):
        job = self.client.wait(self.client.submit("broken").id, timeout=60)
        self.assertEqual(job.state, "failed")
        self.assertEqual(job.stage("fail").exit_code, 3)
        self.assertIn("bad things", self.client.logs(job.id, "fail").text)

    def test_cancel_then_wait(self):
        submitted = self.client.submit("slow", {"seconds": "30"})
        cancelled = self.client.cancel(submitted.id)
        self.assertIn(cancelled.state, ("cancelling", "cancelled"))
        job = self.client.wait(submitted.id, timeout=60)
        self.assertEqual(job.state, "cancelled")
        with self.assertRaises(gpuflow.ConflictError) as caught:
            self.client.cancel(submitted.id)
        self.assertEqual((caught.exception.status, caught.exception.code), (409, "already_finished"))

    def test_the_engines_errors_arrive_as_their_classes_with_code_and_message(self):
        with self.assertRaises(gpuflow.BadRequestError) as caught:
            self.client.submit("no_such_pipeline")
        self.assertEqual((caught.exception.status, caught.exception.code), (400, "unknown_pipeline"))
        self.assertIn("hello", caught.exception.message)  # the known pipelines are listed
        with self.assertRaises(gpuflow.BadRequestError) as caught:
            self.client.submit("hello", {"text": 5})
        self.assertEqual(caught.exception.code, "invalid_input")
        self.assertIn("text", caught.exception.message)
        with self.assertRaises(gpuflow.NotFoundError) as caught:
            self.client.job("8d3c8b4e-0000-4000-8000-000000000000")
        self.assertEqual(caught.exception.code, "not_found")
        with self.assertRaises(gpuflow.BadRequestError) as caught:
            self.client.job("not-a-uuid")
        self.assertIn("id", caught.exception.message)
        with gpuflow.Client(self.engine.url, token="not-the-token-but-long") as wrong:
            with self.assertRaises(gpuflow.UnauthorizedError) as caught:
                wrong.resources()
        self.assertEqual(caught.exception.code, "unauthorized")
        with gpuflow.Client(self.engine.url, token="not-the-token-but-long") as wrong:
            with self.assertRaises(gpuflow.UnauthorizedError):
                wrong.wait("8d3c8b4e-0000-4000-8000-000000000000", timeout=5)

    def test_submit_batch_accepts_and_refuses_per_job(self):
        entries = self.client.submit_batch(
            [{"pipeline": "hello", "input": {"text": "a"}}, {"pipeline": "nope"}, {"pipeline": "hello", "input": {"text": "b"}}]
        )
        self.assertEqual([e.accepted for e in entries], [True, False, True])
        refused = entries[1].error
        assert refused is not None
        self.assertEqual((refused.code, refused.status), ("unknown_pipeline", 400))
        self.assertIsInstance(refused.exception(), gpuflow.BadRequestError)
        for entry in (entries[0], entries[2]):
            assert entry.id is not None
            self.assertEqual(self.client.wait(entry.id, timeout=60).state, "succeeded")

    def test_submit_workflow_runs_the_named_chain(self):
        video = self.tmp / "videos" / "a.mp4"
        video.write_bytes(b"x" * 1234)
        submitted = self.client.submit_workflow(str(video), ["probe.size"], idempotency_key="wf-1")
        job = self.client.wait(submitted.id, timeout=60)
        self.assertEqual((job.state, job.output), ("succeeded", {"bytes": 1234}))
        with self.assertRaises(gpuflow.BadRequestError) as caught:
            self.client.submit_workflow(str(video), ["probe.nope"])
        self.assertEqual(caught.exception.code, "unknown_stage")
        with self.assertRaises(gpuflow.BadRequestError) as caught:
            self.client.submit_workflow("/etc/passwd", ["probe.size"])
        self.assertEqual(caught.exception.code, "invalid_input")

    def test_worker_stage_and_its_log_note(self):
        job = self.client.wait(self.client.submit("on_worker", {"action": "echo"}).id, timeout=60)
        self.assertEqual(job.state, "succeeded", job.error)
        self.assertEqual(job.output["stage"], "ocr")
        log = self.client.logs(job.id, "ocr")
        self.assertEqual(log.text, "")
        self.assertIn("pool `ocr`", log.note or "")

    def test_doctor_and_health(self):
        diagnosis = self.client.doctor()
        self.assertIsInstance(diagnosis, gpuflow.Diagnosis)
        self.assertTrue(diagnosis.checked_at)
        self.assertEqual([g["name"] for g in diagnosis.gpus], ["v0"])
        for finding in diagnosis.open + diagnosis.recent:
            self.assertIsInstance(finding, gpuflow.Finding)
            self.assertTrue(finding.fix)
        health = self.client.health()
        self.assertEqual(health.status, "ok")
        self.assertTrue(health.version)


class AsyncClientOnEngineTest(EngineTestCase):
    def test_concurrent_waits_do_not_block_the_event_loop(self):
        async def main():
            ticks = 0
            done = asyncio.Event()

            async def ticker():
                nonlocal ticks
                while not done.is_set():
                    ticks += 1
                    await asyncio.sleep(0.01)

            async with gpuflow.AsyncClient(self.engine.url, token=TOKEN) as client:
                tick_task = asyncio.ensure_future(ticker())
                submitted = await asyncio.gather(*(client.submit("slow", {"seconds": "1"}) for _ in range(3)))
                started = time.monotonic()
                jobs = await asyncio.gather(*(client.wait(s.id, timeout=60) for s in submitted))
                waited = time.monotonic() - started
                done.set()
                await tick_task
                logs = await client.logs(jobs[0].id, "nap")
                diagnosis = await client.doctor()
                return jobs, waited, ticks, logs, diagnosis

        jobs, waited, ticks, logs, diagnosis = asyncio.run(main())
        self.assertEqual([j.state for j in jobs], ["succeeded"] * 3)
        self.assertIsInstance(jobs[0], gpuflow.Job)
        # The loop kept running while the three waits were open: at least a tick per 50 ms.
        self.assertGreater(ticks, waited / 0.05)
        self.assertEqual(logs.note, "the attempt wrote nothing to stderr")
        self.assertEqual([g["name"] for g in diagnosis.gpus], ["v0"])

    def test_errors_and_batch(self):
        async def main():
            async with gpuflow.AsyncClient(self.engine.url, token=TOKEN) as client:
                with self.assertRaises(gpuflow.BadRequestError) as caught:
                    await client.submit("no_such_pipeline")
                entries = await client.submit_batch([{"pipeline": "hello", "input": {"text": "x"}}, {"pipeline": "x"}])
                return caught.exception, entries

        error, entries = asyncio.run(main())
        self.assertEqual(error.code, "unknown_pipeline")
        self.assertEqual([e.accepted for e in entries], [True, False])


class RestartTest(unittest.TestCase):
    """`wait` across an engine restart, and `Worker.teardown` on engine shutdown."""

    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="gpuflow-sdk-restart-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.engine = Engine(self.tmp, free_port())
        self.addCleanup(self.engine.log.close)
        self.addCleanup(self.engine.stop)
        self.engine.start()

    def test_wait_survives_an_engine_restart(self):
        client = gpuflow.Client(self.engine.url, token=TOKEN, timeout=5)
        self.addCleanup(client.close)
        submitted = client.submit("slow", {"seconds": "2"})
        result = {}

        def wait():
            try:
                result["job"] = client.wait(submitted.id, timeout=90)
            except BaseException as exc:  # reported by the assertions below
                result["error"] = exc

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.5)
        self.engine.stop()
        time.sleep(0.5)  # the feed is down and the engine refuses connections
        self.engine.start()
        waiter.join(90)
        self.assertNotIn("error", result, f"{result.get('error')!r}\n{self.engine.log_text()}")
        self.assertEqual(result["job"].state, "succeeded")

    def test_engine_shutdown_tears_the_worker_down_after_its_task(self):
        with gpuflow.Client(self.engine.url, token=TOKEN) as client:
            job = client.wait(client.submit("on_worker", {"action": "echo"}).id, timeout=60)
        self.assertEqual(job.state, "succeeded")
        teardown = self.tmp / "teardown.log"
        self.assertFalse(teardown.exists() and teardown.read_text(), "torn down while the engine runs")
        self.engine.stop()
        # The engine sends `shutdown` (then SIGTERM) and waits for its workers up to kill_grace.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (teardown.exists() and teardown.read_text().endswith("done\n")):
            time.sleep(0.05)
        self.assertEqual(teardown.read_text(), "start after 1 tasks\ndone\n")


if __name__ == "__main__":
    unittest.main()
