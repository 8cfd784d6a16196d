"""The tutorial's Alpaca templates, exactly, and the chat alternative."""
from __future__ import annotations

import pytest

from alpaca_lora_cpu.prompts import render, render_record

WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\nSum.\n\n"
              "### Input:\n1, 2\n\n### Response:\n")
NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")


def test_alpaca_templates_are_exact():
    assert render("alpaca", "Sum.", "1, 2") == WITH_INPUT
    assert render("alpaca", "Say hi.") == NO_INPUT
    assert render_record("alpaca", {"instruction": "Say hi.", "input": "", "output": "hi"}) == NO_INPUT


def test_record_text_is_data_not_format_string():
    out = render("alpaca", "Print {input} and {0} and {__class__}", "{instruction}")
    assert "Print {input} and {0} and {__class__}" in out
    assert "### Input:\n{instruction}\n" in out


def test_chat_template_uses_tokenizer(builtin_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(builtin_tokenizer_dir)
    out = render("chat", "Say hi.", "", tok)
    assert "Say hi." in out and out != NO_INPUT
    assert out.rstrip().endswith("assistant")


def test_chat_without_template_fails():
    with pytest.raises(ValueError, match="chat template"):
        render("chat", "x", "", None)


def test_stop_sequences_cut_and_leaks():
    from alpaca_lora_cpu.metrics import repeats_ngram
    from alpaca_lora_cpu.prompts import cut_at_stop, leaks_template, stop_sequences

    alpaca = stop_sequences("alpaca", ("END",), end_token="<|im_end|>")
    assert alpaca == ["### Instruction:", "### Input:", "### Response:", "END"]
    assert stop_sequences("chat", ("END", "END"), end_token="<|im_end|>") == ["<|im_end|>", "END"]
    assert stop_sequences("raw", ("END",)) == ["END"]
    raw = "Ottawa.\n\n### Instruction:\nName a city.\n\n### Response:\nParis."
    assert cut_at_stop(raw, alpaca) == "Ottawa.\n\n" and cut_at_stop("no stop here", alpaca) == "no stop here"
    assert cut_at_stop("a END b ### Input:", alpaca) == "a "
    assert leaks_template(raw) and not leaks_template("Ottawa is the capital.")
    assert repeats_ngram("Canada, Canada, Canada, Canada, Canada, Canada")
    assert repeats_ngram("a b c d x a b c d y a b c d")
    assert not repeats_ngram("a b c d x a b c d y") and not repeats_ngram("one two three")
