"""Errors a user can fix (a bad config, layout or input file, a damaged checkpoint), and faults that end a run.

The command line prints their message as one line and exits with status 2, no traceback; every module raises
a subclass of ``UserError`` for such a problem, before any expensive work where it can be known that early.
A ``RunFault`` (a lost data worker or rank) is one line too, with an exit code of its kind.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: the message is one line that names the key, file or value."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used (damaged, mismatching this model, or not a checkpoint)."""


class RunFault(Exception):
    """A run ended by a fault of its processes, not of its input (a data worker or a rank lost): the command line
    prints the message as one line and exits with ``exit_code``, no traceback."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
