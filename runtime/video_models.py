"""Model handles that travel along workflow links, and the loaders that build them from checkpoint files.

A handle wraps a pure torch module from models/ with what the nodes need to use it: its latent format, its
sampling parametrisation, its dtype and device. The sampler drives every family through the same handle
interface (`VideoModel`), so one Sampler node serves HunyuanVideo and AnimateDiff alike.

Loading follows DEVELOPING.md's single path: read the header, detect family and layout, derive the config
from shapes, convert keys, and assign tensors already in the target dtype into a model built on `meta`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models import checkpoints
from ..models import hunyuan_video_dit as dit_mod
from ..models import hunyuan_video_vae as vae_mod
from ..models import clip_vision as clip_vision_mod
from ..models.hunyuan_text import HunyuanTextEncoder, text_tower
from ..models.tokenization import clip_l_tokenizer, load_tokenizer
from ..samplers.sampling import FlowMatching
from ..samplers.step_cache import RELEASED_TEACACHE_COEFFICIENTS, CacheCriterion, teacache, teacache_coefficients
from ..samplers.schedules import flow_sigmas
from ..shapes.vocabulary import Vocabulary, text_encoder_vocabulary
from . import acceleration, cpu, host
from ..errors import KineFlowError, ModelFileError
from . import offload as offload_mod
from . import previews
from .latent_formats import HUNYUAN_VIDEO_LATENT, LatentFormat
from .model_files import llm_tokenizer_path

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' means bf16 on accelerators; on the CPU, bf16 where it multiplies bf16 natively and measurably faster
    than fp32, else fp32 (runtime/cpu.py decides once per process and says why in the run log)."""
    if name == "auto":
        return DTYPES[cpu.auto_dtype()[0]] if device.type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise KineFlowError(f"unknown dtype {name!r}; expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class ModelFile:
    """A model file opened for loading: its path, header and detected layout (`det`), and the device, dtype and
    attention backend (acceleration.resolve_attention) its module will compute with."""
    path: Path
    header: checkpoints.Header
    det: checkpoints.Detection
    device: torch.device
    dtype: torch.dtype
    attention: str


def open_model_file(folder: str, name_or_path: str, family: str, dtype_name: str = "auto", attention: str = "auto"
                    ) -> ModelFile:
    """Find `name_or_path` in the models `folder`, check it is of `family` (a clear error if not) and settle where
    and how its module computes: the first half of every loader."""
    path = host.model_path(folder, name_or_path)
    header, det = checkpoints.require_family(path, family)
    device = host.compute_device()
    return ModelFile(path=path, header=header, det=det, device=device, dtype=resolve_dtype(dtype_name, device),
                     attention=acceleration.resolve_attention(attention, device))


def build_module(header, model_cls, *, device: torch.device, dtype: torch.dtype, policy: str, attention: str,
                 compile: str = "disabled", name: str | None = None, **load_kwargs):
    """The second half of every loader: the module of `model_cls` from `header` under offload `policy` within the
    run's memory budget (offload.load's `prefix`, `convert`, `config_from`, ... in `load_kwargs`), then its attention
    backend and torch.compile choice (acceleration.apply). Returns (module, Residency)."""
    module, residency = offload_mod.load(header, model_cls, policy=policy, device=device, dtype=dtype,
                                         name=name or header.path.name, budget_bytes=host.memory_budget(),
                                         **load_kwargs)
    acceleration.apply(module, residency, attention, compile)
    return module, residency


# --------------------------------------------------------------------------- diffusion model
@dataclass(frozen=True)
class LoadRecipe:
    """How a HunyuanVideo handle was made from files, enough for another process to make the same one (the workers
    of runtime/workers.py): Load Video Model's file and options (`weight_dtype` as resolved, so every process computes
    in the same dtype), then each Load LoRA in order as (file, strength, block strengths)."""
    path: str
    weight_dtype: str
    fp8: bool
    offload: str
    resident_blocks: int | None
    attention: str
    compile: str
    loras: tuple[tuple[str, float, str], ...] = ()


@dataclass
class HunyuanVideoModel:
    """KINEFLOW_VIDEO_MODEL for the HunyuanVideo transformer (flow matching, velocity prediction).

    The handle interface every family implements (the Sampler relies on nothing else): `family`,
    `latent_format`, `model_sampling`, `preview_factors`, `sigmas(steps, shift, denoise, scheduler)`,
    `net_kwargs(encoded_prompt, embedded_guidance, batch)` and `net_fn(x, timestep, **net_kwargs)`.
    """

    net: dit_mod.HunyuanVideoDiT
    dtype: torch.dtype
    source: str
    family: str = "hunyuan_video"
    latent_format: LatentFormat = HUNYUAN_VIDEO_LATENT
    model_sampling: FlowMatching = field(default_factory=FlowMatching)
    # The latent -> RGB map of the Sampler's live preview (runtime/previews.py): the file's fitted one, else the
    # released VAE's.
    preview_factors: tuple[torch.Tensor, torch.Tensor] = field(
        default_factory=lambda: previews.released_factors(HUNYUAN_VIDEO_LATENT))
    residency: offload_mod.Residency | None = None
    # How the Step Cache judges this model's probes: TeaCache with the file's fitted polynomial, else the published one.
    step_cache_criterion: CacheCriterion = field(
        default_factory=lambda: teacache(RELEASED_TEACACHE_COEFFICIENTS["hunyuan_video"]))
    # How the handle was made from files (None: built in code, which no other process can repeat).
    recipe: LoadRecipe | None = None

    def running(self):
        """Entered around a sampling run: the offload policy brings the weights to the compute device."""
        return offload_mod.running(self.residency)

    @property
    def guidance_embedded(self) -> bool:
        return bool(self.net.config.guidance_embed)

    @property
    def image_condition(self) -> str | None:
        """How the model takes a first frame: None (text to video, or a token-replace release its file does not
        declare), "latent_concat" or "token_replace" (models/hunyuan_video_dit.py)."""
        return self.net.config.image_condition

    def image_kwargs(self, image: dict | None, latent_shape: tuple[int, ...]) -> tuple[dict, str | None]:
        """Keyword arguments for `net_fn` from Image To Video's conditioning (`image`: {"latent": [1|B, C, 1, H, W],
        "mode": "auto" | "token_replace"}, or None), for a noisy latent of `latent_shape`, and the mode they run.
        The same arguments go with the negative prompt: the reference pipelines give both branches the image."""
        cfg = self.net.config
        if image is None:
            if cfg.image_condition is not None:
                raise KineFlowError(
                    f"this HunyuanVideo transformer is an image-to-video model ({cfg.variant}) and needs a first frame; "
                    "found conditioning without one: put an Image To Video node between Text Encode and the Sampler")
            return {}, None
        mode = cfg.image_condition
        if image["mode"] == "token_replace":
            if mode == "latent_concat":
                raise KineFlowError(f"Image To Video's mode is token_replace, but this model ({cfg.variant}) takes its "
                                    "image as concatenated latent channels; set mode to auto")
            mode = "token_replace"
        if mode is None:
            raise KineFlowError(
                "this HunyuanVideo transformer takes no image (16 input channels: text to video); found Image To "
                "Video's conditioning. If the file is HunyuanVideo-I2V's token-replace release (the same shapes), "
                "set Image To Video's mode to token_replace; else use an image-to-video model "
                "(HunyuanVideo-I2V 33ch, SkyReels-V1-Hunyuan-I2V)")
        first = image["latent"]
        b, c, _, h, w = latent_shape
        if tuple(first.shape[1:]) != (c, 1, h, w) or first.shape[0] not in (1, b):
            raise KineFlowError(f"Image To Video's image latent {tuple(first.shape)} does not fit the latent "
                                f"{tuple(latent_shape)}; expected [1 or {b}, {c}, 1, {h}, {w}] (use the latent "
                                "Image To Video gives, or the same size and frames)")
        first = first.expand(b, -1, -1, -1, -1)
        if mode == "token_replace":
            return {"token_replace": True}, mode
        return {"image_latent": dit_mod.image_condition_channels(cfg, first, latent_shape[2])}, mode

    def net_kwargs(self, text: dict, embedded_guidance: float, batch: int) -> dict:
        """Keyword arguments for `net_fn` from one encoded prompt (see models/hunyuan_text.py)."""
        if "text_states" not in text:
            raise KineFlowError(
                f"this conditioning has {sorted(text)}, not the LLaMA + CLIP states a HunyuanVideo model needs; "
                "encode the prompt with the text encoder from Load Text Encoders")
        width = text["text_states"].shape[-1]
        if width != self.net.config.text_states_dim:
            raise KineFlowError(
                f"the text encoder gives {width}-wide states, this transformer expects "
                f"{self.net.config.text_states_dim}; use the text encoders that belong to the model")
        kwargs = {
            "text_states": text["text_states"],
            "text_mask": text["text_mask"],
            "text_states_2": text["text_states_2"],
        }
        if self.guidance_embedded:
            # The distilled model embeds guidance like a timestep: the reference pipeline feeds scale x 1000.
            kwargs["guidance"] = torch.full((batch,), float(embedded_guidance) * 1000.0)
        return kwargs

    def sigmas(self, steps: int, shift: float, denoise: float, scheduler: str = "default") -> torch.Tensor:
        if scheduler != "default":
            raise KineFlowError(f"scheduler {scheduler!r} is for discrete-schedule models; flow-matching models "
                                "use 'default' (the shifted linear schedule; tune it with shift)")
        return flow_sigmas(steps, shift, denoise)

    def net_fn(self, x: torch.Tensor, timestep: torch.Tensor, **kwargs) -> torch.Tensor:
        with torch.inference_mode():
            return self.net(x, timestep, **kwargs).float()


def load_video_model(name_or_path: str, weight_dtype: str = "auto", fp8: bool = False, offload: str = "auto",
                     resident_blocks: int | None = None, attention: str = "auto", compile: str = "auto"
                     ) -> HunyuanVideoModel:
    file = open_model_file("diffusion_models", name_or_path, "hunyuan_video_dit", weight_dtype, attention)
    path, header, det, dtype = file.path, file.header, file.det, file.dtype
    # A token-replace image-to-video file has the text-to-video shapes: only its metadata (or a diffusers folder's
    # config.json) can say what it is.
    declared = header.metadata.get("image_condition_type")
    if declared not in (None, "latent_concat", "token_replace"):
        raise ModelFileError(f"{path.name!r} declares image_condition_type {declared!r}; expected latent_concat or "
                             "token_replace")
    net, residency = build_module(
        header, dit_mod.HunyuanVideoDiT, device=file.device, dtype=dtype, policy=offload, attention=file.attention,
        compile=compile, resident_blocks=resident_blocks, prefix=det.prefix, fp8=fp8,
        convert=lambda sd: dit_mod.convert_state_dict(sd, det.layout),
        config_from=lambda shapes: dit_mod.config_from_state_dict(shapes, declared))
    recipe = LoadRecipe(path=str(path.resolve()), weight_dtype=next(k for k, v in DTYPES.items() if v == dtype), fp8=fp8,
                        offload=offload, resident_blocks=resident_blocks, attention=file.attention,
                        compile=compile if compile != "auto" else "enabled" if host.compile_default() else "disabled")
    return HunyuanVideoModel(net=net, dtype=dtype, source=str(path), residency=residency, recipe=recipe,
                             preview_factors=previews.preview_factors(header.metadata, HUNYUAN_VIDEO_LATENT),
                             step_cache_criterion=teacache(teacache_coefficients(header.metadata, "hunyuan_video",
                                                                                 path.name)))


# --------------------------------------------------------------------------- VAE
@dataclass
class VideoVAE:
    """KINEFLOW_VAE for the HunyuanVideo causal 3D VAE: video [B, 3, F, H, W] in -1..1 <-> scaled latents.

    The handle interface every family implements: `latent_format`, and `decode` / `encode` taking
    `tiling` ("auto", None or TilingOptions), `memory_budget_bytes` and a `callback(done, total)`.
    """

    vae: vae_mod.HunyuanVideoVAE
    dtype: torch.dtype
    source: str
    latent_format: LatentFormat = HUNYUAN_VIDEO_LATENT
    residency: offload_mod.Residency | None = None

    def decode(self, latents: torch.Tensor, tiling, memory_budget_bytes: int, callback, group=None) -> torch.Tensor:
        """`group`: a torch.distributed process group whose ranks share the tiles (runtime/distributed.py)."""
        with offload_mod.running(self.residency):
            return self.vae.decode_latents(latents, tiling=tiling, memory_budget_bytes=memory_budget_bytes,
                                           callback=callback, group=group)

    def encode(self, video: torch.Tensor, tiling, memory_budget_bytes: int, callback) -> torch.Tensor:
        with offload_mod.running(self.residency):
            return self.vae.encode_latents(video, tiling=tiling, memory_budget_bytes=memory_budget_bytes,
                                           callback=callback)


def load_video_vae(name_or_path: str, dtype_name: str = "auto", offload: str = "auto", attention: str = "auto"
                   ) -> VideoVAE:
    file = open_model_file("vae", name_or_path, "hunyuan_video_vae", dtype_name, attention)
    # What shapes cannot tell (the file's metadata does when it was written by KineFlow's trainer).
    overrides = checkpoints.metadata_numbers(file.header, "hunyuan_video_vae")

    def config_from(shapes):
        config = vae_mod.config_from_state_dict(shapes)
        return dataclasses.replace(config, **overrides) if overrides else config

    vae, residency = build_module(
        file.header, vae_mod.HunyuanVideoVAE, device=file.device, dtype=file.dtype, policy=offload,
        attention=file.attention, prefix=file.det.prefix,
        convert=lambda sd: vae_mod.convert_state_dict(sd, file.det.layout), config_from=config_from)
    return VideoVAE(vae=vae, dtype=file.dtype, source=str(file.path), residency=residency)


# --------------------------------------------------------------------------- text encoders
@dataclass
class TextEncoders:
    """KINEFLOW_TEXT_ENCODER for HunyuanVideo: LLaMA + CLIP-L (models/hunyuan_text.py) under their offload
    policies (`model` by default off the CPU: the 16 GB LLaMA leaves the device once the prompt is encoded)."""

    encoder: HunyuanTextEncoder
    residencies: tuple[offload_mod.Residency, ...]
    vocabulary: Vocabulary | None = None  # the words a shipped tiny model knows (see shipped_vocabulary)

    def encode(self, prompts) -> dict[str, torch.Tensor]:
        with offload_mod.running(*self.residencies):
            return self.encoder.encode(prompts)

    def encode_with_image(self, prompts, image_tokens: torch.Tensor, image_interleave: int) -> dict[str, torch.Tensor]:
        """HunyuanVideo-I2V's conditioning: the prompts in its image template with LLaVA's image tokens (see
        models/hunyuan_text.HunyuanTextEncoder.encode_with_image)."""
        with offload_mod.running(*self.residencies):
            return self.encoder.encode_with_image(prompts, image_tokens, image_interleave)


def shipped_vocabulary(path: Path) -> Vocabulary | None:
    """The words the text encoder in `path` knows if it is a shipped tiny model's, else None: only prompts for the
    shipped models are checked against the shapes world's words (a user's models know far more)."""
    return text_encoder_vocabulary(Path(path).name) if host.is_shipped(path) else None


def text_encoder_policy(policy: str, device: torch.device) -> str:
    """`auto` for a text encoder: `model` on an accelerator (resident only while it encodes), else as for any
    model (the weights' size against free memory)."""
    return "model" if policy == "auto" and device.type not in ("cpu", "meta") else policy


def load_text_tower(path: Path, family: str, dtype: torch.dtype, device: torch.device, policy: str = "auto",
                    attention: str = "sdpa"):
    """A LLaMA or CLIP text model from its file under an offload policy, attending with backend `attention` (see
    acceleration.resolve_attention): (model, Residency)."""
    tower = text_tower(path, family)
    return build_module(tower.header, tower.model_class, device=device, dtype=dtype,
                        policy=text_encoder_policy(policy, device), attention=attention, name=Path(path).name,
                        prefix=tower.prefix, convert=tower.convert, config_from=tower.config_from)


def load_text_encoders(llm_name: str, clip_name: str, tokenizer_path: str = "", dtype_name: str = "auto",
                       crop_start: int = -1, offload: str = "auto", attention: str = "auto") -> TextEncoders:
    llm_path = host.model_path("text_encoders", llm_name)
    clip_path = host.model_path("text_encoders", clip_name)
    tokenizer = llm_tokenizer_path(llm_path, tokenizer_path)
    device = host.compute_device()
    dtype = resolve_dtype(dtype_name, device)
    attention = acceleration.resolve_attention(attention, device)
    llama, llama_residency = load_text_tower(llm_path, "llama_text", dtype, device, offload, attention)
    clip, clip_residency = load_text_tower(clip_path, "clip_text", dtype, device, offload, attention)
    encoder = HunyuanTextEncoder(llama, load_tokenizer(tokenizer), clip, clip_l_tokenizer(),
                                 crop_start=None if crop_start < 0 else crop_start)
    encoder.device = device
    return TextEncoders(encoder, (llama_residency, clip_residency), shipped_vocabulary(llm_path))


# --------------------------------------------------------------------------- CLIP vision (LLaVA's image encoder)
@dataclass
class CLIPVision:
    """KINEFLOW_CLIP_VISION: LLaVA's CLIP vision tower + multimodal projector (models/clip_vision.py), which turns
    HunyuanVideo-I2V's first frame into the image tokens of its prompt."""

    encoder: clip_vision_mod.LlavaVisionEncoder
    dtype: torch.dtype
    source: str
    residency: offload_mod.Residency | None = None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The first IMAGE frame [F, H, W, 3] (0..1) -> its image tokens [1, patches, LLaMA width] on the compute
        device: resized and centre-cropped to the tower's size, normalised as CLIP's, encoded."""
        cfg = self.encoder.config
        device = host.compute_device()
        pixels = clip_vision_mod.preprocess(images[:1].to(device), cfg.image_size)
        with torch.inference_mode(), offload_mod.running(self.residency):
            return self.encoder(pixels.to(self.dtype))


def load_clip_vision(name_or_path: str, dtype_name: str = "auto", offload: str = "auto", attention: str = "auto"
                     ) -> CLIPVision:
    """Load CLIP Vision: a LLaVA vision encoder from clip_vision/ (ComfyUI's llava_llama3_vision.safetensors, or a
    file or folder of transformers' LlavaForConditionalGeneration, whose language model is left unread)."""
    file = open_model_file("clip_vision", name_or_path, "clip_vision", dtype_name, attention)
    encoder, residency = build_module(
        file.header, clip_vision_mod.LlavaVisionEncoder, device=file.device, dtype=file.dtype,
        policy=text_encoder_policy(offload, file.device), attention=file.attention,
        convert=lambda sd: clip_vision_mod.convert_state_dict(sd, file.det.layout),
        config_from=clip_vision_mod.config_from_state_dict)
    return CLIPVision(encoder=encoder, dtype=file.dtype, source=str(file.path), residency=residency)
