"""G6, the runtime's record: work the runtime cut off is never settled (issue 13, K3).

Real `jobstream worker` processes and real SIGTERMs, on Kafka and on NATS (the contract
suite's buses; the memory backend's cut-offs are in `tests/unit/test_cut_off.py`). Each
test starts a worker, lets one job start, sends SIGTERM after the job outlived the drain
timeout, and checks: the worker exits 0 within the drain timeout plus the cancel grace
(plus a second for the last commit), the job is not settled (Kafka: its offset is not
committed; NATS: it is not acknowledged), and a second worker then completes it exactly
once.

- A handler that catches `CancelledError` to clean up and then returns.
- A handler that catches every `CancelledError` and carries on.
- A sync handler whose thread is blocked (as by a hung socket).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.apps.recorder import RecordJob
from tests.buses import Bus, ProcessWorker, WorkerHandle
from tests.integration.test_contract import MakeBus
from tests.support import read_sink, start_ready_workers, stop_worker, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DRAIN_S = 2.0
GRACE_S = 1.0  # worker.cancel_grace_s
EXIT_BOUND_S = DRAIN_S + GRACE_S + 3  # + the cleanup margin, the last commit, leaving


async def _bus(make: MakeBus) -> Bus:
    bus = await make(partitions=1)
    if bus.transport == "memory":
        pytest.skip("in-process workers: see tests/unit/test_cut_off.py")
    return bus


async def _start(bus: Bus, env: dict[str, str], logs: Path, app: str) -> ProcessWorker:
    if app == "app":
        [handle] = await bus.start_workers(env, logs, 1)
        assert isinstance(handle, ProcessWorker)
        return handle
    [process] = await start_ready_workers(env, logs, 1, f"tests.apps.recorder:{app}")
    return ProcessWorker(process)


async def _sigterm_within_bound(worker: ProcessWorker) -> tuple[int, float]:
    """SIGTERM; the exit code and the seconds it took (killed if past the bound)."""
    signalled = time.monotonic()
    try:
        code = await asyncio.to_thread(stop_worker, worker.process, signal.SIGTERM, EXIT_BOUND_S)
    except subprocess.TimeoutExpired:
        worker.process.kill()
        await asyncio.to_thread(worker.process.wait, 10)
        pytest.fail(f"SIGTERM: the worker did not exit within {EXIT_BOUND_S}s")
    return code, time.monotonic() - signalled


async def _cut_off_then_completed_once(
    make: MakeBus, tmp_path: Path, behaviour: str, app: str = "app"
) -> None:
    bus = await _bus(make)
    [job_id] = await bus.publish([("k", RecordJob(seq=0, key="k", behaviour=behaviour))])  # type: ignore[arg-type]
    sink = tmp_path / "sink"
    env = bus.env(
        sink,
        JOBSTREAM_WORKER__DRAIN_TIMEOUT_S=str(DRAIN_S),
        JOBSTREAM_WORKER__CANCEL_GRACE_S=str(GRACE_S),
    )
    first = await _start(bus, env, tmp_path, app)
    await wait_until(lambda: len(read_sink(sink, "start")) == 1, 60, "the job started")
    code, took = await _sigterm_within_bound(first)
    assert code == 0, "exit code after the cut-off"
    assert took >= DRAIN_S, "the job was given the drain timeout"
    assert read_sink(sink) == [], "the first run never completed"
    assert not await bus.settled(), "the cut-off job was not settled"

    second: WorkerHandle = await _start(bus, env, tmp_path, app)
    try:
        await wait_until(lambda: len(read_sink(sink)) == 1, 60, "the job completed")
        await bus.wait_settled()
    finally:
        assert await second.stop() == 0
    [done] = read_sink(sink)
    assert (done.job_id, done.pid) == (job_id, second.pid)
    assert len(read_sink(sink, "start")) == 2, "run once more, by the second worker only"


@pytest.mark.timeout(120)
async def test_a_handler_that_swallows_the_cut_off_and_returns_is_not_settled(
    make_bus: MakeBus, tmp_path: Path
) -> None:
    await _cut_off_then_completed_once(make_bus, tmp_path, "swallow-cancel-return")
    assert len(read_sink(tmp_path / "sink", "cancel-swallowed")) == 1


@pytest.mark.timeout(120)
async def test_a_handler_that_swallows_every_cancel_does_not_stop_the_shutdown(
    make_bus: MakeBus, tmp_path: Path
) -> None:
    await _cut_off_then_completed_once(make_bus, tmp_path, "swallow-cancel-forever")
    assert len(read_sink(tmp_path / "sink", "cancel-swallowed")) >= 1


@pytest.mark.timeout(120)
async def test_a_sync_handler_stuck_in_its_thread_is_abandoned_and_the_worker_exits_0(
    make_bus: MakeBus, tmp_path: Path
) -> None:
    await _cut_off_then_completed_once(make_bus, tmp_path, "sync-hang", app="sync_app")
    logs = (tmp_path / "worker-0.log").read_text()
    assert "abandon" in logs, "the stuck job is reported"
