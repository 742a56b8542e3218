"""HunyuanVideo's text conditioning: LLaMA hidden states of a templated prompt + the pooled CLIP-L vector.

What the reference pipeline does (Tencent HunyuanVideo, `hyvideo/text_encoder`, `hyvideo/constants.py`):
1. the prompt is put into a fixed instruction template and tokenized with the LLaMA-3 tokenizer, right-padded
   and truncated to `text_length + crop_start` tokens (256 + 95 for the video template);
2. the LLaMA hidden state `hidden_state_skip_layer` layers before the end is read (2: the output of layer 30 of
   32, without the final norm);
3. the first `crop_start` positions (the template's instruction part, BOS included) are cut off, states and mask;
4. CLIP-L encodes the raw prompt (77 tokens); its pooled output is the DiT's `text_states_2`.

The result is the KINEFLOW_CONDITIONING payload: {"text_states" [B, L, 4096], "text_mask" [B, L] int64,
"text_states_2" [B, 768]}. A negative prompt is encoded by calling `encode` with it.

HunyuanVideo-I2V (`encode_with_image`, HunyuanVideo-I2V's `hyvideo/text_encoder` in i2v mode, diffusers'
HunyuanVideoImageToVideoPipeline._get_llama_prompt_embeds): the prompt goes into I2V_VIDEO_PROMPT_TEMPLATE, whose
`<image>` token is replaced by the image's 576 LLaVA tokens (models/clip_vision.py) before LLaMA runs. Of the states
at the same layer, the image's tokens are kept apart and thinned to every n-th (`image_interleave`); the text part is
cropped as the video template's (the first `crop_start` tokens of the unexpanded prompt, 103 with LLaVA's tokenizer),
and the assistant header (`<|eot_id|><|start_header_id|>assistant<|end_header_id|>`, 4 tokens, or the last 4 when a long
prompt pushed it out) is cut, keeping its final "\n\n" and the padding. The result is [image tokens, text tokens]:
576 / n + text_length - 4 states, the image's all unmasked.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import KineFlowError, ModelFileError
from . import checkpoints, clip_text, llama_text
from .clip_text import CLIPTextModel
from .llama_text import LlamaTextEncoder
from .tokenization import TextTokenizer
from .weights import load_model

# The instruction template HunyuanVideo's text-to-video model was trained with (PROMPT_TEMPLATE_ENCODE_VIDEO).
# It must be reproduced character for character: the model expects exactly these hidden states.
VIDEO_PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
# HunyuanVideo-I2V's template (PROMPT_TEMPLATE_ENCODE_VIDEO_I2V; diffusers' HunyuanVideoImageToVideoPipeline has the same
# text): LLaVA's `<image>` in the system turn, and an assistant header after the user turn. Character for character.
I2V_VIDEO_PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\n<image>\nDescribe the video by detailing the following aspects "
    "according to the reference image: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>\n\n"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
IMAGE_PLACEHOLDER = "<image>"  # one token in LLaVA-LLaMA-3's tokenizer (id 128257), 576 image tokens in the model
END_HEADER = "<|end_header_id|>"
# Tokens cut before the assistant's "\n\n": <|eot_id|> <|start_header_id|> assistant <|end_header_id|>.
ASSISTANT_HEADER_TOKENS = 4
# Keep every n-th image token (diffusers' `image_embed_interleave`, ComfyUI's `image_interleave`); 2 is the default of
# HunyuanVideo-I2V's text encoder and of diffusers' pipeline: 288 of the 576 image tokens.
IMAGE_INTERLEAVE = 2
TEXT_LENGTH = 256  # prompt tokens kept after cropping (HunyuanVideo --text-len)
HIDDEN_STATE_SKIP_LAYER = 2
CLIP_LENGTH = 77


class HunyuanTextEncoder(nn.Module):
    def __init__(
        self,
        llama: LlamaTextEncoder,
        llama_tokenizer: TextTokenizer,
        clip: CLIPTextModel,
        clip_tokenizer: TextTokenizer,
        *,
        template: str = VIDEO_PROMPT_TEMPLATE,
        crop_start: int | None = None,
        text_length: int = TEXT_LENGTH,
        hidden_state_skip_layer: int = HIDDEN_STATE_SKIP_LAYER,
        apply_final_norm: bool = False,
        clip_length: int = CLIP_LENGTH,
    ):
        """`crop_start=None` counts the tokens of the template's part before `{}` (BOS included); HunyuanVideo's
        own value for its video template is 95. `apply_final_norm` applies LLaMA's final RMSNorm to a skipped
        layer's state (off in HunyuanVideo)."""
        super().__init__()
        if template.count("{}") != 1:
            raise KineFlowError(f"the prompt template must contain exactly one '{{}}' placeholder, found {template.count('{}')}")
        n_layers = llama.config.num_hidden_layers
        if not 0 <= hidden_state_skip_layer < n_layers:
            raise KineFlowError(f"hidden_state_skip_layer must be between 0 and {n_layers - 1}, got {hidden_state_skip_layer}")
        self.llama = llama
        self.clip = clip
        self.llama_tokenizer = llama_tokenizer
        self.clip_tokenizer = clip_tokenizer
        self.template = template
        self.crop_start = self.count_template_tokens() if crop_start is None else int(crop_start)
        self.text_length = text_length
        self.hidden_state_skip_layer = hidden_state_skip_layer
        self.apply_final_norm = apply_final_norm
        self.clip_length = clip_length
        # Where token ids go. None: where the weights are; set it when an offloader moves them only when they run.
        self.device: torch.device | None = None

    def with_towers(self, llama: LlamaTextEncoder, clip: CLIPTextModel) -> "HunyuanTextEncoder":
        """The same encoder (tokenizers, template, settings, device) over other LLaMA and CLIP modules, such as copies
        with a LoRA merged in; this one is left as it is."""
        other = copy.copy(self)
        other._modules = dict(self._modules)  # nn.Module keeps its children in this dict: the copy needs its own
        other.llama, other.clip = llama, clip
        return other

    def count_template_tokens(self) -> int:
        """Tokens of the template before the prompt, as the tokenizer adds them (BOS included)."""
        return len(self.llama_tokenizer.ids(self.template[: self.template.index("{}")]))

    @property
    def max_length(self) -> int:
        """LLaMA sequence length before cropping: text_length + crop_start."""
        return self.text_length + self.crop_start

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """Conditioning for one prompt or a batch: text_states [B, text_length, D], text_mask [B, text_length],
        text_states_2 [B, D_clip]. The states are on the encoders' device; the mask, token bookkeeping from the
        tokenizer, stays on the CPU."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        llama_device = self.device or next(self.llama.parameters()).device
        ids, mask = self.llama_tokenizer.encode([self.template.replace("{}", p) for p in prompts], self.max_length)
        states = self.llama(ids.to(llama_device), mask.to(llama_device),
                            output_hidden_layer=-(self.hidden_state_skip_layer + 1))
        if self.apply_final_norm and self.hidden_state_skip_layer > 0:
            states = self.llama.model.norm(states)
        clip_device = self.device or next(self.clip.parameters()).device
        clip_ids, clip_mask = self.clip_tokenizer.encode(prompts, self.clip_length)
        pooled = self.clip(clip_ids.to(clip_device), clip_mask.to(clip_device)).pooled_output
        return {
            "text_states": states[:, self.crop_start:],
            "text_mask": mask[:, self.crop_start:],
            "text_states_2": pooled,
        }

    def _clip_pooled(self, prompts: list[str]) -> torch.Tensor:
        clip_device = self.device or next(self.clip.parameters()).device
        clip_ids, clip_mask = self.clip_tokenizer.encode(prompts, self.clip_length)
        return self.clip(clip_ids.to(clip_device), clip_mask.to(clip_device)).pooled_output

    def image_prompt_ids(self, prompts: Sequence[str], template: str = I2V_VIDEO_PROMPT_TEMPLATE,
                         crop_start: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, int]:
        """The unexpanded I2V prompt tokens: (ids [B, L], mask [B, L], position of `<image>`, assistant start [B] (the
        position after the assistant header, L when truncation removed it), crop_start). L = text_length +
        crop_start; crop_start=None counts the template's tokens before `{}` (`<image>` is one)."""
        tokenizer = self.llama_tokenizer
        image_id = tokenizer.tokenizer.token_to_id(IMAGE_PLACEHOLDER)
        end_header_id = tokenizer.tokenizer.token_to_id(END_HEADER)
        if image_id is None or end_header_id is None:
            missing = [t for t, i in ((IMAGE_PLACEHOLDER, image_id), (END_HEADER, end_header_id)) if i is None]
            raise KineFlowError(
                f"the LLaMA tokenizer ({tokenizer.source or 'given'}) has no {' or '.join(map(repr, missing))} token; "
                "HunyuanVideo-I2V's image prompt needs LLaVA-LLaMA-3's tokenizer (the text_encoder folder of "
                "HunyuanVideo-I2V, or xtuner/llava-llama-3-8b-v1_1-transformers), where '<image>' is id 128257")
        if template.count("{}") != 1 or template.count(IMAGE_PLACEHOLDER) != 1:
            raise KineFlowError("an image prompt template needs exactly one '{}' and one '<image>'")
        prefix = template[: template.index("{}")]
        crop_start = len(tokenizer.ids(prefix)) if crop_start is None else int(crop_start)
        headers = tokenizer.ids(template).count(end_header_id)
        ids, mask = tokenizer.encode([template.replace("{}", p) for p in prompts], self.text_length + crop_start)
        at = (ids == image_id).int()
        if not bool((at.sum(dim=1) == 1).all()):
            raise KineFlowError(f"every templated prompt must hold one {IMAGE_PLACEHOLDER!r} token; found "
                                f"{at.sum(dim=1).tolist()}")
        image_at = at.argmax(dim=1)
        if not bool((image_at == image_at[0]).all()) or int(image_at[0]) >= crop_start:
            raise KineFlowError(f"the {IMAGE_PLACEHOLDER!r} token must sit in the template's part before the prompt "
                                f"(before token {crop_start}); found it at {image_at.tolist()}")
        length = ids.shape[1]
        assistant = torch.full((ids.shape[0],), length, dtype=torch.long)
        for row in range(ids.shape[0]):
            found = (ids[row] == end_header_id).nonzero().flatten()
            if len(found) == headers:  # the assistant header survived truncation
                assistant[row] = int(found[-1]) + 1
        return ids, mask, int(image_at[0]), assistant, crop_start

    @torch.no_grad()
    def encode_with_image(self, prompts: str | Sequence[str], image_tokens: torch.Tensor,
                          image_interleave: int = IMAGE_INTERLEAVE, template: str = I2V_VIDEO_PROMPT_TEMPLATE,
                          crop_start: int | None = None) -> dict[str, torch.Tensor]:
        """HunyuanVideo-I2V's conditioning for prompts and one image's LLaVA tokens `image_tokens` [1 or B, N, D]
        (models/clip_vision.LlavaVisionEncoder): text_states [B, ceil(N / image_interleave) + text_length - 4, D] (the
        kept image tokens first), text_mask (1 over the image tokens), text_states_2 (CLIP-L of the prompt alone)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if image_interleave < 1:
            raise KineFlowError(f"image_interleave must be 1 or more; got {image_interleave}")
        ids, mask, image_at, assistant, crop_start = self.image_prompt_ids(prompts, template, crop_start)
        b, n = len(prompts), image_tokens.shape[1]
        if image_tokens.ndim != 3 or image_tokens.shape[0] not in (1, b):
            raise KineFlowError(f"image tokens must be [1 or {b}, N, D]; got {tuple(image_tokens.shape)}")
        width = self.llama.config.hidden_size
        if image_tokens.shape[2] != width:
            raise KineFlowError(f"the CLIP vision model's projector gives {image_tokens.shape[2]}-wide image tokens; this "
                                f"LLaMA text encoder is {width} wide. Use the LLaVA vision file that belongs to it")
        # The sequence LLaMA sees: <image> widened to N positions (their ids are never embedded: pad stands in).
        filler = torch.full((b, n), self.llama_tokenizer.pad_id, dtype=ids.dtype)
        expanded = torch.cat([ids[:, :image_at], filler, ids[:, image_at + 1:]], dim=1)
        expanded_mask = torch.cat([mask[:, :image_at], torch.ones_like(filler), mask[:, image_at + 1:]], dim=1)
        llama_device = self.device or next(self.llama.parameters()).device
        states = self.llama(expanded.to(llama_device), expanded_mask.to(llama_device),
                            output_hidden_layer=-(self.hidden_state_skip_layer + 1),
                            image_embeds=image_tokens.to(llama_device).expand(b, -1, -1), image_start=image_at)
        if self.apply_final_norm and self.hidden_state_skip_layer > 0:
            states = self.llama.model.norm(states)
        shift = n - 1  # a token at unexpanded position q > image_at sits at q + shift
        text_states, text_masks = [], []
        for row in range(b):
            cut = int(assistant[row]) - ASSISTANT_HEADER_TOKENS
            text_states.append(torch.cat([states[row, crop_start + shift: cut + shift],
                                          states[row, cut + ASSISTANT_HEADER_TOKENS + shift:]]))
            text_masks.append(torch.cat([mask[row, crop_start:cut], mask[row, cut + ASSISTANT_HEADER_TOKENS:]]))
        image_states = states[:, image_at: image_at + n: image_interleave]
        image_mask = torch.ones(b, image_states.shape[1], dtype=mask.dtype)
        return {
            "text_states": torch.cat([image_states, torch.stack(text_states)], dim=1),
            "text_mask": torch.cat([image_mask, torch.stack(text_masks)], dim=1),
            "text_states_2": self._clip_pooled(prompts),
        }


# --------------------------------------------------------------------------- loading from files
_TOWER_LEVEL = {"clip_text": "text_model.", "llama_text": "model."}


@dataclass(frozen=True)
class TextTower:
    """How to build one text encoder from a file: what `weights.load_model` (or the offloader) needs."""

    header: checkpoints.Header
    model_class: type
    prefix: str
    convert: Callable
    config_from: Callable


def text_tower(path: str | os.PathLike, family: str) -> TextTower:
    """The LLaMA ("llama_text") or CLIP ("clip_text") tower of a .safetensors file or Hugging Face folder.

    Only the tower's own tensors are read (not the UNet of a full SD checkpoint, not lm_head); past the prefix
    the names are in the module's "hf_bare" layout."""
    module, model_class = {"llama_text": (llama_text, LlamaTextEncoder), "clip_text": (clip_text, CLIPTextModel)}[family]
    header = checkpoints.read_header(path)
    prefix, layout = module.locate(header.tensors)
    tower = prefix + (_TOWER_LEVEL[family] if layout == "hf" else "")
    if family == "llama_text" and layout == "gguf":
        config_from = lambda shapes: _gguf_llama_config(shapes, header)  # noqa: E731
    elif family == "llama_text":
        config_from = lambda shapes: _llama_config(shapes, Path(path))  # noqa: E731
    else:
        config_from = module.config_from_state_dict
    return TextTower(header, model_class, tower, module.convert_state_dict, config_from)


def load_llama_text(path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                    device: torch.device | str = "cpu") -> LlamaTextEncoder:
    """A LLaMA text encoder from a .safetensors file or a Hugging Face model folder."""
    return _load(text_tower(path, "llama_text"), dtype, device)


def load_clip_text(path: str | os.PathLike, dtype: torch.dtype = torch.float16,
                   device: torch.device | str = "cpu") -> CLIPTextModel:
    """A CLIP text model (any file holding one CLIP text tower, e.g. clip_l.safetensors or an SD1.5 checkpoint)."""
    return _load(text_tower(path, "clip_text"), dtype, device)


def _load(tower: TextTower, dtype, device):
    return load_model(tower.header, tower.model_class, prefix=tower.prefix, convert=tower.convert,
                      config_from=tower.config_from, dtype=dtype, device=device)


def _folder_config(path: Path) -> dict:
    """The config.json of a Hugging Face model folder ({} for a single file or a folder without one)."""
    config_file = path / "config.json"
    if not path.is_dir() or not config_file.exists():
        return {}
    try:
        declared = json.loads(config_file.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise ModelFileError(f"cannot read {config_file}: {e}") from None
    if not isinstance(declared, dict):
        raise ModelFileError(f"{config_file} holds a JSON {type(declared).__name__}; expected an object")
    return declared


def _gguf_llama_config(shapes: dict, header: checkpoints.Header) -> llama_text.LlamaTextConfig:
    """A GGUF's metadata (`llama.*`) gives the head count, RoPE theta and norm eps; its q/k rows are in llama.cpp's
    order, so rotary pairs are adjacent (see models/llama_text.py)."""
    declared = checkpoints.metadata_numbers(header, "llama_text")
    hidden = llama_text._shape(shapes["model.embed_tokens.weight"])[1]
    heads = declared.get("llama.attention.head_count", hidden // llama_text.LLAMA_HEAD_DIM)
    if heads <= 0 or hidden % heads:
        raise ModelFileError(f"{header.path.name!r} declares llama.attention.head_count={heads}, which does not "
                             f"divide the hidden size {hidden}")
    config = llama_text.config_from_state_dict(shapes, head_dim=hidden // heads)
    fields = {"rope_theta": "llama.rope.freq_base", "rms_norm_eps": "llama.attention.layer_norm_rms_epsilon"}
    return dataclasses.replace(config, rope_interleaved=True,
                               **{k: declared[key] for k, key in fields.items() if key in declared})


def _llama_config(shapes: dict, path: Path) -> llama_text.LlamaTextConfig:
    """Shapes give the sizes; a folder's config.json gives what they cannot (head width, RoPE theta, norm eps)."""
    declared = _folder_config(path)
    if "num_attention_heads" not in declared:
        config = llama_text.config_from_state_dict(shapes)
    else:
        hidden = llama_text._shape(shapes["model.embed_tokens.weight"])[1]
        heads = _declared(declared, "num_attention_heads", int, path)
        if heads <= 0 or hidden % heads:
            raise ModelFileError(f"{path / 'config.json'} declares {heads} attention heads, which do not divide the "
                                 f"hidden size {hidden} of the weights")
        config = llama_text.config_from_state_dict(shapes, head_dim=hidden // heads)
        kv_heads = _declared(declared, "num_key_value_heads", int, path) if "num_key_value_heads" in declared else heads
        if kv_heads != config.num_key_value_heads:
            raise ModelFileError(f"{path / 'config.json'} declares {kv_heads} key/value heads; the weights hold "
                                 f"{config.num_key_value_heads} of width {hidden // heads}")
    fields = ("rope_theta", "rms_norm_eps")
    return dataclasses.replace(config, **{k: _declared(declared, k, float, path) for k in fields if k in declared})


def _declared(declared: dict, key: str, kind: type, folder: Path):
    """A number from config.json: an int for `kind=int`, a finite positive-or-zero float for `kind=float`."""
    value = declared[key]
    ok = type(value) is int if kind is int else type(value) in (int, float) and math.isfinite(value) and value >= 0
    if not ok:
        raise ModelFileError(f"{folder / 'config.json'}: {key} is {str(value)[:40]!r}; expected "
                             f"{'an integer' if kind is int else 'a finite non-negative number'}")
    return kind(value)
