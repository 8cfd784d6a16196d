"""Hardening II, one test per class of failure found in the wider bad-input trial (issue 20); the generated cases
are in test_fuzz.py and the server's contract in test_serve_contract.py. Each ends in one `error:` line naming the
problem, exit 2, nothing written."""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from helpers import ROOT, run_module

from alpaca_lora_cpu.errors import StageError


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and len(lines[0]) <= 300, proc.stderr[-2000:]
    return lines[0]


# ---------------------------------------------------------------- 2. params the code cannot honour

def _child_env() -> str | None:
    return os.environ.get("GGML_NO_BACKTRACE")


def test_every_llama_child_runs_without_ggml_backtraces(monkeypatch):
    """ggml's abort handler attaches gdb for a backtrace and can hang for ever: children never try."""
    from alpaca_lora_cpu.native import call_in_child

    monkeypatch.delenv("GGML_NO_BACKTRACE", raising=False)
    assert call_in_child(_child_env) == "1"


@pytest.mark.parametrize("override, expect", [
    ("i32", "'i32' is not a GGML weight type"),
    ("q8_k", "'q8_k' is not a GGML weight type"),
    ("iq2_xs", "only with the importance matrix"),
])
def test_a_recipe_override_to_a_type_llama_cpp_cannot_write_is_refused_by_the_schema(tmp_path, override, expect):
    import yaml

    from alpaca_lora_cpu.config import load_params

    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    doc["quantize"]["recipes"]["bad"] = {"type": "q4_0", "imatrix": False, "token_embedding": None, "output": None,
                                         "overrides": {"ffn_down": override}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(StageError, match=f"quantize.recipes.bad.overrides.ffn_down: .*{expect}"):
        load_params(path)


@pytest.mark.parametrize("key, value", [("finetune.epochs", float("inf")), ("finetune.learning_rate", float("nan")),
                                        ("generate.seed", 2**40)])
def test_numbers_past_what_torch_and_llama_cpp_take_are_refused(tmp_path, key, value):
    import yaml

    from alpaca_lora_cpu.config import load_params

    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    section, name = key.split(".")
    doc[section][name] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(StageError, match=f"'{key}' must be"):
        load_params(path)


# ---------------------------------------------------------------- 3. inputs that disagree with each other

def test_an_empty_train_split_given_to_search_is_one_line(tmp_path, tiny_gguf):
    from stages.search import calibration_texts

    (tmp_path / "train.jsonl").write_text("\n")
    with pytest.raises(StageError, match="train split .*train.jsonl holds no records"):
        calibration_texts(tmp_path, "alpaca", tiny_gguf)


def test_an_evaluate_record_missing_a_key_is_one_line_in_report(tmp_path):
    from alpaca_lora_cpu.report.inputs import Sources, load

    (tmp_path / "ev").mkdir()
    (tmp_path / "reference.details.json").write_text(json.dumps({"run_id": "r"}))
    (tmp_path / "reference.json").write_text("{}")
    record = {"run_id": "r", "size_mb": 1.0, "bits_per_weight": 4.5, "ppl": 9.0, "top1": 0.9, "stop_rate": 1.0,
              "leak_rate": 0.0, "loop_rate": 0.0, "speed": {"gen_tps": 10.0}}  # no kld_mean
    (tmp_path / "ev" / "q4_0.details.json").write_text(json.dumps(record))
    with pytest.raises(StageError, match=r"q4_0.details.json: the record has no 'kld_mean' \(run `dvc repro "):
        load(["q4_0"], Sources(tmp_path / "ev", tmp_path / "reference.json", tmp_path / "gen", tmp_path / "loss"))


# ---------------------------------------------------------------- 4. the tracking store

def test_a_tracking_store_that_is_not_sqlite_or_sits_under_a_file_is_one_line(tmp_path):
    from alpaca_lora_cpu.tracking import check_store

    junk = tmp_path / "mlflow.db"
    junk.write_bytes(b"this is not a database" * 10)
    with pytest.raises(StageError, match=f"MLFLOW_TRACKING_URI=sqlite:///{junk} is not an SQLite database"):
        check_store(f"sqlite:///{junk}")
    with pytest.raises(StageError, match="is a file, so the SQLite file .* cannot be created under it"):
        check_store(f"sqlite:///{junk}/inner/mlflow.db")
    with pytest.raises(StageError, match="is a file, not a tracking folder"):
        check_store(str(junk))
    good = tmp_path / "good.db"
    sqlite3.connect(good).execute("create table t (x)").connection.close()
    check_store(f"sqlite:///{good}")                  # a real database, and
    check_store(f"sqlite:///{tmp_path}/new/mlflow.db")  # one not made yet, pass
    check_store("http://127.0.0.1:5000")               # a server: MLflow's own errors


@pytest.mark.slow
def test_a_stage_on_a_damaged_tracking_store_exits_2_in_one_line_writing_nothing(tmp_path):
    junk = tmp_path / "mlflow.db"
    junk.write_bytes(b"\x00" * 4096)
    out = tmp_path / "out"
    proc = run_module("stages.prepare", "--out", str(out / "prepared"), "--metrics", str(out / "prepare.json"),
                      env={"MLFLOW_TRACKING_URI": f"sqlite:///{junk}", "HF_HUB_OFFLINE": "1"})
    assert "is not an SQLite database" in one_error_line(proc)
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------- 5. the tools' text input

@pytest.mark.slow
def test_a_prompt_that_is_not_utf8_is_one_line(tiny_gguf):
    proc = run_module("tools.generate", "--model", str(tiny_gguf), "-n", "4", "--prompt", os.fsdecode(b"caf\xe9"))
    line = one_error_line(proc)
    assert "--prompt is not valid UTF-8 text (byte 0xe9 at position 3)" in line, line


@pytest.mark.slow
def test_a_gguf_that_is_not_a_model_is_one_line_in_generate(wide_model):
    proc = run_module("tools.generate", "--model", str(wide_model[2]), "-n", "4", "--prompt", "hi")
    line = one_error_line(proc)
    assert "imatrix.gguf is a llama.cpp imatrix file, not a model" in line, line


def test_the_cli_refuses_undecodable_text_in_any_option():
    from alpaca_lora_cpu.cli import check_text

    check_text("--prompt", "naïve café ✓")
    with pytest.raises(StageError, match=r"--out is not valid UTF-8 text \(byte 0xff at position 1\)"):
        check_text("--out", Path(os.fsdecode(b"a\xffb")))


def test_the_weight_types_are_gguf_pys_and_llama_cpps():
    """variants.WEIGHT_TYPES (what the schema lets recipes and the search ask for) against the libraries that
    define the format: every entry a gguf-py GGMLQuantizationType with a block size, the same number as llama.cpp's."""
    import gguf
    import llama_cpp

    from alpaca_lora_cpu.variants import NEEDS_IMATRIX, WEIGHT_TYPES

    for name in WEIGHT_TYPES:
        assert name in gguf.GGMLQuantizationType.__members__, name
        assert gguf.GGMLQuantizationType[name] in gguf.GGML_QUANT_SIZES, name
        # llama-cpp-python lacks some constants (BF16); where it has one, it is the same ggml_type number
        assert getattr(llama_cpp, f"GGML_TYPE_{name}", int(gguf.GGMLQuantizationType[name])) == \
            int(gguf.GGMLQuantizationType[name]), name
    assert {t.upper() for t in NEEDS_IMATRIX} <= set(WEIGHT_TYPES)
    assert not {"I8", "I16", "I32", "I64", "F64", "Q8_1", "Q8_K"} & set(WEIGHT_TYPES)


@pytest.mark.slow
def test_llama_cpps_quantizer_takes_every_weight_type_as_an_override(wide_model, tmp_path):
    """What the schema accepts, llama.cpp really writes: each weight type as a per-tensor override (with the
    importance matrix), and the file holds that type for that tensor."""
    from gguf import GGMLQuantizationType

    from alpaca_lora_cpu.gguf_files import check_gguf
    from alpaca_lora_cpu.quantizer import Plan, quantize_file
    from alpaca_lora_cpu.variants import WEIGHT_TYPES

    _, gguf, imatrix = wide_model
    for name in WEIGHT_TYPES:
        out = tmp_path / f"{name}.gguf"
        quantize_file(gguf, out, Plan(name, "q8_0", True, overrides=((r"blk\.0\.ffn_down", name),), recipe=True),
                      imatrix)
        written = {t.name: t.type_id for t in check_gguf(out).tensors}["blk.0.ffn_down.weight"]
        assert written == int(GGMLQuantizationType[name]), (name, written)
        out.unlink()
