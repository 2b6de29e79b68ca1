"""Records that are not due yet: retry tier records held until due (issue 13, K9), and
delayed jobs (`not_before`, issue 15) moved through the tiers to their time.

Where each record waits is decided by `consumer.core.plan_delay` (docs/scheduling.md):

- A tier record that is not due yet is not handed out: its partition is paused and rewound
  to it, and resumed when it is due, or when the tier's delay after its append has passed
  (its release), so a waiting record blocks neither other partitions nor the main topics
  and holds no memory while it waits.
- A main-topic record due later (a delayed job), or a tier record released before it is
  due, is appended unchanged (same key, job id, attempt, headers and due time) to the
  largest tier whose delay is at most its remaining time, and its offset settled once the
  broker acknowledged the copy (`until_acknowledged`): never lost; a crash between the
  copy and the commit leaves two copies, the idempotency store skips the second. Release
  times within a tier then grow in append order: no head-of-line blocking.
- The last stretch (less than the first tier's delay) is held in memory, its offset
  unsettled, and handed out when due; `worker.max_held_offsets` bounds it per partition.
- A main-topic record due more than `MAX_DELAY_S` ahead is handed out with `DelayTooLong`:
  the runtime dead-letters it (`delay-too-long`).

`RetryTiers` owns the timers of the waiting partitions, the copies under way and the
records held until due; the `KafkaSource` owns the partitions, and is called back to
rewind, resume and settle them.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Sequence, Set
from dataclasses import replace
from datetime import UTC, datetime

from aiokafka import ConsumerRecord, TopicPartition

from consumer.core import (
    MAX_DELAY_S,
    Deferrals,
    DelayTooLong,
    Delivery,
    Settings,
    WorkerError,
    plan_delay,
    remaining_s,
)
from consumer.runtime import OffsetTracker, RecordPublisher, until_acknowledged
from producer import destination_level

log = logging.getLogger("jobstream.kafka")

PartitionCall = Callable[[TopicPartition], None]
OffsetCall = Callable[[TopicPartition, int], None]


class RetryTiers:
    """The tier topics of `topics`, the tier partitions waiting for a due record, and the
    records held in memory for their last stretch."""

    def __init__(
        self,
        settings: Settings,
        topics: Sequence[str],
        requeue: RecordPublisher | None,
        tracker: OffsetTracker[TopicPartition],
        *,
        rewind: OffsetCall,
        resume: PartitionCall,
        settle: OffsetCall,
    ) -> None:
        """`requeue`: appends a record to a tier; without it a tier record holds its
        partition until due and a delayed job is held in memory. `tracker`: the source's;
        `rewind`, `resume` and `settle`: the source's own, for a partition that waits,
        that is due, and a record copied to a tier."""
        retry_settings = settings.retry
        self._tiers_s = list(retry_settings.tiers_s)
        self._tier_of: dict[str, tuple[float, list[str]]] = {}
        for topic in topics:  # a priority level's topic shares its normal topic's tiers
            names = retry_settings.tier_topics(destination_level(topic)[0])
            self._tier_of[topic] = (0.0, names)
            for name, delay_s in zip(names, retry_settings.tiers_s, strict=True):
                self._tier_of[name] = (delay_s, names)
        self.topics: frozenset[str] = frozenset(
            name for name, (delay_s, _) in self._tier_of.items() if delay_s > 0
        )
        """The tier topics of every main topic (of its normal level's topic)."""
        # With in-place retries the tier topics are not provisioned: delays stay in memory.
        self._move_tiers = [] if retry_settings.in_place or requeue is None else self._tiers_s
        self._requeue = requeue
        self._hand_off_timeout_s = retry_settings.hand_off_timeout_s
        self._tracker = tracker
        self._max_held = settings.worker.max_held_offsets
        self._rewind = rewind
        self._resume = resume
        self._settle = settle
        self._requeuing: dict[asyncio.Task[None], TopicPartition] = {}
        self._requeue_failed: BaseException | None = None
        self._waiting: dict[TopicPartition, asyncio.TimerHandle] = {}
        self._soon: list[tuple[float, int, Delivery]] = []  # (due, monotonic), in memory
        self._order = itertools.count()
        self.deferrals = Deferrals()
        """Delayed first attempts read from a main topic and set aside (`scheduled`)."""

    def is_waiting(self, tp: TopicPartition) -> bool:
        """True while `tp` is paused until its first record is due."""
        return tp in self._waiting

    def raise_if_failed(self) -> None:
        """Raise `WorkerError` once a copy to a tier failed (its hand-off timed out)."""
        if self._requeue_failed is not None:
            error = self._requeue_failed
            msg = f"a record could not be appended to a retry tier: {error}"
            raise WorkerError(msg) from error

    def admit(
        self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes], delivery: Delivery
    ) -> Delivery | None:
        """The delivery to hand out now, or None: its partition waits (rewound to it), it
        is being copied to a tier, or it is held in memory until due."""
        attributes = delivery.attributes
        if attributes is None or attributes.not_before is None:
            return delivery  # due now: most records, at no cost
        remaining = remaining_s(attributes, datetime.now(UTC))
        if remaining <= 0:
            return delivery
        tier_s = self._tier_of[tp.topic][0]
        released_in: float | None = None
        if tier_s > 0:  # a tier record: released a tier's delay after it was appended
            released = record.timestamp / 1000 + tier_s - time.time()
            released_in = min(released, tier_s) if self._move_tiers else remaining
        plan = plan_delay(remaining, self._move_tiers, released_in=released_in)
        if plan.action == "too-long":
            too_long = DelayTooLong(remaining, MAX_DELAY_S)
            return replace(delivery, attributes=None, error=too_long)
        if plan.action == "wait":
            self._rewind(tp, delivery.offset)
            loop = asyncio.get_running_loop()
            self._waiting[tp] = loop.call_later(plan.seconds, self._due, tp)
            return None
        if self._tracker.held(tp) >= self._max_held:
            return delivery  # the caller pauses the partition until offsets settle
        self._tracker.track(tp, record.offset)
        if tier_s == 0:
            self.deferrals.add(delivery.attributes)
        if plan.action == "hold":
            due = time.monotonic() + plan.seconds
            heapq.heappush(self._soon, (due, next(self._order), delivery))
        else:
            self._copy(tp, record, self._tier_of[tp.topic][1][plan.tier])
        return None

    def due(self, max_records: int) -> list[Delivery]:
        """Up to `max_records` of the records held in memory that are due now."""
        now = time.monotonic()
        found: list[Delivery] = []
        while self._soon and self._soon[0][0] <= now and len(found) < max_records:
            found.append(heapq.heappop(self._soon)[2])
        return found

    def next_due_in(self) -> float | None:
        """Seconds until the next record held in memory is due (None: none is held)."""
        return max(0.0, self._soon[0][0] - time.monotonic()) if self._soon else None

    def _copy(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes], tier: str) -> None:
        task = asyncio.create_task(self._append(tp, record, tier))
        self._requeuing[task] = tp
        task.add_done_callback(self._requeued)

    async def _append(
        self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes], tier: str
    ) -> None:
        publisher = self._requeue
        assert publisher is not None
        headers = [(name, b"" if value is None else value) for name, value in record.headers]
        where = f"{tp.topic}[{tp.partition}]@{record.offset}"
        await until_acknowledged(
            lambda: publisher.send_record(tier, record.key, headers, record.value or b""),
            self._hand_off_timeout_s,
            where,
        )
        log.debug("%s is not due yet: appended to %s", where, tier)
        self._settle(tp, record.offset)

    def _requeued(self, task: asyncio.Task[None]) -> None:
        self._requeuing.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            self._requeue_failed = self._requeue_failed or task.exception()

    def _due(self, tp: TopicPartition) -> None:
        self._waiting.pop(tp, None)
        self._resume(tp)

    async def finish_requeues(self, revoked: Set[TopicPartition], timeout_s: float) -> None:
        """Wait, `timeout_s` at most, for the copies of `revoked` partitions; the rest is
        read (and copied) again by the partition's next owner."""
        requeuing = [task for task, tp in self._requeuing.items() if tp in revoked]
        if requeuing:
            await asyncio.wait(requeuing, timeout=timeout_s)

    def forget(self, revoked: Set[TopicPartition]) -> None:
        """Stop waiting for the `revoked` partitions; drop their records held in memory
        (unsettled: the next owner reads them again)."""
        for tp in revoked & self._waiting.keys():
            self._waiting.pop(tp).cancel()
        kept = [item for item in self._soon if item[2].partition not in revoked]
        if len(kept) != len(self._soon):
            heapq.heapify(kept)
            self._soon = kept

    async def stop(self) -> None:
        """Cancel the copies still running. One cut off here leaves its record unsettled:
        it is read (and copied) again after the restart."""
        for task in list(self._requeuing):
            task.cancel()
        await asyncio.gather(*self._requeuing, return_exceptions=True)
