"""base: source forms, architecture gate, and the saved checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from alpaca_lora_cpu.config import BaseParams
from alpaca_lora_cpu.errors import StageError
from stages.base import check_architecture, resolve, run


def test_resolve_forms(tmp_path, tiny_model_dir):
    builtin = resolve("builtin:smollm2-135m-instruct")
    assert builtin.kind == "builtin" and Path(builtin.ref).is_file() and builtin.ref.endswith(".gguf")
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    assert resolve(str(tiny_model_dir)).kind == "dir"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve(str(gguf)).kind == "gguf"


@pytest.mark.parametrize("spec, needle", [
    ("builtin:llama-70b", "unknown builtin"),
    ("nothing-here", "accepted forms: builtin:smollm2-135m-instruct"),
    ("missing.gguf", "GGUF file missing.gguf not found"),
])
def test_resolve_rejects_unknown_forms(spec, needle):
    with pytest.raises(StageError, match=needle):
        resolve(spec)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(StageError, match="no config.json"):
        resolve(str(tmp_path))


def test_non_llama_folder_is_rejected_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(StageError, match="architecture 'gpt2' is not supported"):
        check_architecture(resolve(str(tmp_path)), trust_remote_code=False)


def test_non_llama_gguf_is_rejected_by_name(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(path), "phi2")
    w.add_tensor("x", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(StageError, match="architecture 'phi2' is not supported"):
        check_architecture(resolve(str(path)), trust_remote_code=False)


def test_truncated_gguf_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(StageError, match="bad.gguf is a damaged GGUF file"):
        check_architecture(resolve(str(path)), trust_remote_code=False)


def test_local_folder_round_trip(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    out = tmp_path / "base"
    params = BaseParams(model=str(tiny_model_dir), dtype="float32", max_shard_size="1GB", trust_remote_code=False)
    metrics = run(params, out)
    assert metrics["architecture"] == "llama" and metrics["source_kind"] == "dir"
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "generation_config.json").is_file()
    a, b = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
