"""asyncio client for the gpuflow engine's API (standard library only).

Real non-blocking IO: a small HTTP/1.1 client over `asyncio.open_connection`, sharing its
request and answer handling with the blocking `Client` (``_http``, ``_ops``).
"""

from __future__ import annotations

import asyncio
import ssl
import time
import warnings
from types import TracebackType
from typing import Any, AsyncIterator, Dict, Iterable, List, Mapping, Optional, Tuple, Type, TypeVar

from . import _http, _ops
from .client import RECONNECT_DELAYS_S, _transient, default_server, default_token
from .errors import EngineUnreachableError, GpuflowError
from .models import BatchEntry, Cancelled, Diagnosis, Health, Job, JobPage, LogTail, Submitted

__all__ = ["AsyncClient"]

T = TypeVar("T")

# The engine sends a keep-alive comment every 15 s on the live feed.
_FEED_SILENCE_S = 45.0


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, endpoint: _http.Endpoint) -> "_Connection":
        context = ssl.create_default_context() if endpoint.scheme == "https" else None
        reader, writer = await asyncio.open_connection(
            endpoint.host, endpoint.port, ssl=context, server_hostname=endpoint.host if context else None
        )
        return cls(reader, writer)

    def dropped(self) -> bool:
        return self.reader.at_eof() or self.writer.is_closing()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass

    async def read_head(self) -> _http.Head:
        try:
            raw = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            raise ConnectionResetError("the engine closed the connection before answering") from exc
        except asyncio.LimitOverrunError as exc:
            raise GpuflowError(None, "invalid_response", "answer head too long") from exc
        return _http.parse_head(raw[:-4])

    async def chunks(self, decoder: _http.BodyDecoder) -> AsyncIterator[bytes]:
        while not decoder.done:
            data = await self.reader.read(65536)
            if not data:
                decoder.end_of_stream()
                return
            piece = decoder.feed(data)
            if piece:
                yield piece


class AsyncClient:
    """The asyncio twin of `Client`: the same methods, as coroutines, with the same typed
    answers and exceptions. Use it as ``async with AsyncClient() as client:``, or call
    ``await client.aclose()``. Concurrent calls on one client take turns on its keep-alive
    connection; `wait` opens its own connection to the live feed, so many waits can run at
    once (``asyncio.gather``)."""

    def __init__(self, base_url: Optional[str] = None, token: Optional[str] = None, timeout: float = 30.0) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout: {timeout!r} must be a positive number of seconds")
        self.base_url = default_server(base_url)
        self._endpoint = _http.Endpoint.parse(self.base_url)
        self.token = default_token(token)
        self.timeout = timeout
        self._connection: Optional[_Connection] = None
        self._lock: Optional[asyncio.Lock] = None  # made in the running loop, on first use
        self._closed = False

    def __repr__(self) -> str:
        return f"AsyncClient(base_url={self.base_url!r})"

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Closes the connection. The client may not be used afterwards."""
        self._closed = True
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await connection.close()

    async def submit(
        self,
        pipeline: str,
        input: Optional[Mapping[str, Any]] = None,
        priority: int = 0,
        idempotency_key: Optional[str] = None,
    ) -> Submitted:
        """See `Client.submit`."""
        return await self._call(_ops.submit(pipeline, input, priority, idempotency_key))

    async def submit_batch(self, jobs: Iterable[Mapping[str, Any]]) -> List[BatchEntry]:
        """See `Client.submit_batch`."""
        return await self._call(_ops.submit_batch(jobs))

    async def submit_workflow(
        self, video_path: str, chain: Iterable[str], priority: int = 0, idempotency_key: Optional[str] = None
    ) -> Submitted:
        """See `Client.submit_workflow`."""
        return await self._call(_ops.submit_workflow(video_path, chain, priority, idempotency_key))

    async def job(self, id: str) -> Job:
        """See `Client.job`."""
        return await self._call(_ops.job(id))

    async def jobs(
        self,
        state: Optional[str] = None,
        pipeline: Optional[str] = None,
        limit: Optional[int] = None,
        cursor: Optional[str] = None,
    ) -> JobPage:
        """See `Client.jobs`."""
        return await self._call(_ops.jobs(state, pipeline, limit, cursor))

    async def cancel(self, id: str) -> Cancelled:
        """See `Client.cancel`."""
        return await self._call(_ops.cancel(id))

    async def logs(
        self, id: str, stage: str, attempt: Optional[int] = None, stream: str = "stderr", tail_bytes: Optional[int] = None
    ) -> LogTail:
        """See `Client.logs`."""
        return await self._call(_ops.logs(id, stage, attempt, stream, tail_bytes))

    async def doctor(self) -> Diagnosis:
        """See `Client.doctor`."""
        return await self._call(_ops.doctor())

    async def resources(self) -> Dict[str, Any]:
        """See `Client.resources`."""
        return await self._call(_ops.resources())

    async def health(self) -> Health:
        """See `Client.health`."""
        return await self._call(_ops.health())

    async def wait(self, id: str, timeout: Optional[float] = None, poll: Optional[float] = None) -> Job:
        """See `Client.wait`: follows the live feed, reopens it when it drops and reads the job
        again. Raises TimeoutError after `timeout` seconds; cancelling the task stops it."""
        if poll is not None:
            warnings.warn("AsyncClient.wait(poll=...) is ignored: wait follows the live feed", DeprecationWarning, stacklevel=2)
        deadline = None if timeout is None else time.monotonic() + timeout
        state = "unknown"
        failures = 0
        while True:
            feed: Optional[_Feed] = None
            try:
                feed = await self._open_feed(deadline)
            except (OSError, GpuflowError, asyncio.TimeoutError) as exc:
                if not isinstance(exc, asyncio.TimeoutError) and not _transient(exc):
                    raise
            if feed is not None:
                try:
                    job = await self.job(id)  # after subscribing, so its end cannot slip between
                    state = job.state
                    if job.done:
                        return job
                    failures = 0
                    async for event in feed.events(deadline):
                        if _http.job_finished(event, id):
                            job = await self.job(id)
                            state = job.state
                            if job.done:
                                return job
                except asyncio.TimeoutError:
                    pass  # the deadline check below decides
                except (OSError, GpuflowError) as exc:
                    if not _transient(exc):
                        raise
                finally:
                    await feed.close()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"job {id} is still {state} after {timeout:g}s")
            delay = RECONNECT_DELAYS_S[min(failures, len(RECONNECT_DELAYS_S) - 1)]
            failures += 1
            await asyncio.sleep(delay if remaining is None else min(delay, remaining))

    # --- transport ----------------------------------------------------------------------

    async def _call(self, op: "_ops.Op[T]") -> T:
        status, data = await self._request(op.method, op.path, op.body)
        return op.read(status, data)

    async def _request(self, method: str, path: str, body: Any = None) -> Tuple[int, Any]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        request = _http.encode_request(self._endpoint, method, path, self.token, body)
        async with self._lock:
            if self._closed:
                raise RuntimeError("this AsyncClient is closed; create a new one")
            for attempt in (1, 2):
                connection = self._connection
                if connection is not None and connection.dropped():
                    await self._drop()
                    connection = None
                reused = connection is not None
                try:
                    head, raw = await asyncio.wait_for(self._exchange(connection, request, method), self.timeout)
                except asyncio.TimeoutError:
                    await self._drop()
                    raise EngineUnreachableError(
                        f"{method} {path}: no answer from gpuflow at {self.base_url} within {self.timeout:g}s"
                    ) from None
                except OSError as exc:
                    await self._drop()
                    # As in `Client`: only a read is sent again on a fresh connection.
                    if reused and attempt == 1 and method == "GET":
                        continue
                    raise EngineUnreachableError(f"cannot reach gpuflow at {self.base_url}: {exc}") from exc
                except BaseException:
                    await self._drop()  # cancelled or garbled half-way: the connection is unusable
                    raise
                if not head.keep_alive:
                    await self._drop()
                return head.status, _http.result(method, path, head, raw)
        raise AssertionError("unreachable")

    async def _exchange(self, connection: Optional[_Connection], request: bytes, method: str) -> Tuple[_http.Head, bytes]:
        if connection is None:
            connection = await _Connection.open(self._endpoint)
            self._connection = connection
        connection.writer.write(request)
        await connection.writer.drain()
        head = await connection.read_head()
        raw = b"".join([piece async for piece in connection.chunks(_http.BodyDecoder(head, method))])
        return head, raw

    async def _drop(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await connection.close()

    async def _open_feed(self, deadline: Optional[float]) -> "_Feed":
        timeout = self.timeout if deadline is None else max(0.001, min(self.timeout, deadline - time.monotonic()))
        return await asyncio.wait_for(self._subscribe(deadline), timeout)

    async def _subscribe(self, deadline: Optional[float]) -> "_Feed":
        connection = await _Connection.open(self._endpoint)
        try:
            connection.writer.write(
                _http.encode_request(self._endpoint, "GET", "/v1/events", self.token, accept="text/event-stream")
            )
            await connection.writer.drain()
            head = await connection.read_head()
            if head.status != 200:
                raw = b"".join([piece async for piece in connection.chunks(_http.BodyDecoder(head, "GET"))])
                raise _http.error_from(head, raw)
            feed = _Feed(connection, _http.BodyDecoder(head, "GET"))
            async for event in feed.events(deadline):
                if event.event == "hello":
                    return feed
            raise ConnectionResetError("the live feed ended before it said hello")
        except BaseException:
            await connection.close()
            raise


class _Feed:
    """The live feed (server-sent events) on its own connection."""

    def __init__(self, connection: _Connection, decoder: _http.BodyDecoder) -> None:
        self._connection = connection
        self._decoder = decoder
        self._parser = _http.SseParser()
        self._pending: List[_http.Event] = []

    async def close(self) -> None:
        await self._connection.close()

    async def events(self, deadline: Optional[float]) -> AsyncIterator[_http.Event]:
        """Events until the feed ends; asyncio.TimeoutError at the deadline or after 45 s of
        silence (the engine's keep-alives stopped: a dead connection)."""
        while True:
            while self._pending:
                yield self._pending.pop(0)
            if self._decoder.done:
                return
            wait = _FEED_SILENCE_S if deadline is None else min(_FEED_SILENCE_S, deadline - time.monotonic())
            if wait <= 0:
                raise asyncio.TimeoutError()
            data = await asyncio.wait_for(self._connection.reader.read(65536), wait)
            if not data:
                self._decoder.end_of_stream()
                return
            self._pending.extend(self._parser.feed(self._decoder.feed(data)))
