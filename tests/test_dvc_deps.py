"""dvc.yaml declares exactly the project modules a stage runs or imports (stages/ and the library), so editing
one reruns that stage and nothing else."""
from __future__ import annotations

import ast
import re

import yaml
from helpers import ROOT

LIB = "alpaca_lora_cpu"
FOLDERS = {"stages": ROOT / "stages", LIB: ROOT / "src" / LIB}


def module_file(package: str, name: str) -> str:
    return str((FOLDERS[package] / f"{name}.py").relative_to(ROOT))


def stage_modules(module: str) -> set[str]:
    """Project files `stages.<module>` imports, directly or through other project modules (lazy imports too)."""
    seen: set[tuple[str, str]] = set()
    todo = [("stages", module)]
    while todo:
        item = todo.pop()
        if item in seen:
            continue
        seen.add(item)
        tree = ast.parse((FOLDERS[item[0]] / f"{item[1]}.py").read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module in FOLDERS:
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] in FOLDERS and len(parts) > 1 and (FOLDERS[parts[0]] / f"{parts[1]}.py").is_file():
                    todo.append((parts[0], parts[1]))
    return {module_file(*item) for item in seen}


def declared(body: dict) -> set[str]:
    return {d for d in body["deps"] if d.startswith(("stages/", f"src/{LIB}/"))}


def test_every_stage_declares_exactly_the_modules_it_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    checked = 0
    for name, stage in stages.items():
        body = stage.get("do", stage)
        module = re.search(r"-m stages\.(\w+)", body["cmd"]).group(1)
        missing = stage_modules(module) - declared(body)
        assert not missing, f"dvc.yaml stage {name!r} imports {sorted(missing)} but does not list them in deps"
        extra = declared(body) - stage_modules(module)
        assert not extra, f"dvc.yaml stage {name!r} lists {sorted(extra)}, which it never imports (needless reruns)"
        checked += 1
    assert checked == len(stages) >= 9


def test_the_import_walk_sees_library_modules():
    """The check above is only as good as this walk: quantize reaches native through llama."""
    found = stage_modules("quantize")
    assert {"stages/quantize.py", f"src/{LIB}/llama.py", f"src/{LIB}/native.py", f"src/{LIB}/errors.py"} <= found
