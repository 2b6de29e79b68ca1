"""When a job submitted by the CLI (`--delay`, `--not-before`, an `--envelope` line's
`"delay"`/`"not_before"`) or the ingress (`?delay=`, `?not_before=`) may start.

One parser for both, so they accept and refuse the same values: a delay is a finite number
of seconds >= 0, a time is ISO 8601 with a timezone (a naive time would mean the clock of
whoever reads it), not both. Either may be at most `MAX_DELAY_S` ahead: a job due later
would be dead-lettered (`delay-too-long`) by the worker at its first delivery, so it is
refused here, where the caller can still fix it. Every error is a `ValueError` whose
message names the option and says what is accepted.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from consumer.core import MAX_DELAY_S

__all__ = ["Schedule", "parse_schedule", "seconds_of"]


class Schedule(NamedTuple):
    """A parsed `delay` or `not_before`."""

    not_before: datetime
    """The time the job may start (UTC), `now + delay` for a delay."""
    delay_s: float | None
    """The delay as given (seconds), None for a time."""

    @property
    def canonical(self) -> str:
        """The request as given, normalized (`delay=60.0`, `not_before=` the UTC time): the
        ingress's `Idempotency-Key` fingerprint part. A retry of `?delay=60` names the same
        request, although its `now + 60` differs."""
        if self.delay_s is not None:
            return f"delay={self.delay_s!r}"
        return f"not_before={self.not_before.isoformat(timespec='microseconds')}"


def parse_schedule(
    delay: object,
    not_before: object,
    *,
    names: tuple[str, str] = ("delay", "not_before"),
    now: datetime | None = None,
) -> Schedule | None:
    """`delay` (seconds: a number, or text from a flag or query) or `not_before` (ISO 8601
    text), None when neither is given. `names`: how the caller spells the two options, for
    the messages (`("--delay", "--not-before")`)."""
    delay_name, time_name = names
    if delay is not None and not_before is not None:
        msg = f"give {delay_name} or {time_name}, not both"
        raise ValueError(msg)
    now = now or datetime.now(UTC)
    if delay is not None:
        seconds = _seconds(delay, delay_name)
        return Schedule(now + timedelta(seconds=seconds), seconds)
    if not_before is not None:
        due = _time(not_before, time_name)
        if (due - now).total_seconds() > MAX_DELAY_S:
            msg = f"{time_name} {not_before} is further ahead than {_limit()}; {_advice()}"
            raise ValueError(msg)
        return Schedule(due, None)
    return None


def seconds_of(value: object, name: str, *, zero: bool = True) -> float:
    """`value` (a number, or text from a flag or query) as a finite number of seconds,
    `>= 0` (`> 0` without `zero`); `ValueError` naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        msg = f"{name} must be a number of seconds, got {value!r}"
        raise ValueError(msg)
    try:
        seconds = float(value)
    except ValueError:
        msg = f"{name} must be a number of seconds (e.g. 30 or 2.5), got {value!r}"
        raise ValueError(msg) from None
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero):
        bound = ">= 0" if zero else "> 0"
        msg = f"{name} must be a finite number of seconds {bound}, got {value!r}"
        raise ValueError(msg)
    return seconds


def _seconds(value: object, name: str) -> float:
    seconds = seconds_of(value, name)
    if seconds > MAX_DELAY_S:
        msg = f"{name} {value} is longer than {_limit()}; {_advice()}"
        raise ValueError(msg)
    return seconds


def _time(value: object, name: str) -> datetime:
    example = "e.g. 2026-12-01T09:30:00Z or 2026-12-01T10:30:00+01:00"
    if not isinstance(value, str):
        msg = f"{name} must be an ISO 8601 time with a timezone ({example}), got {value!r}"
        raise ValueError(msg)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        msg = f"{name} must be an ISO 8601 time with a timezone ({example}), got {value!r}"
        if re.search(r" \d\d:?\d\d$", value):  # a URL's `+01:00` arrives as ` 01:00`
            msg += "; in a URL, send the + of the offset as %2B"
        raise ValueError(msg) from None
    if parsed.utcoffset() is None:
        msg = f"{name} {value!r} has no timezone: add one ({example})"
        raise ValueError(msg)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        msg = f"{name} {value!r} is out of range"
        raise ValueError(msg) from None


def _limit() -> str:
    return f"the {MAX_DELAY_S / 86400:g} days a job may wait (consumer.core.MAX_DELAY_S)"


def _advice() -> str:
    return "publish it closer to its time (docs/scheduling.md, Maximum delay)"
