"""The CPU's side of a run: what dtype `auto` means there, and how many threads torch computes with.

dtype: `auto` on the CPU is bf16 only where the CPU multiplies bf16 natively (AMX or AVX-512 BF16) *and* a bf16
matmul measured once in this process is at least `BF16_MIN_SPEEDUP` times as fast as an fp32 one; fp32 otherwise
(an AVX2-only CPU, or an AVX-512 one without BF16, converts bf16 to fp32 around every kernel, which costs time rather
than saving it). The choice and its reason are reported once per process.

Threads: only the `kineflow` command decides them, and only when it owns the process (`manage_threads`): torch not
imported yet (so OpenMP has not read its environment) and not inside ComfyUI. Then
- OpenMP waits passively (`OMP_WAIT_POLICY=PASSIVE`, unless the user set it): a thread waiting at a barrier sleeps
  instead of spinning, so on a busy machine it gives its core back instead of burning the time slice its partner
  thread needs (spinning barriers are what make a loaded machine collapse: every parallel region waits for a thread
  that is not scheduled);
- the thread count is `--threads N` ($KINEFLOW_THREADS), else the user's `OMP_NUM_THREADS`, else `auto`: one thread
  while every model loaded has fewer than `SMALL_MODEL_PARAMS` parameters (their operations are too small for a
  second thread to repay its synchronisation), else torch's default (one per core this process may use);
- `--threads torch` leaves torch's and OpenMP's own defaults alone.
Inside ComfyUI, or when a program imported torch before calling the command, nothing process-wide is changed: the
threads and OpenMP's environment belong to that process.

torch is imported only inside functions: the CLI calls `manage_threads` before torch is loaded.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SMALL_MODEL_PARAMS = 20_000_000  # models below this run on one thread under --threads auto
BF16_MIN_SPEEDUP = 1.2  # bf16 must be this much faster than fp32 in the probe for `auto` to pick it
NATIVE_BF16 = {"amx_bf16": "AMX", "avx512_bf16": "AVX-512 BF16"}  # /proc/cpuinfo flag -> name
THREAD_MODES = ("auto", "torch")  # besides a positive integer


# --------------------------------------------------------------------------- what the CPU is
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux); None where that file does not exist. Read once: every
    loader asks (runtime/acceleration.resolve_attention), and the CPU does not change under a process."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16() -> str | None:
    """The feature that multiplies bf16 natively on this CPU ('AMX', 'AVX-512 BF16'), or None."""
    flags = cpu_flags()
    if flags is not None:
        return next((name for flag, name in NATIVE_BF16.items() if flag in flags), None)
    import torch  # no /proc (Windows, macOS): ask torch's CPU detection

    probes = (("_is_amx_tile_supported", "AMX"), ("_is_avx512_bf16_supported", "AVX-512 BF16"))
    return next((name for fn, name in probes if getattr(torch.cpu, fn, lambda: False)()), None)


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- dtype
_dtype_choice: tuple[str, str] | None = None


def bf16_matmul_speedup(size: int = 512, rounds: int = 5) -> float:
    """fp32 time / bf16 time of a square matmul, rounds alternating (both see the same load); median of the ratios.
    512 takes ~30 ms of every cold start and gives the verdict of 1024 (measured on an AMD EPYC with AVX-512 BF16:
    2.10-2.16x at 512, 2.14-2.20x at 1024, which took 220 ms)."""
    import torch

    operands = {dtype: (torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype))
                for dtype in (torch.float32, torch.bfloat16)}

    def timed(dtype):
        a, b = operands[dtype]
        start = time.perf_counter()
        torch.mm(a, b)
        return time.perf_counter() - start

    timed(torch.float32), timed(torch.bfloat16)  # warm-up: kernels chosen, pages touched
    return statistics.median(timed(torch.float32) / timed(torch.bfloat16) for _ in range(rounds))


def auto_dtype() -> tuple[str, str]:
    """('bf16' or 'fp32', the reason) for `dtype: auto` on the CPU; decided once per process and reported then."""
    global _dtype_choice
    if _dtype_choice is None:
        feature = native_bf16()
        if feature is None:
            _dtype_choice = ("fp32", "this CPU has no native bf16 matmul (neither AMX nor AVX-512 BF16)")
        else:
            speedup = bf16_matmul_speedup()
            verdict = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
            reason = (f"native bf16 matmul ({feature}); a bf16 matmul ran {speedup:.2f}x as fast as fp32 here "
                      f"(bf16 needs >= {BF16_MIN_SPEEDUP}x)")
            _dtype_choice = (verdict, reason)
        report(f"dtype auto on the CPU: {_dtype_choice[0]} ({_dtype_choice[1]})")
    return _dtype_choice


# --------------------------------------------------------------------------- threads
@dataclass
class ThreadPlan:
    mode: str  # "auto", "fixed" (--threads N), "env" (the user's OMP_NUM_THREADS), "torch", "host"
    threads: int | None  # fixed count, or None
    reason: str
    environ: dict[str, str]  # what to set before torch is imported


@dataclass
class _State:
    plan: ThreadPlan | None = None
    cores: int = 1  # the upper limit of auto
    threads: int = 0  # what auto has set so far
    restore: int | None = None  # torch's thread count before a fixed plan changed it in a loaded torch
    reporter: Callable[[str], None] | None = None


_state = _State()


def parse_threads(text: str) -> str | int:
    """argparse type of --threads: 'auto', 'torch' or a positive integer."""
    import argparse

    value = text.strip().lower()
    if value in THREAD_MODES:
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"threads must be auto, torch or a positive integer, got {text!r}")


def plan_threads(requested: str | int | None, environ, torch_loaded: bool, inside_comfyui: bool) -> ThreadPlan:
    """What the kineflow command does about threads (see the module docstring); decides only, changes nothing."""
    passive = {} if "OMP_WAIT_POLICY" in environ else {"OMP_WAIT_POLICY": "PASSIVE"}
    waits = ("OpenMP waits passive (OMP_WAIT_POLICY=PASSIVE)" if passive
             else f"OMP_WAIT_POLICY={environ['OMP_WAIT_POLICY']} (yours)")
    if inside_comfyui:
        return ThreadPlan("host", None, "inside ComfyUI: threads are ComfyUI's, left as they are", {})
    if requested == "torch":
        return ThreadPlan("torch", None, "torch's and OpenMP's defaults (--threads torch)", {})
    if torch_loaded and requested in (None, "auto"):
        return ThreadPlan("host", None, "torch was loaded before the command started: its threads are the "
                                        "program's, left as they are", {})
    if isinstance(requested, int):
        env = {} if torch_loaded else {"OMP_NUM_THREADS": str(requested), **passive}
        return ThreadPlan("fixed", requested, f"{requested} (--threads); {waits}", env)
    if environ.get("OMP_NUM_THREADS", "").strip():
        return ThreadPlan("env", None, f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS']} (yours); {waits}", passive)
    return ThreadPlan("auto", None, f"auto: 1 while every model loaded has under {SMALL_MODEL_PARAMS // 10**6}M "
                                    f"parameters, else one per core (--threads N to choose); {waits}", passive)


def manage_threads(requested: str | int | None, reporter: Callable[[str], None] | None = None) -> ThreadPlan:
    """Called by the kineflow command before anything imports torch: settle the plan, set OpenMP's environment,
    report the choice in one line. Returns the plan (`apply_threads` carries it out once torch is wanted)."""
    from . import host

    torch_loaded = "torch" in sys.modules
    plan = plan_threads(requested, os.environ, torch_loaded, host.in_comfyui())
    os.environ.update(plan.environ)
    _state.plan, _state.threads, _state.restore = plan, 0, None
    _state.reporter = reporter if plan.mode != "host" else None  # the host's runs log through logging
    if plan.mode != "host":
        report(f"cpu: {cpu_name()}, {usable_cores()} usable; threads: {plan.reason}")
    return plan


def apply_threads() -> None:
    """Carry out the plan once torch is imported (the run imports it anyway)."""
    plan = _state.plan
    if plan is None or plan.mode in ("host", "torch", "env"):
        return
    import torch

    if plan.mode == "fixed":
        if torch.get_num_threads() != plan.threads:
            _state.restore = torch.get_num_threads()
            torch.set_num_threads(plan.threads)
        return
    _state.cores = max(1, min(torch.get_num_threads(), usable_cores()))
    _state.restore = torch.get_num_threads()
    _set_auto_threads(1)


def fit_threads(model, device) -> None:
    """After a model is loaded for `device`: under --threads auto, one thread per core from the first model with
    `SMALL_MODEL_PARAMS` parameters or more (reported), else nothing changes."""
    plan = _state.plan
    if plan is None or plan.mode != "auto" or getattr(device, "type", None) != "cpu" or _state.threads == 0:
        return
    params = sum(p.numel() for p in model.parameters())
    want = _state.cores if params >= SMALL_MODEL_PARAMS else 1
    if want > _state.threads:
        _set_auto_threads(want)
        report(f"threads: {want} from now on ({type(model).__name__} has {params / 1e6:.0f}M parameters, "
               f">= {SMALL_MODEL_PARAMS // 10**6}M)")


def _set_auto_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)
    _state.threads = count


def release_threads() -> None:
    """Forget the plan and give torch back the thread count it had (the command called from a program: `main(argv)`)."""
    if _state.restore is not None:
        import torch

        torch.set_num_threads(_state.restore)
    _state.plan, _state.reporter, _state.threads, _state.restore = None, None, 0, None


def report(line: str) -> None:
    """One line of the run log: the command's stderr while it runs, else logging (ComfyUI's console)."""
    if _state.reporter is not None:
        _state.reporter(line + "\n")
    else:
        log.info("%s", line)
