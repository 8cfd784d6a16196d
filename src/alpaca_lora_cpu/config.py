"""params.yaml → one tree of frozen dataclasses, checked whole at the start of every stage.

One section class per top-level key of params.yaml (in its order), then the root `Params`. Every key is required
and typed; unknown or missing keys are errors, and there are no defaults in code: params.yaml is the one place
values live. Range checks live in each section's `__post_init__` and raise `ValueError` with the full key name;
`load_params` turns any problem into a one-line `StageError`, so a broken params.yaml stops every stage before it
does any work, not just the stage that reads the broken part.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.variants import GPTQ, check_names, check_weight_type

T = TypeVar("T")
PARAMS_FILE = "params.yaml"
MIN_CUTOFF = 16
MAX_INT = 2**31 - 1  # an int32: llama.cpp's n_ctx, seeds and token counts are C ints


def check_min(section: str, params: object, minimum: float, *keys: str) -> None:
    """ValueError naming the full key of the first of `keys` below `minimum`."""
    for key in keys:
        value = getattr(params, key)
        if value < minimum:
            raise ValueError(f"{section}.{key} must be >= {minimum}, got {value}")


def check_recipe(where: str, r: Any) -> None:
    """ValueError naming the key when a recipe's per-tensor types are not weight types llama.cpp can write (with
    or without the importance matrix, as the recipe asks) or an override is not a regex."""
    named = [("token_embedding", r.token_embedding), ("output", r.output),
             *((f"overrides.{k}", v) for k, v in r.overrides.items())]
    for key, value in named:
        if value is not None:
            check_weight_type(f"{where}.{key}", value, r.imatrix)
    for pattern in r.overrides:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{where}.overrides: {pattern!r} is not a regex ({exc})") from exc


def check_size(key: str, text: str) -> None:
    """A shard size transformers reads (200MB, 2GB, 512MiB), ValueError naming the key otherwise."""
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*([KMG]i?B|B)\s*", text, re.IGNORECASE):
        raise ValueError(f"{key} must be a size such as 200MB, 2GB or 512MiB, got {text!r}")


def check_gate_sizes(section: str, gate_prompts: int, gate_max_tokens: int) -> None:
    """Range checks shared by the `export` and `convert` params (ValueError naming the full key)."""
    if gate_prompts < 1:
        raise ValueError(f"{section}.gate_prompts must be >= 1, got {gate_prompts}")
    if gate_max_tokens < 8:
        raise ValueError(f"{section}.gate_max_tokens must be >= 8, got {gate_max_tokens}")


# ---------------------------------------------------------------- sections, in params.yaml order

@dataclass(frozen=True)
class BaseParams:
    model: str
    dtype: Literal["float32", "bfloat16", "float16"]
    max_shard_size: str    # safetensors shard size of models/base/ (e.g. 1GB)
    trust_remote_code: bool

    def __post_init__(self) -> None:
        check_size("base.max_shard_size", self.max_shard_size)


@dataclass(frozen=True)
class DataParams:
    source: str
    format: Literal["alpaca", "sharegpt", "messages"]  # the records' layout (alpaca_lora_cpu/records.py)
    fraction: float
    seed: int
    val_size: float
    max_samples: int | None
    on_invalid: Literal["drop", "error"]

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"data.fraction must be in (0, 1], got {self.fraction}")
        if not 0 < self.val_size < 1:
            raise ValueError(f"data.val_size must be in (0, 1), got {self.val_size}")
        if self.max_samples is not None and self.max_samples < 2:
            raise ValueError(f"data.max_samples must be >= 2 or null, got {self.max_samples}")


@dataclass(frozen=True)
class PromptParams:
    template: Literal["alpaca", "chat"]


@dataclass(frozen=True)
class LoraParams:
    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...] | str
    use_rslora: bool  # rsLoRA: scale alpha / sqrt(r) instead of alpha / r (stable at large ranks)

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"finetune.lora.r must be > 0, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"finetune.lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"finetune.lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            raise ValueError("finetune.lora.target_modules must be a list of module names or 'all-linear', "
                             f"got {self.target_modules!r}")
        if not self.target_modules:
            raise ValueError("finetune.lora.target_modules must not be empty")


@dataclass(frozen=True)
class FinetuneParams:
    lora: LoraParams
    epochs: float
    learning_rate: float
    batch_size: int
    micro_batch_size: int
    cutoff_len: int
    warmup_steps: int
    train_on_inputs: bool
    group_by_length: bool
    packing: bool
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    bf16_min_speedup: float  # precision auto on CPU: bf16 only when its measured matmul speed-up reaches this
    quantization: Literal["none", "8bit", "4bit"]
    eval_steps: int
    save_steps: int
    seed: int
    max_steps: int | None
    processes: int  # > 1: the stage starts itself under `accelerate launch` with this many processes
    accelerate_config: str  # configs/accelerate/<name>.yaml, for processes > 1
    neftune_alpha: float | None      # NEFTune embedding noise (null = off), scaled by each example's own length
    loraplus_lr_ratio: float | None  # LoRA+: lora_B's learning rate = this × learning_rate (null = off)

    def __post_init__(self) -> None:
        checks = [
            (self.processes >= 1, f"finetune.processes must be >= 1, got {self.processes}"),
            (bool(re.fullmatch(r"[A-Za-z0-9_.-]+", self.accelerate_config)),
             f"finetune.accelerate_config must be a config name (configs/accelerate/<name>.yaml), "
             f"got {self.accelerate_config!r}"),
            (self.epochs > 0, f"finetune.epochs must be > 0, got {self.epochs}"),
            (self.learning_rate > 0, f"finetune.learning_rate must be > 0, got {self.learning_rate}"),
            (self.micro_batch_size > 0, f"finetune.micro_batch_size must be > 0, got {self.micro_batch_size}"),
            (self.batch_size > 0 and self.batch_size % max(self.micro_batch_size, 1) == 0,
             f"finetune.batch_size ({self.batch_size}) must be a positive multiple of finetune.micro_batch_size "
             f"({self.micro_batch_size})"),
            (self.cutoff_len >= MIN_CUTOFF, f"finetune.cutoff_len must be >= {MIN_CUTOFF}, got {self.cutoff_len}"),
            (self.warmup_steps >= 0, f"finetune.warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.bf16_min_speedup > 0, f"finetune.bf16_min_speedup must be > 0, got {self.bf16_min_speedup}"),
            (self.eval_steps > 0, f"finetune.eval_steps must be > 0, got {self.eval_steps}"),
            (self.save_steps > 0, f"finetune.save_steps must be > 0, got {self.save_steps}"),
            (self.max_steps is None or self.max_steps > 0,
             f"finetune.max_steps must be > 0 or null, got {self.max_steps}"),
            (self.neftune_alpha is None or self.neftune_alpha > 0,
             f"finetune.neftune_alpha must be > 0 or null, got {self.neftune_alpha}"),
            (self.loraplus_lr_ratio is None or self.loraplus_lr_ratio >= 1,
             f"finetune.loraplus_lr_ratio must be >= 1 or null, got {self.loraplus_lr_ratio}"),
            (self.batch_size % max(self.micro_batch_size * self.processes, 1) == 0,
             f"finetune.batch_size ({self.batch_size}) must be a multiple of micro_batch_size × processes "
             f"({self.micro_batch_size} × {self.processes})"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class ExportParams:
    dtype: Literal["fp32", "bf16", "fp16"]
    max_shard_size: str
    consolidated: bool
    gate_prompts: int
    gate_max_tokens: int
    max_logit_diff: float

    def __post_init__(self) -> None:
        check_gate_sizes("export", self.gate_prompts, self.gate_max_tokens)
        check_size("export.max_shard_size", self.max_shard_size)
        if not self.max_logit_diff > 0:
            raise ValueError(f"export.max_logit_diff must be > 0, got {self.max_logit_diff}")


@dataclass(frozen=True)
class ConvertParams:
    outtype: Literal["f16", "bf16", "f32", "q8_0"]
    gate_prompts: int
    gate_max_tokens: int
    min_top1_agreement: float

    def __post_init__(self) -> None:
        check_gate_sizes("convert", self.gate_prompts, self.gate_max_tokens)
        if not 0 < self.min_top1_agreement <= 1:
            raise ValueError(f"convert.min_top1_agreement must be in (0, 1], got {self.min_top1_agreement}")


@dataclass(frozen=True)
class ImatrixParams:
    source: str       # train | val | a local Alpaca file: the calibration text
    max_tokens: int   # calibration tokens in all
    chunk_size: int   # each record is cut to this many tokens
    batch_tokens: int  # records run together through each layer, padded to at most this many tokens a batch
    covariance: bool  # also write each decoder linear's full input covariance Σ x xᵀ (the -gptq levels read it)

    def __post_init__(self) -> None:
        check_min("imatrix", self, 2, "max_tokens", "chunk_size")
        if self.batch_tokens < self.chunk_size:
            raise ValueError(f"imatrix.batch_tokens must be >= imatrix.chunk_size ({self.chunk_size}), got "
                             f"{self.batch_tokens}")


@dataclass(frozen=True)
class RecipeParams:
    type: str                     # the llama.cpp level every tensor starts from (its ftype), e.g. iq4_nl
    imatrix: bool                 # quantize with the importance matrix
    token_embedding: str | None   # GGML type of token_embd (null: the level's choice)
    output: str | None            # GGML type of the output tensor (tied models: token_embd); null: the level's
    overrides: dict[str, str]     # regex on tensor names → GGML type, first match wins (llama.cpp tt_overrides)

@dataclass(frozen=True)
class AutoRoundParams:
    iters: int        # SignRound steps per decoder block; 0 = auto-round's optimised round-to-nearest
    nsamples: int     # calibration rows (the imatrix's calibration text, packed)
    seqlen: int       # tokens per calibration row
    batch_size: int   # rows per tuning step
    seed: int

    def __post_init__(self) -> None:
        check_min("quantize.autoround", self, 0, "iters", "seed")
        check_min("quantize.autoround", self, 1, "nsamples", "batch_size")
        check_min("quantize.autoround", self, 16, "seqlen")


@dataclass(frozen=True)
class GptqParams:
    damp: float       # added to H's diagonal as damp · mean(diag H) before its Cholesky (GPTQ's percdamp)
    act_order: bool   # columns in order of falling diag(H), block scales fixed first (GPTQ's desc_act, static groups)
    head: bool        # also the output matrix (token_embd when tied), over the final norm output's covariance

    def __post_init__(self) -> None:
        if not 0 < self.damp <= 1:
            raise ValueError(f"quantize.gptq.damp must be in (0, 1], got {self.damp}")


@dataclass(frozen=True)
class QuantizeParams:
    types: tuple[str, ...]  # llama.cpp levels (<type>, -imat, -ar, -gptq) and recipe names; one quantize@ each
    recipes: dict[str, RecipeParams]
    autoround: AutoRoundParams  # the -ar levels
    gptq: GptqParams  # the -gptq levels

    def __post_init__(self) -> None:
        if not self.types:
            raise ValueError("quantize.types must list at least one quantization type")
        twice = sorted({t for t in self.types if self.types.count(t) > 1})
        if twice:
            raise ValueError(f"quantize.types lists {twice[0]!r} more than once")
        check_names(self.types, self.recipes)
        for name, recipe in self.recipes.items():
            check_recipe(f"quantize.recipes.{name}", recipe)


@dataclass(frozen=True)
class SearchParams:
    budget_mib: float | None     # the file size the searched recipe must fit; null: the stock q4_0 file's size
    types: tuple[str, ...]       # GGML tensor types a group may take (those its rows fit; <fmt>-gptq: GPTQ-rounded)
    calibration_tokens: int      # train-split tokens each candidate's KLD is measured on
    top_k: int                   # reference log-probs kept per position for that KLD
    verify: int                  # best knapsack solutions quantized and measured for real

    def __post_init__(self) -> None:
        if self.budget_mib is not None and self.budget_mib <= 0:
            raise ValueError(f"search.budget_mib must be > 0 or null, got {self.budget_mib}")
        if not self.types:
            raise ValueError("search.types must list at least one tensor type")
        for i, t in enumerate(self.types):
            check_weight_type(f"search.types[{i}]", t)
        check_min("search", self, 1, "calibration_tokens", "top_k", "verify")


@dataclass(frozen=True)
class GenerateParams:
    n_ctx: int             # context window of make generate / chat / serve
    temperature: float     # 0 = greedy
    top_p: float
    repeat_penalty: float
    seed: int
    stop: tuple[str, ...]  # extra stop sequences, after the template's own (prompts.stop_sequences)

    def __post_init__(self) -> None:
        if self.n_ctx < 64:
            raise ValueError(f"generate.n_ctx must be >= 64, got {self.n_ctx}")
        if self.temperature < 0:
            raise ValueError(f"generate.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"generate.top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class ReferenceParams:
    max_records: int | None      # validation records scored (null = all); caps the cost of every variant
    max_response_tokens: int     # response tokens (incl. EOS) scored per record
    top_k: int                   # reference log-probs kept per position, plus the exact mass of the rest
    generate_records: int | None  # validation prompts every variant answers (ROUGE-L); null = all scored
    showcase_prompts: tuple[str, ...]  # fixed instructions answered by every variant, shown in the report
    max_scored_ptokens: float     # records scored stop where parameters × their tokens reach this
    max_generated_ptokens: float  # answers stop where parameters × answers × evaluate.max_new_tokens reach this
    ifeval_prompts: int | None    # instruction-following prompts every variant answers (null = all bundled)
    ifeval_max_new_tokens: int    # greedy generation limit of those answers

    def __post_init__(self) -> None:
        check_min("reference", self, 1, "ifeval_max_new_tokens")
        for key in ("max_records", "generate_records", "ifeval_prompts"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"reference.{key} must be >= 1 or null, got {value}")
        check_min("reference", self, 1, "max_response_tokens", "top_k")
        check_min("reference", self, 1e6, "max_scored_ptokens", "max_generated_ptokens")
        if not self.showcase_prompts:
            raise ValueError("reference.showcase_prompts must list at least one prompt")


@dataclass(frozen=True)
class SpeedParams:
    prompt_tokens: int  # prompt-processing benchmark length (llama-bench pp512)
    gen_tokens: int     # generation benchmark length (llama-bench tg128)
    runs: int           # timed runs after one warm-up; the median is reported

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.gen_tokens < 1:
            raise ValueError("evaluate.speed.prompt_tokens and evaluate.speed.gen_tokens must be >= 1")
        if self.runs < 3:
            raise ValueError(f"evaluate.speed.runs must be >= 3 (a median of at least 3), got {self.runs}")


@dataclass(frozen=True)
class EvaluateParams:
    threads: int         # CPU threads for every llama.cpp and transformers measurement
    max_new_tokens: int  # greedy generation limit
    parallel: int        # answers decoded together (llama.cpp sequences of one batch)
    speed: SpeedParams

    def __post_init__(self) -> None:
        check_min("evaluate", self, 1, "threads", "max_new_tokens", "parallel")


@dataclass(frozen=True)
class IntervalParams:
    resamples: int       # bootstrap resamples of the records (every interval and paired comparison)
    confidence: float    # interval coverage, e.g. 0.95
    seed: int            # the resampling seed: the same records are resampled the same way for every variant

    def __post_init__(self) -> None:
        if self.resamples < 200:
            raise ValueError(f"intervals.resamples must be >= 200 (a percentile interval's ends need them), "
                             f"got {self.resamples}")
        if not 0.5 <= self.confidence < 1:
            raise ValueError(f"intervals.confidence must be in [0.5, 1), got {self.confidence}")


@dataclass(frozen=True)
class ReportParams:
    q8_max_kld: float          # q8_0 mean KLD against the reference must not exceed this
    q8_min_top1: float         # q8_0 top-1 agreement with the reference must reach this share
    q4_min_speedup: float      # q4_0 generation tok/s over transformers fp32 must reach this ratio
    ppl_ratio_max: float       # fine-tuned response PPL must be at most this × the base model's
    imatrix_min_kld_cut: float  # the imatrix must lower q4_0's, q4_k_m's and q2_k's mean KLD by this share
    q4_0_size_max_kld: float    # the best variant no larger than q4_0 must reach this mean KLD
    q4_0_format_max_kld: float  # the best variant in the tutorial's format (q4_0, -imat, -ar, -gptq) must reach this
    iq4_nl_gptq_max_kld: float  # iq4_nl-gptq must reach this mean KLD
    if_max_drop: float          # fine-tuned prompt-level IF accuracy: at least the base's minus this (0: no worse)
    q4_k_m_imat_max_kld: float  # q4_k_m with the imatrix must reach this mean KLD
    search_min_kld_cut: float   # searched vs every stock imatrix level no larger: mean KLD lower by this share
    budget_variants: tuple[str, ...]  # the report recommends the best variant no larger than each of these
    recommend_max_mb: float     # the recommended model (MLflow registry): lowest mean KLD within this size

    def __post_init__(self) -> None:
        for key in ("imatrix_min_kld_cut", "search_min_kld_cut", "if_max_drop"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"report.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.recommend_max_mb <= 0:
            raise ValueError(f"report.recommend_max_mb must be > 0, got {self.recommend_max_mb}")
        if self.q8_max_kld <= 0:
            raise ValueError(f"report.q8_max_kld must be > 0, got {self.q8_max_kld}")
        if not 0 < self.q8_min_top1 <= 1:
            raise ValueError(f"report.q8_min_top1 must be in (0, 1], got {self.q8_min_top1}")
        if self.q4_min_speedup <= 0:
            raise ValueError(f"report.q4_min_speedup must be > 0, got {self.q4_min_speedup}")
        if self.ppl_ratio_max <= 0:
            raise ValueError(f"report.ppl_ratio_max must be > 0, got {self.ppl_ratio_max}")


# ---------------------------------------------------------------- the whole file

@dataclass(frozen=True)
class Params:
    base: BaseParams
    data: DataParams
    prompt: PromptParams
    finetune: FinetuneParams
    export: ExportParams
    convert: ConvertParams
    imatrix: ImatrixParams
    search: SearchParams
    quantize: QuantizeParams
    generate: GenerateParams
    reference: ReferenceParams
    evaluate: EvaluateParams
    intervals: IntervalParams
    report: ReportParams

    def __post_init__(self) -> None:
        if self.imatrix.covariance:
            return
        recipe_types = [(f"quantize.recipes.{n}", t) for n, r in self.quantize.recipes.items()
                        for t in (r.token_embedding, r.output, *r.overrides.values()) if t]
        gptq = [(where, t) for where, t in [*(("quantize.types", t) for t in self.quantize.types),
                                            *(("search.types", t) for t in self.search.types), *recipe_types]
                if t.lower().endswith(GPTQ)]
        if gptq:
            where, t = gptq[0]
            raise ValueError(f"{where} has {t}, which GPTQ rounds over the input covariances: set "
                             "imatrix.covariance: true (or drop the -gptq types)")


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """The whole params file, checked: every section and every key."""
    return build(Params, read_params(path), "")


def read_params(path: str | Path = PARAMS_FILE) -> dict:
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise StageError(f"params file {path} not found") from exc
    except yaml.YAMLError as exc:
        raise StageError(f"params file {path} is not valid YAML: {exc}".replace("\n", " ")) from exc
    if not isinstance(doc, dict):
        raise StageError(f"params file {path} must be a mapping of sections")
    return doc


def build(cls: type[T], raw: Any, where: str) -> T:
    """Check `raw` against dataclass `cls` (recursively) and construct it; `where` is its key ("" for the root)."""
    if not isinstance(raw, dict):
        raise StageError(f"params: '{where}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise StageError(f"params: unknown key '{_key(where, unknown[0])}' (allowed: {', '.join(names)})")
    missing = [n for n in names if n not in raw]
    if missing:
        raise StageError(f"params: missing key '{_key(where, missing[0])}'")
    values = {n: _coerce(hints[n], raw[n], _key(where, n)) for n in names}
    try:
        return cls(**values)
    except ValueError as exc:
        raise StageError(f"params: {exc}") from exc


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in (o for o in options if o is not type(None)):
            try:
                return _coerce(opt, value, key)
            except StageError as exc:
                errors.append(str(exc))
        raise StageError(errors[0] if len(errors) == 1 else f"params: '{key}' has the wrong type: {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise StageError(f"params: '{key}' must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise StageError(f"params: '{key}' must be a mapping with string keys, got {value!r}")
        item = typing.get_args(tp)[1]
        return {k: _coerce(item, v, f"{key}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise StageError(f"params: '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise StageError(f"params: '{key}' must be {tp.__name__}, got {value!r}")
    # every number reaches torch, numpy or llama.cpp: no inf/nan, no integer past what their C types hold
    if tp is float and not math.isfinite(value):
        raise StageError(f"params: '{key}' must be a finite number, got {value!r}")
    if tp is int and abs(value) > MAX_INT:
        raise StageError(f"params: '{key}' must be at most {MAX_INT:,} in size, got {value:,}")
    return value


def as_dict(obj: Any) -> dict:
    """Plain dict of a params dataclass, for logging."""
    return dataclasses.asdict(obj)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out
