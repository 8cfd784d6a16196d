"""The bad-input matrix: every case exits non-zero with one `error: ...` line naming the problem, and writes
nothing. Each case runs the stage as a user would (`python -m stages.<name> ...`) against a temp params file."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from tests.conftest import ROOT, make_records, run_module

pytestmark = pytest.mark.failure


@dataclass
class Case:
    id: str
    module: str
    expect: str                                  # regex the error line must match
    params: dict = field(default_factory=dict)   # "section.key" -> value; value DELETE removes the key
    setup: Callable[[Path], dict] | None = None  # makes input files; returns extra {placeholder: path}
    args: tuple = ()                             # CLI args; "{tmp}" and setup placeholders are filled in


DELETE = object()
OUT_ARGS = {
    "stages.prepare": ("--out", "{tmp}/out/prepared", "--metrics", "{tmp}/out/prepare.json"),
    "stages.base": ("--out", "{tmp}/out/base", "--metrics", "{tmp}/out/base.json"),
}


def write(tmp: Path, name: str, content: str | bytes) -> Path:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def data_file(content: str | bytes, name: str = "data.json"):
    return lambda tmp: {"data.source": str(write(tmp, name, content))}


def non_llama_folder(tmp: Path) -> dict:
    (tmp / "gpt2").mkdir()
    write(tmp / "gpt2", "config.json", json.dumps({"model_type": "gpt2"}))
    return {"base.model": str(tmp / "gpt2")}


CASES = [
    Case("unknown-key", "stages.prepare", r"unknown key 'data\.fracton'", {"data.fracton": 0.1}),
    Case("missing-key", "stages.prepare", r"missing key 'data\.seed'", {"data.seed": DELETE}),
    Case("fraction-zero", "stages.prepare", r"data\.fraction must be in \(0, 1\]", {"data.fraction": 0}),
    Case("fraction-above-one", "stages.prepare", r"data\.fraction must be in \(0, 1\]", {"data.fraction": 1.5}),
    Case("val-size-one", "stages.prepare", r"data\.val_size must be in \(0, 1\)", {"data.val_size": 1.0}),
    Case("fraction-wrong-type", "stages.prepare", r"'data\.fraction' must be float", {"data.fraction": "1%"}),
    Case("on-invalid-unknown", "stages.prepare", r"'data\.on_invalid' must be one of drop, error",
         {"data.on_invalid": "skip"}),
    Case("data-file-missing", "stages.prepare", r"data\.source .*nope\.json: file not found",
         {"data.source": "{tmp}/nope.json"}),
    Case("data-file-empty", "stages.prepare", r"data\.source .*empty\.json: cannot read",
         setup=data_file("", "empty.json")),
    Case("data-not-json", "stages.prepare", r"cannot read \(JSONDecodeError", setup=data_file("{oops")),
    Case("data-not-a-list", "stages.prepare", r"expected a JSON list of Alpaca records, got dict",
         setup=data_file('{"instruction": "x"}')),
    Case("data-not-alpaca", "stages.prepare", r"no valid Alpaca records .*record 0: missing field \('instruction'\)",
         setup=data_file(json.dumps([{"prompt": "p", "completion": "c"}]))),
    Case("data-no-records", "stages.prepare", r"no valid Alpaca records left", setup=data_file("[]")),
    Case("data-malformed-strict", "stages.prepare", r"record 2: wrong type \('output'\)",
         {"data.on_invalid": "error"},
         setup=data_file(json.dumps(make_records(2) + [{"instruction": "x", "output": 42}]))),
    Case("data-bad-jsonl-line", "stages.prepare", r"bad\.jsonl: cannot read",
         setup=data_file('{"instruction": "a", "output": "b"}\nnot json\n', "bad.jsonl")),
    Case("unwritable-output", "stages.prepare", r"cannot create output folder",
         setup=lambda tmp: {"data.source": str(write(tmp, "d.json", json.dumps(make_records(10)))),
                            "_block": str(write(tmp, "out", "a file where a folder should be"))}),
    Case("base-unknown-form", "stages.base", r"base\.model: cannot interpret 'not a model'; accepted forms",
         {"base.model": "not a model"}),
    Case("base-unknown-builtin", "stages.base", r"unknown builtin 'llama-70b'", {"base.model": "builtin:llama-70b"}),
    Case("base-non-llama", "stages.base", r"architecture 'gpt2' is not supported", setup=non_llama_folder),
    Case("base-truncated-gguf", "stages.base", r"is not a readable GGUF file",
         setup=lambda tmp: {"base.model": str(write(tmp, "cut.gguf", b"GGUF\x03\x00\x00"))}),
    Case("base-dtype-unknown", "stages.base", r"'base\.dtype' must be one of float32, bfloat16, float16",
         {"base.dtype": "int8"}),
]


def patched_params(tmp: Path, changes: dict) -> Path:
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in changes.items():
        if dotted.startswith("_"):
            continue
        *parents, key = dotted.split(".")
        node = doc
        for p in parents:
            node = node[p]
        if value is DELETE:
            del node[key]
        else:
            node[key] = value.replace("{tmp}", str(tmp)) if isinstance(value, str) else value
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path):
    extra = case.setup(tmp_path) if case.setup else {}
    params = patched_params(tmp_path, {**case.params, **extra})
    args = case.args or OUT_ARGS[case.module]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = run_module(case.module, "--params", str(params), *args,
                      env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0, proc.stdout[-1000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(case.expect, lines[0]), lines[0]
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")
                   if not p.name.startswith("mlflow.db"))
    assert after == before, f"wrote {set(after) - set(before)}"


def test_matrix_covers_at_least_twenty_distinct_inputs():
    assert len({c.id for c in CASES}) == len(CASES) >= 20
