"""HTTP client for the gpuflow engine's API (standard library only)."""

from __future__ import annotations

import email.utils
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from typing import Any, Dict, Iterable, List, Mapping, Optional

DEFAULT_SERVER = "http://127.0.0.1:7070"

MAX_BATCH = 1000
"""The most jobs `Client.submit_batch` may send in one call (the engine's limit)."""

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


class ApiError(Exception):
    """The engine answered with an error status.

    Attributes: ``status`` (HTTP status), ``code`` and ``message`` (from the engine's
    ``{"error": {"code", "message"}}`` body), and ``retry_after`` (seconds from the
    ``Retry-After`` header, as sent with 429; None when absent).
    """

    def __init__(self, status: int, code: str, message: str, retry_after: Optional[float] = None) -> None:
        detail = f"HTTP {status} {code}: {message}"
        if retry_after is not None:
            detail += f" (retry after {retry_after:g}s)"
        super().__init__(detail)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


def _parse_retry_after(value: Optional[str]) -> Optional[float]:
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:  # the other form HTTP allows: a date
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class Client:
    """Talks to a gpuflow engine.

    `base_url` defaults to ``$GPUFLOW_SERVER``, then ``http://127.0.0.1:7070``; `token` to
    ``$GPUFLOW_TOKEN`` (sent as ``Authorization: Bearer``), like the CLI. `timeout` bounds
    each HTTP request, in seconds.

    Methods raise `ApiError` for an error answer and `ConnectionError` when the engine
    cannot be reached.
    """

    def __init__(self, base_url: Optional[str] = None, token: Optional[str] = None, timeout: float = 30.0) -> None:
        self.base_url = (base_url or os.environ.get("GPUFLOW_SERVER") or DEFAULT_SERVER).rstrip("/")
        self.token = token if token is not None else (os.environ.get("GPUFLOW_TOKEN") or None)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"Client(base_url={self.base_url!r})"

    def submit(
        self,
        pipeline: str,
        input: Optional[Dict[str, Any]] = None,
        priority: int = 0,
        idempotency_key: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Submit a job; returns ``{"id", "state"}``.

        A repeated `idempotency_key` returns the job accepted earlier under it.
        """
        body: Dict[str, Any] = {
            "pipeline": pipeline,
            "input": {} if input is None else input,
            "priority": priority,
        }
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        return self._request("POST", "/v1/jobs", body)

    def submit_batch(self, jobs: Iterable[Mapping[str, Any]]) -> List[Dict[str, Any]]:
        """Submit 1 to `MAX_BATCH` (1,000) jobs in one request; returns one entry per job, in order.

        Each job is a mapping shaped like `submit`'s arguments:
        ``{"pipeline": ..., "input": {...}, "priority": 0, "idempotency_key": ...}``
        (only ``pipeline`` is required). The engine checks each job on its own, so one bad
        job does not sink the others. Each entry is either

        - ``{"id", "state", "created"}`` for an accepted job (``created`` is False when an
          earlier job with the same idempotency key is returned), or
        - ``{"error": {"code", "message", "status"}}`` for a refused one, with the code and
          HTTP status `submit` would have raised for it alone (e.g. ``queue_full`` / 429,
          ``invalid_input`` / 400), so the caller can retry 429 and 503 entries.

        Raises `ApiError` when the request as a whole is refused: 400 for zero or more than
        1,000 jobs, 413 for a body over the batch limit, 503 while the engine is shutting
        down or its store is unreachable (then no job was admitted).
        """
        body = {"jobs": [dict(job) for job in jobs]}
        return self._request("POST", "/v1/jobs/batch", body)["jobs"]

    def job(self, id: str) -> Dict[str, Any]:
        """The job: state, stages (with attempts, errors and outputs) and output."""
        return self._request("GET", f"/v1/jobs/{_segment(id)}")

    def jobs(
        self,
        state: Optional[str] = None,
        pipeline: Optional[str] = None,
        limit: Optional[int] = None,
        cursor: Optional[str] = None,
    ) -> Dict[str, Any]:
        """One page of jobs, newest first; pass the returned cursor to get the next page."""
        query = {k: v for k, v in (("state", state), ("pipeline", pipeline), ("limit", limit), ("cursor", cursor)) if v is not None}
        path = "/v1/jobs" + ("?" + urllib.parse.urlencode(query) if query else "")
        return self._request("GET", path)

    def cancel(self, id: str) -> Any:
        """Cancel a job: running stages are stopped, the rest cancelled."""
        return self._request("POST", f"/v1/jobs/{_segment(id)}/cancel")

    def wait(self, id: str, timeout: Optional[float] = None, poll: float = 0.25) -> Dict[str, Any]:
        """Poll the job until it is succeeded, failed or cancelled, and return it.

        Raises TimeoutError when `timeout` seconds pass first.
        """
        if poll <= 0:
            raise ValueError(f"poll must be positive, got {poll!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(id)
            state = job.get("state")
            if state in TERMINAL_STATES:
                return job
            delay = poll
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"job {id} is still {state} after {timeout:g}s")
                delay = min(poll, remaining)
            time.sleep(delay)

    def resources(self) -> Dict[str, Any]:
        """Capacity, the leases held and the waiting queue."""
        return self._request("GET", "/v1/resources")

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                status = response.status
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise _api_error(exc) from None
        except urllib.error.URLError as exc:
            raise ConnectionError(f"cannot reach gpuflow at {self.base_url}: {exc.reason}") from exc
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ApiError(status, "invalid_response", f"{method} {path} answered with non-JSON: {raw[:200]!r}") from exc


def _segment(value: str) -> str:
    return urllib.parse.quote(str(value), safe="")


def _api_error(exc: urllib.error.HTTPError) -> ApiError:
    try:
        raw = exc.read()
    except OSError:
        raw = b""
    code = f"http_{exc.code}"
    message = str(exc.reason or "")
    try:
        error = json.loads(raw)["error"]
        code = str(error.get("code") or code)
        message = str(error.get("message") or message)
    except (ValueError, KeyError, TypeError, AttributeError):
        # Not the engine's error shape (a proxy in between, say): keep what it said.
        text = raw.decode("utf-8", "replace").strip()
        if text:
            message = text[:500]
    retry_after = _parse_retry_after(exc.headers.get("Retry-After") if exc.headers else None)
    return ApiError(exc.code, code, message, retry_after)
