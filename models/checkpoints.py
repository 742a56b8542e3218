"""Checkpoint files: header reading, family/layout/version detection and safe tensor loading.

One path for every model family (see DEVELOPING.md): `read_header` gives names, dtypes and shapes without
touching tensor data (a 25 GB safetensors file answers instantly), `detect` names the family, key layout and
version from those names and shapes, and `load_tensors` reads the data only when a loader asks for it.

Only `.safetensors` is read natively. `.pt/.pth/.ckpt/.bin` go through `torch.load(weights_only=True)`;
a file that needs arbitrary unpickling is refused, never executed.

torch is imported by the functions that read tensor data or pickles only: reading a .safetensors or .gguf header
(`kineflow inspect`) needs none of it.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

from ..errors import ModelFileError

if TYPE_CHECKING:
    import torch

SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
PICKLE_EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin")
# Nested wrappers found in released .pt/.ckpt files: HunyuanVideo's {"module": ...}, Lightning's {"state_dict": ...},
# guoyww/AnimateDiff's SparseCtrl training checkpoints {"controlnet": ...}.
WRAPPER_KEYS = ("module", "state_dict", "model", "ema", "controlnet")
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype name -> (torch's name for it, bytes per value)
_SAFETENSORS_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
_DTYPE_NAMES = {torch_name: name for name, (torch_name, _) in _SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors spelling: F32, BF16, F8_E4M3, ...
    shape: tuple[int, ...]
    # Where the data lies, for tensors of a .safetensors file: the file and the absolute offset of the first byte.
    file: Path | None = None
    offset: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Header:
    """What a checkpoint holds, without its data."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    wrapper: str | None = None  # e.g. "module" when the .pt nests the state dict

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.tensors.items()}


# The numbers loaders take from a file's metadata (what tensor shapes cannot tell), by family: each a finite number
# above 0, an int where an int is read. Validation checks them from the header before anything loads.
METADATA_NUMBERS: dict[str, dict[str, type]] = {
    "hunyuan_video_vae": {"scaling_factor": float, "norm_num_groups": int},
    "llama_text": {"llama.attention.head_count": int, "llama.rope.freq_base": float,
                   "llama.attention.layer_norm_rms_epsilon": float},
}


def metadata_numbers(header: Header, family: str) -> dict[str, int | float]:
    """The numbers of METADATA_NUMBERS[family] that the file's metadata gives; one that is unusable is a ModelFileError
    naming the file and the key."""
    numbers = {}
    for key, kind in METADATA_NUMBERS.get(family, {}).items():
        if key not in header.metadata:
            continue
        text = header.metadata[key]
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            value = None
        if value is None or not math.isfinite(value) or value <= 0:
            expected = "a whole number" if kind is int else "a finite number"
            raise ModelFileError(f"{header.path.name!r} has metadata {key} = {text[:40]!r}; expected {expected} "
                                 "above 0")
        numbers[key] = value
    return numbers


@dataclass
class Detection:
    family: str | None  # hunyuan_video_dit, hunyuan_video_vae, clip_text, llama_text, sd15_unet, sd_vae, ...
    layout: str | None  # original, comfy, diffusers, ldm, hf
    version: str | None = None
    prefix: str = ""  # key prefix stripped before conversion (e.g. "model.diffusion_model.")
    note: str = ""

    def describe(self) -> str:
        if self.family is None:
            return "an unrecognised checkpoint" + (f" ({self.note})" if self.note else "")
        parts = [self.family]
        if self.version:
            parts.append(self.version)
        parts.append(f"{self.layout} layout")
        return "a " + ", ".join(parts) + " checkpoint"


# --------------------------------------------------------------------------- header reading
def read_header(path: str | os.PathLike) -> Header:
    """Read tensor names, dtypes and shapes of a checkpoint file or Hugging Face model folder."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        return _read_folder_header(path)
    if not path.is_file():  # opening a FIFO would wait forever for a writer; a device never ends
        raise ModelFileError(f"{str(path)!r} is not a regular file (a pipe, device or socket); expected a checkpoint file")
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        from . import gguf

        return gguf.read_header(path)
    if suffix in SAFETENSORS_EXTENSIONS or _looks_like_safetensors(path):
        return _read_safetensors_header(path)
    if suffix in PICKLE_EXTENSIONS:
        return _read_pickle_header(path)
    raise ModelFileError(
        f"{path.name!r} is not a checkpoint KineFlow can read: expected a .safetensors file "
        f"(or .pt/.pth/.ckpt/.bin loadable with weights_only=True, or a model folder), found suffix {suffix or 'none'!r}"
    )


def _looks_like_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < MAX_HEADER_BYTES


def _read_safetensors_header(path: Path) -> Header:
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ValueError(f"file is {size} bytes long, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_BYTES or n + 8 > size:
                raise ValueError(f"header length {n} does not fit in a file of {size} bytes")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise ValueError(f"__metadata__ is a {type(metadata).__name__}; expected an object of strings")
        tensors = {}
        data_len = size - 8 - n
        for name, info in header.items():
            dtype, shape, start, end = _tensor_entry(name, info)
            if end > data_len or start > end:
                raise ValueError(f"tensor {name!r} lies outside the file's data region (truncated download?)")
            if dtype in _SAFETENSORS_DTYPES and end - start != math.prod(shape) * _SAFETENSORS_DTYPES[dtype][1]:
                raise ValueError(f"tensor {name!r} of shape {list(shape)} and dtype {dtype} needs "
                                 f"{math.prod(shape) * _SAFETENSORS_DTYPES[dtype][1]} bytes; the header gives it "
                                 f"{end - start}")
            tensors[name] = TensorInfo(str(dtype), shape, path, 8 + n + int(start))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path.name!r} is not a valid safetensors file: {e}") from None
    except RecursionError:
        raise ModelFileError(f"{path.name!r} is not a valid safetensors file: its header nests too deeply") from None
    return Header(path, tensors, {str(k): str(v) for k, v in metadata.items()})


def _tensor_entry(name: str, info) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, start, end) of one header entry, each checked for its JSON type (a ValueError if wrong)."""
    if not isinstance(info, dict):
        raise ValueError(f"entry {name!r} is a {type(info).__name__}; expected an object with dtype, shape, data_offsets")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise ValueError(f"tensor {name!r} has dtype {dtype!r}; expected a name such as 'BF16'")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"tensor {name!r} has shape {str(shape)[:80]}; expected a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets):
        raise ValueError(f"tensor {name!r} has data_offsets {str(offsets)[:80]}; expected two non-negative integers")
    return dtype, tuple(shape), offsets[0], offsets[1]


# Bytes a file may take in memory once read; a legacy (non-zip) pickle larger than this is refused, as torch.load reads
# it whole. runtime/host.py sets it to the user's memory budget; None: no limit.
read_budget: Callable[[], int | None] = lambda: None

# torch.load(weights_only=True) has published bypasses before this release (CVE-2025-32434 below 2.6.0;
# GHSA-63cw-57p8-fm3p, memory corruption from crafted checkpoints, up to 2.9.1).
SAFE_PICKLE_TORCH = (2, 10)


def _torch_load(path: Path):
    import torch

    found = tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
    if found < SAFE_PICKLE_TORCH:
        raise ModelFileError(
            f"refused to load {path.name!r}: .pt/.ckpt files are pickles, and this PyTorch ({torch.__version__}) "
            f"has known ways for a crafted pickle to escape weights_only loading; fixed in "
            f"{'.'.join(map(str, SAFE_PICKLE_TORCH))}. Update PyTorch, or use the model's .safetensors release")
    zipped, size, budget = _is_zip(path), path.stat().st_size, read_budget()
    if not zipped and budget is not None and size > budget:
        raise ModelFileError(
            f"refused to load {path.name!r}: it is a legacy (non-zip) PyTorch pickle of {size / 2**30:.2f} GiB, "
            f"which torch.load reads whole into memory, more than the memory budget of {budget / 2**30:.2f} GiB. "
            "Convert it to .safetensors (or re-save it with a current torch.save), or raise the memory budget "
            "(--memory-budget or $KINEFLOW_MEMORY_BUDGET, in GiB)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as e:  # torch raises UnpicklingError (or RuntimeError wrapping it) for unsafe content
        text = str(e)
        if "weights_only" in text or "Unpickl" in type(e).__name__ or "unpickl" in text.lower():
            raise ModelFileError(
                f"refused to load {path.name!r}: it contains Python objects that only unsafe unpickling can "
                "restore, which could run arbitrary code. KineFlow loads .pt/.ckpt files only with "
                "torch.load(weights_only=True). Convert the file to .safetensors with a tool you trust, "
                "or use the .safetensors release of this model."
            ) from None
        raise ModelFileError(f"could not read {path.name!r} as a PyTorch checkpoint: {text.splitlines()[0] if text else e!r}") from None


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _unwrap(obj) -> tuple[dict, str | None]:
    """Return the flat name->tensor dict of a loaded pickle and the wrapper key it was under, if any."""
    import torch

    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                return {k: v for k, v in obj[key].items() if isinstance(v, torch.Tensor)}, key
    if isinstance(obj, Mapping):
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, None
    raise ModelFileError(f"expected a dictionary of tensors, found a {type(obj).__name__}")


def _pickle_state_dict(path: Path) -> tuple[dict, str | None]:
    """The tensors of a .pt/.ckpt file (and the wrapper key they were under). fp8 weights in a pickle are the
    official HunyuanVideo FP8 release (`..._fp8.pt`), whose per-layer scales lie in a sibling `..._fp8_map.pt`
    ({module name: scale}): they join the tensors as ComfyUI's scaled-fp8 layout spells them (`<module>.scale_weight`
    and a `scaled_fp8` marker), so one loading path serves both."""
    import torch

    sd, wrapper = _unwrap(_torch_load(path))
    fp8 = [k for k, v in sd.items() if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)]
    if not fp8:
        return sd, wrapper
    scale_map = path.with_name(path.stem + "_map" + path.suffix)
    if not scale_map.is_file():
        raise ModelFileError(
            f"{path.name!r} stores {len(fp8)} weights in fp8 (e.g. {fp8[0]!r}) without their scales: a .pt fp8 "
            f"checkpoint (the official HunyuanVideo FP8 release) needs its scale map {scale_map.name!r} in the same "
            "folder; download it from the same place as the checkpoint")
    scales, _ = _unwrap(_torch_load(scale_map))
    for module, scale in scales.items():
        if scale.numel() != 1:
            raise ModelFileError(f"{scale_map.name!r}: the scale of {module!r} has shape {tuple(scale.shape)}; "
                                 "expected one number per layer")
        sd[f"{module}.scale_weight"] = scale.float().reshape(())
    sd[SCALED_FP8_MARKER] = torch.empty(0, dtype=sd[fp8[0]].dtype)
    return sd, wrapper


def _read_pickle_header(path: Path) -> Header:
    sd, wrapper = _pickle_state_dict(path)
    tensors = {k: TensorInfo(_DTYPE_NAMES.get(str(v.dtype).removeprefix("torch."), str(v.dtype)), tuple(v.shape)) for k, v in sd.items()}
    return Header(path, tensors, wrapper=wrapper)


def _folder_weight_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SAFETENSORS_EXTENSIONS)
    if not files:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_EXTENSIONS)
    return files


def _read_folder_header(folder: Path) -> Header:
    files = _folder_weight_files(folder)
    if not files:
        raise ModelFileError(f"folder {str(folder)!r} holds no .safetensors (or .bin/.pt) weight files")
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for f in files:
        h = read_header(f)
        tensors.update(h.tensors)
        metadata.update(h.metadata)
    config = folder / "config.json"
    if config.is_file():
        try:
            declared = json.loads(config.read_text())
            cls = declared.get("_class_name") or ",".join(map(str, declared.get("architectures", [])))
            if cls:
                metadata["class_name"] = str(cls)
            if declared.get("image_condition_type"):  # diffusers' HunyuanVideo transformer: what shapes cannot tell
                metadata["image_condition_type"] = str(declared["image_condition_type"])
        except (ValueError, AttributeError, TypeError, RecursionError):
            pass  # the class name only helps detection; the weights' names decide
    return Header(folder, tensors, metadata)


# --------------------------------------------------------------------------- detection
def _has(keys: Iterable[str], fragment: str) -> bool:
    return any(fragment in k for k in keys)


def _common_prefix(keys: list[str], marker: str) -> str:
    for k in keys:
        i = k.find(marker)
        if i >= 0:
            return k[:i]
    return ""


def detect(header: Header | Mapping[str, TensorInfo | tuple]) -> Detection:
    """Name the family, key layout and version of a checkpoint from its tensor names and shapes."""
    if isinstance(header, Header):
        tensors = header.tensors
        class_name = header.metadata.get("class_name", "")
        image_condition = header.metadata.get("image_condition_type")
    else:
        tensors = {k: v if isinstance(v, TensorInfo) else TensorInfo("F32", tuple(v)) for k, v in header.items()}
        class_name, image_condition = "", None
    keys = list(tensors)
    shape = lambda k: tensors[k].shape  # noqa: E731

    if not keys:
        return Detection(None, None, note="it holds no tensors")

    # ---- full Stable Diffusion checkpoint (UNet + VAE + CLIP in one LDM file)
    if _has(keys, "model.diffusion_model.input_blocks.") and _has(keys, "first_stage_model."):
        unet_tensors = {k[len("model.diffusion_model."):]: v for k, v in tensors.items() if k.startswith("model.diffusion_model.")}
        unet = _sd_unet_version(unet_tensors)
        return Detection("sd15_checkpoint" if unet == "sd15" else None, "ldm", unet,
                         note=_sd15_note(unet_tensors) if unet == "sd15" else f"a {unet} checkpoint, not SD1.5")

    # ---- control nets, before motion modules and UNets: a SparseCtrl has both kinds of names
    if _has(keys, "controlnet_cond_embedding") and _has(keys, "controlnet_mid_block"):
        return _detect_sparsectrl(tensors)
    if _has(keys, "zero_convs.0.0.weight") and _has(keys, "input_hint_block."):
        note = "an SD ControlNet in the LDM layout (zero_convs, input_hint_block)"
        if _has(keys, "motion_modules."):
            note += (" with motion modules: a SparseCtrl converted for A1111, a layout KineFlow does not read; use "
                     "guoyww's v3_sd15_sparsectrl_*.ckpt or the diffusers release")
        else:
            note += ", not AnimateDiff's SparseCtrl"
        return Detection(None, "ldm", prefix=_common_prefix(keys, "zero_convs."), note=note)

    # ---- AnimateDiff motion modules and motion LoRAs
    if _has(keys, "motion_modules.") and _has(keys, "temporal_transformer"):
        if _has(keys, "lora"):
            return Detection("animatediff_motion_lora", "original")
        return _detect_motion_module(tensors)

    # ---- AnimateDiff v3 domain adapter: processor LoRAs on the spatial attention layers, diffusers UNet names
    if _has(keys, ".attentions.") and all(".processor." in k and "_lora." in k for k in keys):
        return Detection("animatediff_domain_adapter", "diffusers", prefix=_common_prefix(keys, "down_blocks."))

    # ---- HunyuanVideo transformer LoRAs (before the transformer: ComfyUI-style LoRAs use its module names)
    from . import lora

    if lora.is_hunyuan_video_lora(keys):
        info = lora.describe(tensors)
        text = ", ".join(f"{n} {lora.TEXT_ENCODER_NAMES[e]}" for e, n in info["text_encoder_targets"].items() if n)
        return Detection("hunyuan_video_lora", info["format"], f"rank {info['rank']}",
                         note=f"targets {info['targets']} layers" + (f" and text-encoder layers: {text}" if text else ""))

    # ---- HunyuanVideo transformer
    if _has(keys, "double_blocks.") and _has(keys, "single_blocks."):
        prefix = _common_prefix(keys, "double_blocks.")
        layout = "original" if _has(keys, "img_attn_qkv") else "comfy" if _has(keys, "img_attn.qkv") else None
        in_ch = _first_shape(tensors, "img_in.proj.weight")
        version, note = _dit_version(in_ch, image_condition)
        return Detection("hunyuan_video_dit", layout, version, prefix=prefix, note=note)
    if _has(keys, "single_transformer_blocks.") and _has(keys, "context_embedder.token_refiner"):
        in_ch = _first_shape(tensors, "x_embedder.proj.weight")
        version, note = _dit_version(in_ch, image_condition)
        return Detection("hunyuan_video_dit", "diffusers", version, prefix=_common_prefix(keys, "x_embedder."),
                         note=note)

    # ---- VAEs: the HunyuanVideo VAE has causal 3D convs (".conv." wrapped, 5-D weights)
    conv_in = [k for k in keys if k.endswith("encoder.conv_in.conv.weight") or k.endswith("decoder.conv_in.conv.weight")]
    if conv_in and len(shape(conv_in[0])) == 5:
        prefix = conv_in[0][: conv_in[0].find("coder.conv_in") - 2]
        layout = "comfy" if _has(keys, "decoder.mid.attn_1.") or _has(keys, "decoder.up.") else "original"
        if layout == "original" and class_name.startswith("AutoencoderKLHunyuanVideo"):
            layout = "diffusers"
        return Detection("hunyuan_video_vae", layout, prefix=prefix)
    conv_in = [k for k in keys if k.endswith("decoder.conv_in.weight")]
    if conv_in and len(shape(conv_in[0])) == 4:
        prefix = conv_in[0][: -len("decoder.conv_in.weight")]
        layout = "ldm" if _has(keys, "decoder.mid.attn_1.") or _has(keys, "decoder.up.") else "diffusers"
        z = shape(conv_in[0])[1]
        return Detection("sd_vae" if z == 4 else None, layout, prefix=prefix,
                         note="" if z == 4 else f"a VAE with {z} latent channels, not the SD 4-channel KL-f8 VAE")

    # ---- SD UNet alone
    if _has(keys, "input_blocks.0.0.weight") and _has(keys, "time_embed.0.weight"):
        prefix = _common_prefix(keys, "input_blocks.0.0.weight")
        unet_tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        version = _sd_unet_version(unet_tensors)
        return Detection("sd15_unet" if version == "sd15" else None, "ldm", version, prefix=prefix,
                         note=_sd15_note(unet_tensors) if version == "sd15" else f"a {version} UNet, not SD1.5")
    if _has(keys, "down_blocks.0.attentions.0.transformer_blocks.") and _has(keys, "time_embedding.linear_1.weight"):
        # diffusers spells SDXL's label_emb `add_embedding`; the context-width rule is the LDM one
        unet_tensors = {k: v for k, v in tensors.items() if "add_embedding." not in k}
        version = "sdxl" if len(unet_tensors) != len(tensors) else _sd_unet_version(unet_tensors)
        return Detection("sd15_unet" if version == "sd15" else None, "diffusers", version,
                         prefix=_common_prefix(keys, "down_blocks."),
                         note=_sd15_note(unet_tensors) if version == "sd15"
                         else f"a diffusers {version} UNet, not SD1.5 (SD1.5 has a 768-wide cross-attention context)")

    # ---- CLIP vision towers (before the text encoders: a LLaVA folder also holds its LLaMA)
    patch = [k for k in keys if k.endswith("embeddings.patch_embedding.weight")]
    if patch and _has(keys, "embeddings.class_embedding"):
        return _detect_clip_vision(tensors, patch)

    # ---- text encoders
    q = [k for k in keys if k.endswith("text_model.encoder.layers.0.self_attn.q_proj.weight")]
    if q:
        hidden = shape(q[0])[0]
        return Detection("clip_text", "hf", {768: "clip_l", 1280: "clip_g", 1024: "clip_h"}.get(hidden, f"hidden{hidden}"),
                         prefix=q[0][: -len("text_model.encoder.layers.0.self_attn.q_proj.weight")])
    if "token_embd.weight" in keys and "blk.0.attn_q.weight" in keys:  # llama.cpp's names (GGUF text encoders)
        return Detection("llama_text", "gguf")
    q = [k for k in keys if k.endswith("layers.0.self_attn.q_proj.weight") and "text_model" not in k]
    if q and _has(keys, "embed_tokens.weight") and _has(keys, "mlp.gate_proj.weight"):
        return Detection("llama_text", "hf", prefix=q[0][: -len("layers.0.self_attn.q_proj.weight")].removesuffix("model."))

    return Detection(None, None, note=f"its {len(keys)} tensor names match no supported model (first: {sorted(keys)[0]!r})")


def _detect_clip_vision(tensors: Mapping[str, TensorInfo], patch: list[str]) -> Detection:
    """A CLIP vision transformer (class token, patch convolution); with LLaVA's multimodal projector it is
    HunyuanVideo-I2V's image encoder (ComfyUI's llava_llama3_vision.safetensors, or a LLaVA model's vision_tower), the
    family Load CLIP Vision reads. Layout "hf": the tower under `vision_model.` (ComfyUI, transformers 4.x); "hf_bare":
    without that level (transformers >= 4.52 saves `model.vision_tower.*`). See models/clip_vision.py."""
    if len(patch) != 1:
        return Detection(None, None, note=f"{len(patch)} CLIP vision towers in one file; expected one")
    tower = patch[0][: -len("embeddings.patch_embedding.weight")]
    layout = "hf" if tower.endswith("vision_model.") else "hf_bare"
    prefix = tower[: -len("vision_model.")] if layout == "hf" else tower
    width, _, size, _ = (tuple(tensors[patch[0]].shape) + (0, 0, 0, 0))[:4]
    positions = _first_shape(tensors, tower + "embeddings.position_embedding.weight") or (0,)
    layers = {k[len(tower):].split(".")[2] for k in tensors if k.startswith(tower + "encoder.layers.")}
    side = round(max(positions[0] - 1, 0) ** 0.5)
    shape = f"{width} wide, {len(layers)} layers, {side * size} px in patches of {size}"
    projector = [k for k in tensors if k.endswith("multi_modal_projector.linear_1.weight")]
    if not projector:
        return Detection(None, layout, prefix=prefix,
                         note=f"a CLIP vision model ({shape}) without LLaVA's multimodal projector: an image encoder "
                              "for IP-Adapter and the like, not HunyuanVideo-I2V's LLaVA one (llava_llama3_vision)")
    extra = " beside a LLaVA language model (Load Text Encoders reads that part)" if _has(tensors, "embed_tokens.") else ""
    return Detection("clip_vision", layout, "llava", prefix=prefix,
                     note=f"CLIP ViT ({shape}) with LLaVA's projector to {tensors[projector[0]].shape[0]}{extra}")


def _first_shape(tensors: Mapping[str, TensorInfo], suffix: str) -> tuple[int, ...] | None:
    for k, v in tensors.items():
        if k.endswith(suffix):
            return v.shape
    return None


# The HunyuanVideo releases by input channels (the output has 16): version name and what `inspect` says of it.
_DIT_VARIANTS = {
    16: ("t2v", "text to video; HunyuanVideo-I2V's token-replace release has the same keys and shapes "
                "(Image To Video with mode token_replace)"),
    32: ("i2v-32ch", "image to video, SkyReels-V1-Hunyuan-I2V layout: image latent concatenated (Image To Video)"),
    33: ("i2v-33ch", "image to video, HunyuanVideo-I2V's first release: image latent + mask concatenated "
                     "(Image To Video)"),
}


def _dit_version(in_shape: tuple[int, ...] | None, image_condition: str | None = None) -> tuple[str | None, str]:
    """(version, note) of a HunyuanVideo transformer from its input projection's shape and the file's declared
    image conditioning (a token-replace file has the text-to-video shapes)."""
    if not in_shape or len(in_shape) < 2:
        return None, ""
    if in_shape[1] == 16 and image_condition == "token_replace":
        return "i2v-token-replace", "image to video, HunyuanVideo-I2V's token-replace release (Image To Video)"
    return _DIT_VARIANTS.get(in_shape[1], (f"in{in_shape[1]}", ""))


def _context_width(unet: Mapping[str, TensorInfo]) -> int | None:
    ctx = [v.shape for k, v in unet.items() if k.endswith("attn2.to_k.weight")]
    return ctx[0][1] if ctx else None


def _sd_unet_version(unet: Mapping[str, TensorInfo]) -> str:
    """SD1.x (768-wide text context), SD2.x (1024) or SDXL (label_emb, a class/size embedding).

    Structure first: SDXL is told by its `label_emb`. Among UNets without one, the text-context width tells
    SD2 (1024) from SD1 (768); a context narrower than 768 is a small SD1.5-style model (the tiny test and
    distilled models) and is accepted as sd15 (`_sd15_note` says so)."""
    if "label_emb.0.0.weight" in unet:
        return "sdxl"
    width = _context_width(unet)
    if width is None:
        return "unknown"
    if width <= 768:
        return "sd15"
    return {1024: "sd2"}.get(width, f"context{width}")


def _sd15_note(unet: Mapping[str, TensorInfo]) -> str:
    width = _context_width(unet)
    if width == 768:
        return ""
    return f"an SD1.5-style UNet with a {width}-wide text context (full SD1.5 uses 768); its text encoder must match"


def _detect_motion_module(tensors: Mapping[str, TensorInfo]) -> Detection:
    """AnimateDiff version rules (as the community loaders apply them): a mid-block module means v2;
    otherwise an SD1.5 module with a 32-frame positional encoding is v3 and a 24-frame one is v1.

    SD1.5 vs SDXL is told by structure: SD1.5 modules sit on 4 UNet levels, SDXL ones on 3 starting at 320
    channels. Other shapes (small SD1.5-style UNets, e.g. the test models) are accepted as SD1.5 with a note;
    Apply Motion Module checks the widths against the actual UNet."""
    keys = list(tensors)
    prefix = _common_prefix(keys, "down_blocks.")
    down_blocks = {int(k[len(prefix):].split(".")[1]) for k in keys if k.startswith(prefix + "down_blocks.")}
    proj_in = _first_shape(tensors, "down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight")
    pe = _first_shape(tensors, "pos_encoder.pe")
    if not proj_in or not down_blocks:
        return Detection(None, "original", prefix=prefix,
                         note="a motion module without down-block temporal transformers (proj_in) KineFlow knows")
    if len(down_blocks) == 3 and proj_in[0] == 320:
        return Detection(None, "original", prefix=prefix,
                         note=f"a motion module for sdxl ({len(down_blocks)} down blocks), not for SD1.5")
    note = ""
    if len(down_blocks) != 4 or proj_in[0] != 320:
        note = (f"an SD1.5-style motion module for a small UNet ({len(down_blocks)} levels, first width "
                f"{proj_in[0]}; full SD1.5 has 4 levels starting at 320)")
    if _has(keys, "mid_block.motion_modules."):
        version = "v2"
    elif pe is not None and pe[1] == 32:
        version = "v3"
    else:
        version = "v1"
    return Detection("animatediff_motion_module", "original", version, prefix=prefix, note=note)


def _detect_sparsectrl(tensors: Mapping[str, TensorInfo]) -> Detection:
    """AnimateDiff v3 SparseCtrl: an SD1.5 UNet encoder with temporal modules and ControlNet output convs. The layout
    is guoyww's original (`motion_modules.M.temporal_transformer.*`) or diffusers' SparseControlNetModel; the version
    is the kind of condition its embedding takes: `rgb`, the one-conv embedding of a VAE latent (4 channels), or
    `scribble`, the ControlNet pixel embedding of an image (3 channels); both usually with one more channel, the mask
    of the frames that carry a condition."""
    keys = list(tensors)
    prefix = _common_prefix(keys, "controlnet_mid_block.")
    if not _has(keys, "motion_modules."):
        return Detection(None, "diffusers", prefix=prefix,
                         note="an SD ControlNet without temporal modules (an image ControlNet, not AnimateDiff's "
                              "SparseCtrl)")
    layout = "original" if _has(keys, ".temporal_transformer.") else "diffusers"
    latent = tensors.get(prefix + "conv_in.weight")
    latent_channels = latent.shape[1] if latent is not None and len(latent.shape) == 4 else 4
    simplified = tensors.get(prefix + "controlnet_cond_embedding.weight")
    pixel = tensors.get(prefix + "controlnet_cond_embedding.conv_in.weight")
    if simplified is not None and len(simplified.shape) == 4:
        version, channels, base, what = "rgb", simplified.shape[1], latent_channels, "a VAE latent"
    elif pixel is not None and len(pixel.shape) == 4:
        version, channels, base, what = "scribble", pixel.shape[1], 3, "an RGB image"
    else:
        return Detection(None, layout, prefix=prefix, note="a SparseCtrl without a condition embedding KineFlow knows")
    if channels not in (base, base + 1):
        return Detection(None, layout, version, prefix=prefix,
                         note=f"a SparseCtrl whose condition embedding takes {channels} channels; KineFlow knows "
                              f"{base} ({what}) or {base + 1} (with the frame mask)")
    context = _context_width({k: v for k, v in tensors.items() if k.startswith(prefix)})
    if context is not None and context > 768:
        return Detection(None, layout, version, prefix=prefix,
                         note=f"a SparseCtrl with a {context}-wide text context, not for SD1.5 (768)")
    notes = []
    if channels == base:
        notes.append("without the frame-mask channel")
    width = latent.shape[0] if latent is not None else None
    if width is not None and width != 320:
        notes.append(f"for a small SD1.5-style UNet (first width {width}; full SD1.5 has 320)")
    return Detection("sparsectrl", layout, version, prefix=prefix, note="; ".join(notes))


# --------------------------------------------------------------------------- user-facing helpers
def inspect_file(path: str | os.PathLike) -> dict:
    """Everything `kineflow inspect` reports, from the header only."""
    header = read_header(path)
    det = detect(header)
    dtypes: dict[str, int] = {}
    params = 0
    for info in header.tensors.values():
        dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
        params += info.numel
    return {
        "path": str(header.path),
        "family": det.family,
        "layout": det.layout,
        "version": det.version,
        "params": params,
        "tensors": len(header.tensors),
        "dtypes": dtypes,
        "prefix": det.prefix,
        "quantization": quantization(header),
        "wrapper": header.wrapper,
        "note": det.note,
    }


FAMILY_TITLES = {
    "hunyuan_video_dit": "HunyuanVideo transformer (Load Video Model)",
    "hunyuan_video_vae": "HunyuanVideo VAE (Load Video VAE)",
    "clip_text": "CLIP text encoder (Load Text Encoders)",
    "llama_text": "LLaMA text encoder (Load Text Encoders)",
    "sd15_unet": "SD1.5 UNet (Load SD Checkpoint)",
    "sd_vae": "SD VAE (Load SD Checkpoint)",
    "sd15_checkpoint": "SD1.5 checkpoint (Load SD Checkpoint)",
    "animatediff_motion_module": "AnimateDiff motion module (Load Motion Module)",
    "animatediff_motion_lora": "AnimateDiff motion LoRA (Load Motion LoRA)",
    "hunyuan_video_lora": "HunyuanVideo LoRA (Load LoRA)",
    "animatediff_domain_adapter": "AnimateDiff v3 domain adapter (Apply Domain Adapter)",
    "sparsectrl": "AnimateDiff SparseCtrl (Load SparseCtrl)",
    "clip_vision": "LLaVA CLIP vision encoder (Load CLIP Vision)",
}


def _torch_dtype(name: str, tensor: str) -> torch.dtype:
    """The torch dtype of a header's dtype name (safetensors spelling, or torch's for pickled checkpoints)."""
    import torch

    if name in _SAFETENSORS_DTYPES:
        return getattr(torch, _SAFETENSORS_DTYPES[name][0])
    if name.startswith(("Q", "IQ", "TQ")):  # a GGUF block type: its values are floats
        return torch.float32
    found = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(found, torch.dtype):
        raise ModelFileError(f"tensor {tensor!r} has dtype {name!r}, which KineFlow cannot load")
    return found


SCALED_FP8_MARKER = "scaled_fp8"  # ComfyUI's scaled fp8 files: an empty tensor whose dtype is the fp8 format
_SCALE_SUFFIXES = (".scale_weight", ".scale_input")


def quantization(header: Header) -> str | None:
    """How a file stores its weights when not in plain floats: "gguf:<type>" (the most common quantized type),
    "fp8_scaled", "fp8_e4m3fn" or "fp8_e5m2"."""
    if header.path.suffix.lower() == ".gguf":
        from . import gguf

        return gguf.quantization(header)
    names = header.tensors
    if any(k == SCALED_FP8_MARKER or k.endswith("." + SCALED_FP8_MARKER) for k in names):
        return "fp8_scaled"
    kinds = {info.dtype for info in names.values()}
    return "fp8_e4m3fn" if "F8_E4M3" in kinds else "fp8_e5m2" if "F8_E5M2" in kinds else None


def split_scales(tensors: dict) -> tuple[dict, dict[str, str]]:
    """(the weights, {weight name: its scale_weight name}) without the scaled-fp8 marker and input scales."""
    weights, scales = {}, {}
    for name, tensor in tensors.items():
        if name == SCALED_FP8_MARKER or name.endswith("." + SCALED_FP8_MARKER) or name.endswith(".scale_input"):
            continue
        if name.endswith(".scale_weight"):
            scales[name.removesuffix(".scale_weight") + ".weight"] = name
        else:
            weights[name] = tensor
    return weights, scales


def require_family(path: str | os.PathLike, expected: str | tuple[str, ...]) -> tuple[Header, Detection]:
    """Read and detect a file, raising a clear error if it is not one of the expected families."""
    expected = (expected,) if isinstance(expected, str) else expected
    header = read_header(path)
    det = detect(header)
    if det.family not in expected:
        wanted = " or ".join(FAMILY_TITLES.get(e, e) for e in expected)
        hint = f" It belongs in: {FAMILY_TITLES[det.family]}." if det.family in FAMILY_TITLES else ""
        raise ModelFileError(f"{Path(path).name!r} is {det.describe()}; this loader expects a {wanted}.{hint}")
    if det.layout is None:
        raise ModelFileError(f"{Path(path).name!r} looks like a {det.family} checkpoint but its key layout is not one KineFlow knows")
    return header, det


def load_tensors(
    header: Header,
    *,
    prefix: str = "",
    dtype: torch.dtype | None = None,
    keep_dtypes: tuple[torch.dtype, ...] = (),
    device: torch.device | str = "cpu",
    names: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Load the tensors whose names start with `prefix` (prefix stripped), cast to `dtype` one tensor at a time.

    Casting per tensor keeps peak memory at one tensor above the result: no full-precision copy of the model
    is ever made. Tensors already in one of `keep_dtypes` (e.g. fp8 storage) are kept as they are.
    With `device="meta"` nothing beyond the header is read: the tensors are shapes and dtypes only (dry runs).
    `names` (with the prefix stripped) limits the load to those tensors.
    """
    import torch

    def wanted(name: str) -> bool:
        return name.startswith(prefix) and (names is None or name[len(prefix):] in names)

    path = header.path

    def cast(t: torch.Tensor) -> torch.Tensor:
        if dtype is None or t.dtype in keep_dtypes or not t.is_floating_point():
            return t
        return t.to(dtype)

    if torch.device(device).type == "meta":
        return {name[len(prefix):]: cast(torch.empty(info.shape, dtype=_torch_dtype(info.dtype, name), device="meta"))
                for name, info in header.tensors.items() if wanted(name)}
    if path.suffix.lower() == ".gguf":
        from . import gguf_blocks

        return {name[len(prefix):]: cast(gguf_blocks.dequantize(gguf_blocks.read_raw(info), info.dtype, info.shape,
                                                                _torch_dtype(info.dtype, name)))
                for name, info in header.tensors.items() if wanted(name)}
    out: dict[str, torch.Tensor] = {}
    files = _folder_weight_files(path) if path.is_dir() else [path]
    for f in files:
        if f.suffix.lower() in SAFETENSORS_EXTENSIONS or _looks_like_safetensors(f):
            from safetensors import safe_open

            try:
                with safe_open(str(f), framework="pt", device="cpu") as sf:
                    for name in sf.keys():
                        if wanted(name):
                            out[name[len(prefix):]] = cast(sf.get_tensor(name))
            except Exception as e:  # safetensors raises its own error types for damaged files
                raise ModelFileError(f"could not read tensors from {f.name!r}: {e}") from None
        else:
            sd, _ = _pickle_state_dict(f)
            for name, t in sd.items():
                if wanted(name):
                    out[name[len(prefix):]] = cast(t)
    return out
