"""Memory helpers shared by the model loaders: fp8 weight storage and building models without a float32 copy.

fp8 storage keeps every nn.Linear weight as torch.float8_e4m3fn (1 byte per value, no scale: values are cast
directly, as ComfyUI's "fp8_e4m3fn" weight dtype does) and upcasts one layer's weight to the compute dtype
when that layer runs. Parameter names do not change, so state dicts, LoRA patching by name and saving keep
working; only the storage dtype of those weights differs.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ModelFileError

FP8_DTYPE = torch.float8_e4m3fn


def _fp8_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    dtype = self.compute_dtype
    bias = None if self.bias is None else self.bias.to(dtype)
    return F.linear(x.to(dtype), self.weight.to(dtype), bias)


def cast_linear_weights_fp8(module: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """Store the weight of every nn.Linear inside `module` as float8_e4m3fn and upcast it at forward time.

    Works in place and returns `module`. Biases stay in their dtype (they are small). Calling it again, or on
    weights that are already fp8, only (re)sets the compute dtype."""
    for layer in module.modules():
        if not isinstance(layer, nn.Linear):
            continue
        if layer.weight.dtype != FP8_DTYPE:
            layer.weight = nn.Parameter(layer.weight.detach().to(FP8_DTYPE), requires_grad=False)
        layer.compute_dtype = compute_dtype
        layer.forward = types.MethodType(_fp8_linear_forward, layer)
    return module


def load_into_meta_model(model_cls, config, state_dict: dict, dtype: torch.dtype, fp8: bool = False,
                         device: torch.device | str = "cpu") -> nn.Module:
    """Build `model_cls(config)` on the meta device, assign `state_dict` (internal layout) into it and move it to
    `device` (in eval mode, without gradients).

    Each tensor is converted once, straight to its final dtype (`dtype`, or float8_e4m3fn for nn.Linear weights
    when `fp8`), so no full-precision copy of the model ever exists. Raises ModelFileError on missing or
    unexpected keys or mismatched shapes. On `device="meta"` (a dry run) the state dict holds shapes only."""
    with torch.device("meta"):
        model = model_cls(config)
    fp8_keys = set()
    if fp8:
        fp8_keys = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    expected = model.state_dict()
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
    converted = {}
    for key, tensor in state_dict.items():
        target = FP8_DTYPE if key in fp8_keys else (dtype if tensor.is_floating_point() else tensor.dtype)
        converted[key] = tensor.to(target)
    model.load_state_dict(converted, strict=True, assign=True)
    if fp8:
        cast_linear_weights_fp8(model, dtype)
    device = torch.device(device)
    if device.type != "meta":
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if tensor.is_meta:
                raise ModelFileError(f"{model_cls.__name__}: {name} was not filled from the weights (still on meta)")
    return model.to(device).eval().requires_grad_(False)
