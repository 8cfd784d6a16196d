"""Atomic outputs: all or nothing, stale staging copies cleared, unwritable folders reported in one line."""
from __future__ import annotations

import pytest

from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.files import atomic_path, write_json


def test_failed_write_leaves_old_output_intact(tmp_path):
    target = tmp_path / "out"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "a.txt").write_text("new, half")
            raise RuntimeError("crash mid-way")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_directory_is_replaced_whole(tmp_path):
    target = tmp_path / "out"
    for files in (["a", "b"], ["c"]):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            for f in files:
                (tmp / f).write_text(f)
    assert sorted(p.name for p in target.iterdir()) == ["c"]


def test_stale_staging_copies_are_cleared(tmp_path):
    stale = tmp_path / ".out.abc123.tmp"
    stale.mkdir()
    (stale / "junk").write_text("x")
    write_json(tmp_path / "out", {"a": 1})
    assert not stale.exists() and (tmp_path / "out").read_text().strip().startswith("{")


def test_uncreatable_folder_is_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StageError, match="cannot create output folder"):
        write_json(blocker / "sub" / "m.json", {})
