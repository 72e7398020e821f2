"""gpuflow.Client against a small fake of the engine's HTTP API."""

import json
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

    def _handle(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        self.server.requests.append((self.command, self.path, dict(self.headers), body))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._error(401, "unauthorized", "missing or wrong bearer token")
        route = (self.command, self.path)
        if route == ("POST", "/v1/jobs"):
            if body["pipeline"] == "full":
                return self._error(429, "queue_full", "pipeline `full` has 100 unfinished jobs", {"Retry-After": "7"})
            return self._reply(201, {"id": "job-1", "state": "queued"})
        if route == ("POST", "/v1/jobs/batch"):
            jobs = body["jobs"]
            if not 1 <= len(jobs) <= 1000:
                return self._error(400, "invalid_request", f"jobs: {len(jobs)} jobs in one batch; send 1 to 1000")
            entries = []
            for i, job in enumerate(jobs):
                if job["pipeline"] == "full":
                    entries.append({"error": {"code": "queue_full", "message": "max_queued", "status": 429}})
                else:
                    entries.append({"id": f"job-b{i}", "state": "queued", "created": True})
            return self._reply(201, {"jobs": entries})
        if route == ("GET", "/v1/jobs/job-1"):
            self.server.polls += 1
            state = "running" if self.server.polls < 3 else "succeeded"
            return self._reply(200, {"id": "job-1", "state": state, "output": {"n": 3} if state == "succeeded" else None})
        if route == ("GET", "/v1/jobs/slow"):
            return self._reply(200, {"id": "slow", "state": "running"})
        if route == ("POST", "/v1/jobs/job-1/cancel"):
            return self._reply(200, {"id": "job-1", "state": "cancelled"})
        if route == ("GET", "/v1/jobs?state=running&limit=2"):
            return self._reply(200, {"jobs": [], "next_cursor": None})
        if route == ("GET", "/v1/resources"):
            return self._reply(200, {"capacity": {"cpu": 8}, "leases": [], "waiting": []})
        if route == ("GET", "/v1/jobs/proxy"):
            return self._reply(502, b"<html>bad gateway</html>")
        return self._error(404, "not_found", f"no job at {self.path}")

    do_GET = _handle
    do_POST = _handle


class FakeEngineServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeApi)
        self.requests = []
        self.polls = 0


class ClientTest(unittest.TestCase):
    def setUp(self):
        self.server = FakeEngineServer()
        thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 2)
        self.addCleanup(self.server.server_close)
        self.addCleanup(self.server.shutdown)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.client = gpuflow.Client(self.url, token=TOKEN)

    def test_submit_sends_the_job_and_the_token(self):
        job = self.client.submit("subtitles", {"video": "/data/a.mp4"}, priority=5, idempotency_key="order-17")
        self.assertEqual(job, {"id": "job-1", "state": "queued"})
        method, path, headers, body = self.server.requests[-1]
        self.assertEqual((method, path), ("POST", "/v1/jobs"))
        self.assertEqual(headers["Authorization"], f"Bearer {TOKEN}")
        self.assertEqual(headers["Content-Type"], "application/json")
        self.assertEqual(
            body, {"pipeline": "subtitles", "input": {"video": "/data/a.mp4"}, "priority": 5, "idempotency_key": "order-17"}
        )

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
        self.assertEqual(headers["Authorization"], f"Bearer {TOKEN}")
        self.assertEqual(headers["Content-Type"], "application/json")
        self.assertEqual(body, {"jobs": jobs})
        self.assertEqual(len(entries), 3)
        self.assertEqual(entries[0], {"id": "job-b0", "state": "queued", "created": True})
        self.assertEqual(entries[1]["error"]["code"], "queue_full")
        self.assertEqual(entries[1]["error"]["status"], 429)
        self.assertEqual(entries[2]["id"], "job-b2")

    def test_submit_batch_refused_as_a_whole_raises(self):
        with self.assertRaises(gpuflow.ApiError) as caught:
            self.client.submit_batch([])
        self.assertEqual((caught.exception.status, caught.exception.code), (400, "invalid_request"))
        self.assertIn("jobs", caught.exception.message)

    def test_job_wait_cancel_resources_and_jobs(self):
        self.assertEqual(self.client.job("job-1")["state"], "running")
        done = self.client.wait("job-1", timeout=5, poll=0.01)
        self.assertEqual(done["state"], "succeeded")
        self.assertEqual(done["output"], {"n": 3})
        self.assertEqual(self.client.cancel("job-1")["state"], "cancelled")
        self.assertEqual(self.server.requests[-1][:2], ("POST", "/v1/jobs/job-1/cancel"))
        self.assertEqual(self.client.resources()["capacity"], {"cpu": 8})
        self.assertEqual(self.client.jobs(state="running", limit=2), {"jobs": [], "next_cursor": None})

    def test_wait_times_out(self):
        started = time.monotonic()
        with self.assertRaises(TimeoutError) as caught:
            self.client.wait("slow", timeout=0.3, poll=0.05)
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertIn("slow", str(caught.exception))
        self.assertIn("running", str(caught.exception))

    def test_429_carries_retry_after(self):
        with self.assertRaises(gpuflow.ApiError) as caught:
            self.client.submit("full", {})
        error = caught.exception
        self.assertEqual((error.status, error.code, error.retry_after), (429, "queue_full", 7.0))
        self.assertIn("100 unfinished jobs", error.message)
        self.assertIn("429", str(error))

    def test_api_errors(self):
        with self.assertRaises(gpuflow.ApiError) as caught:
            self.client.job("nope")
        self.assertEqual((caught.exception.status, caught.exception.code), (404, "not_found"))
        self.assertIsNone(caught.exception.retry_after)

        with self.assertRaises(gpuflow.ApiError) as caught:
            gpuflow.Client(self.url, token="wrong-token-of-some-length").job("job-1")
        self.assertEqual((caught.exception.status, caught.exception.code), (401, "unauthorized"))

        # An error body that is not the engine's (a proxy in between) still gives an ApiError.
        with self.assertRaises(gpuflow.ApiError) as caught:
            self.client.job("proxy")
        self.assertEqual((caught.exception.status, caught.exception.code), (502, "http_502"))
        self.assertIn("bad gateway", caught.exception.message)

    def test_unreachable_engine_is_a_connection_error(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with self.assertRaises(ConnectionError) as caught:
            gpuflow.Client(f"http://127.0.0.1:{port}", timeout=2).resources()
        self.assertIn(f"127.0.0.1:{port}", str(caught.exception))

    def test_defaults_come_from_the_environment(self):
        from unittest import mock

        with mock.patch.dict("os.environ", {"GPUFLOW_SERVER": self.url + "/", "GPUFLOW_TOKEN": TOKEN}):
            client = gpuflow.Client()
        self.assertEqual(client.base_url, self.url)
        self.assertEqual(client.submit("x")["id"], "job-1")
        with mock.patch.dict("os.environ", {}, clear=True):
            client = gpuflow.Client()
        self.assertEqual((client.base_url, client.token), ("http://127.0.0.1:7070", None))


if __name__ == "__main__":
    unittest.main()
