"""LoRA files for the HunyuanVideo transformer: the published formats, matched to the model's linear layers.

Formats, told apart by their key names (each LoRA is a `down` [rank, in] and `up` [out, rank] pair, optionally with
an `alpha`; the update is `up @ down * alpha / rank`, or `up @ down` without alpha):
- kohya / musubi-tuner: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.lora_up.weight`, `.alpha`
  (the module path with its dots written as underscores);
- diffusers / PEFT: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`, `.lora_B.weight` (diffusers module
  names; PEFT files may start with `base_model.model.`);
- ComfyUI-style: `diffusion_model.double_blocks.0.img_attn_qkv.lora_up.weight` (original or ComfyUI names, either
  pair naming).

A file may also (or only) carry LoRAs for the text encoders, LLaMA and CLIP-L (`text_encoder_updates`). Which encoder
a layer belongs to is told by its module path, never by a prefix's number, since the conventions disagree on those:
- kohya-style `lora_te_`, `lora_te1_`, `lora_te2_` + the underscored module path: ComfyUI's key map reads
  `lora_te_text_model_encoder_layers_N_...` and `lora_te1_text_model_...` (SDXL numbering) as CLIP-L; OneTrainer's
  HunyuanVideo LoRAs write the LLaMA as `lora_te1_layers_N_self_attn_q_proj` (diffusers' LlamaModel names) and
  CLIP-L as `lora_te2_text_model_encoder_layers_N_...`; `lora_te_model_layers_N_...` (the LLaMA with `model.`, as
  ComfyUI and transformers' causal LM name it) is read too;
- diffusers / PEFT, named after HunyuanVideoPipeline's components: `text_encoder.layers.N.self_attn.q_proj` (the
  LlamaModel) and `text_encoder_2.text_model.encoder.layers.N...` (the CLIPTextModel); ComfyUI also reads
  `text_encoder.text_model.encoder.layers.N...` as CLIP-L;
- ComfyUI's generic names, `text_encoders.` + a module of its HunyuanVideo text encoder:
  `text_encoders.llama.transformer.model.layers.N...`, `text_encoders.clip_l.transformer.text_model...`;
- OneTrainer's OMI names: `llama.language_model.model.layers.N...`, `clip_l.text_model.encoder.layers.N...`.

The transformer fuses what diffusers keeps apart: q, k, v into one `..._attn_qkv` layer, and q, k, v plus the MLP
input into each single block's `linear1`. LoRAs on the parts become one LoRA on the fused layer: the downs
stacked, the ups block-diagonal, so the fused update is exactly the parts' updates one above the other.

Recognising a LoRA file (`kineflow inspect`) needs no torch; it is imported where tensors are handled.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

from ..errors import KineFlowError, ModelFileError

if TYPE_CHECKING:
    import torch
    from torch import nn

_ROLE_SUFFIXES = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_A.weight", "down"),
                  (".lora_B.weight", "up"), (".alpha", "alpha"))
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
KOHYA_PREFIX = "lora_unet_"


def is_hunyuan_video_lora(keys: Iterable[str]) -> bool:
    """LoRA pairs whose names are HunyuanVideo transformer blocks in one of the formats above (not, say, an SD
    UNet's `down_blocks...transformer_blocks`), or a file of text-encoder LoRAs only (LLaMA and / or CLIP-L)."""
    keys = list(keys)
    if not any(k.endswith(suffix) for k in keys for suffix, role in _ROLE_SUFFIXES if role != "alpha"):
        return False
    if any(k.startswith((KOHYA_PREFIX + "double_blocks_", KOHYA_PREFIX + "single_blocks_")) or
           re.match(r"(\w+\.)?(double_blocks|single_blocks|single_transformer_blocks)\.\d", k) or
           re.match(r"(base_model\.model\.|transformer\.)?transformer_blocks\.\d", k) for k in keys):
        return True
    return all(is_text_encoder_key(k) for k in keys) and any(text_encoder_of(k) for k in keys)


def lora_format(keys: Iterable[str]) -> str:
    """"kohya", "diffusers" or "comfy" (original / ComfyUI module names)."""
    keys = list(keys)
    if any(k.startswith((KOHYA_PREFIX, TEXT_KOHYA_PREFIX)) for k in keys):
        return "kohya"
    if any("transformer_blocks." in k or k.startswith(("text_encoder.", "text_encoder_2.")) for k in keys):
        return "diffusers"
    return "comfy"


# --------------------------------------------------------------------------- text encoders (see the module docstring)
TEXT_KOHYA_PREFIX = "lora_te"  # lora_te_, lora_te1_, lora_te2_
# Prefixes in front of an encoder's own module path; the LLaMA's path may lack the `model.` of the internal names.
_TEXT_PREFIXES = ("text_encoders.llama.transformer.", "text_encoders.clip_l.transformer.", "text_encoder_2.",
                  "text_encoder.", "llama.language_model.", "clip_l.")
_TEXT_MARKERS = (TEXT_KOHYA_PREFIX, "text_encoders.", "text_encoder.", "text_encoder_2.", "llama.", "clip_l.")
TEXT_ENCODER_NAMES = {"llama": "LLaMA", "clip": "CLIP-L"}


def is_text_encoder_key(key: str) -> bool:
    """Whether a LoRA key is named for a text encoder (in any of the conventions), not the transformer."""
    return key.startswith(_TEXT_MARKERS)


def text_encoder_of(key: str) -> str | None:
    """"llama" or "clip" when a text-encoder LoRA key names a layer of that encoder's shape of model, else None."""
    if not is_text_encoder_key(key):
        return None
    if re.search(r"(^|[._])text_model[._]encoder[._]layers[._]\d", key):
        return "clip"
    if re.search(r"(^|[._])layers[._]\d+[._](self_attn|mlp)[._]", key):
        return "llama"
    return None


def split_text_encoder(tensors: Mapping[str, object]) -> tuple[dict[str, object], dict[str, object]]:
    """(the transformer's tensors, the text encoders') of a LoRA file."""
    text = {k: v for k, v in tensors.items() if is_text_encoder_key(k)}
    return {k: v for k, v in tensors.items() if k not in text}, text


def _text_target(name: str, kohya_names: dict[str, tuple[str, str]], linears: dict[str, set[str]]
                 ) -> tuple[str, str] | None:
    """(encoder, internal module path) of a text-encoder LoRA's module name; None if it matches no layer."""
    kohya = re.match(TEXT_KOHYA_PREFIX + r"\d?_(.+)", name)
    if kohya:
        return kohya_names.get(kohya.group(1))
    for prefix in _TEXT_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    else:
        return None
    for encoder, names in linears.items():
        for candidate in (name, "model." + name):
            if candidate in names:
                return encoder, candidate
    return None


def text_encoder_updates(tensors: Mapping[str, torch.Tensor], encoders: Mapping[str, nn.Module]
                         ) -> tuple[dict[str, list[Update]], list[str]]:
    """{encoder ("llama" / "clip"): its layer updates} from a LoRA file's text-encoder tensors, and the LoRA module
    names matching no layer of either encoder (`encoders`: {"llama": LlamaTextEncoder, "clip": CLIPTextModel})."""
    from torch import nn

    from .weights import linear_shape

    pairs = lora_pairs(tensors)
    linears = {encoder: {name for name, m in net.named_modules() if isinstance(m, nn.Linear)}
               for encoder, net in encoders.items()}
    kohya_names = {}
    for encoder, names in linears.items():
        for name in names:
            kohya_names[name.replace(".", "_")] = (encoder, name)
            if name.startswith("model."):  # diffusers' LlamaModel has no `model.` level
                kohya_names[name[len("model."):].replace(".", "_")] = (encoder, name)
    updates: dict[str, list[Update]] = {}
    unmatched = []
    for name, pair in pairs.items():
        target = _text_target(name, kohya_names, linears)
        if target is None:
            unmatched.append(name)
            continue
        encoder, module = target
        expected = tuple(linear_shape(encoders[encoder].get_submodule(module)))
        found = (pair.up.shape[0], pair.down.shape[1])
        if found != expected:
            raise ModelFileError(f"the LoRA for {name!r} is {list(found)} ([out, in]); the {TEXT_ENCODER_NAMES[encoder]} "
                                 f"layer {module!r} is {list(expected)}: is it a LoRA for another text encoder?")
        updates.setdefault(encoder, []).append(Update(module, pair.scaled_up(), pair.down))
    return updates, unmatched


@dataclass
class LoraPair:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def scaled_up(self) -> torch.Tensor:
        """`up` times alpha / rank, so that the update is `scaled_up() @ down`."""
        return self.up if self.alpha is None else self.up * (self.alpha / self.rank)


def read_pairs(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, LoraPair], list[str]]:
    """{module name as stored: its pair} and the keys that are no part of a LoRA pair."""
    roles: dict[str, dict[str, torch.Tensor]] = {}
    stray = []
    for key, tensor in tensors.items():
        for suffix, role in _ROLE_SUFFIXES:
            if key.endswith(suffix):
                roles.setdefault(key[: -len(suffix)], {})[role] = tensor
                break
        else:
            stray.append(key)
    pairs = {}
    for module, found in roles.items():
        if "down" not in found or "up" not in found:
            missing = "up" if "down" in found else "down"
            raise ModelFileError(f"the LoRA for {module!r} has no {missing} weight")
        down, up = found["down"], found["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ModelFileError(f"the LoRA for {module!r} has shapes down {list(down.shape)} and up {list(up.shape)}; "
                                 "expected [rank, in] and [out, rank]")
        alpha = found.get("alpha")
        pairs[module] = LoraPair(down, up, None if alpha is None or alpha.is_meta else float(alpha.float()))
    return pairs, stray


def lora_pairs(tensors: Mapping[str, torch.Tensor]) -> dict[str, LoraPair]:
    """`read_pairs` of a file that must hold LoRA weights only."""
    pairs, stray = read_pairs(tensors)
    if stray:
        raise ModelFileError(f"{len(stray)} tensors are not LoRA weights (e.g. {stray[:3]}); expected names ending in "
                             "lora_down/lora_up/lora_A/lora_B '.weight' or '.alpha'")
    return pairs


def describe(tensors: Mapping[str, object]) -> dict:
    """What `kineflow inspect` says of a LoRA file: format, rank(s), how many transformer layers it targets and how
    many of each text encoder's (from names and shapes)."""
    ranks = {tuple(info.shape)[0] for key, info in tensors.items()
             if key.endswith((".lora_down.weight", ".lora_A.weight"))}
    targets = {key.rsplit(".lora_", 1)[0] for key in tensors if ".lora_" in key}
    text = {encoder: len({t for t in targets if text_encoder_of(t) == encoder}) for encoder in TEXT_ENCODER_NAMES}
    return {"format": lora_format(tensors), "rank": sorted(ranks)[0] if len(ranks) == 1 else sorted(ranks),
            "targets": len([t for t in targets if not is_text_encoder_key(t)]), "text_encoder_targets": text}


# --------------------------------------------------------------------------- matching to the transformer
@dataclass
class Update:
    """One layer's LoRA update `up @ down` (alpha folded into `up`)."""

    module: str
    up: torch.Tensor
    down: torch.Tensor


def _resolve(name: str, kohya_names: dict[str, str], linears: set[str]) -> tuple[str, int | None] | None:
    """(internal module path, part of a fused layer or None) of a LoRA's module name; None if it matches nothing."""
    if name.startswith(KOHYA_PREFIX):
        found = kohya_names.get(name[len(KOHYA_PREFIX):])
        return (found, None) if found else None
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if name in linears:
        return name, None
    from . import hunyuan_video_dit as dit_mod

    comfy = name + ".weight"
    for pattern, replacement in dit_mod._COMFY_RULES:
        comfy = re.sub(pattern, replacement, comfy)
    if comfy.removesuffix(".weight") in linears:
        return comfy.removesuffix(".weight"), None
    for pattern, template, part in dit_mod._DIFFUSERS_COMPILED:
        match = pattern.match(name + ".weight")
        if match and part != "swap":
            target = template.format(*match.groups()).removesuffix(".weight")
            return (target, part) if target in linears else None
    return None


def dit_updates(tensors: Mapping[str, torch.Tensor], net: nn.Module) -> tuple[list[Update], list[str]]:
    """The transformer's layer updates from a LoRA file's tensors, and the LoRA module names matching no layer."""
    from torch import nn

    from .weights import linear_shape

    pairs = lora_pairs(tensors)
    linears = {name for name, m in net.named_modules() if isinstance(m, nn.Linear)}
    kohya_names = {name.replace(".", "_"): name for name in linears}
    whole: dict[str, list[LoraPair]] = {}
    parts: dict[str, dict[int, LoraPair]] = {}
    unmatched = []
    for name, pair in pairs.items():
        resolved = _resolve(name, kohya_names, linears)
        if resolved is None:
            unmatched.append(name)
        elif resolved[1] is None:
            whole.setdefault(resolved[0], []).append(pair)
        else:
            parts.setdefault(resolved[0], {})[resolved[1]] = pair
    updates = [Update(module, pair.scaled_up(), pair.down) for module, found in whole.items() for pair in found]
    hidden = net.config.hidden_size
    for module, found in parts.items():
        out = linear_shape(net.get_submodule(module))[0]
        sizes = [hidden, hidden, hidden, out - 3 * hidden] if module.endswith("linear1") else [out // 3] * 3
        updates.append(_fuse(module, found, sizes))
    return updates, unmatched


def _fuse(module: str, found: dict[int, LoraPair], sizes: list[int]) -> Update:
    """One pair for a fused layer from pairs on some of its parts: rows of part i get up_i @ down_i."""
    import torch

    order = sorted(found)
    ranks = [found[i].rank for i in order]
    first = found[order[0]]
    up = torch.zeros(sum(sizes), sum(ranks), dtype=first.up.dtype, device=first.up.device)
    row_start = [sum(sizes[:i]) for i in range(len(sizes))]
    col = 0
    for i, rank in zip(order, ranks):
        pair = found[i]
        if pair.up.shape[0] != sizes[i]:
            raise ModelFileError(f"the LoRA for part {i} of {module!r} has {pair.up.shape[0]} outputs; the layer's "
                                 f"part has {sizes[i]}")
        up[row_start[i]: row_start[i] + sizes[i], col: col + rank] = pair.scaled_up()
        col += rank
    return Update(module, up, torch.cat([found[i].down for i in order], dim=0))


def block_strengths(spec: str) -> Callable[[str], float]:
    """Per-block strength multipliers from text such as `double_blocks.0-9=0.5, single_blocks=0`: each entry a
    module-path prefix (a block index may be a range `a-b`) and a factor; the most specific matching entry (the
    narrowest range) wins, else 1."""
    rules = []
    for entry in filter(None, (e.strip() for e in spec.replace("\n", ",").split(","))):
        target, sep, value = entry.partition("=")
        match = re.fullmatch(r"(double_blocks|single_blocks)(?:\.([0-9]{1,6})(?:-([0-9]{1,6}))?)?", target.strip())
        try:
            factor = float(value)
        except ValueError:
            factor = None
        if factor is not None and not math.isfinite(factor):
            factor = None
        if not sep or match is None or factor is None:
            raise KineFlowError(f"block strength {entry!r} is not understood; expected entries such as "
                                 "'double_blocks=0.5', 'single_blocks.10=0' or 'double_blocks.0-9=1.2'")
        group, first, last = match.groups()
        low = int(first) if first is not None else None
        rules.append((group, low, int(last) if last is not None else low, factor))

    def strength(module: str) -> float:
        group, _, rest = module.partition(".")
        index = int(rest.split(".", 1)[0]) if rest[:1].isdigit() else None
        best, best_width = 1.0, None
        for rule_group, low, high, factor in rules:
            if rule_group != group or (low is not None and (index is None or not low <= index <= high)):
                continue
            width = float("inf") if low is None else high - low
            if best_width is None or width <= best_width:
                best, best_width = factor, width
        return best

    return strength
