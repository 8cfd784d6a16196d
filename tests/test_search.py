"""search: group sizes from tensor shapes, the knapsack's choice under a budget, recipes the quantizer takes."""
from __future__ import annotations

import pytest

from alpaca_lora_cpu.gguf_files import TensorInfo
from stages.search import GROUPS, MIB, Group, build_groups, knapsack, recipe_of, tensor_bytes


def test_sizes_follow_block_geometry():
    assert tensor_bytes("Q8_0", 576, 576 * 10) == 576 * 10 / 32 * 34
    assert tensor_bytes("Q4_K", 576, 576 * 10) is None  # 576 is not a multiple of 256
    assert tensor_bytes("Q4_K", 1536, 1536 * 10) == 1536 * 10 / 256 * 144


def test_groups_offer_only_the_types_their_rows_fit():
    infos = [TensorInfo("token_embd.weight", "F16", (576, 100), 57600, 115200),
             TensorInfo("blk.0.attn_q.weight", "F16", (576, 576), 576 * 576, 2 * 576 * 576),
             TensorInfo("blk.0.ffn_down.weight", "F16", (1536, 576), 1536 * 576, 2 * 1536 * 576),
             TensorInfo("blk.0.attn_norm.weight", "F32", (576,), 576, 2304)]
    groups, rest = build_groups(infos, ("q4_k", "q4_0", "q8_0"))
    by = {g.name: g for g in groups}
    assert set(by) == {"token_embd", "attn_qk", "ffn_down"} and rest == 2304
    assert set(by["attn_qk"].options) == {"Q4_0", "Q8_0"} and set(by["ffn_down"].options) == {"Q4_K", "Q4_0", "Q8_0"}


def test_knapsack_spends_the_budget_where_it_lowers_kld_most():
    groups = [Group("a", (), {"Q8_0": 8 * MIB, "Q4_0": 4 * MIB}), Group("b", (), {"Q8_0": 8 * MIB, "Q4_0": 4 * MIB})]
    cost = {("a", "Q8_0"): 0.0, ("a", "Q4_0"): 0.30, ("b", "Q8_0"): 0.0, ("b", "Q4_0"): 0.05}
    best = knapsack(groups, cost, 12 * MIB, top_n=3)
    assert best[0] == (pytest.approx(0.05), {"a": "Q8_0", "b": "Q4_0"})  # 12 MiB: only one group can stay at q8_0
    assert [a for _, a in best] == [{"a": "Q8_0", "b": "Q4_0"}, {"a": "Q4_0", "b": "Q8_0"}, {"a": "Q4_0", "b": "Q4_0"}]
    assert knapsack(groups, cost, 7 * MIB, top_n=3) == []  # not even the smallest assignment fits


def test_a_recipe_sets_the_tied_embedding_both_ways_and_overrides_by_group():
    recipe = recipe_of({"token_embd": "Q4_0", "ffn_down": "Q6_K"})
    assert recipe == {"type": "q8_0", "imatrix": True, "token_embedding": "q4_0", "output": "q4_0",
                      "overrides": {GROUPS["ffn_down"]: "q6_k"}}


def test_knapsack_finds_the_small_assignments_when_the_free_ones_do_not_fit():
    """Six groups, q8_0 costs nothing but only one group can afford it: the search must still find a solution."""
    groups = [Group(f"g{i}", (), {"Q8_0": 8 * MIB, "Q4_0": 4 * MIB}) for i in range(6)]
    cost = {(f"g{i}", t): (0.0 if t == "Q8_0" else 0.1 * (i + 1)) for i in range(6) for t in ("Q8_0", "Q4_0")}
    (best,) = knapsack(groups, cost, 28 * MIB, top_n=1)
    assert best[1] == {"g0": "Q4_0", "g1": "Q4_0", "g2": "Q4_0", "g3": "Q4_0", "g4": "Q4_0", "g5": "Q8_0"}


@pytest.mark.slow
def test_a_candidate_assembled_from_per_type_files_is_the_direct_quantization_byte_for_byte(tmp_path, wide_model):
    """The search quantizes once per type and assembles candidates from those files' tensors: the file must be
    what llama.cpp writes when it quantizes that recipe itself, or the search would score something quantize@searched
    does not build."""
    import re

    from alpaca_lora_cpu.files import sha256_file
    from alpaca_lora_cpu.gguf_files import assemble, tensor_infos
    from alpaca_lora_cpu.quantizer import quantize_here
    from stages.search import plan_of

    _, src, imatrix = wide_model
    groups, _ = build_groups(tensor_infos(src), ("q4_k", "iq4_nl", "q5_0", "q8_0"))
    files = {}
    for ttype in ("Q8_0", "Q4_K", "IQ4_NL"):
        assignment = {} if ttype == "Q8_0" else {g.name: ttype for g in groups if ttype in g.options}
        files[ttype] = tmp_path / f"type-{ttype}.gguf"
        assert quantize_here(str(src), str(files[ttype]), plan_of(ttype, assignment), 2, str(imatrix))[0] == 0
    mixed = {"ffn_down": "Q4_K", "attn_v": "IQ4_NL", "token_embd": "Q4_K"}
    sources = {t.name: files[ttype] for g, ttype in mixed.items() for t in tensor_infos(files["Q8_0"])
               if re.search(GROUPS[g], t.name)}
    assemble(files["Q8_0"], sources, tmp_path / "assembled.gguf")
    assert quantize_here(str(src), str(tmp_path / "direct.gguf"), plan_of("direct", mixed), 2, str(imatrix))[0] == 0
    assert sha256_file(tmp_path / "assembled.gguf") == sha256_file(tmp_path / "direct.gguf")
    assert {t.type for t in tensor_infos(tmp_path / "assembled.gguf") if "ffn_down" in t.name} == {"Q4_K"}


def test_gptq_types_are_offered_only_to_groups_with_covariances_at_their_formats_size():
    """search.types' <fmt>-gptq: the format's size; only where every tensor has an input covariance (the decoder
    linears, not token_embd); a recipe that names it keeps the suffix for quantize@searched."""
    infos = [TensorInfo("token_embd.weight", "F16", (576, 100), 57600, 115200),
             TensorInfo("blk.0.attn_q.weight", "F16", (576, 576), 576 * 576, 2 * 576 * 576),
             TensorInfo("blk.0.ffn_down.weight", "F16", (1536, 576), 1536 * 576, 2 * 1536 * 576)]
    assert tensor_bytes("IQ4_NL-GPTQ", 576, 5760) == tensor_bytes("IQ4_NL", 576, 5760)
    groups, _ = build_groups(infos, ("iq4_nl", "iq4_nl-gptq"), covered=lambda name: name.startswith("blk."))
    by = {g.name: g for g in groups}
    assert set(by["token_embd"].options) == {"IQ4_NL", "Q8_0"}
    assert set(by["attn_qk"].options) == {"IQ4_NL", "IQ4_NL-GPTQ", "Q8_0"}
    no_cov, _ = build_groups(infos, ("iq4_nl", "iq4_nl-gptq"))  # no covariances: no -gptq option anywhere
    assert all("IQ4_NL-GPTQ" not in g.options for g in no_cov)
    assert recipe_of({"ffn_down": "IQ4_NL-GPTQ"})["overrides"] == {GROUPS["ffn_down"]: "iq4_nl-gptq"}


def test_a_plan_stores_a_gptq_type_as_its_format_and_rounds_just_those_tensors():
    from alpaca_lora_cpu.config import RecipeParams
    from alpaca_lora_cpu.quantizer import plan_for, recipe_gptq, recipe_type

    recipes = {"r": RecipeParams("q8_0", True, "q4_0", None, {r"ffn_down": "iq4_nl-gptq", r"attn_v": "q5_0"})}
    plan = plan_for("r", recipes)
    assert plan.rounds_gptq and not plan.gptq
    assert recipe_type(plan, "blk.0.ffn_down.weight") == "IQ4_NL" and recipe_gptq(plan, "blk.0.ffn_down.weight")
    assert recipe_type(plan, "blk.0.attn_v.weight") == "Q5_0" and not recipe_gptq(plan, "blk.0.attn_v.weight")
    assert not recipe_gptq(plan, "token_embd.weight") and recipe_type(plan, "token_embd.weight") == "Q4_0"
    assert not plan_for("q", {"q": RecipeParams("q8_0", True, None, None, {r"ffn": "q5_0"})}).rounds_gptq
