"""The bundled instruction-following prompts and their checks (if-verifiable, IFEval's registry), offline."""
from __future__ import annotations

import json
from collections import Counter

import pytest
from helpers import ROOT

from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.ifeval import NEEDS_DATA, check, load_prompts

PROMPTS = ROOT / "data/ifeval/prompts.jsonl"
RESPONSES = ["", "hello world", "* one\n* two\n* three", '```json\n{"a": 1}\n```', "A LOUD ANSWER.",
             "Section 1\nfirst\n\nSection 2\nsecond\n***\nthird P.S. bye", '"quoted, with a comma"',
             "My answer is yes.", "<<A title>>\nwords words words [name] [date] *one* *two*"]


def test_the_bundled_set_is_large_varied_and_valid():
    rows = load_prompts(PROMPTS)
    kinds = Counter(i for r in rows for i in r["instruction_id_list"])
    assert len(rows) >= 100 and len({r["key"] for r in rows}) == len(rows)
    assert len(kinds) >= 18 and not set(kinds) & set(NEEDS_DATA)
    assert sum(len(r["instruction_id_list"]) > 1 for r in rows) >= 25  # combined constraints, as in IFEval


def test_the_cost_model_counts_the_bundled_prompts():
    from alpaca_lora_cpu.cost import IFEVAL_PROMPTS

    assert IFEVAL_PROMPTS == len(PROMPTS.read_text().splitlines())


def test_every_bundled_check_runs_offline():
    # a checker that needs NLTK data would raise LookupError here, on this machine without a download
    for row in load_prompts(PROMPTS):
        for response in RESPONSES:
            result = check(response, row)
            assert len(result["strict"]) == len(result["loose"]) == len(row["instruction_id_list"])


def row(iid, kwargs, prompt="p"):
    return {"key": 1, "prompt": prompt, "instruction_id_list": [iid], "kwargs": [kwargs]}


@pytest.mark.parametrize(("iid", "kwargs", "good", "bad"), [
    ("change_case:english_lowercase", {}, "the moon is a rock in the sky.", "The Moon is a rock."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n* b", "* a\n* b\n* c"),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Tea is hot. Any other questions?",
     "Any other questions? Tea is hot."),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "one two three",
     "one two three four five six"),
    ("punctuation:no_comma", {}, "no commas here", "one, two"),
    ("detectable_format:json_format", {}, '{"city": "Paris"}', "Paris is the capital."),
])
def test_checks_tell_a_followed_instruction_from_a_broken_one(iid, kwargs, good, bad):
    assert check(good, row(iid, kwargs))["strict"] == [True]
    assert check(bad, row(iid, kwargs))["strict"] == [False]
    assert check("", row(iid, kwargs)) == {"strict": [False], "loose": [False]}


@pytest.mark.parametrize(("iid", "kwargs", "needle"), [
    ("keywords:teleport", {}, "unknown instruction 'keywords:teleport'"),
    ("length_constraints:number_words", {"num_words": 5}, r"takes \['num_words', 'relation'\], got \['num_words'\]"),
    ("change_case:english_lowercase", {"extra": 1}, r"takes \[\], got \['extra'\]"),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "less than"}, "not available offline"),
])
def test_a_bad_prompt_is_one_line_naming_its_key(tmp_path, iid, kwargs, needle):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps(row(iid, kwargs) | {"key": 7}) + "\n")
    with pytest.raises(StageError, match=needle) as err:
        load_prompts(path)
    assert "(key 7)" in str(err.value) and "\n" not in str(err.value)
