"""convert + gguf_io: llama.cpp's converter output passes the gates; a corrupt GGUF, a double BOS and
truncated / non-GGUF files are caught."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from helpers import run_module, write_val

from alpaca_lora_cpu.config import ConvertParams
from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.gguf_files import check_gguf, field_value, tensor_infos
from alpaca_lora_cpu.llama import all_logits, open_llama, tokenize
from alpaca_lora_cpu.parity import gate_texts
from stages.convert import gate_message, gguf_gates

# Runs entry points as subprocesses / converts and quantizes models: `make test`, not `make test-fast`.
pytestmark = pytest.mark.slow


PARAMS = ConvertParams(outtype="f16", gate_prompts=3, gate_max_tokens=64, min_top1_agreement=0.99)


@pytest.fixture
def texts(tmp_path):
    return gate_texts(write_val(tmp_path / "val.jsonl"), 3, "alpaca")


def test_tiny_gguf_is_f16_and_gives_logits_for_every_position(tiny_gguf):
    reader = check_gguf(tiny_gguf)
    assert field_value(reader, "general.architecture") == "llama"
    types = {t.type for t in tensor_infos(reader)}
    assert types == {"F16", "F32"}
    with open_llama(tiny_gguf, n_ctx=128, threads=2, logits_all=True) as llm:
        ids = tokenize(llm, "Hello world, how are you?")
        logits = all_logits(llm, ids)
    assert logits.shape == (len(ids), 49152) and np.isfinite(logits).all()


def test_convert_gates_pass(tiny_gguf, tiny_model_dir, texts):
    m = gguf_gates(tiny_gguf, tiny_model_dir, texts, PARAMS)
    assert m["gates_passed"], m
    assert m["tokenization"] == {"identical": 3, "texts": 3, "double_bos": 0, "first_mismatch": None}
    assert m["logits"]["top1_agreement"] >= 0.99 and m["logits"]["mean_abs_logprob_diff"] < 0.01


def test_corrupt_gguf_weights_fail_the_logit_gate(tmp_path, tiny_gguf, tiny_model_dir, texts):
    bad = tmp_path / "bad.gguf"
    shutil.copy(tiny_gguf, bad)
    emb = next(t for t in check_gguf(bad).tensors if t.name == "token_embd.weight")
    with open(bad, "r+b") as fh:  # scramble the embedding rows in place: still a valid GGUF header
        fh.seek(emb.data_offset)
        fh.write(np.random.default_rng(0).standard_normal(emb.n_bytes // 2).astype(np.float16).tobytes())
    m = gguf_gates(bad, tiny_model_dir, texts, PARAMS)
    assert m["gates"]["top1_agreement"] is False and m["gates_passed"] is False
    assert "top-1 agreement" in gate_message(m, PARAMS, bad)


def test_double_bos_fails_the_tokenization_gate(tmp_path, tiny_gguf, tiny_model_dir):
    """llama-cpp-python #1501: a prompt that already starts with BOS plus a GGUF that adds one."""
    from gguf import GGUFReader

    bad = tmp_path / "bos.gguf"
    shutil.copy(tiny_gguf, bad)
    field = GGUFReader(bad, "r+").fields["tokenizer.ggml.add_bos_token"]
    field.parts[field.data[0]][0] = True
    chat_texts = ["<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nHi!"]
    m = gguf_gates(bad, tiny_model_dir, chat_texts, PARAMS)
    assert m["tokenization"]["double_bos"] == 1 and m["gates"]["tokenization_match"] is False
    assert "double BOS" in gate_message(m, PARAMS, bad)


@pytest.mark.parametrize("damage", ["truncate", "not_gguf", "empty", "cut_header"])
def test_damaged_files_are_stage_errors(tmp_path, tiny_gguf, damage):
    bad = tmp_path / "bad.gguf"
    data = tiny_gguf.read_bytes()
    bad.write_bytes({"truncate": data[: len(data) // 2], "not_gguf": b"PK\x03\x04" + data[4:1000],
                     "empty": b"", "cut_header": data[:200]}[damage])
    with pytest.raises(StageError):
        check_gguf(bad)
    with pytest.raises(StageError):
        with open_llama(bad, n_ctx=64, threads=1):
            pass


@pytest.mark.slow
def test_convert_stage_cli_end_to_end(tmp_path, tiny_model_dir):
    out = tmp_path / "gguf" / "finetuned-reference.gguf"
    params = tmp_path / "params.yaml"
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    params.write_text((root / "params.yaml").read_text().replace("gate_prompts: 8", "gate_prompts: 2"))
    proc = run_module("stages.convert", "--params", str(params), "--model", str(tiny_model_dir), "--val",
                      str(write_val(tmp_path / "val.jsonl")), "--out", str(out), "--metrics",
                      str(tmp_path / "m" / "convert.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    m = json.loads((tmp_path / "m" / "convert.details.json").read_text())
    assert m["gates_passed"] and m["outtype"] == "f16" and m["file_bytes"] == out.stat().st_size
