"""Command lines of the stages and tools: one parser shape, one log format, one-line errors.

    def main(argv=None):
        args = parse_args(make_parser(__doc__, "out", "metrics"), argv)   # --params + required paths
        ...
    if __name__ == "__main__":
        run_cli(main)   # StageError → one `error:` line, exit 2; Ctrl-C → exit 130
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from alpaca_lora_cpu.errors import StageError


def run_cli(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run an entry point's ``main``; bad input exits 2 with one line, Ctrl-C exits 130."""
    try:
        main(argv)
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


def make_parser(doc: str, *paths: str) -> argparse.ArgumentParser:
    """`--params` plus one required path option per name (callers add more)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    for name in paths:
        ap.add_argument(f"--{name.replace('_', '-')}", type=Path, required=True)
    return ap


def parse_args(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line and set up the one log format every entry point uses."""
    args = ap.parse_args(argv)
    for name, value in vars(args).items():
        check_text(f"--{name.replace('_', '-')}", value)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args


def check_text(what: str, value: object) -> None:
    """Text from the command line or a terminal must be UTF-8: Python keeps undecodable bytes as lone surrogates,
    which fail much later (UnicodeEncodeError in llama.cpp's tokenizer or a print). One line naming `what`."""
    if isinstance(value, (str, Path)):
        try:
            str(value).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise StageError(f"{what} is not valid UTF-8 text (byte {ord(str(value)[exc.start]) - 0xDC00:#04x} at "
                             f"position {exc.start}): pass UTF-8 text") from None
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_text(what, item)
