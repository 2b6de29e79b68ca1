"""The outbox relay and transactional handlers under SIGKILLs, on real brokers (issue 18):
tests/chaos_outbox.py in small (the full runs, 20,000 jobs, are in docs/guarantees.md).
Effects are rows committed with the job's completion, counted by job id."""

from __future__ import annotations

import pytest

from tests.chaos_outbox import outbox_chaos

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(300)
async def test_relay_sigkills_publish_every_committed_job_once_in_key_order() -> None:
    # 2,000 jobs added by 2 processes while the relay holding the lock is SIGKILLed 3 times.
    result = await outbox_chaos(
        "kafka", jobs=2_000, adders=2, relays=2, relay_kills=3, workers=2, rate=200.0
    )
    assert result.relay_kills == 3, result
    assert result.rolled_back > 0, result
    assert result.committed + result.rolled_back == 2_000, result
    assert (result.lost, result.duplicated, result.phantom) == (0, 0, 0), result
    assert result.effects == result.committed, result
    assert (result.keys_out_of_order, result.published_out_of_order) == (0, 0), result
    assert result.published >= result.committed, result
    assert result.relay_exits == [0, 0], result


@pytest.mark.timeout(300)
@pytest.mark.parametrize("broker", ["kafka", "nats"])
async def test_workers_sigkilled_mid_transaction_leave_no_effect_twice(broker: str) -> None:
    # 300 ms inside each transaction and more jobs than the workers can take: every worker
    # is busy with 4 transactions whenever it is killed.
    result = await outbox_chaos(
        broker,
        jobs=600,
        adders=1,
        relays=1,
        relay_kills=0,
        workers=3,
        worker_kills=3,
        rate=100.0,
        work_ms=300,
    )
    assert result.worker_kills == 3, result
    assert result.interrupted >= 3, f"the kills must land inside transactions: {result}"
    assert (result.lost, result.duplicated, result.phantom) == (0, 0, 0), result
    assert result.effects == result.committed, result
    assert result.worker_exits == [0, 0, 0], result
