"""Shared fixtures: a tiny random LLaMA (real tokenizer of the embedded model), its GGUFs, and a temp copy of the
repo. Plain helper functions live in helpers.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import copy_repo, make_adapter, make_records, quantize_gguf, write_val


@pytest.fixture
def records():
    return make_records


@pytest.fixture(scope="session", autouse=True)
def git_identity():
    """Tests commit in temp repos (and `dvc exp run` commits too): give git an identity on any machine."""
    for key, value in (("GIT_AUTHOR_NAME", "tests"), ("GIT_AUTHOR_EMAIL", "tests@localhost"),
                       ("GIT_COMMITTER_NAME", "tests"), ("GIT_COMMITTER_EMAIL", "tests@localhost")):
        os.environ.setdefault(key, value)


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    return copy_repo(tmp_path / "repo")


@pytest.fixture(scope="session")
def builtin_tokenizer_dir(tmp_path_factory) -> Path:
    """The embedded model's tokenizer, saved once as a normal HF tokenizer folder."""
    from transformers import AutoTokenizer

    from stages.base import resolve

    src = Path(resolve("builtin:smollm2-135m-instruct").ref)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, builtin_tokenizer_dir) -> Path:
    """A tiny random LlamaForCausalLM (2 layers, GQA 4q/2kv heads) with the real SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(builtin_tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_model_dir) -> Path:
    """`tiny_model_dir` converted to an f16 GGUF by llama.cpp's converter (session-scoped, shared)."""
    from stages.convert import convert_hf

    out = tmp_path_factory.mktemp("tiny_gguf") / "tiny-f16.gguf"
    convert_hf(tiny_model_dir, out, "f16")
    return out


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter with non-zero B on `tiny_model_dir`."""
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture(scope="session")
def tiny_merged(tmp_path_factory, tiny_model_dir, tiny_adapter) -> tuple[Path, dict]:
    """(merged folder, merge metrics): the tiny model merged with `tiny_adapter` by the merge stage's `run`."""
    from alpaca_lora_cpu.config import ExportParams, PromptParams
    from stages.merge import run

    root = tmp_path_factory.mktemp("merged")
    params = ExportParams(dtype="fp32", max_shard_size="2MB", consolidated=True, gate_prompts=3,
                          gate_max_tokens=64, max_logit_diff=1e-3)
    metrics = run(params, PromptParams(template="alpaca"), tiny_model_dir, tiny_adapter,
                  write_val(root / "val.jsonl"), root / "merged")
    return root / "merged", metrics


@pytest.fixture(scope="session")
def tiny_gguf_quants(tiny_gguf) -> dict[str, Path]:
    """q8_0 and q4_0 of `tiny_gguf` (k-quants need rows of 256; the tiny model's are 64 wide)."""
    return {q: quantize_gguf(tiny_gguf, tiny_gguf.with_name(f"finetuned-{q}.gguf"), q) for q in ("q8_0", "q4_0")}


@pytest.fixture(scope="session")
def wide_model(tmp_path_factory, builtin_tokenizer_dir):
    """(HF folder, f16 GGUF, imatrix file) of a random 2-layer LLaMA with 256-wide rows, so k- and i-quants
    apply without falling back to 32-blocks."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from stages.convert import convert_hf

    tok = AutoTokenizer.from_pretrained(builtin_tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         tie_word_embeddings=True))
    out = tmp_path_factory.mktemp("wide")
    model.save_pretrained(out / "hf", safe_serialization=True)
    tok.save_pretrained(out / "hf")
    convert_hf(out / "hf", out / "wide-f16.gguf", "f16")
    texts = ["Give three tips for staying healthy.", "Translate 'good morning' into French: Bonjour."] * 4
    from transformers import AutoConfig

    from alpaca_lora_cpu.imatrix import Imatrix, collect, write
    from alpaca_lora_cpu.shards import Weights

    sums, counts = collect(AutoConfig.from_pretrained(out / "hf"), Weights(out / "hf").get,
                           [tok(t)["input_ids"] for t in texts])
    write(out / "imatrix.gguf", Imatrix(sums, counts, ["tests"], len(texts), 16))
    return out / "hf", out / "wide-f16.gguf", out / "imatrix.gguf"


@pytest.fixture(scope="session")
def tiny_random_llama(tmp_path_factory):
    """(model, its saved folder): collect reads the folder one layer at a time, the test recomputes from the model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    return model, folder
