"""consolidate: Meta format with real dims, the GQA-correct inverse rotary permutation, and a round-trip gate
that catches a wrong one (alpaca-lora's square-matrix assumption)."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import write_val
from test_merge import PARAMS, PROMPT

from alpaca_lora_cpu.config import ExportParams
from alpaca_lora_cpu.parity import GateFailure
from stages.consolidate import SKIP_MARKER, WEIGHTS, run, to_hf, to_meta


def test_inverse_permutation_matches_llama_cpp_and_round_trips():
    from conversion.llama import LlamaModel  # llama.cpp's converter: its HF → GGML/Meta q/k permutation

    w = torch.randn(3 * 64, 576)  # SmolLM2's wk: 3 KV heads × 64, hidden 576
    assert torch.equal(to_meta(w, 3), LlamaModel.permute(w, 9, 3))
    q = torch.randn(9 * 64, 576)
    assert torch.equal(to_meta(q, 9), LlamaModel.permute(q, 9, 9))
    assert torch.equal(to_hf(to_meta(w, 3), 3), w)
    k = torch.randn(2 * 16, 64)  # the tiny model's wk (2 KV heads of 16): n_heads=4 reshapes silently, wrongly
    assert not torch.equal(to_meta(k, 4), to_meta(k, 2))


def test_consolidate_writes_meta_format_and_gate_passes(tmp_path, tiny_merged):
    merged, _ = tiny_merged
    m = run(PARAMS, PROMPT, merged, write_val(tmp_path / "val.jsonl"), tmp_path / "consolidated")
    assert m["gates_passed"] and m["roundtrip"]["max_abs_logit_diff"] <= 1e-3
    p = json.loads((tmp_path / "consolidated/params.json").read_text())
    assert p["vocab_size"] == 49152 and p["n_heads"] == 4 and p["n_kv_heads"] == 2 and p["dim"] == 64
    assert p["n_layers"] == 2 and p["hidden_dim"] == 128 and p["norm_eps"] > 0 and p["rope_theta"] > 0
    sd = torch.load(tmp_path / "consolidated" / WEIGHTS, weights_only=True)
    assert sd["layers.0.attention.wk.weight"].shape == (2 * 16, 64)  # GQA: not square
    assert {"tok_embeddings.weight", "output.weight", "norm.weight"} <= set(sd)


def test_wrong_permutation_is_caught(tmp_path, tiny_merged):
    """alpaca-lora's export permuted wk with n_heads (square attention); with GQA the round trip must fail."""
    merged, _ = tiny_merged

    def square_assumption(w, n_heads):
        return to_meta(w, 4)  # always the query head count

    with pytest.raises(GateFailure, match="wrong q/k permutation") as exc:
        run(PARAMS, PROMPT, merged, write_val(tmp_path / "val.jsonl"), tmp_path / "c", permute=square_assumption)
    assert exc.value.metrics["gates"]["roundtrip_logits_match"] is False
    assert not (tmp_path / "c").exists()


def test_skipped_when_switched_off(tmp_path, tiny_merged):
    off = ExportParams(**{**PARAMS.__dict__, "consolidated": False})
    m = run(off, PROMPT, tiny_merged[0], tmp_path / "unused.jsonl", tmp_path / "c")
    assert m == {"skipped": True, "reason": "export.consolidated is false"}
    assert [p.name for p in (tmp_path / "c").iterdir()] == [SKIP_MARKER]
