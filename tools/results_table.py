"""Put the output of a real `dvc metrics show` into docs/results.md (between `<!-- metrics-table -->` markers),
stamped with the date, commit and machine, so the table of the committed snapshot is generated, never copied by
hand.

Run: python -m tools.results_table --doc docs/results.md   (`make results-table`, after `make repro`)
"""
from __future__ import annotations

import argparse
import subprocess

from tools.bench_doc import machine_stamp, replace_section


def table() -> str:
    out = subprocess.run(["dvc", "metrics", "show"], capture_output=True, text=True, check=True).stdout
    if not out.strip():
        raise SystemExit("error: `dvc metrics show` printed nothing: run `make repro` first")
    return out.rstrip()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doc", default="docs/results.md")
    args = ap.parse_args(argv)
    body = f"`dvc metrics show` ({machine_stamp(args.doc)}):\n\n```text\n{table()}\n```"
    replace_section(args.doc, "metrics-table", body)
    print(f"wrote the metrics table into {args.doc}")


if __name__ == "__main__":
    main()
