"""Worker side of the gpuflow worker protocol, version 1 (with the `prefetch`,
`job_dir_on_demand` and `batch` features).

The protocol itself is specified in docs/worker-protocol.md. This module implements it so
that a model worker only writes `load()` and `handle()`:

    class OcrWorker(gpuflow.Worker):
        def load(self):
            self.session = make_session()
            return {"providers": self.session.get_providers()}

        def handle(self, task):
            return {"text": run(self.session, task.input["image"])}

    if __name__ == "__main__":
        gpuflow.serve(OcrWorker())

A worker that runs several tasks at once overrides `handle_batch(tasks)` instead; it then
announces the `batch` feature, and a pool with `batch:` sends it several tasks in one message.
"""

from __future__ import annotations

import collections
import json
import math
import os
import select
import signal
import sys
import threading
import time
import traceback
from types import FrameType
from typing import Any, Deque, Dict, List, NoReturn, Optional, Tuple

PROTOCOL_VERSION = 1

# Announced in `ready`: the engine may send tasks ahead while one runs (they wait here, in
# order), and this worker honours `cancel` for a task it has not started.
FEATURES = ["prefetch", "job_dir_on_demand"]

# Announced too by a worker that overrides `Worker.handle_batch`: it takes several tasks in one
# `batch` message and answers each with its own result or error.
FEATURE_BATCH = "batch"

# The engine treats a longer line from a worker as a protocol error and restarts the instance,
# so an output that would exceed it is turned into a task error here instead.
MAX_LINE_BYTES = 1024 * 1024

DEFAULT_HEARTBEAT_INTERVAL_MS = 1000

# A handler that reports progress once per frame could otherwise write thousands of lines a
# second; between sends, only the newest report is kept and the heartbeat thread delivers it.
_PROGRESS_MIN_GAP_S = 0.2

# Error messages are stored with the stage attempt; the full traceback goes to stderr.
_ERROR_HEAD_MAX_CHARS = 8 * 1024
_ERROR_MAX_CHARS = 16 * 1024
_TRACEBACK_TAIL_LINES = 12


class PermanentError(Exception):
    """Raise from `Worker.handle` when retrying cannot help, e.g. the input is unusable.

    The task fails with ``retryable: false`` and the message of the exception.
    Any other exception fails the task with ``retryable: true``.
    """


class Worker:
    """Base class of a model worker. Subclass it and pass an instance to `serve`."""

    def load(self) -> Optional[Dict[str, Any]]:
        """Load the model. Called once, before the instance reports ready.

        The returned dict becomes the ``info`` of the ready message (``pid`` is added when
        absent). By convention it names the execution providers actually in use, e.g.
        ``{"providers": session.get_providers()}``. Raising makes the process exit with
        status 1 without reporting ready.
        """
        return {}

    #: The largest batch this instance can take (e.g. what its GPU memory allows), announced in
    #: `ready` as ``max_batch``; the engine never sends more. None: the pool's ``max_size``.
    max_batch: Optional[int] = None

    def teardown(self) -> None:
        """Release what `load` acquired (close sessions, flush caches, free GPU memory).

        Called once, in the main thread, when the instance stops after a successful `load`:
        on the engine's ``shutdown`` (the engine stops, a reload retires the pool, or the
        instance is recycled after ``max_tasks_per_instance`` tasks, i.e. after its last task),
        when the engine closes the worker's input, on SIGTERM (the engine stopping a task
        that ran too long or was cancelled; the task in progress is abandoned and the engine
        records it as stopped), and on Ctrl-C. Not called when `load` failed, nor on SIGKILL:
        keep it shorter than the engine's ``limits.kill_grace``, after which the engine sends
        SIGKILL. A SIGTERM arriving while it runs does not interrupt it. An exception from it
        is logged and the worker still exits.
        """

    def handle(self, task: "Task") -> Any:
        """Run one task and return its output (any JSON-serialisable value)."""
        raise NotImplementedError(f"{type(self).__name__}.handle() is not implemented")

    def handle_batch(self, tasks: List["Task"]) -> List[Any]:
        """Run several tasks at once (a pool with ``batch:``): return a list with one entry
        per task, in order, each its output or an exception instance (that task fails with
        it: not retried if a `PermanentError`). Raising fails every task of the batch with the
        exception, retryable unless it is a `PermanentError`.

        Override it to run a model on the whole batch. The default calls `handle` for each
        task; overriding it is what announces the ``batch`` feature, so a worker that only
        writes `handle` keeps getting one task at a time.
        """
        results: List[Any] = []
        for task in tasks:
            try:
                results.append(self.handle(task))
            except Exception as exc:
                _log(f"task {getattr(task, 'id', task)} failed:\n{traceback.format_exc()}")
                results.append(exc)
        return results


def _batches(worker: Worker) -> bool:
    """Whether `worker` runs batches itself (it overrides `handle_batch`)."""
    return type(worker).handle_batch is not Worker.handle_batch


def _encode(message: Dict[str, Any]) -> bytes:
    # ensure_ascii=False plus a strict UTF-8 encode rejects lone surrogates here, instead of
    # sending escapes that the engine's JSON parser refuses.
    text = json.dumps(message, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8") + b"\n"


def _clean_text(text: str) -> str:
    """Make arbitrary text (tracebacks, file names) safe to encode as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _log(text: str) -> None:
    sys.stderr.write(f"gpuflow worker: {text}\n")
    sys.stderr.flush()


class _Channel:
    """The protocol stream to the engine: whole lines, written under one lock.

    `held` are the tasks the engine sees this instance running (one, or a batch). It changes
    only under the lock, together with the line that ends a task, so no heartbeat or progress
    line for a task can follow its result (the engine would take that as a protocol error).
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.lock = threading.Lock()
        self.held: List[Task] = []
        # Set when a progress report is held back, so the heartbeat thread delivers it once the
        # gap has passed instead of at its next beat (a quarter of the heartbeat timeout).
        self.progress_held = threading.Event()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def send(self, data: bytes) -> None:
        with self.lock:
            self._write(data)

    def begin(self, tasks: List["Task"]) -> None:
        with self.lock:
            self.held = list(tasks)

    def send_for(self, task: "Task", data: bytes) -> bool:
        """Send a line about `task` if the instance still holds it; False if it was dropped."""
        with self.lock:
            if not any(t is task for t in self.held):
                return False
            self._write(data)
            return True

    def finish(self, data: bytes) -> None:
        """The answers to every task held, in one write."""
        with self.lock:
            self.held = []
            self._write(data)


class Task:
    """One task, as handed to `Worker.handle`.

    Attributes: ``id`` (opaque task id), ``job_id``, ``job_dir`` (absolute path of the job's
    directory, created when first read), ``stage``, ``attempt`` (1, 2, ...), ``input`` (the
    job input) and ``stages`` (earlier stage name -> its output).

    `progress` and `heartbeat` may be called from any thread while the task runs; after the
    task has ended they do nothing.
    """

    def __init__(self, channel: _Channel, message: Dict[str, Any]) -> None:
        self.id: str = message["task"]
        self.job_id: str = message.get("job_id", "")
        self._job_dir: str = message.get("job_dir", "")
        self._job_dir_made = False
        self.stage: str = message.get("stage", "")
        self.attempt: int = message.get("attempt", 1)
        self.input: Any = message.get("input") if message.get("input") is not None else {}
        self.stages: Dict[str, Any] = message.get("stages") or {}
        self._channel = channel
        self._lock = threading.Lock()
        self._activity = False
        self._pending_progress: Optional[bytes] = None
        self._last_progress_sent = -math.inf

    @property
    def job_dir(self) -> str:
        """The job's directory, for files this task writes. We announce `job_dir_on_demand`,
        so the engine does not create it for every task: it is created here on first use."""
        if self._job_dir and not self._job_dir_made:
            os.makedirs(self._job_dir, exist_ok=True)
            self._job_dir_made = True
        return self._job_dir

    def __repr__(self) -> str:
        return f"Task(id={self.id!r}, job_id={self.job_id!r}, stage={self.stage!r}, attempt={self.attempt!r})"

    def heartbeat(self) -> None:
        """Tell the engine the handler is making progress.

        Needed only where the handler waits in one place while work advances elsewhere
        (another thread, a subprocess, a polling loop on one line); code that moves through
        Python lines is noticed without it.
        """
        with self._lock:
            self._activity = True

    def progress(self, fraction: Optional[float] = None, message: Optional[str] = None) -> None:
        """Report progress: `fraction` in [0, 1] and/or a short `message`. Counts as a heartbeat."""
        line: Dict[str, Any] = {"type": "progress", "task": self.id}
        if fraction is not None:
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
                raise TypeError(f"progress fraction must be a number, not {type(fraction).__name__}")
            if not (0.0 <= fraction <= 1.0):  # also refuses NaN
                raise ValueError(f"progress fraction must be between 0 and 1, got {fraction!r}")
            line["fraction"] = float(fraction)
        if message is not None:
            if not isinstance(message, str):
                raise TypeError(f"progress message must be a str, not {type(message).__name__}")
            line["message"] = _clean_text(message)
        data = _encode(line)
        now = time.monotonic()
        with self._lock:
            self._activity = True
            if now - self._last_progress_sent < _PROGRESS_MIN_GAP_S:
                self._pending_progress = data
                self._channel.progress_held.set()
                return
            self._pending_progress = None
            self._last_progress_sent = now
        self._channel.send_for(self, data)

    def _take_held_progress(self, now: float) -> Tuple[Optional[bytes], float]:
        """For the heartbeat thread: the held-back report if its gap has passed, else how long
        until it has (0 when nothing is held)."""
        with self._lock:
            if self._pending_progress is None:
                return None, 0.0
            wait = self._last_progress_sent + _PROGRESS_MIN_GAP_S - now
            if wait > 0:
                return None, wait
            pending, self._pending_progress = self._pending_progress, None
            self._last_progress_sent = now
            return pending, 0.0

    def _take_beat_state(self) -> Tuple[bool, Optional[bytes]]:
        """For the heartbeat thread: activity since the last call, and any held-back progress."""
        with self._lock:
            active, pending = self._activity, self._pending_progress
            self._activity = False
            self._pending_progress = None
            if pending is not None:
                self._last_progress_sent = time.monotonic()
            return active, pending


# (innermost frame, its code, line, bytecode offset, stack depth)
_Position = Tuple[Any, Any, int, int, int]


def _same_position(a: Optional[_Position], b: Optional[_Position]) -> bool:
    if a is None or b is None:
        return False
    # Identity of the frame object tells a new call of the same function (same code and
    # line, e.g. one call per loop iteration) from a frame that has not moved.
    return a[0] is b[0] and a[1] is b[1] and a[2:] == b[2:]


class _Heartbeat(threading.Thread):
    """Sends a heartbeat each interval only while the handler is making progress.

    Progress means: since the previous beat the handler called `Task.progress` or
    `Task.heartbeat`, or the handler thread's innermost Python frame moved (another frame
    object, code object, line or stack depth). A handler blocked on a lock, or stuck in one
    native call, stays put and the beats stop, so the engine's heartbeat timeout catches it.
    Beating unconditionally would only prove the process is alive and hide such a hang.
    """

    def __init__(self, channel: _Channel, interval_s: float, handler_thread_id: int) -> None:
        super().__init__(name="gpuflow-heartbeat", daemon=True)
        self._channel = channel
        self._interval = interval_s
        self._handler_thread_id = handler_thread_id
        self._tasks: Optional[List[Task]] = None  # set and cleared by the handler thread

    def watch(self, tasks: Optional[List[Task]]) -> None:
        self._tasks = tasks

    def _sample(self) -> Optional[_Position]:
        frame = sys._current_frames().get(self._handler_thread_id)
        if frame is None:
            return None
        depth = 0
        walker: Optional[FrameType] = frame
        while walker is not None:
            depth += 1
            walker = walker.f_back
        return (frame, frame.f_code, frame.f_lineno or 0, frame.f_lasti, depth)

    def run(self) -> None:
        watched: Optional[List[Task]] = None
        # Holds a reference to the sampled frame until the next tick so that its id cannot be
        # reused by a new frame; that keeps its locals alive for at most one interval.
        last: Optional[_Position] = None
        next_tick = time.monotonic() + self._interval
        while True:
            delay = next_tick - time.monotonic()
            if delay > 0 and self._channel.progress_held.wait(delay):
                self._deliver_held_progress(next_tick)
                continue
            now = time.monotonic()
            next_tick += self._interval
            if next_tick <= now:  # the process was stalled (GIL, suspend): do not burst
                next_tick = now + self._interval

            tasks = self._tasks
            if not tasks:
                watched, last = None, None
                continue
            position = self._sample()
            if tasks is not watched:
                # A new task or batch: its first sample is the baseline, not movement. The
                # engine counts from the moment it sent it, so a handler that deadlocks at once
                # sends no beat at all.
                watched, moved = tasks, False
            else:
                moved = not _same_position(position, last)
            last = position
            # A batch beats once, naming its first task: the engine watches the batch as one.
            states = [(task, *task._take_beat_state()) for task in tasks]
            lines = [(task, pending) for task, _, pending in states if pending is not None]
            if not (moved or any(active for _, active, _ in states)):
                continue
            if not lines:
                lines = [(tasks[0], _encode({"type": "heartbeat", "task": tasks[0].id}))]
            try:
                for task, data in lines:
                    self._channel.send_for(task, data)
            except OSError as exc:
                # The engine is gone. Exit now rather than keep a GPU busy for nobody.
                _log(f"protocol channel closed ({exc}); exiting")
                os._exit(1)


    def _deliver_held_progress(self, next_tick: float) -> None:
        """Sends held-back progress reports as soon as their gap has passed (before the next
        beat, which sends them anyway). Activity is left for the beat to see."""
        while True:
            self._channel.progress_held.clear()
            tasks = self._tasks or []
            now = time.monotonic()
            waits = []
            try:
                for task in tasks:
                    data, wait = task._take_held_progress(now)
                    if data is not None:
                        self._channel.send_for(task, data)
                    elif wait > 0:
                        waits.append(wait)
            except OSError as exc:
                _log(f"protocol channel closed ({exc}); exiting")
                os._exit(1)
            if not waits or now + min(waits) >= next_tick:
                return
            time.sleep(min(waits))


def _exception_text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not take the instance down
        return "<exception text could not be rendered>"


def _failure_message(exc: BaseException) -> str:
    text = _exception_text(exc)
    head = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if len(head) > _ERROR_HEAD_MAX_CHARS:
        head = head[:_ERROR_HEAD_MAX_CHARS] + " ... (truncated)"
    tb = exc.__traceback__
    if tb is not None and tb.tb_frame.f_code in (_run_task.__code__, _run_batch.__code__):
        tb = tb.tb_next  # the SDK's own frame says nothing about the failure
    lines = "".join(traceback.format_tb(tb)).rstrip("\n").splitlines()
    # Drop the ^^^ / ~~^~~ marker lines of Python 3.11+: they cost lines and say little here.
    lines = [line for line in lines if line.strip(" ^~")]
    tail = lines[-_TRACEBACK_TAIL_LINES:]
    message = head + "\n" + "\n".join(tail) if tail else head
    if len(message) > _ERROR_MAX_CHARS:
        message = message[:_ERROR_MAX_CHARS] + " ... (truncated)"
    return _clean_text(message)


def _permanent_message(exc: PermanentError) -> str:
    text = _exception_text(exc) or type(exc).__name__
    if len(text) > _ERROR_MAX_CHARS:
        text = text[:_ERROR_MAX_CHARS] + " ... (truncated)"
    return _clean_text(text)


def _error_line(task_id: str, message: str, retryable: bool) -> bytes:
    return _encode({"type": "error", "task": task_id, "message": message, "retryable": retryable})


def _result_line(task_id: str, output: Any) -> bytes:
    """The result line, or an error line (not retryable) when the output cannot be sent."""
    try:
        data = _encode({"type": "result", "task": task_id, "output": output})
    except UnicodeEncodeError as exc:
        return _error_line(
            task_id,
            f"task output contains a string that is not valid Unicode ({exc.reason}); "
            "decode file names and bytes before returning them",
            False,
        )
    except (TypeError, ValueError, RecursionError) as exc:
        return _error_line(task_id, _clean_text(f"task output is not JSON-serialisable: {exc}"), False)
    if len(data) > MAX_LINE_BYTES:
        return _error_line(
            task_id,
            f"task output is {len(data)} bytes as JSON, over the protocol's {MAX_LINE_BYTES}-byte "
            "line limit; write large results under task.job_dir and return their paths",
            False,
        )
    return data


def _protect_stdout() -> int:
    """Take fd 1 for the protocol and send everything else written to stdout to stderr."""
    protocol_fd = os.dup(1)  # not inheritable: programs the handler starts never get it
    os.dup2(2, 1)  # native libraries and child processes writing to fd 1 now reach stderr
    if sys.stdout is not None:
        try:
            # Anything printed before serve() and still buffered now lands on stderr, not on
            # the protocol stream.
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
    sys.stdout = sys.stderr
    return protocol_fd


def _heartbeat_interval_s() -> float:
    raw = os.environ.get("GPUFLOW_HEARTBEAT_INTERVAL_MS", "").strip()
    if not raw:
        return DEFAULT_HEARTBEAT_INTERVAL_MS / 1000.0
    try:
        ms = int(raw)
    except ValueError:
        ms = 0
    if ms <= 0:
        _log(f"GPUFLOW_HEARTBEAT_INTERVAL_MS must be a positive integer of milliseconds, got {raw!r}")
        sys.exit(1)
    return ms / 1000.0


class _Input:
    """The engine's lines on fd 0, read without Python's buffering, so that whether more lines
    are already waiting can be asked of the pipe itself (select with a zero timeout)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = bytearray()
        self._eof = False

    def _fill(self, block: bool) -> bool:
        if self._eof:
            return False
        if not block:
            readable, _, _ = select.select([self._fd], [], [], 0)
            if not readable:
                return False
        data = os.read(self._fd, 64 * 1024)
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def _take_line(self) -> Optional[bytes]:
        end = self._buf.find(b"\n")
        if end < 0:
            return None
        line = bytes(self._buf[: end + 1])
        del self._buf[: end + 1]
        return line

    def readline(self) -> bytes:
        """The next line, waiting for it; b"" at end of input."""
        while True:
            line = self._take_line()
            if line is not None:
                return line
            if self._eof:
                rest = bytes(self._buf)
                self._buf.clear()
                return rest
            self._fill(block=True)

    def ready_lines(self) -> List[bytes]:
        """Every whole line that has already arrived, without waiting."""
        while self._fill(block=False):
            pass
        lines: List[bytes] = []
        while True:
            line = self._take_line()
            if line is None:
                return lines
            lines.append(line)


def _parse_engine_line(raw: bytes) -> Optional[Dict[str, Any]]:
    """One engine message; None for a blank line. Exits with status 2 on garbage."""
    if not raw.strip():
        return None
    try:
        message = json.loads(raw)
    except ValueError as exc:
        _log(f"engine sent a line that is not JSON ({exc}): {raw[:200]!r}; exiting")
        sys.exit(2)
    if not isinstance(message, dict):
        _log(f"engine sent JSON that is not an object: {raw[:200]!r}; exiting")
        sys.exit(2)
    return message


class _Inbox:
    """Engine messages not yet acted on, in order. Tasks sent ahead wait here; a `cancel`
    drops the task it names if that task has not started (otherwise it is ignored: the task is
    unknown, finished, or running, and a running handler cannot be interrupted)."""

    def __init__(self, source: _Input) -> None:
        self._source = source
        self._queue: Deque[Dict[str, Any]] = collections.deque()

    def _add(self, message: Dict[str, Any]) -> None:
        if message.get("type") == "cancel":
            self.cancel(message.get("task"))
        else:
            self._queue.append(message)

    def cancel(self, task_id: Any) -> bool:
        for message in self._queue:
            if message.get("type") == "task" and message.get("task") == task_id:
                self._queue.remove(message)
                _log(f"task {task_id} was cancelled before it started; skipping it")
                return True
            tasks = message.get("tasks") if message.get("type") == "batch" else None
            if isinstance(tasks, list) and any(isinstance(t, dict) and t.get("task") == task_id for t in tasks):
                message["tasks"] = [t for t in tasks if not (isinstance(t, dict) and t.get("task") == task_id)]
                if not message["tasks"]:
                    self._queue.remove(message)
                _log(f"task {task_id} was cancelled before its batch started; skipping it")
                return True
        return False

    def take_ready(self) -> None:
        """Take in what has already arrived, without waiting: cancels apply at once."""
        for raw in self._source.ready_lines():
            message = _parse_engine_line(raw)
            if message is not None:
                self._add(message)

    def next(self) -> Optional[Dict[str, Any]]:
        """The next message to act on, waiting for one; None at end of input. Before a task
        is handed out, lines already waiting are read, so a `cancel` sent after it is seen."""
        while True:
            if not self._queue:
                raw = self._source.readline()
                if not raw:
                    return None
                message = _parse_engine_line(raw)
                if message is None:
                    continue
                self._add(message)
                continue
            if self._queue[0].get("type") in ("task", "batch"):
                self.take_ready()
                if not self._queue:
                    continue  # it was cancelled
                if any(m.get("type") == "shutdown" for m in self._queue):
                    return {"type": "shutdown"}  # start nothing new
            return self._queue.popleft()


def _run_task(worker: Worker, channel: _Channel, beat: _Heartbeat, message: Dict[str, Any]) -> None:
    if _batches(worker):
        _run_batch(worker, channel, beat, [message])
        return
    task = Task(channel, message)
    tasks = [task]
    channel.begin(tasks)
    beat.watch(tasks)
    try:
        output = worker.handle(task)
    except PermanentError as exc:
        _log(f"task {task.id} failed permanently:\n{traceback.format_exc()}")
        reply = _error_line(task.id, _permanent_message(exc), False)
    except Exception as exc:
        _log(f"task {task.id} failed:\n{traceback.format_exc()}")
        reply = _error_line(task.id, _failure_message(exc), True)
    else:
        reply = _result_line(task.id, output)
        # Drop the reference now: the output may be large and the next task may be far off.
        del output
    finally:
        beat.watch(None)
    channel.finish(reply)


def _answer(task: "Task", entry: Any) -> bytes:
    """The line for one entry of what `handle_batch` returned."""
    if isinstance(entry, PermanentError):
        return _error_line(task.id, _permanent_message(entry), False)
    if isinstance(entry, BaseException):
        return _error_line(task.id, _failure_message(entry), True)
    return _result_line(task.id, entry)


def _run_batch(worker: Worker, channel: _Channel, beat: _Heartbeat, messages: List[Dict[str, Any]]) -> None:
    tasks = [Task(channel, m) for m in messages]
    channel.begin(tasks)
    beat.watch(tasks)
    try:
        outputs = worker.handle_batch(list(tasks))
        if not isinstance(outputs, (list, tuple)) or len(outputs) != len(tasks):
            got = f"{len(outputs)} entries" if isinstance(outputs, (list, tuple)) else type(outputs).__name__
            raise TypeError(
                f"{type(worker).__name__}.handle_batch returned {got} for {len(tasks)} tasks; "
                "return a list with one entry (an output or an exception) per task, in order"
            )
    except PermanentError as exc:
        _log(f"batch of {len(tasks)} failed permanently:\n{traceback.format_exc()}")
        message = _permanent_message(exc)
        replies = [_error_line(t.id, message, False) for t in tasks]
    except Exception as exc:
        _log(f"batch of {len(tasks)} failed:\n{traceback.format_exc()}")
        message = _failure_message(exc)
        replies = [_error_line(t.id, message, True) for t in tasks]
    else:
        replies = [_answer(t, entry) for t, entry in zip(tasks, outputs)]
        # Drop the reference now: the outputs may be large and the next batch may be far off.
        del outputs
    finally:
        beat.watch(None)
    channel.finish(b"".join(replies))


def serve(worker: Worker) -> NoReturn:
    """Run `worker` as a gpuflow worker instance until the engine shuts it down.

    Never returns: exits with status 0 on shutdown or end of input, 1 when `load()` fails or
    the engine's end of the protocol channel is gone, 2 when the engine sends a line that is
    not a JSON object or a task without an id.
    """
    protocol_fd = _protect_stdout()
    interval_s = _heartbeat_interval_s()

    try:
        info = worker.load()
    except Exception:
        traceback.print_exc()
        _log("load() failed; exiting without reporting ready")
        sys.exit(1)
    if info is None:
        info = {}
    if not isinstance(info, dict):
        _log(f"load() must return a dict (or None), not {type(info).__name__}")
        sys.exit(1)
    info = dict(info)
    info.setdefault("pid", os.getpid())
    features = FEATURES + [FEATURE_BATCH] if _batches(worker) else FEATURES
    ready_message: Dict[str, Any] = {"type": "ready", "protocol": PROTOCOL_VERSION, "features": features, "info": info}
    if worker.max_batch is not None:
        if isinstance(worker.max_batch, bool) or not isinstance(worker.max_batch, int) or worker.max_batch < 1:
            _log(f"max_batch must be a whole number of tasks, at least 1, not {worker.max_batch!r}")
            sys.exit(1)
        ready_message["max_batch"] = worker.max_batch
    try:
        ready = _encode(ready_message)
    except (TypeError, ValueError) as exc:
        _log(f"the info returned by load() is not JSON-serialisable: {exc}")
        sys.exit(1)

    stop = _Stop()
    stop.install()
    try:
        _serve_loop(worker, protocol_fd, interval_s, ready)
    finally:
        stop.teardown(worker)


class _Stop:
    """Runs `Worker.teardown` once when the worker stops, and turns SIGTERM into a clean stop
    (then dies of SIGTERM as the engine expects). A SIGTERM during the teardown is ignored:
    the engine's SIGKILL after ``kill_grace`` bounds it."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self.tearing_down = False

    def install(self) -> None:
        try:
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:
            pass  # not the main thread: leave signals alone

    def _on_sigterm(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.tearing_down:
            return
        self.signal = signum
        raise SystemExit(128 + signum)

    def teardown(self, worker: Worker) -> None:
        self.tearing_down = True
        try:
            worker.teardown()
        except Exception:
            _log(f"teardown() failed:\n{traceback.format_exc()}")
        if self.signal is not None:
            signal.signal(self.signal, signal.SIG_DFL)
            os.kill(os.getpid(), self.signal)


def _serve_loop(worker: Worker, protocol_fd: int, interval_s: float, ready: bytes) -> NoReturn:
    channel = _Channel(protocol_fd)
    beat = _Heartbeat(channel, interval_s, threading.get_ident())
    beat.start()
    # Our own reader over fd 0, so user code replacing sys.stdin cannot disturb it.
    inbox = _Inbox(_Input(0))
    try:
        channel.send(ready)
        while True:
            message = inbox.next()
            if message is None:
                sys.exit(0)  # the engine closed our input: nothing more will come
            kind = message.get("type")
            if kind == "task":
                if not isinstance(message.get("task"), str) or not message["task"]:
                    _log(f"engine sent a task message without a task id: {str(message)[:200]}; exiting")
                    sys.exit(2)
                _run_task(worker, channel, beat, message)
            elif kind == "batch":
                tasks = message.get("tasks")
                if not isinstance(tasks, list) or not all(
                    isinstance(t, dict) and isinstance(t.get("task"), str) and t["task"] for t in tasks
                ):
                    _log(f"engine sent a batch whose tasks lack ids: {str(message)[:200]}; exiting")
                    sys.exit(2)
                if tasks:
                    _run_batch(worker, channel, beat, tasks)
            elif kind == "shutdown":
                sys.exit(0)
            else:
                _log(f"ignoring engine message of unknown type {kind!r}")
    except OSError as exc:
        _log(f"protocol channel failed ({exc}); exiting")
        sys.exit(1)
