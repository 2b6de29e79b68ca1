"""The steps of a job run, one module each, composed by the worker in this order
(outermost first): tracing -> metrics (`consumer.telemetry`) -> logging -> idempotency ->
status -> failure routing -> cancellation -> timeout -> transaction (transactional handlers only)
-> handler. See `core/_pipeline.py`."""

from consumer.steps._cancel import CancellationStep
from consumer.steps._failure import FailureStep, RecordFailures
from consumer.steps._handler import AbandonedRun, HandlerStep
from consumer.steps._idempotency import IdempotencyStep
from consumer.steps._logging import logging_step
from consumer.steps._status import StatusStep
from consumer.steps._timeout import TimeoutStep
from consumer.steps._transaction import TransactionalStore, TransactionStep

__all__ = [
    "AbandonedRun",
    "CancellationStep",
    "FailureStep",
    "HandlerStep",
    "IdempotencyStep",
    "RecordFailures",
    "StatusStep",
    "TimeoutStep",
    "TransactionStep",
    "TransactionalStore",
    "logging_step",
]
