"""Retry tier records held until due, and requeued past their tier's delay (issue 13, K9).

A tier record that is not due yet (`jobnotbefore` in the future) is not handed out: its
partition is paused and rewound to it, and resumed when it is due, so a waiting retry
blocks neither other partitions nor the main topics, and holds no memory while it waits.
A tier record holds its partition at most the tier's own delay after it was appended: one
due later (`Retry(delay_s=86400)` on the last tier) is then appended again to the tail of
the tier, unchanged (same job id, attempt and due time), and its offset settled once the
broker acknowledged the copy, so the retries behind it that are due sooner are not held
for a day. Each such record is appended at most once per tier delay: no busy loop.

`RetryTiers` owns the timers of the waiting partitions and the requeue tasks; the
`KafkaSource` owns the partitions, and is called back to rewind, resume and settle them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence, Set
from datetime import UTC, datetime

from aiokafka import ConsumerRecord, TopicPartition

from consumer.core import Delivery, Settings, WorkerError
from consumer.runtime import OffsetTracker, RecordPublisher, until_acknowledged

log = logging.getLogger("jobstream.kafka")

PartitionCall = Callable[[TopicPartition], None]
OffsetCall = Callable[[TopicPartition, int], None]


class RetryTiers:
    """The tier topics of `topics`, and the tier partitions waiting for a due record."""

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
        """`requeue`: appends a record due past its tier's delay to the tail of the tier;
        without it such a record holds its partition until it is due. `tracker`: the
        source's; `rewind`, `resume` and `settle`: the source's own, for a partition that
        waits, that is due, and a record appended again."""
        retry_settings = settings.retry
        self._tier_delays = {
            tier: delay_s
            for topic in topics
            for tier, delay_s in zip(
                retry_settings.tier_topics(topic), retry_settings.tiers_s, strict=True
            )
        }
        self.topics: frozenset[str] = frozenset(self._tier_delays)
        """The tier topics of every main topic."""
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

    def is_waiting(self, tp: TopicPartition) -> bool:
        """True while `tp` is paused until its first record is due."""
        return tp in self._waiting

    def raise_if_failed(self) -> None:
        """Raise `WorkerError` once a requeue failed (its hand-off timed out)."""
        if self._requeue_failed is not None:
            error = self._requeue_failed
            msg = f"a retry record could not be appended to its tier again: {error}"
            raise WorkerError(msg) from error

    def hold_until_due(
        self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes], delivery: Delivery
    ) -> bool:
        """True if the tier record is not handed out now: its partition waits (rewound to
        it), or the record is being appended to the tail of the tier (requeued)."""
        due = delivery.attributes.not_before if delivery.attributes is not None else None
        wait = (due - datetime.now(UTC)).total_seconds() if due is not None else 0.0
        if wait <= 0:
            return False
        if self._requeue is not None:
            # Hold no longer than the tier's delay after the record was appended; a record
            # appended at T comes back at T + tier delay, so each is requeued at most once
            # per tier delay. A timestamp in the future still holds at most one tier delay.
            tier_s = self._tier_delays[tp.topic]
            released = record.timestamp / 1000 + tier_s - time.time()
            if released <= 0:
                if self._tracker.held(tp) >= self._max_held:
                    return False  # the caller pauses the partition until offsets settle
                self._requeue_record(tp, record)
                return True
            wait = min(wait, released, tier_s)
        self._rewind(tp, delivery.offset)
        loop = asyncio.get_running_loop()
        self._waiting[tp] = loop.call_later(wait, self._due, tp)
        return True

    def _requeue_record(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
        self._tracker.track(tp, record.offset)
        task = asyncio.create_task(self._append_again(tp, record))
        self._requeuing[task] = tp
        task.add_done_callback(self._requeued)

    async def _append_again(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
        publisher = self._requeue
        assert publisher is not None
        headers = [(name, b"" if value is None else value) for name, value in record.headers]
        where = f"{tp.topic}[{tp.partition}]@{record.offset}"
        await until_acknowledged(
            lambda: publisher.send_record(tp.topic, record.key, headers, record.value or b""),
            self._hand_off_timeout_s,
            where,
        )
        log.debug("%s is due past its tier's delay: appended again to %s", where, tp.topic)
        self._settle(tp, record.offset)

    def _requeued(self, task: asyncio.Task[None]) -> None:
        self._requeuing.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            self._requeue_failed = self._requeue_failed or task.exception()

    def _due(self, tp: TopicPartition) -> None:
        self._waiting.pop(tp, None)
        self._resume(tp)

    async def finish_requeues(self, revoked: Set[TopicPartition], timeout_s: float) -> None:
        """Wait, `timeout_s` at most, for the requeues of `revoked` partitions; the rest is
        read (and requeued) again by the partition's next owner."""
        requeuing = [task for task, tp in self._requeuing.items() if tp in revoked]
        if requeuing:
            await asyncio.wait(requeuing, timeout=timeout_s)

    def forget(self, revoked: Set[TopicPartition]) -> None:
        """Stop waiting for the `revoked` partitions."""
        for tp in revoked & self._waiting.keys():
            self._waiting.pop(tp).cancel()

    async def stop(self) -> None:
        """Cancel the requeues still running. One cut off here leaves its record
        unsettled: it is read (and requeued) again after the restart."""
        for task in list(self._requeuing):
            task.cancel()
        await asyncio.gather(*self._requeuing, return_exceptions=True)
