"""`JobRegistry`: which model decodes a record with a given (type, version).

Guarantees:

- At most one model per (type, version). Registering a different class under a taken
  (type, version) raises `ValueError` naming both classes. Registering the same class again,
  or a class with the same `__module__` and `__qualname__` (a reloaded module, a test that
  re-executes a declaration), replaces the entry instead, so reloading never fails.
- `resolve` raises `UnknownJobType` or `UnsupportedVersion` (both dead-letter reasons),
  naming what is registered, and never returns a model for another version.
- Iteration order is deterministic: sorted by (type, version).

`default_registry` is filled by declaring `Job` subclasses; build a `JobRegistry` of your
own in tests or to restrict what a worker accepts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar

from schemas._errors import UnknownJobType, UnsupportedVersion

if TYPE_CHECKING:
    from schemas._job import Job

__all__ = ["JobRegistry", "default_registry"]

J = TypeVar("J", bound="type[Job]")


class JobRegistry:
    """A set of job models, looked up by (type, version)."""

    def __init__(self, models: Iterable[type[Job]] = ()) -> None:
        self._models: dict[str, dict[int, type[Job]]] = {}
        for model in models:
            self.register(model)

    def register(self, model: J) -> J:
        """Add `model`; returns it, so `@registry.register` works as a class decorator."""
        # Duck-typed rather than issubclass(model, Job): _job imports this module, and a
        # class only gets job_type in its own namespace when it was declared with type=.
        if not isinstance(model, type) or "job_type" not in vars(model):
            msg = f"{model!r} is not a concrete Job class (declare it with type= and version=)"
            raise TypeError(msg)
        versions = self._models.setdefault(model.job_type, {})
        current = versions.get(model.job_version)
        if current is not None and _name(current) != _name(model):
            msg = (
                f"{model.job_type} v{model.job_version} is already registered by "
                f"{_name(current)}; {_name(model)} must declare another version or type"
            )
            raise ValueError(msg)
        versions[model.job_version] = model
        return model

    def resolve(self, job_type: str, version: int) -> type[Job]:
        """The model for (job_type, version), or a typed `JobDecodeError` saying why not."""
        versions = self._models.get(job_type)
        if not versions:
            raise UnknownJobType(job_type, self.job_types())
        model = versions.get(version)
        if model is None:
            raise UnsupportedVersion(job_type, version, list(versions))
        return model

    def latest(self, job_type: str) -> type[Job]:
        """The model with the highest version of `job_type`."""
        versions = self._models.get(job_type)
        if not versions:
            raise UnknownJobType(job_type, self.job_types())
        return versions[max(versions)]

    def job_types(self) -> list[str]:
        """Registered job types, sorted."""
        return sorted(t for t, versions in self._models.items() if versions)

    def __iter__(self) -> Iterator[type[Job]]:
        for job_type in self.job_types():
            versions = self._models[job_type]
            for version in sorted(versions):
                yield versions[version]

    def __contains__(self, item: object) -> bool:
        """`model in registry` (that exact class) or `"email.welcome" in registry`."""
        if isinstance(item, str):
            return bool(self._models.get(item))
        if isinstance(item, type) and "job_type" in vars(item):
            versions = self._models.get(vars(item)["job_type"], {})
            return versions.get(vars(item)["job_version"]) is item
        return False

    def __len__(self) -> int:
        return sum(len(versions) for versions in self._models.values())

    def __repr__(self) -> str:
        listed = ", ".join(f"{m.job_type} v{m.job_version}" for m in self)
        return f"JobRegistry([{listed}])"


def _name(model: type) -> str:
    return f"{model.__module__}.{model.__qualname__}"


default_registry = JobRegistry()
"""The registry that `Job` subclasses join when declared (unless `register=False`)."""
