"""prepare: sample ~1% of the instruction data into train/val JSONL, validated, normalized and deterministic.

Run: python -m stages.prepare --params params.yaml --out data/prepared --metrics reports/metrics/prepare.json

`data.source` is a Hugging Face Hub dataset id (default yahma/alpaca-cleaned) or a local .json/.jsonl/.parquet
file, of records in the `data.format` layout (alpaca, sharegpt or messages: alpaca_lora_cpu/records.py). When the
Hub cannot be reached, the bundled sample of that layout (data/sample/) is used instead, all of it, with a warning,
and for Alpaca also data/sample/alpaca_heldout.json, records written for the project that go into the validation
split only (more held-out records for the report's comparisons, the same training data);
the source actually used is recorded in the manifest, the metrics and MLflow. The splits hold normalized records
(Alpaca records, or `messages` conversations), the shapes every later stage reads through prompts.to_turns.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

from alpaca_lora_cpu.cli import make_parser, parse_args, run_cli
from alpaca_lora_cpu.config import DataParams, as_dict, load_params
from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.files import atomic_path, ensure_writable, sha256_file, write_json, write_jsonl
from alpaca_lora_cpu.records import Loaded, clean, clean_heldout, load_source, shape_counts

log = logging.getLogger("prepare")


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


def run(params: DataParams, out_dir: Path, loaded: Loaded | None = None) -> dict:
    loaded = loaded or load_source(params.source, params.format)
    records, dropped = clean(loaded, params.on_invalid)
    train, val = sample_split(records, params, take_all=loaded.fallback)
    heldout = clean_heldout(loaded, params.on_invalid, records)
    val = val + heldout
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
            "format": params.format,
            "format_used": loaded.format,
            "train_records": len(train),
            "val_records": len(val),
            "heldout_records": len(heldout),
            **shape_counts(train + val),
            "sha256": {name: sha256_file(tmp / name) for name in ("train.jsonl", "val.jsonl")},
            "params": as_dict(params),
        }
        write_json(tmp / "manifest.json", manifest)
    return manifest


def metrics_of(manifest: dict) -> dict:
    keys = ("source_used", "format_used", "offline_fallback", "records_in_source", "records_valid", "dropped",
            "train_records", "val_records", "heldout_records", "with_input", "multi_turn")
    return {k: manifest[k] for k in keys}


# The DVC metric (flat numbers); the whole record goes to prepare.details.json.
METRICS = ["train_records", "val_records", "records_valid", "with_input", "multi_turn", "offline_fallback"]


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__, "out", "metrics")
    args = parse_args(ap, argv)
    params = load_params(args.params).data
    ensure_writable(args.out, args.metrics)
    loaded = load_source(params.source, params.format)
    clean(loaded, params.on_invalid)  # bad records fail here, before tracking opens
    from alpaca_lora_cpu.tracking import stage_run, write_stage_metrics

    with stage_run("prepare", {"data": as_dict(params)}) as mlflow:
        manifest = run(params, args.out, loaded)
        metrics = metrics_of(manifest)
        write_stage_metrics(mlflow, args.metrics, metrics, METRICS)
        mlflow.set_tags({"source_used": manifest["source_used"],
                         "offline_fallback": str(manifest["offline_fallback"])})
        mlflow.log_artifact(str(args.out / "manifest.json"))
    log.info("prepared %d train / %d val records from %s", manifest["train_records"],
             manifest["val_records"], manifest["source_used"])


if __name__ == "__main__":
    run_cli(main)
