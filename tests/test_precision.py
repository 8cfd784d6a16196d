"""`finetune.precision: auto`: the decision with faked probe results (so it passes on any CPU), and the real
probe once on this machine. bf16 is native on some CPUs and emulated, tens of times slower, on others."""
from __future__ import annotations

import pytest

from alpaca_lora_cpu.training import choose_precision, matmul_gflops


def fake_probe(fp32: float, bf16: float):
    return lambda dtype: {"fp32": fp32, "bf16": bf16}[dtype]


@pytest.mark.parametrize("fp32, bf16, threshold, expected", [
    (74.0, 222.0, 1.3, "bf16"),   # a CPU with native bf16 (AMX): 3x fp32
    (154.0, 1.8, 1.3, "fp32"),    # an AVX2-only CPU: bf16 emulated, 0.01x
    (100.0, 129.0, 1.3, "fp32"),  # just below the threshold: not worth the rounding
    (100.0, 130.0, 1.3, "bf16"),  # at the threshold
])
def test_auto_on_cpu_follows_the_measured_speedup(fp32, bf16, threshold, expected):
    chosen, info = choose_precision("auto", threshold, cuda=False, probe=fake_probe(fp32, bf16), processes=1)
    assert chosen == expected
    assert info["precision_probe_fp32_gflops"] == fp32 and info["precision_probe_bf16_gflops"] == bf16
    assert info["precision_probe_bf16_speedup"] == pytest.approx(bf16 / fp32)
    assert info["precision_probe_cuda"] == 0


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda_is_bf16_where_supported_else_fp16(supported, expected):
    def no_probe(dtype):
        raise AssertionError("no CPU probe on CUDA")

    assert choose_precision("auto", 1.3, cuda=True, bf16_on_cuda=supported, probe=no_probe) == \
        (expected, {"precision_probe_cuda": 1})


@pytest.mark.parametrize("requested", ["fp32", "bf16", "fp16"])
def test_an_explicit_precision_is_kept_and_nothing_is_probed(requested):
    def no_probe(dtype):
        raise AssertionError("probed")

    assert choose_precision(requested, 1.3, cuda=False, probe=no_probe, processes=1) == (requested, {})


def test_the_real_probe_measures_both_dtypes():
    assert matmul_gflops("fp32", rows=128, repeats=2) > 0
    assert matmul_gflops("bf16", rows=128, repeats=2) > 0


@pytest.mark.slow
@pytest.mark.parametrize("threshold, expected", [(1e-6, "bf16"), (1e6, "fp32")])
def test_finetune_stage_records_the_auto_choice(tmp_path, tiny_model_dir, threshold, expected):
    """The stage with `precision: auto` and a threshold that forces each answer on any CPU: the choice and the
    probe's numbers reach the metrics JSON and the MLflow run."""
    import json

    import mlflow
    from helpers import finetune, setup_run

    cwd, args = setup_run(tmp_path, tiny_model_dir, precision="auto", bf16_min_speedup=threshold, max_steps=2)
    proc = finetune(cwd, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "finetune.details.json").read_text())
    assert m["precision_bf16"] == int(expected == "bf16") and m["precision_fp16"] == 0
    assert m["precision_probe_fp32_gflops"] > 0 and m["precision_probe_bf16_gflops"] > 0
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd}/mlflow.db")
    exp = client.get_experiment_by_name("alpaca-lora-cpu")
    (run,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("kind") == "stage"]
    assert run.data.tags["precision"] == expected
    # The probe's numbers travel with the run in its details artifact (its metrics are the few flat ones).
    assert "finetune.details.json" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert set(run.data.metrics) >= {"eval_loss", "ppl"}


def test_auto_with_several_cpu_processes_stays_fp32_without_probing():
    def no_probe(dtype):
        raise AssertionError("each rank would probe on its own")

    assert choose_precision("auto", 1.3, cuda=False, probe=no_probe, processes=2) == \
        ("fp32", {"precision_probe_cuda": 0})
