"""The -ar levels: AutoRound (the real auto-round package) rounds the tiny merged model, and the result is
transplanted into llama.cpp's file of the same level (alpaca_lora_cpu/autoround.py, stages/quantize.py)."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import quantize_gguf

from alpaca_lora_cpu.autoround import calibration_chunks, transplant
from alpaca_lora_cpu.config import AutoRoundParams, PromptParams
from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.gguf_files import tensor_infos
from alpaca_lora_cpu.quantizer import plan_for
from alpaca_lora_cpu.variants import check_names, parse


def test_calibration_rows_are_packed_end_to_end_and_capped():
    rows = calibration_chunks([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]], nsamples=2, seqlen=4)
    assert rows == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert calibration_chunks([[1, 2, 3], [4, 5]], nsamples=9, seqlen=2) == [[1, 2], [3, 4]]
    with pytest.raises(StageError, match="seqlen"):
        calibration_chunks([[1, 2]], nsamples=1, seqlen=3)


def test_ar_names_parse_and_unknown_levels_name_the_key():
    v = parse("q4_0-ar", {})
    assert (v.kind, v.level, v.imatrix) == ("autoround", "q4_0", False)
    assert plan_for("q4_k_m-ar", {}).autoround
    with pytest.raises(ValueError, match="auto-round does not write 'iq4_nl'"):
        check_names(["iq4_nl-ar"], [])
    with pytest.raises(ValueError, match="quantize.recipes.mine-ar"):
        check_names([], ["mine-ar"])
    with pytest.raises(ValueError, match="quantize.autoround.nsamples"):
        AutoRoundParams(iters=0, nsamples=0, seqlen=64, batch_size=1, seed=0)


def test_transplant_refuses_a_file_whose_quantized_types_all_differ(tmp_path, tiny_gguf, tiny_gguf_quants):
    # the f16 file shares only the F32 norms with q4_0's: nothing rounded to take
    with pytest.raises(StageError, match="no quantized tensor matches"):
        transplant(tiny_gguf_quants["q4_0"], tiny_gguf, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def _weights(path):
    from gguf import GGUFReader, dequantize

    return {t.name: dequantize(t.data, t.tensor_type).reshape(-1) for t in GGUFReader(str(path)).tensors}


@pytest.mark.slow
def test_ar_level_is_llama_cpps_layout_with_autorounds_rounding(tmp_path, tiny_merged, records):
    """The real AutoRound on the tiny merged model: same size, types and metadata as llama.cpp's q4_0, every
    rounded tensor close to the f16 weights (a permuted q/k or a wrong tensor would not be), and some bytes
    different from llama.cpp's rounding (else nothing was transplanted)."""
    from transformers import AutoTokenizer

    from stages.convert import convert_hf
    from stages.quantize import AutoRoundJob, run

    merged, _ = tiny_merged
    ref = tmp_path / "ref.gguf"
    convert_hf(merged, ref, "f16")
    plain = quantize_gguf(ref, tmp_path / "plain.gguf", "q4_0")
    tok = AutoTokenizer.from_pretrained(merged)
    ids = [tok(r["instruction"] + " " + r["output"])["input_ids"] for r in records(8)] * 4
    job = AutoRoundJob(merged, calibration_chunks(ids, 4, 32),
                       AutoRoundParams(iters=2, nsamples=4, seqlen=32, batch_size=2, seed=0))
    out = tmp_path / "finetuned-q4_0-ar.gguf"
    m = run(plan_for("q4_0-ar", {}), PromptParams(template="alpaca"), ref, out, tmp_path / "m.Modelfile", job=job)

    assert out.stat().st_size == plain.stat().st_size == m["file_bytes"]
    assert m["autoround"] == 1 and m["autoround_details"]["taken"] > 0
    assert [(t.name, t.type) for t in tensor_infos(out)] == [(t.name, t.type) for t in tensor_infos(plain)]
    with open(out, "rb") as a, open(plain, "rb") as b:
        head = tensor_infos(plain)[0].data_offset
        assert a.read(head)[:1000] == b.read(head)[:1000]  # the metadata: llama.cpp's, verbatim
    w_ref, w_plain, w_ar = _weights(ref), _weights(plain), _weights(out)
    changed = 0
    for name, w in w_ref.items():
        if w.size < 1024:
            continue
        err_ar = np.linalg.norm(w_ar[name] - w) / np.linalg.norm(w)
        assert err_ar < 0.3, f"{name}: AutoRound's weights are {err_ar:.2f} off the reference"
        changed += not np.array_equal(w_ar[name], w_plain[name])
    assert changed > 0
