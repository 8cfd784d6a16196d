"""Instruction following checked by rules: the bundled prompts (data/ifeval/prompts.jsonl, written for this
project in IFEval's format: `key`, `prompt`, `instruction_id_list`, `kwargs`) and their verification with
if-verifiable (Apache-2.0), which ships IFEval's instruction registry and checkers.

Scores, as IFEval defines them: prompt-level strict accuracy (every instruction of the prompt followed by the
answer as written) and instruction-level strict accuracy (instructions followed ÷ instructions); the loose variants
also accept the answer with its first/last line or markdown asterisks removed.
"""
from __future__ import annotations

from pathlib import Path

from alpaca_lora_cpu.errors import StageError

# Checkers that need data this project cannot download offline (NLTK's punkt models, which the registry's sentence
# counter and word tokenizer load; tests/test_ifeval.py runs every other checker of the bundled prompts offline).
NEEDS_DATA = {"length_constraints:number_sentences": "NLTK's punkt sentence model",
              "change_case:capital_word_frequency": "NLTK's punkt_tab word tokenizer"}


def registry() -> dict:
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    return INSTRUCTION_DICT


def load_prompts(path: Path) -> list[dict]:
    """The prompts, each checked against the registry: a known instruction id, and exactly the arguments its
    checker takes (a missing one would be drawn at random by the checker). One-line StageError naming the key."""
    from alpaca_lora_cpu.files import read_jsonl

    rows = read_jsonl(path, "instruction-following prompts", "restore data/ifeval/prompts.jsonl", records=True)
    known, seen = registry(), set()
    for i, row in enumerate(rows):
        where = f"{path}: record {i} (key {row.get('key')!r})"
        missing = [k for k in ("key", "prompt", "instruction_id_list", "kwargs") if k not in row]
        if missing:
            raise StageError(f"{where}: no {missing[0]!r}")
        if row["key"] in seen:
            raise StageError(f"{where}: the key is used twice")
        seen.add(row["key"])
        ids, kwargs = row["instruction_id_list"], row["kwargs"]
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise StageError(f"{where}: 'prompt' must be a non-empty string")
        if not isinstance(ids, list) or not ids or not isinstance(kwargs, list) or len(kwargs) != len(ids):
            raise StageError(f"{where}: 'instruction_id_list' and 'kwargs' must be lists of the same, non-zero length")
        for iid, kw in zip(ids, kwargs, strict=True):
            _check_instruction(where, iid, kw, known)
    return rows


def _check_instruction(where: str, iid: object, kw: object, known: dict) -> None:
    if iid not in known:
        raise StageError(f"{where}: unknown instruction {iid!r} (IFEval's registry: if_verifiable.ifeval)")
    if iid in NEEDS_DATA:
        raise StageError(f"{where}: {iid} needs {NEEDS_DATA[iid]}, which is not available offline")
    if not isinstance(kw, dict):
        raise StageError(f"{where}: kwargs of {iid} must be an object")
    checker = known[iid](iid)
    wanted = set(checker.get_instruction_args_keys() or ())
    given = {k for k, v in kw.items() if v is not None}
    if given != wanted:
        raise StageError(f"{where}: {iid} takes {sorted(wanted)}, got {sorted(given)}")
    try:
        checker.build_description(**kw)
    except (TypeError, ValueError) as exc:
        raise StageError(f"{where}: {iid}: {exc}") from exc


def check(response: str, row: dict) -> dict:
    """Per instruction of `row`, whether `response` follows it: {"strict": [bool, …], "loose": [bool, …]}.
    An empty answer follows none."""
    import langdetect
    from if_verifiable.common import evaluate_instructions

    langdetect.DetectorFactory.seed = 0  # langdetect samples at random; the all-lowercase/capitals checks call it
    n = len(row["instruction_id_list"])
    results, _ = evaluate_instructions(response, row["instruction_id_list"], row["kwargs"], row["prompt"], registry())
    if len(results) != n:  # only for an empty answer (every id was checked against the registry on load)
        return {"strict": [False] * n, "loose": [False] * n}
    return {"strict": [r.strict_pass for r in results], "loose": [r.loose_pass for r in results]}
