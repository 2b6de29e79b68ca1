"""Kafka as a `Source`: consumer-group membership, batched commits after settle.

The source reads the main topics and their retry tier topics in one consumer. A tier
record that is not due yet (`jobnotbefore` in the future) is not handed out: its partition
is paused and rewound to it, and resumed when it is due, so a waiting retry blocks neither
other partitions nor the main topics, and holds no memory while it waits. A tier record
holds its partition at most the tier's own delay after it was appended: one due later
(`Retry(delay_s=86400)` on the last tier) is then appended again to the tail of the tier,
unchanged (same job id, attempt and due time), and its offset settled once the broker
acknowledged the copy, so the retries behind it that are due sooner are not held for a
day (issue 13, K9). Each such record is appended at most once per tier delay: no busy loop.

A record aiokafka cannot parse (a header name that is not UTF-8, a corrupt batch) makes
`getmany` raise, for every partition at once (K1). The source puts each partition back
after the last record it received (a failed `getmany` may have advanced positions whose
records it dropped), then reads the partitions alone, one record at a time, until the
parse fails again: the failing partition's position is then the unreadable record. It is
handed out as an `UnreadableRecord` (dead-lettered with its position, its offset committed
after it) and the partition resumes after it. Each round hands out records or a dead
letter; an error no partition reproduces stops the worker after `_UNREPRODUCED_LIMIT`.

Auto-commit is off. Every fetched record is tracked by the `OffsetTracker`; settled records
advance the commit position, and commits happen in batches (`commit_every` settled records
or `commit_interval_s`, whichever first), on revoke (after the runtime drained the revoked
partitions) and on shutdown. Nothing else in jobstream commits offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NamedTuple

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import (
    CommitFailedError,
    ConsumerStoppedError,
    CorruptRecordException,
    IllegalStateError,
    KafkaError,
)
from aiokafka.structs import OffsetAndMetadata

from consumer.core import Delivery, Outcome, RevokeCallback, Settings, WorkerError
from consumer.runtime import OffsetTracker, RecordPublisher, until_acknowledged
from consumer.telemetry import Backlog
from producer.kafka import kafka_client_options
from producer.retrying import Backoff, retry
from schemas import JobDecodeError, UnreadableRecord, from_kafka

log = logging.getLogger("jobstream.kafka")
_BROKER_BACKOFF = Backoff(initial_s=0.5, max_s=10.0, jitter=True)
# Polled when the worker takes nothing: never assigned, so the poll returns no record and
# drops none that aiokafka prefetched, yet counts for `max_poll_interval_ms`.
_NO_PARTITION = TopicPartition("", -1)
# Isolating an unreadable record (K1): how long one partition is polled alone, and how many
# parse errors in a row no partition reproduces before the worker stops.
_ALONE_WAIT_MS = 2000
_UNREPRODUCED_LIMIT = 3


class _Unreadable(NamedTuple):
    """Where aiokafka failed to parse a record, in `_held` among the parsed ones."""

    offset: int
    error: Exception


def _unparsable(error: Exception) -> bool:
    """A record aiokafka cannot parse, as opposed to a broker or client error."""
    if isinstance(error, CorruptRecordException):
        return True
    return not isinstance(error, KafkaError | ConsumerStoppedError)


def _unreachable(error: Exception, wait_s: float) -> None:
    log.warning("Kafka not reachable yet (%s); retrying in %.1fs", error, wait_s)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._source._revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._source._assigned(assigned)


class KafkaSource:
    """A member of the consumer group `settings.worker.group` reading `topics`."""

    def __init__(
        self,
        settings: Settings,
        topics: Sequence[str],
        *,
        requeue: RecordPublisher | None = None,
    ) -> None:
        """`requeue`: appends a tier record that is due past its tier's delay to the tail
        of the tier (the backend's publisher). Without it such a record holds its tier
        partition until it is due."""
        worker, retry_settings = settings.worker, settings.retry
        self._tier_delays = {
            tier: delay_s
            for topic in topics
            for tier, delay_s in zip(
                retry_settings.tier_topics(topic), retry_settings.tiers_s, strict=True
            )
        }
        self._tiers = set(self._tier_delays)
        self._topics = sorted({*topics, *self._tiers})
        self._requeue = requeue
        self._requeuing: dict[asyncio.Task[None], TopicPartition] = {}
        self._requeue_failed: BaseException | None = None
        self._settings = settings
        self._consumer = AIOKafkaConsumer(
            **kafka_client_options(settings.kafka),
            group_id=worker.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_poll_records=worker.fetch_max_records,
            session_timeout_ms=int(worker.session_timeout_s * 1000),
            heartbeat_interval_ms=int(worker.session_timeout_s * 1000 / 3),
            max_poll_interval_ms=int(worker.max_poll_interval_s * 1000),
            # A rebalance waits for our revoke drain (revoke_timeout_s) plus the commit.
            rebalance_timeout_ms=int((worker.revoke_timeout_s + worker.session_timeout_s) * 1000),
        )
        self._tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self._on_revoke: RevokeCallback | None = None
        self._assignment: set[TopicPartition] = set()
        self._ready = False
        self._paused = False
        self._commit_lock = asyncio.Lock()
        self._fetch_max = worker.fetch_max_records
        self._held: deque[tuple[TopicPartition, ConsumerRecord[bytes, bytes] | _Unreadable]] = (
            deque()
        )
        self._next: dict[TopicPartition, int] = {}  # after the last record received
        self._unreproduced = 0
        self._waiting: dict[TopicPartition, asyncio.TimerHandle] = {}
        self._full: set[TopicPartition] = set()  # paused: too many records held (K7)
        self._max_held = worker.max_held_offsets
        self._contact = time.monotonic()  # the last commit, probe or assignment Kafka answered
        self._probed = TopicPartition(self._topics[0], 0)

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def tracker(self) -> OffsetTracker[TopicPartition]:
        return self._tracker

    @property
    def last_contact(self) -> float:
        """When Kafka last answered (`time.monotonic()`): the newest fetch response of an
        assigned partition, a commit, a probe or an assignment. `getmany` returning nothing
        is no answer: it does so, without an error, while the broker is away."""
        newest = max(
            (self._consumer.last_poll_timestamp(tp) or 0 for tp in self._consumer.assignment()),
            default=0,
        )
        # aiokafka stamps fetch responses with the wall clock, in milliseconds.
        fetched = time.monotonic() - (time.time() - newest / 1000) if newest else 0.0
        return max(self._contact, fetched)

    async def probe(self) -> None:
        """Ask the group coordinator for a committed offset: an answer from the broker while
        this member fetches nothing (no partition, every one paused, or the worker full)."""
        await self._consumer.committed(self._probed)
        self._contact = time.monotonic()

    async def start(self, on_revoke: RevokeCallback) -> None:
        self._on_revoke = on_revoke
        budget = self._settings.worker.broker_wait_s
        try:
            await retry(
                self._consumer.start,
                on=KafkaError,
                backoff=_BROKER_BACKOFF,
                deadline=time.monotonic() + budget,
                on_retry=_unreachable,
            )
        except KafkaError as error:
            servers = self._settings.kafka.bootstrap_servers
            msg = (
                f"Kafka at {servers} did not answer within {budget:g}s ({error}): "
                "check JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS and that the broker runs"
            )
            await self._consumer.stop()
            raise WorkerError(msg) from error
        self._consumer.subscribe(self._topics, listener=_Listener(self))

    async def fetch(self, max_records: int, timeout_s: float) -> list[Delivery]:
        # Records that arrive beyond `max_records` wait in `_held` instead of overrunning
        # the runtime's in-flight bound; while they wait, or while the worker has no room,
        # the consumer still polls, taking nothing (K6).
        if self._requeue_failed is not None:
            error = self._requeue_failed
            msg = f"a retry record could not be appended to its tier again: {error}"
            raise WorkerError(msg) from error
        if self._paused or len(self._held) >= max(max_records, 1):
            await self._consumer.getmany(_NO_PARTITION, timeout_ms=0)
        else:
            # With records already in hand, only top up what is ready: never wait for more.
            wait_ms = 0 if self._held else int(timeout_s * 1000)
            try:
                batches = await self._consumer.getmany(
                    timeout_ms=wait_ms, max_records=self._fetch_max
                )
            except Exception as error:
                if not _unparsable(error):
                    raise
                await self._isolate(error)
                batches = {}
            for tp, records in batches.items():
                self._receive(tp, records)
        deliveries: list[Delivery] = []
        while self._held and len(deliveries) < max_records:
            tp, record = self._held.popleft()
            if tp not in self._assignment or tp in self._waiting or tp in self._full:
                continue  # revoked (the new owner reads it again) or rewound (read again)
            delivery = _delivery(tp, record)
            if (
                tp.topic in self._tiers
                and isinstance(record, ConsumerRecord)
                and self._hold_until_due(tp, record, delivery)
            ):
                continue
            if self._tracker.held(tp) >= self._max_held:
                self._rewind(tp, record.offset)
                self._full.add(tp)
                log.warning(
                    "%s[%d] holds %d records behind its oldest unsettled one "
                    "(worker.max_held_offsets): paused until it settles",
                    tp.topic,
                    tp.partition,
                    self._max_held,
                )
                continue
            self._tracker.track(tp, record.offset)
            deliveries.append(delivery)
        return deliveries

    def _receive(self, tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        if records:
            self._held.extend((tp, record) for record in records)
            self._next[tp] = records[-1].offset + 1

    async def _isolate(self, error: Exception) -> None:
        """`getmany` raised `error` parsing a record of some partition (K1): find it, hold
        an `_Unreadable` at its offset and move the partition past it."""
        fetchable = sorted(self._assignment - self._consumer.paused())
        for tp in fetchable:  # a failed getmany drops what it drained, positions moved on
            with contextlib.suppress(IllegalStateError):  # revoked meanwhile
                if tp in self._next:
                    self._consumer.seek(tp, self._next[tp])
                elif (committed := await self._consumer.committed(tp)) is not None:
                    self._consumer.seek(tp, committed)
                else:
                    await self._consumer.seek_to_beginning(tp)
        budget = self._fetch_max
        for tp in fetchable:
            try:
                found, budget = await self._read_alone(tp, budget)
            except IllegalStateError:
                continue  # revoked meanwhile: its new owner reads it
            if found:
                self._unreproduced = 0
                return
        if budget < self._fetch_max:
            return  # records read: progress; the next getmany meets the error again
        self._unreproduced += 1
        if self._unreproduced >= _UNREPRODUCED_LIMIT:
            msg = f"aiokafka failed to parse a record no partition reproduces alone: {error!r}"
            raise WorkerError(msg) from error
        log.warning("aiokafka failed to parse a record, not found alone: %r", error)

    async def _read_alone(self, tp: TopicPartition, budget: int) -> tuple[bool, int]:
        """Read `tp` alone, a record at a time, so that its position is exact when a parse
        fails: (found the unreadable record, records left in `budget`)."""
        end = self._consumer.highwater(tp)
        if end is None or await self._consumer.position(tp) >= end:
            return False, budget  # nothing to read there: not the failing partition
        while budget > 0:
            try:
                batch = await self._consumer.getmany(tp, max_records=1, timeout_ms=_ALONE_WAIT_MS)
            except Exception as error:
                if not _unparsable(error):
                    raise
                self._skip_unreadable(tp, await self._consumer.position(tp), error)
                return True, budget
            if not batch.get(tp):
                break
            self._receive(tp, batch[tp])
            budget -= 1
        return False, budget

    def _skip_unreadable(self, tp: TopicPartition, offset: int, error: Exception) -> None:
        self._held.append((tp, _Unreadable(offset, error)))
        self._consumer.seek(tp, offset + 1)
        self._next[tp] = offset + 1
        log.error(
            "%s[%d]@%d cannot be parsed (%r): dead-lettered as unreadable-record",
            tp.topic,
            tp.partition,
            offset,
            error,
        )

    def _rewind(self, tp: TopicPartition, offset: int) -> None:
        """Pause `tp` and read it again from `offset` once resumed; drop what is in hand."""
        self._consumer.pause(tp)
        self._consumer.seek(tp, offset)
        self._next[tp] = offset
        self._held = deque(item for item in self._held if item[0] != tp)

    def _hold_until_due(
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
            self._settings.retry.hand_off_timeout_s,
            where,
        )
        log.debug("%s is due past its tier's delay: appended again to %s", where, tp.topic)
        self._settle_offset(tp, record.offset)

    def _requeued(self, task: asyncio.Task[None]) -> None:
        self._requeuing.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            self._requeue_failed = self._requeue_failed or task.exception()

    def _due(self, tp: TopicPartition) -> None:
        self._waiting.pop(tp, None)
        if tp in self._assignment and tp not in self._full:
            self._consumer.resume(tp)

    def pause(self) -> None:
        # Not the consumer's pause: aiokafka discards a paused partition's prefetched
        # records at the next poll and fetches them again on resume, which churns memory
        # and the network at every full-to-free turn. Taking nothing is enough: aiokafka
        # prefetches at most one fetch (`max_partition_fetch_bytes`) per partition.
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        tp = delivery.partition
        if isinstance(tp, TopicPartition):
            self._settle_offset(tp, delivery.offset)

    def _settle_offset(self, tp: TopicPartition, offset: int) -> None:
        if tp in self._assignment:
            try:
                self._tracker.settle(tp, offset)
            except ValueError:
                # From an earlier assignment of this partition: already redelivered.
                log.debug("stale settle ignored: %s[%d]@%d", tp.topic, tp.partition, offset)
            if tp in self._full and self._tracker.held(tp) <= self._max_held // 2:
                self._full.discard(tp)
                if tp not in self._waiting:
                    self._consumer.resume(tp)

    def owns(self, delivery: Delivery) -> bool:
        return delivery.partition in self._assignment

    def pending_commits(self) -> int:
        return self._tracker.pending_commit()

    async def backlog(self) -> list[Backlog]:
        """Per assigned partition: records not yet settled here, i.e. its end (highwater)
        minus the fetch position, plus what was fetched and is not settled yet (the
        `jobstream.consumer.lag` metric; on a tier topic, the retries waiting there)."""
        held = Counter(tp for tp, _ in self._held)
        found: list[Backlog] = []
        for tp in sorted(self._assignment):
            end = self._consumer.highwater(tp)
            if end is None:
                continue  # no fetch answered for it yet
            try:
                position = await asyncio.wait_for(self._consumer.position(tp), 1.0)
            except (KafkaError, IllegalStateError, TimeoutError):
                continue  # revoked meanwhile, or no position yet
            waiting = max(0, end - position) + held[tp] + self._tracker.unsettled(tp)
            found.append(Backlog(tp.topic, str(tp.partition), waiting))
        return found

    async def commit(self) -> None:
        async with self._commit_lock:
            positions = self._tracker.committable()
            if not positions:
                return
            offsets = {tp: OffsetAndMetadata(pos, "") for tp, pos in positions.items()}
            try:
                await self._consumer.commit(offsets)
            except (CommitFailedError, IllegalStateError) as error:
                # The group moved on (rebalance): these records will be redelivered to the
                # new owner and skipped there by the idempotency store.
                log.warning("commit failed, records will be redelivered: %s", error)
                return
            self._tracker.mark_committed(positions)
            self._contact = time.monotonic()
            log.debug(
                "committed %s", {f"{tp.topic}[{tp.partition}]": p for tp, p in positions.items()}
            )

    async def stop(self) -> None:
        # A requeue cut off here leaves its record unsettled: it is read (and requeued)
        # again after the restart.
        for task in list(self._requeuing):
            task.cancel()
        await asyncio.gather(*self._requeuing, return_exceptions=True)
        await self._consumer.stop()

    async def _revoked(self, revoked: list[TopicPartition]) -> None:
        revoked_set = set(revoked)
        if self._on_revoke is not None and revoked_set:
            await self._on_revoke(list(revoked_set))
        requeuing = [task for task, tp in self._requeuing.items() if tp in revoked_set]
        if requeuing:  # bounded like the runtime's drain; the rest is read again
            await asyncio.wait(requeuing, timeout=self._settings.worker.revoke_timeout_s)
        try:
            await self.commit()
        except KafkaError as error:
            log.warning("commit on revoke failed: %s", error)
        self._assignment -= revoked_set
        self._tracker.forget(revoked_set)
        self._held = deque(item for item in self._held if item[0] not in revoked_set)
        for tp in revoked_set:
            self._next.pop(tp, None)
        for tp in revoked_set & self._waiting.keys():
            self._waiting.pop(tp).cancel()
        self._full -= revoked_set

    def _assigned(self, assigned: list[TopicPartition]) -> None:
        self._assignment = set(self._consumer.assignment())
        self._ready = True
        self._contact = time.monotonic()
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))


def _delivery(tp: TopicPartition, record: ConsumerRecord[bytes, bytes] | _Unreadable) -> Delivery:
    if isinstance(record, _Unreadable):
        where = f"{tp.topic}[{tp.partition}]@{record.offset}"
        error = UnreadableRecord(
            f"aiokafka cannot parse the record at {where} (or one before it in its batch): "
            f"{type(record.error).__name__}: {record.error}"
        )
        return Delivery(tp, record.offset, tp.topic, None, b"", error=error)
    headers = list(record.headers or ())
    value = record.value or b""
    try:
        attributes = from_kafka(record.key, headers)
        failed: JobDecodeError | None = None
    except JobDecodeError as exc:
        attributes, failed = None, exc
    return Delivery(
        partition=tp,
        offset=record.offset,
        topic=tp.topic,
        attributes=attributes,
        body=value,
        raw_key=record.key,
        raw_headers=headers,
        error=failed,
    )
