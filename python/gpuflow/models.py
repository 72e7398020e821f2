"""Typed views of the engine's answers (the shapes in ``/openapi.json``).

Each is a frozen dataclass built by ``from_json``. Fields the engine adds later are kept in
``raw`` (the answer as received), so an older SDK still sees them. For code written against
the dict-returning client, ``obj["field"]`` and ``obj.get("field")`` still read a field.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional

from .errors import GpuflowError, error_for

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
"""Job states that do not change any more."""


class _Record:
    """Dict-style reads (``job["id"]``, ``job.get("output")``) for code written when the client
    returned dicts. Prefer attributes: they are typed."""

    raw: Dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        if key in {f.name for f in fields(self)} - {"raw"}:  # type: ignore[arg-type]
            return getattr(self, key)
        return self.raw[key]

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.raw


def _obj(data: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise GpuflowError(None, "invalid_response", f"expected {what} as a JSON object, got {type(data).__name__}")
    return data


def _opt_str(value: Any) -> Optional[str]:
    return None if value is None else str(value)


def _opt_int(value: Any) -> Optional[int]:
    return None if value is None else int(value)


@dataclass(frozen=True)
class Progress(_Record):
    """A running attempt's latest progress report."""

    fraction: Optional[float]
    message: Optional[str]
    at: str
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> "Progress":
        d = _obj(data, "progress")
        fraction = d.get("fraction")
        return cls(
            fraction=None if fraction is None else float(fraction),
            message=_opt_str(d.get("message")),
            at=str(d.get("at", "")),
            raw=dict(d),
        )


@dataclass(frozen=True)
class Attempt(_Record):
    """One attempt of a stage: how it ended and what it held."""

    attempt: int
    state: str
    started_at: str
    finished_at: Optional[str]
    exit_code: Optional[int]
    signal: Optional[int]
    error: Optional[str]
    lease: Any
    batch_size: Optional[int]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> "Attempt":
        d = _obj(data, "attempt")
        return cls(
            attempt=int(d["attempt"]),
            state=str(d["state"]),
            started_at=str(d.get("started_at", "")),
            finished_at=_opt_str(d.get("finished_at")),
            exit_code=_opt_int(d.get("exit_code")),
            signal=_opt_int(d.get("signal")),
            error=_opt_str(d.get("error")),
            lease=d.get("lease"),
            batch_size=_opt_int(d.get("batch_size")),
            raw=dict(d),
        )


@dataclass(frozen=True)
class Stage(_Record):
    """A stage of a job. ``state``: pending, queued, backoff, running, succeeded, failed, cancelled."""

    name: str
    state: str
    after: List[str]
    attempts: int
    failures: int
    retry_at: Optional[str]
    started_at: Optional[str]
    finished_at: Optional[str]
    exit_code: Optional[int]
    error: Optional[str]
    output: Any
    progress: Optional[Progress]
    attempt_history: List[Attempt]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> "Stage":
        d = _obj(data, "stage")
        progress = d.get("progress")
        return cls(
            name=str(d["name"]),
            state=str(d["state"]),
            after=[str(a) for a in d.get("after") or []],
            attempts=int(d.get("attempts") or 0),
            failures=int(d.get("failures") or 0),
            retry_at=_opt_str(d.get("retry_at")),
            started_at=_opt_str(d.get("started_at")),
            finished_at=_opt_str(d.get("finished_at")),
            exit_code=_opt_int(d.get("exit_code")),
            error=_opt_str(d.get("error")),
            output=d.get("output"),
            progress=None if progress is None else Progress.from_json(progress),
            attempt_history=[Attempt.from_json(a) for a in d.get("attempt_history") or []],
            raw=dict(d),
        )


@dataclass(frozen=True)
class Job(_Record):
    """A job, its stages and their attempts (``GET /v1/jobs/{id}``)."""

    id: str
    pipeline: str
    state: str
    priority: int
    input: Any
    output: Any
    error: Optional[str]
    idempotency_key: Optional[str]
    created_at: str
    started_at: Optional[str]
    finished_at: Optional[str]
    stages: List[Stage]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def done(self) -> bool:
        """True once the job succeeded, failed or was cancelled."""
        return self.state in TERMINAL_STATES

    def stage(self, name: str) -> Stage:
        """The stage called `name`; KeyError naming the stages there are otherwise."""
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"job {self.id} has no stage {name!r}; its stages: {', '.join(s.name for s in self.stages)}")

    @classmethod
    def from_json(cls, data: Any) -> "Job":
        d = _obj(data, "job")
        return cls(
            id=str(d["id"]),
            pipeline=str(d.get("pipeline", "")),
            state=str(d["state"]),
            priority=int(d.get("priority") or 0),
            input=d.get("input"),
            output=d.get("output"),
            error=_opt_str(d.get("error")),
            idempotency_key=_opt_str(d.get("idempotency_key")),
            created_at=str(d.get("created_at", "")),
            started_at=_opt_str(d.get("started_at")),
            finished_at=_opt_str(d.get("finished_at")),
            stages=[Stage.from_json(s) for s in d.get("stages") or []],
            raw=dict(d),
        )


@dataclass(frozen=True)
class Submitted(_Record):
    """An accepted submission. ``created`` is False when an earlier job with the same
    idempotency key was returned instead of a new one."""

    id: str
    state: str
    created: bool
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any, created: bool) -> "Submitted":
        d = _obj(data, "submission")
        return cls(id=str(d["id"]), state=str(d["state"]), created=bool(d.get("created", created)), raw=dict(d))


@dataclass(frozen=True)
class BatchError(_Record):
    """Why one job of a batch was refused: what ``submit`` would have raised for it alone."""

    code: str
    message: str
    status: int
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def exception(self) -> GpuflowError:
        """The exception ``submit`` would have raised (e.g. `QueueFullError` for 429)."""
        return error_for(self.status, self.code, self.message)


@dataclass(frozen=True)
class BatchEntry(_Record):
    """One job of a batch: accepted (``id``, ``state``, ``created``) or refused (``error``)."""

    id: Optional[str]
    state: Optional[str]
    created: bool
    error: Optional[BatchError]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def accepted(self) -> bool:
        return self.error is None

    @classmethod
    def from_json(cls, data: Any) -> "BatchEntry":
        d = _obj(data, "batch entry")
        error = d.get("error")
        if error is not None:
            e = _obj(error, "batch error")
            refused = BatchError(code=str(e["code"]), message=str(e["message"]), status=int(e["status"]), raw=dict(e))
            return cls(id=None, state=None, created=False, error=refused, raw=dict(d))
        return cls(id=str(d["id"]), state=str(d["state"]), created=bool(d.get("created")), error=None, raw=dict(d))


@dataclass(frozen=True)
class JobSummary(_Record):
    """A job in a list (``GET /v1/jobs``)."""

    id: str
    pipeline: str
    state: str
    priority: int
    created_at: str
    finished_at: Optional[str]
    error: Optional[str]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> "JobSummary":
        d = _obj(data, "job summary")
        return cls(
            id=str(d["id"]),
            pipeline=str(d.get("pipeline", "")),
            state=str(d["state"]),
            priority=int(d.get("priority") or 0),
            created_at=str(d.get("created_at", "")),
            finished_at=_opt_str(d.get("finished_at")),
            error=_opt_str(d.get("error")),
            raw=dict(d),
        )


@dataclass(frozen=True)
class JobPage(_Record):
    """One page of jobs, newest first; pass ``next_cursor`` as ``cursor`` for the next page
    (None on the last page)."""

    jobs: List[JobSummary]
    next_cursor: Optional[str]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> "JobPage":
        d = _obj(data, "job list")
        return cls(
            jobs=[JobSummary.from_json(j) for j in d.get("jobs") or []],
            next_cursor=_opt_str(d.get("next_cursor")),
            raw=dict(d),
        )


@dataclass(frozen=True)
class Evidence(_Record):
    label: str
    value: str
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Finding(_Record):
    """A problem the engine's diagnosis found: what, the evidence, the likely cause and the fix."""

    id: int
    kind: str
    subject: str
    summary: str
    evidence: List[Evidence]
    cause: str
    fix: str
    opened_at: str
    closed_at: Optional[str]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> "Finding":
        d = _obj(data, "finding")
        evidence = [_obj(e, "evidence") for e in d.get("evidence") or []]
        return cls(
            id=int(d["id"]),
            kind=str(d["kind"]),
            subject=str(d.get("subject", "")),
            summary=str(d.get("summary", "")),
            evidence=[Evidence(label=str(e.get("label", "")), value=str(e.get("value", "")), raw=dict(e)) for e in evidence],
            cause=str(d.get("cause", "")),
            fix=str(d.get("fix", "")),
            opened_at=str(d.get("opened_at", "")),
            closed_at=_opt_str(d.get("closed_at")),
            raw=dict(d),
        )


@dataclass(frozen=True)
class Diagnosis(_Record):
    """What is wrong now (``gpuflow doctor``): open findings, recently closed ones, and the
    GPU readings (``gpus``, as the engine sends them)."""

    checked_at: str
    open: List[Finding]
    recent: List[Finding]
    gpus: List[Dict[str, Any]]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> "Diagnosis":
        d = _obj(data, "diagnosis")
        return cls(
            checked_at=str(d.get("checked_at", "")),
            open=[Finding.from_json(f) for f in d.get("open") or []],
            recent=[Finding.from_json(f) for f in d.get("recent") or []],
            gpus=[dict(_obj(g, "gpu reading")) for g in d.get("gpus") or []],
            raw=dict(d),
        )


@dataclass(frozen=True)
class LogTail(_Record):
    """The end of a stage attempt's stdout or stderr. ``truncated`` when the log is longer than
    what came back; ``note`` says why there is no text (not started, a worker stage, nothing
    written)."""

    job: str
    stage: str
    attempt: int
    stream: str
    size_bytes: int
    truncated: bool
    text: str
    note: Optional[str]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> "LogTail":
        d = _obj(data, "log")
        return cls(
            job=str(d["job"]),
            stage=str(d["stage"]),
            attempt=int(d.get("attempt") or 0),
            stream=str(d.get("stream", "")),
            size_bytes=int(d.get("size_bytes") or 0),
            truncated=bool(d.get("truncated")),
            text=str(d.get("text", "")),
            note=_opt_str(d.get("note")),
            raw=dict(d),
        )


@dataclass(frozen=True)
class Health(_Record):
    """``GET /healthz``: ``status`` is starting, ok or degraded (with ``reason``)."""

    status: str
    version: str
    reason: Optional[str]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> "Health":
        d = _obj(data, "health")
        return cls(status=str(d["status"]), version=str(d.get("version", "")), reason=_opt_str(d.get("reason")), raw=dict(d))


@dataclass(frozen=True)
class Cancelled(_Record):
    """The answer to a cancel: ``state`` is ``cancelling`` while running stages are being
    stopped, ``cancelled`` once none runs."""

    id: str
    state: str
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> "Cancelled":
        d = _obj(data, "cancel answer")
        return cls(id=str(d["id"]), state=str(d["state"]), raw=dict(d))
