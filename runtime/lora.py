"""Load LoRA: a HunyuanVideo LoRA file applied to a video model handle, giving a new handle.

The input handle is never changed: the LoRA goes into a private copy of the transformer (Residency.copy_model, so
the copy keeps the offload policy). Full-precision layers get the update merged into their weights; fp8 and GGUF
layers keep their weights and run the LoRA beside them (models/weights.py merge_lora).
"""

from __future__ import annotations

import copy
import dataclasses
import logging

from ..errors import KineFlowError, ModelFileError
from ..models import checkpoints
from ..models import lora as lora_mod
from ..models.weights import merge_lora
from . import host

log = logging.getLogger(__name__)


def apply_lora(model, lora_name: str, strength: float = 1.0, block_strengths: str = ""):
    """A new HunyuanVideo model handle with `lora_name` (from the loras folder) applied at `strength`, times the
    per-block factors of `block_strengths` (see models/lora.py block_strengths)."""
    if getattr(model, "family", None) != "hunyuan_video":
        raise KineFlowError("Load LoRA applies HunyuanVideo LoRAs to a HunyuanVideo model (Load Video Model); got a "
                            f"{getattr(model, 'family', type(model).__name__)} model. For AnimateDiff use Load Motion "
                            "LoRA or Apply Domain Adapter")
    per_block = lora_mod.block_strengths(block_strengths)
    path = host.model_path("loras", lora_name)
    header, _det = checkpoints.require_family(path, "hunyuan_video_lora")
    if strength == 0.0:
        return model
    tensors = checkpoints.load_tensors(header, device="meta" if host.is_dry_run() else "cpu")
    updates, unmatched = lora_mod.dit_updates(tensors, model.net)
    if unmatched:
        raise ModelFileError(f"{path.name!r}: {len(unmatched)} of its {len(unmatched) + len(updates)} LoRA layers match "
                             f"no layer of this transformer (e.g. {unmatched[:3]}); is it a LoRA for another model?")
    if model.residency is not None:
        net, residency = model.residency.copy_model()
    else:
        net, residency = copy.deepcopy(model.net), None
    for update in updates:
        merge_lora(net.get_submodule(update.module), update.up, update.down, strength * per_block(update.module))
    log.info("LoRA %s: %d layers of the transformer at strength %g", path.name, len(updates), strength)
    recipe = model.recipe and dataclasses.replace(
        model.recipe, loras=(*model.recipe.loras, (str(path.resolve()), float(strength), block_strengths)))
    return dataclasses.replace(model, net=net, residency=residency, recipe=recipe)
