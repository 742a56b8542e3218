"""Load LoRA: a HunyuanVideo LoRA file applied to a video model handle (and to the text encoders when the file
carries layers of theirs), giving new handles.

The input handles are never changed: the LoRA goes into private copies of the transformer and of the text encoders
it touches (Residency.copy_model, so a copy keeps the offload policy). Full-precision layers get the update merged
into their weights; fp8 and GGUF layers keep their weights and run the LoRA beside them (models/weights.py
merge_lora).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging

from ..errors import KineFlowError, ModelFileError
from ..models import checkpoints
from ..models import lora as lora_mod
from ..models.weights import merge_lora
from ..shapes.vocabulary import Vocabulary
from . import host
from .video_models import TextEncoders

log = logging.getLogger(__name__)


def apply_lora(model, lora_name: str, strength: float = 1.0, block_strengths: str = ""):
    """A new HunyuanVideo model handle with `lora_name` (from the loras folder) applied at `strength`, times the
    per-block factors of `block_strengths` (see models/lora.py block_strengths). Text-encoder layers the file may
    carry are left to `load_lora`."""
    return _apply(model, None, lora_name, strength, block_strengths, warn=False)[0]


def load_lora(model, text_encoders, lora_name: str, strength: float = 1.0, block_strengths: str = ""):
    """The Load LoRA node: (model handle, text encoders) with `lora_name` applied at `strength` (block strengths are
    the transformer's); either is the input itself when the file has no layers of it. With `text_encoders` None the
    file's text-encoder layers are skipped with a warning (a model-only chain, as in ComfyUI)."""
    return _apply(model, text_encoders, lora_name, strength, block_strengths, warn=True)


def trigger_words(header) -> list[str]:
    """The words a LoRA file's header says it teaches: the `trigger_words` of the `kineflow.lora` metadata record
    KineFlow's LoRA trainer writes; [] for other files (kohya / musubi metadata has no standard field for them)."""
    try:
        record = json.loads(header.metadata.get("kineflow.lora", "{}"))
    except json.JSONDecodeError:
        return []
    words = record.get("trigger_words", []) if isinstance(record, dict) else []
    return [w.lower() for w in words if isinstance(w, str) and w.isalpha()]


def _apply(model, text_encoders, lora_name: str, strength: float, block_strengths: str, warn: bool):
    if getattr(model, "family", None) != "hunyuan_video":
        raise KineFlowError("Load LoRA applies HunyuanVideo LoRAs to a HunyuanVideo model (Load Video Model); got a "
                            f"{getattr(model, 'family', type(model).__name__)} model. For AnimateDiff use Load Motion "
                            "LoRA or Apply Domain Adapter")
    if text_encoders is not None and not isinstance(text_encoders, TextEncoders):
        raise KineFlowError("Load LoRA's text_encoders input takes HunyuanVideo's text encoders (Load Text Encoders); "
                            f"got {type(text_encoders).__name__}")
    per_block = lora_mod.block_strengths(block_strengths)
    path = host.model_path("loras", lora_name)
    header, _det = checkpoints.require_family(path, "hunyuan_video_lora")
    if strength == 0.0:
        return model, text_encoders
    tensors = checkpoints.load_tensors(header, device="meta" if host.is_dry_run() else "cpu")
    dit_tensors, text_tensors = lora_mod.split_text_encoder(tensors)
    updates, unmatched = lora_mod.dit_updates(dit_tensors, model.net) if dit_tensors else ([], [])
    if unmatched:
        raise ModelFileError(f"{path.name!r}: {len(unmatched)} of its {len(unmatched) + len(updates)} LoRA layers match "
                             f"no layer of this transformer (e.g. {unmatched[:3]}); is it a LoRA for another model?")
    if text_encoders is not None:
        if text_tensors:
            text_encoders = _patch_text_encoders(text_encoders, text_tensors, strength, path.name)
        taught = trigger_words(header)
        if taught and text_encoders.vocabulary is not None:
            # a shipped tiny model's prompt check: the words the LoRA taught it are known now
            text_encoders = dataclasses.replace(
                text_encoders, vocabulary=Vocabulary(text_encoders.vocabulary.words | set(taught)))
    elif text_tensors and warn:
        log.warning("LoRA %s: skipped its %d text-encoder layers, as no text encoders are connected; connect Load "
                    "Text Encoders to Load LoRA's text_encoders input and encode with its text_encoder output to "
                    "apply them", path.name, len(lora_mod.read_pairs(text_tensors)[0]))
    if not updates:
        return model, text_encoders
    if model.residency is not None:
        net, residency = model.residency.copy_model()
    else:
        net, residency = copy.deepcopy(model.net), None
    for update in updates:
        merge_lora(net.get_submodule(update.module), update.up, update.down, strength * per_block(update.module))
    log.info("LoRA %s: %d layers of the transformer at strength %g", path.name, len(updates), strength)
    recipe = model.recipe and dataclasses.replace(
        model.recipe, loras=(*model.recipe.loras, (str(path.resolve()), float(strength), block_strengths)))
    return dataclasses.replace(model, net=net, residency=residency, recipe=recipe), text_encoders


def _patch_text_encoders(text_encoders: TextEncoders, tensors: dict, strength: float, name: str) -> TextEncoders:
    """Text encoders with the LoRA's text-encoder layers merged into copies of the towers they touch."""
    encoder = text_encoders.encoder
    towers = {"llama": encoder.llama, "clip": encoder.clip}
    updates, unmatched = lora_mod.text_encoder_updates(tensors, towers)
    if unmatched:
        found = sum(map(len, updates.values()))
        raise ModelFileError(f"{name!r}: {len(unmatched)} of its {len(unmatched) + found} text-encoder LoRA layers "
                             f"match no layer of the LLaMA or CLIP-L text encoder (e.g. {unmatched[:3]}); expected "
                             "HunyuanVideo's text encoders")
    residencies = dict(zip(towers, text_encoders.residencies))
    for tower, tower_updates in updates.items():
        towers[tower], residencies[tower] = residencies[tower].copy_model()
        for update in tower_updates:
            merge_lora(towers[tower].get_submodule(update.module), update.up, update.down, strength)
        log.info("LoRA %s: %d layers of the %s text encoder at strength %g", name, len(tower_updates),
                 lora_mod.TEXT_ENCODER_NAMES[tower], strength)
    return dataclasses.replace(text_encoders, encoder=encoder.with_towers(towers["llama"], towers["clip"]),
                               residencies=tuple(residencies[tower] for tower in towers))
