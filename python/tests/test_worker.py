"""Runs the worker SDK for real: worker_app.py as a child process, this test as the engine."""

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
PYTHON_DIR = TESTS_DIR.parent
WORKER_APP = TESTS_DIR / "worker_app.py"

INTERVAL_MS = 100
INTERVAL_S = INTERVAL_MS / 1000.0


class FakeEngine:
    """Starts worker_app.py and speaks the engine's side of the protocol to it."""

    def __init__(self, test, extra_env=None, app=WORKER_APP):
        self.test = test
        self.stderr_file = tempfile.TemporaryFile()
        env = dict(os.environ)
        paths = [str(PYTHON_DIR)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        env.update(
            PYTHONPATH=os.pathsep.join(paths),
            GPUFLOW_HEARTBEAT_INTERVAL_MS=str(INTERVAL_MS),
            GPUFLOW_WORKER_POOL="ocr",
            GPUFLOW_WORKER_INSTANCE="3",
            CUDA_VISIBLE_DEVICES="",
        )
        # Unbuffered, the import-time print in worker_app.py would reach fd 1 before serve().
        env.pop("PYTHONUNBUFFERED", None)
        env.update(extra_env or {})
        self.proc = subprocess.Popen(
            [sys.executable, str(app)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr_file,
            env=env,
            start_new_session=True,  # its own process group, as the engine does
        )
        self.lines = queue.Queue()
        self.raw_lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._next_task = 0
        test.addCleanup(self.close)

    def _read(self):
        for raw in self.proc.stdout:
            self.raw_lines.append(raw)
            self.lines.put((time.monotonic(), raw))
        self.lines.put((time.monotonic(), None))

    def recv(self, timeout=5.0):
        """The next protocol message, with the time it arrived; None at end of stream."""
        try:
            at, raw = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.test.fail(f"no protocol message within {timeout}s; stderr:\n{self.stderr()}")
        if raw is None:
            return at, None
        self.test.assertTrue(raw.endswith(b"\n"), raw)
        try:
            message = json.loads(raw)
        except ValueError:
            self.test.fail(f"protocol line is not JSON: {raw!r}")
        self.test.assertIsInstance(message, dict)
        return at, message

    def collect(self, seconds):
        """Every message that arrives within `seconds`, as (time, message)."""
        deadline = time.monotonic() + seconds
        got = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return got
            try:
                at, raw = self.lines.get(timeout=remaining)
            except queue.Empty:
                return got
            if raw is None:
                self.lines.put((at, None))
                return got
            got.append((at, json.loads(raw)))

    def until_done(self, task_id, timeout=10.0):
        """Messages up to and including the task's result or error."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            at, message = self.recv(timeout=max(0.01, deadline - time.monotonic()))
            self.test.assertIsNotNone(message, f"worker exited during task; stderr:\n{self.stderr()}")
            self.test.assertEqual(message.get("task"), task_id, message)
            got.append((at, message))
            if message["type"] in ("result", "error"):
                return got

    def send(self, message):
        self.proc.stdin.write(json.dumps(message).encode("utf-8") + b"\n")
        self.proc.stdin.flush()

    def ready(self):
        _, message = self.recv(timeout=10.0)
        self.test.assertIsNotNone(message, f"worker exited before ready; stderr:\n{self.stderr()}")
        self.test.assertEqual(message["type"], "ready", message)
        return message

    def task(self, input, stages=None, attempt=1):
        """Send a task; returns (task id, time sent)."""
        self._next_task += 1
        task_id = f"t-{self._next_task}"
        self.send(
            {
                "type": "task",
                "task": task_id,
                "job_id": "job-1",
                "job_dir": "/tmp/gpuflow-test/jobs/job-1",
                "stage": "ocr",
                "attempt": attempt,
                "input": input,
                "stages": stages or {},
            }
        )
        return task_id, time.monotonic()

    def run(self, input, **kwargs):
        task_id, _ = self.task(input, **kwargs)
        return self.until_done(task_id)[-1][1]

    def wait_exit(self, timeout=5.0):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.test.fail(f"worker did not exit within {timeout}s")

    def stderr(self):
        self.stderr_file.seek(0)
        return self.stderr_file.read().decode("utf-8", "replace")

    def close(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self._reader.join(timeout=2)
        self.stderr_file.close()


def beats(messages):
    return [(at, m) for at, m in messages if m["type"] in ("heartbeat", "progress")]


def max_gap(times):
    return max(b - a for a, b in zip(times, times[1:]))


class WorkerProtocolTest(unittest.TestCase):
    def test_ready_carries_load_info_and_pid(self):
        engine = FakeEngine(self)
        ready = engine.ready()
        self.assertEqual(ready["protocol"], 1)
        self.assertEqual(ready["info"]["providers"], ["CPUExecutionProvider"])
        self.assertEqual(ready["info"]["pid"], engine.proc.pid)
        self.assertEqual(ready["info"]["pool"], "ocr")
        self.assertEqual(ready["info"]["instance"], "3")

    def test_result_carries_output_and_nothing_follows_it(self):
        engine = FakeEngine(self)
        engine.ready()
        stages = {"detect": {"boxes_file": "/tmp/boxes.json"}}
        result = engine.run({"action": "echo", "lang": "en"}, stages=stages, attempt=2)
        self.assertEqual(result["type"], "result")
        self.assertEqual(
            result["output"],
            {
                "input": {"action": "echo", "lang": "en"},
                "stages": stages,
                "id": result["task"],
                "job_id": "job-1",
                "job_dir": "/tmp/gpuflow-test/jobs/job-1",
                "stage": "ocr",
                "attempt": 2,
            },
        )
        # A heartbeat naming a finished task would be a protocol error.
        self.assertEqual(engine.collect(4 * INTERVAL_S), [])

    def test_exception_is_a_retryable_error_with_its_text(self):
        engine = FakeEngine(self)
        engine.ready()
        error = engine.run({"action": "raise"})
        self.assertEqual(error["type"], "error")
        self.assertIs(error["retryable"], True)
        self.assertTrue(error["message"].startswith("ValueError: boom 42\n"), error["message"])
        self.assertIn("worker_app.py", error["message"])  # the traceback's last lines
        self.assertIn('raise ValueError("boom 42")', error["message"])
        self.assertIn("ValueError: boom 42", engine.stderr())
        # The instance keeps serving.
        self.assertEqual(engine.run({"action": "echo"})["type"], "result")

    def test_permanent_error_is_not_retryable(self):
        engine = FakeEngine(self)
        engine.ready()
        error = engine.run({"action": "permanent"})
        self.assertEqual(error["type"], "error")
        self.assertIs(error["retryable"], False)
        self.assertEqual(error["message"], "unreadable video: x.mp4")

    def test_prints_never_reach_the_protocol_stream(self):
        engine = FakeEngine(self)
        engine.ready()
        self.assertEqual(engine.run({"action": "print"})["output"], "printed")
        engine.send({"type": "shutdown"})
        self.assertEqual(engine.wait_exit(), 0)
        engine._reader.join(timeout=5)
        for raw in engine.raw_lines:
            json.loads(raw)  # every protocol line is JSON
            self.assertNotIn(b"NOISE", raw)
        stderr = engine.stderr()
        for noise in ("IMPORT-NOISE", "PRINTED-NOISE", "FD1-NOISE", "CHILD-NOISE"):
            self.assertIn(noise, stderr)

    def test_progress_loop_keeps_heartbeats_coming(self):
        engine = FakeEngine(self)
        engine.ready()
        task_id, sent = engine.task({"action": "progress_loop", "steps": 10, "sleep": 0.1})
        messages = engine.until_done(task_id)
        self.assertEqual(messages[-1][1]["output"], "done")
        alive = beats(messages)
        self.assertGreaterEqual(len(alive), 6, messages)
        self.assertLess(max_gap([sent] + [at for at, _ in messages]), 4 * INTERVAL_S, messages)
        progress = [m for _, m in alive if m["type"] == "progress"]
        self.assertGreaterEqual(len(progress), 3, messages)
        for message in progress:
            self.assertTrue(0.0 <= message["fraction"] <= 1.0, message)
            self.assertRegex(message["message"], r"^step \d+/10$")

    def test_a_held_back_progress_report_arrives_after_the_gap_not_the_next_beat(self):
        # Beats every 5 s: the report held back by the 0.2 s gap must not wait for one.
        engine = FakeEngine(self, extra_env={"GPUFLOW_HEARTBEAT_INTERVAL_MS": "5000"})
        engine.ready()
        task_id, sent = engine.task({"action": "progress_then_wait", "wait": 1.5})
        messages = engine.until_done(task_id)
        progress = [(at, m) for at, m in messages if m["type"] == "progress"]
        self.assertEqual([m["message"] for _, m in progress], ["first", "second"], messages)
        self.assertLess(progress[1][0] - sent, 1.0, messages)

    def test_moving_python_code_beats_without_explicit_calls(self):
        engine = FakeEngine(self)
        engine.ready()
        task_id, _ = engine.task({"action": "compute", "seconds": 1.0})
        messages = engine.until_done(task_id)
        heartbeats = [m for _, m in messages if m["type"] == "heartbeat"]
        # About 10 ticks; a few may land on the same position and be skipped.
        self.assertGreaterEqual(len(heartbeats), 5, messages)

    def test_explicit_heartbeat_keeps_a_waiting_handler_alive(self):
        engine = FakeEngine(self)
        engine.ready()
        task_id, sent = engine.task({"action": "heartbeat_wait", "rounds": 8, "wait": 0.1})
        messages = engine.until_done(task_id)
        self.assertEqual(messages[-1][1]["output"], "waited")
        self.assertGreaterEqual(len(beats(messages)), 5, messages)
        self.assertLess(max_gap([sent] + [at for at, _ in messages]), 4 * INTERVAL_S, messages)

    def test_deadlocked_handler_stops_heartbeats(self):
        engine = FakeEngine(self)
        engine.ready()
        task_id, sent = engine.task({"action": "deadlock"})
        messages = engine.collect(1.3)
        for _, message in messages:
            self.assertEqual(message, {"type": "heartbeat", "task": task_id})
        # Entering the handler counts as movement for a tick or two; after that, nothing.
        late = [(round(at - sent, 3), m) for at, m in messages if at - sent > 3 * INTERVAL_S]
        self.assertEqual(late, [])
        self.assertIsNone(engine.proc.poll(), "the deadlocked worker should still be running")

    def test_shutdown_exits_zero(self):
        engine = FakeEngine(self)
        engine.ready()
        engine.send({"type": "shutdown"})
        self.assertEqual(engine.wait_exit(), 0)

    def test_end_of_input_exits_zero(self):
        engine = FakeEngine(self)
        engine.ready()
        engine.proc.stdin.close()
        self.assertEqual(engine.wait_exit(), 0)

    def test_unserialisable_output_is_a_permanent_error(self):
        engine = FakeEngine(self)
        engine.ready()
        error = engine.run({"action": "unserialisable"})
        self.assertEqual(error["type"], "error")
        self.assertIs(error["retryable"], False)
        self.assertIn("not JSON-serialisable", error["message"])
        self.assertIn("object", error["message"])

        error = engine.run({"action": "nan"})
        self.assertEqual((error["type"], error["retryable"]), ("error", False))

        error = engine.run({"action": "huge"})
        self.assertEqual((error["type"], error["retryable"]), ("error", False))
        self.assertIn("line limit", error["message"])

        self.assertEqual(engine.run({"action": "echo"})["type"], "result")

    def test_invalid_progress_fails_the_task(self):
        engine = FakeEngine(self)
        engine.ready()
        error = engine.run({"action": "bad_progress"})
        self.assertEqual(error["type"], "error")
        self.assertTrue(error["message"].startswith("ValueError: progress fraction"), error["message"])

    def test_unknown_engine_message_is_ignored(self):
        engine = FakeEngine(self)
        engine.ready()
        engine.send({"type": "reconfigure", "x": 1})
        self.assertEqual(engine.run({"action": "echo"})["type"], "result")
        self.assertIn("reconfigure", engine.stderr())

    def test_ready_announces_the_prefetch_feature(self):
        engine = FakeEngine(self)
        self.assertIn("prefetch", engine.ready()["features"])

    def test_job_dir_is_created_when_first_used(self):
        # The SDK announces `job_dir_on_demand`: the engine no longer makes the directory.
        from gpuflow.worker import FEATURES, Task

        self.assertIn("job_dir_on_demand", FEATURES)
        with tempfile.TemporaryDirectory() as root:
            path = os.path.join(root, "jobs", "job-1")
            task = Task(None, {"type": "task", "task": "t-1", "job_dir": path})
            self.assertFalse(os.path.exists(path), "made before it was used")
            self.assertEqual(task.job_dir, path)
            self.assertTrue(os.path.isdir(path))
            self.assertEqual(task.job_dir, path)

    def test_tasks_sent_ahead_run_in_order_each_with_its_own_result(self):
        engine = FakeEngine(self)
        engine.ready()
        ids = [engine.task({"action": "echo", "n": n})[0] for n in range(5)]
        for n, task_id in enumerate(ids):
            result = engine.until_done(task_id)[-1][1]
            self.assertEqual((result["type"], result["output"]["input"]["n"]), ("result", n), result)

    def test_cancel_skips_a_task_sent_ahead_that_has_not_started(self):
        engine = FakeEngine(self)
        engine.ready()
        running, _ = engine.task({"action": "compute", "seconds": 0.5})
        ahead, _ = engine.task({"action": "echo", "n": 2})
        after, _ = engine.task({"action": "echo", "n": 3})
        time.sleep(0.1)  # the first task runs; the others wait in the pipe
        engine.send({"type": "cancel", "task": ahead})
        engine.send({"type": "cancel", "task": running})  # running: cannot be interrupted, ignored
        engine.send({"type": "cancel", "task": "never-sent"})  # unknown: ignored
        self.assertEqual(engine.until_done(running)[-1][1]["type"], "result")
        result = engine.until_done(after)[-1][1]  # nothing about `ahead` comes in between
        self.assertEqual(result["output"]["input"]["n"], 3)
        self.assertEqual(engine.collect(0.3), [], "nothing more, and nothing about the cancelled task")
        self.assertIn(f"task {ahead} was cancelled before it started", engine.stderr())
        self.assertIsNone(engine.proc.poll(), "a cancel does not cost the instance")

    def test_cancel_arriving_with_its_task_in_one_write_is_honoured(self):
        engine = FakeEngine(self)
        engine.ready()
        lines = [
            {"type": "task", "task": "a", "input": {"action": "echo", "n": 1}},
            {"type": "task", "task": "b", "input": {"action": "echo", "n": 2}},
            {"type": "cancel", "task": "b"},
            {"type": "task", "task": "c", "input": {"action": "echo", "n": 3}},
        ]
        engine.proc.stdin.write(b"".join(json.dumps(m).encode() + b"\n" for m in lines))
        engine.proc.stdin.flush()
        self.assertEqual(engine.until_done("a")[-1][1]["type"], "result")
        self.assertEqual(engine.until_done("c")[-1][1]["output"]["input"]["n"], 3)
        self.assertEqual(engine.collect(0.2), [])

    def test_cancel_of_a_finished_task_is_ignored(self):
        engine = FakeEngine(self)
        engine.ready()
        first, _ = engine.task({"action": "echo"})
        self.assertEqual(engine.until_done(first)[-1][1]["type"], "result")
        engine.send({"type": "cancel", "task": first})
        self.assertEqual(engine.run({"action": "echo"})["type"], "result")
        self.assertIsNone(engine.proc.poll())

    def test_shutdown_behind_tasks_sent_ahead_starts_nothing_new(self):
        engine = FakeEngine(self)
        engine.ready()
        running, _ = engine.task({"action": "compute", "seconds": 0.5})
        time.sleep(0.2)  # it has started the first task
        engine.task({"action": "echo"})
        engine.send({"type": "shutdown"})
        self.assertEqual(engine.until_done(running)[-1][1]["type"], "result")
        self.assertEqual(engine.wait_exit(), 0)
        self.assertEqual(engine.collect(0.2), [], "the task sent ahead was not started")

    def test_invalid_json_from_engine_exits_two(self):
        engine = FakeEngine(self)
        engine.ready()
        engine.proc.stdin.write(b"{not json\n")
        engine.proc.stdin.flush()
        self.assertEqual(engine.wait_exit(), 2)

    def test_load_failure_exits_one_without_ready(self):
        engine = FakeEngine(self, extra_env={"GPUFLOW_TEST_LOAD_FAIL": "1"})
        self.assertEqual(engine.wait_exit(timeout=10.0), 1)
        _, message = engine.recv()
        self.assertIsNone(message, "nothing may be sent after a failed load")
        self.assertIn("RuntimeError: weights missing", engine.stderr())



class TeardownTest(unittest.TestCase):
    """`Worker.teardown` runs once when the worker stops gracefully, and only then."""

    def start(self, **env):
        handle, path = tempfile.mkstemp(prefix="gpuflow-teardown-")
        os.close(handle)
        self.addCleanup(os.unlink, path)
        engine = FakeEngine(self, extra_env={"GPUFLOW_TEST_TEARDOWN_FILE": path, **env})
        return engine, Path(path)

    def test_shutdown_after_the_last_task_tears_down_once(self):
        engine, calls = self.start()
        engine.ready()
        self.assertEqual(engine.run({"action": "echo"})["type"], "result")
        self.assertEqual(calls.read_text(), "", "not before the worker stops")
        engine.send({"type": "shutdown"})
        self.assertEqual(engine.wait_exit(), 0)
        self.assertEqual(calls.read_text(), "start after 1 tasks\ndone\n")

    def test_end_of_input_tears_down(self):
        engine, calls = self.start()
        engine.ready()
        engine.proc.stdin.close()
        self.assertEqual(engine.wait_exit(), 0)
        self.assertEqual(calls.read_text(), "start after 0 tasks\ndone\n")

    def test_sigterm_during_a_task_tears_down_then_dies_of_sigterm(self):
        engine, calls = self.start()
        engine.ready()
        engine.task({"action": "compute", "seconds": 30})
        time.sleep(0.3)
        os.killpg(engine.proc.pid, signal.SIGTERM)
        self.assertEqual(engine.wait_exit(), -signal.SIGTERM)
        self.assertEqual(calls.read_text(), "start after 1 tasks\ndone\n")

    def test_sigterm_does_not_cut_a_teardown_short(self):
        # As on engine shutdown: `shutdown`, then SIGTERM at once.
        engine, calls = self.start(GPUFLOW_TEST_TEARDOWN_SECONDS="0.6")
        engine.ready()
        engine.send({"type": "shutdown"})
        deadline = time.monotonic() + 5
        while "start" not in calls.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(engine.proc.pid, signal.SIGTERM)
        self.assertEqual(engine.wait_exit(), 0)
        self.assertEqual(calls.read_text(), "start after 0 tasks\ndone\n")

    def test_a_failing_teardown_is_logged_and_the_worker_still_exits(self):
        engine, calls = self.start(GPUFLOW_TEST_TEARDOWN_FAIL="1")
        engine.ready()
        engine.send({"type": "shutdown"})
        self.assertEqual(engine.wait_exit(), 0)
        self.assertEqual(calls.read_text(), "start after 0 tasks\n")
        self.assertIn("teardown() failed", engine.stderr())
        self.assertIn("could not release the session", engine.stderr())

    def test_no_teardown_when_load_failed(self):
        engine, calls = self.start(GPUFLOW_TEST_LOAD_FAIL="1")
        self.assertEqual(engine.wait_exit(), 1)
        self.assertEqual(calls.read_text(), "")


if __name__ == "__main__":
    unittest.main()
