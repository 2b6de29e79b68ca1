"""`Idempotency-Key` bindings of the HTTP ingress: a small state machine in the status store,
so every ingress replica sees the same binding (IETF draft-ietf-httpapi-idempotency-key-header).

```
(none) --reserve--> reserved(job_id, fingerprint, holder, lease_until)
reserved --settle(published)--> published(job_id)        answered 202 to every repeat
reserved --settle(failed)-----> failed(job_id)           the next request takes it over
failed, or reserved past its lease --reserve--> reserved (the SAME job_id, a new holder)
```

Rules (pure functions here; `MemoryStatusStore` and `RedisStatusStore` apply them
atomically, Redis under WATCH/MULTI):

- A binding's job id never changes: a retry after a failure (even an ambiguous publish
  timeout, when the record may be stored) publishes under the same id, so the workers'
  idempotency dedupes a second copy.
- `published` is final: nothing replaces it until the binding expires (`status.retention_s`
  after its last change). Any holder may settle `published` (its record is stored under the
  binding's job id); only the current holder may settle `failed`, so a replica whose lease
  was taken over cannot undo the new holder's publish.
- A reservation whose lease has passed counts as failed: its replica died mid-publish.
- Another request's fingerprint never takes a binding over, whatever its state: the caller
  answers 422.

Lease times are wall-clock UTC, compared by each replica: keep the replicas' clocks within
the ingress's lease margin of each other (NTP does).
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict

__all__ = ["KeyBinding", "KeyReservation", "KeyState", "reserve_binding", "settle_binding"]


class KeyState(enum.StrEnum):
    RESERVED = "reserved"
    """A request holds the key and is publishing now (until `lease_until`)."""
    PUBLISHED = "published"
    """The broker (or the producer's durable spool) took the job: repeats get 202."""
    FAILED = "failed"
    """The publish failed (its outcome may be unknown): the next request publishes again."""


class KeyBinding(BaseModel):
    """One key's binding, as stored (JSON, `<ns>:idemkey:<name>` on Redis)."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    """The job id bound to the key, kept through failures and takeovers."""
    fingerprint: str
    """Hex digest of the request that bound the key; another request with the key gets 422."""
    state: KeyState
    holder: str
    """Token of the reservation that holds (or last held) the key: who may settle it failed."""
    lease_until: datetime
    """While `reserved`: when the reservation counts as failed (UTC)."""
    spooled: bool = False
    """While `published`: the job went to the producer's durable spool, not the broker."""

    def taken_over_at(self, now: datetime) -> bool:
        """Whether a new request may take the binding over at `now`."""
        return self.state is KeyState.FAILED or (
            self.state is KeyState.RESERVED and self.lease_until <= now
        )


class KeyReservation(NamedTuple):
    """What `reserve_key` found: the binding now stored, and whether the caller holds it."""

    binding: KeyBinding
    held: bool
    """True: the caller reserved the key and must publish `binding.job_id`, then settle it
    with `binding.holder`. False: `binding` belongs to another request (or is published)."""


def reserve_binding(
    current: KeyBinding | None, job_id: str, fingerprint: str, lease_s: float
) -> KeyReservation:
    """The reservation a request with `fingerprint` gets against `current` (see the module
    docstring); `job_id` is used only for a new binding."""
    now = datetime.now(UTC)
    if current is not None and (
        current.fingerprint != fingerprint or not current.taken_over_at(now)
    ):
        return KeyReservation(current, held=False)
    binding = KeyBinding(
        job_id=current.job_id if current is not None else job_id,
        fingerprint=fingerprint,
        state=KeyState.RESERVED,
        holder=uuid.uuid4().hex,
        lease_until=now + timedelta(seconds=lease_s),
    )
    return KeyReservation(binding, held=True)


def settle_binding(
    current: KeyBinding | None, holder: str, state: KeyState, *, spooled: bool = False
) -> KeyBinding | None:
    """The binding after its holder settled it `published` or `failed`; None: no change (it
    expired, is already published, or another holder took it over and may still publish)."""
    if state is KeyState.RESERVED:
        msg = "a binding is settled published or failed, never reserved"
        raise ValueError(msg)
    if current is None or current.state is KeyState.PUBLISHED:
        return None
    if state is KeyState.PUBLISHED:
        return current.model_copy(update={"state": state, "spooled": spooled})
    if current.holder != holder or current.state is not KeyState.RESERVED:
        return None
    return current.model_copy(update={"state": state})
