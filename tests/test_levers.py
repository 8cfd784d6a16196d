"""The recipe study's levers as finetune params: NEFTune scaled per example (on a packed batch too), LoRA+'s
learning rates, rsLoRA's scale (and that the merge reads the adapter the same way PEFT built it)."""
from __future__ import annotations

import math

import pytest
from helpers import make_records


@pytest.fixture(scope="module")
def tokenizer(builtin_tokenizer_dir):
    from alpaca_lora_cpu.tokenization import load_tokenizer

    return load_tokenizer(builtin_tokenizer_dir)


@pytest.fixture(scope="module")
def examples(tokenizer):
    from alpaca_lora_cpu.tokenization import encode

    records = make_records(2, with_input_every=99)
    records[0]["output"] = "Short."
    records[1]["output"] = "A much longer answer, so that the two examples differ a lot in length. " * 4
    return [encode(r, tokenizer, "alpaca", 256, False) for r in records]


def test_packed_row_gives_each_position_its_own_example_length(examples, tokenizer):
    from alpaca_lora_cpu.training import example_lengths, make_collator

    batch = make_collator(tokenizer, packing=True)(examples)
    n0, n1 = (len(e["input_ids"]) for e in examples)
    lengths = example_lengths(batch, tuple(batch["input_ids"].shape))
    assert lengths.shape == (1, n0 + n1)
    assert set(lengths[0, :n0].tolist()) == {n0} and set(lengths[0, n0:].tolist()) == {n1}
    padded = make_collator(tokenizer)(examples)
    lengths = example_lengths(padded, tuple(padded["input_ids"].shape))
    assert set(lengths[0].tolist()) == {0.0, n0} and set(lengths[1].tolist()) == {n1}  # padding gets none


def test_neftune_noise_is_scaled_by_each_examples_own_length(examples, tokenizer):
    import torch

    from alpaca_lora_cpu.training import example_lengths, make_collator, neftune_noise

    batch = make_collator(tokenizer, packing=True)(examples)
    n0, n1 = (len(e["input_ids"]) for e in examples)
    d, alpha = 64, 5.0
    torch.manual_seed(0)
    embeds = torch.zeros(1, n0 + n1, d)
    noise = neftune_noise(embeds, example_lengths(batch, (1, n0 + n1)), alpha)
    bound0, bound1 = alpha / math.sqrt(n0 * d), alpha / math.sqrt(n1 * d)
    short, long_ = noise[0, :n0].abs().max().item(), noise[0, n0:].abs().max().item()
    assert 0.9 * bound0 < short <= bound0 and 0.9 * bound1 < long_ <= bound1
    # transformers' hook scales by the packed row's length, which would shrink the short example's noise
    row = alpha / math.sqrt((n0 + n1) * d)
    assert short > 1.5 * row


def test_neftune_hook_only_while_training(tiny_model_dir, examples, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from alpaca_lora_cpu.training import make_collator, neftune

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = make_collator(tokenizer)(examples)
    emb = model.get_input_embeddings()
    clean = emb(batch["input_ids"])
    model.train()
    with neftune(model, batch, 5.0):
        noisy = emb(batch["input_ids"])
    assert not torch.equal(noisy, clean) and torch.equal(emb(batch["input_ids"]), clean)  # hook removed
    model.eval()
    with neftune(model, batch, 5.0):
        assert torch.equal(emb(batch["input_ids"]), clean)
    with neftune(model.train(), batch, None):
        assert torch.equal(emb(batch["input_ids"]), clean)


def _params(**kw):
    import yaml
    from helpers import ROOT

    from alpaca_lora_cpu.config import FinetuneParams, build

    doc = yaml.safe_load((ROOT / "params.yaml").read_text())["finetune"]
    doc["lora"].update(kw.pop("lora", {}))
    return build(FinetuneParams, {**doc, **kw}, "finetune")


def test_loraplus_gives_lora_b_the_larger_learning_rate(tiny_model_dir):
    from alpaca_lora_cpu.training import load_model, optimizers

    params = _params(precision="fp32", loraplus_lr_ratio=16.0,
                     lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    model = load_model(tiny_model_dir, params)
    opt, scheduler = optimizers(model, params)
    names = {id(p): n for n, p in model.named_parameters()}
    rates = {}
    for group in opt.param_groups:
        for p in group["params"]:
            rates[names[id(p)]] = group["lr"]
    b = {r for n, r in rates.items() if "lora_B" in n}
    a = {r for n, r in rates.items() if "lora_A" in n}
    assert scheduler is None and a == {params.learning_rate} and b == {16 * params.learning_rate}
    assert optimizers(model, _params(precision="fp32")) == (None, None)


def test_rslora_scale_is_the_same_in_peft_and_in_the_merge(tiny_model_dir, tmp_path):
    from alpaca_lora_cpu.lora import read
    from alpaca_lora_cpu.training import load_model

    params = _params(precision="fp32", lora={"r": 16, "alpha": 8, "use_rslora": True,
                                             "target_modules": ["q_proj", "v_proj"]})
    model = load_model(tiny_model_dir, params)
    layer = next(m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "scaling"))
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(16))
    model.save_pretrained(tmp_path / "adapter")
    adapter = read(tmp_path / "adapter")
    assert len(adapter.modules) == 4
    assert all(scale == pytest.approx(8 / math.sqrt(16)) for _, _, scale in adapter.modules.values())


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("neftune_alpha", 0.0, "finetune.neftune_alpha must be > 0"),
    ("loraplus_lr_ratio", 0.5, "finetune.loraplus_lr_ratio must be >= 1"),
])
def test_lever_params_are_checked(key, value, needle):
    from alpaca_lora_cpu.errors import StageError

    with pytest.raises(StageError, match=needle):
        _params(**{key: value})
