"""llama.cpp's quantizer (`llama_cpp.llama_model_quantize`) driven by a Plan: a level (ftype), the importance
matrix, and per-tensor types (token embedding, output, regex overrides). Used by the quantize and search stages
and make setup's build probe; `quantize_file` runs it in a child process so a native crash is a one-line error,
`quantize_here` is the one ctypes call (for code already running in a child).
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import time
from pathlib import Path

from alpaca_lora_cpu.config import RecipeParams, check_recipe
from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.variants import GPTQ, IMAT, NEEDS_IMATRIX, SEARCHED, WEIGHT_TYPES, parse, tensor_rounding

TYPE_NAME = re.compile(r"^(Q[2-8]_(0|1|K|K_[SML])|IQ4_(NL|XS)|IQ3_(S|XXS)|IQ2_(S|XS|XXS)|IQ1_[SM]|F16|BF16)$")


def valid_types() -> dict[str, int]:
    """Quantization names accepted by `--type` (lower case) → llama.cpp ftype constant."""
    import llama_cpp

    prefix = "LLAMA_FTYPE_MOSTLY_"
    return {name.removeprefix(prefix).lower(): getattr(llama_cpp, name) for name in dir(llama_cpp)
            if name.startswith(prefix) and TYPE_NAME.match(name.removeprefix(prefix))}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What llama.cpp's quantizer is asked for one quantize.types entry."""
    name: str                   # the entry: q4_k_m, q4_k_m-imat or a recipe name
    qtype: str                  # the llama.cpp level (ftype name)
    imatrix: bool
    # GGML type names (upper case) or None: the level's choice. A recipe's type may end in -GPTQ (IQ4_NL-GPTQ):
    # llama.cpp writes the type, then GPTQ rounds those tensors (recipe_gptq).
    token_embedding: str | None = None
    output: str | None = None
    overrides: tuple[tuple[str, str], ...] = ()  # (regex on tensor names, GGML type name)
    recipe: bool = False        # per-tensor types from a recipe (quantize.recipes or searched)
    autoround: bool = False     # <level>-ar: the level's tensors then rounded by AutoRound (autoround.py)
    gptq: bool = False          # <level>-gptq / <recipe>-gptq: the file's tensors then rounded by GPTQ (gptq.py)

    @property
    def rounds_gptq(self) -> bool:
        """GPTQ rounds some of the file's tensors: the whole level or recipe (-gptq), or a recipe's -gptq types."""
        types = (self.token_embedding, self.output, *(t for _, t in self.overrides))
        return self.gptq or any(t and tensor_rounding(t)[1] for t in types)


def valid_tensor_types() -> dict[str, int]:
    """GGML weight type name → ggml_type number, from gguf-py's enum (it mirrors ggml.h; llama-cpp-python's
    constants lack some, e.g. BF16)."""
    from gguf import GGMLQuantizationType

    return {n: int(GGMLQuantizationType[n]) for n in WEIGHT_TYPES}


def read_recipe(path: Path) -> RecipeParams:
    """A recipe file written by the search stage (the fields of a quantize.recipes entry, as JSON)."""
    import json

    from alpaca_lora_cpu.config import build

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: cannot read the searched recipe ({exc}); run the search stage") from exc
    return build(RecipeParams, doc, SEARCHED)


def plan_for(entry: str, recipes: dict[str, RecipeParams], searched: Path | None = None) -> Plan:
    """quantize.types entry → Plan: a recipe name, `searched` (the search stage's recipe file), or <type> /
    <type>-imat (q4_k_m-imat: with the imatrix), <type>-ar (q4_0-ar: rounded by AutoRound), <type>-gptq
    (iq4_nl-gptq: rounded by GPTQ), <recipe>-gptq (searched-gptq: the recipe's file, rounded by GPTQ)."""
    stem = entry.removesuffix(GPTQ)
    if entry.endswith(GPTQ) and (stem in recipes or stem == SEARCHED):
        return dataclasses.replace(plan_for(stem, recipes, searched), name=entry, gptq=True)
    if entry == SEARCHED and entry not in recipes:
        if searched is None:
            raise StageError("quantize.types has `searched` but no --searched recipe file was given")
        recipes = {SEARCHED: read_recipe(searched)}
    if entry in recipes:
        r = recipes[entry]
        try:  # the schema checks quantize.recipes; a searched recipe file is checked here the same way
            check_recipe(f"quantize.recipes.{entry}" if entry != SEARCHED else f"{searched}", r)
        except ValueError as exc:
            raise StageError(str(exc)) from exc
        plan = Plan(entry, r.type, r.imatrix, r.token_embedding and r.token_embedding.upper(),
                    r.output and r.output.upper(), tuple((k, v.upper()) for k, v in r.overrides.items()), recipe=True)
    else:
        v = parse(entry, recipes)
        plan = Plan(entry, v.level, v.imatrix, autoround=v.kind == "autoround", gptq=v.kind == "gptq")
    check_type(plan)
    return plan


def check_type(plan: Plan) -> int:
    types = valid_types()
    if plan.qtype not in types:
        raise StageError(f"unknown quantization type {plan.qtype!r} in quantize.types; valid: "
                         f"{', '.join(sorted(types))} (each also as <type>{IMAT}, with the importance matrix), "
                         "or a name from quantize.recipes")
    if plan.qtype in NEEDS_IMATRIX and not plan.imatrix:
        raise StageError(f"quantize.types: llama.cpp makes {plan.qtype} only with an importance matrix: ask for "
                         f"{plan.qtype}{IMAT}")
    return types[plan.qtype]


def asked_type(qtype: str) -> str:
    """The GGML tensor type a level asks for: q4_k_m → Q4_K, q8_0 → Q8_0, iq4_xs → IQ4_XS."""
    return re.sub(r"_K_[SML]$", "_K", qtype.upper())


def quantize_here(src: str, dst: str, plan: Plan, nthread: int, imatrix: str | None = None
                  ) -> tuple[int, float, list[str]]:
    """llama.cpp's quantizer in this process (call it from a child): default params, the plan's level and tensor
    types, and the importance matrix file if given; (return code, seconds, its log lines)."""
    import llama_cpp

    from alpaca_lora_cpu.imatrix import c_array, read
    from alpaca_lora_cpu.llama import captured_stderr

    qp = llama_cpp.llama_model_quantize_default_params()
    qp.ftype = valid_types()[plan.qtype]
    qp.nthread = nthread
    types = valid_tensor_types()
    tensor_types = {name: types[tensor_rounding(name)[0]] for name in (
        plan.token_embedding, plan.output, *(t for _, t in plan.overrides)) if name}  # llama.cpp writes the type
    if plan.token_embedding:
        qp.token_embedding_type = tensor_types[plan.token_embedding]
    if plan.output:
        qp.output_tensor_type = tensor_types[plan.output]
    keep: list = []  # every buffer a C pointer points into must outlive the call
    if imatrix:
        entries, keep_im = c_array(read(imatrix).means())
        keep += [entries, keep_im]
        qp.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if plan.overrides:
        overrides = (llama_cpp.llama_model_tensor_override * (len(plan.overrides) + 1))()
        for i, (pattern, ttype) in enumerate(plan.overrides):
            keep.append(pattern.encode())
            overrides[i].pattern = keep[-1]
            overrides[i].type = tensor_types[ttype]
        overrides[len(plan.overrides)].pattern = None
        keep.append(overrides)
        qp.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    t0 = time.perf_counter()
    with captured_stderr() as lines:
        rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(qp))
    return rc, time.perf_counter() - t0, lines


def quantize_file(src: Path, dst: Path, plan: Plan, imatrix: Path | None = None) -> tuple[float, list[str]]:
    """Quantize in a child process, so a llama.cpp crash is a one-line error; (seconds, llama.cpp's log lines)."""
    from alpaca_lora_cpu.native import call_in_child

    rc, seconds, lines = call_in_child(quantize_here, str(src), str(dst), plan, os.cpu_count() or 1,
                                       str(imatrix) if imatrix else None, file=src, action="quantizing")
    if rc != 0 or not dst.is_file():
        err = next((ln for ln in reversed(lines) if "error" in ln.lower() or "failed" in ln.lower()), f"rc={rc}")
        raise StageError(f"llama.cpp's quantizer failed on {src}: {err.strip()[:200]}")
    return seconds, lines


def imatrix_entries(log_lines: list[str]) -> int:
    """How many importance-matrix entries llama.cpp says it used (0: none), from its own log."""
    found = (re.search(r"importance matrix data with (\d+) entries", ln) for ln in log_lines)
    return next((int(m[1]) for m in found if m), 0)


def _recipe_entry(plan: Plan, name: str) -> str | None:
    """The type the plan's recipe gives a tensor as written (first matching override, then embedding/output)."""
    for pattern, ttype in plan.overrides:
        if re.search(pattern, name):
            return ttype
    if name.startswith("token_embd") and plan.token_embedding:
        return plan.token_embedding
    if name.startswith("output.") and plan.output:
        return plan.output
    return None


def recipe_type(plan: Plan, name: str) -> str | None:
    """The GGML type the plan's recipe stores a tensor in (IQ4_NL for IQ4_NL-GPTQ), or None: the level's."""
    entry = _recipe_entry(plan, name)
    return entry and tensor_rounding(entry)[0]


def recipe_gptq(plan: Plan, name: str) -> bool:
    """The plan's recipe asks GPTQ to round this tensor (its type ends in -GPTQ)."""
    entry = _recipe_entry(plan, name)
    return bool(entry) and tensor_rounding(entry)[1]
