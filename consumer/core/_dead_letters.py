"""Dead letters as the runtime sees them, whatever the broker: the record, a filter, and
what a replay did.

A dead letter is the original key, body and headers of a failed job plus its failure
details (`ce_jobreason`, ...; `ce-` on NATS). Its id is `<dlq topic>:<partition>:<offset>`
on Kafka and memory, `<stream>:<sequence>` on NATS. Reading and replaying them is each
backend's business (`consumer.kafka`, `consumer.nats`, `consumer.memory`).

A replay republishes a dead letter to the job's main destination with the attempt count
reset and the failure details removed, keeping the origin trace context, and marks it
as a replay (`jobreplayof`). Its idempotency key gets a `#replay:<dead letter id>` suffix:
the failed run was recorded as final, and the replay is a new, deliberate run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from schemas.names import (
    ERROR,
    ERROR_TYPE,
    FAILURE_EXTENSIONS,
    FIRST_FAILURE,
    GROUP,
    ID,
    JOBATTEMPT,
    JOBIDEMKEY,
    JOBNOTBEFORE,
    JOBVERSION,
    KAFKA_PREFIX,
    LAST_FAILURE,
    REASON,
    REPLAY_OF,
    SOURCE_OFFSET,
    SOURCE_PARTITION,
    SOURCE_TOPIC,
    TYPE,
)


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """One dead letter as stored, with its failure details parsed from the headers."""

    topic: str
    partition: int
    offset: int
    timestamp: datetime
    key: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    value: bytes
    stream: str | None = None
    """NATS: the dead-letter stream (the offset is the stream sequence); Kafka: None."""

    @property
    def id(self) -> str:
        """Kafka `<topic>:<partition>:<offset>`; NATS `<stream>:<sequence>`."""
        if self.stream is not None:
            return f"{self.stream}:{self.offset}"
        return f"{self.topic}:{self.partition}:{self.offset}"

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value.decode("utf-8", errors="replace")
        return None

    def ext(self, name: str) -> str | None:
        """A CloudEvents attribute: `ce_<name>` (Kafka) or `ce-<name>` (NATS)."""
        value = self.header(f"ce_{name}")
        return value if value is not None else self.header(f"ce-{name}")

    @property
    def job_id(self) -> str | None:
        return self.ext(ID)

    @property
    def job_type(self) -> str | None:
        return self.ext(TYPE)

    @property
    def reason(self) -> str:
        return self.ext(REASON) or "unknown"

    @property
    def failed_at(self) -> datetime:
        value = self.ext(LAST_FAILURE)
        try:
            return datetime.fromisoformat(value) if value else self.timestamp
        except ValueError:
            return self.timestamp

    @property
    def source(self) -> str:
        """Where the job was first consumed: `topic[partition]@offset`."""
        topic, partition = self.ext(SOURCE_TOPIC), self.ext(SOURCE_PARTITION)
        return f"{topic}[{partition}]@{self.ext(SOURCE_OFFSET)}"

    def summary(self) -> dict[str, object]:
        return {
            "id": self.id,
            "job_id": self.job_id,
            "type": self.job_type,
            "version": self.ext(JOBVERSION),
            "reason": self.reason,
            "error_type": self.ext(ERROR_TYPE),
            "error": self.ext(ERROR),
            "attempts": self.ext(JOBATTEMPT),
            "source": self.source,
            "group": self.ext(GROUP),
            "first_failure": self.ext(FIRST_FAILURE),
            "last_failure": self.failed_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    job_type: str | None = None
    reason: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    ids: frozenset[str] = frozenset()

    def matches(self, record: DeadLetterRecord) -> bool:
        if self.ids and record.id not in self.ids and record.job_id not in self.ids:
            return False
        if self.job_type and record.job_type != self.job_type:
            return False
        if self.reason and record.reason != self.reason:
            return False
        failed = record.failed_at
        return not ((self.since and failed < self.since) or (self.until and failed > self.until))


@dataclass(frozen=True, slots=True)
class ReplayResult:
    record: DeadLetterRecord
    status: str
    """`replayed`, `would-replay` (dry run), `already-replayed`, or `reduced` (not
    replayable: the broker refused the whole record, so its body or headers were replaced
    by their sizes and digests; `jobreduced` says which)."""
    destination: str


def replay_headers(record: DeadLetterRecord) -> list[tuple[str, bytes]]:
    """The dead letter's headers for a fresh run: failure details out, attempt 1, marked."""
    dropped = {
        f"ce_{name}"
        for name in (*FAILURE_EXTENSIONS, JOBATTEMPT, JOBNOTBEFORE, JOBIDEMKEY, REPLAY_OF)
    }
    headers = [(k, v) for k, v in record.headers if k.lower() not in dropped]
    idempotency_key = record.ext(JOBIDEMKEY) or record.job_id or record.id
    return [
        *headers,
        ("ce_jobattempt", b"1"),
        ("ce_jobidemkey", f"{idempotency_key}#replay:{record.id}".encode()),
        (f"{KAFKA_PREFIX}{REPLAY_OF}", record.id.encode()),
    ]
