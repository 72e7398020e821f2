"""The API calls as data (method, path, body, how to read the answer), shared by `Client` and
`AsyncClient` so the two cannot drift apart."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Generic, Iterable, List, Mapping, Optional, TypeVar

from ._http import query, segment
from .errors import GpuflowError
from .models import BatchEntry, Cancelled, Diagnosis, Health, Job, JobPage, LogTail, Submitted

T = TypeVar("T")

MAX_BATCH = 1000
"""The most jobs `submit_batch` may send in one call (the engine's limit)."""

LOG_STREAMS = ("stdout", "stderr")


@dataclass(frozen=True)
class Op(Generic[T]):
    method: str
    path: str
    body: Any
    read: Callable[[int, Any], T]


def _id(value: str, what: str = "id") -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what}: {value!r} is not a job id; pass the `id` of a submitted job")
    return segment(value)


def submit(pipeline: str, input: Optional[Mapping[str, Any]], priority: int, idempotency_key: Optional[str]) -> Op[Submitted]:
    body: Dict[str, Any] = {"pipeline": pipeline, "input": {} if input is None else dict(input), "priority": priority}
    if idempotency_key is not None:
        body["idempotency_key"] = idempotency_key
    return Op("POST", "/v1/jobs", body, lambda status, data: Submitted.from_json(data, created=status == 201))


def submit_batch(jobs: Iterable[Mapping[str, Any]]) -> Op[List[BatchEntry]]:
    items = [dict(job) for job in jobs]
    if not 1 <= len(items) <= MAX_BATCH:
        raise ValueError(f"jobs: {len(items)} jobs in one batch; send 1 to {MAX_BATCH} per call")
    return Op("POST", "/v1/jobs/batch", {"jobs": items}, lambda _, data: [BatchEntry.from_json(e) for e in _list(data, "jobs")])


def submit_workflow(video_path: str, chain: Iterable[str], priority: int, idempotency_key: Optional[str]) -> Op[Submitted]:
    body: Dict[str, Any] = {
        "video_path": video_path,
        "workflow_config": {"workflow_chain": list(chain)},
        "priority": priority,
    }
    if idempotency_key is not None:
        body["idempotency_key"] = idempotency_key
    return Op("POST", "/v1/workflows", body, lambda status, data: Submitted.from_json(data, created=status == 201))


def job(id: str) -> Op[Job]:
    return Op("GET", f"/v1/jobs/{_id(id)}", None, lambda _, data: Job.from_json(data))


def jobs(state: Optional[str], pipeline: Optional[str], limit: Optional[int], cursor: Optional[str]) -> Op[JobPage]:
    q = query({"state": state, "pipeline": pipeline, "limit": limit, "cursor": cursor})
    return Op("GET", f"/v1/jobs{q}", None, lambda _, data: JobPage.from_json(data))


def cancel(id: str) -> Op[Cancelled]:
    return Op("POST", f"/v1/jobs/{_id(id)}/cancel", None, lambda _, data: Cancelled.from_json(data))


def logs(id: str, stage: str, attempt: Optional[int], stream: str, tail_bytes: Optional[int]) -> Op[LogTail]:
    if stream not in LOG_STREAMS:
        raise ValueError(f"stream: {stream!r} is not a log stream; use 'stdout' or 'stderr'")
    q = query({"stream": stream, "attempt": attempt, "tail_bytes": tail_bytes})
    path = f"/v1/jobs/{_id(id)}/stages/{segment(stage)}/log{q}"
    return Op("GET", path, None, lambda _, data: LogTail.from_json(data))


def doctor() -> Op[Diagnosis]:
    return Op("GET", "/v1/diagnosis", None, lambda _, data: Diagnosis.from_json(data))


def resources() -> Op[Dict[str, Any]]:
    return Op("GET", "/v1/resources", None, lambda _, data: dict(_field(data, None)))


def health() -> Op[Health]:
    return Op("GET", "/healthz", None, lambda _, data: Health.from_json(data))


def _field(data: Any, name: Optional[str]) -> Any:
    if not isinstance(data, dict) or (name is not None and name not in data):
        want = f"an object with `{name}`" if name else "an object"
        raise GpuflowError(None, "invalid_response", f"expected {want}, got {str(data)[:200]}")
    return data if name is None else data[name]


def _list(data: Any, name: str) -> List[Any]:
    value = _field(data, name)
    if not isinstance(value, list):
        raise GpuflowError(None, "invalid_response", f"expected `{name}` to be a list, got {str(value)[:200]}")
    return value
