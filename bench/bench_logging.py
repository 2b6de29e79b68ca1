"""Per-job CPU cost of the JSON job log line: the `jobstream.job` logger at INFO (one line
per job) against WARNING (no line for a job that succeeds).

    python bench/bench_logging.py [--jobs 20000] [--repeats 5]

The harness is `bench_tracing.py`'s: no broker, an in-memory `Source` hands
`consumer.Worker` N prepared deliveries of a no-op job, tracing and metrics off. Logging is
set up as `jobstream worker` sets it up (`configure_logging`, JSON format), and the
process's stderr (file descriptor 2) points at /dev/null while the modes run, so the
figures are formatting and writing, not a terminal or a log collector. The clock is
`time.process_time()` of the whole process from `run()` to the N-th settle, plus the
flush of the log handler (a buffered handler's background thread is counted too).

Modes run interleaved, `--repeats` times each; the median is reported with the difference
to "off". A second table times the logging step alone around a no-op `call_next`, which
isolates the line's cost from the rest of the runtime and from a busy machine's noise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import statistics
import sys
import time
from collections.abc import Iterator

from bench_tracing import MemorySource, bench_app, deliveries, telemetry_for

from consumer import Settings, Worker
from consumer.core import JobRun, LoggingSettings, Outcome
from consumer.steps import logging_step
from consumer.telemetry import configure_logging

MODES = {"off": "WARNING", "info": "INFO"}


@contextlib.contextmanager
def stderr_to_devnull() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        for handler in logging.getLogger("jobstream").handlers:
            handler.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def flush_logs() -> None:
    for handler in logging.getLogger("jobstream").handlers:
        handler.flush()


async def run_once(mode: str, n: int) -> float:
    """CPU microseconds per job of the whole worker."""
    level = MODES[mode]
    configure_logging(LoggingSettings(level=level, format="json"))
    settings = Settings(worker={"ordering": "none", "max_in_flight": 256}, logging={"level": level})
    done = asyncio.Event()
    source = MemorySource(deliveries(n), done)
    gc.collect()
    gc.freeze()
    telemetry, _ = telemetry_for("off")
    worker = Worker(bench_app(), settings, source, telemetry=telemetry)
    started = time.process_time()
    task = asyncio.create_task(worker.run())
    await done.wait()
    flush_logs()
    cpu = time.process_time() - started
    worker.stop()
    await task
    gc.unfreeze()
    return cpu / n * 1e6


async def step_alone(mode: str, runs: list[JobRun]) -> float:
    """CPU microseconds per job of the logging step around a no-op."""

    async def completed(run: JobRun) -> Outcome:
        return Outcome.COMPLETED

    configure_logging(LoggingSettings(level=MODES[mode], format="json"))
    started = time.process_time()
    for run in runs:
        await logging_step(run, completed)
    flush_logs()
    return (time.process_time() - started) / len(runs) * 1e6


async def main(args: argparse.Namespace) -> None:
    results: dict[str, list[float]] = {mode: [] for mode in MODES}
    alone: dict[str, list[float]] = {mode: [] for mode in MODES}
    with stderr_to_devnull():
        await run_once("off", 2000)  # warm up imports and caches
        for _ in range(args.repeats):
            for mode in MODES:
                results[mode].append(await run_once(mode, args.jobs))
        worker = Worker(bench_app(), Settings(), MemorySource([], asyncio.Event()))
        runs = [worker._job_run(d) for d in deliveries(args.jobs)]
        gc.collect()
        gc.freeze()
        for _ in range(args.repeats):
            for mode in MODES:
                alone[mode].append(await step_alone(mode, runs))
        gc.unfreeze()
    load = os.getloadavg()
    print(f"{args.jobs} jobs per run, {args.repeats} runs per mode, median CPU per job")
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    base = statistics.median(results["off"])
    print(f"{'mode':<6} {'CPU us/job':>11} {'vs off':>9} {'min':>7}   runs")
    for mode in MODES:
        median = statistics.median(results[mode])
        values = " ".join(f"{value:.1f}" for value in results[mode])
        low = min(results[mode])
        print(f"{mode:<6} {median:>11.1f} {median - base:>+9.1f} {low:>7.1f}   {values}")
    print("\nthe logging step alone (around a no-op), median CPU per job")
    print(f"{'mode':<6} {'CPU us/job':>11}   runs")
    for mode in MODES:
        values = " ".join(f"{value:.1f}" for value in alone[mode])
        print(f"{mode:<6} {statistics.median(alone[mode]):>11.1f}   {values}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
