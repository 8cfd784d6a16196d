"""reference → evaluate@variant → report on tiny GGUFs, the bad-input errors, and the llama.cpp helpers."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import ROOT, make_records, run_module

from alpaca_lora_cpu.variants import gguf_stem, names

QUANTS = ["q8_0", "q4_0"]
VARIANTS = {v: gguf_stem(v) for v in names(QUANTS)}  # base, finetuned, q8_0, q4_0 → their GGUF stems


def small_params(dst: Path) -> Path:
    """The repo's params.yaml with the evaluation cut down to tiny sizes."""
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    doc["reference"].update(max_records=None, max_response_tokens=12, top_k=32, generate_records=2,
                            showcase_prompts=["Building a website can be done in 10 simple steps:",
                                              "Tell me about alpacas."],
                            ifeval_prompts=3, ifeval_max_new_tokens=6)
    doc["intervals"]["resamples"] = 500
    doc["evaluate"].update(threads=2, max_new_tokens=6, speed={"prompt_tokens": 32, "gen_tokens": 8, "runs": 3})
    doc["quantize"]["types"] = QUANTS  # the variants evaluated here: base, finetuned and these
    path = dst / "params.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir, tiny_gguf, tiny_gguf_quants) -> Path:
    """A working folder laid out as the pipeline leaves it before `reference`."""
    d = tmp_path_factory.mktemp("evalrun")
    small_params(d)
    gguf = d / "models/gguf"
    gguf.mkdir(parents=True)
    shutil.copy(tiny_gguf, gguf / "finetuned-reference.gguf")
    shutil.copy(tiny_gguf, gguf / "base-reference.gguf")
    for q, path in tiny_gguf_quants.items():
        shutil.copy(path, gguf / f"finetuned-{q}.gguf")
    shutil.copytree(tiny_model_dir, d / "models/merged")
    (d / "data/prepared").mkdir(parents=True)
    (d / "data/prepared/val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_records(3)))
    return d


def run_in(d: Path, module: str, *args: str):
    return run_module(module, *args, cwd=d, env={"PYTHONPATH": str(ROOT)})


def reference(d: Path, val: str = "data/prepared/val.jsonl", out: str = "models/reference"):
    return run_in(d, "stages.reference", "--params", "params.yaml", "--gguf", "models/gguf/finetuned-reference.gguf",
                  "--merged", "models/merged", "--val", val, "--ifeval", str(ROOT / "data/ifeval/prompts.jsonl"),
                  "--out", out, "--metrics", "reports/metrics/reference.json")


def evaluate(d: Path, variant: str, stem: str):
    return run_in(d, "stages.evaluate", "--params", "params.yaml", "--variant", variant, "--gguf",
                  f"models/gguf/{stem}.gguf", "--reference", "models/reference", "--metrics",
                  f"reports/metrics/evaluate/{variant}.json", "--generations",
                  f"reports/evaluate/{variant}.generations.jsonl")


def report(d: Path):
    return run_in(d, "stages.report", "--params", "params.yaml", "--evaluated", "reports/metrics/evaluate",
                  "--reference", "reports/metrics/reference.json", "--generations", "reports/evaluate",
                  "--loss", "reports/plots/finetune", "--out", "reports/report.md", "--figures",
                  "reports/figures", "--table", "reports/plots/evaluate.csv", "--metrics",
                  "reports/metrics/report.json")


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def evaluated(workdir) -> Path:
    ok(reference(workdir))
    for variant, stem in VARIANTS.items():
        ok(evaluate(workdir, variant, stem))
    loss = workdir / "reports/plots/finetune"
    loss.mkdir(parents=True)
    (loss / "loss.csv").write_text("step,train_loss\n1,2.5\n2,2.1\n3,1.9\n")
    ok(report(workdir))
    return workdir


def metrics(d: Path, variant: str) -> dict:
    """The variant's whole record (the details beside its flat metrics file)."""
    return json.loads((d / f"reports/metrics/evaluate/{variant}.details.json").read_text())


def metrics_keys(d: Path) -> list[str]:
    return list(json.loads((d / "reports/metrics/evaluate/q4_0.json").read_text()))


@pytest.mark.slow
def test_reference_metrics_of_each_variant(evaluated):
    ref = json.loads((evaluated / "reports/metrics/reference.details.json").read_text())
    assert ref["records"] == 3 and ref["positions"] > 0 and ref["hf_fp32"]["gen_tps"] > 0
    f16, q8, q4 = (metrics(evaluated, v) for v in ("finetuned", "q8_0", "q4_0"))
    # The reference against itself: same logits, so zero divergence and the reference's own perplexity.
    assert f16["kld_mean"] < 1e-6 and f16["top1"] == 1.0 and f16["rms_dp"] < 1e-6
    assert f16["ppl"] == pytest.approx(ref["reference_ppl"], rel=1e-5)
    # Coarser quantization moves the distributions further.
    assert 0 < q8["kld_mean"] < q4["kld_mean"] and q4["kld_max"] >= q4["kld_p99"] >= 0
    assert q4["size_mb"] < q8["size_mb"] < f16["size_mb"]
    assert 15.9 < f16["bits_per_weight"] < 16.5 and q4["bits_per_weight"] < q8["bits_per_weight"] < 9
    for m in (f16, q8, q4):
        assert m["run_id"] == ref["run_id"] and m["positions"] == ref["positions"]
        assert m["speed"]["threads"] == 2 and len(m["speed"]["gen_tps_runs"]) == 3 and m["speed"]["peak_rss_mb"] > 0
        assert 0 <= m["stop_rate"] <= 1 and 0 <= m["leak_rate"] <= 1 and 0 <= m["loop_rate"] <= 1
        assert m["answer_tokens"] > 0 and 0 <= m["rouge_l"] <= 1 and m["generated_prompts"] == 7
        assert m["ifeval_prompts"] == 3 and 0 <= m["if_inst_strict"] <= 1 and 0 <= m["if_prompt_loose"] <= 1
        assert len(m["per_record"]["kld"]) == ref["records"] and sum(m["per_record"]["positions"]) == m["positions"]
        # every figure's interval holds its point estimate; a 3-record bootstrap still has some width for q4_0
        for name, (lo, hi) in m["ci"].items():
            point = m["speed"][name] if name in ("gen_tps", "prompt_tps") else m[name]
            assert lo - 1e-9 <= point <= hi + 1e-9, (name, lo, point, hi)
    assert q4["ci"]["kld_mean"][1] > q4["ci"]["kld_mean"][0]
    rows = [json.loads(x) for x in (evaluated / "reports/evaluate/q4_0.generations.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["val", "val", "showcase", "showcase", "ifeval", "ifeval", "ifeval"]
    assert all(len(r["ifeval"]["strict"]) == len(r["ifeval"]["loose"]) >= 1 for r in rows if r["kind"] == "ifeval")
    assert all(r["tokens"] <= 6 for r in rows)
    assert all(r["raw"].startswith(r["text"]) for r in rows)  # the answer is the raw generation, cut at a stop


@pytest.mark.slow
def test_report_table_targets_plots(evaluated):
    text = (evaluated / "reports/report.md").read_text()
    for variant in VARIANTS:
        assert f"| {variant} |" in text
    assert "Building a website can be done in 10 simple steps:" in text
    # PPL ratio, leaks, repetition, instruction following (vs base), q8_0 KLD, q8_0 top-1, q4_0 speed, the best
    # variant within q4_0's size, the best level in q4_0's format; the imatrix targets have no -imat variants
    # here, so they are "not measured"
    decided = text.count("**met**") + text.count("**missed**") + text.count("*undecided*")
    assert decided == 9 and "3 not measured (95% intervals" in text
    assert "best level in the tutorial's q4_0 format (q4_0): mean KLD" in text
    assert "not measured: imatrix effect on q4_0" in text and "## Quantization" in text
    assert "## Instruction following" in text and "vs base |" in text and "vs finetuned |" in text
    assert "fine-tuned response PPL ≤ 0.95 × the base model's (on " in text
    assert text.count(" [") > 4 * len(VARIANTS)  # intervals in the variants table
    assert "| finetuned | q4_0 |" in text  # the quantization comparison, without the q2_k not evaluated
    for png in ("quality_vs_size.png", "speed_vs_size.png", "training_loss.png"):
        assert (evaluated / "reports/figures" / png).stat().st_size > 5000
    table = (evaluated / "reports/plots/evaluate.csv").read_text().splitlines()
    assert table[0].startswith("variant,size_mb,") and len(table) == 1 + len(VARIANTS)
    assert "kld_mean_lo" in table[0] and "if_prompt_strict_hi" in table[0]
    summary = json.loads((evaluated / "reports/metrics/report.details.json").read_text())
    assert summary["variants"] == 4
    assert summary["targets_met"] + summary["targets_missed"] + summary["targets_undecided"] == 9
    # report.json: the recommended model's numbers, under the evaluate metrics' names
    flat = json.loads((evaluated / "reports/metrics/report.json").read_text())
    best = metrics(evaluated, summary["recommended"]["variant"])
    assert flat["kld_mean"] == pytest.approx(best["kld_mean"], rel=1e-5) and set(flat) <= set(metrics_keys(evaluated))


@pytest.mark.slow
def test_mlflow_run_per_variant_with_report(evaluated):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{evaluated}/mlflow.db")
    exp = client.get_experiment_by_name("alpaca-lora-cpu")
    runs = client.search_runs([exp.experiment_id], "tags.dvc_stage = 'evaluate'")
    assert sorted(r.data.tags["variant"] for r in runs) == sorted(VARIANTS)
    assert {r.info.run_name for r in runs} == {f"evaluate {v}" for v in VARIANTS}
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 1
    q4 = next(r for r in runs if r.data.tags["variant"] == "q4_0")
    assert q4.data.metrics["kld_mean"] == pytest.approx(metrics(evaluated, "q4_0")["kld_mean"], rel=1e-5)
    assert len({tuple(sorted(r.data.metrics)) for r in runs}) == 1  # one set of keys: one chart per metric
    assert q4.data.params["variant"] == "q4_0" and q4.data.params["imatrix"] == "False"
    assert "report.md" in [a.path for a in client.list_artifacts(q4.info.run_id)]


@pytest.mark.slow
def test_report_refuses_metrics_of_another_run(evaluated, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(evaluated, d, ignore=shutil.ignore_patterns("models", "mlflow.db"))
    path = d / "reports/metrics/evaluate/q8_0.details.json"
    path.write_text(path.read_text().replace(metrics(evaluated, "q8_0")["run_id"], "0123456789abcdef"))
    proc = report(d)
    assert proc.returncode == 2
    assert "different pipeline runs" in proc.stderr and "q8_0.details.json" in proc.stderr
    assert "0123456789abcdef" in proc.stderr
    (d / "reports/metrics/evaluate/q8_0.details.json").unlink()
    proc = report(d)
    assert proc.returncode == 2 and "variant q8_0: metrics" in proc.stderr


@pytest.mark.slow
def test_missing_variant_file_is_named(workdir):
    proc = evaluate(workdir, "q4_0", "finetuned-q3_k_m")
    assert proc.returncode == 2
    assert "variant q4_0" in proc.stderr and "models/gguf/finetuned-q3_k_m.gguf not found" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_empty_validation_split_is_a_clear_error(workdir):
    empty = workdir / "data/prepared/empty.jsonl"
    empty.write_text("")
    proc = reference(workdir, val="data/prepared/empty.jsonl", out="models/reference-empty")
    assert proc.returncode == 2 and "holds no records" in proc.stderr and "empty.jsonl" in proc.stderr
    assert not (workdir / "models/reference-empty").exists()


@pytest.mark.slow
def test_llama_scores_only_response_tokens(tiny_gguf):
    from alpaca_lora_cpu.llama import open_llama, response_log_probs, tokenize_record

    with open_llama(tiny_gguf, threads=2, n_ctx=128, logits_all=True) as llm:
        ids, n_prompt = tokenize_record(llm, "### Instruction:\nSay hi.\n\n### Response:\n", "Hi there!", 50)
        assert ids[-1] == llm.token_eos() and 0 < n_prompt < len(ids)
        logp = response_log_probs(llm, ids, n_prompt)
        assert logp.shape == (len(ids) - n_prompt, llm.n_vocab())
        np.testing.assert_allclose(np.exp(logp).sum(axis=1), 1.0, atol=1e-6)
        # Same prefix, same logits: the response rows do not depend on anything after them (causal).
        longer = response_log_probs(llm, ids + [ids[-2]], n_prompt)
        np.testing.assert_allclose(longer[:-1], logp, atol=1e-4)
        cut, _ = tokenize_record(llm, "### Response:\n", "Hi there!", 2)
        assert len(cut) == len(llm.tokenize(b"### Response:\n", add_bos=True, special=True)) + 2


@pytest.mark.slow
def test_bench_infer_prints_the_ratio(tiny_gguf, tmp_path):
    params = small_params(tmp_path)
    proc = run_module("tools.bench_infer", "--params", str(params), "--gguf", str(tiny_gguf))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ratio = float(proc.stdout.strip().splitlines()[-1].split()[-1])
    assert ratio > 0 and "bandwidth bound" in proc.stdout


@pytest.mark.parametrize("model", ["embedded", "tiny"])
def test_answers_decoded_together_are_the_answers_one_at_a_time(model, tiny_gguf):
    """generate_many (evaluate's batched greedy decoding, slots refilled as answers end) gives each prompt the
    tokens create_completion gives it alone: the embedded model ends some answers with EOS, the random tiny one
    runs every answer to its own limit."""
    from alpaca_lora_cpu.llama import generate, generate_many, open_llama
    from stages.base import resolve

    path = resolve("builtin:smollm2-135m-instruct").ref if model == "embedded" else tiny_gguf
    asked = [("### Instruction:\nSay hi.\n\n### Response:\n", 24), ("Tell me about alpacas.", 9),
             ("### Instruction:\nName a colour.\n\n### Response:\n", 30), ("1, 2, 3,", 1),
             ("### Instruction:\nWrite a haiku about rain.\n\n### Response:\n", 17)]
    with open_llama(path, threads=2, n_ctx=512) as llm:
        alone = [generate(llm, p, m) for p, m in asked]
        together = generate_many(llm, asked, parallel=2)
    assert together == alone
    assert all(g.tokens <= m for g, (_, m) in zip(together, asked, strict=True))
    if model == "embedded":
        assert any(g.stopped and g.tokens < m for g, (_, m) in zip(together, asked, strict=True))
    else:
        assert [g.tokens for g in together] == [m for _, m in asked]


def test_packed_logits_are_each_sequences_own_rows(tiny_gguf):
    """sequence_logits (reference and evaluate's scoring: several records a llama.cpp batch, logits of the scored
    rows only) gives each record the rows all_logits gives it alone, a record longer than a batch included, and
    the same bits twice (so the finetuned variant scores exactly as its reference)."""
    from alpaca_lora_cpu.llama import all_logits, open_llama, sequence_logits, tokenize

    texts = ["Hello, world. " * k for k in (1, 3, 2, 9, 1, 4)]
    with open_llama(tiny_gguf, threads=2, n_ctx=256, n_batch=32, logits_all=True) as llm:
        seqs = [(ids, min(k, len(ids) - 1)) for k, ids in enumerate(tokenize(llm, t) for t in texts)]
        assert max(len(ids) for ids, _ in seqs) > 32  # one runs alone, in chunks
        alone = [all_logits(llm, ids)[start:-1] for ids, start in seqs]
        packed = list(sequence_logits(llm, seqs))
        again = list(sequence_logits(llm, seqs))
    assert [p.shape for p in packed] == [a.shape for a in alone]
    for p, a, b in zip(packed, alone, again, strict=True):
        np.testing.assert_allclose(p, a, atol=2e-3, rtol=1e-3)
        assert np.array_equal(p, b)
