"""Errors a user can fix (a bad config, layout or input file, a damaged checkpoint).

The command line prints their message as one line and exits with status 2, no traceback; every module raises
a subclass of ``UserError`` for such a problem, before any expensive work where it can be known that early.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: the message is one line that names the key, file or value."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used (damaged, mismatching this model, or not a checkpoint)."""
