"""One error type for bad input, and the entry-point wrapper that turns it into a one-line message.

Every stage raises `StageError` for problems a user can fix (a bad param, a missing file, a malformed record);
`cli` prints it as a single ``error: ...`` line on stderr and exits 2, without a traceback.
"""
from __future__ import annotations

import sys
from typing import Callable


class StageError(Exception):
    """A problem with the user's input or environment, reported as one line."""


def cli(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a stage's ``main``; bad input exits 2 with one line, Ctrl-C exits 130."""
    try:
        main(argv)
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
