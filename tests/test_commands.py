"""Each stage's command line is written once, in dvc.yaml: every stage module's docstring shows one of its dvc.yaml
instances exactly, the entry-point tests take the stages' options from there, and alpaca_lora_cpu/variants.py
names the same variants and GGUF files as dvc.yaml's evaluate stages."""
from __future__ import annotations

import ast

from helpers import ROOT, dvc_commands

from alpaca_lora_cpu.variants import evaluate_stage, gguf_path, names


def docstring_command(module: str) -> str:
    """The `python -m stages.<module> …` command in a stage module's docstring, continuation lines joined."""
    doc = ast.get_docstring(ast.parse((ROOT / "stages" / f"{module}.py").read_text()))
    start = doc.index(f"python -m stages.{module}")
    lines = doc[start:].splitlines()
    command = [lines[0]]
    while command[-1].rstrip().endswith("\\"):
        command.append(lines[len(command)])
    return " ".join(" ".join(command).replace("\\", " ").split())


def test_every_stage_docstring_shows_its_dvc_command():
    commands = dvc_commands()
    modules = sorted(p.stem for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__")
    assert len(modules) >= 12
    for module in modules:
        mine = [c for c in commands.values() if c.startswith(f"python -m stages.{module} ")]
        assert mine, f"stages/{module}.py is no dvc.yaml stage"
        assert docstring_command(module) in mine, (
            f"stages/{module}.py's docstring runs\n  {docstring_command(module)}\nbut dvc.yaml runs\n  {mine[0]}")


def test_variants_agree_with_the_evaluate_stages():
    import yaml

    types = yaml.safe_load((ROOT / "params.yaml").read_text())["quantize"]["types"]
    commands = dvc_commands()
    evaluated = {k: c for k, c in commands.items() if "-m stages.evaluate " in c}
    assert set(evaluated) == {evaluate_stage(v) for v in names(types)}
    for v in names(types):
        assert f"--variant {v} --gguf {gguf_path(v)} " in commands[evaluate_stage(v)]
    # what quantize and convert write is what evaluate reads
    written = {c.split("--out ")[1].split()[0] for k, c in commands.items() if k.startswith(("quantize@", "convert@"))}
    assert {gguf_path(v) for v in names(types)} == written
