"""Where a model's weights live while it is loaded and while it runs: the one offload helper of the pack.

Every model of both families (transformers, UNets, motion modules, text encoders, VAEs) is loaded through
`memory.build_model` and then given a `Residency` with one policy; loaders and nodes only choose the policy.

- `full`: every weight on the compute device, always. No hooks, no copies: the fastest, the most memory.
- `model`: the whole model moves to the compute device when its node runs and back to the offload device
  afterwards (the natural choice for text encoders: LLaMA must not stay resident during sampling).
- `blocks`: block swap. The model's repeated blocks (`offload_blocks()`: DiT double/single blocks, UNet
  stages, LLaMA / CLIP layers, ...) are units; `resident` of them stay on the device, the others are brought in
  when their first layer runs and sent back when the next unit starts. From the second pass on, the unit that
  ran next last time is fetched ahead while the current one computes (a side CUDA stream from pinned memory on
  CUDA, a reader thread for weights in a file).
- `sequential`: every layer is its own unit and nothing stays resident: the smallest footprint, the slowest.
- `auto`: `full` when the model fits comfortably in the device's free memory, else `blocks` with as many
  resident blocks as the budget allows, else `sequential`.

The offload device is the CPU's memory or, on a CPU-only machine, the checkpoint file itself: weights stay in
the `.safetensors` file and are read per unit (`memory.FileSlice`), so resident memory is bounded by the
budget, not by the file size.

How: parameters keep their names and shapes; only what `module._parameters[name]` holds changes (a tensor on
the device, on the offload device, or a `meta` placeholder of the compute dtype when the weight is in the file).
A forward pre-hook on the modules a unit is entered by (the block itself, the children of a block that is a plain
ModuleList, each layer under `sequential`) makes the unit resident first; no hook runs inside a block, so a compiled
block (runtime/acceleration.py) traces none and reads whatever weights the hook put in place. Offloading never
changes results: the device copy of a weight is the same bits whichever policy brought it there.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import InputFileError
from ..models.weights import FileSlice, load_model
from . import host

POLICIES = ("auto", "full", "model", "blocks", "sequential")
# `auto` keeps a model fully resident when it takes at most this share of the device's free memory, leaving
# the rest for activations and the other models of the run.
AUTO_FULL_SHARE = 0.6


@dataclass
class _Unit:
    """A group of weights that move together: (owner module, parameter or buffer name) pairs."""

    slots: list[tuple[nn.Module, str, bool]] = field(default_factory=list)  # (module, name, is_buffer)
    entries: list[nn.Module] = field(default_factory=list)  # calling one of these brings the unit in
    resident: bool = False  # stays on the device while the model is active
    on_device: bool = False
    pending: Future | None = None

    def nbytes(self) -> int:
        return sum(_slot_bytes(m, n, b) for m, n, b in self.slots)


def _slot_bytes(module: nn.Module, name: str, is_buffer: bool) -> int:
    t = (module._buffers if is_buffer else module._parameters)[name]
    return t.numel() * t.element_size() if t is not None else 0


class Residency:
    """Applies one offload policy to one loaded model. See the module docstring for the policies.

    Weights a lazy load left in the checkpoint file (`model.file_slices`) are read from it when needed; the
    others wait on `offload_device` (CPU memory, pinned when the device is CUDA).
    Use `with residency.active():` around everything that runs the model (a sampler run, an encode).
    """

    def __init__(self, model: nn.Module, policy: str, device: torch.device, *, offload_device="cpu",
                 resident_blocks: int | None = None, budget_bytes: int | None = None, name: str = "model"):
        if policy not in POLICIES:
            raise InputFileError(f"offload policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        self.model, self.device, self.name = model, torch.device(device), name
        self.offload_device = torch.device(offload_device)
        # Weights left in the checkpoint file by a lazy load (models/weights.py), by (owner module, name).
        self.sources: dict[tuple[int, str], FileSlice] = {}
        for key, source in getattr(model, "file_slices", {}).items():
            owner, _, attr = key.rpartition(".")
            self.sources[(id(model.get_submodule(owner)), attr)] = source
        blocks = list(model.offload_blocks()) if hasattr(model, "offload_blocks") else []
        if policy == "auto":
            total = sum(_slot_bytes(m, n, b) for m, n, b in _all_slots(model))
            policy = resolve_policy("auto", total, self.device, budget_bytes, has_blocks=bool(blocks))
        if policy == "blocks" and not blocks:
            policy = "model"  # a model without repeated blocks moves as a whole
        # Inside ComfyUI its memory manager decides residency (host.claim_device): weights wait at home and
        # only what it grants is placed on the device, kept there between runs until it asks for memory back.
        self.managed = host.in_comfyui() and self.device.type != "meta"
        if self.managed and policy in ("full", "blocks"):
            policy = "blocks" if blocks else "sequential"
            resident_blocks = 0
        self.policy = policy
        self.units, self.rest = self._units(policy, blocks)
        if policy == "blocks":
            self.resident_blocks = self._resident_count(resident_blocks, budget_bytes)
            for unit in self.units[: self.resident_blocks]:
                unit.resident = True
        else:
            self.resident_blocks = len(self.units) if policy == "full" else 0
        self._current: _Unit | None = None
        self._successor: dict[int, _Unit] = {}  # unit -> the unit that ran after it (learnt on the first pass)
        self._active = 0
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="kineflow-prefetch") if self.sources else None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" and policy in ("blocks",) else None
        if policy == "full":
            for module, name, is_buffer in self._all():
                current = (module._buffers if is_buffer else module._parameters)[name]
                if current.device != self.device:
                    self._store(module, name, is_buffer, current.to(self.device))
        else:
            self._settle_homes()
            self._to_offload(self._all())
            if policy in ("blocks", "sequential"):
                self._install_hooks()

    # ------------------------------------------------------------------ policy choice
    def _resident_count(self, requested: int | None, budget_bytes: int | None) -> int:
        if requested is not None and requested >= 0:
            return min(requested, len(self.units))
        sizes = sorted((u.nbytes() for u in self.units), reverse=True)
        in_flight = sum(sizes[:2])  # one unit running and the next one being fetched
        rest = self.rest.nbytes()
        budget = budget_bytes if budget_bytes is not None else int(AUTO_FULL_SHARE * _free_bytes(self.device))
        spare = budget - rest - in_flight
        if spare < 0:
            raise InputFileError(
                f"the memory budget of {budget / 2**30:.2f} GiB is too small for {self.name}: its two largest "
                f"blocks need {in_flight / 2**30:.2f} GiB (one running, one being fetched), plus "
                f"{rest / 2**30:.2f} GiB of weights outside the blocks. Raise the budget to at least "
                f"{(rest + in_flight) / 2**30:.2f} GiB, or use the 'sequential' policy.")
        # Resident blocks are taken in run order, so count with the largest block (conservative).
        return min(len(self.units), spare // sizes[0])

    def _units(self, policy: str, blocks: list[nn.Module]) -> tuple[list[_Unit], _Unit]:
        owner_of: dict[int, int] = {}
        if policy == "blocks":
            for index, block in enumerate(blocks):
                for module in block.modules():
                    owner_of.setdefault(id(module), index)
        units = [_Unit(entries=_entry_modules(block)) for block in blocks] if policy == "blocks" else []
        rest = _Unit()
        for module in self.model.modules():
            slots = [(module, n, False) for n, p in module._parameters.items() if p is not None]
            slots += [(module, n, True) for n, b in module._buffers.items() if b is not None]
            if not slots:
                continue
            if policy == "sequential":
                units.append(_Unit(slots, entries=[module]))
            elif id(module) in owner_of:
                units[owner_of[id(module)]].slots += slots
            else:
                rest.slots += slots
        if policy == "blocks" and units:
            # A layer outside the blocks as large as a block (LLaMA's 128k-token embedding table: 2 GB in fp32)
            # is a unit of its own, fetched when it runs, instead of staying resident through the whole run.
            largest = max(u.nbytes() for u in units)
            owners = {id(m): m for m, _, _ in rest.slots}
            for owner in owners.values():
                mine = [slot for slot in rest.slots if slot[0] is owner]
                if sum(_slot_bytes(*slot) for slot in mine) >= largest:
                    units.append(_Unit(mine, entries=[owner]))
                    rest.slots = [slot for slot in rest.slots if slot[0] is not owner]
        return units, rest

    # ------------------------------------------------------------------ moving weights
    def _all(self):
        return self.rest.slots + [s for u in self.units for s in u.slots]

    @torch.inference_mode(False)
    def _fetch(self, module: nn.Module, name: str, is_buffer: bool, device: torch.device) -> torch.Tensor:
        """The weight on `device`: read from the file, or copied from its home on the offload device. A normal
        tensor even when the model runs in inference mode, as a weight loaded whole is: a compiled block guards
        on the kind of its weights, and another kind would compile it again."""
        key = (id(module), name)
        if key in self.sources and device.type != "meta":
            return self.sources[key].read(self._home[key].dtype, device)  # the placeholder holds the storage dtype
        home = self._home[key]
        return home.to(device, non_blocking=home.is_pinned())

    def _store(self, module: nn.Module, name: str, is_buffer: bool, tensor: torch.Tensor) -> None:
        if is_buffer:
            module._buffers[name] = tensor
        else:
            module._parameters[name] = nn.Parameter(tensor, requires_grad=False)

    def _settle_homes(self) -> None:
        """Give every weight its home on the offload device (pinned for CUDA) or, if it lives in the checkpoint
        file, a `meta` placeholder. Weights are read-only here, so sending one back just restores its home."""
        self._home: dict[tuple[int, str], torch.Tensor] = {}
        for module, name, is_buffer in self._all():
            current = (module._buffers if is_buffer else module._parameters)[name]
            key = (id(module), name)
            if key in self.sources:
                home = current if current.is_meta else torch.empty_like(current, device="meta")
            else:
                home = current if current.device == self.offload_device else current.to(self.offload_device)
                if self.device.type == "cuda" and not home.is_pinned():
                    home = home.pin_memory()
            self._home[key] = home.detach()

    def _to_device(self, slots) -> None:
        """Put `slots` on the compute device (reading the file for weights that live there)."""
        for module, name, is_buffer in slots:
            current = (module._buffers if is_buffer else module._parameters)[name]
            if current is self._home.get((id(module), name), current) or current.device != self.device:
                self._store(module, name, is_buffer, self._fetch(module, name, is_buffer, self.device))

    def _to_offload(self, slots) -> None:
        """Send `slots` back: each weight's module slot holds its home again (no copy back)."""
        for module, name, is_buffer in slots:
            self._store(module, name, is_buffer, self._home[(id(module), name)])

    def _bring(self, unit: _Unit) -> None:
        if unit.on_device:
            return
        if unit.pending is not None:
            tensors = unit.pending.result()
            unit.pending = None
            if self._stream is not None:
                main = torch.cuda.current_stream(self.device)
                main.wait_stream(self._stream)
                for tensor in tensors:  # freed only once the main stream is done with it
                    tensor.record_stream(main)
            for (module, name, is_buffer), tensor in zip(unit.slots, tensors):
                self._store(module, name, is_buffer, tensor)
        else:
            self._to_device(unit.slots)
        unit.on_device = True

    def _prefetch(self, unit: _Unit) -> None:
        """Start fetching `unit` while the current one computes."""
        if unit.on_device or unit.pending is not None:
            return
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                tensors = [self._fetch(m, n, b, self.device) for m, n, b in unit.slots]
            done: Future = Future()
            done.set_result(tensors)
            unit.pending = done
        elif self._reader is not None and any((id(m), n) in self.sources for m, n, _ in unit.slots):
            unit.pending = self._reader.submit(lambda: [self._fetch(m, n, b, self.device) for m, n, b in unit.slots])

    def _drop_prefetches(self, keep: _Unit) -> None:
        """Forget fetches ahead of units other than `keep`, the one running next. Such a fetch guessed wrong: this
        pass runs its units in another order than the last one (a step cache skipped blocks), and left pending it
        would hold up every further fetch ahead until its unit runs. So a changed order costs one wasted fetch."""
        for unit in self.units:
            if unit is not keep and unit.pending is not None:
                unit.pending.cancel()  # a read already under way finishes on the reader thread, unused
                unit.pending = None

    def _send_back(self, unit: _Unit) -> None:
        if unit.on_device and not unit.resident:
            self._to_offload(unit.slots)
            unit.on_device = False

    # ------------------------------------------------------------------ hooks
    def _install_hooks(self) -> None:
        for index, unit in enumerate(self.units):
            for module in unit.entries:
                module.register_forward_pre_hook(self._pre_hook(index))

    def _pre_hook(self, index: int):
        def hook(module, args):
            if not self._active:
                return
            unit = self.units[index]
            if self._current is unit:
                return
            if self._current is not None:
                self._successor[id(self._current)] = unit
                self._send_back(self._current)
            self._drop_prefetches(keep=unit)
            self._bring(unit)
            self._current = unit
            # What ran after this unit last time runs after it again (the order of one pass is fixed): fetch
            # that one ahead. One fetch in flight at a time, so at most two units are ever being held.
            ahead = self._successor.get(id(unit))
            if ahead is not None and not any(u.pending is not None for u in self.units):
                self._prefetch(ahead)
        return hook

    @contextlib.contextmanager
    def active(self, claim: bool = True):
        """The model runs inside: the weights outside the units (and resident units) are on the device.
        `claim=False` when `running()` has already asked ComfyUI for the device on behalf of several models."""
        self._active += 1
        try:
            if self._active == 1 and self.policy != "full":
                if claim:
                    host.claim_device(self)  # inside ComfyUI: its memory manager frees room and sets `resident`
                self._to_device(self.rest.slots + [s for u in self.units if u.resident for s in u.slots])
                for unit in self.units:
                    unit.on_device = unit.resident
                if self.policy == "model":
                    self._to_device(self._all())
            yield self
        finally:
            self._active -= 1
            if self._active == 0 and self.policy != "full":
                for unit in self.units:
                    if unit.pending is not None:
                        unit.pending.result()
                        unit.pending = None
                self._current = None
                if self.managed:  # ComfyUI keeps what it placed until it needs the memory (shed / unload)
                    self._to_offload([s for u in self.units if not u.resident for s in u.slots])
                else:
                    self._to_offload(self._all())
                for unit in self.units:
                    unit.on_device = unit.on_device and unit.resident and self.managed

    # ------------------------------------------------------------------ sizes and budgets (ComfyUI's manager)
    def total_bytes(self) -> int:
        return sum(_slot_bytes(m, n, b) for m, n, b in self._all())

    def loaded_bytes(self) -> int:
        """Bytes of weights on the compute device now."""
        on = lambda t: t.device == self.device and not (t.is_meta and self.device.type != "meta")  # noqa: E731
        if self.policy == "full":
            return self.total_bytes()
        return sum(_slot_bytes(m, n, b) for m, n, b in self._all()
                   if (m._buffers if b else m._parameters)[n] is not self._home[(id(m), n)]
                   and on((m._buffers if b else m._parameters)[n]))

    def fit(self, budget: float) -> int:
        """Keep as many units resident as `budget` bytes of weights allow (the weights outside units first) and
        put them on the device now; returns the bytes newly placed. A budget of at least the model's size makes
        everything resident."""
        if self.policy == "full":
            return 0
        before = self.loaded_bytes()
        used = self.rest.nbytes()
        if self.policy == "model" or budget >= self.total_bytes():
            chosen = list(self.units)
        else:
            chosen = []
            for unit in self.units:
                if used + unit.nbytes() > budget:
                    break
                chosen.append(unit)
                used += unit.nbytes()
        for unit in self.units:
            unit.resident = unit in chosen
        if self.policy == "model" or budget >= self.rest.nbytes():
            self._to_device(self.rest.slots + [s for u in chosen for s in u.slots])
            for unit in chosen:
                unit.on_device = True
        return max(0, self.loaded_bytes() - before)

    def shed(self, nbytes: float) -> int:
        """Send resident units home, last first, until `nbytes` are freed; returns the bytes freed."""
        freed = 0
        for unit in reversed(self.units):
            if freed >= nbytes:
                break
            if unit.resident or unit.on_device:
                unit.resident = False
                if not self._active:
                    self._to_offload(unit.slots)
                    unit.on_device = False
                    freed += unit.nbytes()
        return freed

    def unload(self) -> None:
        """Everything back home (ComfyUI unloading the model). Deferred while the model runs."""
        for unit in self.units:
            unit.resident = False
        if not self._active and self.policy != "full":
            self._to_offload(self._all())
            for unit in self.units:
                unit.on_device = False

    def copy_model(self) -> tuple[nn.Module, "Residency"]:
        """A private copy of the model, weights in memory (read from the file where needed), under the same
        policy: what a merge that changes weights (a LoRA, an adapter) works on, leaving this model untouched."""
        if self._active:
            raise RuntimeError("cannot copy a model while it runs")
        for module in self.model.modules():  # the copy gets hooks of its own
            module._forward_pre_hooks_saved, module._forward_pre_hooks = module._forward_pre_hooks, OrderedDict()
        try:
            clone = copy.deepcopy(self.model)
        finally:
            for module in self.model.modules():
                module._forward_pre_hooks = module.__dict__.pop("_forward_pre_hooks_saved")
        clone.file_slices = {}
        for (module, name, is_buffer), (clone_module, _, _) in zip(self._all(), _ordered_slots(clone, self)):
            source = self.sources.get((id(module), name))
            if source is not None:
                self._store(clone_module, name, is_buffer, source.read(self._home[(id(module), name)].dtype))
        return clone, Residency(clone, self.policy, self.device, offload_device=self.offload_device,
                                resident_blocks=self.resident_blocks if self.policy == "blocks" else None,
                                name=self.name)


def _entry_modules(block: nn.Module) -> list[nn.Module]:
    """The modules a forward calls to run `block`: the block, or the children of a container that is never called
    itself (a UNet level is a ModuleList of a resnet, an attention and a resampler)."""
    if isinstance(block, (nn.ModuleList, nn.ModuleDict)):
        return [entry for child in block.children() for entry in _entry_modules(child)]
    return [block]


def _ordered_slots(clone: nn.Module, residency: "Residency"):
    """The slots of a deep copy in the order of `residency._all()` (modules matched by their path)."""
    path_of = {id(m): p for p, m in residency.model.named_modules()}
    for module, name, is_buffer in residency._all():
        yield clone.get_submodule(path_of[id(module)]), name, is_buffer


def _all_slots(model: nn.Module):
    for module in model.modules():
        yield from ((module, n, False) for n, p in module._parameters.items() if p is not None)
        yield from ((module, n, True) for n, b in module._buffers.items() if b is not None)


@contextlib.contextmanager
def running(*residencies: "Residency | None"):
    """Run several models together (a UNet and its motion module, LLaMA and CLIP): one claim of the device for all
    of them, then each one's `active()`. None entries (models without a Residency) are skipped."""
    present = [r for r in residencies if r is not None]
    host.claim_device(*[r for r in present if r._active == 0 and r.policy != "full"])
    with contextlib.ExitStack() as stack:
        for residency in present:
            stack.enter_context(residency.active(claim=False))
        yield


def load(header, model_cls, *, policy: str, device: torch.device, dtype: torch.dtype, name: str,
         resident_blocks: int | None = None, budget_bytes: int | None = None, prefix: str = "", fp8: bool = False,
         **load_kwargs) -> tuple[nn.Module, "Residency"]:
    """Load a model (models/weights.load_model) under an offload policy; returns the model and its Residency.

    The policy is settled before reading: on the CPU, `blocks` and `sequential` leave the weights in the file."""
    device = torch.device(device)
    itemsize = 1 if fp8 else dtype.itemsize
    weight_bytes = sum(info.numel for key, info in header.tensors.items() if key.startswith(prefix)) * itemsize
    policy = resolve_policy(policy, weight_bytes, device, budget_bytes, has_blocks=hasattr(model_cls, "offload_blocks"))
    lazy = device.type == "cpu" and policy in ("blocks", "sequential")
    # Offloaded models are loaded where they wait between runs (a dry run on `meta` therefore reads weights
    # for an explicit offload policy; its default, `auto`, keeps everything on `meta`).
    offload_device = host.offload_device()
    managed = host.in_comfyui() and device.type != "meta"  # ComfyUI's manager places the weights (claim_device)
    target = device if policy == "full" and not managed else offload_device
    model = load_model(header, model_cls, dtype=dtype, device=target, prefix=prefix, fp8=fp8, lazy=lazy,
                       **load_kwargs)
    return model, Residency(model, policy, device, offload_device=offload_device, resident_blocks=resident_blocks,
                            budget_bytes=budget_bytes, name=name)


def resolve_policy(policy: str, weight_bytes: int, device: torch.device, budget_bytes: int | None = None, *,
                   has_blocks: bool = True) -> str:
    """The concrete policy for `auto`: `full` when the weights take at most AUTO_FULL_SHARE of the budget (the
    device's free memory unless given), else `blocks` (`sequential` for a model without blocks)."""
    if policy != "auto":
        if policy not in POLICIES:
            raise InputFileError(f"offload policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        return policy
    if device.type == "meta":
        return "full"  # a dry run reports what keeping everything resident needs
    budget = budget_bytes if budget_bytes is not None else _free_bytes(device)
    if weight_bytes <= AUTO_FULL_SHARE * budget:
        return "full"
    return "blocks" if has_blocks else "sequential"


def _free_bytes(device: torch.device) -> int:
    return host.free_memory(device)
