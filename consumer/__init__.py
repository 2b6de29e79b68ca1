"""The jobstream worker: run typed handlers for jobs from Kafka or NATS JetStream.

```python
app = App("mail")

@app.handler(SendWelcomeEmail)
async def send_welcome(job: SendWelcomeEmail, ctx: JobContext) -> None: ...
```

`jobstream worker mymodule:app` runs it. docs/worker.md explains the guarantees.
"""

from consumer._app import App, JobContext
from consumer._errors import DeadLetter, JobTimeout, Retry, WorkerError
from consumer._idempotency import ClaimState, IdempotencyStore, MemoryIdempotencyStore
from consumer._run import open_worker, run_worker
from consumer._settings import Settings
from consumer._worker import Worker

__all__ = [
    "App",
    "ClaimState",
    "DeadLetter",
    "IdempotencyStore",
    "JobContext",
    "JobTimeout",
    "MemoryIdempotencyStore",
    "Retry",
    "Settings",
    "Worker",
    "WorkerError",
    "open_worker",
    "run_worker",
]
