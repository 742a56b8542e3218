"""The loaders' speed options: the attention backend of a model and torch.compile of its repeated blocks.

Attention: a loader's choice, or for 'auto' the run's default (`--attention`, $KINEFLOW_ATTENTION, else auto), is
checked against the installed packages and the device before the weights are read, then set on the model's
attention modules (models/attention.py).

Compilation is regional: only the blocks a model lists in `compile_blocks()` (the transformer's double and single
blocks, the UNet's resnets and spatial transformers) are compiled, and each block class once: one `torch.compile`
of the class's `forward`, shared by its instances, becomes each instance's `forward`. A block's `__call__` stays
eager, and that is where offloading's pre-hook runs (runtime/offload.py): it puts the block's weights in place,
then the compiled forward runs on them. Parameters are inputs of the compiled graph, so weights swapped in by
offloading (or merged by a LoRA into a copy) are read, never baked in. Under `sequential` offloading, whose hooks
sit on every layer inside the blocks, the model is not compiled (a warning says so). A compilation that fails (no
C++ compiler for CPU kernels, no Triton for CUDA ones, an operation the compiler does not handle) is logged once
and that block class runs eagerly from then on.
"""

from __future__ import annotations

import importlib.util
import logging
import types
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..models import attention as attention_mod
from . import cpu, host

if TYPE_CHECKING:
    from .offload import Residency

log = logging.getLogger(__name__)

# Each distinct weight shape and input size of a block class is one compiled graph: SD1.5's UNet has 12 resnet
# shapes, more than torch's default limit of 8 recompilations per function.
RECOMPILE_LIMIT = 64


def resolve_attention(choice: str, device: torch.device) -> str:
    """The backend a loader gives its model: its choice, or the run's default for 'auto'; raises a clear error when
    that backend is unknown, not installed or not for this device."""
    name = host.attention_default() if choice == "auto" else choice
    attention_mod.check(name, device)
    if name == "auto" and torch.device(device).type == "cpu":
        attention_mod.use_cpu_tiles(cpu.native_bf16() is not None)
    return name


def apply(model: nn.Module, residency: Residency | None, attention: str, compile: str = "disabled",
          backend: str = "inductor") -> None:
    """Set a freshly loaded model's attention backend (from `resolve_attention`) and, when `compile` says so
    ('enabled', or 'auto' with the run's default on), compile its blocks with torch.compile's `backend`. Under the
    kineflow command's `--threads auto`, a large model on the CPU raises torch's thread count (runtime/cpu.py)."""
    attention_mod.set_backend(model, attention)
    if residency is not None:
        cpu.fit_threads(model, residency.device)
    if compile == "enabled" or (compile == "auto" and host.compile_default()):
        compile_blocks(model, residency, backend)


def compile_blocks(model: nn.Module, residency: Residency | None, backend: str = "inductor") -> bool:
    """Compile `model.compile_blocks()` (see the module docstring); False when the model stays eager."""
    if residency is not None and residency.device.type == "meta":
        return False  # a dry run computes nothing
    name = type(model).__name__
    if residency is not None and residency.policy == "sequential":
        log.warning("%s is not compiled: 'sequential' offloading fetches each layer inside the blocks as it runs; "
                    "use 'blocks' offloading to compile", name)
        return False
    device = residency.device if residency is not None else torch.device("cpu")
    if device.type == "cuda" and backend == "inductor" and importlib.util.find_spec("triton") is None:
        log.warning("%s is not compiled: torch.compile needs Triton for CUDA kernels and it is not installed", name)
        return False
    for block in model.compile_blocks():
        block.forward = types.MethodType(_compiled_forward(type(block), backend), block)
    return True


class _CompiledForward:
    """One torch.compile of a block class's `forward`, shared by the instances it is bound to. When compiling
    fails, that call runs eagerly (an error of the block itself is raised there, as without compilation) and so
    does the class from then on."""

    def __init__(self, cls: type, backend: str):
        self.name = cls.__name__
        self.eager = cls.forward
        self.compiled = None
        try:
            self.compiled = torch.compile(cls.forward, backend=backend, dynamic=False)
        except Exception as exc:  # torch.compile unsupported here (this Python, this platform)
            self._give_up(exc)

    def __call__(self, module: nn.Module, *args, **kwargs):
        if self.compiled is not None:
            try:
                with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                    return self.compiled(module, *args, **kwargs)
            except Exception as exc:  # any failure of the compiler stack; the eager call below tells them apart
                out = self.eager(module, *args, **kwargs)
                self._give_up(exc)
                return out
        return self.eager(module, *args, **kwargs)

    def _give_up(self, exc: Exception) -> None:
        self.compiled = None
        reason = (str(exc).strip().splitlines() or [""])[0][:300]
        log.warning("torch.compile failed for %s (%s: %s); running it eagerly. Compiling needs a C++ compiler for "
                    "CPU kernels and Triton for CUDA ones", self.name, type(exc).__name__, reason)


_compiled: dict[tuple[type, str], _CompiledForward] = {}


def _compiled_forward(cls: type, backend: str) -> _CompiledForward:
    key = (cls, backend)
    if key not in _compiled:
        _compiled[key] = _CompiledForward(cls, backend)
    return _compiled[key]
