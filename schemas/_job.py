"""`Job`, the base model of every job type.

A job type is one class statement:

    class SendWelcomeEmail(Job, type="email.welcome", version=1):
        user_id: str
        email: str

Guarantees:

- Job models are frozen and reject unknown fields, so a payload means exactly one thing.
- A concrete job type has `job_type` (matching `^[a-z][a-z0-9_.-]*$`) and `job_version`
  (an int >= 1) as class variables; a bad declaration raises `TypeError` when the class is
  created, not when the first record arrives.
- A concrete job type is registered in `schemas.default_registry` as soon as the class
  exists, unless it is declared with `register=False`.
- A subclass without `type=` is an abstract base (shared fields or validators) and is never
  registered. Subclassing a concrete job type requires its own `type=`, because inheriting
  the parent's (type, version) would create two models for one wire schema.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import pydantic

from schemas._registry import default_registry

__all__ = ["Job", "is_concrete"]

JOB_TYPE_PATTERN = re.compile(r"^[a-z][a-z0-9_.-]*$")


class Job(pydantic.BaseModel):
    """Base class of every job payload. Subclass it with `type=` and `version=`."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    job_type: ClassVar[str]
    """The CloudEvents `type` of this job (`ce_type`), e.g. `email.welcome`."""
    job_version: ClassVar[int]
    """The schema version (`ce_jobversion`); each version is its own model class."""

    def __init_subclass__(
        cls,
        *,
        type: str | None = None,  # named after the CloudEvents attribute, shadowing is fine
        version: int | None = None,
        register: bool = True,
        **kwargs: Any,
    ) -> None:
        # The real work happens in __pydantic_init_subclass__, once pydantic has built the
        # fields; this signature exists so the class keywords are accepted and type-checked.
        super().__init_subclass__(**kwargs)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__()
        job_type = kwargs.get("type")
        version = kwargs.get("version")
        register = kwargs.get("register", True)
        parent = next((b for b in cls.__mro__[1:] if is_concrete(b)), None)
        if job_type is None:
            if version is not None:
                msg = f"{cls.__qualname__} declares version={version!r} without type=; declare both"
                raise TypeError(msg)
            if parent is not None:
                msg = (
                    f"{cls.__qualname__} subclasses the job type {_label(parent)} without "
                    "declaring type=; give it its own type= (and version=), or move the shared "
                    "fields into an abstract base class that has no type="
                )
                raise TypeError(msg)
            return
        cls.job_type = _check_type(cls, job_type)
        cls.job_version = _check_version(cls, 1 if version is None else version)
        if register:
            default_registry.register(cls)


def is_concrete(model: object) -> bool:
    """True for a Job class declared with `type=` (one that can travel on the wire)."""
    return isinstance(model, type) and "job_type" in vars(model) and issubclass(model, Job)


def _label(model: type[Job]) -> str:
    return f"{model.__qualname__} ({model.job_type} v{model.job_version})"


def _check_type(cls: type, job_type: object) -> str:
    if not isinstance(job_type, str) or not JOB_TYPE_PATTERN.fullmatch(job_type):
        msg = (
            f"{cls.__qualname__}: type={job_type!r} is not a valid job type; use lowercase "
            "letters, digits, '.', '_' and '-', starting with a letter (e.g. 'email.welcome')"
        )
        raise TypeError(msg)
    return job_type


def _check_version(cls: type, version: object) -> int:
    # bool is an int subclass; version=True is a typo, not version 1.
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        msg = f"{cls.__qualname__}: version={version!r} must be an int >= 1"
        raise TypeError(msg)
    return version
