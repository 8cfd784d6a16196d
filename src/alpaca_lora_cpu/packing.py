"""Padding-free training batches: each micro-batch is one row, its examples kept independent.

A random Alpaca micro-batch of 4 padded to its longest example is ~1.5× its real tokens (measured on
alpaca-cleaned: `make bench-finetune`), and every padded position costs a full forward and backward. Here the
examples are concatenated instead (transformers' DataCollatorWithFlattening: positions restart at 0 and the
first label of every example is masked, so no example predicts its neighbour's first token), and attention runs
per example with a causal SDPA call over its own span (`cu_seq_lens_q` boundaries): the CPU counterpart of
FlashAttention's varlen kernel, which is CUDA-only. The result equals the padded batch's (tests/test_packing.py).

Batches without `cu_seq_lens_q` (padded evaluation, generation) fall back to transformers' own SDPA path with its
usual mask, so a model switched to this attention stays correct for every input.
"""
from __future__ import annotations

from typing import Any

from alpaca_lora_cpu.tokenization import IGNORE

ATTENTION = "sdpa_varlen"
PACKED_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def varlen_sdpa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers attention function: per-example causal SDPA over a packed row, else plain SDPA."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch is one row, got {query.shape[0]}")
    cuts = bounds.tolist()
    gqa = query.shape[1] != key.shape[1]
    parts = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                            scale=scaling, dropout_p=dropout, enable_gqa=gqa)
             for s, e in zip(cuts[:-1], cuts[1:], strict=True)]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make ATTENTION a valid `attn_implementation` (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, varlen_sdpa)
    # Padded batches still need SDPA's mask: without a registered mask function transformers would build none.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    return ATTENTION


def collator():
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_flash_attn_kwargs=True, separator_id=IGNORE)


def is_packed(batch: dict) -> bool:
    return "cu_seq_lens_q" in batch


def model_inputs(batch: dict) -> dict:
    """The forward kwargs for a padded or packed batch (labels left to the caller)."""
    if is_packed(batch):
        # No KV cache in training: with one, transformers would also skip its packed-sequence handling.
        return {"input_ids": batch["input_ids"], "use_cache": False, **{k: batch[k] for k in PACKED_KEYS}}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def real_tokens(batch: dict) -> int:
    """Tokens that belong to examples (a packed row has no padding)."""
    return int(batch["input_ids"].numel()) if is_packed(batch) else int(batch["attention_mask"].sum())
