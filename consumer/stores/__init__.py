"""Where the worker remembers things between deliveries: idempotency claims (memory,
Redis, PostgreSQL; the NATS KV store is the NATS backend's) and job status with
cancellation requests and the ingress's `Idempotency-Key` bindings (memory, Redis). No
broker client is imported here."""

from consumer.stores._idempotency import (
    HOLD_LEASES,
    ClaimState,
    IdempotencyStore,
    MemoryIdempotencyStore,
)
from consumer.stores._keys import KeyBinding, KeyReservation, KeyState
from consumer.stores._open import open_status, open_status_store, open_store, store_refused
from consumer.stores._status import (
    FINAL_STATES,
    WAITING_STATES,
    Attempt,
    JobState,
    JobStatus,
    MemoryStatusStore,
    StatusStore,
    cancel_job,
    trace_id_now,
)
from consumer.stores._status_query import JobPage, JobQuery, PartitionBacklog, WorkerReport
from consumer.stores._status_redis import STORE_OUTAGES

__all__ = [
    "FINAL_STATES",
    "HOLD_LEASES",
    "STORE_OUTAGES",
    "WAITING_STATES",
    "Attempt",
    "ClaimState",
    "IdempotencyStore",
    "JobPage",
    "JobQuery",
    "JobState",
    "JobStatus",
    "KeyBinding",
    "KeyReservation",
    "KeyState",
    "MemoryIdempotencyStore",
    "MemoryStatusStore",
    "PartitionBacklog",
    "StatusStore",
    "WorkerReport",
    "cancel_job",
    "open_status",
    "open_status_store",
    "open_store",
    "store_refused",
    "trace_id_now",
]
