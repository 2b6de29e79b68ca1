"""What a job's failure causes, as exception classes.

```
JobstreamError (schemas)                    root of every jobstream error
├── JobDecodeError (schemas)                dead-letter: the record cannot become a job
│   ├── InvalidAttributes, UndecodableBody, UnknownJobType,
│   ├── UnsupportedVersion, InvalidPayload
│   └── DelayTooLong (consumer.core._delays) `not_before` beyond the maximum delay
├── PublishError (producer)                 the broker did not take a record
├── Retry(delay_s=None)                     raised by a handler: retry, optionally after delay_s
├── DeadLetter(reason)                      raised by a handler: do not retry, dead-letter now
├── JobTimeout                              retriable: the job ran past its timeout
├── CommitUnknown                           retriable: no answer to the COMMIT of a
│                                           transactional handler (the completion
│                                           record decides what the retry does)
├── MaxDeliveries                           dead-letter: the broker's last delivery (NATS
│                                           max_deliver) after crashes or cut-offs
└── WorkerError                             fatal: the worker exits non-zero, the
                                            orchestrator restarts it
```

Any other exception a handler raises is retriable, unless its type is listed in
`retry.non_retriable` (settings).
"""

from __future__ import annotations

from typing import ClassVar

from schemas import JobstreamError


class Retry(JobstreamError):
    """Raise in a handler to ask for another attempt, optionally after `delay_s`."""

    retriable: ClassVar[bool] = True
    reason: ClassVar[str] = "retry-requested"

    def __init__(
        self, message: str = "retry requested by the handler", *, delay_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.delay_s = delay_s


class DeadLetter(JobstreamError):
    """Raise in a handler when retrying cannot help: the job goes to the dead-letter topic."""

    retriable: ClassVar[bool] = False
    reason: ClassVar[str] = "dead-letter-requested"


class JobTimeout(JobstreamError):
    """The job ran past its timeout (retriable)."""

    retriable: ClassVar[bool] = True
    reason: ClassVar[str] = "timeout"

    def __init__(self, limit_s: float) -> None:
        super().__init__(f"job did not finish within its timeout of {limit_s:g}s")
        self.limit_s = limit_s


class CommitUnknown(JobstreamError):
    """The COMMIT of a transactional handler's transaction got no answer (connection lost,
    cancelled while committing): the effect and its completion record landed together or
    not at all, and which is unknown here. Retriable: the retry's claim finds the
    completion (skipped) or finds none (runs). Never reported as done."""

    retriable: ClassVar[bool] = True
    reason: ClassVar[str] = "commit-unknown"

    def __init__(self, error: BaseException) -> None:
        super().__init__(
            f"the commit of the job's transaction got no answer ({error!r}): the job is "
            "retried, and its completion record decides whether it runs again"
        )


class MaxDeliveries(JobstreamError):
    """The broker delivers the job for the last time (JetStream `max_deliver`), after
    redeliveries that were not failures (crashes, cut-offs): it is dead-lettered instead
    of run, or it would stay unacknowledged in the stream for ever."""

    retriable: ClassVar[bool] = False
    reason: ClassVar[str] = "max-deliveries"

    def __init__(self, deliveries: int) -> None:
        super().__init__(
            f"delivered {deliveries} times (the consumer's max_deliver) without being settled: "
            "look for worker crashes or cut-offs (drain and revoke timeouts) of this job"
        )
        self.deliveries = deliveries


class WorkerError(JobstreamError):
    """A fault of the worker itself: it stops and exits non-zero."""

    retriable: ClassVar[bool] = False
    reason: ClassVar[str] = "worker-error"
