"""How weights are stored and loaded into models: one path from a checkpoint header to a ready module.

`load_model` reads a header's shapes, converts the key layout on `meta` tensors (no data), derives the config,
builds the model on `meta` and assigns the weights, each tensor read and converted once straight to its final
dtype, so no full-precision copy of a model ever exists. With `lazy=True` the weights that a layout keeps
as they are in a `.safetensors` file (a renamed key, not a merged or reshaped one) are not read at all: they stay
`meta` placeholders of the compute dtype, and `model.file_slices` says where each one lies in the file
(`FileSlice`), for runtime/offload.py to read per block. On the `meta` device nothing is read.

fp8 storage keeps every nn.Linear weight as torch.float8_e4m3fn (1 byte per value, no scale: values are cast
directly, as ComfyUI's "fp8_e4m3fn" weight dtype does) and upcasts one layer's weight to the compute dtype
when that layer runs. Parameter names never change, so state dicts, LoRA patching by name and saving keep
working; only the storage of the weights differs.

LoRAs on quantized layers (fp8 or GGUF weights) are not merged, which would need the weight in full precision and
would quantize the LoRA's small update away: `add_lora` keeps the low-rank pair beside the layer and adds
`strength * up @ (down @ x)` to its output when it runs (`merge_lora` picks merge or on-the-fly per layer).
"""

from __future__ import annotations

import math
import os
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ModelFileError
from . import checkpoints, gguf, gguf_blocks

FP8_DTYPE = torch.float8_e4m3fn
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _fp8_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    dtype = self.compute_dtype
    weight = self.weight.to(dtype)
    if getattr(self, "weight_scale", None) is not None:
        weight = weight * self.weight_scale.to(dtype)  # scaled fp8 files: the stored value times a per-layer scale
    bias = None if self.bias is None else self.bias.to(dtype)
    return F.linear(x.to(dtype), weight, bias)


def _gguf_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    dtype = self.compute_dtype
    weight = gguf_blocks.dequantize(self.weight, self.gguf_type, self.gguf_shape, dtype)
    bias = None if self.bias is None else self.bias.to(dtype)
    return F.linear(x.to(dtype), weight, bias)


def gguf_linear(layer: nn.Linear, compute_dtype: torch.dtype, qtype: str, raw: torch.Tensor) -> None:
    """Make an nn.Linear hold its weight as GGUF blocks (`raw` bytes) and dequantize them when it runs."""
    layer.gguf_type, layer.gguf_shape = qtype, tuple(layer.weight.shape)
    layer._parameters["weight"] = nn.Parameter(raw, requires_grad=False)
    layer.compute_dtype = compute_dtype
    layer.forward = types.MethodType(_gguf_linear_forward, layer)


def is_quantized(layer: nn.Module) -> bool:
    """Whether a layer's weight is stored quantized (fp8, GGUF blocks) and expanded when it runs."""
    return hasattr(layer, "gguf_type") or getattr(layer, "weight", None) is not None and layer.weight.dtype in FP8_DTYPES


def _lora_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = self.base_forward(x)
    x = x.to(out.dtype)
    for up, down, strength in self.loras:
        low = F.linear(x, down.to(device=x.device, dtype=out.dtype))
        out = out + strength * F.linear(low, up.to(device=x.device, dtype=out.dtype))
    return out


def add_lora(layer: nn.Module, up: torch.Tensor, down: torch.Tensor, strength: float) -> None:
    """Add `strength * up @ down` to a linear layer's weight on the fly: its output gains `strength * up(down(x))`.
    The pair stays on the CPU and meets the input on its device (LoRAs are small). Several LoRAs add up."""
    if "loras" not in layer.__dict__:
        layer.base_forward = layer.forward  # the layer's own (possibly quantized) forward
        layer.loras = []
        layer.forward = types.MethodType(_lora_forward, layer)
    layer.loras.append((up, down, float(strength)))


def linear_shape(layer: nn.Module) -> tuple[int, ...]:
    """The logical [out, in] shape of a linear layer's weight, also when it is stored as GGUF bytes."""
    return tuple(getattr(layer, "gguf_shape", None) or layer.weight.shape)


def merge_lora(layer: nn.Module, up: torch.Tensor, down: torch.Tensor, strength: float) -> None:
    """Apply one LoRA pair to a linear layer: merged into a full-precision weight (W += strength * up @ down, so
    the layer runs at its usual cost), kept beside a quantized one (`add_lora`)."""
    if is_quantized(layer):
        add_lora(layer, up, down, strength)
        return
    weight = layer.weight
    with torch.no_grad():
        delta = (up.float() @ down.float()).to(weight.device)
        weight.copy_((weight.float() + strength * delta).to(weight.dtype))


def _compact_embedding_forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids, self.weight, self.padding_idx).to(self.compute_dtype)


def compact_embedding(layer: nn.Embedding, compute_dtype: torch.dtype) -> None:
    """Keep an embedding table in its (narrower) stored dtype and widen only the rows looked up: the same values
    as widening the table first, at a fraction of its memory (LLaMA-3's 128k-token table is 2 GB in fp32)."""
    layer.compute_dtype = compute_dtype
    layer.forward = types.MethodType(_compact_embedding_forward, layer)


def fp8_linear(layer: nn.Linear, compute_dtype: torch.dtype, scale: torch.Tensor | None = None) -> None:
    """Make an nn.Linear whose weight is stored in fp8 upcast it (times `scale`, if given) when it runs."""
    if scale is not None:
        layer.register_buffer("weight_scale", scale.detach().float().reshape(()), persistent=False)
    layer.compute_dtype = compute_dtype
    layer.forward = types.MethodType(_fp8_linear_forward, layer)


def cast_linear_weights_fp8(module: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """Store the weight of every nn.Linear inside `module` as float8_e4m3fn and upcast it at forward time.

    Works in place and returns `module`. Biases stay in their dtype (they are small). Calling it again, or on
    weights that are already fp8, only (re)sets the compute dtype."""
    for layer in module.modules():
        if not isinstance(layer, nn.Linear):
            continue
        if layer.weight.dtype not in FP8_DTYPES:
            layer.weight = nn.Parameter(layer.weight.detach().to(FP8_DTYPE), requires_grad=False)
        fp8_linear(layer, compute_dtype)
    return module


@dataclass(frozen=True)
class FileSlice:
    """Where one weight lies in a .safetensors file: read on demand instead of held in memory."""

    path: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def read(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """The weight as `dtype` on `device`: read with one positioned read (no memory map stays behind)."""
        raw = torch.empty(self.nbytes, dtype=torch.uint8)
        with open(self.path, "rb", buffering=0) as f:
            got = os.preadv(f.fileno(), [memoryview(raw.numpy())], self.offset)
        if got != self.nbytes:
            raise ModelFileError(f"{self.path.name!r} ended early: expected {self.nbytes} bytes at offset "
                                 f"{self.offset}, read {got} (was the file changed or truncated after loading?)")
        return raw.view(self.dtype).reshape(self.shape).to(device=device, dtype=dtype)


def load_model(header: checkpoints.Header, model_cls, *, convert, config_from, dtype: torch.dtype,
               device: torch.device | str = "cpu", prefix: str = "", fp8: bool = False,
               lazy: bool = False) -> nn.Module:
    """A ready model from a checkpoint header: `convert(file tensors) -> internal state dict` (the layout's key
    conversion), `config_from(internal shapes) -> config`. See the module docstring for `lazy`.

    fp8 files (plain e4m3fn / e5m2 weights, or ComfyUI's scaled fp8 with a `scale_weight` per layer) keep their
    nn.Linear weights in fp8 and upcast them per layer (times the scale); other fp8 tensors are dequantized here.
    `fp8=True` also stores the other nn.Linear weights in fp8 e4m3fn."""
    device = torch.device(device)
    metas, scale_keys = checkpoints.split_scales(checkpoints.load_tensors(header, prefix=prefix, device="meta"))
    converted = convert(metas)
    config = config_from({k: tuple(v.shape) for k, v in converted.items()})
    source_of = {id(t): name for name, t in metas.items()}
    file_fp8 = {k for k, t in converted.items() if t.dtype in FP8_DTYPES}
    scales = {}
    if scale_keys:
        stored = {source_of.get(id(converted[k])): k for k in file_fp8}
        if None in stored:
            raise ModelFileError(f"{header.path.name!r}: scaled fp8 weights in the {model_cls.__name__} layout of "
                                 "this file are merged on loading, which KineFlow does not support; use a file in "
                                 "the ComfyUI or original layout")
        real_scales = checkpoints.load_tensors(header, prefix=prefix, names=set(scale_keys.values()))
        scales = {stored[w]: real_scales[s] for w, s in scale_keys.items() if w in stored}
        missing = sorted(k for k in file_fp8 if k not in scales)
        if missing:
            raise ModelFileError(f"{header.path.name!r} is a scaled fp8 file (it has a scaled_fp8 marker) but "
                                 f"{len(missing)} fp8 weights have no scale_weight (e.g. {missing[:3]}); the file "
                                 "is incomplete or was converted wrongly")
    meta_model = build_on_meta(model_cls, config)
    check_fits(model_cls, meta_model.state_dict(), converted)  # before any tensor data is read
    modules = dict(meta_model.named_modules())
    linear_keys = {f"{n}.weight" for n, m in modules.items() if isinstance(m, nn.Linear)}
    fp8_keys = (file_fp8 | (linear_keys if fp8 else set())) & linear_keys
    # When weights stay in the file (offloading on the CPU), embedding tables stored narrower than the compute
    # dtype stay as stored (see compact_embedding). Not otherwise: a model loaded whole may be trained.
    compact_keys = {f"{n}.weight" for n, m in modules.items() if lazy and isinstance(m, nn.Embedding)
                    and converted[f"{n}.weight"].is_floating_point()
                    and converted[f"{n}.weight"].dtype.itemsize < dtype.itemsize
                    and converted[f"{n}.weight"].dtype not in FP8_DTYPES}
    info_of = {k: header.tensors.get(prefix + source_of.get(id(t), "\0")) for k, t in converted.items()}
    # GGUF blocks of nn.Linear weights stay blocks in memory (dequantized per layer); other tensors are
    # dequantized once, at load.
    gguf_keys = {k: info.dtype for k, info in info_of.items()
                 if k in linear_keys and info is not None and info.dtype in gguf.BLOCKS}
    slices: dict[str, FileSlice] = {}
    if lazy and device.type != "meta":
        for name, t in converted.items():
            info = info_of[name]
            if info is None or info.offset is None:
                continue
            if name in gguf_keys:
                slices[name] = FileSlice(info.file, info.offset, torch.uint8,
                                         (gguf.storage_bytes(info.dtype, info.numel),))
            elif name in fp8_keys or (t.dtype not in FP8_DTYPES and info.dtype not in gguf.BLOCKS):
                slices[name] = FileSlice(info.file, info.offset, t.dtype, tuple(t.shape))
    if device.type == "meta":
        sd = converted
    elif len(slices) == len(converted):
        sd = dict(converted)  # nothing to read now
    else:
        # Everything not left in the file, except GGUF linear weights (read as blocks below).
        later = {source_of[id(converted[k])] for k in gguf_keys}
        names = {n for n in metas if n not in later} | set(scale_keys.values())
        raw = checkpoints.load_tensors(header, prefix=prefix, dtype=dtype, keep_dtypes=FP8_DTYPES, names=names)
        sd = convert(checkpoints.split_scales(raw)[0])
        for key in file_fp8 - fp8_keys:  # fp8 tensors outside nn.Linear: dequantized once, here
            sd[key] = (sd[key].float() * scales[key].float() if key in scales else sd[key].float()).to(dtype)
        for key in compact_keys:  # back to the stored dtype (exact: it was widened from it)
            sd[key] = sd[key].to(converted[key].dtype)
    for key in gguf_keys:
        sd[key] = torch.empty(converted[key].shape, dtype=dtype, device="meta")
    for name in slices:
        kept = name in fp8_keys or name in compact_keys
        sd[name] = torch.empty(converted[name].shape, dtype=slices[name].dtype if kept else dtype, device="meta")
    model = load_into_meta_model(model_cls, config, sd, dtype, fp8_keys=fp8_keys, device=device, model=meta_model,
                                 lazy=set(slices) | set(gguf_keys), keep_keys=compact_keys)
    for key in compact_keys:
        compact_embedding(model.get_submodule(key.removesuffix(".weight")), dtype)
    for key in fp8_keys:
        fp8_linear(model.get_submodule(key.removesuffix(".weight")), dtype,
                   scales[key].to(device) if key in scales and device.type != "meta" else scales.get(key))
    for key, qtype in gguf_keys.items():
        if device.type == "meta" or key in slices:  # shapes only, or read later from the file
            raw = torch.empty(gguf.storage_bytes(qtype, info_of[key].numel), dtype=torch.uint8, device="meta")
        else:
            raw = gguf_blocks.read_raw(info_of[key]).to(device)
        gguf_linear(model.get_submodule(key.removesuffix(".weight")), dtype, qtype, raw)
    model.file_slices = slices
    return model


_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                 "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


def build_on_meta(model_cls, config) -> nn.Module:
    """`model_cls(config)` on the meta device without running torch.nn.init: the weights come from the file.
    (Initialisers on meta tensors compute nothing, but they run through PyTorch's reference kernels, whose first
    use imports torch._dynamo: about a second of every cold start.)"""
    saved = {name: getattr(nn.init, name) for name in _INITIALISERS}
    for name in _INITIALISERS:
        setattr(nn.init, name, _keep)
    try:
        with torch.device("meta"):
            return model_cls(config)
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _keep(tensor, *args, **kwargs):
    return tensor


def check_fits(model_cls, expected: dict, state_dict: dict) -> None:
    """Raise ModelFileError unless `state_dict` (tensors or meta tensors) has exactly the keys and shapes of
    `expected` (the model's own state dict)."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong_shape:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong_shape:
            k = wrong_shape[0]
            details.append(
                f"{len(wrong_shape)} with other shapes (e.g. {k}: expected {tuple(expected[k].shape)}, "
                f"found {tuple(state_dict[k].shape)})"
            )
        raise ModelFileError(f"weights do not fit {model_cls.__name__} with the derived config: " + "; ".join(details))


def load_into_meta_model(model_cls, config, state_dict: dict, dtype: torch.dtype, fp8: bool = False,
                         device: torch.device | str = "cpu", lazy: set[str] = frozenset(),
                         fp8_keys: set[str] | None = None, keep_keys: set[str] = frozenset(),
                         model: nn.Module | None = None) -> nn.Module:
    """Build `model_cls(config)` on the meta device (or take `model`, built so), assign `state_dict` (internal layout) into it and move it to
    `device` (in eval mode, without gradients).

    Each tensor is converted once, straight to its final dtype (`dtype`, or fp8 for the nn.Linear weights named in
    `fp8_keys`, all of them when `fp8`), so no full-precision copy of the model ever exists. Raises ModelFileError on missing or
    unexpected keys or mismatched shapes. On `device="meta"` (a dry run) the state dict holds shapes only; the
    weights named in `lazy` stay `meta` placeholders on any device (their data is read later, by the offloader)."""
    model = model if model is not None else build_on_meta(model_cls, config)
    if fp8_keys is None:
        fp8_keys = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)} if fp8 else set()
    check_fits(model_cls, model.state_dict(), state_dict)
    converted = {}
    for key, tensor in state_dict.items():
        if key in fp8_keys:
            target = tensor.dtype if tensor.dtype in FP8_DTYPES else FP8_DTYPE
        elif key in keep_keys:
            target = tensor.dtype
        else:
            target = dtype if tensor.is_floating_point() else tensor.dtype
        converted[key] = tensor.to(target)
    model.load_state_dict(converted, strict=True, assign=True)
    if fp8:
        cast_linear_weights_fp8(model, dtype)
    device = torch.device(device)
    if device.type != "meta":
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if tensor.is_meta and name not in lazy:
                raise ModelFileError(f"{model_cls.__name__}: {name} was not filled from the weights (still on meta)")
        # Moving the module would try to copy the placeholders: move each filled tensor on its own.
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for name, tensor in table.items():
                    if tensor is not None and not tensor.is_meta and tensor.device != device:
                        moved = tensor.data.to(device)
                        table[name] = nn.Parameter(moved, requires_grad=False) if isinstance(tensor, nn.Parameter) else moved
        return model.eval().requires_grad_(False)
    return model.to(device).eval().requires_grad_(False)
