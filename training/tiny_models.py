"""Tiny HunyuanVideo-family models written to disk in the real file layouts.

`write_models(models_dir, ...)` saves a transformer, VAE, LLaMA text-encoder folder (with a word-level
tokenizer.json) and CLIP-L text encoder under ComfyUI's folder names, so the real loader nodes, `kineflow
inspect` and workflows use them exactly like full-size files. With random weights they are the fixtures of
the end-to-end tests; the trainer saves its trained weights through the same functions.

Random-weight files are named `kineflow_random_*`, never like the shipped models: a models folder is searched
before the pack's weights/, so a random file of a shipped name would silently replace the shipped model.

    python -m kineflow.training.tiny_models [--out kineflow_models/] [--family animatediff]   # random weights
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save
from tokenizers import Tokenizer, pre_tokenizers, processors
from tokenizers.models import WordLevel

from ..models.clip_text import CLIPTextConfig, CLIPTextModel
from ..models.hunyuan_text import VIDEO_PROMPT_TEMPLATE
from ..models.hunyuan_video_dit import (
    HunyuanVideoDiT,
    HunyuanVideoDiTConfig,
    default_rope_dims,
)
from ..models.hunyuan_video_vae import HunyuanVideoVAE, HunyuanVideoVAEConfig
from ..models.llama_text import LlamaTextConfig, LlamaTextEncoder
from ..runtime.host import DEFAULT_MODELS_DIR
from ..runtime.media import atomic_write
from ..shapes.shipped import HUNYUAN_VIDEO as SHIPPED_NAMES

LLAMA_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<pad>", "[UNK]"]
WORD_PATTERN = r"\w+|[^\w\s]+"  # what pre_tokenizers.Whitespace splits on
CLIP_VOCAB = 49408  # the shipped CLIP-L tokenizer's ids
RANDOM_NAMES = {"dit": "kineflow_random_dit.safetensors", "vae": "kineflow_random_vae.safetensors",
                "llm": "kineflow_random_llm", "clip": "kineflow_random_clip.safetensors"}


@dataclass
class TinyFamily:
    """Configs of one tiny HunyuanVideo-family model set (text widths wired between the parts)."""

    dit: HunyuanVideoDiTConfig
    vae: HunyuanVideoVAEConfig
    llama: LlamaTextConfig
    clip: CLIPTextConfig
    names: dict = field(default_factory=lambda: dict(SHIPPED_NAMES))


def tiny_family(llama_vocab: int) -> TinyFamily:
    # 4 layers read at HunyuanVideo's hidden_state_skip_layer=2: the state after layer 2 (two layers of context
    # for binding a colour to its shape or to "background"); the last two layers exist for the real layout.
    llama = LlamaTextConfig(vocab_size=llama_vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=4)
    clip = CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=1, max_position_embeddings=77)
    dit = HunyuanVideoDiTConfig(
        in_channels=16, out_channels=16, hidden_size=128, heads_num=4, mlp_width_ratio=4.0,
        mm_double_blocks_depth=2, mm_single_blocks_depth=2, refiner_depth=1,
        rope_dim_list=default_rope_dims(32), text_states_dim=llama.hidden_size, text_states_dim_2=clip.hidden_size,
    )
    return TinyFamily(dit=dit, vae=HunyuanVideoVAEConfig.tiny(), llama=llama, clip=clip)


# --------------------------------------------------------------------------- tokenizer
def write_word_tokenizer(folder: Path, texts: list[str]) -> Path:
    """A word-level LLaMA-3-like tokenizer.json over the words of `texts` (+ the prompt template's words).

    LLaMA-3's header tokens are kept as special tokens so HunyuanVideo's prompt template tokenizes the same
    way in structure; BOS is prepended; `<pad>` pads (declared in tokenizer_config.json as HF folders do).
    """
    texts = [VIDEO_PROMPT_TEMPLATE, *texts]
    specials = re.compile("|".join(map(re.escape, LLAMA_SPECIALS)))
    words = sorted({w for t in texts for w in re.findall(WORD_PATTERN, specials.sub(" ", t.lower()))})
    vocab = {tok: i for i, tok in enumerate(LLAMA_SPECIALS + words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    from tokenizers import normalizers

    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(LLAMA_SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(folder / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    return folder


# --------------------------------------------------------------------------- saving in real layouts
def save_safetensors(state_dict: dict, path: Path, metadata: dict | None = None) -> Path:
    """Write a safetensors file whose bytes depend only on its content (so re-exporting unchanged weights leaves
    git nothing to see): safetensors orders the header's metadata at random, so it is re-serialised sorted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    data = save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()})
    with atomic_write(path) as tmp:
        tmp.write_bytes(_with_sorted_metadata(data))
    return path


def set_metadata(path: Path, entries: dict) -> Path:
    """Add or replace metadata entries of a safetensors file, in place and atomically; the tensor bytes stay as
    they are (only the header is rewritten, its metadata sorted as `save_safetensors` writes it)."""
    raw = Path(path).read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    metadata = {**header.pop("__metadata__", {}), **{k: str(v) for k, v in entries.items()}}
    text = json.dumps({"__metadata__": dict(sorted(metadata.items())), **header}, separators=(",", ":"),
                      ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the tensor data stays 8-byte aligned
    with atomic_write(path) as tmp:
        tmp.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length:])
    return Path(path)


def _with_sorted_metadata(data: bytes) -> bytes:
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    # Same content, so the same length as the original (which pads with spaces to align the data).
    return data[:8] + text.ljust(length, b" ") + data[8 + length:]


def save_family(models_dir: Path, family: TinyFamily, dit: HunyuanVideoDiT, vae: HunyuanVideoVAE,
                llama: LlamaTextEncoder, clip: CLIPTextModel, dtype: torch.dtype = torch.float32,
                dit_metadata: dict | None = None) -> dict[str, Path]:
    """Write the four parts in the layouts real files use (original DiT/VAE names, HF text encoder names)."""
    cast = lambda sd: {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}  # noqa: E731
    paths = {
        "dit": save_safetensors(cast(dit.state_dict()), models_dir / "diffusion_models" / family.names["dit"], dit_metadata),
        "vae": save_safetensors(cast(vae.state_dict()), models_dir / "vae" / family.names["vae"],
                                {"scaling_factor": vae.config.scaling_factor,
                                 "norm_num_groups": vae.config.norm_num_groups}),
        "clip": save_safetensors(cast(clip.state_dict()), models_dir / "text_encoders" / family.names["clip"]),
    }
    llm_dir = models_dir / "text_encoders" / family.names["llm"]
    save_safetensors(cast(llama.state_dict()), llm_dir / "model.safetensors")
    cfg = family.llama
    (llm_dir / "config.json").write_text(json.dumps({
        "architectures": ["LlamaModel"], "model_type": "llama", "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
    }, indent=1))
    paths["llm"] = llm_dir
    return paths


def write_models(models_dir: str | Path, texts: list[str] = (), seed: int = 0,
                 names: dict[str, str] = RANDOM_NAMES) -> dict[str, Path]:
    """Random-weight tiny models + tokenizer under `models_dir` (ComfyUI folder names), as `names` by part.
    Returns the paths."""
    models_dir = Path(models_dir)
    tok_dir = write_word_tokenizer(models_dir / "text_encoders" / names["llm"], list(texts))
    vocab = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()
    family = tiny_family(vocab)
    family.names = dict(names)
    torch.manual_seed(seed)
    dit = HunyuanVideoDiT(family.dit)
    _randomise_zero_inits(dit)
    parts = (HunyuanVideoVAE(family.vae), LlamaTextEncoder(family.llama), CLIPTextModel(family.clip))
    return save_family(models_dir, family, dit, *parts)


def comfy_dit_names(state_dict: dict) -> dict:
    """A HunyuanVideo transformer's state dict (original names) under ComfyUI's names: the inverse of
    models/hunyuan_video_dit.convert_state_dict(..., "comfy"), found from the real ComfyUI key set."""
    from ..models import hunyuan_video_dit as dit_mod

    manifest = Path(__file__).resolve().parent.parent / "tests" / "data" / "checkpoints" / "hunyuan_video_dit_comfy.json"
    inverse = {}
    for key in json.loads(manifest.read_text())["tensors"]:
        (internal,) = dit_mod.convert_state_dict({key: torch.empty(0)}, "comfy")
        inverse[internal] = key
    return {inverse[k]: v for k, v in state_dict.items()}


def random_k_blocks(qtype, rows: int, generator, scale: tuple[float, float] = (1e-5, 2e-4)):
    """Valid GGUF blocks of a K-quant type (which the gguf package cannot quantize): random bytes whose float16
    super-block scales are drawn from `scale`. [rows, bytes] for `rows` rows of 256 values."""
    import gguf
    import numpy as np

    values, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = generator.integers(0, 256, size=(rows * 256 // values, nbytes), dtype=np.uint8)
    for at in {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[qtype.name]:
        blocks[:, at:at + 2] = generator.uniform(*scale, size=len(blocks)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def write_gguf(path: Path, tensors: dict, qtype, seed: int = 0) -> Path:
    """A GGUF file as ComfyUI-GGUF's converter writes a HunyuanVideo transformer ("hyvid"): 2-D weights of whole
    rows of 256 values in `qtype` (regrouped into rows of 256 when a row does not divide, the real shape in
    comfy.gguf.orig_shape.<name>), 5-D tensors flattened in F16 with their shape recorded, the rest F32. Types the
    gguf package cannot quantize (K-quants) get random blocks with small scales."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "hyvid")
    generator = np.random.default_rng(seed)
    for name, tensor in tensors.items():
        data = tensor.float().numpy()
        if data.ndim == 2 and data.size % 256 == 0:
            if qtype.name.endswith("_K"):
                blocks = random_k_blocks(qtype, data.size // 256, generator)
            else:
                blocks = gguf.quants.quantize(data.reshape(-1, 256) if data.shape[-1] % 256 else data, qtype)
            writer.add_tensor(name, blocks, raw_dtype=qtype)
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(data.shape))
        elif data.ndim > 4:
            writer.add_tensor(name, data.reshape(-1).astype(np.float16))
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(data.shape))
        else:
            writer.add_tensor(name, data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _randomise_zero_inits(module: torch.nn.Module) -> None:
    """Zero-initialised output layers would make a random model's output ignore its input; fill them."""
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim >= 1 and not p.any():
                p.normal_(0.0, 0.02)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write random-weight tiny model files in the real layouts.")
    parser.add_argument("--out", default=DEFAULT_MODELS_DIR,
                        help=f"models folder; ComfyUI's sub-folder names are created (default ./{DEFAULT_MODELS_DIR}, "
                             "where `kineflow` looks by default)")
    parser.add_argument("--family", choices=["hunyuan_video", "animatediff"], default="hunyuan_video")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.family == "animatediff":
        from . import tiny_sd

        paths = tiny_sd.write_models(args.out, seed=args.seed)
    else:
        paths = write_models(args.out, seed=args.seed)
    for part, path in paths.items():
        print(f"{part}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
