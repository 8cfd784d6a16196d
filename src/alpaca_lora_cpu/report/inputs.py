"""What the report reads, checked at the stage boundary: the reference's record, every variant's evaluate record
and generations (all from one reference run), the imatrix, search and finetune records, and the loss curves.
Each stage's whole record is the `*.details.json` beside its metrics file."""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.files import details_path, read_details, read_json, read_jsonl
from alpaca_lora_cpu.metric_table import flat_paths
from alpaca_lora_cpu.tracking import lookup
from alpaca_lora_cpu.variants import evaluate_stage

log = logging.getLogger("report")


@dataclass(frozen=True)
class Sources:
    """Where the report's inputs are (the stage's command line)."""
    evaluated: Path      # reports/metrics/evaluate: <variant>.json and .details.json
    reference: Path      # reports/metrics/reference.json
    generations: Path    # reports/evaluate: <variant>.generations.jsonl
    loss: Path           # reports/plots/finetune: the loss curves
    imatrix: Path | None = None   # reports/metrics/imatrix.json
    search: Path | None = None    # reports/metrics/search.json
    finetune: Path | None = None  # reports/metrics/finetune.json
    quantized: Path | None = None  # reports/metrics/quantize: <entry>.json and .details.json (quantize times)


@dataclass(frozen=True)
class Inputs:
    reference: dict                    # the reference stage's record (run_id, hf_fp32 speed, …)
    variants: dict[str, dict]          # variant → evaluate record, in report order
    generations: dict[str, list[dict]]
    calibration: dict                  # the imatrix stage's record ({} when absent)
    search: dict                       # the search stage's record ({} when absent)
    finetune: dict                     # the finetune stage's flat metrics ({} when absent)
    quantize_seconds: dict[str, float]  # quantize.types entry → its quantize@ stage's seconds (where recorded)
    loss: dict[str, list[tuple[float, float]]]


def load(names: list[str], src: Sources) -> Inputs:
    """Every input, or a one-line StageError naming the file: missing variants, or records of another run."""
    ref = read_details(src.reference, "reference metrics")
    require(ref, ("run_id",), details_path(src.reference), "run `dvc repro reference`")
    found = {v: read_details(src.evaluated / f"{v}.json", f"variant {v}: metrics",
                             f"run `dvc repro {evaluate_stage(v)}`") for v in names}
    for v, record in found.items():
        require(record, ("run_id", *flat_paths().values()),  # what every evaluate record publishes
                details_path(src.evaluated / f"{v}.json"), f"run `dvc repro {evaluate_stage(v)}`")
    mismatched = [(v, m.get("run_id")) for v, m in found.items() if m.get("run_id") != ref["run_id"]]
    if mismatched:
        v, rid = mismatched[0]
        raise StageError(f"metrics from different pipeline runs: {src.evaluated / (v + '.details.json')} has run_id "
                         f"{rid}, {src.reference} has {ref['run_id']} ({len(mismatched)} of {len(found)} variants "
                         "differ); rerun the evaluate stages (dvc repro)")
    gens = {v: read_jsonl(src.generations / f"{v}.generations.jsonl", f"variant {v}: generations",
                          f"run `dvc repro {evaluate_stage(v)}`") for v in names}

    def optional(path: Path | None, what: str, read=read_details) -> dict:
        return read(path, what) if path and path.is_file() else {}

    took = {v: optional(src.quantized / f"{v}.json", f"quantize@{v} metrics", read_json).get("seconds")
            for v in names} if src.quantized else {}
    return Inputs(ref, found, gens, optional(src.imatrix, "imatrix metrics"), optional(src.search, "search metrics"),
                  optional(src.finetune, "finetune metrics", read_json),
                  {v: float(s) for v, s in took.items() if isinstance(s, (int, float))}, read_loss(src.loss))


def require(record: object, paths: tuple[str, ...], where: Path, hint: str) -> None:
    """A one-line StageError naming the file and the first key (dotted path) the report needs that a stage's
    record lacks: a record from another version of the code, or edited by hand."""
    if not isinstance(record, dict):
        raise StageError(f"{where}: a stage record must be a JSON object, got {type(record).__name__} ({hint})")
    for path in paths:
        if lookup(record, path) is None:
            raise StageError(f"{where}: the record has no {path!r} ({hint})")


def read_loss(loss_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """Loss series from the finetune stage's plot data (CSV/TSV/JSON rows with `step` and `*loss*` columns)."""
    series: dict[str, list[tuple[float, float]]] = {}
    if not loss_dir.is_dir():
        return series
    for path in sorted(loss_dir.iterdir()):
        for row in _rows_of(path):
            step = row.get("step")
            for key, value in row.items():
                if "loss" in key and step not in (None, "") and value not in (None, ""):
                    series.setdefault(f"{path.stem}: {key}", []).append((float(step), float(value)))
    return series


def _rows_of(path: Path) -> list[dict]:
    try:
        if path.suffix in (".csv", ".tsv"):
            with path.open(encoding="utf-8") as fh:
                return list(csv.DictReader(fh, delimiter="\t" if path.suffix == ".tsv" else ","))
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):  # {"train": [...]} as DVC also accepts
                data = [r for v in data.values() if isinstance(v, list) for r in v]
            return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []
    except (OSError, ValueError):
        log.warning("skipping unreadable loss data %s", path)
    return []
