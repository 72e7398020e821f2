"""Exceptions raised by `Client` and `AsyncClient`.

Every error from the engine is a `GpuflowError` carrying the engine's stable ``code`` (e.g.
``queue_full``, ``not_found``), the HTTP ``status`` and the engine's ``message``. Catch a
subclass for one kind of failure, or `GpuflowError` for all of them.
"""

from __future__ import annotations

import email.utils
from datetime import datetime, timezone
from typing import Dict, Optional, Type


class GpuflowError(Exception):
    """The engine refused a request, or could not be reached.

    Attributes: ``status`` (the HTTP status; None when no answer came), ``code`` and
    ``message`` (from the engine's ``{"error": {"code", "message"}}`` body; ``http_<status>``
    and the body's text when another server answered, e.g. a proxy), and ``retry_after``
    (seconds from the ``Retry-After`` header, as sent with 429, 503 and 507; None when absent).
    """

    def __init__(self, status: Optional[int], code: str, message: str, retry_after: Optional[float] = None) -> None:
        detail = f"HTTP {status} {code}: {message}" if status is not None else f"{code}: {message}"
        if retry_after is not None:
            detail += f" (retry after {retry_after:g}s)"
        super().__init__(detail)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class BadRequestError(GpuflowError):
    """400: the request or its input is invalid (``invalid_request``, ``invalid_input``,
    ``unknown_pipeline``, ``unknown_stage``, ``command_too_long``)."""


class UnauthorizedError(GpuflowError):
    """401: missing or wrong bearer token (pass ``token=`` or set ``$GPUFLOW_TOKEN``)."""


class NotFoundError(GpuflowError):
    """404: no such job, stage or attempt."""


class ConflictError(GpuflowError):
    """409: the job already finished, the idempotency key was used for another job, a reload
    was refused, or the engine is not clustered."""


class PayloadTooLargeError(GpuflowError):
    """413: the body is over ``limits.max_request_body``; send large inputs as file paths."""


class QueueFullError(GpuflowError):
    """429: the pipeline's queue is full; retry after ``retry_after`` seconds."""


class UnavailableError(GpuflowError):
    """503: the engine is shutting down or its store is unreachable; retry later."""


class StorageFullError(GpuflowError):
    """507: the engine's store cannot be written (full disk); retry after ``retry_after``."""


class ServerError(GpuflowError):
    """Another 5xx: the engine (or a proxy in front of it) failed."""


class EngineUnreachableError(UnavailableError, ConnectionError):
    """No answer: the engine is not listening at the address, or the connection dropped.

    Also a `ConnectionError`, as the client raised before these classes existed.
    """

    def __init__(self, message: str) -> None:
        UnavailableError.__init__(self, None, "unreachable", message)


ApiError = GpuflowError
"""The former name of `GpuflowError`, kept so existing ``except gpuflow.ApiError`` still works."""

_BY_STATUS: Dict[int, Type[GpuflowError]] = {
    400: BadRequestError,
    401: UnauthorizedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    429: QueueFullError,
    503: UnavailableError,
    507: StorageFullError,
}


def error_for(status: int, code: str, message: str, retry_after: Optional[float] = None) -> GpuflowError:
    """The exception class for an HTTP status, built from the engine's error fields."""
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else GpuflowError
    return cls(status, code, message, retry_after)


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds from a ``Retry-After`` header: a number, or an HTTP date."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
