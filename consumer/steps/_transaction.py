"""Step: a transactional handler's run, in a PostgreSQL transaction that commits together
with the job's completion record (docs/outbox.md, "Transactional completion").

Innermost (right around the handler), so each attempt of an in-place retry has a
transaction of its own. For a handler registered with `transactional=True`:

- `BEGIN` on a connection of the idempotency store's pool; the handler writes through
  `ctx.transaction`.
- A handler that raised: `ROLLBACK`, and its exception goes on to the failure step.
- A run the runtime cancelled (cut off, timed out, a lost lease) is rolled back whatever
  the handler returned: `JobRun.cut_off` set, or a cancellation pending on the job's task
  (the handler swallowed it), means `ROLLBACK`, then `CancelledError`.
- Otherwise the completion is written in the same transaction, fenced by the delivery's
  claim (`UPDATE ... WHERE key AND owner = token AND state = 'running'`). No row matched
  (the claim was taken over): `ROLLBACK`, and the run is cut off, never settled.
- `COMMIT`. Only a commit that succeeded marks the run completed in its transaction
  (`JobRun.completed_in_transaction`), so the offset or ack may proceed. A commit that
  failed without an answer (connection lost) is `CommitUnknown`: a retriable failure,
  never reported as done; a commit the runtime cancelled ends the run with
  `CancelledError` (unsettled, or a timeout). Either way the next delivery's claim finds
  the completion (skipped) or none (it runs): the completion row decides.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, runtime_checkable

from consumer.core import CommitUnknown, JobRun, Next, Outcome

log = logging.getLogger("jobstream.transaction")

LOST_CLAIM = "loss of its claim (the transactional completion matched no claim)"


@runtime_checkable
class TransactionalStore(Protocol):
    """An idempotency store that can write a completion inside a handler's transaction
    (the PostgreSQL store)."""

    def transaction(self) -> AbstractAsyncContextManager[Any]: ...

    async def complete_in(self, conn: Any, key: str, token: str, retention_s: float) -> bool: ...


class _RollBack(Exception):
    """Leave the transaction block with a ROLLBACK, then act on `why`."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class TransactionStep:
    def __init__(self, store: TransactionalStore, retention_s: float) -> None:
        self._store = store
        self._retention_s = retention_s

    async def __call__(self, run: JobRun, call_next: Next) -> Outcome:
        spec, context, claim = run.spec, run.context, run.claim
        if spec is None or not spec.transactional or context is None or claim is None:
            return await call_next(run)
        key, token = claim
        task = run.task or asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        committing = False
        async with self._store.transaction() as conn:
            try:
                async with conn.transaction():
                    context.use_transaction(conn)
                    try:
                        outcome = await call_next(run)
                    finally:
                        context.use_transaction(None)
                    if run.cut_off is not None or task.cancelling() > cancelling:
                        raise _RollBack("cancelled")
                    if outcome is not Outcome.COMPLETED:  # only a completion commits
                        raise _RollBack("incomplete")
                    done = await self._store.complete_in(conn, key, token, self._retention_s)
                    if not done:
                        raise _RollBack("fenced")
                    committing = True  # leaving the block sends COMMIT
            except _RollBack as rolled_back:
                if rolled_back.why == "incomplete":
                    return outcome
                if rolled_back.why == "fenced":
                    log.error(
                        "job %s: its claim was taken over before its transaction committed: "
                        "rolled back, not settled",
                        key,
                    )
                    if run.cut_off is None:
                        run.cut_off = LOST_CLAIM
                raise asyncio.CancelledError(run.cut_off or "cancelled") from None
            except Exception as error:
                if committing:
                    log.warning("job %s: the commit of its transaction failed: %r", key, error)
                    raise CommitUnknown(error) from error
                raise
        run.completed_in_transaction = committing
        return outcome
