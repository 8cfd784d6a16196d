"""GPTQ into ggml blocks (src/alpaca_lora_cpu/gptq.py), checked against the formats' own definitions: llama.cpp's
quantizer (its q4_0 bytes with H = I), gguf-py's dequantize (every written tensor), and llama.cpp's imatrix
rounding (the proxy error GPTQ exists to lower)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from alpaca_lora_cpu import gptq
from alpaca_lora_cpu.gguf_files import check_gguf


def raw(path, name):
    t = next(t for t in check_gguf(path).tensors if t.name == name)
    with open(path, "rb") as fh:
        fh.seek(t.data_offset)
        return fh.read(t.n_bytes)


def gguf_decoded(data: bytes, ggml_type: str, rows: int) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(np.frombuffer(data, np.uint8).reshape(rows, -1), GGMLQuantizationType[ggml_type])


def covariance(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Σ x xᵀ of correlated activations with a few loud channels, as real decoder inputs have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    x[:, :3] *= 8.0
    return (x.T @ x).double()


@pytest.mark.slow
@pytest.mark.parametrize("level", ["q4_0", "q5_0"])
def test_identity_h_without_damping_or_search_gives_llama_cpps_own_bytes(tiny_gguf, tmp_path, level):
    from helpers import quantize_gguf

    fmt = gptq.FORMATS[level]
    plain = quantize_gguf(tiny_gguf, tmp_path / f"{level}.gguf", level)
    names = [t.name for t in check_gguf(plain).tensors if t.type == fmt.ggml_type and t.name.startswith("blk.")]
    assert len(names) >= 7 * 2, names
    for name in names:
        w = torch.from_numpy(gptq.tensor_array(tiny_gguf, name))
        for act_order in (False, True):  # H = I: every diagonal equal, so act-order keeps the columns' order
            scales, q = gptq.gptq(w, torch.eye(w.shape[1], dtype=torch.float64), fmt, damp=0.0, search=False,
                                  act_order=act_order)
            assert gptq.pack(scales, q, fmt) == raw(plain, name), (name, act_order)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("level", list(gptq.FORMATS))
def test_packed_blocks_decode_to_what_the_algorithm_intended_exactly(level, act_order):
    fmt = gptq.FORMATS[level]
    torch.manual_seed(1)
    w = torch.randn(48, 128) * 0.05
    h = covariance(512, 128, 2)
    scales, q = gptq.gptq(w, h, fmt, damp=0.01, act_order=act_order)
    scales = gptq.refit(w, h, scales, q, fmt, rows_at_once=7)  # several chunks, a ragged last one
    data = gptq.pack(scales, q, fmt)
    assert len(data) == 48 * 128 // gptq.BLOCK * (18 if len(fmt.values) == 16 else 22)
    assert int(q.max()) == len(fmt.values) - 1 and int(q.min()) == 0  # every bit of the codes is exercised
    assert np.array_equal(gguf_decoded(data, fmt.ggml_type, 48), gptq.dequantize(scales, q, fmt).numpy())


@pytest.mark.parametrize("level", ["q4_0", "iq4_nl"])
def test_error_feedback_and_refit_lower_the_proxy_error_below_nearest_rounding(level):
    fmt = gptq.FORMATS[level]
    torch.manual_seed(3)
    w = torch.randn(64, 256) * 0.02
    h = covariance(1024, 256, 4)
    rtn = gptq.gptq(w, torch.eye(256, dtype=torch.float64), fmt, damp=0.0, search=False)
    ours = gptq.gptq(w, h, fmt, damp=0.01)
    refit = gptq.refit(w, h, *ours, fmt)
    err = {k: float(gptq.proxy_error(w, gptq.dequantize(*v, fmt), h).sum())
           for k, v in {"rtn": rtn, "gptq": ours, "refit": (refit, ours[1])}.items()}
    assert err["gptq"] < 0.7 * err["rtn"], err
    assert err["refit"] <= err["gptq"], err


@pytest.mark.parametrize("level", ["q4_0", "iq4_nl"])
def test_act_order_rounds_the_loud_columns_first_and_still_beats_nearest_rounding(level):
    """The loudest input channels sit in the last block: act-order rounds them first (a different result from
    the in-order pass), with the error fed to quieter columns, and stays far below nearest rounding."""
    fmt = gptq.FORMATS[level]
    torch.manual_seed(5)
    w = torch.randn(64, 256) * 0.02
    h = covariance(1024, 256, 6).flip(0, 1)  # the loud channels 0-2 become 253-255
    rtn = gptq.gptq(w, torch.eye(256, dtype=torch.float64), fmt, damp=0.0, search=False)
    plain = gptq.gptq(w, h, fmt, damp=0.01)
    act = gptq.gptq(w, h, fmt, damp=0.01, act_order=True)
    err = {k: float(gptq.proxy_error(w, gptq.dequantize(*v, fmt), h).sum())
           for k, v in {"rtn": rtn, "in order": plain, "act order": act}.items()}
    assert not torch.equal(act[1], plain[1])
    assert err["act order"] < 0.7 * err["rtn"], err


@pytest.mark.slow
def test_gptq_file_keeps_llama_cpps_layout_and_beats_its_imatrix_rounding_per_tensor(wide_model, tmp_path):
    """The tensors GPTQ wrote decode (gguf-py) to its intended weights; every other byte is llama.cpp's; the
    size is llama.cpp's; every rewritten tensor's proxy error is below llama.cpp's imatrix rounding's."""
    from transformers import AutoConfig, AutoTokenizer

    from alpaca_lora_cpu.quantizer import plan_for, quantize_file
    from alpaca_lora_cpu.shards import Weights

    hf, f16, imatrix = wide_model
    tok = AutoTokenizer.from_pretrained(hf)
    texts = ["Give three tips for staying healthy.", "Translate 'good morning' into French: Bonjour."] * 4
    sums, tokens = gptq.covariances(AutoConfig.from_pretrained(hf), Weights(hf).get,
                                    [tok(t)["input_ids"] for t in texts])
    assert "token_embd.weight" in sums  # the tied head's input covariance
    assert tokens > 0 and {n.split(".")[2] for n in sums if n.startswith("blk.")} == {
        "attn_q", "attn_output", "ffn_gate", "ffn_down"}
    for level in ("q4_0", "iq4_nl"):
        plain, imat, out = (tmp_path / f"{level}.gguf", tmp_path / f"{level}-imat.gguf", tmp_path / f"{level}-g.gguf")
        quantize_file(f16, plain, plan_for(level, {}))
        quantize_file(f16, imat, plan_for(f"{level}-imat", {}), imatrix)
        details = gptq.make(plain, f16, sums, 0.01, out, compare=imat)
        assert out.stat().st_size == plain.stat().st_size
        embd = next(t.type for t in check_gguf(plain).tensors if t.name == "token_embd.weight")
        assert details["tensors"] == 7 * 2 + (embd == gptq.FORMATS[level].ggml_type)
        for name, e in details["proxy_error"].items():
            assert e["gptq"] < e["compare"] and e["gptq"] < e["llama_cpp"], (level, name, e)
        for t in check_gguf(out).tensors:
            if t.name in details["proxy_error"]:
                w = torch.from_numpy(gptq.tensor_array(f16, t.name))
                h = sums[gptq.shared_name(t.name)]
                fmt = gptq.FORMATS[level]
                s, q = gptq.gptq(w, h, fmt, 0.01)
                assert np.array_equal(gptq.tensor_array(out, t.name), gptq.dequantize(s, q, fmt).numpy())
            else:
                assert raw(out, t.name) == raw(plain, t.name), t.name


def test_the_imatrix_pass_writes_each_layers_covariance_once_and_the_imatrix_is_its_diagonal(tiny_random_llama,
                                                                                              tmp_path):
    from transformers import AutoConfig

    from alpaca_lora_cpu.imatrix import collect
    from alpaca_lora_cpu.shards import Weights

    folder = tiny_random_llama[1]
    config, get, seqs = AutoConfig.from_pretrained(folder), Weights(folder).get, [[1, 2, 3, 4, 5], [6, 7]]
    plain, _ = collect(config, get, seqs, batch_tokens=8)
    seen = []

    def sink(layer, sums):
        seen.append((layer, sorted(sums)))
        gptq.write_layer_hessians(tmp_path, layer, sums)

    with_h, counts = collect(config, get, seqs, batch_tokens=8, covariance=sink)
    gptq.write_hessians_index(tmp_path, 7, 2)
    # one call a layer, with that layer's four distinct inputs only: memory is one layer's H; then the head's
    head = gptq.head_name(config)
    assert seen == [(i, [f"blk.{i}.{n}.weight" for n in ("attn_output", "attn_q", "ffn_down", "ffn_gate")])
                    for i in range(2)] + [(2, [head])]
    assert set(with_h) == set(plain) and set(counts.values()) == {7}
    for name in plain:  # Σ x² is H's diagonal, for k, v and up through the input they share
        np.testing.assert_allclose(with_h[name], plain[name], rtol=1e-5)
    h = gptq.Hessians(tmp_path)
    held, _ = gptq.covariances(config, get, seqs, batch_tokens=8)
    assert h.tokens == 7 and set(h.files) == set(held)
    for name, full in held.items():
        assert h[name].dtype == torch.float64
        torch.testing.assert_close(h[name], full.float().double())
        if name != head:
            np.testing.assert_allclose(np.diagonal(full.numpy()), plain[name], rtol=1e-5)
    # the head's H is Σ x xᵀ of the LM head's input: transformers' own final-norm output, token by token
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        x = torch.cat([model.model(torch.tensor([s])).last_hidden_state[0] for s in seqs])
    torch.testing.assert_close(h[head], (x.T @ x).double(), rtol=1e-4, atol=1e-4)


def test_a_folder_without_covariances_is_refused_in_one_line(tmp_path):
    from alpaca_lora_cpu.errors import StageError

    with pytest.raises(StageError, match="no input covariances .* imatrix.covariance: true"):
        gptq.Hessians(tmp_path)


@pytest.fixture(scope="module")
def wide_hessians(wide_model, tmp_path_factory):
    """The covariance folder the imatrix stage would write for `wide_model` (its index says 99 tokens)."""
    from transformers import AutoConfig, AutoTokenizer

    from alpaca_lora_cpu.imatrix import collect
    from alpaca_lora_cpu.shards import Weights

    hf = wide_model[0]
    tok = AutoTokenizer.from_pretrained(hf)
    texts = ["Give three tips for staying healthy.", "Translate 'good morning' into French: Bonjour."] * 4
    folder = tmp_path_factory.mktemp("hessians")
    collect(AutoConfig.from_pretrained(hf), Weights(hf).get, [tok(t)["input_ids"] for t in texts],
            covariance=lambda i, h: gptq.write_layer_hessians(folder, i, h))
    gptq.write_hessians_index(folder, 99, 2)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(("level", "act_order"), [("q4_0", False), ("iq4_nl", True)])
def test_a_gptq_level_through_the_quantize_stage(wide_model, wide_hessians, tmp_path, level, act_order):
    """quantize@<level>-gptq: llama.cpp's file of the level, its blocks rounded by GPTQ over the folder the
    imatrix stage writes, the proxy errors against llama.cpp's plain and imatrix rounding in the details."""
    from alpaca_lora_cpu.config import GptqParams, PromptParams
    from alpaca_lora_cpu.quantizer import plan_for
    from stages.quantize import run

    hf, f16, imatrix = wide_model
    folder = wide_hessians
    alpaca = PromptParams("alpaca")
    plain = run(plan_for(level, {}), alpaca, f16, tmp_path / "plain.gguf", tmp_path / "p.Modelfile")
    m = run(plan_for(f"{level}-gptq", {}), alpaca, f16, tmp_path / "g.gguf", tmp_path / "g.Modelfile",
            imatrix=imatrix, hessians=folder, gptq_options=GptqParams(damp=0.01, act_order=act_order,
                                                                                    head=False))
    d = m["gptq_details"]
    assert m["gptq"] == 1 and m["file_bytes"] == plain["file_bytes"] and m["tensor_types"] == plain["tensor_types"]
    assert d["act_order"] is act_order
    assert d["tensors"] == 14 and d["below_imatrix"] == 14 and d["below_plain"] == 14 and d["covariance_tokens"] == 99
    assert d["proxy_error_sum"]["gptq"] < d["proxy_error_sum"]["compare"] < d["proxy_error_sum"]["llama_cpp"]
    assert (tmp_path / "g.gguf").read_bytes() != (tmp_path / "plain.gguf").read_bytes()
    assert not list(tmp_path.glob("*.llama-cpp.gguf")) and not list(tmp_path.glob("*.imatrix.gguf"))


@pytest.mark.slow
def test_a_recipe_rounded_by_gptq_rewrites_its_gptq_formats_and_keeps_the_rest(wide_model, wide_hessians, tmp_path):
    """quantize@<recipe>-gptq: the recipe's own llama.cpp file (imatrix rounding), then GPTQ on each of its
    Q5_0 and IQ4_NL tensors in its own format; the Q8_0 tensors keep llama.cpp's bytes; same size and types."""
    from alpaca_lora_cpu.config import GptqParams, PromptParams, RecipeParams
    from alpaca_lora_cpu.quantizer import plan_for
    from stages.quantize import run

    hf, f16, imatrix = wide_model
    recipes = {"mix": RecipeParams(type="q8_0", imatrix=True, token_embedding=None, output=None,
                                   overrides={r"ffn_down": "q5_0", r"attn_.*": "iq4_nl"})}
    alpaca = PromptParams("alpaca")
    own = run(plan_for("mix", recipes), alpaca, f16, tmp_path / "mix.gguf", tmp_path / "m.Modelfile",
              imatrix=imatrix)
    m = run(plan_for("mix-gptq", recipes), alpaca, f16, tmp_path / "g.gguf", tmp_path / "g.Modelfile",
            imatrix=imatrix, hessians=wide_hessians, gptq_options=GptqParams(damp=0.01, act_order=False, head=False))
    d = m["gptq_details"]
    assert m["gptq"] == 1 and m["recipe"] == 1 and m["imatrix"] == 1
    assert m["file_bytes"] == own["file_bytes"] and m["tensor_types"] == own["tensor_types"]
    assert d["types"] == {"IQ4_NL": 4 * 2, "Q5_0": 2}, d["types"]
    assert d["below_imatrix"] == d["tensors"] == 10  # the recipe's own file is its imatrix rounding
    rewritten = set(d["proxy_error"])
    for t in check_gguf(tmp_path / "g.gguf").tensors:
        same = raw(tmp_path / "g.gguf", t.name) == raw(tmp_path / "mix.gguf", t.name)
        assert same != (t.name in rewritten), (t.name, t.type)


@pytest.mark.slow
def test_a_recipe_asks_gptq_per_tensor_group_and_the_search_scores_the_same_bytes(wide_model, wide_hessians,
                                                                                   tmp_path):
    """A recipe type ending in -gptq (what the search writes when it picks iq4_nl-gptq for a group) rounds just
    that group's tensors by GPTQ; the same type in the recipe's other groups keeps llama.cpp's bytes. The search
    scores a -gptq type from one GPTQ pass over its type file: each tensor's bytes there must be the bytes
    quantize@searched writes, or the search would rank something the pipeline does not build."""
    from alpaca_lora_cpu.config import GptqParams, PromptParams, RecipeParams
    from alpaca_lora_cpu.errors import StageError
    from alpaca_lora_cpu.quantizer import plan_for, quantize_here
    from stages.quantize import run
    from stages.search import GROUPS, build_groups, covered_by, gptq_files, plan_of

    hf, f16, imatrix = wide_model
    options = GptqParams(damp=0.01, act_order=True, head=True)
    recipes = {"mix": RecipeParams(type="q8_0", imatrix=True, token_embedding=None, output=None,
                                   overrides={GROUPS["ffn_down"]: "iq4_nl-gptq", GROUPS["attn_v"]: "iq4_nl"})}
    plan = plan_for("mix", recipes)
    assert plan.rounds_gptq and not plan.gptq
    m = run(plan, PromptParams("alpaca"), f16, tmp_path / "mix.gguf", tmp_path / "m.Modelfile", imatrix=imatrix,
            hessians=wide_hessians, gptq_options=options)
    assert m["gptq"] == 1 and m["gptq_details"]["types"] == {"IQ4_NL": 2}
    assert set(m["gptq_details"]["proxy_error"]) == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}
    assert m["gptq_details"]["below_imatrix"] == 2

    # the search's way: llama.cpp's IQ4_NL type file, then one GPTQ pass over it
    no_head, _ = build_groups(check_gguf(f16).tensors, ("iq4_nl", "iq4_nl-gptq"),
                              covered_by(wide_hessians, ("iq4_nl-gptq",), head=False))
    assert "IQ4_NL-GPTQ" not in {g.name: g for g in no_head}["token_embd"].options
    groups, _ = build_groups(check_gguf(f16).tensors, ("iq4_nl", "iq4_nl-gptq"),
                             covered_by(wide_hessians, ("iq4_nl-gptq",)))
    by = {g.name: g for g in groups}
    assert "IQ4_NL-GPTQ" in by["ffn_down"].options and "IQ4_NL-GPTQ" in by["token_embd"].options
    assert by["ffn_down"].options["IQ4_NL-GPTQ"] == by["ffn_down"].options["IQ4_NL"]
    type_file = tmp_path / "type-iq4_nl.gguf"
    assignment = {g.name: "IQ4_NL" for g in groups}
    assert quantize_here(str(f16), str(type_file), plan_of("IQ4_NL", assignment), 2, str(imatrix))[0] == 0
    searched = gptq_files({"IQ4_NL": str(type_file)}, ["IQ4_NL-GPTQ"], str(f16), wide_hessians, options,
                          str(tmp_path))["IQ4_NL-GPTQ"]
    for name in ("blk.0.ffn_down.weight", "blk.1.ffn_down.weight"):
        assert raw(searched, name) == raw(tmp_path / "mix.gguf", name)
    for name in ("blk.0.attn_v.weight", "blk.1.attn_v.weight"):  # iq4_nl without -gptq: llama.cpp's bytes
        assert raw(type_file, name) == raw(tmp_path / "mix.gguf", name) != raw(searched, name)

    # the tied output matrix: GPTQ over the head's input covariance (quantize.gptq.head), also through a recipe
    emb = {"emb": RecipeParams(type="q8_0", imatrix=True, token_embedding="iq4_nl-gptq", output=None, overrides={})}
    e = run(plan_for("emb", emb), PromptParams("alpaca"), f16, tmp_path / "emb.gguf", tmp_path / "e.Modelfile",
            imatrix=imatrix, hessians=wide_hessians, gptq_options=options)
    assert set(e["gptq_details"]["proxy_error"]) == {"token_embd.weight"} and e["gptq_details"]["below_imatrix"] == 1
    assert raw(searched, "token_embd.weight") == raw(tmp_path / "emb.gguf", "token_embd.weight")
    # with quantize.gptq.head false the same recipe is refused in one line, naming the tensor, and nothing written
    with pytest.raises(StageError, match="asks GPTQ for token_embd.weight .*quantize.gptq.head false"):
        run(plan_for("emb", emb), PromptParams("alpaca"), f16, tmp_path / "no.gguf", tmp_path / "n.Modelfile",
            imatrix=imatrix, hessians=wide_hessians, gptq_options=GptqParams(0.01, True, head=False))
    assert not (tmp_path / "no.gguf").exists()


def test_iq4_nl_codes_by_table_are_bucketize_s(monkeypatch):
    """codes' lookup table over floor(2x) (large inputs) picks the nearest IQ4_NL level exactly as bucketize
    over the midpoints does: random values, every midpoint exactly (ties go up), values just either side of
    them, and values far outside the levels' range."""
    fmt = gptq.FORMATS["iq4_nl"]
    v = torch.tensor(fmt.values, dtype=torch.float32)
    mids = (v[1:] + v[:-1]) / 2
    n = gptq.TABLE_MIN
    x = torch.cat([torch.randn(n) * 80, mids, torch.nextafter(mids, mids - 1),
                   torch.nextafter(mids, mids + 1), torch.tensor([-1e30, -200.0, 200.0, 1e30, 0.0, -0.0])])
    assert x.numel() >= n
    table = gptq.codes(x, fmt)
    monkeypatch.setattr(gptq, "TABLE_MIN", x.numel() + 1)
    plain = gptq.codes(x, fmt)
    assert torch.equal(table, plain)
    assert torch.equal(plain, torch.bucketize(x, mids, right=True))
    assert torch.equal(v[table[n:n + len(mids)]], v[1:])  # a tie takes the upper level


def test_kept_blocks_are_keyed_by_every_input_of_the_rounding_and_a_truncated_one_is_refused(tmp_path):
    """RoundedBlocks: the key changes with the format, damp, act_order, each weight and the covariance, so a
    changed input is a miss; a kept file that lost bytes is refused in one line naming it; `save` persists."""
    from alpaca_lora_cpu.errors import StageError

    w, h = torch.randn(4, 64), covariance(256, 64, 0)
    key = gptq.RoundedBlocks.key(gptq.FORMATS["q4_0"], 0.01, False, w, gptq.digest(h))
    w2 = w.clone()
    w2[3, 63] += 1e-3
    h2 = h.clone()
    h2[0, 0] *= 1.0001
    variants = [gptq.RoundedBlocks.key(gptq.FORMATS["iq4_nl"], 0.01, False, w, gptq.digest(h)),
                gptq.RoundedBlocks.key(gptq.FORMATS["q4_0"], 0.03, False, w, gptq.digest(h)),
                gptq.RoundedBlocks.key(gptq.FORMATS["q4_0"], 0.01, True, w, gptq.digest(h)),
                gptq.RoundedBlocks.key(gptq.FORMATS["q4_0"], 0.01, False, w2, gptq.digest(h)),
                gptq.RoundedBlocks.key(gptq.FORMATS["q4_0"], 0.01, False, w, gptq.digest(h2))]
    assert key == gptq.RoundedBlocks.key(gptq.FORMATS["q4_0"], 0.01, False, w.clone(), gptq.digest(h.clone()))
    assert len({key, *variants}) == 6
    store = gptq.RoundedBlocks(tmp_path / "blocks", writable=True)
    store.put(key, "blk.0.attn_q.weight", b"\x01" * 36, 2.5)
    store.save()
    again = gptq.RoundedBlocks(tmp_path / "blocks")
    assert again.get(key, 36) == (b"\x01" * 36, 2.5)
    assert again.get(key, 72) is None and again.get(variants[0], 36) is None  # another layout / another input
    (tmp_path / "blocks" / f"{key}.bin").write_bytes(b"\x01" * 20)
    with pytest.raises(StageError, match=rf"{key}\.bin: 20 bytes, its index says 36"):
        again.get(key, 36)


@pytest.mark.slow
def test_quantize_reuses_the_searchs_gptq_blocks_byte_for_byte_and_rounds_anew_when_an_option_differs(
        wide_model, wide_hessians, tmp_path):
    """The search keeps its -gptq types' blocks (--gptq-blocks); quantize@iq4_nl-gptq takes every tensor's blocks
    from there instead of a second GPTQ pass and writes the bytes (and proxy errors) that rounding them itself
    gives. With another damp nothing matches and every tensor is rounded again."""
    import json

    from alpaca_lora_cpu.config import GptqParams, PromptParams
    from alpaca_lora_cpu.quantizer import plan_for, quantize_here
    from stages.quantize import run
    from stages.search import build_groups, covered_by, gptq_files, plan_of

    hf, f16, imatrix = wide_model
    options = GptqParams(damp=0.01, act_order=False, head=False)
    groups, _ = build_groups(check_gguf(f16).tensors, ("iq4_nl", "iq4_nl-gptq"),
                             covered_by(wide_hessians, ("iq4_nl-gptq",), head=False))
    type_file, blocks = tmp_path / "type-iq4_nl.gguf", tmp_path / "gptq-blocks"
    assignment = {g.name: "IQ4_NL" for g in groups}
    assert quantize_here(str(f16), str(type_file), plan_of("IQ4_NL", assignment), 2, str(imatrix))[0] == 0
    gptq_files({"IQ4_NL": str(type_file)}, ["IQ4_NL-GPTQ"], str(f16), wide_hessians, options, str(tmp_path), blocks)
    kept = json.loads((blocks / gptq.BLOCKS_INDEX).read_text())
    assert sorted(e["tensor"] for e in kept.values()) == sorted(t.name for t in check_gguf(f16).tensors
                                                               if t.name.startswith("blk.") and t.name.endswith(
                                                                   ("attn_q.weight", "attn_k.weight", "attn_v.weight",
                                                                    "attn_output.weight", "ffn_gate.weight",
                                                                    "ffn_up.weight", "ffn_down.weight")))

    def quantize(name, opts, **kw):
        return run(plan_for("iq4_nl-gptq", {}), PromptParams("alpaca"), f16, tmp_path / f"{name}.gguf",
                   tmp_path / f"{name}.Modelfile", imatrix=imatrix, hessians=wide_hessians, gptq_options=opts,
                   **kw)["gptq_details"]

    own, reused = quantize("own", options), quantize("reused", options, gptq_blocks=blocks)
    assert own["reused"] == 0 and reused["reused"] == reused["tensors"] == own["tensors"] == 14
    assert (tmp_path / "reused.gguf").read_bytes() == (tmp_path / "own.gguf").read_bytes()
    assert reused["proxy_error"] == own["proxy_error"]
    other = quantize("other", GptqParams(damp=0.03, act_order=False, head=False), gptq_blocks=blocks)
    assert other["reused"] == 0 and other["tensors"] == 14
    assert (tmp_path / "other.gguf").read_bytes() != (tmp_path / "own.gguf").read_bytes()


def test_make_plan_counts_a_searched_gptq_format_as_reused_and_another_as_a_full_pass():
    """make plan at the LLaMA-7B shape: quantize@iq4_nl-gptq (iq4_nl-gptq is among search.types, so its blocks
    are the search's) is predicted without the per-column rounding that quantize@q4_0-gptq (not searched) pays,
    and reusing nothing when the search rounds no -gptq type."""
    import dataclasses

    from helpers import ROOT

    from alpaca_lora_cpu.config import load_params
    from alpaca_lora_cpu.cost import Shape, stage_costs, work

    p = load_params(ROOT / "params.yaml")
    llama_7b = Shape(32000, 4096, 32, 11008, 32, 32, False)

    def seconds(search_types):
        q = dataclasses.replace(p, search=dataclasses.replace(p.search, types=search_types),
                                quantize=dataclasses.replace(p.quantize, types=("q4_0-gptq", "iq4_nl-gptq")))
        return {c.stage: c.seconds for c in stage_costs(q, llama_7b, work(q))}

    with_blocks, without = seconds(("q4_0", "iq4_nl", "iq4_nl-gptq")), seconds(("q4_0", "iq4_nl"))
    assert with_blocks["quantize@iq4_nl-gptq"] < 0.5 * with_blocks["quantize@q4_0-gptq"]
    assert without["quantize@iq4_nl-gptq"] == pytest.approx(without["quantize@q4_0-gptq"], rel=0.2)
    assert with_blocks["search"] > without["search"] + 0.5 * (without["quantize@iq4_nl-gptq"]
                                                             - with_blocks["quantize@iq4_nl-gptq"])
