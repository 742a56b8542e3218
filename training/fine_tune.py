"""What the stages that fine-tune an exported tiny HunyuanVideo model share (`lora`, `i2v`): the base models folder,
its transformer as a trainable module, and the cache of latents + text conditioning of clips computed with the
base's own VAE and text encoders (through the runtime's loader, exactly as Text Encode computes it at sampling
time)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..models import hunyuan_video_dit as dit_mod
from ..runtime.media import atomic_write
from ..shapes import dataset as shapes
from .common import TrainProgress, file_digest
from .train import _pad_text, base_file, encoder_digest, read_vae_file, trainable_dit, video_batch


def models_folder(base: str) -> Path:
    """The exported models folder a fine-tune starts from: `base`, or '' for the pack's shipped weights/."""
    if base:
        return Path(base)
    from ..runtime.host import SHIPPED_WEIGHTS_DIR

    return SHIPPED_WEIGHTS_DIR


def load_base_state(path: Path) -> dict[str, torch.Tensor]:
    """An exported transformer's weights in fp32 (training computes in fp32 on every CPU)."""
    return {k: v.float() for k, v in load_file(str(path)).items()}


def load_base_dit(path: Path) -> dit_mod.HunyuanVideoDiT:
    """The exported transformer as a trainable module (fp32), every weight frozen."""
    state = load_base_state(path)
    net = trainable_dit(dit_mod.config_from_state_dict(state))
    net.load_state_dict(state)
    net.requires_grad_(False)
    return net.eval()


def encode_clips(path: Path, key: dict, parts: list[shapes.ShapesVideoDataset], models_dir: Path, label: str,
                 batch: int = 8) -> dict:
    """Latents (the base VAE's posterior means, scaled) and text conditioning of the clips of `parts`, in order,
    and of the empty prompt: the cache `train.dit_loss` reads, saved at `path`. Reused while `key` (the caller's
    settings) and the base files it came from are unchanged, rebuilt otherwise."""
    llm, clip = base_file(models_dir, "llm"), base_file(models_dir, "clip")
    vae, _ = read_vae_file(base_file(models_dir, "vae"))
    key = {**key, "dataset": shapes.DATASET_VERSION, "vae_encoder": encoder_digest(vae),
           "text": hashlib.sha256("".join(file_digest(p) for p in (llm / "model.safetensors", llm / "tokenizer.json",
                                                                   clip)).encode()).hexdigest()}
    if path.exists():
        cache = torch.load(path, map_location="cpu", weights_only=True)
        if cache["key"] == key:
            return cache
    from ..runtime.video_models import load_text_encoders

    text = load_text_encoders(str(llm), str(clip), dtype_name="fp32")  # training computes in fp32 on every CPU
    latents, states, masks, pooled, captions = [], [], [], [], []
    bar = TrainProgress(label, 0, sum(len(data) for data in parts))
    with torch.no_grad():
        for data in parts:
            for start in range(0, len(data), batch):
                video, texts = video_batch(data, range(start, min(start + batch, len(data))))
                latents.append(vae.encode_latents(video))
                encoded = text.encode(texts)
                states.append(encoded["text_states"].float())
                masks.append(encoded["text_mask"])
                pooled.append(encoded["text_states_2"].float())
                captions += texts
                bar.update(len(captions))
        bar.close()
        uncond = text.encode([""])
    length = max(int(m.sum(dim=1).max()) for m in masks + [uncond["text_mask"]])
    states, masks = zip(*(_pad_text(s, m, length) for s, m in zip(states, masks)))
    u_states, u_mask = _pad_text(uncond["text_states"].float(), uncond["text_mask"], length)
    cache = {"key": key, "latents": torch.cat(latents), "text_states": torch.cat(states),
             "text_mask": torch.cat(masks), "text_states_2": torch.cat(pooled), "uncond_states": u_states,
             "uncond_mask": u_mask, "uncond_states_2": uncond["text_states_2"].float(), "captions": captions}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save(cache, tmp)
    return cache
