"""imatrix: the importance matrix of models/merged over calibration text, as a llama.cpp GGUF imatrix file.

Run: python -m stages.imatrix --params params.yaml --merged models/merged --data data/prepared \
         --out models/imatrix/imatrix.gguf --hessians models/imatrix/hessians --metrics reports/metrics/imatrix.json

Calibration text (`imatrix.source`): `train` (default: the training split, in the training prompt format,
prompt + response + EOS, as the model saw it), `val`, or a local JSON/JSONL/parquet file of records in the
`data.format` layout. Records are taken in order, each cut to `imatrix.chunk_size` tokens, until
`imatrix.max_tokens`. The statistics come from hooks on the merged checkpoint's linear inputs, one decoder layer
at a time in fp32 (src/alpaca_lora_cpu/imatrix.py); the file is what `llama-quantize --imatrix` reads, and the
quantize stage passes it to llama.cpp's quantizer for the `-imat` types. The val split is the evaluation set:
calibrating on it would flatter the imatrix variants.

With `imatrix.covariance` the same pass sums each decoder linear's whole input covariance H = Σ x xᵀ (the
imatrix is its diagonal) and writes it to `--hessians` a layer at a time (blk.<i>.safetensors, fp32, and
hessians.json with the token count): what the -gptq levels round over. The same pass also sums the LM head's
input covariance (the final norm's output; blk.<num_hidden_layers>.safetensors, under the output matrix's GGUF
name, token_embd.weight when tied), which quantize.gptq.head rounds the output matrix over; it is not in the
imatrix, as llama-imatrix leaves the head out. Without it the folder holds only the index, with no tensors.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from alpaca_lora_cpu.cli import make_parser, parse_args, run_cli
from alpaca_lora_cpu.config import ImatrixParams, as_dict, load_params
from alpaca_lora_cpu.files import atomic_path, ensure_writable, sha256_file

log = logging.getLogger("imatrix")


def run(params: ImatrixParams, template: str, fmt: str, merged: Path, data: Path, out: Path, hessians: Path
        ) -> dict:
    import torch
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer

    from alpaca_lora_cpu.calibration import calibration_records, token_sequences
    from alpaca_lora_cpu.gptq import write_hessians_index, write_layer_hessians
    from alpaca_lora_cpu.imatrix import Imatrix, collect, write
    from alpaca_lora_cpu.shards import Weights, checkpoint_files

    records, source_file = calibration_records(params.source, fmt, data)
    checkpoint_files(merged, "merged model")
    tokenizer = AutoTokenizer.from_pretrained(merged)
    sequences = token_sequences(records, tokenizer, template, params)
    config, weights = AutoConfig.from_pretrained(merged), Weights(merged, "merged model")
    t0, tokens = time.time(), sum(map(len, sequences))
    with atomic_path(hessians) as folder:
        folder.mkdir()
        layers = config.num_hidden_layers if params.covariance else 0
        with tqdm(total=config.num_hidden_layers, unit="layer", desc=f"imatrix ({tokens} tokens)") as bar:
            sums, counts = collect(config, lambda n: weights.get(n, torch.float32), sequences, lambda _: bar.update(),
                                   params.batch_tokens,
                                   (lambda i, h: write_layer_hessians(folder, i, h)) if params.covariance else None)
        write_hessians_index(folder, tokens, layers)
        hessian_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    seconds = time.time() - t0
    name = params.source if params.source in ("train", "val") else source_file.name
    imatrix = Imatrix(sums, counts, [name], len(sequences), max(map(len, sequences)))
    with atomic_path(out) as tmp:
        write(tmp, imatrix)
    return {
        "tensors": len(sums), "tokens": tokens, "chunks": len(sequences), "covariance": int(params.covariance),
        "hessian_bytes": hessian_bytes,
        "chunk_size": imatrix.chunk_size, "seconds": seconds, "file_bytes": out.stat().st_size,
        "calibration_source": name, "calibration_sha256": sha256_file(source_file),
    }


# The flat numbers (imatrix.json); the whole record goes to imatrix.details.json.
METRICS = ["tokens", "chunks", "tensors", "covariance", "seconds"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(make_parser(__doc__, "merged", "data", "out", "hessians", "metrics"), argv)
    config = load_params(args.params)
    params = config.imatrix
    ensure_writable(args.out, args.hessians, args.metrics)
    from alpaca_lora_cpu.cost import Shape, check_stage

    check_stage("imatrix", config, Shape.read(args.merged), args.data)
    from alpaca_lora_cpu.tracking import stage_run, write_stage_metrics

    with stage_run("imatrix", {"imatrix": as_dict(params), "prompt": as_dict(config.prompt),
                               "data": {"format": config.data.format}}) as mlflow:
        metrics = run(params, config.prompt.template, config.data.format, args.merged, args.data, args.out,
                      args.hessians)
        write_stage_metrics(mlflow, args.metrics, metrics, METRICS)
        mlflow.log_params({"imatrix.calibration_sha256": metrics["calibration_sha256"]})
    log.info("imatrix of %d tensors over %d tokens (%d chunks) of %s in %.0f s → %s", metrics["tensors"],
             metrics["tokens"], metrics["chunks"], metrics["calibration_source"], metrics["seconds"], args.out)


if __name__ == "__main__":
    run_cli(main)
