"""imatrix: the importance matrix of models/merged over calibration text, as a llama.cpp GGUF imatrix file.

Run: python -m stages.imatrix --params params.yaml --merged models/merged --data data/prepared \
         --out models/imatrix/imatrix.gguf --metrics reports/metrics/imatrix.json

Calibration text (`imatrix.source`): `train` (default: the training split, in the training prompt format,
prompt + response + EOS, as the model saw it), `val`, or a local JSON/JSONL/parquet file of records in the
`data.format` layout. Records are taken in order, each cut to `imatrix.chunk_size` tokens, until
`imatrix.max_tokens`. The statistics come from hooks on the merged checkpoint's linear inputs, one decoder layer
at a time in fp32 (src/alpaca_lora_cpu/imatrix.py); the file is what `llama-quantize --imatrix` reads, and the
quantize stage passes it to llama.cpp's quantizer for the `-imat` types. The val split is the evaluation set:
calibrating on it would flatter the imatrix variants.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from alpaca_lora_cpu.cli import make_parser, parse_args, run_cli
from alpaca_lora_cpu.config import ImatrixParams, as_dict, load_params
from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.files import atomic_path, ensure_writable, read_jsonl, sha256_file

log = logging.getLogger("imatrix")


def calibration_records(source: str, fmt: str, data: Path) -> tuple[list[dict], Path]:
    """(records, the file they came from): a prepared split, or a local file read and validated as prepare does."""
    if source in ("train", "val"):
        path = data / f"{source}.jsonl"
        return read_jsonl(path, f"{source} split", "run the prepare stage first", records=True), path
    from alpaca_lora_cpu.records import Loaded, clean, read_local

    path = Path(source)
    if not path.is_file():
        raise StageError(f"imatrix.source: {source} is neither train, val nor an existing file")
    records, _ = clean(Loaded(read_local(path, fmt), source, False, fmt), "drop")
    return records, path


def token_sequences(records: list[dict], tokenizer, template: str, params: ImatrixParams) -> list[list[int]]:
    """Each record as the model was trained on it, cut to chunk_size, until max_tokens in all."""
    from alpaca_lora_cpu.tokenization import encode

    out, total = [], 0
    for record in records:
        try:
            ids = encode(record, tokenizer, template, params.chunk_size, train_on_inputs=True)["input_ids"]
        except ValueError as exc:  # a template that cannot render the record
            raise StageError(f"imatrix: prompt.template {template}: {exc}") from exc
        ids = ids[:params.max_tokens - total]
        if len(ids) < 2:
            break
        out.append(ids)
        total += len(ids)
    if not out:
        raise StageError("imatrix: no calibration tokens (empty source?)")
    return out


def run(params: ImatrixParams, template: str, fmt: str, merged: Path, data: Path, out: Path) -> dict:
    import torch
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer

    from alpaca_lora_cpu.imatrix import Imatrix, collect, write
    from alpaca_lora_cpu.shards import Weights, checkpoint_files

    records, source_file = calibration_records(params.source, fmt, data)
    checkpoint_files(merged, "merged model")
    tokenizer = AutoTokenizer.from_pretrained(merged)
    sequences = token_sequences(records, tokenizer, template, params)
    config, weights = AutoConfig.from_pretrained(merged), Weights(merged, "merged model")
    t0 = time.time()
    with tqdm(total=config.num_hidden_layers, unit="layer", desc=f"imatrix ({sum(map(len, sequences))} tokens)") as bar:
        sums, counts = collect(config, lambda n: weights.get(n, torch.float32), sequences, lambda _: bar.update(),
                               params.batch_tokens)
    seconds = time.time() - t0
    name = params.source if params.source in ("train", "val") else source_file.name
    imatrix = Imatrix(sums, counts, [name], len(sequences), max(map(len, sequences)))
    with atomic_path(out) as tmp:
        write(tmp, imatrix)
    return {
        "tensors": len(sums), "tokens": sum(map(len, sequences)), "chunks": len(sequences),
        "chunk_size": imatrix.chunk_size, "seconds": seconds, "file_bytes": out.stat().st_size,
        "calibration_source": name, "calibration_sha256": sha256_file(source_file),
    }


# The flat numbers (imatrix.json); the whole record goes to imatrix.details.json.
METRICS = ["tokens", "chunks", "tensors", "seconds"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(make_parser(__doc__, "merged", "data", "out", "metrics"), argv)
    config = load_params(args.params)
    params = config.imatrix
    ensure_writable(args.out, args.metrics)
    from alpaca_lora_cpu.cost import Shape, check_stage

    check_stage("imatrix", config, Shape.read(args.merged), args.data)
    from alpaca_lora_cpu.tracking import stage_run, write_stage_metrics

    with stage_run("imatrix", {"imatrix": as_dict(params), "prompt": as_dict(config.prompt),
                               "data": {"format": config.data.format}}) as mlflow:
        metrics = run(params, config.prompt.template, config.data.format, args.merged, args.data, args.out)
        write_stage_metrics(mlflow, args.metrics, metrics, METRICS)
        mlflow.log_params({"imatrix.calibration_sha256": metrics["calibration_sha256"]})
    log.info("imatrix of %d tensors over %d tokens (%d chunks) of %s in %.0f s → %s", metrics["tensors"],
             metrics["tokens"], metrics["chunks"], metrics["calibration_source"], metrics["seconds"], args.out)


if __name__ == "__main__":
    run_cli(main)
