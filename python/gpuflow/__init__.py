"""gpuflow: worker SDK and HTTP client for the gpuflow workflow engine.

- `Worker`, `Task`, `serve`, `PermanentError`: write a long-lived model worker that speaks
  the worker protocol (docs/worker-protocol.md).
- `Client`, `ApiError`: submit jobs and follow them over the engine's HTTP API.
"""

from .client import ApiError, Client
from .worker import PROTOCOL_VERSION, PermanentError, Task, Worker, serve

__version__ = "0.1.0"

__all__ = [
    "ApiError",
    "Client",
    "PROTOCOL_VERSION",
    "PermanentError",
    "Task",
    "Worker",
    "serve",
]
