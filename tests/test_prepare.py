"""prepare: validation, deterministic sampling, offline fallback, and one-line errors."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
from helpers import ROOT, make_records, run_module, write_records

from alpaca_lora_cpu.config import DataParams
from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.records import load_source, validate
from stages.prepare import run, sample_split


def params(source: str, **kw) -> DataParams:
    base = dict(source=source, format="alpaca", fraction=0.5, seed=1, val_size=0.2, max_samples=None,
                on_invalid="drop")
    return DataParams(**{**base, **kw})


def test_validate_counts_each_reason():
    good = make_records(3)
    recs = good + [
        {"output": "x"},                                   # missing instruction
        {"instruction": 3, "output": "x"},                 # wrong type
        {"instruction": "a", "input": ["l"], "output": "x"},  # wrong type (input)
        {"instruction": "a", "output": "   "},             # empty output
        dict(good[0]),                                     # duplicate
        "not a dict",                                      # wrong type (record)
    ]
    kept, dropped, first = validate(recs, "alpaca", "drop")
    assert kept == good
    assert dict(dropped) == {"missing_field": 1, "wrong_type": 3, "empty_output": 1, "bad_roles": 0, "duplicate": 1}
    assert first == "record 3: missing field ('instruction')"


def test_validate_error_mode_names_record_and_field():
    with pytest.raises(StageError, match=r"record 1: wrong type \('output'\)"):
        validate([make_records(1)[0], {"instruction": "a", "output": 5}], "alpaca", "error")


def test_sampling_is_deterministic_and_disjoint():
    recs = make_records(100)
    a = sample_split(recs, params("x", seed=7), take_all=False)
    b = sample_split(recs, params("x", seed=7), take_all=False)
    c = sample_split(recs, params("x", seed=8), take_all=False)
    assert a == b and a != c
    train, val = a
    assert len(train) + len(val) == 50 and len(val) == 10
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in val}


def test_max_samples_caps_the_sample():
    train, val = sample_split(make_records(100), params("x", fraction=1.0, max_samples=20), take_all=False)
    assert len(train) + len(val) == 20


def test_run_outputs_are_byte_identical(tmp_path):
    src = write_records(tmp_path / "a.json", make_records(40))
    m1 = run(params(str(src)), tmp_path / "o1")
    m2 = run(params(str(src)), tmp_path / "o2")
    for name in ("train.jsonl", "val.jsonl", "manifest.json"):
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes()
    assert m1["sha256"] == m2["sha256"] and m1["train_records"] == 16 and m1["val_records"] == 4
    row = json.loads((tmp_path / "o1" / "train.jsonl").read_text().splitlines()[0])
    assert set(row) == {"instruction", "input", "output"}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_other_local_formats(tmp_path, suffix):
    recs = make_records(10)
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(recs), path)
    assert load_source(str(path)).records == recs


def test_hub_unreachable_falls_back_to_bundled_sample(monkeypatch):
    import alpaca_lora_cpu.records as prepare

    def offline(_):
        raise ConnectionError("Couldn't reach 'yahma/alpaca-cleaned' on the Hub")

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(prepare, "hub_reachable", lambda: True)  # reachable probe, then a failing download
    monkeypatch.setattr(prepare, "read_hub", offline)
    loaded = load_source("yahma/alpaca-cleaned")
    assert loaded.fallback and loaded.source_used == "data/sample/alpaca_sample.json"
    assert len(loaded.records) >= 150


def test_offline_probe_skips_the_hub_entirely(monkeypatch):
    import alpaca_lora_cpu.records as prepare

    def never(_):
        raise AssertionError("the Hub must not be called when the probe says offline")

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(prepare, "read_hub", never)
    assert load_source("yahma/alpaca-cleaned").fallback


def test_hub_other_errors_are_not_masked(monkeypatch):
    import alpaca_lora_cpu.records as prepare

    def missing(_):
        raise FileNotFoundError("Dataset 'nobody/nothing' doesn't exist on the Hub")

    monkeypatch.setattr(prepare, "hub_reachable", lambda: True)
    monkeypatch.setattr(prepare, "read_hub", missing)
    with pytest.raises(StageError, match="cannot load from the Hugging Face Hub"):
        load_source("nobody/nothing")


def test_offline_heldout_records_go_to_validation_only(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_source("yahma/alpaca-cleaned")
    heldout = json.loads((ROOT / "data/sample/alpaca_heldout.json").read_text())
    assert len(loaded.heldout) == len(heldout) >= 40 and validate(heldout, "alpaca", "error")[0] == heldout
    # one held-out record that repeats a training record must not count as held out
    leaked = replace(loaded, heldout=(*loaded.heldout, loaded.records[0]))
    manifest = run(params("yahma/alpaca-cleaned", fraction=0.01, val_size=0.1), tmp_path / "out", leaked)
    train = [json.loads(x) for x in (tmp_path / "out/train.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (tmp_path / "out/val.jsonl").read_text().splitlines()]
    assert manifest["heldout_records"] == len(heldout) and manifest["train_records"] == len(loaded.records) - 18
    assert val[-len(heldout):] == heldout and len(val) == 18 + len(heldout)
    assert not {json.dumps(r, sort_keys=True) for r in train} & {json.dumps(r, sort_keys=True) for r in val}


def test_bundled_sample_is_valid_alpaca():
    recs = json.loads((ROOT / "data/sample/alpaca_sample.json").read_text())
    kept, dropped, _ = validate(recs, "alpaca", "error")
    assert len(kept) == len(recs) >= 150 and sum(dropped.values()) == 0
    with_input = sum(bool(r["input"]) for r in recs)
    assert 0.25 < with_input / len(recs) < 0.42


@pytest.mark.parametrize("content, needle", [
    (None, "file not found"),
    ("{not json", "cannot read"),
    ('{"a": 1}', "expected a JSON list"),
    ('[{"question": "q", "answer": "a"}]', r"no valid Alpaca records .*record 0: missing field \('instruction'\)"),
    ("[]", "no valid Alpaca records"),
])
def test_bad_sources_fail_with_one_line_and_write_nothing(tmp_path, content, needle):
    src = tmp_path / "in.json"
    if content is not None:
        src.write_text(content)
    (tmp_path / "params.yaml").write_text(
        (ROOT / "params.yaml").read_text().replace("source: yahma/alpaca-cleaned", f"source: {src}"))
    proc = run_module("stages.prepare", "--params", str(tmp_path / "params.yaml"), "--out",
                      str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json"), cwd=ROOT,
                      env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    import re

    assert re.search(needle, last), last
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()
