"""Errors a user can fix. Library code raises them; only a CLI turns them into exit status 2."""
from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: one line that names the problem and the allowed values."""


class CheckpointError(UserError):
    """A checkpoint file that is missing, unreadable, or does not match the model."""


class DataError(UserError):
    """A data directory that is missing, empty or malformed."""


def choices_error(what: str, value, choices) -> UserError:
    """`unknown model 'foo' (choose from: a, b, c)` -- the one-line form every CLI uses."""
    return UserError(f"unknown {what} {value!r} (choose from: {', '.join(map(str, choices))})")
