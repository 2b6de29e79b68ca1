"""An example worker app: the handlers a real service would write for the example jobs.

Run it with `jobstream worker examples.app:app` (after `make up` and
`jobstream topics ensure`), or see it work end to end with `make demo`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

from consumer import App, JobContext
from schemas.examples import GenerateReport, ResizeImage, SendWelcomeEmail, SendWelcomeEmailV2

app = App("examples")
completed: dict[str, str] = {}
"""job id -> job type, for the demo's summary (a real app would not keep this)."""


@app.handler(SendWelcomeEmail)
async def send_welcome(job: SendWelcomeEmail, ctx: JobContext) -> None:
    await asyncio.sleep(0.05)  # stands in for the mail provider's API call
    ctx.logger.info("welcome email sent to %s", job.email)
    completed[ctx.job_id] = "email.welcome v1"


@app.handler(SendWelcomeEmailV2)
async def send_welcome_v2(job: SendWelcomeEmailV2, ctx: JobContext) -> None:
    await asyncio.sleep(0.05)
    ctx.logger.info("welcome email sent to %s (opt-in: %s)", job.email, job.marketing_opt_in)
    completed[ctx.job_id] = "email.welcome v2"


@app.handler(ResizeImage, timeout_s=30)
def resize(job: ResizeImage, ctx: JobContext) -> None:
    # A sync handler runs in the worker's thread pool, off the event loop.
    time.sleep(0.1)
    ctx.logger.info("resized %s to %dx%d", job.upload_id, job.width, job.height)
    completed[ctx.job_id] = "image.resize v1"


@app.handler(GenerateReport)
def report(job: GenerateReport, ctx: JobContext) -> None:
    digest = hashlib.sha256(f"{job.account_id}/{job.month}".encode()).hexdigest()[:12]
    ctx.logger.info("report %s for %s ready", digest, job.month)
    completed[ctx.job_id] = "report.generate v1"
