"""Data-parallel training from params, not from the command line: with `finetune.processes` > 1 the finetune
stage starts itself again under `accelerate launch`, so `dvc exp run -S finetune.processes=8` needs no edit of
dvc.yaml. The accelerate config is `<configs dir>/<finetune.accelerate_config>.yaml` (configs/accelerate/).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from alpaca_lora_cpu.errors import StageError


def world() -> tuple[int, int]:
    """(rank, world size) as set by `accelerate launch` / torchrun; (0, 1) for a plain run."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def config_file(configs: Path, name: str) -> Path:
    path = configs / f"{name}.yaml"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in configs.glob("*.yaml"))) or "none"
        raise StageError(f"finetune.accelerate_config: {path} does not exist (choices in {configs}: {choices})")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(module: str, argv: list[str], processes: int, config: Path, port: int | None = None) -> list[str]:
    """`accelerate launch` of `python -m module argv` on `processes` processes. On one machine the rendezvous port
    is a free one (two runs at once must not collide); a multi-machine config keeps its own."""
    try:
        machines = int((yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("num_machines", 1))
    except (OSError, yaml.YAMLError, TypeError, ValueError) as exc:
        raise StageError(f"{config}: not a readable accelerate config: {exc}") from exc
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--num_processes", str(processes)]
    if machines == 1:
        cmd += ["--main_process_port", str(port or free_port())]
    return [*cmd, "-m", module, *argv]


def check_world(processes: int) -> bool:
    """True when this process must launch the others (processes > 1, no launcher yet). Under a launcher, its
    process count must be finetune.processes: the batch arithmetic and the checkpoints' identity rest on it."""
    size = world()[1]
    if size == 1 and processes > 1:
        return True
    if size != processes:
        raise StageError(f"launched with {size} processes but finetune.processes is {processes}: set "
                         f"-S finetune.processes={size}, or run the stage plainly and let it launch accelerate")
    return False


def relaunch(module: str, argv: list[str], processes: int, config: Path) -> int:
    """Run the stage under accelerate and wait; its exit status."""
    cmd = launch_command(module, argv, processes, config)
    print(f"launching {processes} processes: {' '.join(cmd)}", file=sys.stderr, flush=True)
    return subprocess.run(cmd).returncode
