"""gpuflow: worker SDK and HTTP clients for the gpuflow workflow engine.

- `Worker`, `Task`, `serve`, `PermanentError`: write a long-lived model worker that speaks
  the worker protocol (docs/worker-protocol.md). Standard library only.
- `Client` (blocking) and `AsyncClient` (asyncio): submit jobs, follow them on the engine's
  live feed, read logs and the diagnosis. Standard library only; answers are typed
  dataclasses (`Job`, `Stage`, `Attempt`, `Finding`, ...), errors `GpuflowError` subclasses
  carrying the engine's stable error code.
"""

from .aio import AsyncClient
from .client import DEFAULT_SERVER, MAX_BATCH, Client
from .errors import (
    ApiError,
    BadRequestError,
    ConflictError,
    EngineUnreachableError,
    GpuflowError,
    NotFoundError,
    PayloadTooLargeError,
    QueueFullError,
    ServerError,
    StorageFullError,
    UnauthorizedError,
    UnavailableError,
)
from .models import (
    TERMINAL_STATES,
    Attempt,
    BatchEntry,
    BatchError,
    Cancelled,
    Diagnosis,
    Evidence,
    Finding,
    Health,
    Job,
    JobPage,
    JobSummary,
    LogTail,
    Progress,
    Stage,
    Submitted,
)
from .worker import PROTOCOL_VERSION, PermanentError, Task, Worker, serve

__version__ = "0.1.0"

__all__ = [
    "ApiError",
    "AsyncClient",
    "Attempt",
    "BadRequestError",
    "BatchEntry",
    "BatchError",
    "Cancelled",
    "Client",
    "ConflictError",
    "DEFAULT_SERVER",
    "Diagnosis",
    "EngineUnreachableError",
    "Evidence",
    "Finding",
    "GpuflowError",
    "Health",
    "Job",
    "JobPage",
    "JobSummary",
    "LogTail",
    "MAX_BATCH",
    "NotFoundError",
    "PROTOCOL_VERSION",
    "PayloadTooLargeError",
    "PermanentError",
    "Progress",
    "QueueFullError",
    "ServerError",
    "Stage",
    "StorageFullError",
    "Submitted",
    "TERMINAL_STATES",
    "Task",
    "UnauthorizedError",
    "UnavailableError",
    "Worker",
    "serve",
]
