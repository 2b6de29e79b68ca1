"""What every part of the worker shares, broker-free: the app and what a handler sees, the
settings, the error tree, a delivery and the `Source` seam, a job run and the step chain,
failure decisions and details, dead letters, and the `Backend` seam.

Nothing here imports a broker client; `make check` enforces it.
"""

from consumer.core._app import (
    App,
    CancellationSignal,
    HandlerSpec,
    JobContext,
    main_destinations,
    store_connections,
)
from consumer.core._cron import MAX_CATCH_UP, CronSchedule, JobFactory
from consumer.core._dead_letters import (
    DeadLetterFilter,
    DeadLetterRecord,
    ReplayResult,
    replay_headers,
)
from consumer.core._delays import (
    MAX_DELAY_S,
    Deferrals,
    DelayPlan,
    DelayTooLong,
    plan_delay,
    remaining_s,
)
from consumer.core._due import DueQueue
from consumer.core._errors import (
    CommitUnknown,
    DeadLetter,
    JobTimeout,
    MaxDeliveries,
    Retry,
    WorkerError,
)
from consumer.core._failures import (
    ERROR,
    FAILURE_EXTENSIONS,
    FIRST_FAILURE,
    REASON,
    REPLAY_OF,
    SOURCE_TOPIC,
    cut_text,
    decide,
    error_text,
    failure_details,
    first_failure_stamp,
    traceback_text,
    unescape,
    utc_now,
)
from consumer.core._features import Features
from consumer.core._outcome import Outcome
from consumer.core._pipeline import Decision, FailureRouter, JobRun, Next, Step, compose
from consumer.core._reduction import DEAD_LETTER_FORMS, reduced_dead_letter
from consumer.core._settings import (
    CronSettings,
    IdempotencySettings,
    LoggingSettings,
    OrderingMode,
    RetryPolicy,
    RetrySettings,
    Settings,
)
from consumer.core._source import Delivery, RevokeCallback, Source

__all__ = [
    "DEAD_LETTER_FORMS",
    "ERROR",
    "FAILURE_EXTENSIONS",
    "FIRST_FAILURE",
    "MAX_CATCH_UP",
    "MAX_DELAY_S",
    "REASON",
    "REPLAY_OF",
    "SOURCE_TOPIC",
    "App",
    "CancellationSignal",
    "CommitUnknown",
    "CronSchedule",
    "CronSettings",
    "DeadLetter",
    "DeadLetterFilter",
    "DeadLetterRecord",
    "Decision",
    "Deferrals",
    "DelayPlan",
    "DelayTooLong",
    "Delivery",
    "DueQueue",
    "FailureRouter",
    "Features",
    "HandlerSpec",
    "IdempotencySettings",
    "JobContext",
    "JobFactory",
    "JobRun",
    "JobTimeout",
    "LoggingSettings",
    "MaxDeliveries",
    "Next",
    "OrderingMode",
    "Outcome",
    "ReplayResult",
    "Retry",
    "RetryPolicy",
    "RetrySettings",
    "RevokeCallback",
    "Settings",
    "Source",
    "Step",
    "WorkerError",
    "compose",
    "cut_text",
    "decide",
    "error_text",
    "failure_details",
    "first_failure_stamp",
    "main_destinations",
    "plan_delay",
    "reduced_dead_letter",
    "remaining_s",
    "replay_headers",
    "store_connections",
    "traceback_text",
    "unescape",
    "utc_now",
]
