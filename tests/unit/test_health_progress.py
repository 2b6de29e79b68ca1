"""Readiness and liveness come from progress (issue 13, K5): a source whose broker stops
answering makes the worker unready after `health.readiness_silence_s` (probed meanwhile,
since an idle member fetches nothing), and not live after `health.liveness_silence_s`; a
fetch loop that stops turning makes it not live too; an answer makes it ready again.
The same answers over HTTP, with the reason in the body. Against real brokers:
tests/integration/test_health_progress.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from consumer import Settings, Worker
from consumer.core import Delivery, Outcome, RevokeCallback
from consumer.runtime import HealthServer
from consumer.runtime._health import Thresholds
from tests.apps.recorder import app
from tests.support import http_status

READY_S, LIVE_S = 0.4, 1.5


class FakeSource:
    """A group member with nothing to read, whose broker answers while `answers` is set."""

    def __init__(self) -> None:
        self.last_contact = time.monotonic()
        self.answers = True
        self.flowing = asyncio.Event()  # cleared: fetch does not return (a stuck client)
        self.flowing.set()
        self.probes = 0
        self.ready = True

    async def start(self, on_revoke: RevokeCallback) -> None:
        pass

    async def fetch(self, max_records: int, timeout_s: float) -> list[Delivery]:
        await self.flowing.wait()
        await asyncio.sleep(timeout_s)
        return []  # nothing to read: no answer either way, as an idle Kafka member

    async def probe(self) -> None:
        self.probes += 1
        if not self.answers:
            await asyncio.sleep(3600)  # a hung broker: the worker bounds the wait
        self.last_contact = time.monotonic()

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        pass

    def pending_commits(self) -> int:
        return 0

    async def commit(self) -> None:
        pass

    def owns(self, delivery: Delivery) -> bool:
        return True

    async def stop(self) -> None:
        pass


@contextlib.asynccontextmanager
async def running(source: FakeSource) -> AsyncIterator[Worker]:
    settings = Settings.model_validate(
        {
            "transport": "memory",
            "health": {"readiness_silence_s": READY_S, "liveness_silence_s": LIVE_S},
        }
    )
    worker = Worker(app, settings, source)
    task = asyncio.create_task(worker.run())
    try:
        await until(lambda: worker.ready, 5, "ready")
        yield worker
    finally:
        worker.stop()
        await task


async def until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {timeout_s}s"
        await asyncio.sleep(0.02)


async def test_a_silent_broker_makes_the_worker_unready_then_not_live() -> None:
    source = FakeSource()
    async with running(source) as worker:
        await asyncio.sleep(READY_S * 2)
        assert worker.ready, "an idle member stays ready: the probes are answered"
        assert source.probes >= 1

        source.answers = False
        silenced = time.monotonic()
        await until(lambda: not worker.ready, READY_S + 2, "unready")
        assert time.monotonic() - silenced >= READY_S / 2
        assert "no answer from the broker" in (worker.not_ready() or "")
        assert worker.not_live() is None
        await until(lambda: worker.not_live() is not None, LIVE_S + 2, "not live")
        assert "health.liveness_silence_s" in (worker.not_live() or "")

        source.answers = True
        await until(lambda: worker.ready and worker.not_live() is None, READY_S + 2, "ready")


async def test_a_fetch_loop_that_stops_turning_makes_the_worker_not_live() -> None:
    source = FakeSource()
    async with running(source) as worker:
        source.flowing.clear()
        await until(lambda: worker.not_live() is not None, LIVE_S + 2, "not live")
        assert "fetch loop" in (worker.not_live() or "")
        source.flowing.set()
        await until(lambda: worker.not_live() is None, 2, "live")


async def test_the_endpoints_answer_with_the_reason() -> None:
    source = FakeSource()
    async with running(source) as worker:
        health = HealthServer("127.0.0.1", 0, live=worker.not_live, ready=worker.not_ready)
        await health.start()
        try:
            port = health.port
            assert await asyncio.to_thread(http_status, port, "/readyz") == 200
            source.answers = False
            await until(lambda: not worker.ready, READY_S + 2, "unready")
            assert await asyncio.to_thread(http_status, port, "/readyz") == 503
            assert await asyncio.to_thread(http_status, port, "/livez") == 200
            source.answers = True
            await until(lambda: worker.ready, READY_S + 2, "ready")
            assert await asyncio.to_thread(http_status, port, "/readyz") == 200
        finally:
            await health.stop()


def test_thresholds_default_from_the_group_timeouts() -> None:
    settings = Settings.model_validate(
        {"worker": {"session_timeout_s": 12, "max_poll_interval_s": 100}}
    )
    assert Thresholds.from_settings(settings) == Thresholds(ready_s=8.0, live_s=100.0)
    settings = Settings.model_validate({"health": {"readiness_silence_s": 3}})
    assert Thresholds.from_settings(settings).ready_s == 3.0
