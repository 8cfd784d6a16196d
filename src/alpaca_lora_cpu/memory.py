"""The memory a stage may use: the cgroup's limit (v1 or v2) less what the cgroup already holds, or MemAvailable,
whichever is less; ALPACA_LORA_CPU_MEMORY=16GB makes the plan and every stage's check act as if the machine had
that much (to plan for a smaller machine, and in tests). Read at stage start, cheaply: no measurement."""
from __future__ import annotations

import os
from pathlib import Path

MEMORY_ENV = "ALPACA_LORA_CPU_MEMORY"  # e.g. "16GB": plan and check as if the machine had this much


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup() -> tuple[int | None, int | None]:
    """(limit, the anonymous memory it holds now) of this process's memory cgroup (v1 or v2), or Nones."""
    v2 = Path("/sys/fs/cgroup/memory.max")
    try:
        if v2.is_file():
            raw = v2.read_text().strip()
            stat = dict(line.split() for line in Path("/sys/fs/cgroup/memory.stat").read_text().splitlines())
            return (None if raw == "max" else int(raw)), int(stat.get("anon", 0))
        v1 = Path("/sys/fs/cgroup/memory")
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                folder = next((f for f in (v1 / path.lstrip("/"), v1) if (f / "memory.limit_in_bytes").is_file()),
                              None)
                if folder is None:
                    return None, None
                limit = int((folder / "memory.limit_in_bytes").read_text())
                stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
                return (limit if limit < 2**60 else None), int(stat.get("total_rss", stat.get("rss", 0)))
    except (OSError, ValueError):
        pass
    return None, None


def parse_bytes(text: str) -> int:
    from alpaca_lora_cpu.shards import parse_size

    return parse_size(text)


def memory_limit() -> int:
    """The most memory this machine gives a stage: the cgroup limit or the RAM, or ALPACA_LORA_CPU_MEMORY."""
    if os.environ.get(MEMORY_ENV):
        return parse_bytes(os.environ[MEMORY_ENV])
    limit, _ = _cgroup()
    total = _meminfo("MemTotal") or 0
    return min(x for x in (limit, total) if x) if (limit or total) else 0


def available_memory() -> int:
    """What a stage starting now may still use (ALPACA_LORA_CPU_MEMORY overrides it, for planning and tests)."""
    if os.environ.get(MEMORY_ENV):
        return parse_bytes(os.environ[MEMORY_ENV])
    limit, held = _cgroup()
    free = _meminfo("MemAvailable") or memory_limit()
    return min(free, limit - held) if limit else free


def _libc():
    """The C library already loaded in this process (dlopen(NULL)). Not ctypes.util.find_library: on Linux that
    runs `ldconfig -p` in a subprocess on every call, i.e. a vfork of the whole stage for each trimmed layer."""
    import ctypes

    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def steady_heap() -> None:
    """Serve every allocation of 1 MiB or more (each tensor a stage streams) with its own mapping, so freeing it
    hands it back at once. glibc otherwise raises that threshold after the first large free, and later tensors
    land in a heap that keeps its holes: a stage's peak would then vary by hundreds of MB from run to run."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def trim() -> None:
    """Hand the heap pages freed tensors leave behind back to the OS (glibc keeps them otherwise, so a stage that
    streams layer after layer would look, and count, as if it held them all)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc only
        libc.malloc_trim(0)
