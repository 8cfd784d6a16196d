"""finetune.processes: when the stage launches accelerate, with what command, and what a wrong launch says."""
from __future__ import annotations

import sys

import pytest
from helpers import ROOT

from alpaca_lora_cpu.errors import StageError
from alpaca_lora_cpu.launch import check_world, config_file, launch_command

CONFIGS = ROOT / "configs/accelerate"


@pytest.mark.parametrize("size,processes,launches", [(1, 1, False), (1, 2, True), (2, 2, False), (8, 8, False)])
def test_launch_only_from_a_plain_run_that_asks_for_processes(monkeypatch, size, processes, launches):
    monkeypatch.setenv("WORLD_SIZE", str(size))
    assert check_world(processes) is launches


@pytest.mark.parametrize("size,processes", [(2, 1), (4, 2)])
def test_a_launcher_with_another_process_count_is_refused(monkeypatch, size, processes):
    monkeypatch.setenv("WORLD_SIZE", str(size))
    with pytest.raises(StageError, match=f"launched with {size} processes but finetune.processes is {processes}"):
        check_world(processes)


def test_one_machine_config_gets_the_count_and_a_port_and_the_same_arguments():
    cmd = launch_command("stages.finetune", ["--params", "p.yaml", "--out", "x"], 3, config_file(CONFIGS, "ddp"),
                         port=4242)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1] == str(CONFIGS / "ddp.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "3" and cmd[cmd.index("--main_process_port") + 1] == "4242"
    assert cmd[-6:] == ["-m", "stages.finetune", "--params", "p.yaml", "--out", "x"]


def test_a_multi_machine_config_keeps_its_own_port(tmp_path):
    cfg = tmp_path / "two.yaml"
    cfg.write_text((CONFIGS / "ddp.yaml").read_text().replace("num_machines: 1", "num_machines: 2"))
    assert "--main_process_port" not in launch_command("stages.finetune", [], 2, cfg)


def test_unknown_config_name_lists_the_choices():
    with pytest.raises(StageError, match=r"nope.yaml does not exist \(choices in .*: ddp, fsdp\)"):
        config_file(CONFIGS, "nope")
