"""This machine's CPU as /proc/cpuinfo describes it: the model name and the feature flags, parsed in one place
(make setup's llama.cpp flags, the stamps on measured results, the report's environment). Pass the text to
parse another machine's (tests fake CPUs that way)."""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Cpu:
    model: str
    flags: frozenset[str]


def read(text: str | None = None) -> Cpu:
    """The first CPU listed in /proc/cpuinfo (or in `text`); an unknown model and no flags where it is absent."""
    if text is None:
        try:
            text = CPUINFO.read_text()
        except OSError:
            text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first CPU's line of each key
    return Cpu(fields.get("model name") or platform.processor() or "unknown CPU",
               frozenset(fields.get("flags", "").split()))
