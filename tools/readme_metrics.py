"""Put the output of a real `dvc metrics show` into README.md (between `<!-- metrics-table -->` markers),
stamped with the date, commit and machine, so the README's table is generated, never copied by hand.

Run: python -m tools.readme_metrics --readme README.md   (`make readme-metrics`, after `make repro`)
"""
from __future__ import annotations

import argparse
import subprocess

from alpaca_lora_cpu.files import replace_section
from alpaca_lora_cpu.tracking import machine_stamp


def table() -> str:
    out = subprocess.run(["dvc", "metrics", "show"], capture_output=True, text=True, check=True).stdout
    if not out.strip():
        raise SystemExit("error: `dvc metrics show` printed nothing: run `make repro` first")
    return out.rstrip()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", default="README.md")
    args = ap.parse_args(argv)
    body = f"`dvc metrics show` ({machine_stamp(args.readme)}):\n\n```text\n{table()}\n```"
    replace_section(args.readme, "metrics-table", body)
    print(f"wrote the metrics table into {args.readme}")


if __name__ == "__main__":
    main()
