"""Publish a mix of example jobs to the local Kafka, run a worker on them, and print what
happened to each. `make demo` runs this after `make up`; exits 0 only if every job completed.
"""

from __future__ import annotations

import asyncio
import sys
import time

from rich.console import Console
from rich.table import Table

from consumer import Settings, open_worker
from consumer._run import routing_topics, topics_for
from examples.app import app, completed
from producer import JobProducer, PublishRequest
from schemas.examples import GenerateReport, ResizeImage, SendWelcomeEmail, SendWelcomeEmailV2


def _jobs() -> list[PublishRequest]:
    jobs: list[PublishRequest] = []
    for i in range(4):
        email = SendWelcomeEmail(
            user_id=f"user-{i}", email=f"user{i}@example.com", name=f"User {i}"
        )
        jobs.append(PublishRequest(email, key=f"user-{i}"))
    v2 = SendWelcomeEmailV2(
        user_id="user-9", email="nine@example.com", name="Nine", marketing_opt_in=True
    )
    jobs.append(PublishRequest(v2, key="user-9"))
    for i in range(3):
        resize = ResizeImage(upload_id=f"upload-{i}", source_url=f"https://img.example.com/{i}.png",
                             width=640, height=480, format="webp")  # fmt: skip
        jobs.append(PublishRequest(resize, key=f"upload-{i}"))
    jobs.append(
        PublishRequest(GenerateReport(account_id="acme", month="2026-10", format="pdf"), key="acme")
    )
    return jobs


async def main() -> int:
    console = Console()
    settings = Settings(
        worker={"group": "jobstream-demo", "commit_interval_s": 0.2}, health={"port": 0}
    )
    topics = topics_for(app, settings)
    async with JobProducer(settings) as producer:
        await producer.publisher.ensure([*topics, *routing_topics(app, settings)])
        receipts = await producer.publish_many(_jobs())
    console.print(f"published {len(receipts)} jobs to {', '.join(topics)}")
    ids = {receipt.job_id for receipt in receipts}
    async with open_worker(app, settings) as worker:
        running = asyncio.create_task(worker.run())
        deadline = time.monotonic() + 60
        # Polls the app's record of completed jobs, with a deadline.
        while not ids <= completed.keys() and time.monotonic() < deadline and not running.done():  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        worker.stop()
        await running
    table = Table(title="jobstream round trip")
    for column in ("job id", "type", "topic[partition]@offset", "state"):
        table.add_column(column)
    for receipt in receipts:
        state = "succeeded" if receipt.job_id in completed else "not completed"
        where = f"{receipt.destination}[{receipt.partition}]@{receipt.offset}"
        table.add_row(receipt.job_id[:8], completed.get(receipt.job_id, "?"), where, state)
    console.print(table)
    missing = ids - completed.keys()
    console.print(f"{len(ids) - len(missing)} of {len(ids)} jobs succeeded")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
