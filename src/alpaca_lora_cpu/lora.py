"""A PEFT LoRA adapter as plain tensors: for each target module its A, B and scale, so the merge can fold it into
one base tensor at a time (W + scale · B A, in fp32, as PEFT's `merge_and_unload` computes it) and the merge gate
can run it unmerged (layerwise.Lora). The adapter is small (MBs), read whole; the base never is.

Read from `adapter_config.json` and `adapter_model.safetensors` as PEFT writes them: scale = lora_alpha / r
(lora_alpha / √r with `use_rslora`), per-module r and alpha from `rank_pattern` / `alpha_pattern` matched as PEFT
matches them. Options that change what a merge means (DoRA, fan_in_fan_out, trained biases, modules_to_save) are
refused in one line rather than merged wrong.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alpaca_lora_cpu.errors import StageError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
UNSUPPORTED = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out", "modules_to_save": "modules_to_save"}


@dataclass(frozen=True)
class Adapter:
    folder: Path
    config: dict
    modules: dict[str, tuple[Any, Any, float]]  # HF module name → (A (r × in), B (out × r), scale)

    def delta(self, module: str) -> Any:
        """scale · B A in fp32: what the merge adds to `module`'s weight."""
        a, b, scale = self.modules[module]
        return (b.float() @ a.float()) * scale


def read_config(folder: Path) -> dict:
    path = folder / CONFIG
    if not folder.is_dir():
        raise StageError(f"adapter folder {folder} not found (run the finetune stage first)")
    if not path.is_file():
        raise StageError(f"adapter {folder}: {CONFIG} missing (not a PEFT adapter folder)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise StageError(f"adapter {path} is corrupt: not valid JSON") from exc
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        got = cfg.get("peft_type") if isinstance(cfg, dict) else cfg
        raise StageError(f"adapter {path}: peft_type must be LORA, got {got!r}")
    for key, what in UNSUPPORTED.items():
        if cfg.get(key):
            raise StageError(f"adapter {path}: {what} ({key}: {cfg[key]!r}) is not supported by the merge")
    if cfg.get("bias", "none") != "none":
        raise StageError(f"adapter {path}: trained biases (bias: {cfg['bias']!r}) are not supported by the merge")
    if not (folder / WEIGHTS).is_file():
        raise StageError(f"adapter {folder}: {WEIGHTS} missing")
    return cfg


def _pattern(cfg: dict, key: str, module: str, default: Any) -> Any:
    """A per-module value of `rank_pattern` / `alpha_pattern`, matched as PEFT matches it, or the default."""
    from peft.utils.other import get_pattern_key

    patterns = cfg.get(key) or {}
    return patterns.get(get_pattern_key(list(patterns), module), default) if patterns else default


def _scale(cfg: dict, module: str, r: int) -> float:
    alpha = _pattern(cfg, "alpha_pattern", module, cfg.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def read(folder: str | Path) -> Adapter:
    """The adapter's modules with their scale, each rank checked against the config. One-line StageError for a
    damaged, inconsistent or unsupported adapter."""
    from alpaca_lora_cpu.openers import load_safetensors

    folder = Path(folder)
    cfg = read_config(folder)
    tensors = load_safetensors(folder / WEIGHTS, "adapter weights")
    pairs: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        for part in ("lora_A", "lora_B"):
            if f".{part}." in key:
                module = key.removeprefix(PEFT_PREFIX).split(f".{part}.")[0]
                pairs.setdefault(module, {})[part] = t
    modules = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise StageError(f"adapter {folder / WEIGHTS}: {module} has only {', '.join(ab)}")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise StageError(f"adapter {folder / WEIGHTS}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                             "which do not multiply")
        r = _pattern(cfg, "rank_pattern", module, cfg.get("r"))
        if r != a.shape[0]:
            raise StageError(f"adapter {folder}: {CONFIG} gives {module} rank r={r}, but its weights have rank "
                             f"{a.shape[0]} (the config and {WEIGHTS} come from different runs?)")
        modules[module] = (a, b, _scale(cfg, module, r))
    if not modules:
        raise StageError(f"adapter {folder}: {WEIGHTS} holds no LoRA weights")
    return Adapter(folder, cfg, modules)
