"""Generated bad inputs (hypothesis): params drawn at and past each schema limit, and every input file kind
damaged at random (truncated at a random offset, bytes flipped, emptied, or another format's bytes), fed to the
readers the stages use. Each must either accept the input or raise one StageError: one line of at most 300
characters, no other exception. Truncated, empty and wrong-format files must always be refused; a few cases also
run the real stage as a subprocess (exit 2, one `error:` line, no traceback, no output written).

The draws are seeded (derandomized): `make test` runs the `ci` profile (a few dozen cases a reader, under 5
minutes in all); `make fuzz` runs the `fuzz` profile (HYPOTHESIS_PROFILE=fuzz: ten times as many).
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import ROOT, run_module
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alpaca_lora_cpu.config import Params, build
from alpaca_lora_cpu.errors import StageError

settings.register_profile("ci", max_examples=25, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=250, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEFAULTS = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))


def leaves(doc: dict, prefix: tuple = ()) -> list[tuple[tuple, object]]:
    out = []
    for k, v in doc.items():
        if isinstance(v, dict) and v and prefix + (k,) != ("quantize", "recipes"):
            out += leaves(v, prefix + (k,))
        else:
            out.append((prefix + (k,), v))
    return out


NUMERIC = [(k, v) for k, v in leaves(DEFAULTS) if isinstance(v, (int, float)) and not isinstance(v, bool)]
ALL_KEYS = [k for k, _ in leaves(DEFAULTS)]


def schema_type(key: tuple) -> object:
    """The declared type of a params key (int, float, int | None, …), from the schema's dataclasses."""
    import dataclasses
    import typing

    tp: object = Params
    for k in key:
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        tp = typing.get_type_hints(inner[0] if inner else tp)[k]
    options = [a for a in typing.get_args(tp) if a is not type(None)]
    return options[0] if len(options) == 1 else tp


def one_line(exc: StageError) -> str:
    text = str(exc)
    assert "\n" not in text and 0 < len(text) <= 300, text
    return text


def with_value(key: tuple, value: object) -> dict:
    doc = copy.deepcopy(DEFAULTS)
    node = doc
    for k in key[:-1]:
        node = node[k]
    node[key[-1]] = value
    return doc


EDGE = st.one_of(st.sampled_from([math.inf, -math.inf, math.nan, 2**31, 2**63, -(2**31), -1, 0, 0.0, 1e308]),
                 st.integers(min_value=-(2**70), max_value=2**70),
                 st.floats(allow_nan=True, allow_infinity=True))
WRONG_TYPE = st.one_of(st.text(max_size=8), st.lists(st.integers(), max_size=3), st.none(), st.booleans(),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@given(st.sampled_from(NUMERIC), EDGE)
def test_a_number_at_or_past_its_limit_is_accepted_or_one_line_naming_the_key(item, value):
    key, _ = item
    try:
        build(Params, with_value(key, value), "")
    except StageError as exc:
        assert key[-1] in one_line(exc), exc
        return
    # accepted: then it is finite, and an int key's value fits a C int (every number reaches torch, numpy or
    # llama.cpp)
    assert math.isfinite(value), (key, value)
    if schema_type(key) is int:
        assert isinstance(value, int) and abs(value) <= 2**31 - 1, (key, value)


@given(st.sampled_from(ALL_KEYS), WRONG_TYPE)
def test_a_value_of_the_wrong_type_is_one_line_naming_the_key(key, value):
    try:
        build(Params, with_value(key, value), "")
    except StageError as exc:
        assert ".".join(key) in one_line(exc) or key[-1] in str(exc), exc


@given(st.text(min_size=1, max_size=8))
def test_a_recipe_override_to_any_type_is_a_weight_type_or_refused(name):
    doc = with_value(("quantize", "recipes"), {"r": {"type": "q4_0", "imatrix": False, "token_embedding": None,
                                                     "output": None, "overrides": {"ffn_down": name}}})
    from alpaca_lora_cpu.variants import NEEDS_IMATRIX, WEIGHT_TYPES

    try:
        build(Params, doc, "")
    except StageError as exc:
        assert "quantize.recipes.r.overrides.ffn_down" in one_line(exc), exc
        return
    assert name.upper() in WEIGHT_TYPES and name.lower() not in NEEDS_IMATRIX


# ---------------------------------------------------------------- damaged files

DAMAGE = st.one_of(st.tuples(st.just("truncate"), st.floats(min_value=0.0, max_value=0.999)),
                   st.tuples(st.just("flip"), st.lists(st.floats(min_value=0.0, max_value=0.999), min_size=1,
                                                       max_size=8)),
                   st.tuples(st.just("empty"), st.none()),
                   st.tuples(st.just("other"), st.sampled_from([b"GGUF\x03\x00", b"PK\x03\x04junk", b'{"a": 1',
                                                                b"\x00" * 64, "héllo".encode()])))


def damage(src: Path, dst: Path, how: tuple) -> bool:
    """Write a damaged copy of `src` at `dst`; True when the damage must always be refused."""
    data = src.read_bytes()
    kind, arg = how
    if kind == "truncate":
        cut = max(0, min(len(data) - 1, int(arg * len(data))))
        dst.write_bytes(data[:cut])
        # cutting only a trailing newline, or a GGUF's zero padding after its last tensor, leaves a valid file
        return cut < len(data.rstrip(b" \t\r\n\x00"))
    if kind == "flip":
        buf = bytearray(data)
        for f in arg:
            buf[int(f * len(buf))] ^= 0xFF
        dst.write_bytes(bytes(buf))
        return False  # a flip inside tensor data leaves a valid file
    if kind == "empty":
        dst.write_bytes(b"")
        return True
    dst.write_bytes(arg)
    return True


def check_reader(read, path: Path, must_fail: bool) -> None:
    try:
        read(path)
    except StageError as exc:
        assert str(path) in one_line(exc) or path.name in str(exc), exc
        return
    assert not must_fail, f"{path} was accepted after damage"


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ref")
    rng = np.random.default_rng(0)
    np.savez(d / "reference.npz", lengths=np.array([3, 2]), ids=np.arange(5), top_ids=rng.integers(0, 9, (5, 4)),
             top_logp=rng.normal(size=(5, 4)).astype(np.float32), tail=np.zeros(5, np.float32),
             target=np.arange(5))
    (d / "meta.json").write_text(json.dumps({"run_id": "x"}))
    (d / "prompts.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    return d


@given(how=DAMAGE)
def test_a_damaged_model_gguf_is_refused_in_one_line(tiny_gguf, tmp_path_factory, how):
    from alpaca_lora_cpu.gguf_files import check_model_gguf

    dst = tmp_path_factory.mktemp("g") / "model.gguf"
    check_reader(check_model_gguf, dst, damage(tiny_gguf, dst, how))


@given(how=DAMAGE)
def test_a_damaged_imatrix_is_refused_in_one_line(wide_model, tmp_path_factory, how):
    from alpaca_lora_cpu.imatrix import read

    dst = tmp_path_factory.mktemp("i") / "imatrix.gguf"
    check_reader(read, dst, damage(wide_model[2], dst, how))


@given(how=DAMAGE)
def test_damaged_safetensors_weights_are_refused_in_one_line(tiny_model_dir, tmp_path_factory, how):
    from alpaca_lora_cpu.shards import Weights

    folder = tmp_path_factory.mktemp("w")
    shutil.copy(tiny_model_dir / "config.json", folder)
    must_fail = damage(tiny_model_dir / "model.safetensors", folder / "model.safetensors", how)

    def read(path: Path) -> None:
        w = Weights(path.parent)
        for name in w.names():  # every tensor read, as merge and consolidate do
            w.get(name)

    check_reader(read, folder / "model.safetensors", must_fail)


@given(how=DAMAGE)
def test_a_damaged_adapter_is_refused_in_one_line(tiny_adapter, tmp_path_factory, how):
    from alpaca_lora_cpu import lora

    folder = tmp_path_factory.mktemp("a")
    shutil.copy(tiny_adapter / "adapter_config.json", folder)
    must_fail = damage(tiny_adapter / lora.WEIGHTS, folder / lora.WEIGHTS, how)
    check_reader(lambda p: lora.read(p.parent), folder / lora.WEIGHTS, must_fail)


@given(how=DAMAGE, which=st.sampled_from(["reference.npz", "meta.json", "prompts.jsonl"]))
def test_a_damaged_reference_is_refused_in_one_line(reference_dir, tmp_path_factory, how, which):
    from stages.evaluate import load_reference

    d = tmp_path_factory.mktemp("r")
    for f in reference_dir.iterdir():
        shutil.copy(f, d)
    must_fail = damage(reference_dir / which, d / which, how)
    check_reader(lambda p: load_reference(p.parent), d / which, must_fail)


@given(how=DAMAGE)
def test_a_damaged_data_split_is_refused_in_one_line(tmp_path_factory, how):
    from alpaca_lora_cpu.files import read_jsonl

    d = tmp_path_factory.mktemp("s")
    src = d / "src.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"say {i}", "input": "", "output": "ok"}) + "\n"
                           for i in range(5)))
    check_reader(lambda p: read_jsonl(p, "train split", records=True), d / "train.jsonl",
                 damage(src, d / "train.jsonl", how) and how[0] != "truncate")


# ---------------------------------------------------------------- the real stages, as a user runs them

@pytest.mark.slow
@pytest.mark.parametrize("how", [("truncate", 0.5), ("empty", None), ("other", b"PK\x03\x04junk")])
def test_quantize_with_a_damaged_imatrix_exits_2_in_one_line_writing_nothing(wide_model, tmp_path, how):
    _, gguf, imatrix = wide_model
    bad = tmp_path / "imatrix.gguf"
    damage(imatrix, bad, how)
    out = tmp_path / "out"
    proc = run_module("stages.quantize", "--type", "q4_k_m-imat", "--src", str(gguf), "--imatrix", str(bad),
                      "--out", str(out / "m.gguf"), "--modelfile", str(out / "m.Modelfile"), "--metrics",
                      str(out / "q.json"), env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
    assert_one_line_error(proc, out)


@pytest.mark.slow
@pytest.mark.parametrize("how", [("truncate", 0.3), ("other", b"\x00" * 64)])
def test_evaluate_with_a_damaged_reference_exits_2_in_one_line_writing_nothing(tiny_gguf_quants, reference_dir,
                                                                               tmp_path, how):
    ref = tmp_path / "ref"
    shutil.copytree(reference_dir, ref)
    damage(reference_dir / "reference.npz", ref / "reference.npz", how)
    out = tmp_path / "out"
    proc = run_module("stages.evaluate", "--variant", "q4_0", "--gguf", str(tiny_gguf_quants["q4_0"]),
                      "--reference", str(ref), "--metrics", str(out / "e.json"), "--generations",
                      str(out / "e.jsonl"), env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
    assert_one_line_error(proc, out)


def assert_one_line_error(proc, out: Path) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and len(errors[0]) <= 300, proc.stderr[-2000:]
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
