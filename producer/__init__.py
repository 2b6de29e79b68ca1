"""Publish typed jobs to Kafka or NATS JetStream."""

from producer._connection import kafka_client_options
from producer._settings import KafkaSettings, NatsSettings, ProducerSettings, RoutingSettings

__all__ = ["KafkaSettings", "NatsSettings", "ProducerSettings", "RoutingSettings", "kafka_client_options"]
