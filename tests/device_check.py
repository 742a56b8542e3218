"""A strict check that every tensor operation runs on one device.

`meta` is a real non-CPU device on a CPU-only PyTorch, so running the pipelines with the compute device set to
`meta` shows where a CPU tensor would meet a CUDA one. PyTorch itself lets a few such mixes through on meta (a
matmul with a CPU operand, for example) that CUDA refuses, so `one_device()` checks every ATen call: all tensor
arguments of an operation must share one device, apart from zero-dimensional CPU tensors (CUDA accepts those as
scalars) and the copy operations that move tensors between devices.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# Operations whose purpose is to move data between devices.
_TRANSFERS = {"aten::_to_copy", "aten::copy_", "aten::_copy_from", "aten::_copy_from_and_resize", "aten::lift_fresh",
              "aten::detach", "aten::alias", "aten::set_"}


class DeviceMixError(AssertionError):
    """An operation received tensors on more than one device."""


class _OneDevice(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops_on: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name not in _TRANSFERS:
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.ndim == 0)}
            if len(devices) > 1:
                shapes = [(tuple(t.shape), str(t.device)) for t in tensors]
                raise DeviceMixError(f"{name} mixes devices {sorted(map(str, devices))}: {shapes}")
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.ops_on[t.device.type] = self.ops_on.get(t.device.type, 0) + 1
        return out


@contextlib.contextmanager
def one_device():
    """Raise DeviceMixError at the first ATen operation whose tensor arguments live on different devices.

    Yields the mode, whose `ops_on` counts the operations by the device of their outputs."""
    mode = _OneDevice()
    with mode:
        yield mode
