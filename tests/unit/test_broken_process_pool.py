"""A `cpu_bound` pool process that dies (killed, out of memory, a native crash) breaks its
whole pool; the worker replaces the pool and runs the job again, on its same attempt: it is
neither failed nor dead-lettered, and the jobs after it complete (issue 13, K5)."""

from __future__ import annotations

from pathlib import Path

from consumer import Settings
from consumer.core import Outcome
from consumer.memory import TestApp
from tests.apps.cpu import CrunchJob, app


async def test_a_dead_pool_process_is_replaced_and_its_job_run_again(tmp_path: Path) -> None:
    marker = tmp_path / "died"
    settings = Settings.model_validate(
        {
            "transport": "memory",
            "worker": {"process_pool_size": 2, "max_in_flight": 4},
            # Were the death a failure, it would show as a retry, then a dead letter, soon.
            "retry": {"policy": {"max_attempts": 2, "initial_delay_s": 0}, "tiers_s": [0.1]},
        }
    )
    async with TestApp(app, settings) as t:
        before = [await t.publish(CrunchJob(seq=seq)) for seq in range(3)]
        await t.drain(30)
        dying = await t.publish(CrunchJob(seq=3, die_marker=str(marker)))
        after = [await t.publish(CrunchJob(seq=seq)) for seq in range(4, 12)]
        await t.drain(60)
        assert not t.workers[0].stopped_by_fault

    assert marker.exists(), "the job killed its pool process"
    assert t.dead_letters() == []
    for receipt in [*before, dying, *after]:
        settled = [(s.outcome, s.attempt) for s in t.settlements(receipt.job_id)]
        assert settled == [(Outcome.COMPLETED, 1)], receipt.job_id
    assert t.workers[0].counts == {"completed": 12}
