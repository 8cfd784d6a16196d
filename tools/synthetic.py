"""Synthetic checkpoints in real LLaMA shapes: random weights, the embedded model's tokenizer, written shard by
shard (so making a 7B one needs no more memory than a shard), and a random non-zero LoRA adapter in PEFT's format.
For measuring memory and time at sizes this machine cannot download (make bench-scale, the memory tests); their
outputs are meaningless as text, but every stage treats them as it would a real model.

    python -m tools.synthetic --shape 1b --out /tmp/llama-1b [--adapter /tmp/llama-1b-lora]
"""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Dims:
    hidden: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    tied: bool


# LLaMA-family shapes: a 1B and a 3B in the Llama-3.2 proportions, and the original LLaMA-7B.
SHAPES = {
    "tiny": Dims(256, 4, 688, 4, 2, True),
    "150m": Dims(1024, 8, 2816, 16, 8, True),
    "1b": Dims(2048, 16, 8192, 32, 8, True),
    "3b": Dims(3072, 28, 8192, 24, 8, True),
    "7b": Dims(4096, 32, 11008, 32, 32, False),
}


def tensors(d: Dims, vocab: int):
    """(name, shape) of every tensor of the checkpoint, in the order transformers writes them."""
    hd = d.hidden // d.heads
    yield "model.embed_tokens.weight", (vocab, d.hidden)
    for i in range(d.layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (d.hidden,)
        yield p + "post_attention_layernorm.weight", (d.hidden,)
        yield p + "self_attn.q_proj.weight", (d.heads * hd, d.hidden)
        yield p + "self_attn.k_proj.weight", (d.kv_heads * hd, d.hidden)
        yield p + "self_attn.v_proj.weight", (d.kv_heads * hd, d.hidden)
        yield p + "self_attn.o_proj.weight", (d.hidden, d.heads * hd)
        yield p + "mlp.gate_proj.weight", (d.ffn, d.hidden)
        yield p + "mlp.up_proj.weight", (d.ffn, d.hidden)
        yield p + "mlp.down_proj.weight", (d.hidden, d.ffn)
    yield "model.norm.weight", (d.hidden,)
    if not d.tied:
        yield "lm_head.weight", (vocab, d.hidden)


def write_model(out: Path, d: Dims, tokenizer_dir: Path, dtype: str = "bfloat16", shard_bytes: int = 2 * 10**9,
                seed: int = 0) -> Path:
    """A LlamaForCausalLM folder of random weights (std 0.02; norms 1) with the tokenizer from `tokenizer_dir`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig

    from alpaca_lora_cpu.shards import ShardWriter

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tok)
    torch.manual_seed(seed)
    dt = getattr(torch, dtype)
    with ShardWriter(out, shard_bytes) as writer:
        for name, shape in tensors(d, vocab):
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape) * 0.02
            writer.add(name, t.to(dt))
    config = LlamaConfig(vocab_size=vocab, hidden_size=d.hidden, intermediate_size=d.ffn, num_hidden_layers=d.layers,
                         num_attention_heads=d.heads, num_key_value_heads=d.kv_heads, max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=d.tied,
                         rms_norm_eps=1e-5)
    config.dtype = dt
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_adapter(out: Path, d: Dims, r: int = 8, alpha: int = 16, seed: int = 1,
                  targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj")) -> Path:
    """A PEFT LoRA adapter with random, non-zero A and B on every linear of every layer (what PEFT writes)."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    hd = d.hidden // d.heads
    io = {"q_proj": (d.hidden, d.heads * hd), "k_proj": (d.hidden, d.kv_heads * hd),
          "v_proj": (d.hidden, d.kv_heads * hd), "o_proj": (d.heads * hd, d.hidden), "gate_proj": (d.hidden, d.ffn),
          "up_proj": (d.hidden, d.ffn), "down_proj": (d.ffn, d.hidden)}
    weights = {}
    for i in range(d.layers):
        for m in targets:
            part = "self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{i}.{part}.{m}"
            fan_in, fan_out = io[m]
            weights[f"{key}.lora_A.weight"] = torch.randn(r, fan_in) / fan_in ** 0.5
            weights[f"{key}.lora_B.weight"] = torch.randn(fan_out, r) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": list(targets), "bias": "none", "fan_in_fan_out": False, "use_dora": False,
        "use_rslora": False, "base_model_name_or_path": "synthetic"}, indent=2))
    return out


def tokenizer_dir(out: Path) -> Path:
    """The embedded model's tokenizer as a plain Hugging Face folder (made once)."""
    from transformers import AutoTokenizer

    from stages.base import resolve

    if not (out / "tokenizer.json").is_file():
        src = Path(resolve("builtin:smollm2-135m-instruct").ref)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name).save_pretrained(tmp)
        tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)
    d = SHAPES[args.shape]
    write_model(args.out, d, tokenizer_dir(args.out.parent / "tokenizer"), args.dtype)
    if args.adapter:
        write_adapter(args.adapter, d)


if __name__ == "__main__":
    main()
