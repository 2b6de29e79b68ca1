"""Finding the record aiokafka cannot parse (issue 13, K1), so that it is dead-lettered
instead of stopping every partition.

A record aiokafka cannot parse (a header name that is not UTF-8, a corrupt batch) makes
`getmany` raise, for every partition at once. `UnreadableFinder.isolate` puts each
fetchable partition back after the last record the source received (a failed `getmany`
may have advanced positions whose records it dropped), then reads the partitions alone,
one record at a time, until the parse fails again: the failing partition's position is
then the unreadable record. It is handed to the source as an `Unreadable` at that offset
(dead-lettered as an `UnreadableRecord`, its offset committed after it) and the partition
moves past it. Each round hands out records or a dead letter; an error no partition
reproduces stops the worker after `_UNREPRODUCED_LIMIT` rounds in a row.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence, Set
from typing import NamedTuple

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import (
    ConsumerStoppedError,
    CorruptRecordException,
    IllegalStateError,
    KafkaError,
)

from consumer.core import Delivery, WorkerError
from schemas import UnreadableRecord

log = logging.getLogger("jobstream.kafka")
# How long one partition is polled alone, and how many parse errors in a row no partition
# reproduces before the worker stops.
_ALONE_WAIT_MS = 2000
_UNREPRODUCED_LIMIT = 3


class Unreadable(NamedTuple):
    """Where aiokafka failed to parse a record, held among the parsed ones."""

    offset: int
    error: Exception

    def delivery(self, tp: TopicPartition) -> Delivery:
        """The delivery that dead-letters it as an `UnreadableRecord`."""
        where = f"{tp.topic}[{tp.partition}]@{self.offset}"
        error = UnreadableRecord(
            f"aiokafka cannot parse the record at {where} (or one before it in its batch): "
            f"{type(self.error).__name__}: {self.error}"
        )
        return Delivery(tp, self.offset, tp.topic, None, b"", error=error)


Received = Callable[[TopicPartition, Sequence["ConsumerRecord[bytes, bytes] | Unreadable"]], None]
"""The source's hand for what was read: holds the records, moves its received position."""


def unparsable(error: Exception) -> bool:
    """A record aiokafka cannot parse, as opposed to a broker or client error."""
    if isinstance(error, CorruptRecordException):
        return True
    return not isinstance(error, KafkaError | ConsumerStoppedError)


class UnreadableFinder:
    """Reads the source's partitions alone after `getmany` failed to parse a record."""

    def __init__(self, consumer: AIOKafkaConsumer, fetch_max: int, receive: Received) -> None:
        """`fetch_max`: the records read alone per round, at most; `receive`: where the
        records read alone, and the unreadable one, go (the source's `_receive`)."""
        self._consumer = consumer
        self._fetch_max = fetch_max
        self._receive = receive
        self._unreproduced = 0

    async def isolate(
        self,
        error: Exception,
        assignment: Set[TopicPartition],
        received: Mapping[TopicPartition, int],
    ) -> None:
        """`getmany` raised `error` parsing a record of some partition of `assignment`:
        find it, hand an `Unreadable` at its offset and move the partition past it.
        `received`: per partition, the offset after the last record received."""
        fetchable = sorted(assignment - self._consumer.paused())
        for tp in fetchable:  # a failed getmany drops what it drained, positions moved on
            with contextlib.suppress(IllegalStateError):  # revoked meanwhile
                if tp in received:
                    self._consumer.seek(tp, received[tp])
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
                if not unparsable(error):
                    raise
                self._skip_unreadable(tp, await self._consumer.position(tp), error)
                return True, budget
            if not batch.get(tp):
                break
            self._receive(tp, batch[tp])
            budget -= 1
        return False, budget

    def _skip_unreadable(self, tp: TopicPartition, offset: int, error: Exception) -> None:
        # No await since `position` answered: `tp` is still assigned, so the order of
        # the hand-over and the seek cannot matter.
        self._receive(tp, [Unreadable(offset, error)])
        self._consumer.seek(tp, offset + 1)
        log.error(
            "%s[%d]@%d cannot be parsed (%r): dead-lettered as unreadable-record",
            tp.topic,
            tp.partition,
            offset,
            error,
        )
