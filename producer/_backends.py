"""The one place where the producer chooses its backend.

`settings.transport` names a package (`producer.kafka`, `producer.nats`,
`producer.memory`); it is imported here, on first use, and nowhere else, so a Kafka-only
service never imports nats-py and the other way round. Each package offers
`make_publisher(settings)`. (The consumer chooses its own backends the same way in
`consumer/_backends.py`.)
"""

from __future__ import annotations

import importlib
from typing import cast

from producer._publisher import Publisher
from producer._settings import ProducerSettings

__all__ = ["make_publisher"]


def make_publisher(settings: ProducerSettings) -> Publisher:
    """The publisher for `settings.transport`, not started."""
    backend = importlib.import_module(f"producer.{settings.transport}")
    return cast("Publisher", backend.make_publisher(settings))
