"""The in-memory backend of the worker, shipped for tests: `TestApp` runs an app's handlers
on real workers over a `producer.memory.MemoryBroker`; `MemoryBackend` and `MemorySource`
give the broker Kafka's consumer semantics (consumer groups and rebalances, commits after
settle, retry tier and dead-letter topics, a replay ledger). The broker's faults
(`broker.faults`) and `TestApp.crash` make failures deterministic. Imports no broker
client; selected by `consumer/_backends.py` for `transport = "memory"`. See docs/testing.md.
"""

from consumer.memory._backend import MemoryBackend
from consumer.memory._source import MemorySource
from consumer.memory._testing import Settlement, TestApp
from producer import memory as _memory

__all__ = ["BACKEND", "MemoryBackend", "MemorySource", "Settlement", "TestApp"]

BACKEND = MemoryBackend(_memory.BROKER)
"""The backend `transport = "memory"` selects, on the process's broker
(`producer.memory.BROKER`, which `JobProducer` with `transport = "memory"` uses too)."""
