"""Dry runs: a workflow executed on the `meta` device, to see what it would need before running it for real.

On `meta`, tensors have shapes and dtypes but no data: loaders read file headers only, models run their
forward passes on shapes, and Save Video names its file without writing it. `MemoryTracker` counts the bytes
of every live `meta` tensor (weights, activations, latents) and keeps the peak, so a dry run answers "will this
fit on my 12 GB card?" in seconds, with the same code path as the real run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class MemoryTracker(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created on one device type while the mode is active.

    Each storage is counted once however many tensors view it. The tracker holds a reference to every storage
    it saw and drops it once nothing else uses it (PyTorch's storage use count); it sweeps before recording a
    new peak, so the peak never includes freed memory."""

    def __init__(self, device_type: str = "meta"):
        super().__init__()
        self.device_type = device_type
        self.live = 0
        self.peak = 0
        self._storages: dict[int, torch.UntypedStorage] = {}

    def sweep(self) -> None:
        """Forget the storages that only this tracker still references."""
        for key, storage in list(self._storages.items()):
            if torch._C._storage_Use_Count(key) <= 1:
                self.live -= storage.nbytes()
                del self._storages[key]

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != self.device_type:
            return
        storage = tensor.untyped_storage()
        if storage._cdata in self._storages:
            return
        self._storages[storage._cdata] = storage
        self.live += storage.nbytes()
        if self.live > self.peak:
            self.sweep()
            self.peak = max(self.peak, self.live)

    def reset_peak(self) -> None:
        self.sweep()
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


@dataclass
class NodePlan:
    node_id: str
    class_type: str
    outputs: list[str] = field(default_factory=list)
    resident_after: int = 0  # bytes alive on the device once the node has run (weights and cached outputs)
    peak: int = 0  # highest bytes alive on the device while it ran


def describe_value(value) -> str:
    """A short description of a node output: tensor shapes, model handles by kind."""
    if isinstance(value, torch.Tensor):
        return f"{list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, dict) and isinstance(value.get("samples"), torch.Tensor):
        return f"LATENT {list(value['samples'].shape)}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {describe_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (str, int, float)):
        return repr(value)
    return type(value).__name__


class DryRun:
    """Records a NodePlan per executed node; `observe(node_id, class_type)` is the executor's per-node hook."""

    def __init__(self, tracker: MemoryTracker):
        self.tracker = tracker
        self.nodes: list[NodePlan] = []

    @contextlib.contextmanager
    def observe(self, node_id: str, class_type: str):
        plan = NodePlan(node_id, class_type)
        self.tracker.reset_peak()
        yield
        plan.peak = self.tracker.peak
        self.tracker.sweep()
        plan.resident_after = self.tracker.live
        self.nodes.append(plan)

    def report(self, results: dict[str, dict]) -> str:
        """A table of the executed nodes (peak and resident device memory, output shapes) and the run's need.

        The run's need is the peak over the nodes that compute tensors: loader nodes convert weights in host
        memory in a real run, and only what they leave resident counts on the device."""
        computing = []
        for n in self.nodes:
            outputs = results.get(n.node_id, {}).get("outputs", ())
            n.outputs = [describe_value(v) for v in outputs]
            if any(_holds_tensors(v) for v in outputs):
                computing.append(n)
        need = max([n.peak for n in computing] + [n.resident_after for n in self.nodes], default=0)
        gib = lambda b: f"{b / 2**30:8.2f} GiB"  # noqa: E731
        lines = [f"{'node':<6} {'class':<28} {'peak':>12} {'resident':>12}  outputs"]
        for n in self.nodes:
            lines.append(f"{n.node_id:<6} {n.class_type:<28} {gib(n.peak):>12} {gib(n.resident_after):>12}  "
                         + "; ".join(n.outputs))
        lines.append(f"device memory this run needs: {gib(need).strip()} (all models resident; nothing was read "
                     "beyond file headers and nothing was written)")
        return "\n".join(lines) + "\n"


def _holds_tensors(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, dict) and any(_holds_tensors(v) for v in value.values())


@contextlib.contextmanager
def dry_run():
    """Track `meta` allocations for the duration of a run; yields the DryRun whose `observe` the executor calls."""
    tracker = MemoryTracker("meta")
    with tracker:
        yield DryRun(tracker)
