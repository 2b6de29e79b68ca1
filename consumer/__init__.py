"""The jobstream worker: run typed handlers for jobs from Kafka, NATS JetStream or memory.

```python
app = App("mail")

@app.handler(SendWelcomeEmail)
async def send_welcome(job: SendWelcomeEmail, ctx: JobContext) -> None: ...
```

`jobstream worker mymodule:app` runs it; `consumer.memory.TestApp` runs it in a test.
docs/worker.md explains the guarantees, docs/architecture.md the packages:
`core` (shared, broker-free), `stores`, `telemetry`, `steps`, `runtime` (the worker) and
one package per backend (`kafka`, `nats`, `memory`), chosen by `backend_for`.
"""

from consumer._backends import Backend, backend_for
from consumer._run import open_worker, run_worker
from consumer.core import (
    App,
    CronSchedule,
    DeadLetter,
    JobContext,
    JobTimeout,
    Retry,
    Settings,
    WorkerError,
)
from consumer.runtime import Worker
from consumer.stores import ClaimState, IdempotencyStore, MemoryIdempotencyStore

__all__ = [
    "App",
    "Backend",
    "ClaimState",
    "CronSchedule",
    "DeadLetter",
    "IdempotencyStore",
    "JobContext",
    "JobTimeout",
    "MemoryIdempotencyStore",
    "Retry",
    "Settings",
    "Worker",
    "WorkerError",
    "backend_for",
    "open_worker",
    "run_worker",
]
