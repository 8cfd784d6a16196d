"""Native code that cannot kill the pipeline: llama.cpp runs (or is tried first) in a child process.

A llama.cpp build can hold kernels that this CPU or VM does not allow (AMX tile instructions under a hypervisor
that hides them: SIGILL), and a bad file or a bug can crash it (SIGSEGV, SIGABRT). In-process, the whole stage
dies with exit -4 and no message of ours, and its MLflow run stays RUNNING. Here:

    call_in_child(fn, *args, file=path, action="quantize")  # fn runs in a fresh spawned process
    preflight(path)   # load the GGUF and run a multi-token and a single-token eval in a child, once per file

A child killed by a signal becomes `NativeCrash`, a `StageError` whose one line names the signal, the file,
the likely cause and the fix. Library only; no work at import time.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alpaca_lora_cpu.errors import StageError

REBUILD = "make setup LLAMA_CMAKE_ARGS=safe"
# Failure injection (tests, `make verify-failure`): a signal name makes every child kill itself with it first, so
# the crash path can be exercised on a CPU where the real fault cannot happen.
FAULT_ENV = "LLAMA_CHILD_FAULT"
# Why each signal usually happens in llama.cpp, and what to do about it.
CAUSES = {
    signal.SIGILL: ("the llama.cpp build uses CPU instructions this machine or VM does not allow (e.g. AMX or "
                    "AVX-512 kernels of a build made for another CPU)",
                    f"rebuild llama-cpp-python with the portable flag set: {REBUILD}"),
    signal.SIGSEGV: ("llama.cpp read invalid memory: a damaged or unsupported GGUF, or a llama.cpp bug",
                     "re-create the file (dvc repro -f the stage that writes it); if it persists, "
                     f"rebuild llama.cpp ({REBUILD})"),
    signal.SIGBUS: ("the memory-mapped file changed or was truncated while llama.cpp read it",
                    "re-create the file and do not write it while it is in use"),
    signal.SIGABRT: ("llama.cpp stopped on an internal check (GGML_ASSERT): an unsupported tensor type or shape, "
                     "or a context too small", "see llama.cpp's message printed just above"),
    signal.SIGFPE: ("llama.cpp did an invalid arithmetic operation (an unsupported shape)",
                    "see llama.cpp's message printed just above"),
    signal.SIGKILL: ("the process was killed from outside, most often by the out-of-memory killer",
                     "free memory or use a smaller model or context"),
}


class NativeCrash(StageError):
    """A child process running native code was killed by a signal."""

    def __init__(self, signum: int, file: str | os.PathLike | None, action: str) -> None:
        self.signum = signum
        super().__init__(crash_message(signum, file, action))


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def crash_message(signum: int, file: str | os.PathLike | None, action: str) -> str:
    """One line: what died, on which file, the likely cause and the fix."""
    cause, fix = CAUSES.get(signum, ("a native crash inside llama.cpp", "see the lines printed above"))
    where = f" on {file}" if file else ""
    return f"llama.cpp died with {signal_name(signum)} while {action}{where}: likely {cause}. Fix: {fix}"


NO_BACKTRACE = "GGML_NO_BACKTRACE"


def quiet_aborts() -> None:
    """ggml's abort handler attaches gdb to print a backtrace, which can hang for ever (ptrace refused, no tty):
    every process that runs llama.cpp sets GGML_NO_BACKTRACE, so an abort is a SIGABRT the parent reports in one
    line (`NativeCrash`), not a stuck stage. ggml reads it when it aborts, so setting it any time before works."""
    os.environ.setdefault(NO_BACKTRACE, "1")


def _child(conn: Any, fn: Callable[..., Any], args: tuple) -> None:
    import resource

    quiet_aborts()

    # A crash is reported by the parent; a core file in the working folder would only be litter.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if os.environ.get(FAULT_ENV):
        signal.raise_signal(signal.Signals[os.environ[FAULT_ENV]])
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as exc:  # noqa: BLE001 — every failure goes back to the parent as one object
        try:
            conn.send(("error", exc))
        except Exception:  # an exception that does not pickle
            conn.send(("error", StageError(f"{type(exc).__name__}: {exc}")))
    finally:
        conn.close()


def call_in_child(fn: Callable[..., Any], *args: Any, file: str | os.PathLike | None = None,
                  action: str = "running") -> Any:
    """`fn(*args)` in a fresh spawned process (not forked: llama.cpp's threads must not be copied); its return
    value, or its exception re-raised here, or `NativeCrash` when a signal killed it. `fn` must be importable."""
    quiet_aborts()  # inherited by the spawned child (and by any process it starts)
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args))  # not daemonic: fn may start children
    proc.start()
    send.close()
    try:
        message = recv.recv()
    except EOFError:  # the child died before it could answer
        message = None
    finally:
        proc.join()
        recv.close()
    if proc.exitcode is not None and proc.exitcode < 0:
        raise NativeCrash(-proc.exitcode, file, action)
    if message is None:
        raise StageError(f"the child process {action}{f' on {file}' if file else ''} exited with code "
                         f"{proc.exitcode} without a result")
    status, value = message
    if status == "error":
        raise value
    return value


def _try_model(path: str) -> int:
    """Load `path` and run what crashes first on a bad build: a multi-token batch, then single-token steps."""
    import llama_cpp

    from alpaca_lora_cpu.llama import captured_stderr

    with captured_stderr() as log:
        try:
            llm = llama_cpp.Llama(path, n_ctx=64, n_batch=32, n_threads=os.cpu_count() or 1, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:  # llama-cpp-python's "Failed to load model from file"
            detail = next((ln for ln in reversed(log) if "error" in ln.lower()), str(exc))
            raise StageError(f"llama.cpp cannot load {path}: {detail.strip()[:200]}") from None
    try:
        n_vocab = llm.n_vocab()
        batch = [llm.token_bos() if llm.token_bos() >= 0 else 0] + [(7 * i + 11) % n_vocab for i in range(15)]
        llm.eval(batch)
        llm.eval([batch[1]])
        llm.eval([batch[2]])
        return len(batch) + 2
    finally:
        llm.close()


def _passed_marker(path: str, mtime_ns: int, size: int) -> Path:
    """Where a passed preflight of this file version under this llama.cpp build is remembered across processes
    (<venv>/preflight/), so each stage does not spawn the same child again for a file an earlier stage tried."""
    import hashlib
    import sys

    build = Path(sys.prefix) / "llama-build.json"
    stamp = build.read_text() if build.is_file() else ""
    key = hashlib.sha256(f"{Path(path).resolve()}\0{mtime_ns}\0{size}\0{stamp}".encode()).hexdigest()[:32]
    return Path(sys.prefix) / "preflight" / key


@functools.lru_cache(maxsize=64)
def _preflight(path: str, mtime_ns: int, size: int) -> None:
    marker = _passed_marker(path, mtime_ns, size)
    if marker.is_file() and not os.environ.get(FAULT_ENV):
        return
    call_in_child(_try_model, path, file=path, action="loading and evaluating")
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{path}\n")
    except OSError:
        pass  # a read-only venv: try again next time


def preflight(path: str | os.PathLike) -> None:
    """Try `path` in llama.cpp in a child first (once per file version and llama.cpp build): a build that faults
    on this CPU or a file that crashes llama.cpp is a one-line `NativeCrash` here, not a dead stage."""
    st = Path(path).stat()
    _preflight(str(path), st.st_mtime_ns, st.st_size)

