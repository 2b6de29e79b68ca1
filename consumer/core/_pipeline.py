"""How one job is processed: a chain of steps, composed in one visible place.

Order (outermost first): tracing -> metrics -> logging -> idempotency -> status ->
failure routing -> cancellation -> timeout -> transaction -> handler (tracing and metrics
only when telemetry is on, the transaction only for `transactional=True` handlers, right
around the handler so each in-place retry has a transaction of its own; see `_worker.py`,
where the chain is composed). Status
sits outside failure routing so it records `retrying` / `dead_lettered`; cancellation sits
inside it so a cancelled job that raises is not retried. The status and cancellation steps
are present when a status store is configured. Each step is a module of its own and sees
the `JobRun`; it calls the next step and may act on the outcome or on the exception.
Handler exceptions end in the failure step; `asyncio.CancelledError` (a shutdown or revoke
cut-off) passes through every step untouched. A cut-off is recorded on the run
(`JobRun.cut_off`) before the run is cancelled, and a cut-off run is never settled,
whatever its handler returned (`steps/_handler.py`, `runtime/_worker.py`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from consumer.core._app import HandlerSpec, JobContext
from consumer.core._outcome import Outcome
from consumer.core._source import Delivery
from schemas import Job, JobAttributes, JobDecodeError
from schemas.names import FIRST_FAILURE


@dataclass(slots=True)
class JobRun:
    """One attempt at one delivery, as it moves through the steps."""

    delivery: Delivery
    job: Job | None
    spec: HandlerSpec | None
    context: JobContext | None
    decode_error: JobDecodeError | None = None
    started: float = field(default_factory=time.monotonic)
    error: BaseException | None = None
    failure_reason: str | None = None
    """Set by the failure step: the reason code of the last routing decision."""
    cut_off: str | None = None
    """Set by the worker when it cancels the run (drain timeout, revoke): the runtime's own
    record that the run did not finish. Such a run is never settled, whatever the handler
    returned."""
    task: asyncio.Task[None] | None = None
    """The job's task (set by the worker as it starts the run): what a step cancels."""
    handler_running: asyncio.Future[None] | None = None
    """Set by the handler step when it stops waiting for a cancelled handler call (a thread
    or pool process runs on, abandoned): done when that call really ends. The idempotency
    step keeps the job's claim until then, so no other delivery runs the job meanwhile."""
    claim: tuple[str, str] | None = None
    """Set by the idempotency step while it holds the job's claim: (key, fencing token)."""
    completed_in_transaction: bool = False
    """Set by the transaction step once the handler's transaction committed with the job's
    completion record: the idempotency step then writes no second one."""

    @property
    def attributes(self) -> JobAttributes | None:
        return self.delivery.attributes

    def next_attempt(self, first_failure: str) -> None:
        """Make this run the job's next attempt (an in-place retry): one attempt later, a
        fresh deadline, no error yet, and `jobfirstfail` set to `first_failure` (so the
        retry budget counts from the first failure, as it does through a tier). Mutated in
        place, so every step sees the same run."""
        assert self.attributes is not None
        assert self.context is not None
        attributes = self.attributes.replace(attempt=self.attributes.attempt + 1)
        attributes = attributes.with_extensions(**{FIRST_FAILURE: first_failure})
        timeout = self.context.deadline - self.started
        self.context = self.context.next_attempt(attributes, time.monotonic() + timeout)
        self.delivery = dataclasses.replace(self.delivery, attributes=attributes)
        self.error = None
        self.failure_reason = None


Next = Callable[[JobRun], Awaitable[Outcome]]
Step = Callable[[JobRun, Next], Awaitable[Outcome]]


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a failed job goes next (`core._failures.decide`)."""

    retry: bool
    delay_s: float
    reason: str


class FailureRouter(Protocol):
    """Hands a failed job on: to a retry destination or the dead-letter destination (each
    backend has one), or records the failure (`steps.RecordFailures`)."""

    async def route(self, run: JobRun, error: Exception, decision: Decision) -> Outcome:
        """Hand the failed job on (broker-acknowledged) and say how it was settled."""
        ...


def compose(steps: Sequence[Step], terminal: Next) -> Next:
    """Chain `steps` around `terminal`, the first step outermost."""
    chain = terminal
    for step in reversed(steps):
        chain = _bind(step, chain)
    return chain


def _bind(step: Step, following: Next) -> Next:
    # A plain function that returns the step's coroutine: no coroutine frame of its own
    # per step and job (the chain is on every job's path).
    def call(run: JobRun) -> Awaitable[Outcome]:
        return step(run, following)

    return call
