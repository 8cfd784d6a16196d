"""A LLaMA forward one decoder layer at a time: the logit gates (merge, consolidate, convert) and the importance
matrix never hold the whole model, only one layer's weights (in fp32) and every sequence's hidden states.

    logits = forward(config, weights.get, sequences)             # list of (len, vocab) fp32 arrays
    logits = forward(config, weights.get, sequences, lora=adapter)   # base + adapter, unmerged (PEFT's forward)
    forward(config, weights.get, sequences, on_input=record, logits=False)  # hooks on every decoder linear's input

`get(name)` returns the fp32 tensor of an HF LLaMA parameter name (`model.layers.3.mlp.up_proj.weight`), from
safetensors shards (shards.Weights) or any other layout (the consolidate gate reads Meta's file through it). Each
layer is transformers' own LlamaDecoderLayer with its rotary embedding and causal mask, run on one sequence at a
time as the whole model would (tests/test_layerwise.py: the same logits as `LlamaForCausalLM`). Peak memory: one
layer, the embedding matrix, and the hidden states (sequences × tokens × hidden × 4 bytes).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from alpaca_lora_cpu.memory import steady_heap, trim

Getter = Callable[[str], Any]  # HF parameter name → fp32 tensor


@dataclass
class Lora:
    """A LoRA adapter applied unmerged: module name (`model.layers.0.self_attn.q_proj`) → (A, B, scale)."""
    modules: dict[str, tuple[Any, Any, float]] = field(default_factory=dict)


def _lora_linear(base: Any, a: Any, b: Any, scale: float) -> Any:
    """y = x Wᵀ + scale · (x Aᵀ) Bᵀ around the base linear: PEFT's LoRA forward in eval mode (no dropout)."""
    import torch
    import torch.nn.functional as F

    class LoraLinear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x) + F.linear(F.linear(x, a), b) * scale

    return LoraLinear()


def _config(config: Any) -> Any:
    config = config.__class__.from_dict(config.to_dict())
    config._attn_implementation = "sdpa"  # what from_pretrained picks on CPU: the same attention kernel
    return config


def build_layer(config: Any, i: int, get: Getter, lora: Lora | None = None) -> Any:
    """Decoder layer `i` in fp32 with its weights from `get` (and the adapter's modules wrapped around them)."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    with torch.device("meta"):
        layer = LlamaDecoderLayer(config, i)
    prefix = f"model.layers.{i}."
    state = {name: get(prefix + name).float() for name, _ in layer.named_parameters()}
    layer = layer.to_empty(device="cpu")
    layer.load_state_dict(state, strict=True)
    for name, module in list(layer.named_modules()):
        if lora is not None and prefix + name in lora.modules:
            a, b, scale = lora.modules[prefix + name]
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child,
                    _lora_linear(module, a.float(), b.float(), scale))
    return layer.eval()


def batches(sequences: list[list[int]], batch_tokens: int) -> list[list[int]]:
    """Indices of `sequences` grouped by length (shortest first) into batches of at most `batch_tokens` padded
    tokens; batch_tokens 0: one sequence a batch, in order."""
    if batch_tokens <= 0:
        return [[i] for i in range(len(sequences))]
    out: list[list[int]] = []
    for i in sorted(range(len(sequences)), key=lambda i: len(sequences[i])):
        # sorted by length: the newest sequence is the batch's longest, so the padded size is rows × its length
        if out and (len(out[-1]) + 1) * len(sequences[i]) <= batch_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def forward(config: Any, get: Getter, sequences: list[list[int]], lora: Lora | None = None,
            on_input: Callable[[str, Any], None] | None = None, logits: bool = True,
            progress: Callable[[int], None] | None = None, batch_tokens: int = 0,
            on_head_input: Callable[[Any], None] | None = None) -> list[np.ndarray]:
    """Per sequence, fp32 logits for every position (row i predicts token i+1), computed layer by layer.
    `on_input(module name, input rows)` sees the input of every nn.Linear inside the decoder layers (the imatrix's
    statistics), one row per real token; `logits=False` stops after the last layer (and returns []).
    `progress(i)` after each layer. `batch_tokens` > 0 runs sequences of similar length together, right-padded to
    at most that many tokens a batch with the padding masked out (each sequence sees only itself, as alone); 0
    runs one sequence at a time (the logit gates: exactly the whole model's arithmetic). `on_head_input(rows)`
    sees the LM head's input (the final norm's output), one row per real token, a batch at a time."""
    import torch
    import torch.nn.functional as F
    from transformers.masking_utils import create_causal_mask
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

    config = _config(config)
    steady_heap()
    groups = batches(sequences, batch_tokens)
    with torch.no_grad():
        embed = get("model.embed_tokens.weight").float()
        rotary = LlamaRotaryEmbedding(config)
        hidden, masks, rope, positions, valid = [], [], [], [], []
        for group in groups:
            width = max(len(sequences[i]) for i in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            real = torch.zeros(len(group), width, dtype=torch.bool)
            for row, i in enumerate(group):
                ids[row, :len(sequences[i])] = torch.tensor(sequences[i])
                real[row, :len(sequences[i])] = True
            h = embed[ids]
            pos = torch.arange(width).unsqueeze(0).expand(len(group), -1)
            hidden.append(h)
            positions.append(pos)
            rope.append(rotary(h, pos))
            masks.append(create_causal_mask(config=config, inputs_embeds=h,
                                            attention_mask=None if len(group) == 1 else real.long(), cache=None,
                                            position_ids=pos))
            valid.append(real)
        tied = getattr(config, "tie_word_embeddings", False)
        if not tied:
            del embed
        current: list[Any] = [None]  # the batch being run: which of its rows and positions are real tokens
        for i in range(config.num_hidden_layers):
            layer = build_layer(config, i, get, lora)
            handles = _hooks(layer, i, on_input, current) if on_input else []
            try:
                out = []
                for h, m, r, pos, real in zip(hidden, masks, rope, positions, valid, strict=True):
                    current[0] = real
                    out.append(layer(h, attention_mask=m, position_embeddings=r, position_ids=pos))
                hidden = out
            finally:
                for handle in handles:
                    handle.remove()
            del layer
            trim()
            if progress:
                progress(i)
        if not logits and on_head_input is None:
            return []
        norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        norm.weight.data = get("model.norm.weight").float()
        if on_head_input is not None:
            for h, real in zip(hidden, valid, strict=True):
                on_head_input(norm(h)[real])
        if not logits:
            return []
        head = embed if tied else get("lm_head.weight").float()
        result: list[Any] = [None] * len(sequences)
        for group, h in zip(groups, hidden, strict=True):
            for row, i in enumerate(group):
                result[i] = F.linear(norm(h[row:row + 1, :len(sequences[i])]), head)[0].numpy()
        return result


def _hooks(layer: Any, i: int, on_input: Callable[[str, Any], None], current: list[Any]) -> list:
    import torch

    def hook(name: str):
        def record(_module, inputs, _output):
            on_input(name, inputs[0][current[0]])  # (real tokens, features): the padding left out
        return record

    return [module.register_forward_hook(hook(f"model.layers.{i}.{name}"))
            for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear)]
