"""The one error type for problems a user can fix: a bad param, a missing or damaged file, a malformed record.

Raised anywhere in the library or a stage; `cli.run_cli` prints it as a single ``error: ...`` line on stderr and
exits 2, without a traceback.
"""
from __future__ import annotations


class StageError(Exception):
    """A problem with the user's input or environment, reported as one line."""
