"""How a job run ended, which decides how its delivery is settled."""

from __future__ import annotations

import enum


class Outcome(enum.Enum):
    """How a job run ended. Every outcome but ABANDONED settles the delivery."""

    COMPLETED = "completed"
    DUPLICATE = "duplicate"  # completed earlier (idempotency store): skipped
    FAILED = "failed"  # failed and handed to retry / dead-letter routing
    RETRYING = "retrying"  # handed to a retry tier (broker acknowledged)
    DEAD_LETTERED = "dead_lettered"  # handed to the dead-letter topic (broker acknowledged)
    CANCELLED = "cancelled"  # cancelled by id before or while it ran
