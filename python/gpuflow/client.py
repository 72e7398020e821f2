"""Blocking HTTP client for the gpuflow engine's API (standard library only).

One keep-alive connection per `Client`, reopened when the engine closed it; `wait` follows the
engine's live feed (``GET /v1/events``) on a second connection.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import threading
import time
import warnings
from types import TracebackType
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Type, TypeVar

from . import _http, _ops
from ._ops import MAX_BATCH
from .errors import EngineUnreachableError, GpuflowError
from .models import TERMINAL_STATES, BatchEntry, Cancelled, Diagnosis, Health, Job, JobPage, LogTail, Submitted

__all__ = ["Client", "DEFAULT_SERVER", "MAX_BATCH", "TERMINAL_STATES"]

DEFAULT_SERVER = "http://127.0.0.1:7070"

# After the live feed dropped: the first reconnection is immediate-ish, then slower, so an
# engine restart is followed promptly without hammering an engine that is down.
RECONNECT_DELAYS_S = (0.05, 0.2, 0.5, 1.0, 2.0)

T = TypeVar("T")


def default_server(base_url: Optional[str]) -> str:
    return (base_url or os.environ.get("GPUFLOW_SERVER") or DEFAULT_SERVER).rstrip("/")


def default_token(token: Optional[str]) -> Optional[str]:
    return token if token is not None else (os.environ.get("GPUFLOW_TOKEN") or None)


class _Connection:
    """One HTTP/1.1 connection over a blocking socket."""

    def __init__(self, endpoint: _http.Endpoint, timeout: Optional[float]) -> None:
        self.endpoint = endpoint
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
        if endpoint.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=endpoint.host)
        self.sock = sock
        self._buffer = b""
        self.used = False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def dropped(self) -> bool:
        """Whether the engine closed this idle connection (it is readable: EOF, or junk)."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def recv(self) -> bytes:
        if self._buffer:
            data, self._buffer = self._buffer, b""
            return data
        return self.sock.recv(65536)

    def send(self, data: bytes) -> None:
        self.used = True
        self.sock.sendall(data)

    def read_head(self) -> _http.Head:
        raw = b""
        while True:
            end = raw.find(b"\r\n\r\n")
            if end >= 0:
                self._buffer = raw[end + 4 :] + self._buffer
                return _http.parse_head(raw[:end])
            if len(raw) > _http.MAX_HEAD_BYTES:
                raise GpuflowError(None, "invalid_response", "answer head over 64 KiB")
            data = self.recv()
            if not data:
                raise ConnectionResetError("the engine closed the connection before answering")
            raw += data

    def body_chunks(self, decoder: _http.BodyDecoder) -> Iterator[bytes]:
        while not decoder.done:
            data = self.recv()
            if not data:
                decoder.end_of_stream()
                return
            piece = decoder.feed(data)
            if piece:
                yield piece


class Client:
    """Talks to a gpuflow engine; use it as a context manager, or call `close()`.

    `base_url` defaults to ``$GPUFLOW_SERVER``, then ``http://127.0.0.1:7070``; `token` to
    ``$GPUFLOW_TOKEN`` (sent as ``Authorization: Bearer``), like the CLI. `timeout` bounds
    each request, in seconds.

    Methods return typed dataclasses (`Job`, `Submitted`, ...) and raise a `GpuflowError`
    subclass for an error answer (`NotFoundError`, `QueueFullError`, ...) or
    `EngineUnreachableError` (also a `ConnectionError`) when the engine cannot be reached.
    A client may be shared between threads; its requests then take turns on its connection.
    """

    def __init__(self, base_url: Optional[str] = None, token: Optional[str] = None, timeout: float = 30.0) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout: {timeout!r} must be a positive number of seconds")
        self.base_url = default_server(base_url)
        self._endpoint = _http.Endpoint.parse(self.base_url)
        self.token = default_token(token)
        self.timeout = timeout
        self._connection: Optional[_Connection] = None
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"Client(base_url={self.base_url!r})"

    def __enter__(self) -> "Client":
        return self

    def __exit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connection. The client may not be used afterwards."""
        with self._lock:
            self._closed = True
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    # --- jobs ---------------------------------------------------------------------------

    def submit(
        self,
        pipeline: str,
        input: Optional[Mapping[str, Any]] = None,
        priority: int = 0,
        idempotency_key: Optional[str] = None,
    ) -> Submitted:
        """Submit a job. A repeated `idempotency_key` returns the job accepted earlier under it
        (``created`` is then False)."""
        return self._call(_ops.submit(pipeline, input, priority, idempotency_key))

    def submit_batch(self, jobs: Iterable[Mapping[str, Any]]) -> List[BatchEntry]:
        """Submit 1 to `MAX_BATCH` (1,000) jobs in one request; one entry per job, in order.

        Each job is a mapping shaped like `submit`'s arguments:
        ``{"pipeline": ..., "input": {...}, "priority": 0, "idempotency_key": ...}``
        (only ``pipeline`` is required). The engine checks each job on its own, so one bad
        job does not sink the others: an entry is accepted (``id``, ``state``, ``created``)
        or refused (``error``: the ``code``, ``message`` and ``status`` `submit` would have
        raised; ``entry.error.exception()`` is that exception), so the caller can retry 429
        and 503 entries.

        Raises ValueError for zero or more than 1,000 jobs, and `GpuflowError` when the
        request as a whole is refused: 413 for a body over the batch limit, 503 while the
        engine shuts down or its store is unreachable (then no job was admitted).
        """
        return self._call(_ops.submit_batch(jobs))

    def submit_workflow(
        self, video_path: str, chain: Iterable[str], priority: int = 0, idempotency_key: Optional[str] = None
    ) -> Submitted:
        """Submit a workflow in a gateway's chain shape (``POST /v1/workflows``): the named
        stages of the pipeline file's ``workflows.stages``, run in order on `video_path`."""
        return self._call(_ops.submit_workflow(video_path, chain, priority, idempotency_key))

    def job(self, id: str) -> Job:
        """The job: state, stages (with attempts, errors, outputs and progress) and output."""
        return self._call(_ops.job(id))

    def jobs(
        self,
        state: Optional[str] = None,
        pipeline: Optional[str] = None,
        limit: Optional[int] = None,
        cursor: Optional[str] = None,
    ) -> JobPage:
        """One page of jobs, newest first; pass ``page.next_cursor`` as `cursor` for the next."""
        return self._call(_ops.jobs(state, pipeline, limit, cursor))

    def cancel(self, id: str) -> Cancelled:
        """Cancel a job: stages not started are cancelled, running ones are stopped."""
        return self._call(_ops.cancel(id))

    def logs(
        self, id: str, stage: str, attempt: Optional[int] = None, stream: str = "stderr", tail_bytes: Optional[int] = None
    ) -> LogTail:
        """The end of a stage attempt's log (default: its latest attempt's stderr, last 16 KiB;
        `tail_bytes` up to 256 KiB). A worker stage's output is in its pool instance's log:
        ``note`` says where."""
        return self._call(_ops.logs(id, stage, attempt, stream, tail_bytes))

    def wait(self, id: str, timeout: Optional[float] = None, poll: Optional[float] = None) -> Job:
        """Wait until the job succeeded, failed or was cancelled, and return it.

        Follows the engine's live feed instead of polling: the job is read once the feed is
        open, then again only when the feed says it finished (or that events were missed).
        A dropped feed is reopened and the job read again, so an engine restart is survived.
        Raises TimeoutError when `timeout` seconds pass first, `NotFoundError` for an unknown
        job. `poll` is ignored (it was the polling interval) and will be removed.
        """
        if poll is not None:
            warnings.warn("Client.wait(poll=...) is ignored: wait follows the live feed", DeprecationWarning, stacklevel=2)
        deadline = None if timeout is None else time.monotonic() + timeout
        state = "unknown"
        failures = 0
        while True:
            feed: Optional[_Feed] = None
            try:
                feed = self._open_feed(deadline)
            except (OSError, GpuflowError) as exc:
                if not _transient(exc):
                    raise
            if feed is not None:
                try:
                    job = self.job(id)  # after subscribing, so its end cannot slip between
                    state = job.state
                    if job.done:
                        return job
                    failures = 0
                    for event in feed.events(deadline):
                        if _http.job_finished(event, id):
                            job = self.job(id)
                            state = job.state
                            if job.done:
                                return job
                except socket.timeout:
                    pass  # the deadline check below decides
                except (OSError, GpuflowError) as exc:
                    if not _transient(exc):
                        raise
                finally:
                    feed.close()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"job {id} is still {state} after {timeout:g}s")
            delay = RECONNECT_DELAYS_S[min(failures, len(RECONNECT_DELAYS_S) - 1)]
            failures += 1
            time.sleep(delay if remaining is None else min(delay, remaining))

    # --- the engine ---------------------------------------------------------------------

    def doctor(self) -> Diagnosis:
        """What is wrong now: open findings (each with evidence, cause and fix), recently
        closed ones and the GPU readings, as ``gpuflow doctor`` shows them."""
        return self._call(_ops.doctor())

    def resources(self) -> Dict[str, Any]:
        """Capacity, the leases held, the waiting queue and the worker pools (as sent)."""
        return self._call(_ops.resources())

    def health(self) -> Health:
        """Readiness: ``starting``, ``ok`` or ``degraded`` (with the reason)."""
        return self._call(_ops.health())

    # --- transport ----------------------------------------------------------------------

    def _call(self, op: "_ops.Op[T]") -> T:
        status, data = self._request(op.method, op.path, op.body)
        return op.read(status, data)

    def _request(self, method: str, path: str, body: Any = None) -> Tuple[int, Any]:
        request = _http.encode_request(self._endpoint, method, path, self.token, body)
        with self._lock:
            if self._closed:
                raise RuntimeError("this Client is closed; create a new one")
            for attempt in (1, 2):
                connection = self._connection
                if connection is not None and connection.dropped():
                    connection.close()
                    connection = None
                reused = connection is not None
                try:
                    if connection is None:
                        connection = _Connection(self._endpoint, self.timeout)
                    self._connection = connection
                    connection.sock.settimeout(self.timeout)
                    connection.send(request)
                    head = connection.read_head()
                    raw = b"".join(connection.body_chunks(_http.BodyDecoder(head, method)))
                except socket.timeout:
                    self._drop()
                    raise EngineUnreachableError(
                        f"{method} {path}: no answer from gpuflow at {self.base_url} within {self.timeout:g}s"
                    ) from None
                except OSError as exc:
                    self._drop()
                    # A kept-alive connection may close just as a request goes out; a read
                    # is safe to send again, a submission is not (it may have been accepted).
                    if reused and attempt == 1 and method == "GET":
                        continue
                    raise EngineUnreachableError(f"cannot reach gpuflow at {self.base_url}: {exc}") from exc
                except GpuflowError:
                    self._drop()  # a garbled answer leaves the connection unusable
                    raise
                if not head.keep_alive or (head.status >= 400 and raw == b""):
                    self._drop()
                return head.status, _http.result(method, path, head, raw)
        raise AssertionError("unreachable")

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _open_feed(self, deadline: Optional[float]) -> "_Feed":
        """A connection subscribed to ``/v1/events``: its ``hello`` has been read."""
        timeout = self.timeout if deadline is None else max(0.001, min(self.timeout, deadline - time.monotonic()))
        connection = _Connection(self._endpoint, timeout)
        try:
            connection.send(_http.encode_request(self._endpoint, "GET", "/v1/events", self.token, accept="text/event-stream"))
            head = connection.read_head()
            if head.status != 200:
                raw = b"".join(connection.body_chunks(_http.BodyDecoder(head, "GET")))
                raise _http.error_from(head, raw)
            feed = _Feed(connection, _http.BodyDecoder(head, "GET"))
            for event in feed.events(deadline):
                if event.event == "hello":
                    return feed
            raise ConnectionResetError("the live feed ended before it said hello")
        except BaseException:
            connection.close()
            raise


class _Feed:
    """The engine's live feed (server-sent events) on its own connection."""

    def __init__(self, connection: _Connection, decoder: _http.BodyDecoder) -> None:
        self._connection = connection
        self._decoder = decoder
        self._parser = _http.SseParser()
        self._pending: List[_http.Event] = []

    def close(self) -> None:
        self._connection.close()

    def events(self, deadline: Optional[float]) -> Iterator[_http.Event]:
        """Events until the feed ends; socket.timeout at the deadline. The engine sends a
        keep-alive every 15 s, so a connection silent for 45 s is taken for dead."""
        while True:
            while self._pending:
                yield self._pending.pop(0)
            if self._decoder.done:
                return
            wait = 45.0 if deadline is None else min(45.0, deadline - time.monotonic())
            if wait <= 0:
                raise socket.timeout("deadline")
            self._connection.sock.settimeout(wait)
            data = self._connection.recv()
            if not data:
                self._decoder.end_of_stream()
                return
            self._pending.extend(self._parser.feed(self._decoder.feed(data)))


def _transient(exc: BaseException) -> bool:
    """Whether waiting should reopen the feed and carry on: the engine was unreachable,
    restarting or shutting down, rather than refusing the request."""
    if isinstance(exc, GpuflowError):
        return exc.status is None or exc.status in (502, 503, 504)
    return isinstance(exc, OSError)
