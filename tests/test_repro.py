"""Reproducibility: the same seed gives identical sampled data (sha256) and an adapter equal within 1e-6 on
CPU. (No-op second repro, downstream-only reruns and experiments: tests/test_pipeline.py.)"""
from __future__ import annotations

import pytest
from helpers import finetune, make_records, setup_run, write_records

from alpaca_lora_cpu.config import DataParams
from stages.prepare import run as prepare

pytestmark = [pytest.mark.slow, pytest.mark.repro]


def test_same_seed_same_sample_bytes(tmp_path):
    src = write_records(tmp_path / "d.json", make_records(300))
    params = DataParams(source=str(src), format="alpaca", fraction=0.1, seed=3, val_size=0.1, max_samples=None,
                        on_invalid="drop")
    a, b = prepare(params, tmp_path / "a"), prepare(params, tmp_path / "b")
    assert a["sha256"] == b["sha256"]
    other = prepare(DataParams(**{**params.__dict__, "seed": 4}), tmp_path / "c")
    assert other["sha256"] != a["sha256"]


def test_same_seed_same_adapter_within_1e_6(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    adapters = []
    for name in ("one", "two"):
        work = tmp_path / name
        work.mkdir()
        cwd, args = setup_run(work, tiny_model_dir)
        proc = finetune(cwd, args)
        assert proc.returncode == 0, proc.stderr[-2000:]
        adapters.append(load_file(work / "adapter/adapter_model.safetensors"))
    one, two = adapters
    assert one.keys() == two.keys() and any(k.endswith("lora_B.weight") for k in one)
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst <= 1e-6, f"adapters differ by {worst}"
    assert any(one[k].abs().max().item() > 0 for k in one if "lora_B" in k)
