"""dvc.yaml declares exactly the project modules a stage runs or imports (stages/ and the library), so editing
one reruns that stage and nothing else."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml
from helpers import ROOT

LIB = "alpaca_lora_cpu"
ROOTS = {"stages": ROOT, LIB: ROOT / "src"}  # where each top-level project package lives


def module_file(dotted: str) -> Path | None:
    """The project file of a dotted module name (a module or a package's __init__), None outside the project."""
    parts = dotted.split(".")
    if parts[0] not in ROOTS:
        return None
    base = ROOTS[parts[0]].joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported(node: ast.AST) -> list[str]:
    """Dotted names an import statement may load (for `from a import b`, both a and a.b)."""
    if isinstance(node, ast.ImportFrom) and node.module:
        return [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return []


def stage_modules(module: str) -> set[str]:
    """Project files `stages.<module>` imports, directly or through other project modules (lazy imports too);
    a package's __init__.py counts where it is imported, and so do the parents of every module loaded."""
    seen: set[Path] = set()
    todo = [module_file(f"stages.{module}")]
    while todo:
        path = todo.pop()
        if path is None or path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            for name in imported(node):
                parts = name.split(".")
                todo += [module_file(".".join(parts[:i])) for i in range(2, len(parts) + 1)]
    return {str(p.relative_to(ROOT)) for p in seen}


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
    # a package's modules, and the package itself (report's parts live in alpaca_lora_cpu/report/)
    assert {f"src/{LIB}/report/__init__.py", f"src/{LIB}/report/targets.py"} <= stage_modules("report")
