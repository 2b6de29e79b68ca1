"""An example worker app: the handlers a real service would write for the example jobs.

Run it with `jobstream worker examples.app:app` (after `make up` and
`jobstream topics ensure`), or see it work end to end with `make demo`.

To show failure handling, a few payload values simulate faults (a real app has none):
an upload id starting with `flaky-` fails its first attempt, a source URL ending in
`corrupt.png` always fails (it ends in the dead-letter topic), and a report for the
account `slow` runs until it is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time

from consumer import App, JobContext, Retry
from schemas.examples import GenerateReport, ResizeImage, SendWelcomeEmail, SendWelcomeEmailV2

app = App("examples")


@app.handler(SendWelcomeEmail)
async def send_welcome(job: SendWelcomeEmail, ctx: JobContext) -> None:
    await asyncio.sleep(0.05)  # stands in for the mail provider's API call
    ctx.logger.info("welcome email sent to %s", job.email)


@app.handler(SendWelcomeEmailV2)
async def send_welcome_v2(job: SendWelcomeEmailV2, ctx: JobContext) -> None:
    await asyncio.sleep(0.05)
    ctx.logger.info("welcome email sent to %s (opt-in: %s)", job.email, job.marketing_opt_in)


@app.handler(ResizeImage, timeout_s=30)
def resize(job: ResizeImage, ctx: JobContext) -> None:
    # A sync handler runs in the worker's thread pool, off the event loop.
    if job.upload_id.startswith("flaky-") and ctx.attempt == 1:
        raise Retry("image store timed out (simulated)")
    if str(job.source_url).endswith("corrupt.png"):
        msg = f"cannot decode {job.source_url}: not a PNG file (simulated)"
        raise ValueError(msg)
    time.sleep(0.1)
    ctx.logger.info("resized %s to %dx%d", job.upload_id, job.width, job.height)


@app.handler(GenerateReport)
async def report(job: GenerateReport, ctx: JobContext) -> None:
    if job.account_id == "slow":
        # A long report (a minute at most) that stops as soon as it is cancelled.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.cancellation.wait(), timeout=60)
        ctx.logger.info(
            "report for %s %s", job.account_id, "cancelled" if ctx.cancelled else "done"
        )
        return
    digest = hashlib.sha256(f"{job.account_id}/{job.month}".encode()).hexdigest()[:12]
    ctx.logger.info("report %s for %s ready", digest, job.month)
