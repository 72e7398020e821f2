"""A small HTTP/1.1 client core without IO: request bytes, response-head parsing, body
decoding (Content-Length, chunked, until close) and server-sent events. The blocking and
the asyncio clients drive it over their own sockets, so both speak HTTP the same way."""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .errors import GpuflowError, error_for, parse_retry_after

MAX_HEAD_BYTES = 64 * 1024
USER_AGENT = "gpuflow-python"


@dataclass(frozen=True)
class Endpoint:
    """Where the engine listens, from a base URL such as ``http://127.0.0.1:7070/prefix``."""

    scheme: str
    host: str
    port: int
    prefix: str

    @classmethod
    def parse(cls, base_url: str) -> "Endpoint":
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(
                f"base_url: {base_url!r} is not an http:// or https:// URL; pass e.g. 'http://127.0.0.1:7070'"
            )
        try:
            port = url.port or (443 if url.scheme == "https" else 80)
        except ValueError as exc:
            raise ValueError(f"base_url: {base_url!r} has an invalid port ({exc})") from None
        return cls(url.scheme, url.hostname, port, url.path.rstrip("/"))

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def encode_request(
    endpoint: Endpoint, method: str, path: str, token: Optional[str], body: Any = None, accept: str = "application/json"
) -> bytes:
    headers = [
        f"{method} {endpoint.prefix}{path} HTTP/1.1",
        f"Host: {endpoint.host_header}",
        f"User-Agent: {USER_AGENT}",
        f"Accept: {accept}",
    ]
    if token:
        headers.append(f"Authorization: Bearer {token}")
    data = b""
    if body is not None:
        data = json.dumps(body).encode("utf-8")
        headers.append("Content-Type: application/json")
    if body is not None or method in ("POST", "PUT", "PATCH"):
        headers.append(f"Content-Length: {len(data)}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + data


@dataclass(frozen=True)
class Head:
    status: int
    reason: str
    headers: Dict[str, str]
    version: str = "HTTP/1.1"

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection


def parse_head(raw: bytes) -> Head:
    """The status line and headers, from the bytes up to (not including) the blank line."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise GpuflowError(None, "invalid_response", f"not an HTTP/1.1 answer: {lines[0][:200]!r}")
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise GpuflowError(None, "invalid_response", f"malformed header line: {line[:200]!r}")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return Head(int(parts[1]), parts[2] if len(parts) > 2 else "", headers, parts[0])


class BodyDecoder:
    """Turns the bytes after the head into the body, whatever the framing. Feed it what the
    socket gives; it returns the body bytes decoded so far and sets ``done`` at the end."""

    def __init__(self, head: Head, method: str) -> None:
        self._buffer = b""
        self.done = False
        self._chunked = "chunked" in head.headers.get("transfer-encoding", "").lower()
        self._remaining: Optional[int] = None  # None: until the connection closes
        self._chunk_left = 0  # in a chunk: its bytes still to come; -1: its CRLF is next
        if method == "HEAD" or head.status in (204, 304) or 100 <= head.status < 200:
            self.done = True
        elif not self._chunked and "content-length" in head.headers:
            try:
                self._remaining = int(head.headers["content-length"])
            except ValueError:
                raise GpuflowError(None, "invalid_response", "bad Content-Length") from None
            self.done = self._remaining == 0
        # Without a length, the body runs until the connection closes.
        self.until_close = not self._chunked and self._remaining is None and not self.done

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return b""
        if not self._chunked:
            if self._remaining is None:
                return data
            take = data[: self._remaining]
            self._remaining -= len(take)
            self.done = self._remaining == 0
            return take
        self._buffer += data
        out: List[bytes] = []
        while not self.done:
            if self._chunk_left > 0:
                take = self._buffer[: self._chunk_left]
                if not take:
                    break
                out.append(take)
                self._buffer = self._buffer[len(take) :]
                self._chunk_left -= len(take)
                if self._chunk_left == 0:
                    self._chunk_left = -1
                continue
            line_end = self._buffer.find(b"\r\n")
            if line_end < 0:
                if len(self._buffer) > MAX_HEAD_BYTES:
                    raise GpuflowError(None, "invalid_response", "chunk header too long")
                break
            line = self._buffer[:line_end]
            self._buffer = self._buffer[line_end + 2 :]
            if self._chunk_left == -1:  # the CRLF that ends a chunk's data
                self._chunk_left = 0
                continue
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise GpuflowError(None, "invalid_response", f"bad chunk size {line[:40]!r}") from None
            if size == 0:
                # Trailers are not used by the engine; the body is complete.
                self.done = True
            else:
                self._chunk_left = size
        return b"".join(out)

    def end_of_stream(self) -> None:
        """The connection closed: fine when the body runs until close, a truncation otherwise."""
        if self.until_close:
            self.done = True
        if not self.done:
            raise ConnectionResetError("the engine closed the connection in the middle of an answer")


def result(method: str, path: str, head: Head, body: bytes) -> Any:
    """The JSON of a success answer, or the `GpuflowError` of an error answer, raised."""
    if head.status >= 400:
        raise error_from(head, body)
    if not body.strip():
        return None
    try:
        return json.loads(body)
    except ValueError:
        raise GpuflowError(
            head.status, "invalid_response", f"{method} {path} answered with non-JSON: {body[:200]!r}"
        ) from None


def error_from(head: Head, body: bytes) -> GpuflowError:
    code = f"http_{head.status}"
    message = head.reason
    try:
        error = json.loads(body)["error"]
        code = str(error.get("code") or code)
        message = str(error.get("message") or message)
    except (ValueError, KeyError, TypeError, AttributeError):
        # Not the engine's error shape (a proxy in between, say): keep what it said.
        text = body.decode("utf-8", "replace").strip()
        if text:
            message = text[:500]
    return error_for(head.status, code, message, parse_retry_after(head.headers.get("retry-after")))


@dataclass(frozen=True)
class Event:
    """One server-sent event: its ``event`` name (``message`` when unnamed), ``data`` and ``id``."""

    event: str
    data: str
    id: Optional[str]

    def json(self) -> Dict[str, Any]:
        try:
            value = json.loads(self.data)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


class SseParser:
    """Splits an event stream (text/event-stream) into events; comments (keep-alives) are dropped."""

    def __init__(self) -> None:
        self._pending = ""
        self._event = ""
        self._data: List[str] = []
        self._id: Optional[str] = None

    def feed(self, data: bytes) -> List[Event]:
        self._pending += data.decode("utf-8", "replace")
        events: List[Event] = []
        while True:
            cut = _line_end(self._pending)
            if cut is None:
                break
            line, self._pending = self._pending[: cut[0]], self._pending[cut[1] :]
            if not line:
                if self._data or self._event:
                    events.append(Event(self._event or "message", "\n".join(self._data), self._id))
                self._event, self._data = "", []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "event":
                self._event = value
            elif name == "data":
                self._data.append(value)
            elif name == "id":
                self._id = value
        return events


def _line_end(text: str) -> Optional[Tuple[int, int]]:
    """Where the first line ends and the next starts (CRLF, LF or CR)."""
    for i, ch in enumerate(text):
        if ch == "\n":
            return i, i + 1
        if ch == "\r":
            if i + 1 == len(text):
                return None  # could be the first half of CRLF
            return i, i + 2 if text[i + 1] == "\n" else i + 1
    return None


def query(params: Mapping[str, Any]) -> str:
    pairs = {k: v for k, v in params.items() if v is not None}
    return "?" + urllib.parse.urlencode(pairs) if pairs else ""


def segment(value: str) -> str:
    return urllib.parse.quote(str(value), safe="")


def job_finished(event: Event, job_id: str) -> bool:
    """Whether an event may mean the job reached its end (or that events were missed)."""
    if event.event == "resync":
        return True
    return event.event == "job_finished" and event.json().get("job") == job_id

