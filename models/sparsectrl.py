"""AnimateDiff v3 SparseCtrl (Guo et al. 2023, "SparseCtrl: Adding Sparse Controls to Text-to-Video Diffusion
Models"): a ControlNet for the SD1.5 UNet + motion module that takes conditions on a few frames only.

The network is the SD1.5 UNet's down path and middle block (conv_in, time embedding, resnets + spatial transformers,
downsamplers) with an AnimateDiff temporal module after every resnet(+attention) of the down path, so that a condition
given on some frames reaches the others. It returns one residual per skip connection of the UNet (through a 1x1
`controlnet_down_blocks` conv each) and one for the middle block (`controlnet_mid_block`), scaled by the strength
(diffusers' `conditioning_scale`); the UNet adds them (models/sd15_unet.py, `control`).

What differs from an image ControlNet:
- the condition: a per-frame tensor that is zero on frames without one, concatenated with a one-channel mask that
  is 1 on the frames that carry a condition (`concat_conditioning_mask`);
- the condition embedding (`controlnet_cond_embedding`), added to conv_in's output:
  - "rgb" (`use_simplified_condition_embedding`): one 3x3 conv on the VAE latent of the keyframe (4 channels,
    + mask). The released v3_sd15_sparsectrl_rgb.ckpt is this kind: guoyww's animate.py and diffusers'
    AnimateDiffSparseControlNetPipeline encode the keyframe image (0..1 -> -1..1) with the VAE and scale it by 0.18215;
  - "scribble": the ControlNet pixel embedding (conv_in, pairs of 3x3 convs, three of stride 2, conv_out) on the
    image in 0..1 at 8x the latent size (3 channels, + mask): v3_sd15_sparsectrl_scribble.ckpt;
- `set_noisy_sample_input_to_zero`: conv_in sees zeros instead of the noisy latent (both released configs, and
  always in diffusers), so the residuals depend on the condition, the timestep and the text only;
- no motion module in the middle block, and the temporal transformer blocks hold one self-attention (the motion
  modules of the UNet have two).

Normalisation follows guoyww's code, which the released files were trained with: every GroupNorm, the temporal ones
included, normalises each frame alone (diffusers' AnimateDiffTransformer3D normalises across frames).

Internal keys: the down path and middle block in the LDM names of models/sd15_unet.py (`input_blocks.*`,
`middle_block.*`, `time_embed.*`); the temporal modules, the condition embedding and the output convs under their
released names (`down_blocks.L.motion_modules.M.temporal_transformer.*`, `controlnet_cond_embedding*`,
`controlnet_down_blocks.N`, `controlnet_mid_block`). Two file layouts are read: guoyww's original
(v3_sd15_sparsectrl_*.ckpt: diffusers 0.11 UNet names + the motion modules' original names) and diffusers'
`SparseControlNetModel`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelFileError
from . import animatediff as ad
from . import sd15_unet as su

KINDS = ("rgb", "scribble")
PIXEL_CHANNELS = 3


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class SparseCtrlConfig:
    in_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    num_heads: int = 8
    context_dim: int = 768
    norm_groups: int = 32
    # use_simplified_condition_embedding: one conv on a VAE latent ("rgb"), else the pixel embedding ("scribble")
    simplified_embedding: bool = True
    condition_channels: int = 4  # a VAE latent (rgb) or an RGB image (3, scribble), without the mask
    condition_mask: bool = True  # concat_conditioning_mask
    embedding_channels: tuple[int, ...] = (16, 32, 96, 256)  # widths of the pixel embedding (scribble only)
    zero_noisy_input: bool = True  # set_noisy_sample_input_to_zero
    motion_heads: int = 8
    max_frames: int = 32  # length of the temporal modules' positional tables

    def __post_init__(self):
        if len(self.attention_levels) != len(self.channel_mult):
            raise ValueError(f"attention_levels has {len(self.attention_levels)} entries, expected one per level "
                             f"({len(self.channel_mult)})")

    @classmethod
    def full(cls, kind: str = "rgb") -> "SparseCtrlConfig":
        """The released v3 SparseCtrl for SD1.5: `rgb` (v3_sd15_sparsectrl_rgb.ckpt) or `scribble`."""
        if kind not in KINDS:
            raise ValueError(f"unknown SparseCtrl kind {kind!r}; expected one of {KINDS}")
        return cls() if kind == "rgb" else cls(simplified_embedding=False, condition_channels=PIXEL_CHANNELS)

    @classmethod
    def tiny(cls, kind: str = "rgb") -> "SparseCtrlConfig":
        """Test size, matching SD15UNetConfig.tiny(); the pixel embedding keeps its 8x downscale."""
        return replace(cls.full(kind), model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                       attention_levels=(True, False), num_heads=2, context_dim=32, motion_heads=2,
                       embedding_channels=(4, 8, 8, 16))

    @property
    def kind(self) -> str:
        return "rgb" if self.simplified_embedding else "scribble"

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def condition_downscale(self) -> int:
        """How much smaller the residuals are than the condition: 1 for a latent, 8 for the released pixel embedding."""
        return 1 if self.simplified_embedding else 2 ** (len(self.embedding_channels) - 1)

    def level_channels(self) -> list[int]:
        return [self.model_channels * m for m in self.channel_mult]

    def motion_config(self) -> ad.MotionModuleConfig:
        """The temporal modules: AnimateDiff v3's, one self-attention per block, none in the middle block."""
        return ad.MotionModuleConfig(version="v3", block_channels=tuple(self.level_channels()),
                                     layers_per_block=self.num_res_blocks, mid_block=False, heads=self.motion_heads,
                                     max_frames=self.max_frames, norm_groups=self.norm_groups, attention_blocks=1)


# --------------------------------------------------------------------------- layers
class ConditionEmbedding(nn.Module):
    """ControlNet's pixel embedding: conv_in, then per width step a 3x3 conv and a strided 3x3 conv, then conv_out
    (zero-initialised) to the UNet's width; SiLU after every conv but the last."""

    def __init__(self, in_channels: int, widths: Sequence[int], out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for width, wider in zip(widths[:-1], widths[1:]):
            self.blocks.append(nn.Conv2d(width, width, 3, padding=1))
            self.blocks.append(nn.Conv2d(width, wider, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)
        _zero(self.conv_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(x))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


class _MotionStage(nn.Module):
    """The temporal modules of one down level (`down_blocks.L.motion_modules.M`)."""

    def __init__(self, channels: int, count: int, config: ad.MotionModuleConfig):
        super().__init__()
        self.motion_modules = nn.ModuleList(ad.TemporalModule(channels, config) for _ in range(count))


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# --------------------------------------------------------------------------- the control net
class SparseCtrl(nn.Module):
    def __init__(self, config: SparseCtrlConfig):
        super().__init__()
        self.config = c = config
        mc, emb, groups = c.model_channels, c.time_embed_dim, c.norm_groups
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))

        # The UNet's input blocks: conv_in, per level num_res_blocks x [ResBlock (+attention)], a downsampler.
        self.input_blocks = nn.ModuleList([nn.ModuleList([nn.Conv2d(c.in_channels, mc, 3, padding=1)])])
        self._down_roles: list[tuple[int, int] | None] = [None]  # (level, index) of resnet blocks
        skip_channels, ch = [mc], mc
        levels = c.level_channels()
        for level, out_ch in enumerate(levels):
            for index in range(c.num_res_blocks):
                layers = [su.ResBlock(ch, emb, out_ch, groups)]
                ch = out_ch
                if c.attention_levels[level]:
                    layers.append(su.SpatialTransformer(ch, c.num_heads, c.context_dim, groups))
                self.input_blocks.append(nn.ModuleList(layers))
                self._down_roles.append((level, index))
                skip_channels.append(ch)
            if level != len(levels) - 1:
                self.input_blocks.append(nn.ModuleList([su.Downsample(ch)]))
                self._down_roles.append(None)
                skip_channels.append(ch)
        self.middle_block = nn.ModuleList([su.ResBlock(ch, emb, ch, groups),
                                           su.SpatialTransformer(ch, c.num_heads, c.context_dim, groups),
                                           su.ResBlock(ch, emb, ch, groups)])
        motion = c.motion_config()
        self.down_blocks = nn.ModuleList(_MotionStage(width, c.num_res_blocks, motion) for width in levels)

        condition_in = c.condition_channels + int(c.condition_mask)
        if c.simplified_embedding:
            self.controlnet_cond_embedding = _zero(nn.Conv2d(condition_in, mc, 3, padding=1))
        else:
            self.controlnet_cond_embedding = ConditionEmbedding(condition_in, c.embedding_channels, mc)
        self.controlnet_down_blocks = nn.ModuleList(_zero(nn.Conv2d(width, width, 1)) for width in skip_channels)
        self.controlnet_mid_block = _zero(nn.Conv2d(ch, ch, 1))

    @property
    def dtype(self) -> torch.dtype:
        return self.controlnet_mid_block.weight.dtype

    def offload_blocks(self) -> list[nn.Module]:
        """The repeated blocks in the order they run (input blocks with their temporal modules, then the middle
        block): the units runtime/offload.py swaps in and out."""
        blocks = []
        for role, layers in zip(self._down_roles, self.input_blocks):
            blocks.append(layers)
            if role is not None:
                blocks.append(self.down_blocks[role[0]].motion_modules[role[1]])
        return [*blocks, self.middle_block]

    def compile_blocks(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, (su.ResBlock, su.SpatialTransformer))]

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, condition: torch.Tensor,
                mask: torch.Tensor | None, video_frames: int, scale: float = 1.0
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The control residuals for a batch of B*F frames.

        x [B*F, 4, h, w] the noisy latents (unused when `zero_noisy_input`: only their shape, dtype and device count),
        timesteps [B*F], context [B*F, tokens, D], condition [B*F, C, h, w] for a latent condition or
        [B*F, C, 8h, 8w] for pixels (zero on frames without a condition), mask [B*F, 1, same size] (1 on frames with a
        condition; None for a file without the mask channel), `video_frames` F consecutive frames per video.
        Returns one residual per UNet skip connection (input block order) and the middle block's, times `scale`."""
        c = self.config
        if video_frames < 1 or x.shape[0] % video_frames:
            raise ValueError(f"a batch of {x.shape[0]} frames cannot be split into videos of {video_frames} frames")
        if video_frames > c.max_frames:
            raise ModelFileError(f"this SparseCtrl handles at most {c.max_frames} frames at once (its positional "
                                 f"table length), found {video_frames}; use context windows for longer videos")
        dtype = self.dtype
        emb = self.time_embed(su.timestep_embedding(timesteps, c.model_channels).to(dtype))
        h = torch.zeros_like(x, dtype=dtype) if c.zero_noisy_input else x.to(dtype)
        if c.condition_mask:
            if mask is None:
                raise ValueError("this SparseCtrl takes a frame mask with its condition; got none")
            condition = torch.cat([condition.to(dtype), mask.to(dtype)], dim=1)
        h = self.input_blocks[0][0](h) + self.controlnet_cond_embedding(condition.to(dtype))
        context = context.to(dtype)

        skips = [h]
        for role, layers in zip(self._down_roles[1:], self.input_blocks[1:]):
            if role is None:  # a downsampler
                h = layers[0](h)
            else:
                h = layers[0](h, emb)
                if len(layers) > 1:
                    h = layers[1](h, context)
                h = self.down_blocks[role[0]].motion_modules[role[1]](h, video_frames, 1.0)
            skips.append(h)
        h = self.middle_block[0](h, emb)
        h = self.middle_block[1](h, context)
        h = self.middle_block[2](h, emb)

        down = [conv(skip) * scale for conv, skip in zip(self.controlnet_down_blocks, skips)]
        return down, self.controlnet_mid_block(h) * scale


def check_compatible(unet: su.SD15UNet, control: SparseCtrl) -> None:
    """Raise a clear error when the SparseCtrl was made for another UNet: its residuals must match the skip
    connections (widths and resnets per level) and its text context the UNet's."""
    found = (tuple(control.config.level_channels()), control.config.num_res_blocks, control.config.context_dim,
             control.config.in_channels)
    expected = (tuple(unet.config.level_channels()), unet.config.num_res_blocks, unet.config.context_dim,
                unet.config.in_channels)
    if found != expected:
        raise ModelFileError(
            f"the SparseCtrl does not fit this UNet: it has channels {list(found[0])} with {found[1]} resnets per "
            f"level, a {found[2]}-wide text context and {found[3]} latent channels; the UNet has channels "
            f"{list(expected[0])} with {expected[1]} resnets per level, a {expected[2]}-wide text context and "
            f"{expected[3]} latent channels")


# --------------------------------------------------------------------------- checkpoints
def config_from_state_dict(shapes: Mapping[str, Sequence[int] | torch.Tensor], heads: int = 8,
                           motion_heads: int = 8) -> SparseCtrlConfig:
    """The architecture from internal-layout shapes. Head counts are not visible in shapes (SD1.5 and AnimateDiff
    use 8); whether conv_in sees zeros is not either (both released files do)."""
    shape = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in shapes.items()}
    encoder = su.encoder_config(shape)
    if "controlnet_cond_embedding.weight" in shape:
        simplified, base = True, encoder["in_channels"]
        condition_in = shape["controlnet_cond_embedding.weight"][1]
        widths = SparseCtrlConfig.embedding_channels
    elif "controlnet_cond_embedding.conv_in.weight" in shape:
        simplified, base = False, PIXEL_CHANNELS
        condition_in = shape["controlnet_cond_embedding.conv_in.weight"][1]
        count = 1 + max((int(k.split(".")[2]) for k in shape if k.startswith("controlnet_cond_embedding.blocks.")),
                        default=-1)
        widths = (shape["controlnet_cond_embedding.conv_in.weight"][0],
                  *(shape[f"controlnet_cond_embedding.blocks.{i}.weight"][0] for i in range(1, count, 2)))
    else:
        raise ModelFileError("expected a SparseCtrl condition embedding (controlnet_cond_embedding.weight or "
                             "controlnet_cond_embedding.conv_in.weight), found none")
    if condition_in not in (base, base + 1):
        what = "a VAE latent" if simplified else "an RGB image"
        raise ModelFileError(f"the SparseCtrl condition embedding takes {condition_in} channels; expected {base} "
                             f"({what}) or {base + 1} (with the frame mask)")
    levels = len(encoder["channel_mult"])
    with_motion = {int(k.split(".")[1]) for k in shape if k.startswith("down_blocks.") and ".motion_modules." in k}
    if with_motion != set(range(levels)):
        raise ModelFileError(f"expected temporal modules on all {levels} down levels of the SparseCtrl, found them on "
                             f"{sorted(with_motion) or 'none'}")
    if any(".attention_blocks.1." in k for k in shape):
        raise ModelFileError("the SparseCtrl's temporal blocks have two attentions; SparseCtrl has one (two is the "
                             "layout of a motion module)")
    pe = next((v for k, v in shape.items() if k.endswith("pos_encoder.pe")), None)
    if pe is None:
        raise ModelFileError("expected `pos_encoder.pe` tables in the SparseCtrl's temporal modules, found none")
    return SparseCtrlConfig(num_heads=heads, simplified_embedding=simplified, condition_channels=base,
                            condition_mask=condition_in == base + 1, embedding_channels=tuple(widths),
                            motion_heads=motion_heads, max_frames=pe[1], **encoder)


def convert_state_dict(sd: Mapping[str, torch.Tensor], layout: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """`original` (guoyww's v3_sd15_sparsectrl_*.ckpt) or `diffusers` (SparseControlNetModel) names -> internal.

    Both spell the UNet part with diffusers names (`conv_in`, `time_embedding.linear_1`, `down_blocks.N.resnets.M`,
    `mid_block.*`), mapped to the LDM names; the temporal modules differ as a motion module's do
    (models/animatediff.py); the SparseCtrl layers keep their names."""
    if layout not in ("original", "diffusers"):
        raise ModelFileError(f"unknown SparseCtrl key layout {layout!r}; expected 'original' or 'diffusers'")
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    down = [k for k in sd if k.startswith("down_blocks.")]
    if not any(".resnets." in k for k in down):
        raise ModelFileError("expected SparseCtrl tensors (down_blocks.N.resnets.M...), found none")
    levels = 1 + max(int(k.split(".")[1]) for k in down)
    per_level = 1 + max(int(k.split(".")[3]) for k in down if k.startswith("down_blocks.0.resnets."))
    out, motion = {}, {}
    for key, value in sd.items():
        if ".motion_modules." in key:
            motion[key] = value
        elif re.match(r"controlnet_(cond_embedding|down_blocks|mid_block)\b", key):
            out[key] = value
        else:
            module, param = key.rsplit(".", 1)
            out[f"{su.diffusers_module_to_ldm(module, levels, per_level, set())}.{param}"] = value
    out.update(ad.convert_state_dict(motion, layout, attentions=1))
    return out
