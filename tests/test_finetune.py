"""finetune: EOS / padding / masking, params validation, a tiny training run, resume after kill -9, 2 processes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, finetune, make_records, setup_run

# ---------------------------------------------------------------- tokenization, EOS, padding, masking

@pytest.fixture(scope="module")
def tokenizer(builtin_tokenizer_dir):
    from alpaca_lora_cpu.tokenization import load_tokenizer

    return load_tokenizer(builtin_tokenizer_dir)


RECORD = {"instruction": "Name a colour.", "input": "", "output": "Blue."}


def test_example_ends_with_eos_and_masks_the_prompt(tokenizer):
    from alpaca_lora_cpu.packing import IGNORE
    from alpaca_lora_cpu.prompts import to_turns
    from alpaca_lora_cpu.tokenization import encode

    ex = encode(RECORD, tokenizer, "alpaca", 256, train_on_inputs=False)
    n_prompt = len(tokenizer(to_turns(RECORD, "alpaca")[0].prompt)["input_ids"])
    assert ex["input_ids"][-1] == tokenizer.eos_token_id and ex["labels"][-1] == tokenizer.eos_token_id
    assert ex["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert tokenizer.decode(ex["input_ids"][n_prompt:-1]) == "Blue."


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_a_conversation_learns_every_answer_and_only_the_answers(tokenizer, template):
    from alpaca_lora_cpu.packing import IGNORE
    from alpaca_lora_cpu.tokenization import encode

    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                         {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another."},
                         {"role": "assistant", "content": "Red."}]}
    ex = encode(chat, tokenizer, template, 512, train_on_inputs=False)
    learned = [i for i, label in enumerate(ex["labels"]) if label != IGNORE]
    spans = [[learned[0]]]
    for i in learned[1:]:
        spans[-1].append(i) if i == spans[-1][-1] + 1 else spans.append([i])
    # two answers, each followed by its EOS, and nothing of the system message, the questions or the template
    assert [tokenizer.decode([ex["input_ids"][i] for i in span]) for span in spans] == \
        ["Blue." + tokenizer.eos_token, "Red." + tokenizer.eos_token]
    assert ex["labels"][-1] == tokenizer.eos_token_id


def test_train_on_inputs_keeps_every_label(tokenizer):
    from alpaca_lora_cpu.tokenization import encode

    ex = encode(RECORD, tokenizer, "alpaca", 256, train_on_inputs=True)
    assert ex["labels"] == ex["input_ids"]


def test_truncation_cuts_the_eos_and_a_full_prompt_is_dropped(tokenizer):
    from alpaca_lora_cpu.tokenization import encode

    long = {**RECORD, "output": "word " * 100}
    ex = encode(long, tokenizer, "alpaca", 64, train_on_inputs=False)
    assert len(ex["input_ids"]) == 64 and ex["input_ids"][-1] != tokenizer.eos_token_id
    assert encode(RECORD, tokenizer, "alpaca", 16, train_on_inputs=False) is None  # prompt alone > 16 tokens
    assert encode(RECORD, tokenizer, "alpaca", 16, train_on_inputs=True) is not None


def test_padding_never_masks_the_eos_label_although_pad_is_eos(tokenizer):
    from alpaca_lora_cpu.packing import IGNORE
    from alpaca_lora_cpu.tokenization import encode
    from alpaca_lora_cpu.training import make_collator

    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the dangerous case
    short = encode(RECORD, tokenizer, "alpaca", 256, False)
    longer = encode({**RECORD, "output": "Blue, like the sky on a clear day."}, tokenizer, "alpaca", 256, False)
    batch = make_collator(tokenizer)([short, longer])
    n = len(short["input_ids"])
    assert batch["input_ids"].shape[1] == len(longer["input_ids"])
    assert batch["labels"][0, n - 1] == tokenizer.eos_token_id  # the real EOS is learned
    assert (batch["labels"][0, n:] == IGNORE).all() and (batch["attention_mask"][0, n:] == 0).all()
    assert (batch["input_ids"][0, n:] == tokenizer.pad_token_id).all()
    assert batch["labels"][1, -1] == tokenizer.eos_token_id


def test_response_loss_equals_the_full_logits_loss(tiny_model_dir, tokenizer):
    """Logits only at labelled positions give exactly the model's own masked loss."""
    import torch
    from transformers import AutoModelForCausalLM

    from alpaca_lora_cpu.tokenization import encode
    from alpaca_lora_cpu.training import make_collator, response_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    examples = [encode(r, tokenizer, "alpaca", 128, False) for r in make_records(3)]
    batch = make_collator(tokenizer)(examples)
    with torch.no_grad():
        total, count = response_loss(model, batch)
        reference = model(**batch).loss
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    assert torch.allclose(total / count, reference, atol=1e-5)


# ---------------------------------------------------------------- bad input: one line, before the model loads

BAD = [
    ({"lora": {"r": 0}}, "finetune.lora.r must be > 0"),
    ({"lora": {"alpha": 0}}, "finetune.lora.alpha must be > 0"),
    ({"lora": {"dropout": 1.0}}, "finetune.lora.dropout must be in [0, 1)"),
    ({"lora": {"dropout": -0.1}}, "finetune.lora.dropout must be in [0, 1)"),
    ({"lora": {"target_modules": "attention"}}, "'all-linear'"),
    ({"lora": {"target_modules": ["q_proj", "qkv"]}}, "no linear module 'qkv' (its linear modules: down_proj, "
                                                      "gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
    ({"cutoff_len": 8}, "finetune.cutoff_len must be >= 16"),
    ({"batch_size": 5}, "must be a positive multiple of finetune.micro_batch_size"),
    ({"processes": 3}, "finetune.batch_size (4) must be a multiple of micro_batch_size × processes (2 × 3)"),
    ({"processes": 0}, "finetune.processes must be >= 1"),
    ({"accelerate_config": "../ddp"}, "finetune.accelerate_config must be a config name"),
    ({"processes": 2, "accelerate_config": "nope"}, "configs/accelerate/nope.yaml does not exist (choices in"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[m for _, m in BAD])
@pytest.mark.slow
def test_bad_params_fail_in_one_line(tmp_path, tiny_model_dir, override, message):
    cwd, args = setup_run(tmp_path, tiny_model_dir, **override)
    proc = finetune(cwd, args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, proc.stderr[-2000:]
    assert "Loading weights" not in proc.stderr and not (tmp_path / "adapter").exists()


def test_empty_training_split(tmp_path, tiny_model_dir):
    cwd, args = setup_run(tmp_path, tiny_model_dir)
    (tmp_path / "data/train.jsonl").write_text("")
    proc = finetune(cwd, args)
    assert proc.returncode == 2 and "train.jsonl holds no records" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_quantization_without_usable_bitsandbytes(tmp_path, tiny_model_dir):
    """A bitsandbytes that cannot be imported (as on a machine without it) stops 4bit before the model loads."""
    cwd, args = setup_run(tmp_path, tiny_model_dir, quantization="4bit")
    broken = tmp_path / "shadow/bitsandbytes"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('libbitsandbytes_cpu.so: cannot open shared object')\n")
    proc = finetune(cwd, args, env={"PYTHONPATH": f"{tmp_path / 'shadow'}{os.pathsep}{ROOT}"})
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "finetune.quantization 4bit needs a working bitsandbytes" in last, proc.stderr
    assert "Loading weights" not in proc.stderr


# ---------------------------------------------------------------- real (tiny) runs

def assert_valid_adapter(adapter: Path, base: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert (adapter / "adapter_model.safetensors").stat().st_size > 1000
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().max()) > 0 for p in lora_b)  # PEFT initialises lora_B to zero


@pytest.mark.slow
def test_tiny_run_writes_adapter_metrics_plots_and_mlflow(tmp_path, tiny_model_dir):
    cwd, args = setup_run(tmp_path, tiny_model_dir)
    proc = finetune(cwd, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_valid_adapter(tmp_path / "adapter", tiny_model_dir)
    m = json.loads((tmp_path / "finetune.details.json").read_text())
    assert m["steps"] == 4 and m["train_samples"] == 16 and m["resumed_from_step"] == 0
    assert m["eval_tokens"] > 0 and m["eval_perplexity"] > 1 and m["train_tokens_per_second"] > 0
    # The base is scored on the same responses with the adapter off: a different number, the same scale.
    assert m["base_eval_perplexity"] > 1 and m["base_eval_loss"] != pytest.approx(m["eval_loss"], abs=1e-4)
    assert m["eval_ppl_ratio"] == pytest.approx(m["eval_perplexity"] / m["base_eval_perplexity"])
    assert m["peak_rss_mb"] > 100 and m["final_train_loss"] > 0
    assert "s/it]" in proc.stderr or "it/s]" in proc.stderr  # tqdm progress with rate / ETA
    train_csv = (tmp_path / "plots/train_loss.csv").read_text().splitlines()
    assert train_csv[0] == "step,train_loss" and len(train_csv) == 5
    assert (tmp_path / "plots/eval_loss.csv").read_text().startswith("step,eval_loss\n2,")
    assert (tmp_path / "plots/loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not list((tmp_path / "ckpt").glob("checkpoint-*"))  # cleaned after success

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd}/mlflow.db")
    exp = client.get_experiment_by_name("alpaca-lora-cpu")
    (run,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("kind") == "stage"]
    assert run.info.status == "FINISHED" and run.data.params["finetune.lora.r"] == "4"
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 4
    assert client.get_metric_history(run.info.run_id, "learning_rate")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "plots"} <= artifacts


@pytest.mark.slow
def test_killed_run_resumes_from_newest_complete_checkpoint(tmp_path, tiny_model_dir):
    # Long enough (60 steps) that a fast machine cannot finish before the poll sees a checkpoint; on CI
    # a 10-step run once ended, rotation included, between two polls.
    cwd, args = setup_run(tmp_path, tiny_model_dir, n_train=40, max_steps=60, eval_steps=100)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "stages.finetune", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = tmp_path / "ckpt"
    deadline = time.time() + 300
    try:
        while not list(ckpt.glob("checkpoint-*/trainer_state.json")):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
        time.sleep(0.2)  # let that checkpoint finish; the kill may still land mid-way through a later one
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "adapter").exists()
    # A half-written newer checkpoint, as a power loss would leave: skipped with a warning. (Checkpoint
    # rotation may already have removed checkpoint-2: copy whichever complete one is there.)
    complete = [p for p in ckpt.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    partial = ckpt / "checkpoint-59"
    shutil.copytree(complete[0], partial)
    (partial / "trainer_state.json").write_text('{"global_step": 59, "log_hi')

    second = finetune(cwd, args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "skipping incomplete checkpoint" in second.stderr and "checkpoint-59" in second.stderr
    m = json.loads((tmp_path / "finetune.details.json").read_text())
    assert m["resumed_from_step"] >= 2 and m["resumed_from_step"] % 2 == 0 and m["steps"] == 60
    assert f"resuming from {ckpt}/checkpoint-{m['resumed_from_step']}" in second.stderr
    assert_valid_adapter(tmp_path / "adapter", tiny_model_dir)


@pytest.mark.slow
def test_run_stopped_after_its_last_checkpoint_does_not_train_again(tmp_path, tiny_model_dir):
    """Killed between the last checkpoint and the adapter: the rerun finishes, with no extra step."""
    import torch
    from safetensors.torch import load_file

    cwd, args = setup_run(tmp_path, tiny_model_dir, max_steps=2, save_steps=2, eval_steps=100)
    (tmp_path / "plots").write_text("a file where the plots folder goes: the run fails after training")
    first = finetune(cwd, args)
    assert first.returncode != 0
    last = tmp_path / "ckpt/checkpoint-2"
    trained = load_file(str(last / "adapter_model.safetensors"))
    (tmp_path / "plots").unlink()

    second = finetune(cwd, args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "is the last step: nothing left to train" in second.stderr
    m = json.loads((tmp_path / "finetune.details.json").read_text())
    assert m["steps"] == 2 and m["resumed_from_step"] == 2 and m["train_tokens_non_pad"] == 0
    assert m["final_train_loss"] > 0 and m["mean_train_loss"] > 0
    final = load_file(str(tmp_path / "adapter/adapter_model.safetensors"))
    assert final.keys() == trained.keys()
    assert all(torch.equal(final[k], trained[k]) for k in trained)


@pytest.mark.slow
def test_changed_params_do_not_resume_foreign_checkpoints(tmp_path, tiny_model_dir):
    from alpaca_lora_cpu.checkpoints import FINGERPRINT, find_resume

    ckpt = tmp_path / "ckpt"
    (ckpt / "checkpoint-2").mkdir(parents=True)
    (ckpt / FINGERPRINT).write_text("other\n")
    assert find_resume(ckpt, "this", is_main=True) is None
    assert not (ckpt / "checkpoint-2").exists()


@pytest.mark.slow
def test_processes_param_launches_two_cpu_processes_under_accelerate(tmp_path, tiny_model_dir):
    """`-S finetune.processes=2` and the stage's own, unchanged command: it starts itself under accelerate."""
    cwd, args = setup_run(tmp_path, tiny_model_dir, max_steps=2, eval_steps=100, processes=2)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db", "OMP_NUM_THREADS": "1"}
    proc = finetune(cwd, args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launching 2 processes" in proc.stderr and "accelerate.commands.launch" in proc.stderr
    m = json.loads((tmp_path / "finetune.details.json").read_text())
    assert m["processes"] == 2 and m["steps"] == 2
    assert_valid_adapter(tmp_path / "adapter", tiny_model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_base_trains_a_valid_adapter(tmp_path, tiny_model_dir, quantization):
    """QLoRA (nf4 + double quantization) and 8-bit run through bitsandbytes, on CPU too."""
    cwd, args = setup_run(tmp_path, tiny_model_dir, n_train=8, quantization=quantization, max_steps=1,
                          eval_steps=100)
    proc = finetune(cwd, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_valid_adapter(tmp_path / "adapter", tiny_model_dir)
