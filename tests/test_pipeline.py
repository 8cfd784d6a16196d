"""End to end on the real embedded model: `dvc repro` of the whole pipeline in a temp copy of the repo, once,
with every stage shrunk to a few prompts/tokens (same code paths, smaller loops). Then: a second repro is a
no-op, a param change invalidates exactly the downstream stages, MLflow groups the runs, an experiment shows
in `dvc exp show` and MLflow, outputs round-trip through a DVC remote, and `make generate` prints text."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT, copy_repo, dvc, shrink_params

from alpaca_lora_cpu.files import sha256_file

pytestmark = pytest.mark.slow
SMALL_QUANTS = ["q8_0", "q4_0", "q4_0-imat", "searched"]  # a stock level, its imatrix twin, the searched recipe


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, git_identity):
    repo = copy_repo(tmp_path_factory.mktemp("e2e") / "repo")
    shrink_params(repo, SMALL_QUANTS)
    subprocess.run(["git", "commit", "-qam", "shrink"], cwd=repo, check=True, capture_output=True)
    dvc(repo, "repro")
    return repo


def metrics(repo, name):
    """A stage's whole record: the details JSON beside its flat metrics file."""
    return json.loads((repo / "reports/metrics" / name.replace(".json", ".details.json")).read_text())


def test_declared_dvc_metrics_are_flat_numbers_and_fit_a_terminal(pipeline):
    shown = json.loads(dvc(pipeline, "metrics", "show", "--json").stdout)
    files = next(iter(shown.values()))["data"]
    assert {"reports/metrics/finetune.json", "reports/metrics/report.json",
            "reports/metrics/evaluate/q4_0.json"} <= set(files), sorted(files)
    for path, entry in files.items():
        data = entry["data"]
        assert 1 <= len(data) <= 12, (path, sorted(data))
        bad = {k: v for k, v in data.items() if isinstance(v, bool) or not isinstance(v, (int, float))}
        assert not bad, f"{path}: not flat numbers: {bad}"
    keys = {tuple(sorted(e["data"])) for p, e in files.items() if "/evaluate/" in p}
    assert len(keys) == 1, keys  # every variant: the same columns
    table = dvc(pipeline, "metrics", "show").stdout.splitlines()
    # A terminal of 180 columns (a maximized window; the paths alone take 43) holds it: one row per file.
    assert len(table) == len(files) + 1 and max(map(len, table)) <= 180, "\n".join(table)
    # make results-table puts that same table into docs/results.md, between its markers.
    readme = pipeline / "docs/results.md"
    subprocess.run([sys.executable, "-m", "tools.results_table", "--doc", str(readme)], cwd=pipeline,
                   check=True, capture_output=True)
    section = readme.read_text().split("<!-- metrics-table -->")[1].split("<!-- /metrics-table -->")[0]
    assert table[1] in section and "`dvc metrics show` (" in section
    # The stages' other numbers stay one command away, and their details stay outside the metrics.
    merge = json.loads((pipeline / "reports/metrics/merge.json").read_text())
    assert merge["gates_passed"] == 1 and all(isinstance(v, (int, float)) for v in merge.values())


def test_every_stage_ran_and_its_gates_passed(pipeline):
    base = metrics(pipeline, "base.json")
    assert base["architecture"] == "llama" and base["source_kind"] == "builtin"
    assert 130e6 < base["parameters"] < 140e6 and base["vocab_size"] == 49152
    prep = metrics(pipeline, "prepare.json")
    assert prep["offline_fallback"] is True and prep["train_records"] + prep["val_records"] >= 150
    tuned = metrics(pipeline, "finetune.json")
    assert tuned["steps"] == 1 and tuned["eval_loss"] > 0 and tuned["adapter_max_abs_lora_b"] > 0
    assert metrics(pipeline, "merge.json")["gates_passed"] is True
    assert metrics(pipeline, "consolidate.json")["gates_passed"] is True
    for source in ("base", "finetuned"):
        conv = metrics(pipeline, f"convert/{source}.json")
        assert conv["gates_passed"] is True
    f16 = (pipeline / "models/gguf/finetuned-reference.gguf").stat().st_size
    sizes = [(pipeline / f"models/gguf/finetuned-{q}.gguf").stat().st_size for q in SMALL_QUANTS]
    assert f16 > sizes[0] > sizes[1]
    modelfile = (pipeline / "models/gguf/finetuned-q4_0.Modelfile").read_text().splitlines()
    assert "FROM ./finetuned-q4_0.gguf" in modelfile
    for variant in ("base", "finetuned", *SMALL_QUANTS):
        ev = metrics(pipeline, f"evaluate/{variant}.json")
        assert ev["variant"] == variant
    report = (pipeline / "reports/report.md").read_text()
    assert "Building a website can be done in 10 simple steps:" in report and "q4_0" in report
    # issue 13: the imatrix reaches llama.cpp, the searched recipe fits its budget, the report compares them
    imatrix = metrics(pipeline, "imatrix.json")
    assert imatrix["tensors"] == 210 and imatrix["tokens"] > 0 and imatrix["calibration_source"] == "train"
    # issue 22: the same pass wrote every layer's input covariances (4 distinct inputs a layer) for the -gptq levels
    index = json.loads((pipeline / "models/imatrix/hessians/hessians.json").read_text())
    # four distinct inputs a layer, then the tied head's (the final norm's output) under token_embd's name
    assert index["tokens"] == imatrix["tokens"] and index["layers"] == 30 and len(index["tensors"]) == 4 * 30 + 1
    assert index["tensors"]["token_embd.weight"] == "blk.30.safetensors"
    # bytes on disk: the fp32 payload (the 135M model's widths) plus one small safetensors header per file
    payload = 4 * (30 * (3 * 576**2 + 1536**2) + 576**2)
    assert payload < imatrix["hessian_bytes"] < payload + 31 * 4096
    quant = {q: metrics(pipeline, f"quantize/{q}.json") for q in SMALL_QUANTS}
    assert quant["q4_0"]["imatrix"] == 0 and quant["q4_0-imat"]["imatrix_entries"] == 210
    search = metrics(pipeline, "search.json")
    assert quant["searched"]["recipe"] == 1 and quant["searched"]["file_mib"] <= search["budget_mib"]
    assert "## Quantization: importance matrix" in report and "| q4_0 |" in report
    row = next(line for line in report.splitlines() if line.startswith("| q4_0 | imatrix |"))
    took = [float(x) for x in row.strip("|").split("|")[-2:]]  # quantize s plain, quantize s (the stages' records)
    assert took == [round(quant["q4_0"]["quantize_seconds"]), round(quant["q4_0-imat"]["quantize_seconds"])]


@pytest.mark.repro
def test_second_repro_is_a_noop(pipeline):
    second = dvc(pipeline, "repro")
    assert "Running stage" not in second.stdout, second.stdout


@pytest.mark.repro
def test_param_change_invalidates_exactly_the_downstream_stages(pipeline):
    params = pipeline / "params.yaml"
    original = params.read_text()
    try:
        doc = yaml.safe_load(original)
        doc["finetune"]["lora"]["r"] = 16
        params.write_text(yaml.safe_dump(doc, sort_keys=False))
        # Only finetune is invalidated directly; DVC then reruns what depends on its output, never base,
        # prepare or convert@base.
        assert set(json.loads(dvc(pipeline, "status", "--json").stdout)) == {"finetune"}
    finally:
        params.write_text(original)
    assert json.loads(dvc(pipeline, "status", "--json").stdout) == {}


def test_dvc_plots_render_with_no_network(pipeline, tmp_path):
    """The template .dvc/config names (written by make setup) inlines vega, vega-lite and vega-embed: the page
    DVC writes loads no script from anywhere, and holds the data plots' specs."""
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc/config")
    template = (ROOT / ".dvc" / config["plots"]["html_template"]).resolve()
    assert template == (ROOT / ".venv/dvc-plots.html").resolve() and template.stat().st_size > 500_000
    dvc(pipeline, "plots", "show", "--html-template", str(template), "-o", str(tmp_path / "plots"))
    page = (tmp_path / "plots/index.html").read_text()
    assert "<script src=" not in page and "cdn.jsdelivr" not in page
    assert "window.vegaEmbed=" in page and page.count("vegaEmbed('#") >= 4  # loss, KLD, PPL, speed vs size
    assert '"kld_mean"' in page and '"train_loss"' in page


def test_mlflow_groups_stage_and_variant_runs(pipeline):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{pipeline}/mlflow.db")
    exp = client.get_experiment_by_name("alpaca-lora-cpu")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "pipeline"]
    stages = [r for r in runs if r.data.tags.get("kind") == "stage"]
    assert len(parents) == 1
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in stages)
    names = {r.data.tags["dvc_stage"] for r in stages}
    assert {"base", "prepare", "finetune", "merge", "convert", "quantize", "reference", "evaluate",
            "report"} <= {n.split("@")[0] for n in names}
    assert len([r for r in stages if r.data.tags["dvc_stage"].startswith("evaluate")]) == 2 + len(SMALL_QUANTS)
    assert {"imatrix", "search"} <= names
    prep = next(r for r in stages if r.data.tags["dvc_stage"] == "prepare")
    assert prep.data.params["data.fraction"] == "0.01"
    assert prep.data.tags["source_used"] == "data/sample/alpaca_sample.json"
    assert len(prep.data.tags["git_commit"]) >= 40


def test_mlflow_experiment_opens_on_a_comparison(pipeline):
    """Issue 14: the experiment kind, a parent run spanning the pipeline with params, headline metrics and
    artifacts, evaluation runs sharing their metric keys, and the recommended model in the registry."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{pipeline}/mlflow.db")
    exp = client.get_experiment_by_name("alpaca-lora-cpu")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    parent = client.search_runs([exp.experiment_id], "tags.kind = 'pipeline'")[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED" and len(children) >= 12
    assert parent.info.start_time <= min(c.info.start_time for c in children)
    assert parent.info.end_time >= max(c.info.end_time for c in children)
    assert parent.data.params["finetune.lora.r"] == str(yaml.safe_load(
        (pipeline / "params.yaml").read_text())["finetune"]["lora"]["r"])
    flat = json.loads((pipeline / "reports/metrics/evaluate/q4_0.json").read_text())
    assert parent.data.metrics["q4_0.kld_mean"] == pytest.approx(flat["kld_mean"])
    for v in ("base", "finetuned", *SMALL_QUANTS):
        assert {f"{v}.{k}" for k in ("kld_mean", "ppl", "top1", "size_mb", "gen_tps")} <= set(parent.data.metrics)
    assert parent.data.metrics["eval_loss"] > 0
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "params.yaml", "dvc.lock", "figures", "model"} <= files, files
    evals = [c for c in children if c.data.tags["dvc_stage"].startswith("evaluate")]
    assert len({tuple(sorted(c.data.metrics)) for c in evals}) == 1
    assert {"size_mb", "bits_per_weight", "kld_mean"} <= set(evals[0].data.metrics)
    by_variant = {c.data.params["variant"]: c.data.params for c in evals}
    assert by_variant["q4_0-imat"]["imatrix"] == "True" and by_variant["q4_0"]["imatrix"] == "False"
    assert by_variant["searched"]["recipe"] == "searched" and by_variant["q4_0"]["recipe"] == "none"
    rec = json.loads((pipeline / "reports/metrics/report.details.json").read_text())["recommended"]
    versions = client.search_model_versions("name = 'alpaca-lora-cpu-gguf'")
    assert len(versions) == 1 and versions[0].run_id == parent.info.run_id
    tags = versions[0].tags
    assert tags["type"] == rec["variant"] and float(tags["kld_mean"]) == pytest.approx(rec["kld_mean"], rel=1e-5)
    assert float(tags["size_mb"]) <= 100 and len(tags["git_commit"]) >= 40
    model = {a.path for a in client.list_artifacts(parent.info.run_id, "model")}
    assert model == {f"model/finetuned-{rec['variant']}.gguf", f"model/finetuned-{rec['variant']}.Modelfile"}


def test_make_generate_prints_a_completion(pipeline):
    # -o: the copy has no .venv of its own; the test already runs inside the project's venv.
    proc = subprocess.run(["make", "-o", ".venv/.installed", "generate", "QUANT=q4_0", "N=16"], cwd=pipeline,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.strip()) > 0


def test_dvc_push_pull_round_trip(pipeline, tmp_path):
    before = {p: sha256_file(pipeline / p) for p in ("models/adapter/adapter_model.safetensors",
                                                    "models/gguf/finetuned-q4_0.gguf", "data/prepared/train.jsonl")}
    dvc(pipeline, "remote", "add", "-d", "local", str(tmp_path / "remote"))
    dvc(pipeline, "push")
    # Everything DVC caches goes; the persisted, uncached checkpoint folder stays as on any machine.
    cached = [p for p in (pipeline / "models").iterdir() if p.name != "checkpoints"]
    for p in (*cached, pipeline / "data/prepared", pipeline / ".dvc/cache"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    dvc(pipeline, "pull")
    assert {p: sha256_file(pipeline / p) for p in before} == before
    assert json.loads(dvc(pipeline, "status", "--json").stdout) == {}


@pytest.mark.repro
def test_experiment_shows_in_dvc_and_mlflow(pipeline):
    """The issue's own check: a second LoRA rank as an experiment, seen by DVC and by MLflow."""
    dvc(pipeline, "exp", "run", "finetune", "-S", "finetune.lora.r=16", "--name", "r16")
    # The README's comparison: only what differs, without the per-variant columns; one short table.
    table = dvc(pipeline, "exp", "show", "--only-changed", "--drop", "reports/metrics/evaluate/|[^:]*/[^:]*$",
                "--csv").stdout
    header = table.splitlines()[0].split(",")
    assert "finetune.lora.r" in header and "eval_loss" in header and len(header) <= 16, header
    assert not [h for h in header if "evaluate/" in h or h.startswith(("models/", "data/")) or ":" not in h
                and "/" in h], header  # no per-variant metrics, no dependency hashes
    shown = json.loads(dvc(pipeline, "exp", "show", "--json").stdout)
    ranks = {e["name"]: e["data"]["params"]["params.yaml"]["data"]["finetune"]["lora"]["r"]
             for commit in shown for exp in (commit.get("experiments") or []) for e in exp["revs"]}
    assert ranks.get("r16") == 16, ranks
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{pipeline}/mlflow.db")
    exp = client.get_experiment_by_name("alpaca-lora-cpu")
    runs = client.search_runs([exp.experiment_id], "tags.dvc_exp_name = 'r16' and tags.kind = 'stage'")
    assert len(runs) == 1 and runs[0].data.params["finetune.lora.r"] == "16"
    assert runs[0].data.tags["dvc_stage"] == "finetune" and "eval_loss" in runs[0].data.metrics
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=pipeline, capture_output=True, text=True).stdout
    assert runs[0].data.tags["git_commit"].startswith(head.strip()) and runs[0].data.tags["dvc_lock"]
    # dvc plots diff overlays the experiment on the workspace with the offline template: both revisions' loss
    # curves in one spec, no script loaded from the network.
    out = pipeline / "diff-plots"
    dvc(pipeline, "plots", "diff", "workspace", "r16", "--html-template", str(ROOT / ".venv/dvc-plots.html"),
        "-o", str(out), "--targets", "finetune_loss")
    page = (out / "index.html").read_text()
    assert "<script src=" not in page and '"r16"' in page and '"workspace"' in page


@pytest.fixture(scope="module")
def chat_pipeline(tmp_path_factory, git_identity, tiny_model_dir):
    """The whole pipeline on a ShareGPT-layout copy of the bundled chat sample (multi-turn, system messages), the
    tokenizer's chat template and the tiny model as base: the non-Alpaca path end to end."""
    repo = copy_repo(tmp_path_factory.mktemp("chat") / "repo")
    sample = json.loads((ROOT / "data/sample/chat_sample.json").read_text())
    sharegpt = [{"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                                    "value": m["content"]} for m in c["messages"]]} for c in sample]
    source = repo.parent / "chat.sharegpt.json"
    source.write_text(json.dumps(sharegpt))
    shrink_params(repo, ["q8_0"], {"base": {"model": str(tiny_model_dir)},
                                   "data": {"source": str(source), "format": "sharegpt", "fraction": 1.0},
                                   "prompt": {"template": "chat"}})
    subprocess.run(["git", "commit", "-qam", "chat"], cwd=repo, check=True, capture_output=True)
    dvc(repo, "repro")
    return repo


def test_a_chat_format_dataset_trains_merges_converts_and_evaluates(chat_pipeline):
    prep = metrics(chat_pipeline, "prepare.json")
    assert prep["format_used"] == "sharegpt" and prep["multi_turn"] > 10 and prep["offline_fallback"] is False
    first = json.loads((chat_pipeline / "data/prepared/train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"messages"} and first["messages"][-1]["role"] == "assistant"
    assert metrics(chat_pipeline, "finetune.json")["adapter_max_abs_lora_b"] > 0
    for stage in ("merge.json", "convert/finetuned.json"):
        assert metrics(chat_pipeline, stage)["gates_passed"] is True
    prompts = [json.loads(x) for x in (chat_pipeline / "models/reference/prompts.jsonl").read_text().splitlines()]
    val = [p for p in prompts if p["kind"] == "val"]
    assert val and all(p["prompt"].rstrip().endswith("<|im_start|>assistant") for p in val)
    assert metrics(chat_pipeline, "evaluate/q8_0.json")["kld_mean"] >= 0
    # the Modelfile's template is the chat template's own layout around Ollama's prompt, and stops at its EOS
    modelfile = (chat_pipeline / "models/gguf/finetuned-q8_0.Modelfile").read_text()
    assert "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "### Instruction" not in modelfile
