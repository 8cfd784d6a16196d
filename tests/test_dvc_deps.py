"""dvc.yaml declares every project module a stage runs or imports, so editing one reruns that stage."""
from __future__ import annotations

import ast
import re

import yaml

from tests.conftest import ROOT


def stage_modules(module: str) -> set[str]:
    """stages/*.py files `module` imports, directly or through other project modules (lazy imports too)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((ROOT / "stages" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "stages":
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stages."):
                todo.append(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                todo += [a.name.split(".")[1] for a in node.names if a.name.startswith("stages.")]
    return {f"stages/{name}.py" for name in seen}


def test_every_stage_declares_the_modules_it_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    checked = 0
    for name, stage in stages.items():
        body = stage.get("do", stage)
        module = re.search(r"-m stages\.(\w+)", body["cmd"]).group(1)
        declared = {d for d in body["deps"] if d.startswith("stages/")}
        missing = stage_modules(module) - declared
        assert not missing, f"dvc.yaml stage {name!r} imports {sorted(missing)} but does not list them in deps"
        extra = declared - stage_modules(module)
        assert not extra, f"dvc.yaml stage {name!r} lists {sorted(extra)}, which it never imports (needless reruns)"
        checked += 1
    assert checked == len(stages) >= 9
