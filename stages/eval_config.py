"""The `evaluate` params section, shared by the reference, evaluate and report stages and `make bench-infer`.

Kept apart from stages/evaluate.py so the expensive `reference` stage does not depend on evaluate's code.
"""
from __future__ import annotations

from dataclasses import dataclass

REFERENCE_VARIANT = "finetuned-f16"


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
    variants: dict       # variant name -> GGUF file stem under models/gguf/ (dvc.yaml's foreach)
    threads: int         # CPU threads for every llama.cpp and transformers measurement
    max_new_tokens: int  # greedy generation limit
    speed: SpeedParams

    def __post_init__(self) -> None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.variants.items()):
            raise ValueError("evaluate.variants must map variant names to GGUF file stems (strings)")
        if REFERENCE_VARIANT not in self.variants:
            raise ValueError(f"evaluate.variants must include {REFERENCE_VARIANT!r} (the reference)")
        if self.threads < 1:
            raise ValueError(f"evaluate.threads must be >= 1, got {self.threads}")
        if self.max_new_tokens < 1:
            raise ValueError(f"evaluate.max_new_tokens must be >= 1, got {self.max_new_tokens}")
