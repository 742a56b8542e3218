"""runtime/cpu.py: what `dtype: auto` means on the CPU, the kineflow command's thread plan, and that nothing
process-wide changes inside ComfyUI or in a program that loaded torch itself."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kineflow.runtime import cpu, host
from kineflow.runtime.video_models import resolve_dtype

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    """Each test starts with no plan, no cached dtype choice, and torch's thread count put back afterwards."""
    monkeypatch.setattr(cpu, "_state", cpu._State())
    monkeypatch.setattr(cpu, "_dtype_choice", None)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _flags(monkeypatch, *flags, speedup=None):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(("fpu", "sse2", "avx2", "fma", *flags)))

    def probe(*args, **kwargs):
        if speedup is None:
            raise AssertionError("a CPU without native bf16 must not be probed")
        return speedup

    monkeypatch.setattr(cpu, "bf16_matmul_speedup", probe)


# --------------------------------------------------------------------------- dtype auto
def test_avx2_only_cpu_keeps_fp32_without_probing(monkeypatch):
    _flags(monkeypatch)
    lines = []
    monkeypatch.setattr(cpu._state, "reporter", lines.append)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    expected = "dtype auto on the CPU: fp32 (this CPU has no native bf16 matmul (neither AMX nor AVX-512 BF16))\n"
    assert lines == [expected]


def test_avx512_without_bf16_keeps_fp32(monkeypatch):
    _flags(monkeypatch, "avx512f", "avx512bw", "avx512_vnni")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("flag,name", [("avx512_bf16", "AVX-512 BF16"), ("amx_bf16", "AMX")])
def test_native_bf16_that_pays_picks_bf16_and_says_why(monkeypatch, flag, name):
    _flags(monkeypatch, "avx512f", flag, speedup=1.8)
    lines = []
    monkeypatch.setattr(cpu._state, "reporter", lines.append)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert lines[0].startswith(f"dtype auto on the CPU: bf16 (native bf16 matmul ({name}); a bf16 matmul ran 1.80x")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16 and len(lines) == 1  # decided once


def test_native_bf16_that_does_not_pay_keeps_fp32(monkeypatch):
    _flags(monkeypatch, "avx512_bf16", speedup=1.05)
    dtype, reason = cpu.auto_dtype()
    assert dtype == "fp32" and "1.05x" in reason and f">= {cpu.BF16_MIN_SPEEDUP}x" in reason


def test_explicit_dtypes_and_accelerators_are_not_decided_by_the_cpu(monkeypatch):
    _flags(monkeypatch, "amx_bf16")  # would raise if probed
    assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("meta")) == torch.bfloat16


def test_the_bf16_probe_measures_a_ratio():
    assert cpu.bf16_matmul_speedup(size=64, rounds=1) > 0


# --------------------------------------------------------------------------- thread plan
def test_default_plan_is_auto_with_passive_waiting():
    plan = cpu.plan_threads(None, {}, torch_loaded=False, inside_comfyui=False)
    assert plan.mode == "auto" and plan.environ == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_users_openmp_settings_are_respected():
    plan = cpu.plan_threads(None, {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}, False, False)
    assert plan.mode == "env" and plan.environ == {} and "OMP_NUM_THREADS=3 (yours)" in plan.reason


def test_threads_flag_wins_over_the_environment():
    plan = cpu.plan_threads(3, {"OMP_NUM_THREADS": "1"}, torch_loaded=False, inside_comfyui=False)
    assert (plan.mode, plan.threads) == ("fixed", 3)
    assert plan.environ == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "PASSIVE"}


def test_threads_torch_and_a_program_that_loaded_torch_change_nothing():
    assert cpu.plan_threads("torch", {}, False, False).environ == {}
    plan = cpu.plan_threads(None, {}, torch_loaded=True, inside_comfyui=False)
    assert plan.mode == "host" and plan.environ == {}


@pytest.mark.parametrize("requested", [None, "auto", 1, 4, "torch"])
def test_inside_comfyui_nothing_process_wide_changes(monkeypatch, requested):
    monkeypatch.setattr(host, "in_comfyui", lambda: True)
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    environ = dict(os.environ)
    lines = []
    plan = cpu.manage_threads(requested, lines.append)
    cpu.apply_threads()
    cpu.fit_threads(torch.nn.Linear(8000, 8000, device="meta"), torch.device("cpu"))
    cpu.release_threads()
    assert plan.mode == "host" and dict(os.environ) == environ and calls == [] and lines == []


def test_parse_threads():
    assert cpu.parse_threads("auto") == "auto" and cpu.parse_threads(" 2 ") == 2
    assert cpu.parse_threads("TORCH") == "torch"
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(Exception, match="positive integer"):
            cpu.parse_threads(bad)


def _auto_plan(monkeypatch, cores=4):
    monkeypatch.setattr(cpu._state, "plan", cpu.plan_threads(None, {}, False, False))
    monkeypatch.setattr(cpu._state, "cores", cores)
    monkeypatch.setattr(cpu._state, "threads", 1)
    calls, lines = [], []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(cpu._state, "reporter", lines.append)
    return calls, lines


def test_auto_keeps_one_thread_for_small_models(monkeypatch):
    calls, lines = _auto_plan(monkeypatch)
    cpu.fit_threads(torch.nn.Linear(64, 64), torch.device("cpu"))
    assert calls == [] and lines == [] and cpu._state.threads == 1


def test_auto_takes_every_core_for_a_large_model_on_the_cpu_only(monkeypatch):
    calls, lines = _auto_plan(monkeypatch, cores=4)
    large = torch.nn.Linear(5000, 5000, device="meta")  # 25M parameters
    cpu.fit_threads(large, torch.device("cuda"))
    assert calls == []
    cpu.fit_threads(large, torch.device("cpu"))
    assert calls == [4] and lines == ["threads: 4 from now on (Linear has 25M parameters, >= 20M)\n"]
    cpu.fit_threads(large, torch.device("cpu"))
    assert calls == [4]  # once


# --------------------------------------------------------------------------- the command, in a fresh interpreter
# Reports torch's thread count as the run ends (before `main(argv)` gives torch its previous count back).
_RUN = """
import os, sys
from kineflow.runtime import cpu
from kineflow.runtime.cli import main
release, seen = cpu.release_threads, []
cpu.release_threads = lambda: (seen.append(sys.modules["torch"].get_num_threads()), release())
code = main(sys.argv[1:])
print("exit", code, "threads", *seen, "wait", os.environ.get("OMP_WAIT_POLICY"), file=sys.stderr)
"""


@pytest.mark.parametrize("extra,threads", [(["--threads", "1"], "1 (--threads)"), ([], "auto: 1 while")])
def test_run_logs_and_applies_its_choice(tmp_path, extra, threads):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "KINEFLOW_THREADS")}
    done = subprocess.run([sys.executable, "-c", _RUN, "run", str(ROOT / "workflows" / "api" / "text_to_video.json"),
                           "--output-dir", str(tmp_path), *extra], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300, check=False)
    lines = done.stderr.splitlines()
    assert lines[-1] == "exit 0 threads 1 wait PASSIVE", done.stderr
    [cpu_line] = [line for line in lines if line.startswith("cpu: ")]
    assert f"threads: {threads}" in cpu_line and "OpenMP waits passive" in cpu_line
    assert len([line for line in lines if line.startswith("dtype auto on the CPU: ")]) == 1


@pytest.mark.parametrize("given, first, expected", [
    (None, "", "PASSIVE"),  # a trainer started as a program: OpenMP waits sleep
    ("ACTIVE", "", "ACTIVE"),  # the user's setting stays
    (None, "import torch; ", None),  # a program that loaded torch first keeps OpenMP's own default
])
def test_trainers_make_openmp_wait_passively_unless_told_otherwise(given, first, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = f"{first}import os, kineflow.training; print(os.environ.get('OMP_WAIT_POLICY'))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(expected)
