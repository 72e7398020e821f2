"""The SDK's side of batches: `Worker.handle_batch`, the `batch` message, `max_batch`."""

import json
import time
import unittest

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from test_worker import INTERVAL_S, TESTS_DIR, FakeEngine  # noqa: E402

import gpuflow  # noqa: E402

BATCH_APP = TESTS_DIR / "batch_worker_app.py"


def batch(*inputs, prefix="b"):
    """A `batch` message with one task per input, and its task ids."""
    ids = [f"{prefix}-{i}" for i in range(len(inputs))]
    tasks = [
        {"task": i, "job_id": f"job-{i}", "job_dir": f"/tmp/gpuflow-test/jobs/{i}", "stage": "s", "attempt": 1, "input": inp, "stages": {}}
        for i, inp in zip(ids, inputs)
    ]
    return {"type": "batch", "tasks": tasks}, ids


def answers(engine, ids, timeout=10.0):
    """The result or error for each id, by id (beats in between are skipped)."""
    got = {}
    deadline = time.monotonic() + timeout
    while len(got) < len(ids):
        _, message = engine.recv(timeout=max(0.01, deadline - time.monotonic()))
        engine.test.assertIsNotNone(message, f"worker exited; stderr:\n{engine.stderr()}")
        if message["type"] in ("result", "error"):
            engine.test.assertIn(message["task"], ids)
            engine.test.assertNotIn(message["task"], got, "answered twice")
            got[message["task"]] = message
    return got


class BatchProtocolTest(unittest.TestCase):
    def test_ready_announces_batch_and_max_batch(self):
        engine = FakeEngine(self, extra_env={"GPUFLOW_TEST_MAX_BATCH": "8"}, app=BATCH_APP)
        ready = engine.ready()
        self.assertIn("batch", ready["features"])
        self.assertEqual(ready["max_batch"], 8)

    def test_a_worker_that_only_writes_handle_does_not_announce_batch(self):
        engine = FakeEngine(self)
        ready = engine.ready()
        self.assertNotIn("batch", ready["features"])
        self.assertNotIn("max_batch", ready)

    def test_each_task_of_a_batch_gets_its_own_result(self):
        engine = FakeEngine(self, app=BATCH_APP)
        engine.ready()
        message, ids = batch(*({"n": n} for n in range(5)))
        engine.send(message)
        got = answers(engine, ids)
        for n, task_id in enumerate(ids):
            self.assertEqual(got[task_id]["type"], "result", got[task_id])
            self.assertEqual(got[task_id]["output"], {"n": n, "batch": 5, "id": task_id})

    def test_a_poisoned_item_fails_alone(self):
        engine = FakeEngine(self, app=BATCH_APP)
        engine.ready()
        message, ids = batch({"n": 0}, {"n": 1, "action": "poison"}, {"n": 2, "action": "bad"}, {"n": 3})
        engine.send(message)
        got = answers(engine, ids)
        self.assertEqual([got[i]["type"] for i in ids], ["result", "error", "error", "result"])
        self.assertIn("ValueError: poisoned item 1", got[ids[1]]["message"])
        self.assertTrue(got[ids[1]]["retryable"])
        self.assertEqual(got[ids[2]]["message"], "unusable input 2")
        self.assertFalse(got[ids[2]]["retryable"])

    def test_raising_for_the_whole_batch_fails_every_task_with_that_error(self):
        engine = FakeEngine(self, app=BATCH_APP)
        engine.ready()
        message, ids = batch({"n": 0}, {"n": 1, "action": "raise_batch"}, {"n": 2})
        engine.send(message)
        got = answers(engine, ids)
        for task_id in ids:
            self.assertEqual(got[task_id]["type"], "error")
            self.assertTrue(got[task_id]["retryable"])
            self.assertIn("ValueError: the whole batch failed: out of memory", got[task_id]["message"])
        message, ids = batch({"action": "permanent_batch"}, {}, prefix="p")
        engine.send(message)
        got = answers(engine, ids)
        self.assertEqual({(m["type"], m["retryable"], m["message"]) for m in got.values()},
                         {("error", False, "the batch's model file is unreadable")})
        self.assertIsNone(engine.proc.poll(), "the instance survives a failed batch")

    def test_a_list_of_the_wrong_length_fails_every_task(self):
        engine = FakeEngine(self, app=BATCH_APP)
        engine.ready()
        message, ids = batch({"action": "short"}, {}, {})
        engine.send(message)
        got = answers(engine, ids)
        for m in got.values():
            self.assertEqual(m["type"], "error")
            self.assertIn("returned 1 entries for 3 tasks", m["message"])

    def test_a_single_task_goes_through_handle_batch(self):
        engine = FakeEngine(self, app=BATCH_APP)
        engine.ready()
        result = engine.run({"n": 7})
        self.assertEqual(result["output"]["batch"], 1)
        self.assertEqual(result["output"]["n"], 7)

    def test_an_old_style_worker_answers_a_batch_through_handle(self):
        engine = FakeEngine(self)
        engine.ready()
        message, ids = batch({"action": "echo", "n": 1}, {"action": "raise"})
        engine.send(message)
        got = answers(engine, ids)
        self.assertEqual(got[ids[0]]["output"]["input"]["n"], 1)
        self.assertEqual(got[ids[1]]["type"], "error")
        self.assertIn("ValueError: boom 42", got[ids[1]]["message"])

    def test_cancel_removes_a_task_from_a_batch_sent_ahead(self):
        engine = FakeEngine(self, app=BATCH_APP)
        engine.ready()
        running, running_ids = batch({"action": "sleep", "seconds": 0.5}, prefix="r")
        ahead, ahead_ids = batch({"n": 1}, {"n": 2}, prefix="a")
        engine.send(running)
        engine.send(ahead)
        time.sleep(0.1)
        engine.send({"type": "cancel", "task": ahead_ids[0]})
        answers(engine, running_ids)
        got = answers(engine, [ahead_ids[1]])
        self.assertEqual(got[ahead_ids[1]]["output"]["batch"], 1, "the cancelled task was dropped from its batch")
        self.assertEqual([m for _, m in engine.collect(0.3) if m["type"] in ("result", "error")], [])

    def test_a_busy_batch_beats_naming_its_first_task(self):
        engine = FakeEngine(self, app=BATCH_APP)
        engine.ready()
        message, ids = batch({"action": "sleep", "seconds": 6 * INTERVAL_S}, {"n": 1})
        engine.send(message)
        seen = []
        while True:
            _, m = engine.recv()
            if m["type"] in ("result", "error"):
                break
            seen.append(m)
        self.assertGreaterEqual(len(seen), 3, seen)
        self.assertEqual({(m["type"], m["task"]) for m in seen}, {("heartbeat", ids[0])})


class HandleBatchDefaultTest(unittest.TestCase):
    def test_default_calls_handle_per_task_and_returns_exceptions_in_place(self):
        class W(gpuflow.Worker):
            def handle(self, task):
                if task == "bad":
                    raise ValueError("no")
                return task.upper()

        out = W().handle_batch(["a", "bad", "c"])
        self.assertEqual(out[0], "A")
        self.assertIsInstance(out[1], ValueError)
        self.assertEqual(out[2], "C")


if __name__ == "__main__":
    unittest.main()
