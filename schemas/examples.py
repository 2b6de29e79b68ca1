"""Example job types, used by the demo, the docs and the tests.

Importing this module registers them in `schemas.default_registry`; `import schemas`
alone does not, so a production worker only accepts the job types it imports.

`email.welcome` exists in two versions to show how a job type evolves: v2 is a new class,
not an edit of v1, and a worker that imports both decodes records of either version.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, HttpUrl, WithJsonSchema
from pydantic_core import PydanticCustomError

from schemas._job import Job

__all__ = [
    "EmailAddress",
    "GenerateReport",
    "ResizeImage",
    "SendWelcomeEmail",
    "SendWelcomeEmailV2",
]

# Deliberately simple (one @, a dot in the domain, no spaces): deliverability is the mail
# server's business. email-validator is not a dependency, so pydantic's EmailStr is not used.
_EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
_EMAIL = re.compile(_EMAIL_PATTERN)


def _check_email(value: str) -> str:
    if len(value) > 254 or not _EMAIL.fullmatch(value):
        # A custom error keeps the message readable ("value is not a valid email address")
        # instead of echoing the regular expression.
        raise PydanticCustomError("email", "value is not a valid email address")
    return value


EmailAddress = Annotated[
    str,
    AfterValidator(_check_email),
    WithJsonSchema(
        {"type": "string", "format": "email", "pattern": _EMAIL_PATTERN, "maxLength": 254}
    ),
]
"""An email address, checked for shape only; the JSON Schema carries the same pattern."""

Locale = Annotated[
    str,
    Field(
        pattern=r"^[a-z]{2}(-[A-Z]{2})?$",
        description="BCP 47 language tag for the email's language, e.g. 'en' or 'pt-BR'.",
    ),
]
UserId = Annotated[
    str, Field(min_length=1, max_length=64, description="Id of the user who signed up.")
]


class SendWelcomeEmail(Job, type="email.welcome", version=1):
    """Send the welcome email to a user who just signed up."""

    user_id: UserId
    email: EmailAddress = Field(description="Address to send the welcome email to.")
    name: str = Field(
        min_length=1, max_length=200, description="How to greet the user, e.g. 'Ada'."
    )
    locale: Locale = "en"


class SendWelcomeEmailV2(Job, type="email.welcome", version=2):
    """Send the welcome email; v2 records whether the user opted in to marketing email,
    which picks the template. v1 records keep working alongside."""

    user_id: UserId
    email: EmailAddress = Field(description="Address to send the welcome email to.")
    name: str = Field(
        min_length=1, max_length=200, description="How to greet the user, e.g. 'Ada'."
    )
    locale: Locale = "en"
    marketing_opt_in: bool = Field(
        description="Whether the user agreed to marketing email; the template depends on it."
    )


class ResizeImage(Job, type="image.resize", version=1):
    """Render a resized copy of an uploaded image."""

    upload_id: str = Field(
        min_length=1, max_length=128, description="Id of the upload the image belongs to."
    )
    source_url: HttpUrl = Field(description="Where to download the original image.")
    width: int = Field(gt=0, le=8192, description="Target width in pixels (1-8192).")
    height: int = Field(gt=0, le=8192, description="Target height in pixels (1-8192).")
    format: Literal["jpeg", "png", "webp"] = Field(
        default="webp", description="Output image format."
    )


class GenerateReport(Job, type="report.generate", version=1):
    """Generate an account's monthly report."""

    account_id: str = Field(min_length=1, max_length=64, description="Account the report is for.")
    month: str = Field(
        pattern=r"^[0-9]{4}-(0[1-9]|1[0-2])$",
        description="Calendar month the report covers, as YYYY-MM (e.g. '2025-01').",
    )
    format: Literal["pdf", "csv"] = Field(default="pdf", description="Report file format.")
