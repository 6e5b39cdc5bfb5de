"""Errors meant for users: a bad task, parameter, shape or value in one job."""


class DipInputError(ValueError):
    """The job's inputs or parameters are invalid; the message says which and why."""
