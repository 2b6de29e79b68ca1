"""The worker runtime, written once for every backend: admission under the in-flight
bound, lanes (ordering), offset tracking, the commit loop, revoke and shutdown drains, the
health endpoint, the cron scheduler and its lease (`_cron`, `_leadership`), and failure
routing to retry and dead-letter records (used by the backends whose retries are records:
Kafka and memory), with the bounded hand-off and the reduced dead letters that every
backend uses (`_hand_off`), and the weighted turn among priority levels of the
sources whose levels are topics (`_weighted`)."""

from consumer.runtime._cron import CronScheduler, TickPublisher
from consumer.runtime._hand_off import store_dead_letter, until_acknowledged
from consumer.runtime._health import HealthServer
from consumer.runtime._lanes import LaneScheduler, lane_for
from consumer.runtime._offsets import OffsetTracker
from consumer.runtime._reachable import until_reachable
from consumer.runtime._record_routing import RecordFailureRouter, RecordPublisher
from consumer.runtime._replay import replay_records
from consumer.runtime._weighted import PriorityLevels, normal_topics
from consumer.runtime._worker import Worker, transactional_problem

__all__ = [
    "CronScheduler",
    "HealthServer",
    "LaneScheduler",
    "OffsetTracker",
    "PriorityLevels",
    "RecordFailureRouter",
    "RecordPublisher",
    "TickPublisher",
    "Worker",
    "lane_for",
    "normal_topics",
    "replay_records",
    "store_dead_letter",
    "transactional_problem",
    "until_acknowledged",
    "until_reachable",
]
