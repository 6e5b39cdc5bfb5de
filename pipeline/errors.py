"""The one base class of the pipeline's own exceptions, so the CLI can catch them all at once."""

from __future__ import annotations


class DippipeError(Exception):
    """An error meant for users: its message says what went wrong and what to do about it.

    Each subclass also keeps its natural built-in base (``ValueError``, ``OSError``...), so
    code that catches those still does."""
