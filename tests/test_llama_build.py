"""The llama.cpp build choice (tools/llama_build.py) with faked CPUs and faked probe outcomes: it must pass on
any CPU, since the real fault (AMX kernels under a hypervisor) cannot be produced on an AVX2-only machine."""
from __future__ import annotations

import pytest

from alpaca_lora_cpu.cpu import read as read_cpu
from tools import llama_build as lb

AMX_XEON = ("flags\t\t: fpu sse4_2 avx f16c fma bmi2 avx2 avx512f avx512cd avx512vl avx512dq avx512bw avx512vbmi "
            "avx512_vnni avx512_bf16 avx512_fp16 avx_vnni amx_tile amx_int8 amx_bf16\n")
AVX2_EPYC = "processor\t: 0\nflags\t\t: fpu sse4_2 avx f16c fma bmi2 avx2\n"
OLD_CPU = "flags\t\t: fpu sse4_2 avx\n"


def enabled(cand: lb.Candidate) -> set[str]:
    return {a[2:].split("=")[0] for a in cand.cmake_args if a.endswith("=ON")}


def test_derived_flags_follow_the_cpu_and_never_enable_amx_or_native():
    c = lb.derived(set(read_cpu(AMX_XEON).flags))
    assert {"GGML_AVX512", "GGML_AVX512_BF16", "GGML_AVX512_VNNI", "GGML_AVX_VNNI", "GGML_AVX2"} <= enabled(c)
    assert "-DGGML_NATIVE=OFF" in c.cmake_args
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(c.cmake_args)
    assert not any("AMX" in e for e in enabled(c))


def test_avx512_needs_all_five_subsets():
    partial = set(read_cpu("flags : avx avx2 fma f16c avx512f avx512cd\n").flags)
    assert "GGML_AVX512" not in enabled(lb.derived(partial))


def test_avx2_cpu_gets_no_avx512_and_safe_is_x86_64_v3():
    flags = set(read_cpu(AVX2_EPYC).flags)
    assert enabled(lb.derived(flags)) == lb.PORTABLE
    assert enabled(lb.safe(set(read_cpu(AMX_XEON).flags))) == lb.PORTABLE
    assert enabled(lb.safe(set(read_cpu(OLD_CPU).flags))) == set()  # no AVX2: no extensions at all


def test_auto_tries_derived_then_safe_then_baseline_without_repeats():
    assert [c.name for c in lb.candidates(set(read_cpu(AMX_XEON).flags), "auto")] == ["derived", "safe", "baseline"]
    # On an AVX2-only CPU derived == safe: tried once.
    assert [c.name for c in lb.candidates(set(read_cpu(AVX2_EPYC).flags), "")] == ["derived", "baseline"]
    assert [c.name for c in lb.candidates(set(), "auto")] == ["derived"]


def test_override_and_safe_are_tried_alone():
    (c,) = lb.candidates(set(read_cpu(AMX_XEON).flags), "-DGGML_NATIVE=ON -DGGML_AVX2=ON")
    assert c.name == "override" and c.cmake_args == ("-DGGML_NATIVE=ON", "-DGGML_AVX2=ON")
    assert [c.name for c in lb.candidates(set(read_cpu(AMX_XEON).flags), "safe")] == ["safe"]


def fake_run(outcomes: list[lb.ProbeResult]):
    built, said = [], []
    results = iter(outcomes)

    def build(cand):
        built.append(cand.name)
        return {"build_seconds": 1.0}

    return built, said, build, lambda: next(results), said.append


OK = lb.ProbeResult(True, None, "{}")


def test_sigill_rebuilds_with_the_safe_set_and_says_so_in_one_line():
    built, said, build, probe, say = fake_run([lb.ProbeResult(False, "SIGILL", ""), OK])
    cand, _, result = lb.choose(lb.candidates(set(read_cpu(AMX_XEON).flags), "auto"), build, probe, say)
    assert cand.name == "safe" and result.ok
    assert built == ["derived", "safe"]
    assert len(said) == 1 and "SIGILL" in said[0] and "safe" in said[0] and "\n" not in said[0]


def test_passing_probe_keeps_the_derived_build():
    built, said, build, probe, say = fake_run([OK])
    cand, _, _ = lb.choose(lb.candidates(set(read_cpu(AMX_XEON).flags), "auto"), build, probe, say)
    assert (cand.name, built, said) == ("derived", ["derived"], [])


def test_every_set_faulting_is_an_error_naming_the_signal():
    _, _, build, probe, say = fake_run([lb.ProbeResult(False, "SIGILL", "")] * 3)
    with pytest.raises(SystemExit, match="SIGILL.*no safer flag set"):
        lb.choose(lb.candidates(set(read_cpu(AMX_XEON).flags), "auto"), build, probe, say)


def test_failing_override_is_not_replaced_by_another_set():
    built, _, build, probe, say = fake_run([lb.ProbeResult(False, "SIGSEGV", "")])
    with pytest.raises(SystemExit, match="SIGSEGV"):
        lb.choose(lb.candidates(set(read_cpu(AMX_XEON).flags), "-DGGML_AVX2=ON"), build, probe, say)
    assert built == ["override"]


def test_a_probe_error_without_a_signal_stops_setup():
    built, _, build, probe, say = fake_run([lb.ProbeResult(False, None, "ImportError: no llama_cpp")])
    with pytest.raises(SystemExit, match="ImportError"):
        lb.choose(lb.candidates(set(read_cpu(AMX_XEON).flags), "auto"), build, probe, say)
    assert built == ["derived"]  # not an instruction-set problem: no rebuild


def test_wheel_cache_is_keyed_by_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_WHEEL_CACHE", str(tmp_path))
    flags = set(read_cpu(AMX_XEON).flags)
    a, b = lb.wheel_dir("0.3.36", lb.derived(flags)), lb.wheel_dir("0.3.36", lb.safe(flags))
    assert a != b and a.parent == b.parent == tmp_path
    assert lb.wheel_dir("0.3.36", lb.derived(flags)) == a


def test_pinned_version_reads_the_lock(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("numpy==2.0\nllama_cpp_python==0.3.36\n")
    assert lb.pinned_version(lock) == "0.3.36"
    lock.write_text("numpy==2.0\n")
    with pytest.raises(SystemExit, match="pins no llama_cpp_python"):
        lb.pinned_version(lock)


def test_real_probe_passes_on_this_build_and_reports_a_signal_death(monkeypatch):
    """The probe itself, in its child: the installed build passes; a child killed by SIGILL is reported as such."""
    import json

    result = lb.probe()
    assert result.ok, result.detail
    info = json.loads(result.detail)
    assert set(info["quantized_bytes"]) == set(lb.PROBE_TYPES) and "CPU" in info["system_info"]
    monkeypatch.setenv("LLAMA_CHILD_FAULT", "SIGILL")
    assert lb.probe() == lb.ProbeResult(False, "SIGILL", "")
