"""A handler that raises a `BaseException` that is not an `Exception` fails its job, never
the worker (issue 13, K1): SystemExit and KeyboardInterrupt (which asyncio would let stop
the event loop), GeneratorExit, exception groups, a class of the handler's own, from an
async handler or from a sync one in its thread, and an exception whose `__str__` raises a
KeyboardInterrupt. Each job is dead-lettered with a reason naming what was raised; the
jobs after it complete, their offsets are committed, and the worker stops cleanly."""

from __future__ import annotations

from typing import Literal

import pytest

from consumer import App, JobContext
from consumer.core import Outcome, Settings
from consumer.memory import TestApp
from schemas import Job

Kind = Literal["system-exit", "keyboard", "generator-exit", "group", "own", "str-raises", "ok"]


class Odd(Job, type="test.base.odd", version=1):
    kind: Kind


class OddSync(Job, type="test.base.oddsync", version=1):
    kind: Kind


class Own(BaseException):
    pass


class Unprintable(Exception):
    def __str__(self) -> str:
        raise KeyboardInterrupt


def fail(kind: Kind) -> None:
    if kind == "system-exit":
        raise SystemExit(3)
    if kind == "keyboard":
        raise KeyboardInterrupt
    if kind == "generator-exit":
        raise GeneratorExit
    if kind == "group":
        raise BaseExceptionGroup("several", [ValueError("a"), KeyboardInterrupt()])
    if kind == "own":
        raise Own("mine")
    if kind == "str-raises":
        raise Unprintable


app = App("base-exceptions")


@app.handler(Odd)
async def odd(job: Odd, ctx: JobContext) -> None:
    fail(job.kind)


@app.handler(OddSync)
def odd_sync(job: OddSync, ctx: JobContext) -> None:
    fail(job.kind)


KINDS: list[Kind] = ["system-exit", "keyboard", "generator-exit", "group", "own", "str-raises"]
SETTINGS = Settings.model_validate(
    {
        "transport": "memory",
        "worker": {"commit_interval_s": 0.02, "ordering": "partition"},
        "retry": {"policy": {"max_attempts": 1}, "tiers_s": [0.05]},
    }
)


@pytest.mark.parametrize("job_type", [Odd, OddSync])
async def test_a_base_exception_from_a_handler_dead_letters_its_job_only(
    job_type: type[Odd] | type[OddSync],
) -> None:
    async with TestApp(app, SETTINGS) as t:
        bad = [await t.publish(job_type(kind=kind)) for kind in KINDS]
        good = await t.publish(job_type(kind="ok"))
        await t.drain(timeout_s=10)
        for receipt in bad:
            assert t.outcome(receipt.job_id) is Outcome.DEAD_LETTERED, receipt
        assert t.outcome(good.job_id) is Outcome.COMPLETED
        letters = {letter.job_id: letter for letter in t.dead_letters()}
        assert set(letters) == {receipt.job_id for receipt in bad}
        for receipt, kind in zip(bad, KINDS, strict=True):
            error = letters[receipt.job_id].ext("joberror") or ""
            raised = {
                "system-exit": "SystemExit",
                "keyboard": "KeyboardInterrupt",
                "generator-exit": "GeneratorExit",
                "group": "BaseExceptionGroup",
                "own": "Own",
                "str-raises": "unprintable Unprintable",
            }[kind]
            assert raised in error, (kind, error)
        partition = good.partition or 0
        committed = t.broker.committed(SETTINGS.worker.group, good.destination, partition)
        assert committed == good.offset + 1, "every offset settled and committed"
        assert not any(worker.stopped_by_fault for worker in t.workers)
