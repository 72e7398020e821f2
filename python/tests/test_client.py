"""gpuflow.Client against a small fake of the engine's HTTP API."""

import asyncio
import json
import queue
import socket
import sys
import threading
import time
import unittest
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpuflow  # noqa: E402

TOKEN = "a-long-random-test-token"


JOB_ID = "5b0e4c8e-0b7a-4d4e-9a57-1f0c0e3b9a11"


def job_body(state, output=None):
    return {
        "id": JOB_ID,
        "pipeline": "subtitles",
        "state": state,
        "priority": 0,
        "input": {"video": "/data/a.mp4"},
        "output": output,
        "error": None,
        "idempotency_key": None,
        "created_at": "2026-01-01T00:00:00Z",
        "started_at": None,
        "finished_at": None,
        "stages": [
            {
                "name": "ocr",
                "state": state,
                "after": [],
                "attempts": 1,
                "failures": 0,
                "retry_at": None,
                "started_at": "2026-01-01T00:00:01Z",
                "finished_at": None,
                "exit_code": None,
                "error": None,
                "output": None,
                "progress": {"fraction": 0.5, "message": "half", "at": "2026-01-01T00:00:02Z"},
                "attempt_history": [
                    {"attempt": 1, "state": "running", "started_at": "2026-01-01T00:00:01Z", "finished_at": None,
                     "exit_code": None, "signal": None, "error": None, "lease": {"gpus": [0]}, "batch_size": None}
                ],
                "a_field_from_a_newer_engine": 1,
            }
        ],
    }


class FakeApi(BaseHTTPRequestHandler):
    # Set per server: see FakeEngineServer.
    server: "FakeEngineServer"

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def _reply(self, status, body, headers=None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status, code, message, headers=None):
        self._reply(status, {"error": {"code": code, "message": message}}, headers)

    def _events(self):
        """The live feed: hello, then what the test queues; closes when the test says drop."""
        mine = queue.Queue()
        with self.server.lock:
            self.server.feeds += 1
            self.server.subscribers.append(mine)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b'event: hello\ndata: {"type":"hello"}\n\n')
            self.wfile.flush()
            while not self.server.stopping.is_set():
                if self.server.drop_feed.is_set():
                    self.server.drop_feed.clear()
                    return  # the connection closes: a dropped feed
                try:
                    event = mine.get(timeout=0.02)
                except queue.Empty:
                    continue
                self.wfile.write(f"event: {event['type']}\r\ndata: {json.dumps(event)}\r\n\r\n".encode())
                self.wfile.write(b": keep-alive\n\n")
                self.wfile.flush()
        except OSError:
            pass  # the client hung up
        finally:
            with self.server.lock:
                self.server.subscribers.remove(mine)

    def _handle(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        self.server.requests.append((self.command, self.path, dict(self.headers), body))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._error(401, "unauthorized", "missing or wrong bearer token")
        route = (self.command, self.path)
        if route == ("GET", "/v1/events"):
            return self._events()
        if route == ("POST", "/v1/jobs"):
            if body["pipeline"] == "full":
                return self._error(429, "queue_full", "pipeline `full` has 100 unfinished jobs", {"Retry-After": "7"})
            if body["pipeline"] == "again":
                return self._reply(200, {"id": JOB_ID, "state": "running"})
            return self._reply(201, {"id": JOB_ID, "state": "queued"})
        if route == ("POST", "/v1/jobs/batch"):
            entries = []
            for i, job in enumerate(body["jobs"]):
                if job["pipeline"] == "full":
                    entries.append({"error": {"code": "queue_full", "message": "max_queued", "status": 429}})
                else:
                    entries.append({"id": f"job-b{i}", "state": "queued", "created": True})
            return self._reply(201, {"jobs": entries})
        if route == ("GET", f"/v1/jobs/{JOB_ID}"):
            self.server.job_reads += 1
            state = self.server.job_state
            return self._reply(200, job_body(state, {"n": 3} if state == "succeeded" else None))
        if route == ("POST", f"/v1/jobs/{JOB_ID}/cancel"):
            return self._reply(200, {"id": JOB_ID, "state": "cancelled"})
        if route == ("GET", "/v1/jobs?state=running&limit=2"):
            return self._reply(200, {"jobs": [{"id": JOB_ID, "pipeline": "subtitles", "state": "running", "priority": 0,
                                               "created_at": "t", "finished_at": None, "error": None}],
                                     "next_cursor": "17"})
        if route == ("GET", "/v1/resources"):
            return self._reply(200, {"capacity": {"cpu": 8}, "leases": [], "waiting": []})
        if route == ("GET", "/v1/jobs/proxy"):
            return self._reply(502, b"<html>bad gateway</html>")
        if route == ("GET", "/v1/jobs/unavailable"):
            return self._error(503, "shutting_down", "the engine is shutting down", {"Retry-After": "1"})
        if route == ("GET", "/v1/jobs/conflict"):
            return self._error(409, "already_finished", "job already finished")
        if route == ("GET", "/v1/jobs/disk"):
            return self._error(507, "store_unwritable", "disk full", {"Retry-After": "10"})
        return self._error(404, "not_found", f"no job at {self.path}")

    do_GET = _handle
    do_POST = _handle


class FakeEngineServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeApi)
        self.requests = []
        self.job_reads = 0
        self.job_state = "running"
        self.feeds = 0
        self.lock = threading.Lock()
        self.subscribers = []
        self.drop_feed = threading.Event()
        self.stopping = threading.Event()

    def publish(self, event):
        with self.lock:
            for subscriber in self.subscribers:
                subscriber.put(event)

    def finish_job(self, state="succeeded"):
        self.job_state = state
        self.publish({"type": "job_finished", "seq": 9, "job": JOB_ID, "pipeline": "subtitles", "state": state})


def start_fake(test):
    server = FakeEngineServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    test.addCleanup(thread.join, 2)
    test.addCleanup(server.server_close)
    test.addCleanup(server.shutdown)
    test.addCleanup(server.stopping.set)
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def later(delay, action):
    timer = threading.Timer(delay, action)
    timer.daemon = True
    timer.start()
    return timer


class ClientTest(unittest.TestCase):
    def setUp(self):
        self.server, self.url = start_fake(self)
        self.client = gpuflow.Client(self.url, token=TOKEN)
        self.addCleanup(self.client.close)

    def test_submit_sends_the_job_and_the_token_and_returns_a_dataclass(self):
        job = self.client.submit("subtitles", {"video": "/data/a.mp4"}, priority=5, idempotency_key="order-17")
        self.assertIsInstance(job, gpuflow.Submitted)
        self.assertEqual((job.id, job.state, job.created), (JOB_ID, "queued", True))
        # Code written for the dict-returning client keeps working.
        self.assertEqual((job["id"], job.get("state"), job.get("nope", 1)), (JOB_ID, "queued", 1))
        method, path, headers, body = self.server.requests[-1]
        self.assertEqual((method, path), ("POST", "/v1/jobs"))
        self.assertEqual(headers["Authorization"], f"Bearer {TOKEN}")
        self.assertEqual(headers["Content-Type"], "application/json")
        self.assertEqual(
            body, {"pipeline": "subtitles", "input": {"video": "/data/a.mp4"}, "priority": 5, "idempotency_key": "order-17"}
        )

    def test_a_repeated_idempotency_key_reads_as_not_created(self):
        self.assertFalse(self.client.submit("again", idempotency_key="k").created)

    def test_submit_without_input_sends_an_empty_object(self):
        self.client.submit("quickstart")
        body = self.server.requests[-1][3]
        self.assertEqual(body, {"pipeline": "quickstart", "input": {}, "priority": 0})

    def test_submit_batch_sends_the_jobs_and_returns_one_entry_per_job(self):
        jobs = [
            {"pipeline": "subtitles", "input": {"video": "/data/a.mp4"}, "idempotency_key": "order-1"},
            {"pipeline": "full"},
            {"pipeline": "subtitles", "priority": 3},
        ]
        entries = self.client.submit_batch(iter(jobs))
        method, path, headers, body = self.server.requests[-1]
        self.assertEqual((method, path), ("POST", "/v1/jobs/batch"))
        self.assertEqual(body, {"jobs": jobs})
        self.assertEqual([e.accepted for e in entries], [True, False, True])
        self.assertEqual((entries[0].id, entries[0].state, entries[0].created), ("job-b0", "queued", True))
        refused = entries[1].error
        assert refused is not None
        self.assertEqual((refused.code, refused.status), ("queue_full", 429))
        self.assertIsInstance(refused.exception(), gpuflow.QueueFullError)
        # The dict-style reads of the former client.
        self.assertIn("error", entries[1])
        self.assertNotIn("error", entries[0])
        self.assertEqual(entries[1]["error"]["code"], "queue_full")

    def test_submit_batch_of_no_jobs_is_refused_before_sending(self):
        with self.assertRaises(ValueError) as caught:
            self.client.submit_batch([])
        self.assertIn("jobs: 0 jobs", str(caught.exception))
        with self.assertRaises(ValueError):
            self.client.submit_batch({"pipeline": "x"} for _ in range(1001))
        self.assertEqual(self.server.requests, [])

    def test_job_is_typed_down_to_attempts_and_keeps_unknown_fields(self):
        job = self.client.job(JOB_ID)
        self.assertIsInstance(job, gpuflow.Job)
        self.assertFalse(job.done)
        stage = job.stage("ocr")
        self.assertIsInstance(stage, gpuflow.Stage)
        assert stage.progress is not None
        self.assertEqual((stage.progress.fraction, stage.progress.message), (0.5, "half"))
        self.assertIsInstance(stage.attempt_history[0], gpuflow.Attempt)
        self.assertEqual(stage.attempt_history[0].lease, {"gpus": [0]})
        self.assertEqual(stage.raw["a_field_from_a_newer_engine"], 1)
        self.assertEqual(stage["a_field_from_a_newer_engine"], 1)
        with self.assertRaises(KeyError) as caught:
            job.stage("nope")
        self.assertIn("ocr", str(caught.exception))

    def test_cancel_resources_and_jobs(self):
        cancelled = self.client.cancel(JOB_ID)
        self.assertEqual((cancelled.id, cancelled.state), (JOB_ID, "cancelled"))
        self.assertEqual(self.server.requests[-1][:2], ("POST", f"/v1/jobs/{JOB_ID}/cancel"))
        self.assertEqual(self.client.resources()["capacity"], {"cpu": 8})
        page = self.client.jobs(state="running", limit=2)
        self.assertEqual(([j.id for j in page.jobs], page.next_cursor), ([JOB_ID], "17"))

    def test_one_connection_is_kept_alive_and_reopened_when_the_engine_closed_it(self):
        # The fake answers HTTP/1.0 and closes after each answer: every call must still work.
        for _ in range(3):
            self.assertEqual(self.client.job(JOB_ID).id, JOB_ID)

    def test_the_context_manager_closes_the_connection(self):
        with gpuflow.Client(self.url, token=TOKEN) as client:
            client.job(JOB_ID)
        with self.assertRaises(RuntimeError) as caught:
            client.job(JOB_ID)
        self.assertIn("closed", str(caught.exception))

    def test_429_carries_code_status_and_retry_after(self):
        with self.assertRaises(gpuflow.QueueFullError) as caught:
            self.client.submit("full", {})
        error = caught.exception
        self.assertIsInstance(error, gpuflow.GpuflowError)
        self.assertIsInstance(error, gpuflow.ApiError)  # the former name still catches it
        self.assertEqual((error.status, error.code, error.retry_after), (429, "queue_full", 7.0))
        self.assertIn("100 unfinished jobs", error.message)
        self.assertIn("429", str(error))

    def test_each_status_has_its_exception_class(self):
        cases = [
            ("nope", gpuflow.NotFoundError, 404, "not_found"),
            ("conflict", gpuflow.ConflictError, 409, "already_finished"),
            ("unavailable", gpuflow.UnavailableError, 503, "shutting_down"),
            ("disk", gpuflow.StorageFullError, 507, "store_unwritable"),
        ]
        for path, cls, status, code in cases:
            with self.subTest(path=path):
                with self.assertRaises(cls) as caught:
                    self.client.job(path)
                self.assertEqual((caught.exception.status, caught.exception.code), (status, code))
        with self.assertRaises(gpuflow.UnauthorizedError) as caught:
            gpuflow.Client(self.url, token="wrong-token-of-some-length").job(JOB_ID)
        self.assertEqual((caught.exception.status, caught.exception.code), (401, "unauthorized"))

    def test_an_error_body_that_is_not_the_engines_still_gives_an_error(self):
        with self.assertRaises(gpuflow.ServerError) as caught:
            self.client.job("proxy")
        self.assertEqual((caught.exception.status, caught.exception.code), (502, "http_502"))
        self.assertIn("bad gateway", caught.exception.message)

    def test_unreachable_engine_is_a_connection_error(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with self.assertRaises(gpuflow.EngineUnreachableError) as caught:
            gpuflow.Client(f"http://127.0.0.1:{port}", timeout=2).resources()
        self.assertIsInstance(caught.exception, ConnectionError)
        self.assertIsInstance(caught.exception, gpuflow.UnavailableError)
        self.assertEqual((caught.exception.status, caught.exception.code), (None, "unreachable"))
        self.assertIn(f"127.0.0.1:{port}", str(caught.exception))

    def test_bad_arguments_name_the_field(self):
        with self.assertRaises(ValueError) as caught:
            gpuflow.Client("ftp://host")
        self.assertIn("base_url", str(caught.exception))
        with self.assertRaises(ValueError) as caught:
            self.client.logs(JOB_ID, "ocr", stream="stdlog")
        self.assertIn("stream", str(caught.exception))
        self.assertIn("stdout", str(caught.exception))

    def test_defaults_come_from_the_environment(self):
        from unittest import mock

        with mock.patch.dict("os.environ", {"GPUFLOW_SERVER": self.url + "/", "GPUFLOW_TOKEN": TOKEN}):
            client = gpuflow.Client()
        self.assertEqual(client.base_url, self.url)
        self.assertEqual(client.submit("x").id, JOB_ID)
        with mock.patch.dict("os.environ", {}, clear=True):
            client = gpuflow.Client()
        self.assertEqual((client.base_url, client.token), ("http://127.0.0.1:7070", None))


class WaitTest(unittest.TestCase):
    """`wait` on the live feed: no polling, and a dropped feed is survived."""

    def setUp(self):
        self.server, self.url = start_fake(self)
        self.client = gpuflow.Client(self.url, token=TOKEN, timeout=5)
        self.addCleanup(self.client.close)

    def test_wait_reads_the_job_once_then_again_only_when_the_feed_says_it_finished(self):
        def others_then_this_one():
            # Other jobs' events must not make it read the job again.
            for seq in range(3):
                self.server.publish({"type": "job_finished", "seq": seq, "job": "another-job", "state": "failed"})
            time.sleep(0.2)
            self.server.finish_job()

        later(0.4, others_then_this_one)
        job = self.client.wait(JOB_ID, timeout=10)
        self.assertEqual((job.state, job.output), ("succeeded", {"n": 3}))
        self.assertEqual(self.server.job_reads, 2, "one read on subscribing, one on job_finished: no polling")
        self.assertEqual(self.server.feeds, 1)

    def test_an_already_finished_job_returns_at_once(self):
        self.server.job_state = "failed"
        self.assertEqual(self.client.wait(JOB_ID, timeout=5).state, "failed")
        self.assertEqual(self.server.job_reads, 1)

    def test_a_dropped_feed_is_reopened_and_the_job_read_again(self):
        def drop_then_finish():
            # The job finishes while no feed is open: only the re-read after reconnecting sees it.
            self.server.job_state = "succeeded"
            self.server.drop_feed.set()

        later(0.4, drop_then_finish)
        job = self.client.wait(JOB_ID, timeout=10)
        self.assertEqual(job.state, "succeeded")
        self.assertEqual(self.server.feeds, 2)
        self.assertEqual(self.server.job_reads, 2)

    def test_resync_makes_it_read_the_job_again(self):
        def resync():
            self.server.job_state = "cancelled"
            self.server.publish({"type": "resync", "missed": 12})

        later(0.3, resync)
        self.assertEqual(self.client.wait(JOB_ID, timeout=10).state, "cancelled")

    def test_wait_times_out(self):
        started = time.monotonic()
        with self.assertRaises(TimeoutError) as caught:
            self.client.wait(JOB_ID, timeout=0.5)
        self.assertLess(time.monotonic() - started, 3.0)
        self.assertIn(JOB_ID, str(caught.exception))
        self.assertIn("running", str(caught.exception))
        self.assertEqual(self.server.job_reads, 1, "no polling while waiting")

    def test_an_unknown_job_is_not_waited_for(self):
        with self.assertRaises(gpuflow.NotFoundError):
            self.client.wait("8d3c8b4e-0000-4000-8000-000000000000", timeout=5)

    def test_the_async_client_waits_on_the_feed_too(self):
        async def main():
            async with gpuflow.AsyncClient(self.url, token=TOKEN) as client:
                later(0.3, lambda: (setattr(self.server, "job_state", "succeeded"), self.server.drop_feed.set()))
                first = await client.wait(JOB_ID, timeout=10)
                self.server.job_state = "running"
                later(0.3, self.server.finish_job)
                second = await client.wait(JOB_ID, timeout=10)
                with self.assertRaises(TimeoutError):
                    self.server.job_state = "running"
                    await client.wait(JOB_ID, timeout=0.3)
                return first, second

        first, second = asyncio.run(main())
        self.assertEqual((first.state, second.state), ("succeeded", "succeeded"))
        self.assertGreaterEqual(self.server.feeds, 3)

    def test_the_async_client_raises_the_same_errors(self):
        async def main():
            async with gpuflow.AsyncClient(self.url, token=TOKEN) as client:
                with self.assertRaises(gpuflow.QueueFullError) as caught:
                    await client.submit("full")
                self.assertEqual(caught.exception.retry_after, 7.0)
                with self.assertRaises(gpuflow.ServerError):
                    await client.job("proxy")
                return await client.job(JOB_ID)

        self.assertEqual(asyncio.run(main()).stage("ocr").attempts, 1)


if __name__ == "__main__":
    unittest.main()
