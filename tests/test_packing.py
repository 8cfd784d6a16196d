"""Packed (padding-free) batches: the same logits, loss and LoRA gradients as padded batches."""
from __future__ import annotations

import pytest
from helpers import make_records


@pytest.fixture(scope="module")
def tokenizer(builtin_tokenizer_dir):
    from alpaca_lora_cpu.tokenization import load_tokenizer

    return load_tokenizer(builtin_tokenizer_dir)


@pytest.fixture(scope="module")
def examples(tokenizer):
    from alpaca_lora_cpu.tokenization import encode

    records = make_records(4)
    records[1]["output"] = "A much longer answer, so that the examples differ in length. " * 3
    return [encode(r, tokenizer, "alpaca", 128, False) for r in records]


def load(model_dir, attention: str):
    import torch
    from transformers import AutoModelForCausalLM

    from alpaca_lora_cpu.packing import register

    register()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attention)


def test_collator_restarts_positions_and_masks_each_first_label(examples, tokenizer):
    from alpaca_lora_cpu.packing import IGNORE
    from alpaca_lora_cpu.training import make_collator

    batch = make_collator(tokenizer, packing=True)(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert batch["cu_seq_lens_q"].tolist() == [0, *[sum(lengths[:i + 1]) for i in range(len(lengths))]]
    for start, n in zip(batch["cu_seq_lens_q"].tolist()[:-1], lengths, strict=True):
        assert batch["position_ids"][0, start:start + n].tolist() == list(range(n))
        assert batch["labels"][0, start] == IGNORE  # no example learns its neighbour's first token


def test_packed_row_gives_each_example_its_own_logits(tiny_model_dir, examples, tokenizer):
    import torch

    from alpaca_lora_cpu.packing import ATTENTION, model_inputs
    from alpaca_lora_cpu.training import make_collator

    model = load(tiny_model_dir, ATTENTION).eval()
    batch = make_collator(tokenizer, packing=True)(examples)
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in examples])
    assert torch.allclose(packed, alone, atol=1e-5), float((packed - alone).abs().max())


def test_padded_batch_under_packed_attention_matches_sdpa(tiny_model_dir, examples, tokenizer):
    """Evaluation and generation feed padded batches: the fallback must apply the padding mask."""
    import torch

    from alpaca_lora_cpu.packing import ATTENTION
    from alpaca_lora_cpu.training import make_collator

    batch = make_collator(tokenizer)(examples)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        ours = load(tiny_model_dir, ATTENTION).eval()(**inputs).logits
        sdpa = load(tiny_model_dir, "sdpa").eval()(**inputs).logits
    real = batch["attention_mask"].bool()
    assert torch.allclose(ours[real], sdpa[real], atol=1e-5)


def lora_grads(model_dir, attention: str, batch) -> tuple[float, int, dict]:
    import torch
    from peft import LoraConfig, get_peft_model

    from alpaca_lora_cpu.training import response_loss

    torch.manual_seed(0)
    # init_lora_weights=False: B is random too, so gradients reach A as well as B.
    model = get_peft_model(load(model_dir, attention), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.train()
    total, count = response_loss(model, batch)
    total.backward()
    return float(total), count, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_packed_training_step_has_the_padded_loss_and_gradients(tiny_model_dir, examples, tokenizer):
    import torch

    from alpaca_lora_cpu.packing import ATTENTION
    from alpaca_lora_cpu.training import make_collator

    padded = lora_grads(tiny_model_dir, "sdpa", make_collator(tokenizer)(examples))
    packed = lora_grads(tiny_model_dir, ATTENTION, make_collator(tokenizer, packing=True)(examples))
    assert packed[1] == padded[1] > 0
    assert packed[0] == pytest.approx(padded[0], rel=1e-5)
    assert padded[2].keys() == packed[2].keys() and len(padded[2]) == 8  # A and B of q, v in 2 layers
    for name, grad in padded[2].items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(packed[2][name], grad, rtol=1e-4, atol=1e-6), name


def test_packed_row_rejects_a_second_row(tiny_model_dir, examples, tokenizer):
    import torch

    from alpaca_lora_cpu.packing import ATTENTION, model_inputs
    from alpaca_lora_cpu.training import make_collator

    batch = make_collator(tokenizer, packing=True)(examples)
    inputs = model_inputs(batch)
    inputs["input_ids"] = inputs["input_ids"].repeat(2, 1)
    with pytest.raises(ValueError, match="a packed batch is one row"), torch.no_grad():
        load(tiny_model_dir, ATTENTION)(**inputs)


def test_evaluation_on_packed_batches_equals_padded(tiny_model_dir, examples, tokenizer):
    from alpaca_lora_cpu.packing import ATTENTION
    from alpaca_lora_cpu.training import evaluate_responses, make_collator

    model = load(tiny_model_dir, ATTENTION)
    packed = evaluate_responses(model, examples, make_collator(tokenizer, packing=True), 2)
    padded = evaluate_responses(model, examples, make_collator(tokenizer), 2)
    assert packed["eval_tokens"] == padded["eval_tokens"] > 0
    assert packed["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-5)
