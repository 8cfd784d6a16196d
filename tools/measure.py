"""Run a command and measure what it costs: wall time, and the peak memory of its whole process tree, sampled from
/proc (anonymous memory, the part a stage allocates itself, and total RSS, which also counts mapped model
files). Where this machine has a writable cgroup-v1 memory controller the command can run under a memory limit
too, which proves it fits that much RAM (a command over the limit is killed: `oom`). Used by make bench-scale
and the memory tests; no stage depends on it.

    m = measure(["python", "-m", "stages.merge", ...], cwd=work, limit=4 * 2**30)
    m.seconds, m.peak_anon, m.peak_rss, m.cgroup_peak, m.oom
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CGROUP_V1 = Path("/sys/fs/cgroup/memory")


@dataclass
class Measured:
    returncode: int
    seconds: float
    peak_anon: int          # bytes: the largest sum of RssAnon over the process tree seen
    peak_rss: int           # bytes: the same for VmRSS (anonymous + file-backed pages, e.g. a mapped GGUF)
    cgroup_peak: int | None  # bytes: the cgroup's max_usage_in_bytes (page cache included), when one was used
    limit: int | None
    oom: bool
    stdout: str
    stderr: str


def _status(pid: int) -> dict[str, int]:
    """RssAnon, VmRSS, VmSize (bytes) and PPid of a process; {} once it is gone."""
    keys = {"RssAnon:": "anon", "VmRSS:": "rss", "VmSize:": "size", "PPid:": "ppid"}
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = keys.get(line.split(maxsplit=1)[0] if line else "")
            if key:
                value = int(line.split()[1])
                out[key] = value if key == "ppid" else value * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def _tree_memory(pids: list[int]) -> tuple[int, int]:
    """(Σ RssAnon, Σ VmRSS) over the tree, each address space counted once. A child between fork/vfork and exec
    (subprocess, and ctypes.util.find_library's `ldconfig` call, vfork the stage) reports its parent's pages as
    its own: counting them again doubled a stage's measured peak whenever a sample fell in that window."""
    status = {pid: _status(pid) for pid in pids}
    anon = rss = 0
    for pid, st in status.items():
        if not st:
            continue
        parent = status.get(st.get("ppid", -1))
        if parent and all(parent.get(k) == st.get(k) for k in ("size", "anon")) and _exe(pid) == _exe(st["ppid"]):
            continue  # the parent's own memory, seen through the child that has not exec'd yet
        anon, rss = anon + st.get("anon", 0), rss + st.get("rss", 0)
    return anon, rss


def _tree(pid: int) -> list[int]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [pid, *(p.pid for p in root.children(recursive=True))]
    except psutil.Error:
        return []


def cgroup_available() -> bool:
    """A cgroup-v1 memory controller this process may create children in."""
    probe = CGROUP_V1 / f"alc-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
        return True
    except OSError:
        return False


def measure(cmd: list[str], cwd: str | Path | None = None, env: dict | None = None, limit: int | None = None,
            interval: float = 0.05, timeout: float | None = None) -> Measured:
    """Run `cmd`, sampling its tree's memory every `interval` s; under a cgroup memory `limit` when given (and
    the machine has one: else the limit is not enforced, and `limit` in the result is None)."""
    group = None
    if limit is not None and cgroup_available():
        group = CGROUP_V1 / f"alc-{os.getpid()}-{time.monotonic_ns()}"
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
        try:  # no swap here, but where there is, the limit must cover it too
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
        except OSError:
            pass

    def enter() -> None:
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    peak = [0, 0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=enter)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            anon, rss = _tree_memory(_tree(proc.pid))
            peak[0], peak[1] = max(peak[0], anon), max(peak[1], rss)
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        done.set()
        sampler.join()
    seconds = time.perf_counter() - t0
    cgroup_peak, oom = None, False
    if group is not None:
        cgroup_peak = int((group / "memory.max_usage_in_bytes").read_text())
        oom = "oom_kill 0" not in (group / "memory.oom_control").read_text() or proc.returncode == -9
        for _ in range(50):  # the tree's last members leave the group as they exit
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    return Measured(proc.returncode, seconds, peak[0], peak[1], cgroup_peak, limit if group else None, oom, out,
                    err)
