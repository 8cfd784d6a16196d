"""The tutorial's Alpaca templates, exactly, and the chat alternative."""
from __future__ import annotations

import pytest

from alpaca_lora_cpu.prompts import full_text, last_turn, render, to_turns

WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\nSum.\n\n"
              "### Input:\n1, 2\n\n### Response:\n")
NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")


def test_alpaca_templates_are_exact():
    assert render("alpaca", "Sum.", "1, 2") == WITH_INPUT
    assert render("alpaca", "Say hi.") == NO_INPUT
    assert to_turns({"instruction": "Say hi.", "input": "", "output": "hi"}, "alpaca")[0].prompt == NO_INPUT


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


CONVERSATION = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"},
                             {"role": "user", "content": "Louder."}, {"role": "assistant", "content": "HI!"}]}


def test_a_conversation_in_the_alpaca_template_continues_turn_by_turn():
    turns = to_turns(CONVERSATION, "alpaca")
    assert [t.prompt for t in turns] == [NO_INPUT, "\n\n### Instruction:\nLouder.\n\n### Response:\n"]
    assert [t.response for t in turns] == ["Hi!", "HI!"]
    # the evaluation scores the last answer after the whole history, each earlier answer closed by EOS
    assert last_turn(turns, "</s>") == (NO_INPUT + "Hi!</s>\n\n### Instruction:\nLouder.\n\n### Response:\n", "HI!")
    system = {"messages": [{"role": "system", "content": "Be brief."}, *CONVERSATION["messages"][:2]]}
    assert to_turns(system, "alpaca")[0].prompt == "Be brief.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    # a single-turn conversation is the tutorial's template, byte for byte
    single = {"messages": CONVERSATION["messages"][:2]}
    assert to_turns(single, "alpaca")[0].prompt == NO_INPUT


def test_chat_turns_are_the_templates_own_rendering_cut_at_each_answer(builtin_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(builtin_tokenizer_dir)
    turns = to_turns(CONVERSATION, "chat", tok)
    assert [t.response for t in turns] == ["Hi!", "HI!"]
    whole = tok.apply_chat_template(CONVERSATION["messages"], tokenize=False)
    assert whole.startswith(full_text(turns, tok.eos_token) + tok.eos_token)
    assert turns[1].prompt.startswith("\n<|im_start|>user\nLouder.") and turns[1].prompt.endswith("assistant\n")
    # an Alpaca record under the chat template is one user turn, as before
    assert to_turns({"instruction": "Say hi.", "input": "", "output": "x"}, "chat", tok)[0].prompt == \
        render("chat", "Say hi.", "", tok)


def test_a_template_that_does_not_end_turns_with_eos_is_refused():
    class Odd:
        chat_template, eos_token = "x", "<eos>"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            return "".join(f"[{m['role']}]{m['content']}" for m in messages) + ("[assistant]" if add_generation_prompt
                                                                                 else "")

    with pytest.raises(ValueError, match="does not end an assistant turn with the EOS token"):
        to_turns(CONVERSATION, "chat", Odd())
