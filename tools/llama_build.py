"""Build llama-cpp-python for this CPU on purpose, probe the build, and fall back to safer flags if it faults.

Run by `make setup` (override: `make setup LLAMA_CMAKE_ARGS="-DGGML_AVX2=ON ..."`, or `=safe`, or `=auto`):
    python -m tools.llama_build [--cmake-args auto|safe|"<cmake args>"]

llama-cpp-python's default build is `-march=native`, which also compiles ggml's AMX kernels where the CPU
lists AMX; under some hypervisors those fault (SIGILL) on the first multi-token eval of a quantized model.
So the flags are derived from /proc/cpuinfo with GGML_NATIVE off and AMX always off. After the build a probe
runs in a child process: a tiny GGUF made on the spot, quantized to q8_0, q4_0 and q4_k_m, each given a
multi-token eval. If a signal kills the probe, the next, safer flag set is built and probed (derived → x86-64-v3
→ no SIMD extensions). Wheels are cached per (version, flags) under LLAMA_WHEEL_CACHE (default
~/.cache/alpaca-lora-cpu/llama-cpp-python), so a second clone installs in seconds; the choice, the build time
and `llama_print_system_info()` are written to <venv>/llama-build.json, which stages log to MLflow and the
report shows.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from alpaca_lora_cpu.cpu import read as read_cpu

VERSION_FILE = Path("requirements.lock")
RECORD = Path(sys.prefix) / "llama-build.json"
PROBE_LOG = Path(sys.prefix) / "llama-probe.log"  # llama.cpp's own output during the probe
BUILD_LOG = Path(sys.prefix) / "llama-build.log"  # pip's and CMake's output during the build
# ggml CMake option → the /proc/cpuinfo flags it needs (GGML_AVX512 compiles with -mavx512{f,cd,vl,dq,bw}).
FEATURES: list[tuple[str, tuple[str, ...]]] = [
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("GGML_AVX512_VBMI", ("avx512vbmi",)),
    ("GGML_AVX512_VNNI", ("avx512_vnni",)),
    ("GGML_AVX512_BF16", ("avx512_bf16",)),
]
# x86-64-v3: what nearly every x86 server of the last decade runs, and no kernel needs OS or VM cooperation.
PORTABLE = {"GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2"}
# AMX tiles need the kernel (and the hypervisor) to enable XTILEDATA: never compiled in.
ALWAYS_OFF = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
PROBE_TYPES = ("q8_0", "q4_0", "q4_k_m")


@dataclass(frozen=True)
class Candidate:
    name: str            # derived | safe | baseline | override
    cmake_args: tuple[str, ...]

    @property
    def line(self) -> str:
        return " ".join(self.cmake_args)


def _args(enabled: set[str]) -> tuple[str, ...]:
    opts = [f"-D{opt}={'ON' if opt in enabled else 'OFF'}" for opt, _ in FEATURES]
    return ("-DGGML_NATIVE=OFF", *opts, *(f"-D{opt}=OFF" for opt in ALWAYS_OFF))


def derived(flags: set[str]) -> Candidate:
    """Every ISA extension this CPU lists that ggml can use, minus AMX."""
    return Candidate("derived", _args({opt for opt, need in FEATURES if set(need) <= flags}))


def safe(flags: set[str]) -> Candidate:
    """The portable x86-64-v3 set where the CPU has all of it, else no extensions at all."""
    have = {opt for opt, need in FEATURES if set(need) <= flags}
    return Candidate("safe", _args(PORTABLE if PORTABLE <= have else set()))


def baseline() -> Candidate:
    return Candidate("baseline", _args(set()))


def candidates(flags: set[str], choice: str) -> list[Candidate]:
    """What to try, in order. `auto` falls back step by step; `safe` or explicit args are tried alone."""
    choice = choice.strip()
    if choice in ("", "auto"):
        out: list[Candidate] = []
        for c in (derived(flags), safe(flags), baseline()):
            if c.cmake_args not in [o.cmake_args for o in out]:
                out.append(c)
        return out
    if choice == "safe":
        return [safe(flags)]
    return [Candidate("override", tuple(shlex.split(choice)))]


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    signal: str | None   # e.g. "SIGILL" when a signal killed the probe
    detail: str          # system info on success, the error otherwise


def choose(cands: list[Candidate], build: Callable[[Candidate], dict],
           probe: Callable[[], ProbeResult], say: Callable[[str], None] = print) -> tuple[Candidate, dict, ProbeResult]:
    """Build and probe each candidate until one passes. A probe killed by a signal moves on to the next (safer)
    set; a probe that fails without a signal is not an instruction-set problem, so it stops setup."""
    for i, cand in enumerate(cands):
        built = build(cand)
        result = probe()
        if result.ok:
            return cand, built, result
        if result.signal is None:
            raise SystemExit(f"error: the llama.cpp probe failed with flags {cand.line}: {result.detail}")
        if i + 1 == len(cands):
            raise SystemExit(f"error: the llama.cpp probe died with {result.signal} with flags {cand.line}, "
                             "and no safer flag set is left to try")
        say(f"llama.cpp probe died with {result.signal} under the {cand.name} flags; rebuilding with the "
            f"{cands[i + 1].name} flag set: {cands[i + 1].line}")
    raise SystemExit("error: no llama.cpp flag set to try")


def pinned_version(lock: Path = VERSION_FILE) -> str:
    for line in lock.read_text().splitlines():
        if line.lower().replace("-", "_").startswith("llama_cpp_python=="):
            return line.split("==", 1)[1].strip()
    raise SystemExit(f"error: {lock} pins no llama_cpp_python version")


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alpaca-lora-cpu" / "llama-cpp-python"
    return Path(os.environ.get("LLAMA_WHEEL_CACHE", default))


def wheel_dir(version: str, cand: Candidate) -> Path:
    key = hashlib.sha256(cand.line.encode()).hexdigest()[:12]
    return cache_root() / f"{version}-{key}"


def build_wheel(version: str, cand: Candidate) -> dict:
    """A wheel for these flags: from the cache, or built now (pip's own cache ignores CMAKE_ARGS, so it is off)."""
    target = wheel_dir(version, cand)
    wheels = sorted(target.glob("*.whl"))
    if wheels:
        meta = json.loads((target / "build.json").read_text())
        print(f"llama-cpp-python {version}: cached wheel {wheels[0]} (built in {meta['build_seconds']:.0f} s)")
        return {**meta, "wheel": str(wheels[0]), "cached": True}
    print(f"llama-cpp-python {version}: building from source with {cand.line} (several minutes)", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    env = {**os.environ, "CMAKE_ARGS": cand.line, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    t0 = time.perf_counter()
    with open(BUILD_LOG, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir",
                               "--no-binary", "llama_cpp_python", f"llama_cpp_python=={version}", "-w", str(tmp)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = BUILD_LOG.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"error: building llama-cpp-python {version} failed (exit {proc.returncode}) with "
                         f"flags {cand.line}: {tail[0][:200]} (whole log: {BUILD_LOG})")
    meta = {"version": version, "cmake_args": cand.line, "build_seconds": time.perf_counter() - t0}
    (tmp / "build.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    wheel = next(target.glob("*.whl"))
    print(f"llama-cpp-python {version}: built in {meta['build_seconds']:.0f} s → {wheel}")
    return {**meta, "wheel": str(wheel), "cached": False}


def install(built: dict) -> None:
    with open(BUILD_LOG, "a") as log:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall",
                        built["wheel"]], check=True, stdout=log, stderr=subprocess.STDOUT)


def tiny_gguf(path: Path) -> None:
    """A 2-layer random LLaMA whose rows (256) are k-quant blocks, so q4_k_m really uses Q4_K kernels."""
    import gguf
    import numpy as np

    n_embd, n_ff, n_head, n_kv, n_layer = 256, 512, 4, 2, 2
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)), *(f"▁w{i}" for i in range(253))]
    types = [2, 3, 3, *([6] * 256), *([1] * 253)]
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_context_length, 128), (writer.add_embedding_length, n_embd),
                       (writer.add_block_count, n_layer), (writer.add_feed_forward_length, n_ff),
                       (writer.add_head_count, n_head), (writer.add_head_count_kv, n_kv),
                       (writer.add_rope_dimension_count, n_embd // n_head), (writer.add_layer_norm_rms_eps, 1e-5),
                       (writer.add_tokenizer_model, "llama"), (writer.add_token_list, tokens),
                       (writer.add_token_scores, [0.0] * len(tokens)), (writer.add_token_types, types),
                       (writer.add_bos_token_id, 1), (writer.add_eos_token_id, 2)):
        add(value)
    writer.add_tensor("token_embd.weight", w(len(tokens), n_embd))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    writer.add_tensor("output.weight", w(len(tokens), n_embd))
    hd = n_embd // n_head
    for b in range(n_layer):
        for name, arr in (("attn_norm", np.ones(n_embd, np.float32)), ("attn_q", w(n_embd, n_embd)),
                          ("attn_k", w(n_kv * hd, n_embd)), ("attn_v", w(n_kv * hd, n_embd)),
                          ("attn_output", w(n_embd, n_embd)), ("ffn_norm", np.ones(n_embd, np.float32)),
                          ("ffn_gate", w(n_ff, n_embd)), ("ffn_up", w(n_ff, n_embd)), ("ffn_down", w(n_embd, n_ff))):
            writer.add_tensor(f"blk.{b}.{name}.weight", arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def run_probe(workdir: Path, log: Path | None = None) -> dict:
    """The probe itself (runs in the child): quantize the tiny model to each type, multi-token eval on each.
    llama.cpp's own log (hundreds of loader lines) goes to `log`, not the terminal."""
    import llama_cpp
    import numpy as np

    from alpaca_lora_cpu.quantizer import Plan, quantize_here

    if log is not None:
        os.dup2(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)  # this child's stderr only
    src = workdir / "tiny-f32.gguf"
    tiny_gguf(src)
    evaluated = {}
    for qtype in PROBE_TYPES:
        dst = workdir / f"tiny-{qtype}.gguf"
        rc, _, lines = quantize_here(str(src), str(dst), Plan(qtype, qtype, False), os.cpu_count() or 1)
        if log is not None:
            with open(log, "a") as fh:
                fh.write("\n".join(lines) + "\n")
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize to {qtype} failed")
        # logits_all: without it llama-cpp-python never fills `scores` (the rows are uninitialised memory).
        llm = llama_cpp.Llama(str(dst), n_ctx=128, n_batch=64, n_threads=os.cpu_count() or 1, logits_all=True,
                              verbose=False)
        try:
            llm.eval([1, *range(300, 332)])  # a 33-token batch: the matmul path that faulted
            llm.eval([400])
            if not np.isfinite(np.array(llm.scores[:llm.n_tokens])).all():
                raise RuntimeError(f"non-finite logits from the {qtype} model")
        finally:
            llm.close()
        evaluated[qtype] = dst.stat().st_size
    return {"system_info": llama_cpp.llama_print_system_info().decode().strip(),
            "llama_cpp_python": llama_cpp.__version__, "quantized_bytes": evaluated}


def probe() -> ProbeResult:
    """Run the probe in a child process (native.call_in_child) so a fault kills it, not setup."""
    from alpaca_lora_cpu.native import NativeCrash, call_in_child, signal_name

    with tempfile.TemporaryDirectory() as tmp:
        try:
            info = call_in_child(run_probe, Path(tmp), PROBE_LOG, action="probing the build")
        except NativeCrash as crash:
            return ProbeResult(False, signal_name(crash.signum), "")
        except Exception as exc:  # an import error, a failed quantization: not an instruction-set problem
            return ProbeResult(False, None, f"{type(exc).__name__}: {exc}")
    return ProbeResult(True, None, json.dumps(info))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cmake-args", default=os.environ.get("LLAMA_CMAKE_ARGS", "auto"),
                    help="auto (derive from this CPU, probe, fall back), safe, or explicit CMake args")
    args = ap.parse_args(argv)
    flags = set(read_cpu().flags)
    version = pinned_version()
    cands = candidates(flags, args.cmake_args)
    t0 = time.perf_counter()

    def build_and_install(cand: Candidate) -> dict:
        built = build_wheel(version, cand)
        install(built)
        return built

    cand, built, result = choose(cands, build_and_install, probe)
    info = json.loads(result.detail)
    record = {"choice": cand.name, "requested": args.cmake_args, "cmake_args": cand.line,
              "build_seconds": round(built["build_seconds"], 1), "wheel": built["wheel"],
              "from_cache": built["cached"], "setup_seconds": round(time.perf_counter() - t0, 1),
              "probe": f"passed: {', '.join(PROBE_TYPES)} multi-token evals", **info}
    RECORD.write_text(json.dumps(record, indent=2) + "\n")
    print(f"llama.cpp build: {cand.name} flags {cand.line}")
    print(f"llama.cpp system info: {info['system_info']}")
    print(f"probe passed ({', '.join(PROBE_TYPES)}); recorded in {RECORD} (llama.cpp's log: {PROBE_LOG})")


if __name__ == "__main__":
    main()
