"""prepare: sample ~1% of the Alpaca instruction data into train/val JSONL, validated and deterministic.

Run: python -m stages.prepare --params params.yaml --out data/prepared --metrics reports/metrics/prepare.json

`data.source` is a Hugging Face Hub dataset id (default yahma/alpaca-cleaned) or a local .json/.jsonl/.parquet
file of Alpaca records. When the Hub cannot be reached, the bundled sample (data/sample/) is used instead,
all of it, with a warning; the source actually used is recorded in the manifest, the metrics and MLflow.
"""
from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from stages.atomic import atomic_path, ensure_writable, sha256_file, write_json, write_jsonl
from stages.config import DataParams, as_dict, load_params
from stages.errors import StageError, cli, parse_stage_args, stage_parser
from stages.hub import hub_reachable

log = logging.getLogger("prepare")
FIELDS = ("instruction", "input", "output")
REASONS = ("missing_field", "wrong_type", "empty_output", "duplicate")
BUNDLED_SAMPLE = Path("data/sample/alpaca_sample.json")


@dataclass(frozen=True)
class Loaded:
    records: list
    source_used: str
    fallback: bool


# ---------------------------------------------------------------- loading

def _is_local(source: str) -> bool:
    return source.endswith((".json", ".jsonl", ".parquet")) or Path(source).exists()


def read_local(path: Path) -> list:
    if not path.is_file():
        raise StageError(f"data.source {path}: file not found")
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise StageError(f"data.source {path}: cannot read ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    except Exception as exc:  # pyarrow raises its own types for corrupt files
        raise StageError(f"data.source {path}: cannot read ({type(exc).__name__})") from exc
    if not isinstance(data, list):
        raise StageError(f"data.source {path}: expected a JSON list of Alpaca records, got {type(data).__name__}")
    return data


def _offline_error(exc: BaseException) -> bool:
    """True when `exc` (or its cause chain) says the Hub could not be reached, not that the id is wrong."""
    names = {"ConnectionError", "ConnectTimeout", "ReadTimeout", "OfflineModeIsEnabled",
             "LocalEntryNotFoundError", "ConnectError", "TimeoutException", "gaierror"}
    seen = exc
    while seen is not None:
        if type(seen).__name__ in names or "Couldn't reach" in str(seen) or "offline" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def read_hub(dataset_id: str) -> list:
    import datasets

    ds = datasets.load_dataset(dataset_id, split="train")
    return ds.to_list()


def load_source(source: str) -> Loaded:
    if _is_local(source):
        return Loaded(read_local(Path(source)), source, False)
    if hub_reachable():
        try:
            return Loaded(read_hub(source), source, False)
        except Exception as exc:
            if not _offline_error(exc):
                raise StageError(f"data.source {source!r}: cannot load from the Hugging Face Hub "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    log.warning("Hugging Face Hub unreachable for %r: using the bundled sample %s (all of it)",
                source, BUNDLED_SAMPLE)
    return Loaded(read_local(BUNDLED_SAMPLE), str(BUNDLED_SAMPLE), True)


# ---------------------------------------------------------------- validation

def check_record(rec: object) -> tuple[str, str] | None:
    """(reason, field) for an invalid record, None for a valid one."""
    if not isinstance(rec, dict):
        return "wrong_type", "record"
    for field in ("instruction", "output"):
        if field not in rec or rec[field] is None:
            return "missing_field", field
    for field in FIELDS:
        if field in rec and rec[field] is not None and not isinstance(rec[field], str):
            return "wrong_type", field
    if not rec["output"].strip():
        return "empty_output", "output"
    return None


def validate(records: list, on_invalid: str) -> tuple[list[dict], Counter, str | None]:
    """Clean records, drop counts per reason, and the first problem found (for error messages)."""
    kept: list[dict] = []
    dropped: Counter = Counter({r: 0 for r in REASONS})
    seen: set[tuple[str, str, str]] = set()
    first: str | None = None
    for i, rec in enumerate(records):
        problem = check_record(rec)
        if problem is None:
            clean = {"instruction": rec["instruction"], "input": rec.get("input") or "", "output": rec["output"]}
            key = (clean["instruction"], clean["input"], clean["output"])
            if key in seen:
                problem = ("duplicate", "record")
            else:
                seen.add(key)
                kept.append(clean)
                continue
        reason, field = problem
        message = f"record {i}: {reason.replace('_', ' ')} ({field!r})"
        first = first or message
        if on_invalid == "error" and reason != "duplicate":
            raise StageError(f"invalid Alpaca record — {message} (data.on_invalid: error)")
        dropped[reason] += 1
    return kept, dropped, first


# ---------------------------------------------------------------- sampling

def sample_split(records: list[dict], p: DataParams, take_all: bool) -> tuple[list[dict], list[dict]]:
    """Deterministic sample (seeded) and train/val split; same inputs → same outputs, byte for byte."""
    n = len(records) if take_all else max(2, round(p.fraction * len(records)))
    if p.max_samples is not None:
        n = min(n, p.max_samples)
    n = min(n, len(records))
    if n < 2:
        raise StageError(f"only {n} valid record(s): need at least 2 for a train and a val split")
    rng = random.Random(p.seed)
    chosen = rng.sample(records, n)
    n_val = min(n - 1, max(1, round(p.val_size * n)))
    return chosen[n_val:], chosen[:n_val]


def clean(loaded: Loaded, on_invalid: str) -> tuple[list[dict], Counter]:
    """Valid records and drop counts; an error when nothing valid is left."""
    records, dropped, first = validate(loaded.records, on_invalid)
    if not records:
        raise StageError(f"data.source {loaded.source_used}: no valid Alpaca records left after validation "
                         f"(first problem: {first or 'the file is empty'})")
    return records, dropped


def run(params: DataParams, out_dir: Path, loaded: Loaded | None = None) -> dict:
    loaded = loaded or load_source(params.source)
    records, dropped = clean(loaded, params.on_invalid)
    train, val = sample_split(records, params, take_all=loaded.fallback)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "val.jsonl", val)
        manifest = {
            "source_requested": params.source,
            "source_used": loaded.source_used,
            "offline_fallback": loaded.fallback,
            "records_in_source": len(loaded.records),
            "records_valid": len(records),
            "dropped": dict(dropped),
            "train_records": len(train),
            "val_records": len(val),
            "with_input": sum(bool(r["input"]) for r in train + val),
            "sha256": {name: sha256_file(tmp / name) for name in ("train.jsonl", "val.jsonl")},
            "params": as_dict(params),
        }
        write_json(tmp / "manifest.json", manifest)
    return manifest


def metrics_of(manifest: dict) -> dict:
    keys = ("source_used", "offline_fallback", "records_in_source", "records_valid", "dropped",
            "train_records", "val_records", "with_input")
    return {k: manifest[k] for k in keys}


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser(__doc__, "out", "metrics")
    args = parse_stage_args(ap, argv)
    params = load_params(args.params).data
    ensure_writable(args.out, args.metrics)
    loaded = load_source(params.source)
    clean(loaded, params.on_invalid)  # bad records fail here, before tracking opens
    from stages.tracking import log_metrics, stage_run

    with stage_run("prepare", {"data": as_dict(params)}) as mlflow:
        manifest = run(params, args.out, loaded)
        metrics = metrics_of(manifest)
        write_json(args.metrics, metrics)
        log_metrics(mlflow, metrics)
        mlflow.set_tags({"source_used": manifest["source_used"],
                         "offline_fallback": str(manifest["offline_fallback"])})
        mlflow.log_artifact(str(args.out / "manifest.json"))
    log.info("prepared %d train / %d val records from %s", manifest["train_records"],
             manifest["val_records"], manifest["source_used"])


if __name__ == "__main__":
    cli(main)
