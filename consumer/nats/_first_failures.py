"""When a job first failed, for retries on NATS JetStream (issue 13, K9).

A NATS retry is a redelivery of the same message (`nak` with a delay), which cannot carry
a new header, so the `jobfirstfail` that a Kafka retry record carries is kept here: one
key per group and stored message in the KV bucket `jetstream.first_failure_bucket`,
written once at the first failure that asks for a retry (an atomic create: the first
writer wins) and read when the message is delivered again. The retry budget then counts
from the first failure on both brokers, never from when the message was stored (a job
delivered after a long backlog keeps its whole budget).

Best effort by design: a key that cannot be written or read (the bucket is away) is
logged and treated as absent, so the budget counts from a later failure (more retries,
never fewer) while `max_attempts` still bounds them. Entries expire after the largest
`budget_s` plus an hour: no retry is scheduled past the budget, so none needs one later.
"""

from __future__ import annotations

import logging
import re

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from consumer.core import FIRST_FAILURE, Settings
from consumer.nats._held import Held
from consumer.nats._kv_store import ensure_bucket
from schemas.names import NATS_PREFIX

log = logging.getLogger("jobstream.nats")

_KEY_UNSAFE = re.compile(r"[^-_=.a-zA-Z0-9]")
_MARGIN_S = 3600.0
_HEADER = f"{NATS_PREFIX}{FIRST_FAILURE}"


def first_failure_bucket_config(settings: Settings) -> KeyValueConfig:
    retry = settings.retry
    budget_s = max([retry.policy.budget_s, *(p.budget_s for p in retry.per_type.values())])
    return KeyValueConfig(
        bucket=settings.jetstream.first_failure_bucket,
        history=1,
        ttl=budget_s + _MARGIN_S,
        replicas=settings.routing.replication_factor,
        storage=StorageType.FILE,
        description="jobstream: when each retried job first failed (retry budgets)",
    )


class FirstFailures:
    """The first-failure times of one group's retried messages."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._kv: KeyValue | None = None

    async def open(self, js: JetStreamContext) -> None:
        config = first_failure_bucket_config(self._settings)
        await ensure_bucket(js, config)
        self._kv = await js.key_value(config.bucket)

    async def remember(self, held: Held, stamp: str) -> None:
        """Record `stamp` as the first failure of `held`'s message, unless one is known."""
        if self._kv is None or _HEADER in (held.msg.headers or {}):
            return
        try:
            await self._kv.create(self._key(held), stamp.encode())
        except KeyWrongLastSequenceError:
            pass  # an earlier failure was recorded: it stays
        except nats.errors.Error as error:
            log.warning("first failure of seq %d not recorded (%r)", held.seq, error)

    async def recall(self, held: Held) -> str | None:
        """The first failure recorded for a redelivered message, else None."""
        if self._kv is None or held.delivered <= 1 or _HEADER in (held.msg.headers or {}):
            return None
        try:
            entry = await self._kv.get(self._key(held))
        except KeyNotFoundError:
            return None  # no failure that asked for a retry yet (a crash redelivered it)
        except nats.errors.Error as error:
            log.warning("first failure of seq %d not read (%r)", held.seq, error)
            return None
        return entry.value.decode("utf-8", "replace") if entry.value else None

    def _key(self, held: Held) -> str:
        stored = held.stored.strftime("%Y%m%dT%H%M%S%f")
        key = f"{self._settings.worker.group}.{self._settings.routing.stream}.{held.seq}.{stored}"
        return _KEY_UNSAFE.sub("_", key)
