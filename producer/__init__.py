"""Publish typed jobs to Kafka, NATS JetStream or an in-memory broker.

`JobProducer` is the entry point; `Publisher` is the transport seam under it. Each backend
is a package of its own, imported only when `transport` names it (`producer._backends`):
`producer.kafka`, `producer.nats`, `producer.memory`. See docs/producer.md.
"""

from producer._errors import (
    BrokerBusy,
    BrokerRefused,
    BrokerUnavailable,
    DestinationMissing,
    NotASpool,
    PublishError,
    PublishTimeout,
    RecordTooLarge,
    SpoolFull,
    SpoolLocked,
    UniqueKeyBusy,
    UniqueStoreUnavailable,
)
from producer._producer import JobProducer
from producer._provision import DestinationHook, plan_destinations
from producer._publisher import Publisher, Receipt
from producer._request import PublishRequest
from producer._settings import (
    CONFIG_FILE_ENV,
    ENV_PREFIX,
    PRIORITIES,
    KafkaSettings,
    NatsSettings,
    Priority,
    ProducerSettings,
    RoutingSettings,
    SpoolSettings,
    Transport,
    UniqueSettings,
    destination_level,
)
from producer._spool_status import SpoolStatus, read_spool_status
from producer._sync import SyncJobProducer
from producer._unique import MemoryUniqueStore, UniqueStore

__all__ = [
    "CONFIG_FILE_ENV",
    "ENV_PREFIX",
    "PRIORITIES",
    "BrokerBusy",
    "BrokerRefused",
    "BrokerUnavailable",
    "DestinationHook",
    "DestinationMissing",
    "JobProducer",
    "KafkaSettings",
    "MemoryUniqueStore",
    "NatsSettings",
    "NotASpool",
    "Priority",
    "ProducerSettings",
    "PublishError",
    "PublishRequest",
    "PublishTimeout",
    "Publisher",
    "Receipt",
    "RecordTooLarge",
    "RoutingSettings",
    "SpoolFull",
    "SpoolLocked",
    "SpoolSettings",
    "SpoolStatus",
    "SyncJobProducer",
    "Transport",
    "UniqueKeyBusy",
    "UniqueSettings",
    "UniqueStore",
    "UniqueStoreUnavailable",
    "destination_level",
    "plan_destinations",
    "read_spool_status",
]
