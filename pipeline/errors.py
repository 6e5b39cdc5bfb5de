"""The one base class of the pipeline's own exceptions, so the CLI can catch them all at once."""

from __future__ import annotations

from collections.abc import Iterator


class DippipeError(Exception):
    """An error meant for users: its message says what went wrong and what to do about it.

    Each subclass also keeps its natural built-in base (``ValueError``, ``OSError``...), so
    code that catches those still does."""


class InfrastructureError(DippipeError, RuntimeError):
    """The run stopped because of the infrastructure, not the manifest: workers keep failing,
    no worker was placed in time, OUT cannot take results. Finished jobs are kept and a rerun
    resumes (exit code 3, exit_codes.py)."""


class WorkersKeepDying(InfrastructureError):
    """Every worker keeps dying or failing on infrastructure errors, none finishing a job:
    the run is stopped rather than spinning (scheduler.py, health.py)."""


class NoWorkersError(InfrastructureError):
    """No worker was placed for --worker-wait seconds, at the start or after losing them all."""


class WorkerDeviceError(InfrastructureError):
    """A worker was given a GPU it cannot use (CUDA broken on its node): never a silent CPU fit."""


def causes(error: BaseException) -> Iterator[BaseException]:
    """``error``, then what it wraps: its cause, else its context unless suppressed (an error
    raised ``from None`` hides what it replaced on purpose). Each once, in order."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        if current.__cause__ is not None:
            current = current.__cause__
        else:
            current = None if current.__suppress_context__ else current.__context__
