"""params.yaml loading: typed, complete, strict about unknown keys, checked whole at every entry point."""
from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import yaml
from helpers import ROOT, run_module, stage_options

from alpaca_lora_cpu.config import Params, build, load_params
from alpaca_lora_cpu.errors import StageError

ROOT_PARAMS = ROOT / "params.yaml"


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
    params = load_params(ROOT_PARAMS)
    assert params.data.fraction == doc["data"]["fraction"]
    assert [f.name for f in dataclasses.fields(Params)] == list(doc)  # one field per section, in file order
    assert params.quantize.types == tuple(doc["quantize"]["types"])
    assert params.data.format == doc["data"]["format"]


def test_malformed_params_file_is_one_line_error(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(StageError, match="not valid YAML") as err:
        load_params(bad)
    assert "\n" not in str(err.value)


def test_range_checks_name_the_key(tmp_path):
    doc = yaml.safe_load(open(ROOT_PARAMS))
    doc["data"]["fraction"] = 1.5
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(StageError, match=r"data\.fraction must be in \(0, 1\]"):
        load_params(p)


def write_params(tmp: Path, edit) -> Path:
    """The repo's params.yaml changed by `edit(doc)`, written to tmp."""
    doc = yaml.safe_load(ROOT_PARAMS.read_text())
    edit(doc)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def one_line_error(path: Path) -> str:
    with pytest.raises(StageError) as err:
        load_params(path)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d.pop("export"), "missing key 'export'"),
    (lambda d: d.update(exprt=d["export"]), "unknown key 'exprt'"),
    (lambda d: d.update(export=3), "'export' must be a mapping"),
    (lambda d: d["evaluate"]["speed"].pop("runs"), "missing key 'evaluate.speed.runs'"),
], ids=["missing-section", "unknown-section", "section-not-mapping", "missing-nested-key"])
def test_whole_file_problems_name_the_full_key(tmp_path, edit, needle):
    assert needle in one_line_error(write_params(tmp_path, edit))


def test_missing_section_stops_prepare_before_any_work(tmp_path):
    """`prepare` reads only `data`, but a file without `export` must stop it, not a stage hours later."""
    params = write_params(tmp_path, lambda d: d.pop("export"))
    before = sorted(tmp_path.rglob("*"))
    proc = run_module("stages.prepare", "--params", str(params), "--out", str(tmp_path / "out/prepared"),
                      "--metrics", str(tmp_path / "out/prepare.json"),
                      env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "'export'" in errors[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert sorted(tmp_path.rglob("*")) == before  # no output folder, no metrics, no MLflow run


@pytest.mark.parametrize("types, needle", [
    (["q4_0", "q4_0"], "quantize.types lists 'q4_0' more than once"),
    ([], "quantize.types must list at least one"),
    (["q4_0", "base"], "quantize.types: 'base' is an unquantized variant"),
    (["q4_k_m-gptq"], "quantize.types: GPTQ rounding is written for q4_0, q5_0, iq4_nl blocks, not 'q4_k_m'"),
    (["nosuch-gptq"], "-gptq entries: q4_0-gptq, q5_0-gptq, iq4_nl-gptq, searched-gptq or <recipe>-gptq"),
])
def test_quantize_types_are_checked(tmp_path, types, needle):
    assert needle in one_line_error(write_params(tmp_path, lambda d: d["quantize"].update(types=types)))


@pytest.mark.parametrize("name, needle", [
    ("finetuned", "quantize.recipes.finetuned: 'finetuned' is the unquantized finetuned variant's name"),
    ("emb-imat", "quantize.recipes.emb-imat: a recipe name must not end in -imat"),
    ("emb-gptq", "quantize.recipes.emb-gptq: a recipe name must not end in -gptq"),
])
def test_recipe_names_cannot_collide_with_other_variants(tmp_path, name, needle):
    def edit(doc):
        doc["quantize"]["recipes"][name] = doc["quantize"]["recipes"]["emb-q4"]

    assert needle in one_line_error(write_params(tmp_path, edit))


def test_gptq_levels_need_the_covariances_and_a_damping_in_range(tmp_path):
    def no_covariance(doc):
        doc["imatrix"]["covariance"] = False
        doc["quantize"]["types"] = ["q4_0", "iq4_nl-gptq"]

    assert "quantize.types has iq4_nl-gptq" in one_line_error(write_params(tmp_path, no_covariance))
    assert "imatrix.covariance: true" in one_line_error(write_params(tmp_path, no_covariance))
    for damp in (0, -0.1, 1.5):
        path = write_params(tmp_path, lambda d, v=damp: d["quantize"]["gptq"].update(damp=v))
        assert "quantize.gptq.damp must be in (0, 1]" in one_line_error(path)
    path = write_params(tmp_path, lambda d: d["quantize"]["gptq"].update(act_order="yes"))
    assert "'quantize.gptq.act_order' must be bool, got 'yes'" in one_line_error(path)


def test_search_types_and_recipe_types_take_gptq_formats_only(tmp_path):
    path = write_params(tmp_path, lambda d: d["search"].update(types=["q4_0", "q4_k-gptq"]))
    assert "search.types[1]: GPTQ rounding is written for q4_0, q5_0, iq4_nl blocks, not 'q4_k'" in one_line_error(
        path)
    path = write_params(tmp_path, lambda d: d["quantize"]["recipes"]["emb-q4"]["overrides"].update(ffn="q6_k-gptq"))
    assert "quantize.recipes.emb-q4.overrides.ffn: GPTQ rounding is written for" in one_line_error(path)

    def no_covariance(doc):
        doc["imatrix"]["covariance"] = False
        doc["quantize"]["types"] = ["q4_0"]
        doc["search"]["types"] = ["q4_0", "iq4_nl-gptq"]

    assert "search.types has iq4_nl-gptq, which GPTQ rounds over the input covariances" in one_line_error(
        write_params(tmp_path, no_covariance))
    ok = write_params(tmp_path, lambda d: d["search"].update(types=["q4_0", "iq4_nl-gptq", "Q5_0-GPTQ"]))
    assert load_params(ok).search.types == ("q4_0", "iq4_nl-gptq", "Q5_0-GPTQ")


def test_gptq_names_a_level_a_recipe_or_searched():
    from alpaca_lora_cpu.config import RecipeParams
    from alpaca_lora_cpu.quantizer import plan_for
    from alpaca_lora_cpu.variants import check_names, parse, twin

    mix = RecipeParams(type="iq4_nl", imatrix=True, token_embedding=None, output=None, overrides={"ffn_down": "q5_0"})
    check_names(["q5_0-gptq", "mix-gptq", "searched-gptq"], {"mix": mix})
    assert (parse("q5_0-gptq", {}).kind, parse("q5_0-gptq", {}).level) == ("gptq", "q5_0")
    v = parse("mix-gptq", {"mix": mix})
    assert (v.kind, v.level, v.imatrix, v.recipe) == ("gptq", "iq4_nl", True, "mix")
    assert parse("searched-gptq", {}).recipe == "searched"
    plan = plan_for("mix-gptq", {"mix": mix})
    assert plan.gptq and plan.recipe and plan.imatrix and plan.name == "mix-gptq" and plan.overrides
    assert [twin(n) for n in ("q4_0-imat", "q4_0-ar", "mix-gptq", "q4_0", "searched")] == [
        "q4_0", "q4_0", "mix", None, None]


def test_the_gptq_levels_are_the_formats_gptq_writes():
    from alpaca_lora_cpu.gptq import FORMATS
    from alpaca_lora_cpu.variants import GPTQ_LEVELS

    assert set(GPTQ_LEVELS) == set(FORMATS)


# Every command-line entry point with its options (given dummy paths: the params check comes first): the stages'
# as dvc.yaml runs them, the tools' required ones.
ENTRY_POINTS = {
    **stage_options(),
    "tools.generate": ("model", "prompt"),
    "tools.serve": ("model",),
    "tools.bench_serve": ("gguf",),
    "tools.bench_infer": ("gguf",),
    "tools.bench_autoround": ("src", "imatrix"),
    "tools.bench_gptq": ("src", "imatrix"),
    "tools.bench_finetune": (),
    "tools.sweep": ("grid", "doc", "source"),
    "tools.plan": (),
    "tools.bench_scale": (),
}


def test_entry_point_list_is_complete():
    found = {f"{p.parent.name}.{p.stem}" for folder in ("stages", "tools") for p in (ROOT / folder).glob("*.py")
             if re.search(r"^def main\(", p.read_text(), re.MULTILINE)}
    # make setup's llama.cpp build and plots template run before anything reads params.yaml; the MLflow views and
    # the results guide's metrics table read only the tracking store and `dvc metrics show`; synthetic checkpoints
    # take only their shape
    assert found - {"tools.llama_build", "tools.plots_template", "tools.mlflow_views",
                    "tools.results_table", "tools.synthetic"} == set(ENTRY_POINTS)


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_every_entry_point_checks_the_whole_file(tmp_path, module):
    params = write_params(tmp_path, lambda d: d.pop("export"))
    argv = ["--params", str(params)]
    for name in ENTRY_POINTS[module]:
        argv += [f"--{name}", str(tmp_path / name)]
    with pytest.raises(StageError, match="missing key 'export'"):
        importlib.import_module(module).main(argv)
