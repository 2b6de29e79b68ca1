"""Which topics and streams jobstream needs.

`jobstream topics ensure` and `create_missing=True` are the only callers that create them:
publishing never creates anything by itself. Creating is the backend's business
(`producer.kafka.ensure_kafka_topics`, `producer.nats.ensure_nats_stream`).

`plan_destinations` is the one place that lists destinations; pass `extra` hooks to add
more per job type (retry tiers, a dead-letter topic) without changing this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from producer._settings import ProducerSettings

__all__ = ["DestinationHook", "plan_destinations"]

DestinationHook = Callable[[str, str], Iterable[str]]
"""(job type, its main topic or subject) -> more destinations to provision for it."""


def plan_destinations(
    settings: ProducerSettings, job_types: Iterable[str], extra: Sequence[DestinationHook] = ()
) -> list[str]:
    """Topics (Kafka, memory) or subjects (NATS) for `job_types`, without repeats: each main
    one at every priority level (`routing.priorities`); the hooks get the normal level's."""
    planned: list[str] = []
    for job_type in job_types:
        main = settings.destination(job_type)
        planned.extend(settings.routing.level_destinations(main))
        for hook in extra:
            planned.extend(hook(job_type, main))
    return list(dict.fromkeys(planned))
