"""params.yaml loading: typed, complete, and strict about unknown keys."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import yaml

from stages.config import build, load_section
from stages.errors import StageError
from stages.prepare import DataParams

ROOT_PARAMS = "params.yaml"


@dataclass(frozen=True)
class Inner:
    r: int


@dataclass(frozen=True)
class Outer:
    name: str
    rate: float
    mode: Literal["a", "b"]
    items: tuple[str, ...]
    cap: int | None
    inner: Inner


GOOD = {"name": "x", "rate": 1, "mode": "a", "items": ["q", "v"], "cap": None, "inner": {"r": 8}}


def test_build_accepts_valid_and_coerces():
    out = build(Outer, GOOD, "s")
    assert out == Outer("x", 1.0, "a", ("q", "v"), None, Inner(8))
    assert isinstance(out.rate, float)


@pytest.mark.parametrize("patch, needle", [
    ({"extra": 1}, "unknown key 's.extra'"),
    ({"inner": {"r": 8, "zz": 1}}, "unknown key 's.inner.zz'"),
    ({"mode": "c"}, "'s.mode' must be one of a, b"),
    ({"rate": "fast"}, "'s.rate' must be float"),
    ({"cap": True}, "'s.cap'"),
    ({"items": "q"}, "'s.items' must be a list"),
    ({"inner": {"r": "8"}}, "'s.inner.r' must be int"),
])
def test_build_rejects_bad_keys(patch, needle):
    with pytest.raises(StageError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        build(Outer, {**GOOD, **patch}, "s")


def test_build_rejects_missing_key():
    raw = dict(GOOD)
    del raw["rate"]
    with pytest.raises(StageError, match=r"missing key 's\.rate'"):
        build(Outer, raw, "s")


def test_repo_params_load_for_every_section():
    doc = yaml.safe_load(open(ROOT_PARAMS))
    assert load_section(DataParams, "data", ROOT_PARAMS).fraction == doc["data"]["fraction"]


def test_malformed_params_file_is_one_line_error(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(StageError, match="not valid YAML") as err:
        load_section(DataParams, "data", bad)
    assert "\n" not in str(err.value)


def test_range_checks_name_the_key(tmp_path):
    doc = yaml.safe_load(open(ROOT_PARAMS))
    doc["data"]["fraction"] = 1.5
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(StageError, match=r"data\.fraction must be in \(0, 1\]"):
        load_section(DataParams, "data", p)
