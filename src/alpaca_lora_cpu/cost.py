"""The cost plan: each stage's predicted wall time and peak memory for the configured model on this machine, from
the model's shape (its config.json), the pipeline's params (tokens, variants, candidates) and this machine's
measured rates (alpaca_lora_cpu/machine.py, measured by `make plan`). `make plan` prints it and `make repro`
starts with it; at start every stage whose work grows with the model checks its own predicted peak against the
memory it may use (alpaca_lora_cpu/memory.py), and refuses in one line, naming the params that would make it
fit, rather than be killed half-way.

Memory is predicted as anonymous memory (what the process itself allocates) plus, for llama.cpp, the model file it
maps: every generated token reads all of it, so it must fit as well. The streaming stages hold one decoder layer in
fp32, the embedding matrix, one shard and their activations, never the whole model (docs/scale-out.md: which stage
holds what). The time model's efficiency factors are calibrated on measured runs (`make bench-scale`,
docs/benchmarks.md: predicted against measured per stage).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.variants import AR, GPTQ, SEARCHED, twin

GB = 1e9
OVERHEAD = 0.8e9      # a stage with python, torch, transformers and mlflow imported: 0.35-0.6 GB measured, once 0.75
LLAMA_OVERHEAD = 0.4e9
IFEVAL_PROMPTS = 104  # data/ifeval/prompts.jsonl, answered when reference.ifeval_prompts is null (tests/test_ifeval.py)
CONVERTER = 0.3e9     # llama.cpp's converter process (python, torch, gguf) before any tensor
STARTUP = 6.0         # seconds every stage spends starting: python, imports, the MLflow run
DISK = 0.8e9          # bytes/s a stage reads or writes checkpoints at (page cache helps; a cold disk is slower)
# Efficiency of the measured peak rates in each kind of work (measured / peak; make bench-scale calibrates them).
LAYERWISE = 0.38      # the layer-by-layer forward: one sequence at a time, weights loaded per layer
# A LoRA fine-tune = 6·params·tokens FLOPs at TRAINING × the fp32 matmul rate, plus TRAIN_STEP_OVERHEAD seconds
# per token for a 30-layer, 576-wide model (norms, attention, the optimizer, the data loader; scaled by layers ×
# hidden). Both fitted on two fp32 fine-tunes of the default 135M run (36k tokens): 175 s on the Intel Xeon
# (fp32 405 GFLOP/s measured) and issue 19's 492 s on an AVX2 AMD EPYC (108 GFLOP/s). bf16 is counted at the fp32
# rate at best: on the Xeon the bf16 fine-tune was no faster end to end (191 s) although its matmul probe was 5.8×.
TRAINING = 0.63
TRAIN_STEP_OVERHEAD = 1.48e-3
LLAMA_PP = 0.8        # llama.cpp prompt processing of the real model, against the synthetic model's rate
LLAMA_TG = 0.6        # llama.cpp generation: bytes of weights read per second, against the memory bandwidth
QUANT_SLOW = {"iq": 4.0, "_k": 6.0}  # quantizing i-quants and k-quants takes longer than q4_0/q8_0
# AutoRound (quantize@<level>-ar), fitted on an AVX-512 BF16 EPYC (fp32 184 GFLOP/s), q4_0 of the 135M model:
AR_RTN = 7.5e-7       # seconds a parameter of its iters-0 pass (load, optimised RTN, export): 107 s measured
AR_TUNING = 1.25      # SignRound's steps against the fp32 matmul rate: iters 25 took 468 s, 361 s more than 0
                      # (auto-round autocasts to bf16 where it can; on a CPU with slow bf16 this is a guess)
AR_ACTIVATIONS = 16   # bytes a calibration token × hidden: each block's cached fp32 inputs and outputs
# GPTQ (quantize@<level>-gptq): in make repro the GPTQ pass over the 135M model's 106 M decoder weights took 56 s
# (q4_0) and 65 s (iq4_nl) on a 2-core AMD EPYC (AVX-512), nearly all of it the per-column steps and each block's
# scale search (elementwise work on every weight), not the rows × cols² error-update matmuls (about 1 s).
GPTQ_PER_WEIGHT = 0.6e-6  # seconds a decoder weight
QUANT_BUFFERS = 0.55  # bytes per parameter llama.cpp's quantizer holds (0.78 / 1.84 / 4.0 GB at 1B / 3B / 7B)
# llama.cpp repacks q4_0/iq4_nl/q8_0 weights for its AVX kernels into memory of its own: a copy of the file
REPACKED = ("q4_0", "q4_k_m", "iq4_nl", "q8_0", "q4_k")
BYTES = {"float32": 4, "fp32": 4, "f32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "f16": 2, "q8_0": 1.0625}
BPW = {"q8_0": 8.5, "q6_k": 6.56, "q5_k_m": 5.7, "q5_0": 5.5, "q4_k_m": 4.9, "q4_0": 4.5, "iq4_nl": 4.5,
       "iq4_xs": 4.25, "q3_k_m": 3.9, "iq3_s": 3.44, "q2_k": 3.0, "iq2_xs": 2.4}  # roughly, for sizes only


@dataclass(frozen=True)
class Shape:
    """A LLaMA's dimensions (from its config.json)."""
    vocab: int
    hidden: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    tied: bool
    dtype: str = "float32"  # as stored

    @classmethod
    def of(cls, config: dict | Any) -> Shape:
        c = config if isinstance(config, dict) else config.to_dict()
        heads = c["num_attention_heads"]
        return cls(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], heads,
                   c.get("num_key_value_heads") or heads, bool(c.get("tie_word_embeddings", False)),
                   str(c.get("dtype") or c.get("torch_dtype") or "float32"))

    @classmethod
    def of_gguf(cls, header: Any) -> Shape:
        """From a GGUF's llama.* metadata (gguf_files.check_gguf's header)."""
        v = header.values
        arch = v.get("general.architecture", "llama")
        tokens = header.arrays.get("tokenizer.ggml.tokens")
        heads = v[f"{arch}.attention.head_count"]
        return cls(tokens[1] if tokens else v.get(f"{arch}.vocab_size", 32000), v[f"{arch}.embedding_length"],
                   v[f"{arch}.block_count"], v[f"{arch}.feed_forward_length"], heads,
                   v.get(f"{arch}.attention.head_count_kv", heads),
                   not any(t.name == "output.weight" for t in header.tensors))

    @classmethod
    def read(cls, folder: str | Path) -> Shape:
        path = Path(folder) / "config.json"
        try:
            return cls.of(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError) as exc:
            raise StageError(f"{path}: cannot read the model's dimensions ({type(exc).__name__}: {exc})") from exc

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attn + 3 * self.hidden * self.ffn + 2 * self.hidden

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embed_params * (1 if self.tied else 2) + self.hidden

    def size(self, kind: str) -> float:
        """Bytes of the weights in a dtype or quantization type."""
        return self.params * (BYTES.get(kind) or BPW.get(kind, 8.5) / 8)


@dataclass(frozen=True)
class Cost:
    stage: str
    seconds: float
    peak: float          # anonymous memory, bytes
    mapped: float = 0.0  # the model file llama.cpp maps and reads whole per token, bytes
    hint: str = ""       # the params that lower the peak

    @property
    def memory(self) -> float:
        return self.peak + self.mapped


@dataclass(frozen=True)
class Work:
    """How many tokens each stage processes, from params.yaml (and the prepared data when it exists)."""
    train_tokens: int
    val_tokens: int
    gate_tokens: dict[str, int] = field(default_factory=dict)  # export / convert: gate prompts × max tokens
    imatrix_tokens: int = 0
    scored_tokens: int = 0        # reference / evaluate: per variant
    generated_tokens: int = 0     # per variant
    record_tokens: int = 180      # an average record, prompt + response


def record_tokens(data: Path | None) -> int:
    """An average record's tokens (characters / 4) from the prepared training split, else Alpaca's ~180."""
    path = data / "train.jsonl" if data else None
    if path and path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        if lines:
            return max(16, sum(map(len, lines)) // (4 * len(lines)))
    return 180


def work(p: Any, data: Path | None = None, records: tuple[int, int] | None = None) -> Work:
    """The token counts of the configured pipeline; `records` = (train, val) when known (else the prepared
    manifest's, else a 1% sample of alpaca-cleaned's)."""
    per = record_tokens(data)
    train, val = records or _records(data) or (466, 52)
    epochs = p.finetune.epochs if p.finetune.max_steps is None else p.finetune.max_steps * p.finetune.batch_size / train
    scored_records = min(val, p.reference.max_records or val)
    scored = scored_records * min(per, per // 2 + p.reference.max_response_tokens)  # prompt + capped response
    answers = min(p.reference.generate_records or scored_records, scored_records) + len(p.reference.showcase_prompts)
    # the instruction-following answers: the largest share of an evaluation's generated tokens
    ifeval = (p.reference.ifeval_prompts or IFEVAL_PROMPTS) * p.reference.ifeval_max_new_tokens
    return Work(train_tokens=int(train * min(per, p.finetune.cutoff_len) * epochs),
                val_tokens=val * min(per, p.finetune.cutoff_len),
                gate_tokens={"export": p.export.gate_prompts * min(per, p.export.gate_max_tokens),
                             "convert": p.convert.gate_prompts * min(per, p.convert.gate_max_tokens)},
                imatrix_tokens=min(p.imatrix.max_tokens, train * min(per, p.imatrix.chunk_size)),
                scored_tokens=int(scored), generated_tokens=answers * p.evaluate.max_new_tokens + ifeval,
                record_tokens=per)


def _records(data: Path | None) -> tuple[int, int] | None:
    manifest = data / "manifest.json" if data else None
    if manifest and manifest.is_file():
        m = json.loads(manifest.read_text())
        return m["train_records"], m["val_records"]
    return None


# ---------------------------------------------------------------- per stage

def _layerwise_peak(s: Shape, sequences: int, tokens: int, logits_kept: int) -> float:
    """One layer in fp32 (loaded twice over while it is built), the embedding (and an untied head), the hidden
    states, one MLP's intermediates, and `logits_kept` sequences' logits."""
    per_seq = tokens / max(sequences, 1)
    return (2 * 4 * s.layer_params + 4 * s.embed_params * (1 if s.tied else 2) + 4 * 3 * tokens * s.hidden
            + 4 * 3 * per_seq * s.ffn + 4 * logits_kept * per_seq * s.vocab)


def _forward_seconds(s: Shape, tokens: int, r: dict) -> float:
    return 2 * s.params * tokens / (r["fp32_gflops"] * 1e9 * LAYERWISE) + s.size("float32") / DISK / 4


def _pp_seconds(s: Shape, tokens: int, kind: str, r: dict) -> float:
    rate = r.get(f"pp_{kind}_gflops") or r.get("pp_q8_0_gflops", 100.0)
    return 2 * s.params * tokens / (rate * 1e9 * LLAMA_PP)


def _tg_seconds(s: Shape, tokens: int, kind: str, r: dict) -> float:
    return tokens * s.size(kind) / (r["bandwidth_bytes_per_s"] * LLAMA_TG)


def _answers_seconds(s: Shape, tokens: int, parallel: int, kind: str, pp_kind: str, r: dict) -> float:
    """Greedy answers decoded `parallel` at a time (llama.generate_many): each step reads the weights once for
    all of them (bandwidth) and computes every answer's token (at the prompt-processing rate, an upper bound on a
    small batch's)."""
    return _tg_seconds(s, tokens / parallel, kind, r) + _pp_seconds(s, tokens, pp_kind, r)


def _kv_bytes_per_token(s: Shape) -> float:
    """llama.cpp's f16 K and V cache, every layer."""
    return 2 * 2 * s.layers * s.kv_heads * s.head_dim


def _quantize_seconds(s: Shape, kind: str, r: dict) -> float:
    slow = next((v for k, v in QUANT_SLOW.items() if k in kind), 1.0)
    return s.params * slow / r.get("quantize_q4_0_params_per_s", 1e8) + s.size("f16") / DISK


def _level(t: str) -> str:
    """The llama.cpp level a quantize.types entry is sized as (recipes and `searched`: about q4_0)."""
    level = twin(t) or t
    return level if level in BPW else "q4_0"


def _autoround_seconds(p: Any, s: Shape, r: dict) -> float:
    """AutoRound: its optimised round-to-nearest pass over the model, then `iters` SignRound steps a block, each
    a forward and backward of the block over one batch of calibration rows."""
    ar = p.quantize.autoround
    batch = min(ar.batch_size, ar.nsamples) * ar.seqlen
    tuning = ar.iters * 6 * s.params * batch / (r["fp32_gflops"] * 1e9 * AR_TUNING)
    return AR_RTN * s.params + s.size("float32") / DISK + tuning


def _covariance_elements(s: Shape) -> int:
    """Entries of one decoder layer's input covariances: q/k/v, o and gate/up read hidden-wide inputs, down an
    ffn-wide one (gptq.SHARED)."""
    return 3 * s.hidden ** 2 + s.ffn ** 2


def _gptq_pass(s: Shape, r: dict, reused: bool = False) -> tuple[float, float]:
    """(seconds, bytes) of one GPTQ pass over every decoder linear and the output matrix (quantize.gptq.head), a
    tensor at a time: the widest input's H in fp64 with its Cholesky factors (4 copies), the weight in fp32 (3;
    the output matrix, vocab × hidden, is the largest). `reused`: the blocks come from the search's
    (gptq.RoundedBlocks), so only the proxy errors' matmuls are left, not the per-column rounding."""
    weights = s.layers * s.layer_params + s.vocab * s.hidden
    seconds = ((0.0 if reused else GPTQ_PER_WEIGHT * weights)
               + 2 * s.layers * (s.hidden * _covariance_elements(s) + s.hidden * s.ffn ** 2)
               / (r["fp32_gflops"] * 1e9 * LAYERWISE))
    widest = max(s.hidden, s.ffn)
    return seconds, 32 * widest ** 2 + 12 * max(s.hidden * s.ffn, s.vocab * s.hidden)


def _gptq_cost(t: str, s: Shape, r: dict, reused: bool = False) -> tuple[float, float]:
    """(seconds, bytes) of a -gptq level: llama.cpp's plain and imatrix files of the level, then the GPTQ pass
    (`reused`: from the search's blocks)."""
    seconds, memory = _gptq_pass(s, r, reused)
    return 2 * _quantize_seconds(s, _level(t), r) + seconds, OVERHEAD + max(QUANT_BUFFERS * s.params, memory)


# Rates to plan memory with when no measurement is at hand (a stage checking its own peak): times are then rough.
ROUGH = {"fp32_gflops": 100.0, "bf16_gflops": 100.0, "bandwidth_bytes_per_s": 10e9}


def stage_costs(p: Any, s: Shape, w: Work, r: dict | None = None) -> list[Cost]:
    """Every stage of the configured pipeline (evaluate and quantize once per variant), in pipeline order; `r` is
    machine.rates() (None: memory only, times rough)."""
    from alpaca_lora_cpu.shards import parse_size

    r = r or ROUGH
    export, ref = p.export.dtype, p.convert.outtype
    n_gate = {"export": p.export.gate_prompts, "convert": p.convert.gate_prompts}
    gate_hint = "export.gate_prompts, export.gate_max_tokens"
    widen = BYTES.get(p.base.dtype, 4) / BYTES.get(s.dtype, 4)
    largest = max(s.embed_params, s.hidden * s.ffn) * BYTES.get(p.base.dtype, 4)
    # one output shard pending, and the tensor being cast (read from the source one at a time)
    # safetensors hands out memory-mapped tensors: only a cast to another dtype costs memory (one shard pending)
    copies = min(parse_size(p.base.max_shard_size), s.size(p.base.dtype)) + largest if widen != 1 else 0.0
    out = [Cost("base", s.size(s.dtype) * (1 + widen) / DISK, OVERHEAD + copies,
                hint="base.max_shard_size, base.model (a smaller model)")]
    prec = "bf16_gflops" if p.finetune.precision in ("bf16", "auto") and r["bf16_gflops"] > 1.3 * r["fp32_gflops"] \
        else "fp32_gflops"
    quant = {"none": 4.0, "8bit": 1.1, "4bit": 0.6}[p.finetune.quantization]
    micro = p.finetune.micro_batch_size * p.finetune.cutoff_len
    act = micro * s.layers * (4 * s.hidden + 4 * s.ffn) * 4 + micro * s.vocab * 4
    tokens = w.train_tokens + 2 * w.val_tokens
    rate = min(r[prec], r["fp32_gflops"]) * 1e9 * TRAINING
    out.append(Cost("finetune", 6 * s.params * tokens / rate + TRAIN_STEP_OVERHEAD * tokens * s.layers * s.hidden
                    / (30 * 576),
                    OVERHEAD + quant * s.params + act,
                    hint="finetune.quantization (4bit), finetune.micro_batch_size, finetune.cutoff_len"))
    g = w.gate_tokens["export"]
    gate = _layerwise_peak(s, n_gate["export"], g, 2 * n_gate["export"])
    out.append(Cost("merge", 2 * _forward_seconds(s, g, r) + 3 * s.size(export) / DISK,
                    OVERHEAD + gate + 2 * 4 * max(s.hidden * s.ffn, s.embed_params)
                    + min(parse_size(p.export.max_shard_size), s.size(export)),
                    hint=f"{gate_hint}, export.max_shard_size"))
    out.append(Cost("consolidate", (2 * _forward_seconds(s, g, r) + 3 * s.size(export) / DISK)
                    if p.export.consolidated else 5.0, OVERHEAD + gate if p.export.consolidated else OVERHEAD,
                    hint=f"{gate_hint}, export.consolidated (false)"))
    gc = w.gate_tokens["convert"]
    # llama.cpp's converter, a child of its own, converts one tensor at a time (a few fp32 copies of the largest)
    converter = CONVERTER + 10 * max(s.embed_params, s.hidden * s.ffn)
    # three phases one after another: the converter, llama.cpp on the GGUF (mapped), the HF side layer by layer
    hf_side = OVERHEAD + max(converter, _layerwise_peak(s, n_gate["convert"], gc, 2 * n_gate["convert"]))
    llama_side = OVERHEAD + LLAMA_OVERHEAD + 4 * gc * s.vocab + s.size(ref)
    out.append(Cost("convert@finetuned", _forward_seconds(s, gc, r) + _pp_seconds(s, gc, "f16", r)
                    + (s.size(export) + s.size(ref)) / DISK, hf_side, max(0.0, llama_side - hf_side),
                    hint="convert.gate_prompts, convert.gate_max_tokens, convert.outtype (q8_0)"))
    # with imatrix.covariance: Σ x xᵀ of each layer's four inputs over every token, one layer's held in fp64
    cov = _covariance_elements(s) if p.imatrix.covariance else 0
    out.append(Cost("imatrix", _forward_seconds(s, w.imatrix_tokens, r)
                    + 2 * w.imatrix_tokens * cov * s.layers / (r["fp32_gflops"] * 1e9 * LAYERWISE)
                    + 4 * cov * s.layers / DISK,
                    OVERHEAD + _layerwise_peak(s, max(1, w.imatrix_tokens // p.imatrix.batch_tokens),
                                               w.imatrix_tokens, 0) + 8 * 7 * s.layers * s.ffn + 2 * 8 * cov,
                    hint="imatrix.batch_tokens, imatrix.max_tokens, imatrix.covariance (false)"))
    types = list(dict.fromkeys([*(t.lower() for t in p.search.types), "q8_0"]))
    candidates = 1 + 6 * (len(types) - 1) + p.search.verify
    # one llama.cpp pass per type, one GPTQ pass over that type's file per -gptq type
    llama_types = dict.fromkeys(t.removesuffix(GPTQ) for t in types)
    gptq_seconds, gptq_memory = _gptq_pass(s, r)
    out.append(Cost("search", sum(_quantize_seconds(s, t, r) for t in llama_types)
                    + gptq_seconds * sum(t.endswith(GPTQ) for t in types)
                    + candidates * (_pp_seconds(s, p.search.calibration_tokens, "q8_0", r) + s.size("q8_0") / DISK)
                    + _pp_seconds(s, p.search.calibration_tokens, "f16", r),
                    # quantizing each type, then scoring candidates (about q8_0-sized, repacked by llama.cpp)
                    LLAMA_OVERHEAD + 4 * 1024 * s.vocab + 12 * p.search.calibration_tokens * p.search.top_k
                    + max(QUANT_BUFFERS * s.params, s.size("q8_0"), gptq_memory), max(s.size(ref), s.size("q8_0")),
                    hint="search.calibration_tokens, search.types, search.verify"))
    variants = [t for t in p.quantize.types]
    for t in variants:
        kind = _level(t)
        if t.endswith(AR):  # llama.cpp's file of the level, then AutoRound on the whole fp32 model
            out.append(Cost(f"quantize@{t}", 2 * _quantize_seconds(s, kind, r) + _autoround_seconds(p, s, r),
                            OVERHEAD + 4 * s.params + AR_ACTIVATIONS * p.quantize.autoround.nsamples
                            * p.quantize.autoround.seqlen * s.hidden, s.size(ref),
                            hint=f"quantize.autoround.nsamples, quantize.types (drop {t})"))
            continue
        # searched with -gptq search.types: its -gptq groups' blocks are the search's (reused); a <fmt>-gptq
        # level reuses them when the search rounds that format too
        searched_gptq = {x.lower() for x in p.search.types if x.lower().endswith(GPTQ)}
        if t.endswith(GPTQ) or (t == SEARCHED and searched_gptq):
            seconds, memory = _gptq_cost(t, s, r, reused=t == SEARCHED or t in searched_gptq)
            out.append(Cost(f"quantize@{t}", seconds, memory, s.size(ref), hint=f"quantize.types (drop {t})"))
            continue
        out.append(Cost(f"quantize@{t}", _quantize_seconds(s, kind, r) + 2.0,
                        LLAMA_OVERHEAD + QUANT_BUFFERS * s.params, s.size(ref), hint=f"quantize.types (drop {t})"))
    hf = 4.2 * s.params
    out.append(Cost("reference", _pp_seconds(s, w.scored_tokens, "f16", r)
                    + (4 * 2 * s.params * 512 / (r["fp32_gflops"] * 1e9 * LAYERWISE) + 4 * 128 * hf / 4 /
                       r["bandwidth_bytes_per_s"] if fits_hf_speed(s) else 0.0),
                    OVERHEAD + 8 * w.scored_tokens * p.reference.top_k + (hf if fits_hf_speed(s) else 0.0),
                    s.size(ref), hint="reference.max_records, reference.max_response_tokens"))
    speed, parallel = p.evaluate.speed, p.evaluate.parallel
    kv = parallel * (w.record_tokens + p.evaluate.max_new_tokens) * _kv_bytes_per_token(s)
    for name in ["base", "finetuned", *variants]:
        kind = ref if name in ("base", "finetuned") else _level(name)
        pp_kind = kind if kind in ("q4_0", "q8_0", "f16") else "q4_0"
        pp = w.scored_tokens + (speed.runs + 1) * speed.prompt_tokens
        tg = (speed.runs + 1) * speed.gen_tokens
        out.append(Cost(f"evaluate@{name}", _pp_seconds(s, pp, pp_kind, r) + _tg_seconds(s, tg, kind, r)
                        + _answers_seconds(s, w.generated_tokens, parallel, kind, pp_kind, r) + s.size(kind) / DISK,
                        OVERHEAD + LLAMA_OVERHEAD + 2048 * s.vocab + 8 * w.scored_tokens * p.reference.top_k
                        + (s.size(kind) if kind in REPACKED else 0.0) + kv,
                        s.size(kind), hint="evaluate.parallel, reference.ifeval_prompts, reference.generate_records, "
                        "evaluate.max_new_tokens, quantize.types"))
    out.append(Cost("report", 10.0, OVERHEAD))
    return [replace(c, seconds=c.seconds + STARTUP) for c in out]


def fits_hf_speed(s: Shape, available: float | None = None) -> bool:
    """Whether the reference stage's transformers fp32 speed row can load the whole model (it is the one
    measurement that must: it is what the GGUFs are compared with)."""
    from alpaca_lora_cpu.memory import available_memory

    return OVERHEAD + 4.2 * s.params <= 0.9 * (available if available is not None else available_memory())


def stage_cost(name: str, p: Any, s: Shape, data: Path | None = None) -> Cost:
    """One stage's predicted cost (`evaluate@q4_0`, `quantize@q4_0`, `convert@finetuned`, …)."""
    costs = {c.stage: c for c in stage_costs(p, s, work(p, data))}
    return costs.get(name) or costs[name.split("@")[0] + "@finetuned" if name.startswith("convert") else name]


def check_stage(name: str, p: Any, shape: Shape, data: Path | None = None) -> Cost:
    """Refuse a stage (one line) whose predicted peak does not fit; its cost otherwise."""
    cost = stage_cost(name, p, shape, data)
    check(cost)
    return cost


def check_mapped(name: str, gguf: str | Path, hint: str) -> None:
    """A llama.cpp stage: the model file it reads whole per token (plus llama.cpp's own buffers) must fit."""
    size = Path(gguf).stat().st_size if Path(gguf).is_file() else 0
    check(Cost(name, 0.0, LLAMA_OVERHEAD, float(size), hint))


def check(cost: Cost, available: float | None = None) -> None:
    """A one-line StageError when the stage's predicted peak does not fit the memory it may use."""
    from alpaca_lora_cpu.memory import MEMORY_ENV, available_memory

    have = available if available is not None else available_memory()
    if cost.memory > have:
        raise StageError(f"{cost.stage}: predicted peak memory {cost.memory / GB:.1f} GB exceeds the "
                         f"{have / GB:.1f} GB this machine has free ({MEMORY_ENV} or the cgroup limit); lower it "
                         f"with {cost.hint or 'a smaller base.model'} (make plan shows every stage)")
