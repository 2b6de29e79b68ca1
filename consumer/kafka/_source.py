"""Kafka as a `Source`: consumer-group membership, batched commits after settle.

The source reads the main topics and their retry tier topics in one consumer. A record
that is not due yet (a retry, or a delayed job's `not_before`) waits in its tier
partition, paused and rewound to it, is appended to a tier, or is held in memory for its
last stretch (`_tiers.py`: `RetryTiers`, issue 13, K9; issue 15). A record
aiokafka cannot parse is found and handed out as an `UnreadableRecord`, to be
dead-lettered, and its partition resumes after it (`_unreadable.py`: `UnreadableFinder`,
K1). Records that arrive beyond what the worker asked for wait in hand (`fetch`), and a
partition holding `max_held_offsets` records behind its oldest unsettled one is paused
until it settles (K7).

With `routing.priorities` the topics come in three levels (`<topic>.priority-high`, the
topic, `<topic>.priority-low`; tier topics count as normal) and the hand is one FIFO per
level: `fetch` hands out by weighted round robin among the levels holding records
(`consumer.runtime.PriorityLevels`, `worker.priority_weights`), and while some levels'
hands are full it still polls the partitions of the others, so a high record that arrives
behind a backlog of low ones is taken at the next free slot (docs/scheduling.md,
"Priorities"). Without priorities there is one level and one FIFO, as before.

Auto-commit is off. Every fetched record is tracked by the `OffsetTracker`; settled records
advance the commit position, and commits happen in batches (`commit_every` settled records
or `commit_interval_s`, whichever first), on revoke (after the runtime drained the revoked
partitions) and on shutdown. Nothing else in jobstream commits offsets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from consumer.core import Delivery, Outcome, RevokeCallback, Settings, WorkerError
from consumer.kafka._hand import Hand
from consumer.kafka._tiers import RetryTiers
from consumer.kafka._unreadable import Unreadable, UnreadableFinder, unparsable
from consumer.runtime import OffsetTracker, PriorityLevels, RecordPublisher
from consumer.telemetry import Backlog
from producer.kafka import kafka_client_options
from producer.retrying import Backoff, retry
from schemas import JobDecodeError, from_kafka

log = logging.getLogger("jobstream.kafka")
_BROKER_BACKOFF = Backoff(initial_s=0.5, max_s=10.0, jitter=True)
# Polled when the worker takes nothing: never assigned, so the poll returns no record and
# drops none that aiokafka prefetched, yet counts for `max_poll_interval_ms`.
_NO_PARTITION = TopicPartition("", -1)


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
        worker = settings.worker
        self._tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self._tiers = RetryTiers(
            settings,
            topics,
            requeue,
            self._tracker,
            rewind=self._rewind,
            resume=self._resume_if_free,
            settle=self._settle_offset,
        )
        self._topics = sorted({*topics, *self._tiers.topics})
        self.deferrals = self._tiers.deferrals
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
        self._on_revoke: RevokeCallback | None = None
        self._assignment: set[TopicPartition] = set()
        self._ready = False
        self._paused = False
        self._commit_lock = asyncio.Lock()
        self._fetch_max = worker.fetch_max_records
        self._held = Hand(PriorityLevels(settings, self._topics))
        self._next: dict[TopicPartition, int] = {}  # after the last record received
        self._unreadable = UnreadableFinder(self._consumer, self._fetch_max, self._receive)
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
        # Records that arrive beyond `max_records` wait in hand (`_held`, a FIFO per level)
        # instead of overrunning the runtime's in-flight bound; while they wait, or while
        # the worker has no room, the consumer still polls, taking nothing (K6).
        self._tiers.raise_if_failed()
        if self._paused:
            await self._nothing()
        elif (wanted := self._held.short_of(max(max_records, 1))) is None:
            await self._top_up(timeout_s)
        elif wanted:
            # Some levels' hands are full: read only the others' partitions (aiokafka
            # keeps what it prefetched for the rest), so that a high record arriving
            # behind a low backlog is in hand at the next free slot.
            await self._read(wanted, 0)
        else:
            await self._nothing()
        deliveries = self._tiers.due(max_records)
        self._held.take(max_records, self._hand_out, deliveries)
        return deliveries

    async def _nothing(self) -> None:
        """Poll taking nothing: counts for `max_poll_interval_ms`, drops no prefetch."""
        await self._consumer.getmany(_NO_PARTITION, timeout_ms=0)

    async def _top_up(self, timeout_s: float) -> None:
        """Read every partition. With records already in hand, only top up what is ready:
        never wait for more, nor past the next delayed job held in memory."""
        soon = self._tiers.next_due_in()
        wait_s = 0.0 if self._held else min(timeout_s, timeout_s if soon is None else soon)
        await self._read((), int(wait_s * 1000))

    async def _read(self, partitions: Sequence[TopicPartition], wait_ms: int) -> None:
        """Read `partitions` (all of them when empty) into the hand."""
        try:
            batches = await self._consumer.getmany(
                *partitions, timeout_ms=wait_ms, max_records=self._fetch_max
            )
        except Exception as error:
            if not unparsable(error):
                raise
            await self._unreadable.isolate(error, self._assignment, self._next)
            return
        for tp, records in batches.items():
            self._receive(tp, records)

    def _hand_out(
        self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes] | Unreadable
    ) -> Delivery | None:
        """The delivery of a record taken from the hand, tracked; None when it is not handed
        out (revoked, rewound, waiting until due, or its partition holds too many)."""
        if tp not in self._assignment or self._tiers.is_waiting(tp) or tp in self._full:
            return None  # revoked (the new owner reads it again) or rewound (read again)
        delivery = _delivery(tp, record)
        if isinstance(record, ConsumerRecord):
            admitted = self._tiers.admit(tp, record, delivery)
            if admitted is None:
                return None  # waits in its tier, copied to a tier, or held until due
            delivery = admitted
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
            return None
        self._tracker.track(tp, record.offset)
        return delivery

    def _receive(
        self, tp: TopicPartition, records: Sequence[ConsumerRecord[bytes, bytes] | Unreadable]
    ) -> None:
        if records:
            self._held.receive(tp, records)
            self._next[tp] = records[-1].offset + 1

    def _rewind(self, tp: TopicPartition, offset: int) -> None:
        """Pause `tp` and read it again from `offset` once resumed; drop what is in hand."""
        self._consumer.pause(tp)
        self._consumer.seek(tp, offset)
        self._next[tp] = offset
        self._held.drop({tp})

    def _resume_if_free(self, tp: TopicPartition) -> None:
        """Resume `tp`, due again, unless revoked or holding too many records."""
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
                if not self._tiers.is_waiting(tp):
                    self._consumer.resume(tp)

    def owns(self, delivery: Delivery) -> bool:
        return delivery.partition in self._assignment

    def pending_commits(self) -> int:
        return self._tracker.pending_commit()

    async def backlog(self) -> list[Backlog]:
        """Per assigned partition: records not yet settled here, i.e. its end (highwater)
        minus the fetch position, plus what was fetched and is not settled yet (the
        `jobstream.consumer.lag` metric; on a tier topic, the retries waiting there)."""
        held = self._held.counts()
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
        await self._tiers.stop()
        await self._consumer.stop()

    async def _revoked(self, revoked: list[TopicPartition]) -> None:
        revoked_set = set(revoked)
        if self._on_revoke is not None and revoked_set:
            await self._on_revoke(list(revoked_set))
        # Bounded like the runtime's drain; the rest is read again.
        await self._tiers.finish_requeues(revoked_set, self._settings.worker.revoke_timeout_s)
        try:
            await self.commit()
        except KafkaError as error:
            log.warning("commit on revoke failed: %s", error)
        self._assignment -= revoked_set
        self._tracker.forget(revoked_set)
        self._held.drop(revoked_set)
        self._held.assigned(self._assignment)
        for tp in revoked_set:
            self._next.pop(tp, None)
        self._tiers.forget(revoked_set)
        self._full -= revoked_set

    def _assigned(self, assigned: list[TopicPartition]) -> None:
        self._assignment = set(self._consumer.assignment())
        self._held.assigned(self._assignment)
        self._ready = True
        self._contact = time.monotonic()
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))


def _delivery(tp: TopicPartition, record: ConsumerRecord[bytes, bytes] | Unreadable) -> Delivery:
    if isinstance(record, Unreadable):
        return record.delivery(tp)
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
