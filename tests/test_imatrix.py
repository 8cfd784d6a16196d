"""imatrix: the statistics are the squared inputs of each weight's matmul, the file is llama.cpp's layout and reads
back unchanged, and llama.cpp's quantizer takes it (a model quantized with it differs from one without)."""
from __future__ import annotations

import numpy as np
import pytest

from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.imatrix import COUNTS, SUM2, Imatrix, collect, gguf_name, read, write


def collect_from(folder, seqs):
    from transformers import AutoConfig

    from alpaca_lora_cpu.shards import Weights

    return collect(AutoConfig.from_pretrained(folder), Weights(folder).get, seqs)


def test_names_are_the_converters():
    assert gguf_name("model.layers.0.self_attn.q_proj", 2) == "blk.0.attn_q.weight"
    assert gguf_name("model.layers.1.mlp.down_proj", 2) == "blk.1.ffn_down.weight"


def test_sums_are_squared_matmul_inputs_over_every_token(tiny_random_llama):
    import torch

    (model, folder), seqs = tiny_random_llama, [[1, 2, 3, 4, 5], [6, 7, 8]]
    sums, counts = collect_from(folder, seqs)
    assert len(sums) == 2 * 7 and set(counts.values()) == {8}  # q k v o gate up down per layer, 5 + 3 tokens
    with torch.no_grad():  # q_proj of layer 0 reads the normed embeddings: recompute them independently
        expected = sum((model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor([s]))) ** 2)
                       .double().sum((0, 1)) for s in seqs)
    np.testing.assert_allclose(sums["blk.0.attn_q.weight"], expected.numpy(), rtol=1e-5)
    assert sums["blk.1.ffn_down.weight"].shape == (48,)  # ffn_down reads the 48-wide intermediate
    assert not any(n.startswith(("output", "token_embd")) for n in sums)  # the LM head is not collected


def test_batched_records_give_the_statistics_of_one_record_at_a_time(tiny_random_llama):
    """Records of different lengths padded into batches: the padding is masked out of attention and statistics."""
    from transformers import AutoConfig

    from alpaca_lora_cpu.layerwise import batches
    from alpaca_lora_cpu.shards import Weights

    folder = tiny_random_llama[1]
    seqs = [[1, 2, 3, 4, 5, 6, 7], [6, 7, 8], [9, 10, 11, 12], [13], [2, 4, 6, 8, 10]]
    assert batches(seqs, 12) == [[3, 1, 2], [4], [0]]  # by length; rows × longest ≤ 12
    args = AutoConfig.from_pretrained(folder), Weights(folder).get, seqs
    alone, counts_alone = collect(*args, batch_tokens=0)
    batched, counts_batched = collect(*args, batch_tokens=12)
    assert counts_batched == counts_alone and set(counts_alone.values()) == {20}
    for name in alone:
        np.testing.assert_allclose(batched[name], alone[name], rtol=1e-5, err_msg=name)


def test_gguf_file_has_llamacpp_layout_and_round_trips(tmp_path, tiny_random_llama):
    import gguf

    sums, counts = collect_from(tiny_random_llama[1], [[1, 2, 3]])
    write(tmp_path / "im.gguf", Imatrix(sums, counts, ["train"], 1, 3))
    reader = gguf.GGUFReader(str(tmp_path / "im.gguf"))
    assert reader.fields["general.type"].contents() == "imatrix"
    assert reader.fields["imatrix.datasets"].contents() == ["train"]
    shapes = {t.name: (t.shape.tolist(), t.tensor_type.name) for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight" + SUM2] == ([32, 1], "F32")  # ne [ncols, n_matrices]
    assert shapes["blk.0.attn_q.weight" + COUNTS] == ([1, 1], "F32")
    back = read(tmp_path / "im.gguf")
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["train"], 1, 3) and back.counts == counts
    for name, values in sums.items():
        np.testing.assert_allclose(back.sums[name], values, rtol=1e-6)
    np.testing.assert_allclose(back.means()["blk.0.attn_q.weight"], sums["blk.0.attn_q.weight"] / 3, rtol=1e-6)


def test_empty_dataset_list_is_refused(tmp_path):
    with pytest.raises(StageError, match="dataset name"):
        write(tmp_path / "im.gguf", Imatrix({"a.weight": np.ones(4)}, {"a.weight": 1}, [], 1, 1))


def test_a_model_gguf_is_not_an_imatrix(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), arch="llama")
    w.add_tensor("blk.0.attn_q.weight", np.ones((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(StageError, match="not a llama.cpp imatrix"):
        read(tmp_path / "m.gguf")


# ---------------------------------------------------------------- with llama.cpp's quantizer (slow)


@pytest.mark.slow
def test_the_imatrix_changes_what_llamacpp_writes(tmp_path, wide_model):
    from alpaca_lora_cpu.config import PromptParams
    from alpaca_lora_cpu.quantizer import plan_for
    from stages.quantize import run

    _, gguf_file, imatrix = wide_model
    alpaca = PromptParams("alpaca")
    plain = run(plan_for("q4_k_m", {}), alpaca, gguf_file, tmp_path / "plain.gguf", tmp_path / "p.Modelfile")
    imat = run(plan_for("q4_k_m-imat", {}), alpaca, gguf_file, tmp_path / "imat.gguf", tmp_path / "i.Modelfile",
               imatrix=imatrix)
    assert plain["imatrix"] == 0 and plain["imatrix_entries"] == 0
    assert imat["imatrix"] == 1 and imat["imatrix_entries"] == 14  # 7 matmuls × 2 layers, as llama.cpp reports
    assert imat["file_bytes"] == plain["file_bytes"]  # same types, other values
    assert (tmp_path / "plain.gguf").read_bytes() != (tmp_path / "imat.gguf").read_bytes()


@pytest.mark.slow
def test_a_very_low_bit_iquant_is_made_only_with_the_imatrix(tmp_path, wide_model):
    from alpaca_lora_cpu.config import PromptParams
    from alpaca_lora_cpu.native import call_in_child
    from alpaca_lora_cpu.quantizer import Plan, plan_for, quantize_here
    from stages.quantize import run

    _, gguf_file, imatrix = wide_model
    with pytest.raises(StageError, match="llama.cpp makes iq2_xs only with an importance matrix: ask for iq2_xs-imat"):
        plan_for("iq2_xs", {})
    # llama.cpp itself refuses, which is why the stage asks first
    rc, _, lines = call_in_child(quantize_here, str(gguf_file), str(tmp_path / "no.gguf"),
                                 Plan("iq2_xs", "iq2_xs", False), 2, None)
    assert rc != 0 and any("importance matrix" in ln for ln in lines)
    m = run(plan_for("iq2_xs-imat", {}), PromptParams("alpaca"), gguf_file, tmp_path / "iq2.gguf",
            tmp_path / "iq2.Modelfile", imatrix=imatrix)
    # most block matmuls in IQ2_XS (llama.cpp's iq2_xs mix gives a few more bits); the 49k × 256 embedding
    # keeps a k-quant, so the file stays well above 2.3 bits/weight
    assert m["tensor_types"].get("IQ2_XS", 0) >= 10 and m["file_bytes"] < gguf_file.stat().st_size / 2
