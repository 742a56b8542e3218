"""AnimateDiff family handles (SD1.5 UNet + motion module, SD VAE, CLIP-L, SparseCtrl) and their loaders.

The handles implement the interfaces documented on `video_models.HunyuanVideoModel` and `video_models.VideoVAE`,
so the shared Text Encode, Empty Video Latent (latent_format "sd15"), Sampler, Context Options and VAE
Decode/Encode nodes drive this family unchanged.

Handles are never mutated once built: ComfyUI caches node outputs and hands the same object to every consumer,
so Apply Motion Module, motion LoRAs, the domain adapter and Apply SparseCtrl return new handles (sharing unchanged
weights).

SparseCtrl (models/sparsectrl.py): Apply SparseCtrl adds a `SparseControl` (the loaded control net, keyframe images,
the video frames they belong to, strength and the part of the sampling it acts in) to the model handle. Every model
call then runs each control net on the same noisy frames, timesteps and text as the UNet (so on both CFG branches)
and adds the summed residuals to the UNet's skip connections and middle block. Inside context windows a call sees the
keyframes that fall in its window (samplers.context.current_window); a window without one runs without the control.
Keyframes are prepared once per latent size: centre-cropped to the video's aspect ratio and resized, then, for an
`rgb` SparseCtrl, encoded by the VAE (posterior mean, scaled; the reference pipelines draw a sample) or, for a
`scribble` one, kept as pixels in 0..1.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from ..models import animatediff as ad
from ..models import checkpoints
from ..models import sd15_unet as unet_mod
from ..models import sd_vae as vae_mod
from ..models import sparsectrl as sc
from ..models.clip_text import CLIPTextModel
from ..models.hunyuan_video_vae import TilingOptions
from ..models.tiling import share_tiles
from ..models.tokenization import TextTokenizer, clip_l_tokenizer
from ..samplers.sampling import DiscreteEpsilon, DiscreteV
from ..samplers.schedules import DiscreteSchedule, discrete_sigmas
from ..samplers.context import current_window
from ..samplers.step_cache import FIRST_BLOCK, CacheCriterion
from ..shapes.vocabulary import Vocabulary
from . import acceleration, host
from ..errors import KineFlowError, ModelFileError
from . import offload as offload_mod
from . import previews
from .latent_formats import SD15_LATENT, LatentFormat
from .video_models import build_module, load_text_tower, open_model_file, resolve_dtype, shipped_vocabulary

# SD1.5's training schedule (β linear 0.00085 -> 0.012 over 1000 steps) and AnimateDiff's scheduler config:
# "leading" timestep spacing with steps_offset 1.
SCHEDULE = {"beta_schedule": "sqrt_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
TIMESTEP_SPACING = "leading"
STEPS_OFFSET = 1
PREDICTIONS = {"eps": DiscreteEpsilon, "v": DiscreteV}
SCHEDULERS = ("default", "karras")
CLIP_LENGTH = 77


# --------------------------------------------------------------------------- diffusion model
@dataclass
class SD15VideoModel:
    """KINEFLOW_VIDEO_MODEL for an SD1.5 UNet, with an AnimateDiff motion module once one is applied.

    Without a motion module the frames of a video are denoised as independent images. `motion` is a view of
    the loaded module with this handle's own strength (see `_scaled_view`).
    """

    unet: unet_mod.SD15UNet
    dtype: torch.dtype
    source: str
    prediction: str = "eps"
    motion: ad.MotionModule | None = None
    motion_source: str = ""
    family: str = "animatediff"
    latent_format: LatentFormat = SD15_LATENT
    # The latent -> RGB map of the Sampler's live preview (runtime/previews.py): fitted to the file's own VAE when
    # it carries one, else the released SD1.5 VAE's.
    preview_factors: tuple[torch.Tensor, torch.Tensor] = field(
        default_factory=lambda: previews.released_factors(SD15_LATENT))
    residency: offload_mod.Residency | None = None
    motion_residency: offload_mod.Residency | None = None
    controls: tuple[SparseControl, ...] = ()  # Apply SparseCtrl's, in the order they were applied
    step_cache_criterion: CacheCriterion = FIRST_BLOCK  # how the Step Cache judges this model's probes
    # net_fn takes text per latent frame ([B, F, 77, D]): prompt travel gives each frame its own (prompt_travel.py)
    frame_text: bool = True
    model_sampling: DiscreteEpsilon | DiscreteV = field(init=False)

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise KineFlowError(f"prediction must be one of {', '.join(PREDICTIONS)}; got {self.prediction!r}")
        self.model_sampling = PREDICTIONS[self.prediction](DiscreteSchedule(**SCHEDULE))

    def running(self):
        """Entered around a sampling run: the offload policies bring the UNet, the motion module and the SparseCtrls
        (with the VAE that encodes their keyframes, which a run's first call does) to the device, in one claim."""
        residencies = [self.residency, self.motion_residency if self.motion is not None else None]
        for control in self.controls:
            residencies.append(control.sparsectrl.residency)
            if control.vae is not None:
                residencies.append(control.vae.residency)
        unique = {id(r): r for r in residencies if r is not None}
        return offload_mod.running(*unique.values())

    @property
    def context_dim(self) -> int:
        return self.unet.config.context_dim

    def sigmas(self, steps: int, shift: float, denoise: float, scheduler: str = "default") -> torch.Tensor:
        """The discrete schedule's sigmas ("leading" spacing, steps_offset 1), or Karras sigmas over the same
        range. `shift` is a flow-matching setting and does not apply to this family."""
        if scheduler not in SCHEDULERS:
            raise KineFlowError(f"unknown scheduler {scheduler!r}; expected one of {', '.join(SCHEDULERS)}")
        return discrete_sigmas(steps, self.model_sampling.schedule, TIMESTEP_SPACING, karras=scheduler == "karras",
                               steps_offset=STEPS_OFFSET, denoise=denoise)

    def net_kwargs(self, text: dict, embedded_guidance: float, batch: int) -> dict:
        """{"context": [B, 77, D]} from SD Text Encoder conditioning; embedded guidance does not apply."""
        if "context" not in text:
            raise KineFlowError(
                f"this conditioning has {sorted(text)}, not the CLIP token states an SD1.5/AnimateDiff model needs; "
                "encode the prompt with the text encoder from Load SD Checkpoint")
        context = text["context"]
        if context.ndim != 3 or context.shape[-1] != self.context_dim:
            raise KineFlowError(
                f"the text encoder gives states of shape {tuple(context.shape)}, this UNet expects [B, tokens, "
                f"{self.context_dim}]; use the text encoder that belongs to the checkpoint")
        return {"context": context}

    def net_fn(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, step_cache=None) -> torch.Tensor:
        """x [B, 4, F, h, w] -> prediction of the same shape; the UNet sees the B*F frames as one batch.

        `context` is [B, 77, D] (one prompt for every frame) or [B, F, 77, D] (one per frame: prompt travel)."""
        b, c, f, h, w = x.shape
        device = host.compute_device()
        frames = x.to(device).transpose(1, 2).reshape(b * f, c, h, w)
        timesteps = timestep.to(device).repeat_interleave(f)
        if context.ndim == 4:
            if context.shape[:2] != (b, f):
                raise KineFlowError(f"per-frame text [B, F, tokens, D] must match the latent's batch {b} and {f} "
                                    f"frames; found shape {tuple(context.shape)}")
            context = context.to(device).reshape(b * f, *context.shape[2:])
        else:
            context = context.to(device).repeat_interleave(f, dim=0)
        def control():
            return self._control_residuals(frames, timesteps, context, b, f)

        with torch.inference_mode():
            if self.motion is None:
                out = self.unet(frames, timesteps, context, step_cache=step_cache, control=control)
            else:
                out = self.unet(frames, timesteps, context, video_frames=f, temporal=self.motion, step_cache=step_cache,
                                control=control)
        return out.float().reshape(b, f, -1, h, w).transpose(1, 2)

    def _control_residuals(self, frames: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, batch: int,
                           count: int) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """The SparseCtrls' residuals for one model call, summed (None when none acts on it)."""
        down = mid = None
        for control in self.controls:
            found = control.residuals(frames, timesteps, context, batch, count)
            if found is None:
                continue
            if down is None:
                down, mid = found
            else:
                down, mid = [a + r for a, r in zip(down, found[0])], mid + found[1]
        return None if down is None else (down, mid)


def _scaled_view(module: ad.MotionModule, scale: float) -> ad.MotionModule:
    """The same motion module with its own `scale`.

    `copy.copy` of an nn.Module copies only its attribute dict: layers, parameters and buffers stay shared (no
    memory), while `scale`, a plain attribute, becomes the view's own. So two Apply Motion Module nodes with
    different strengths on one loaded module do not affect each other."""
    view = copy.copy(module)
    view.scale = float(scale)
    return view


# --------------------------------------------------------------------------- VAE
@dataclass
class SDVideoVAE:
    """KINEFLOW_VAE for the SD KL-f8 VAE: video [B, 3, F, H, W] in -1..1 <-> scaled latents [B, 4, F, H/8, W/8].

    The VAE works on single images, so a video is coded frame by frame; frames are batched to fit the memory
    budget (tiling "auto" and None alike: batching never changes the result, each frame is coded alone).
    Explicit TilingOptions set the batch to `tile_frames` frames; tiles within a frame are not supported.
    """

    vae: vae_mod.SDVAE
    dtype: torch.dtype
    source: str
    latent_format: LatentFormat = SD15_LATENT
    residency: offload_mod.Residency | None = None

    def frame_bytes(self, height: int, width: int) -> int:
        """Rough peak bytes to decode (or encode) one frame of height x width pixels: a few live activations
        at the widest level, plus the mid-block attention matrix if it is materialised."""
        c = self.vae.config
        item = torch.finfo(self.dtype).bits // 8
        widest = max(c.ch * m * (height >> level) * (width >> level) for level, m in enumerate(c.ch_mult))
        tokens = (height // c.downscale) * (width // c.downscale)
        return 4 * widest * item + tokens * tokens * 4

    def _frames_per_batch(self, tiling, frames: int, height: int, width: int, budget: int) -> int:
        if isinstance(tiling, TilingOptions):
            if tiling.tile_size < max(height, width):
                raise KineFlowError(
                    f"the SD VAE codes whole frames and cannot tile within one: frames are {width}x{height}, "
                    f"tile_size is {tiling.tile_size}. Use tiling 'auto' (frames are batched to fit memory) or a "
                    f"tile_size of at least {max(height, width)}")
            return max(1, min(frames, tiling.tile_frames))
        if tiling not in ("auto", None):
            raise KineFlowError(f"tiling must be 'auto', None or TilingOptions; got {tiling!r}")
        return max(1, min(frames, budget // max(1, self.frame_bytes(height, width))))

    def decode(self, latents: torch.Tensor, tiling, memory_budget_bytes: int, callback, group=None) -> torch.Tensor:
        """`group`: a torch.distributed process group whose ranks share the chunks of frames
        (runtime/distributed.py); every rank gets the whole video."""
        b, _, f, h, w = latents.shape
        s = self.vae.config.downscale
        per_batch = self._frames_per_batch(tiling, f, h * s, w * s, memory_budget_bytes // max(1, b))
        starts = list(range(0, f, per_batch))

        def run(start):
            return self.vae.decode_frames(latents[:, :, start:start + per_batch], batch=b * per_batch)

        def shape(start):
            return (b, self.vae.config.in_channels, min(per_batch, f - start), h * s, w * s)

        chunks = []
        with self.running():
            results = ((start, run(start)) for start in starts) if group is None else share_tiles(
                starts, run, shape, group, latents.device)
            for start, chunk in results:
                chunks.append(chunk.cpu() if group is not None and not latents.is_meta else chunk)
                callback(min(start + per_batch, f), f)
        return torch.cat(chunks, dim=2)

    def encode(self, video: torch.Tensor, tiling, memory_budget_bytes: int, callback) -> torch.Tensor:
        b, _, f, h, w = video.shape
        per_batch = self._frames_per_batch(tiling, f, h, w, memory_budget_bytes // max(1, b))
        chunks = []
        with self.running():
            for start in range(0, f, per_batch):
                chunks.append(self.vae.encode_frames(video[:, :, start:start + per_batch], batch=b * per_batch))
                callback(min(start + per_batch, f), f)
        return torch.cat(chunks, dim=2)

    def running(self):
        return offload_mod.running(self.residency)


# --------------------------------------------------------------------------- text encoder
@dataclass
class SDTextEncoder:
    """KINEFLOW_TEXT_ENCODER for SD1.5: CLIP-L with the shipped tokenizer.

    SD1.5 convention: the prompt is padded with the end-of-text token to 77 tokens (longer prompts are cut) and
    encoded without a padding mask; the UNet attends to the final hidden state of all 77 positions.
    """

    clip: CLIPTextModel
    tokenizer: TextTokenizer
    source: str
    residency: offload_mod.Residency | None = None
    device: torch.device | None = None  # where token ids go (None: where the weights are)
    vocabulary: Vocabulary | None = None  # the words a shipped tiny model knows (video_models.shipped_vocabulary)

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """{"context": [B, 77, D] last hidden state, "pooled": [B, D] state at the end-of-text token}."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids, _mask = self.tokenizer.encode(prompts, CLIP_LENGTH)
        with offload_mod.running(self.residency):
            out = self.clip(ids.to(self.device or next(self.clip.parameters()).device))
        return {"context": out.last_hidden_state, "pooled": out.pooled_output}


# --------------------------------------------------------------------------- loaders
def _build_unet(header, det, dtype, device, offload: str, attention: str, compile: str):
    """(UNet, Residency) from an SD1.5 checkpoint or a UNet file; `attention` from acceleration.resolve_attention."""
    return build_module(
        header, unet_mod.SD15UNet, device=device, dtype=dtype, policy=offload, attention=attention, compile=compile,
        prefix=unet_mod.LDM_PREFIX if det.family == "sd15_checkpoint" else det.prefix,
        convert=lambda sd: unet_mod.convert_state_dict(sd, det.layout), config_from=unet_mod.config_from_state_dict)


def _build_vae(header, det, dtype, device, offload: str, attention: str) -> SDVideoVAE:
    def config_from(shapes):
        config = vae_mod.config_from_state_dict(shapes)
        if config.downscale != SD15_LATENT.spatial_ratio or config.z_channels != SD15_LATENT.channels:
            raise ModelFileError(
                f"{header.path.name!r} is a VAE with {config.z_channels} latent channels at 1/{config.downscale} "
                f"size; SD1.5 latents have {SD15_LATENT.channels} channels at 1/{SD15_LATENT.spatial_ratio} size")
        return config

    vae, residency = build_module(
        header, vae_mod.SDVAE, device=device, dtype=dtype, policy=offload, attention=attention,
        prefix=vae_mod.LDM_PREFIX if det.family == "sd15_checkpoint" else det.prefix,
        convert=lambda sd: vae_mod.convert_state_dict(sd, det.layout), config_from=config_from)
    return SDVideoVAE(vae=vae, dtype=dtype, source=str(header.path), residency=residency)


def _build_text_encoder(path, dtype, device, offload: str, attention: str) -> SDTextEncoder:
    clip, residency = load_text_tower(path, "clip_text", dtype, device, offload, attention)
    return SDTextEncoder(clip=clip, tokenizer=clip_l_tokenizer(), source=str(path), residency=residency,
                         device=device, vocabulary=shipped_vocabulary(path))


def load_sd_checkpoint(name_or_path: str, prediction: str = "eps", dtype_name: str = "auto", offload: str = "auto",
                       attention: str = "auto", compile: str = "auto"
                       ) -> tuple[SD15VideoModel, SDVideoVAE, SDTextEncoder]:
    """UNet, VAE and CLIP-L from one SD1.5 LDM checkpoint: a name in the `checkpoints` folder or a file anywhere
    (the trainer animates a checkpoint given by its path)."""
    f = open_model_file("checkpoints", name_or_path, "sd15_checkpoint", dtype_name, attention)
    unet, residency = _build_unet(f.header, f.det, f.dtype, f.device, offload, f.attention, compile)
    model = SD15VideoModel(unet=unet, dtype=f.dtype, source=str(f.path), prediction=prediction, residency=residency,
                           preview_factors=previews.preview_factors(f.header.metadata, SD15_LATENT))
    return (model, _build_vae(f.header, f.det, f.dtype, f.device, offload, f.attention),
            _build_text_encoder(f.path, f.dtype, f.device, offload, f.attention))


def load_sd_checkpoint_vae(name: str, dtype_name: str = "auto") -> SDVideoVAE:
    """Only the VAE of an SD1.5 LDM checkpoint in the `checkpoints` folder (its UNet and CLIP stay on disk)."""
    f = open_model_file("checkpoints", name, "sd15_checkpoint", dtype_name)
    return _build_vae(f.header, f.det, f.dtype, f.device, "auto", f.attention)


def load_sd_components(unet_name: str, vae_name: str, clip_name: str, prediction: str = "eps",
                       dtype_name: str = "auto", offload: str = "auto", attention: str = "auto", compile: str = "auto"
                       ) -> tuple[SD15VideoModel, SDVideoVAE, SDTextEncoder]:
    """The three parts from separate files: UNet in diffusion_models, VAE in vae, CLIP-L in text_encoders
    (LDM or diffusers names for the UNet and VAE, Hugging Face names for CLIP)."""
    device = host.compute_device()
    dtype = resolve_dtype(dtype_name, device)
    attention = acceleration.resolve_attention(attention, device)
    unet_path = host.model_path("diffusion_models", unet_name)
    header, det = checkpoints.require_family(unet_path, "sd15_unet")
    unet, residency = _build_unet(header, det, dtype, device, offload, attention, compile)
    vae_path = host.model_path("vae", vae_name)
    vae_header, vae_det = checkpoints.require_family(vae_path, "sd_vae")
    vae = _build_vae(vae_header, vae_det, dtype, device, offload, attention)
    model = SD15VideoModel(unet=unet, dtype=dtype, source=str(unet_path), prediction=prediction, residency=residency,
                           preview_factors=previews.preview_factors(vae_header.metadata, SD15_LATENT))
    clip_path = host.model_path("text_encoders", clip_name)
    checkpoints.require_family(clip_path, "clip_text")
    return model, vae, _build_text_encoder(clip_path, dtype, device, offload, attention)


@dataclass(frozen=True)
class MotionModuleHandle:
    """KINEFLOW_MOTION_MODULE: a loaded motion module and the LoRAs merged into it, in order."""

    module: ad.MotionModule
    source: str
    loras: tuple[tuple[str, float], ...] = ()
    residency: offload_mod.Residency | None = None

    @property
    def version(self) -> str:
        return self.module.config.version


def load_motion_module(name: str, dtype_name: str = "auto", offload: str = "auto", attention: str = "auto"
                       ) -> MotionModuleHandle:
    """An AnimateDiff v1/v2/v3 motion module from the animatediff_models folder (original or diffusers names);
    the frames it handles at once come from the length of its positional tables."""
    file = open_model_file("animatediff_models", name, "animatediff_motion_module", dtype_name, attention)
    det = file.det
    module, residency = build_module(
        file.header, ad.MotionModule, device=file.device, dtype=file.dtype, policy=offload, attention=file.attention,
        convert=lambda sd: ad.convert_state_dict(sd, det.layout, det.prefix),
        config_from=lambda shapes: ad.config_from_state_dict(shapes, version=det.version))
    return MotionModuleHandle(module=module, source=str(file.path), residency=residency)


def apply_motion_module(model: SD15VideoModel, motion: MotionModuleHandle, scale: float = 1.0) -> SD15VideoModel:
    """A new model handle running `motion` at strength `scale` (0 = the per-frame image model)."""
    if not isinstance(model, SD15VideoModel):
        raise KineFlowError("motion modules apply to SD1.5 models (Load SD Checkpoint); "
                            f"got a {getattr(model, 'family', type(model).__name__)} model")
    ad.check_compatible(model.unet, motion.module)
    return replace(model, motion=_scaled_view(motion.module, scale), motion_source=motion.source,
                   motion_residency=motion.residency)


def apply_motion_lora(motion: MotionModuleHandle, lora_name: str, strength: float = 1.0) -> MotionModuleHandle:
    """A new motion module handle with the LoRA merged (W += strength * up @ down) into a copy of the module.

    Strength 0 returns the input handle: the merge would leave every weight as it is."""
    path = host.model_path("animatediff_motion_lora", lora_name)
    header, _det = checkpoints.require_family(path, "animatediff_motion_lora")
    if strength == 0.0:
        return motion
    module, residency = _private_copy(motion.module, motion.residency)
    ad.apply_motion_lora(module, _lora_tensors(header), strength)
    return MotionModuleHandle(module=module, source=motion.source, loras=(*motion.loras, (str(path), float(strength))),
                              residency=residency)


def _private_copy(module, residency):
    """A copy of a loaded module (and its offload state) that a merge may change."""
    if residency is None:
        return copy.deepcopy(module), None
    return residency.copy_model()


def _lora_tensors(header) -> dict:
    """LoRA weights on the CPU (merges move each delta to its weight), shapes only in a dry run."""
    return checkpoints.load_tensors(header, device="meta" if host.is_dry_run() else "cpu")


def apply_domain_adapter(model: SD15VideoModel, adapter_name: str, strength: float = 1.0) -> SD15VideoModel:
    """A new model handle whose UNet (a copy) has the AnimateDiff v3 domain adapter LoRA merged in."""
    if not isinstance(model, SD15VideoModel):
        raise KineFlowError("the domain adapter applies to SD1.5 models (Load SD Checkpoint); "
                            f"got a {getattr(model, 'family', type(model).__name__)} model")
    path = host.model_path("loras", adapter_name)
    header, _det = checkpoints.require_family(path, "animatediff_domain_adapter")
    if strength == 0.0:
        return model
    unet, residency = _private_copy(model.unet, model.residency)
    ad.merge_unet_lora(unet, _lora_tensors(header), strength)
    return replace(model, unet=unet, residency=residency)



# --------------------------------------------------------------------------- SparseCtrl
@dataclass(frozen=True)
class SparseCtrlHandle:
    """KINEFLOW_SPARSECTRL: a loaded SparseCtrl (its kind, rgb or scribble, says what its keyframes are)."""

    module: sc.SparseCtrl
    source: str
    residency: offload_mod.Residency | None = None

    @property
    def kind(self) -> str:
        return self.module.config.kind


def load_sparsectrl(name: str, dtype_name: str = "auto", offload: str = "auto", attention: str = "auto"
                    ) -> SparseCtrlHandle:
    """An AnimateDiff v3 SparseCtrl from the controlnet folder: guoyww's v3_sd15_sparsectrl_{rgb,scribble}.ckpt or a
    diffusers SparseControlNetModel (file or folder)."""
    file = open_model_file("controlnet", name, "sparsectrl", dtype_name, attention)
    module, residency = build_module(
        file.header, sc.SparseCtrl, device=file.device, dtype=file.dtype, policy=offload, attention=file.attention,
        prefix=file.det.prefix, convert=lambda sd: sc.convert_state_dict(sd, file.det.layout),
        config_from=sc.config_from_state_dict)
    return SparseCtrlHandle(module=module, source=str(file.path), residency=residency)


@dataclass(frozen=True, eq=False)
class SparseControl:
    """One Apply SparseCtrl on a model handle: keyframe images [N, H, W, 3] in 0..1, the video frame of each
    (negative counts from the end), the strength (diffusers' controlnet_conditioning_scale) and the share of the
    sampling it acts in (0 = the first step's noise level, 1 = the last; ComfyUI's start/end percent). `vae` encodes
    the keyframes of an rgb SparseCtrl."""

    sparsectrl: SparseCtrlHandle
    images: torch.Tensor
    frames: tuple[int, ...]
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    vae: SDVideoVAE | None = None
    # (latent height, width) -> the keyframes as the control net takes them, [N, C, H', W'] on the CPU (`meta` in a
    # dry run). A memo, not state: the handle behaves the same whatever it holds.
    _prepared: dict = field(default_factory=dict, repr=False)

    def active(self, timesteps: torch.Tensor) -> bool:
        """Whether the control acts at this model call's timestep. A partial range reads the timestep from the device
        once per call; a dry run (`meta`) reads nothing and runs the control."""
        if self.strength == 0.0:
            return False
        if self.start_percent <= 0.0 and self.end_percent >= 1.0:
            return True
        if timesteps.is_meta:
            return True
        last = SCHEDULE["num_train_timesteps"] - 1  # percent p is timestep (1 - p) * 999, as ComfyUI maps it
        t = float(timesteps[0])
        return (1.0 - self.end_percent) * last - 1e-3 <= t <= (1.0 - self.start_percent) * last + 1e-3

    def keyframes_in(self, positions: Sequence[int], total: int) -> list[tuple[int, int]]:
        """(position in the call, keyframe) for the keyframes whose video frame is among `positions` (the frames a
        call sees, of a video of `total` frames)."""
        resolved = []
        for frame in self.frames:
            at = frame + total if frame < 0 else frame
            if not 0 <= at < total:
                raise KineFlowError(f"a SparseCtrl keyframe is at video frame {frame}, outside this video's {total} "
                                    f"frames (0 to {total - 1}, or -{total} to -1 counted from the end)")
            resolved.append(at)
        if len(set(resolved)) != len(resolved):
            raise KineFlowError(f"SparseCtrl keyframes at frames {list(self.frames)} name one frame of this "
                                f"{total}-frame video twice")
        where = {frame: i for i, frame in enumerate(positions)}
        return [(where[frame], key) for key, frame in enumerate(resolved) if frame in where]

    def condition(self, height: int, width: int) -> torch.Tensor:
        """The keyframes for a latent of height x width: VAE latents [N, 4, h, w] (rgb) or images [N, 3, 8h, 8w] in
        0..1 (scribble), each centre-cropped to the video's aspect ratio and resized (bilinear)."""
        key = (height, width)
        if key not in self._prepared:
            from .media import resize_frames

            config = self.sparsectrl.module.config
            scale = SD15_LATENT.spatial_ratio if config.simplified_embedding else config.condition_downscale
            size = (height * scale, width * scale)
            if self.images.is_meta:
                images = torch.empty((self.images.shape[0], *size, 3), device="meta")
            else:
                images = resize_frames(self.images.float(), size[1], size[0], "bilinear", "center")
            if config.simplified_embedding:
                device = host.compute_device()
                video = images.permute(3, 0, 1, 2).unsqueeze(0) * 2.0 - 1.0  # [1, 3, N, H, W] in -1..1
                with torch.inference_mode():
                    latents = self.vae.encode(video.to(device), "auto", host.free_memory(device) // 2,
                                              lambda done, total: None)
                prepared = latents[0].transpose(0, 1)  # [N, 4, h, w]
            else:
                prepared = images.permute(0, 3, 1, 2)  # [N, 3, H, W]
            self._prepared[key] = prepared.float() if prepared.is_meta else prepared.float().cpu()
        return self._prepared[key]

    def residuals(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, batch: int, count: int
                  ) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """The control net's residuals for one model call on x [batch * count, 4, h, w] (the frames of the video, or
        of the context window that is running), or None when it does not act on the call: strength 0, a timestep
        outside its range, or no keyframe among the call's frames."""
        if not self.active(timesteps):
            return None
        window = current_window()
        positions = tuple(range(count)) if window is None else window.frames
        total = count if window is None else window.total
        if len(positions) != count:
            raise KineFlowError(f"a model call on {count} frames inside a context window of {len(positions)}")
        keyed = self.keyframes_in(positions, total)
        if not keyed:
            return None
        prepared = self.condition(*x.shape[-2:])
        device, module = x.device, self.sparsectrl.module
        picked = prepared.index_select(0, torch.tensor([k for _, k in keyed], device=prepared.device)).to(device)
        at = torch.tensor([p for p, _ in keyed], device=device)
        condition = torch.zeros((count, *prepared.shape[1:]), device=device).index_copy_(0, at, picked)
        mask = torch.zeros((count, 1, *prepared.shape[2:]), device=device).index_fill_(0, at, 1.0)
        # frames are batch-major in x (video b's frame f at b * count + f): every video gets the same keyframes
        condition, mask = condition.repeat(batch, 1, 1, 1), mask.repeat(batch, 1, 1, 1)
        return module(x, timesteps, context, condition, mask if module.config.condition_mask else None, count,
                      self.strength)


def apply_sparsectrl(model: SD15VideoModel, sparsectrl: SparseCtrlHandle, images: torch.Tensor,
                     frames: Sequence[int], strength: float = 1.0, start_percent: float = 0.0,
                     end_percent: float = 1.0, vae: SDVideoVAE | None = None) -> SD15VideoModel:
    """A new model handle whose sampling runs `sparsectrl` with `images` as the keyframes at video `frames` (one
    image per frame; negative frames count from the end). An rgb SparseCtrl needs the VAE to encode them."""
    if not isinstance(model, SD15VideoModel):
        raise KineFlowError("SparseCtrl applies to SD1.5 / AnimateDiff models (Load SD Checkpoint, Apply Motion "
                            f"Module); got a {getattr(model, 'family', type(model).__name__)} model")
    if not isinstance(sparsectrl, SparseCtrlHandle):
        raise KineFlowError(f"expected a SparseCtrl from Load SparseCtrl; got a {type(sparsectrl).__name__}")
    sc.check_compatible(model.unet, sparsectrl.module)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (3, 4) or not len(images):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise KineFlowError(f"SparseCtrl keyframes must be an IMAGE [frames, height, width, 3]; got {shape}")
    frames = tuple(int(f) for f in frames)
    if len(frames) != len(images):
        raise KineFlowError(f"Apply SparseCtrl got {len(images)} keyframe image(s) and {len(frames)} frame index(es) "
                            f"({', '.join(map(str, frames)) or 'none'}); give one frame index per image, in order")
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise KineFlowError(f"start_percent ({start_percent}) and end_percent ({end_percent}) must satisfy "
                            "0 <= start_percent <= end_percent <= 1")
    if sparsectrl.module.config.simplified_embedding:
        if vae is None:
            raise KineFlowError("this SparseCtrl (rgb) takes the keyframes as VAE latents: connect the VAE from Load SD "
                                "Checkpoint to Apply SparseCtrl's vae input")
        if getattr(vae, "latent_format", None) != SD15_LATENT:
            raise KineFlowError(f"the rgb SparseCtrl needs the SD VAE (sd15 latents) to encode its keyframes; got a "
                                f"{getattr(getattr(vae, 'latent_format', None), 'name', type(vae).__name__)} VAE")
    else:
        vae = None  # a scribble SparseCtrl takes the images as they are
    control = SparseControl(sparsectrl=sparsectrl, images=images[..., :3], frames=frames, strength=float(strength),
                            start_percent=float(start_percent), end_percent=float(end_percent), vae=vae)
    return replace(model, controls=(*model.controls, control))
