"""The names of the variants the pipeline builds and evaluates: the one place that knows them.

A variant is one GGUF file the evaluation scores:

    base, finetuned        the unquantized reference GGUFs of the base and of the merged model (convert@base,
                           convert@finetuned): models/gguf/<name>-reference.gguf; `finetuned` is the reference
                           every other variant is compared with
    <entry>                each entry of quantize.types (quantize@<entry>): models/gguf/finetuned-<entry>.gguf

A quantize.types entry is a llama.cpp level (`q4_k_m`), a level quantized with the importance matrix
(`q4_k_m-imat`), a level rounded by AutoRound into llama.cpp's layout (`q4_0-ar`: alpaca_lora_cpu/autoround.py), a
level rounded by GPTQ into ggml's blocks (`iq4_nl-gptq`: alpaca_lora_cpu/gptq.py), a recipe name from
quantize.recipes, `searched` (the recipe the search stage writes), or a recipe rounded by GPTQ (`searched-gptq`:
its Q4_0 / Q5_0 / IQ4_NL tensors, the rest as llama.cpp rounds them).
`parse` turns any variant name into what it is; dvc.yaml's evaluate stages follow the same stems (a test checks
that they agree).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

BASE = "base"
FINETUNED = "finetuned"          # the reference every other variant is compared with
UNQUANTIZED = (BASE, FINETUNED)  # evaluated from convert's outputs, not quantized
IMAT = "-imat"                   # <level>-imat: the level quantized with the importance matrix
AR = "-ar"                       # <level>-ar: the level's tensors rounded by AutoRound (SignRound)
# The levels auto-round's GGUF export writes (auto_round/export/export_to_gguf/config.py); no i-quants.
AR_LEVELS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k_s", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
             "q5_k_s", "q5_k_m", "q6_k")
GPTQ = "-gptq"                   # <level>-gptq: the level's tensors rounded by GPTQ over the input covariances
GPTQ_LEVELS = ("q4_0", "q5_0", "iq4_nl")  # the formats gptq.py writes (gptq.FORMATS; a test checks they agree)
SEARCHED = "searched"            # the quantize.types entry whose recipe the search stage writes
ROUNDINGS = (IMAT, AR, GPTQ)     # the suffixes that ask another rounding of the same types
GGUF_DIR = "models/gguf"

Kind = Literal["base", "reference", "plain", "imatrix", "i-quant", "autoround", "gptq", "recipe"]

# GGML tensor types llama.cpp's quantizer can store a weight in (recipe overrides, search.types): gguf-py's
# GGMLQuantizationType less the integer and f64 types, the dot-product-only Q8_1/Q8_K and the ternary TQ types
# (tests check the list against gguf-py and llama-cpp-python). llama.cpp aborts on any other type.
WEIGHT_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_NL", "IQ4_XS")
# llama.cpp refuses these without an importance matrix ("missing importance matrix for tensor …"): too few bits
# to quantize blindly.
NEEDS_IMATRIX = {"iq2_xxs", "iq2_xs", "iq2_s", "iq1_s", "iq1_m"}


def tensor_rounding(value: str) -> tuple[str, bool]:
    """A per-tensor type of a recipe or of search.types → (its GGML type, rounded by GPTQ): iq4_nl-gptq →
    (iq4_nl, True), q6_k → (q6_k, False). The case is kept."""
    stem = value[:-len(GPTQ)] if value.lower().endswith(GPTQ) else value
    return stem, stem != value


def check_weight_type(key: str, value: str, imatrix: bool = True) -> None:
    """ValueError naming `key` unless `value` is a GGML type a weight can be quantized to (with an importance
    matrix when `imatrix`), or one of GPTQ_LEVELS with the -gptq suffix (that type's blocks rounded by GPTQ)."""
    value, gptq = tensor_rounding(value)
    if gptq and value.lower() not in GPTQ_LEVELS:
        raise ValueError(f"{key}: GPTQ rounding is written for {', '.join(GPTQ_LEVELS)} blocks, not {value!r}; "
                         f"valid: {', '.join(level + GPTQ for level in GPTQ_LEVELS)}")
    if value.upper() not in WEIGHT_TYPES:
        raise ValueError(f"{key}: {value!r} is not a GGML weight type; valid: "
                         f"{', '.join(t.lower() for t in WEIGHT_TYPES)}")
    if value.lower() in NEEDS_IMATRIX and not imatrix:
        raise ValueError(f"{key}: llama.cpp quantizes to {value.lower()} only with the importance matrix "
                         "(set the recipe's imatrix: true)")


@dataclass(frozen=True)
class Variant:
    name: str
    kind: Kind
    level: str | None    # the llama.cpp level (ftype name, lower case); None for base, finetuned and searched
    imatrix: bool        # quantized with the importance matrix
    recipe: str | None   # the recipe's name (quantize.recipes or searched), else None

    @property
    def quantized(self) -> bool:
        return self.kind not in ("base", "reference")


def parse(name: str, recipes: Mapping[str, Any]) -> Variant:
    """What a variant name means. `recipes` is quantize.recipes (name → an object with `.type` and `.imatrix`); a
    recipe named like a level wins, as the quantizer's plan does."""
    if name == BASE:
        return Variant(name, "base", None, False, None)
    if name == FINETUNED:
        return Variant(name, "reference", None, False, None)
    if name in recipes:
        r = recipes[name]
        return Variant(name, "recipe", r.type, bool(r.imatrix), name)
    if name == SEARCHED:
        return Variant(name, "recipe", None, True, SEARCHED)  # the search stage only searches with the imatrix
    if name.endswith(AR):
        return Variant(name, "autoround", name.removesuffix(AR), False, None)
    if name.endswith(GPTQ):
        stem = name.removesuffix(GPTQ)
        if stem in recipes or stem == SEARCHED:  # the recipe's file, its GPTQ formats rounded by GPTQ
            recipe = parse(stem, recipes)
            return Variant(name, "gptq", recipe.level, recipe.imatrix, recipe.recipe)
        return Variant(name, "gptq", stem, False, None)
    imatrix = name.endswith(IMAT)
    level = name.removesuffix(IMAT)
    kind: Kind = "i-quant" if level.startswith("iq") else "imatrix" if imatrix else "plain"
    return Variant(name, kind, level, imatrix, None)


def twin(name: str) -> str | None:
    """The variant whose types this one rounds another way (q4_0-imat, q4_0-gptq → q4_0; searched-gptq →
    searched), or None."""
    return next((name.removesuffix(s) for s in ROUNDINGS if name.endswith(s)), None)


def gguf_stem(name: str) -> str:
    """The GGUF file stem of a variant under models/gguf/ (dvc.yaml writes the same stems)."""
    return f"{name}-reference" if name in UNQUANTIZED else f"{FINETUNED}-{name}"


def gguf_path(name: str, folder: str = GGUF_DIR) -> str:
    return f"{folder}/{gguf_stem(name)}.gguf"


def evaluate_stage(name: str) -> str:
    """The DVC stage that evaluates a variant (dvc.yaml: one foreach group per kind of source)."""
    return f"evaluate-reference@{name}" if name in UNQUANTIZED else f"evaluate@{name}"


def names(types: Iterable[str]) -> list[str]:
    """Every evaluated variant, in report order: base, finetuned, then quantize.types as listed."""
    return [*UNQUANTIZED, *types]


def check_names(types: Iterable[str], recipe_names: Iterable[str]) -> None:
    """ValueError naming the key when a quantize.types entry or recipe name would collide with another variant's
    name or files."""
    recipe_names = list(recipe_names)
    for name in recipe_names:
        if name.endswith(IMAT):
            raise ValueError(f"quantize.recipes.{name}: a recipe name must not end in {IMAT} (that suffix asks a "
                             "level for the importance matrix; set the recipe's imatrix: true)")
        if name.endswith(AR):
            raise ValueError(f"quantize.recipes.{name}: a recipe name must not end in {AR} (that suffix asks a "
                             "level rounded by AutoRound)")
        if name.endswith(GPTQ):
            raise ValueError(f"quantize.recipes.{name}: a recipe name must not end in {GPTQ} (that suffix asks a "
                             "level rounded by GPTQ)")
        if name in UNQUANTIZED:
            raise ValueError(f"quantize.recipes.{name}: {name!r} is the unquantized {name} variant's name")
    for name in types:
        if name in UNQUANTIZED:
            raise ValueError(f"quantize.types: {name!r} is an unquantized variant (evaluated from convert@{name}), "
                             "not a quantization type")
        if name.endswith(AR) and name.removesuffix(AR) not in AR_LEVELS:
            raise ValueError(f"quantize.types: auto-round does not write {name.removesuffix(AR)!r} as GGUF; "
                             f"-ar levels: {', '.join(AR_LEVELS)}")
        stem = name.removesuffix(GPTQ)
        if name.endswith(GPTQ) and stem not in GPTQ_LEVELS and stem not in recipe_names and stem != SEARCHED:
            raise ValueError(f"quantize.types: GPTQ rounding is written for {', '.join(GPTQ_LEVELS)} blocks, not "
                             f"{stem!r}; -gptq entries: {', '.join(level + GPTQ for level in GPTQ_LEVELS)}, "
                             f"{SEARCHED}{GPTQ} or <recipe>{GPTQ}")
