"""A submitted job's publish options, parsed the same way for the CLI (`--delay`,
`--priority`, `--unique-key`, ..., an `--envelope` line's fields) and the ingress (`?delay=`,
`?priority=`, `?unique_key=`, ...).

`parse_job_options` turns the raw values (text from a flag or a query, or JSON values from
an envelope line) into `JobOptions`, or raises a `ValueError` whose message names the
option and says what is accepted. What depends on the settings (a priority other than
`normal` needs `routing.priorities`; a unique key needs `unique.url`) is checked by the
producer, whose `ValueError` the caller reports the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jobstream._schedule import Schedule, parse_schedule, seconds_of
from producer import PRIORITIES, Priority

__all__ = ["JobOptions", "parse_job_options"]

Names = Callable[[str], str]
"""How the caller spells an option (`"unique_key"` -> `"--unique-key"`)."""


@dataclasses.dataclass(frozen=True, slots=True)
class JobOptions:
    """`delay`/`not_before`, `priority` and `unique_key`/`unique_for` of one job."""

    schedule: Schedule | None = None
    priority: Priority = "normal"
    unique_key: str | None = None
    unique_for_s: float | None = None

    @property
    def canonical(self) -> str | None:
        """The options as given, normalized, for the ingress's `Idempotency-Key`
        fingerprint; None for the defaults (so bindings of earlier versions keep their
        digest), the schedule's own `canonical` when only it is given."""
        parts = [self.schedule.canonical] if self.schedule is not None else []
        if self.priority != "normal":
            parts.append(f"priority={self.priority}")
        if self.unique_key is not None:
            parts.append(f"unique_key={self.unique_key}")
            parts.append(f"unique_for={self.unique_for_s!r}")
        return "&".join(parts) if parts else None

    def publish_options(self, *, relative: bool = True) -> dict[str, Any]:
        """`JobProducer.publish`'s keywords. `relative`: a delay stays one, counted from
        each job's publish (as `publish(delay=)` does); else it is the parsed `not_before`
        (the ingress records that very time in the job's status)."""
        options: dict[str, Any] = {}
        if self.schedule is not None:
            if relative and self.schedule.delay_s is not None:
                options["delay"] = self.schedule.delay_s
            else:
                options["not_before"] = self.schedule.not_before
        if self.priority != "normal":
            options["priority"] = self.priority
        if self.unique_key is not None:
            options["unique_key"] = self.unique_key
            options["unique_for"] = self.unique_for_s
        return options


def parse_job_options(get: Callable[[str], object], names: Names = lambda name: name) -> JobOptions:
    """The options `get(name)` gives (None for an absent one) for `delay`, `not_before`,
    `priority`, `unique_key` and `unique_for`. `ValueError` naming the option for a value
    that is not accepted, and for `unique_for` without `unique_key` or the reverse."""
    schedule = parse_schedule(
        get("delay"), get("not_before"), names=(names("delay"), names("not_before"))
    )
    priority = _priority(get("priority"), names("priority"))
    unique_key, unique_for = get("unique_key"), get("unique_for")
    if unique_key is None and unique_for is None:
        return JobOptions(schedule, priority)
    if unique_key is None:
        msg = f"{names('unique_for')} needs {names('unique_key')}"
        raise ValueError(msg)
    if not isinstance(unique_key, str) or not unique_key:
        msg = f"{names('unique_key')} must be a non-empty string, got {unique_key!r}"
        raise ValueError(msg)
    if unique_for is None:
        msg = (
            f"{names('unique_key')} needs {names('unique_for')}: how many seconds the key "
            "stays taken after the first publish"
        )
        raise ValueError(msg)
    window = seconds_of(unique_for, names("unique_for"), zero=False)
    return JobOptions(schedule, priority, unique_key, window)


def _priority(value: object, name: str) -> Priority:
    if value is None or value == "normal":
        return "normal"
    if value == "high":
        return "high"
    if value == "low":
        return "low"
    msg = f"{name} must be one of {', '.join(PRIORITIES)}, got {value!r}"
    raise ValueError(msg)
