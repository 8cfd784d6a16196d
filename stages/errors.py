"""One error type for bad input, and the entry-point wrapper that turns it into a one-line message.

Every stage raises `StageError` for problems a user can fix (a bad param, a missing file, a malformed record);
`cli` prints it as a single ``error: ...`` line on stderr and exits 2, without a traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
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


def stage_parser(doc: str, *paths: str) -> argparse.ArgumentParser:
    """A stage's command line: `--params` plus one required path option per name (more can be added)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    for name in paths:
        ap.add_argument(f"--{name}", type=Path, required=True)
    return ap


def parse_stage_args(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line and set up the one log format every stage uses."""
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args
