"""quantize: llama.cpp's quantizer per level, tensor types read back, Modelfile, unknown types, DVC caching."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml
from helpers import run_module

from alpaca_lora_cpu.config import PromptParams
from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.gguf_files import tensor_infos
from alpaca_lora_cpu.llama import open_llama
from alpaca_lora_cpu.quantizer import plan_for, valid_types
from stages.quantize import modelfile, run

# Runs entry points as subprocesses / converts and quantizes models: `make test`, not `make test-fast`.
pytestmark = pytest.mark.slow


ALPACA = PromptParams(template="alpaca")


def test_valid_types_cover_the_defaults_and_unknown_lists_them():
    assert {"q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "q3_k_m", "q2_k"} <= set(valid_types())
    with pytest.raises(StageError, match="unknown quantization type 'q4_z'.*valid: .*q4_k_m"):
        plan_for("q4_z", {})


def test_q4_0_and_k_quant_fallbacks_are_explained(tmp_path, tiny_gguf):
    m = run(plan_for("q4_0", {}), ALPACA, tiny_gguf, tmp_path / "finetuned-q4_0.gguf",
            tmp_path / "finetuned-q4_0.Modelfile")
    infos = tensor_infos(tmp_path / "finetuned-q4_0.gguf")
    assert m["file_bytes"] == (tmp_path / "finetuned-q4_0.gguf").stat().st_size < tiny_gguf.stat().st_size
    assert m["tensor_types"].get("Q4_0", 0) > 0 and 4 < m["bits_per_weight"] < 16
    assert sum(g["count"] for g in m["other_type"].values()) == sum(t.type != "Q4_0" for t in infos)
    # The tiny model's 64-wide rows are not multiples of 256: every k-quant tensor falls back, with the reason.
    k = run(plan_for("q4_k_m", {}), ALPACA, tiny_gguf, tmp_path / "finetuned-q4_k_m.gguf", tmp_path / "k.Modelfile")
    assert "Q4_K" not in k["tensor_types"]
    assert any("not divisible by 256" in reason for reason in k["other_type"])
    with open_llama(tmp_path / "finetuned-q4_k_m.gguf", n_ctx=64, threads=2):
        pass


def test_modelfile_has_template_and_stops(tmp_path, tiny_gguf):
    run(plan_for("q8_0", {}), ALPACA, tiny_gguf, tmp_path / "finetuned-q8_0.gguf",
        tmp_path / "finetuned-q8_0.Modelfile")
    text = (tmp_path / "finetuned-q8_0.Modelfile").read_text()
    assert "FROM ./finetuned-q8_0.gguf" in text and "{{ .Prompt }}" in text and "### Response:" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "### Instruction:"' in text
    assert 'PARAMETER stop "### Input:"' in text and 'PARAMETER stop "### Response:"' in text
    # the chat layout is the GGUF's own chat template rendered around Ollama's prompt, and it stops at the EOS
    from alpaca_lora_cpu.gguf_files import chat_template, check_gguf

    chat = modelfile("m.gguf", "chat", "<|im_end|>", ("END",), chat_template(check_gguf(tiny_gguf)))
    assert "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n" in chat
    assert chat.count('PARAMETER stop "<|im_end|>"') == 1
    assert 'PARAMETER stop "END"' in chat and "### Instruction:" not in chat
    with pytest.raises(StageError, match="needs a tokenizer with a chat template"):
        modelfile("m.gguf", "chat", "<|im_end|>", (), None)


def test_unknown_type_cli_is_one_line_and_writes_nothing(tmp_path, tiny_gguf):
    proc = run_module("stages.quantize", "--type", "q9_k", "--src", str(tiny_gguf), "--out",
                      str(tmp_path / "q.gguf"), "--modelfile", str(tmp_path / "q.Modelfile"), "--metrics",
                      str(tmp_path / "q.json"))
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: unknown quantization type 'q9_k'")
    assert len(proc.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_each_type_is_its_own_dvc_stage(repo_copy, tiny_gguf):
    """quantize@<type> is cached on its own: adding a type leaves the existing ones up to date."""
    env_dvc = ["dvc"]
    gguf = repo_copy / "models/gguf/finetuned-reference.gguf"
    gguf.parent.mkdir(parents=True)
    shutil.copy(tiny_gguf, gguf)
    # quantize@<type> also depends on the imatrix and the searched recipe; plain types read neither
    (repo_copy / "models/imatrix").mkdir(parents=True)
    (repo_copy / "models/imatrix/imatrix.gguf").write_bytes(b"unused by plain levels")
    # ...and the -gptq levels' input covariances
    (repo_copy / "models/imatrix/hessians").mkdir()
    (repo_copy / "models/imatrix/hessians/hessians.json").write_text("{}")
    (repo_copy / "models/search").mkdir(parents=True)
    (repo_copy / "models/search/recipe.json").write_text("{}")
    (repo_copy / "models/search/gptq-blocks").mkdir()  # the search's kept GPTQ blocks: none here
    (repo_copy / "models/search/gptq-blocks/index.json").write_text("{}")
    # ...and the -ar levels' inputs (the merged checkpoint and the calibration text), which plain types never read
    (repo_copy / "models/merged").mkdir(parents=True)
    (repo_copy / "models/merged/config.json").write_text("{}")
    prepared = repo_copy / "data/prepared"
    prepared.mkdir(parents=True, exist_ok=True)
    (prepared / "train.jsonl").write_text("")
    params = repo_copy / "params.yaml"
    doc = yaml.safe_load(params.read_text())
    doc["quantize"]["types"] = ["q4_0"]
    params.write_text(yaml.safe_dump(doc, sort_keys=False))

    def dvc(*args):
        proc = subprocess.run(env_dvc + list(args), cwd=repo_copy, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout

    dvc("repro", "--single-item", "quantize@q4_0")
    assert json.loads((repo_copy / "reports/metrics/quantize/q4_0.details.json").read_text())["type"] == "q4_0"
    doc["quantize"]["types"] = ["q4_0", "q8_0"]
    params.write_text(yaml.safe_dump(doc, sort_keys=False))
    status = dvc("status", "quantize@q4_0")
    assert "up to date" in status or status.strip() == "", status
    assert "quantize@q8_0" in dvc("stage", "list")
    lock = yaml.safe_load((repo_copy / "dvc.lock").read_text())["stages"]["quantize@q4_0"]
    used = set(lock.get("params", {}).get("params.yaml", {}))
    assert "quantize.types" not in used and "quantize" not in used and "quantize.recipes" in used
    # ...while a param it does use still invalidates it (the status check above is not vacuous).
    params.write_text(params.read_text().replace("template: alpaca", "template: chat"))
    assert "changed" in dvc("status", "quantize@q4_0")


def test_unwritable_output_folder_stops_before_quantizing(tmp_path, tiny_gguf):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(StageError, match="cannot create output folder"):
        run(plan_for("q4_0", {}), ALPACA, tiny_gguf, blocker / "finetuned-q4_0.gguf", tmp_path / "m.Modelfile")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-folder"]
