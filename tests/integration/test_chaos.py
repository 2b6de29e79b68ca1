"""`make chaos` in small, in every test run: 3 worker processes, SIGKILLs, a broker crash
and restart and an idempotency-store crash and restart during 1,200 jobs, on Kafka and on
NATS (the full run, 20,000 jobs and 20 kills, is `make chaos`; figures in
docs/guarantees.md). Effects are counted by job id in PostgreSQL."""

from __future__ import annotations

import pytest

from tests.chaos import chaos

pytestmark = pytest.mark.integration


@pytest.mark.timeout(600)
@pytest.mark.parametrize("broker", ["kafka", "nats"])
async def test_kills_and_restarts_lose_nothing_and_rerun_only_what_a_killed_worker_ran(
    broker: str,
) -> None:
    result = await chaos(broker, jobs=1_200, kills=3)
    assert (result.broker_restarts, result.store_restarts, result.kills) == (1, 1, 3)
    assert result.lost == 0, result
    assert result.effects == 1_200 + result.extra_runs, result
    assert result.duplicated_unexplained == 0, result
    assert result.unexpected_exits == [], result
    assert result.exit_codes == [0, 0, 0], result
