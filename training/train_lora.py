"""The `lora` stage: teach an exported tiny HunyuanVideo model a word it never saw, with a LoRA on its transformer.

    python -m kineflow.training.train lora --run-dir runs/quickly_lora --threads 1 [--concept quickly] [--resume]
        (the measured recipe, with --twins on: training/README.md)

The word is a concept of shapes/attributes.py `CONCEPTS`: `quickly` (the default), a speed word, or `orange`, a colour
word. The base model (default: the pack's shipped weights/) stays frozen: transformer, VAE and text encoders are read
from its files; only the LoRA's `down` [rank, in] and `up` [out, rank] matrices train, on every linear layer of the
transformer's blocks (and, with the default `--targets blocks+text`, of its text refiner `txt_in` and CLIP projection
`vector_in`, the layers that read the prompt). Each layer computes `W x + up (down x) * alpha / rank`; `up` starts at
zero, so step 0 is exactly the base model.

Data: concept clips (shapes/dataset.py `concept`), whose first shape carries the concept, plus the base model's own
training clips as `--concept-fraction`'s complement of every batch, so that what the model already draws stays as it
was. For `quickly` a concept clip is a base-data clip of one moving shape (colour, shape, direction and background from
the palette's own train combinations, never a held-out one) that travels ~1.5x farther (FAST_TRAVEL_RANGE), its
caption saying so with "quickly", "fast" or "rapidly" beside the direction; for `orange` the first shape is orange (the
concept's own train split of colour x shape x direction x background). With `--twins on` each concept clip of a
batch comes with its twin, the same scene at the normal speed captioned without the word (taken from the base
share), so the word is the only difference the LoRA can learn (without twins, a speed LoRA also learned "one shape
moves fast"). Latents (the base VAE) and text conditioning
(the base text encoders, through the runtime's loader, exactly as Text Encode computes it at sampling time) are
computed once into `RUN/lora/cache.pt`. The loss is the transformer's flow-matching loss (train.py `dit_loss`).

What the text encoders make of the concept word: the tiny LLaMA's word-level tokenizer knows only the caption words,
so `quickly`, `fast`, `rapidly` and `orange` all become `[UNK]`; CLIP's full CLIP-L tokenizer has a token for each,
but its pooled vector (all the transformer reads of CLIP) moves little between such words. The transformer therefore
learns the word from the LLaMA stream, as "an unknown word where it stands (beside the direction, or where a colour
belongs) means the concept": a LoRA of one concept also reads other unknown words in that place as it
(training/README.md, "A LoRA that teaches a new word").

A colour concept cannot work on the shipped model: its VAE snaps every off-palette colour to the palette, so no
transformer LoRA can draw orange (measured: training/README.md). A speed is drawn with palette colours only.

Resumable like the other stages (`--resume`; randomness of step k from (seed, "lora", k)); at the end the LoRA is
written in the kohya / musubi-tuner layout the Load LoRA node reads (`export_lora`), with the concept's words as its
trigger words: `RUN/lora/kineflow_tiny_<concept>_lora.safetensors`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import KineFlowError
from ..models.lora import KOHYA_PREFIX
from ..shapes import dataset as shapes
from ..shapes.attributes import CONCEPTS
from .common import Budget, file_digest, step_rngs
from .fine_tune import encode_clips, load_base_dit, models_folder
from .tiny_models import save_safetensors
from .train import DTYPES, LoraSettings, StageResult, base_file, dit_loss, run_loop

STAGE = "lora"
TARGET_ROOTS = {"blocks": ("double_blocks.", "single_blocks."),
                "blocks+text": ("double_blocks.", "single_blocks.", "txt_in.", "vector_in.")}


def lora_file_name(concept: str) -> str:
    return f"kineflow_tiny_{concept}_lora.safetensors"


# --------------------------------------------------------------------------- the LoRA modules
class LoraLinear(nn.Module):
    """A frozen linear layer plus `up @ down * scale` (the parameters live in the LoraNetwork)."""

    def __init__(self, base: nn.Linear, network: LoraNetwork, key: str):
        super().__init__()
        self.base = base
        self.key = key
        object.__setattr__(self, "network", network)  # not a child: the network's state dict holds the LoRA

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.network.enabled:
            return self.base(x)
        down, up = self.network.down[self.key], self.network.up[self.key]
        return self.base(x) + F.linear(F.linear(x, down), up) * self.network.scale


class LoraNetwork(nn.Module):
    """The trainable LoRA of a transformer: {kohya key: down, up}, keyed by the module path with dots as underscores
    (the kohya / musubi-tuner names without their `lora_unet_` prefix)."""

    def __init__(self, net: nn.Module, roots: tuple[str, ...], rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank
        self.enabled = True  # off: the layers compute the base model alone (the distillation teacher)
        self.down, self.up = nn.ParameterDict(), nn.ParameterDict()
        self.modules_by_key: dict[str, str] = {}
        targets = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear) and name.startswith(roots)]
        if not targets:
            raise KineFlowError(f"the transformer has no linear layer under {roots}")
        for name, linear in targets:
            key = name.replace(".", "_")
            out_features, in_features = linear.weight.shape
            down = torch.empty(rank, in_features)
            bound = 1.0 / in_features ** 0.5  # kaiming-uniform(a=sqrt(5)) bound, as nn.Linear and LoRA use
            down.uniform_(-bound, bound, generator=generator)
            self.down[key] = nn.Parameter(down)
            self.up[key] = nn.Parameter(torch.zeros(out_features, rank))
            self.modules_by_key[key] = name
            parent_name, _, child = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, child, LoraLinear(linear, self, key))

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def lora_tensors(network: LoraNetwork, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The LoRA in the kohya / musubi-tuner layout: `lora_unet_<module path with _>.lora_down.weight` [rank, in],
    `.lora_up.weight` [out, rank] and `.alpha` (a scalar: the update is up @ down * alpha / rank)."""
    out = {}
    for key in network.modules_by_key:
        name = KOHYA_PREFIX + key
        out[f"{name}.lora_down.weight"] = network.down[key].detach().to(dtype).contiguous()
        out[f"{name}.lora_up.weight"] = network.up[key].detach().to(dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(network.alpha, dtype=dtype)
    return out


def export_lora(network: LoraNetwork, path: Path, settings: LoraSettings, *, base_dit: Path, steps: int,
                train_seconds: float) -> Path:
    """Write the LoRA file with metadata naming its base model and concept (kohya's `ss_*` keys where they
    exist, the full record under `kineflow.lora`)."""
    concept = CONCEPTS[settings.concept]
    record = {"concept": concept.name, "kind": concept.kind, "trigger_words": list(concept.words),
              "base_model": base_dit.name, "base_model_sha256": file_digest(base_dit),
              "steps": steps, "train_seconds": round(train_seconds, 1), "settings": dataclasses.asdict(settings)}
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(network.rank),
        "ss_network_alpha": f"{network.alpha:g}",
        "ss_base_model_version": "hunyuan_video",
        "ss_training_comment": f"KineFlow tiny HunyuanVideo LoRA: the {concept.kind} word '{concept.name}'",
        "kineflow.lora": json.dumps(record),
    }
    return save_safetensors(lora_tensors(network, DTYPES[settings.dtype]), path, metadata)


# --------------------------------------------------------------------------- the data
def build_cache(run_dir: Path, settings: LoraSettings, models_dir: Path) -> dict:
    """Latents and text conditioning of `concept_clips` concept clips, then (`--twins on`) their twins, then
    `base_clips` base clips, and of the empty prompt (the cache `dit_loss` reads). A speed concept's clips have one
    shape whatever `two_shape_prob` (sample_spec); the base clips follow it."""
    key = {"concept": settings.concept, "concept_clips": settings.concept_clips, "base_clips": settings.base_clips,
           "two_shape_prob": settings.two_shape_prob, "size": settings.size, "seed": settings.seed}
    concept = dict(length=settings.concept_clips, seed=settings.seed, split="train", concept=settings.concept,
                   two_shape_prob=settings.two_shape_prob, height=settings.size, width=settings.size)
    parts = [shapes.ShapesVideoDataset(**concept)]
    if settings.twins == "on":
        key["twins"] = True
        parts.append(shapes.ShapesVideoDataset(**concept, twins=True))
    parts.append(shapes.ShapesVideoDataset(length=settings.base_clips, seed=settings.seed + 1, split="train",
                                           two_shape_prob=settings.two_shape_prob, height=settings.size,
                                           width=settings.size))
    return encode_clips(run_dir / STAGE / "cache.pt", key, parts, models_dir, "lora cache")


def batch_indices(rng: np.random.Generator, settings: LoraSettings, concept_count: int, total: int) -> np.ndarray:
    """One step's cache rows: round(batch x concept_fraction) concept clips, then (`--twins on`) the twin of each,
    the rest base clips."""
    n_concept = max(1, round(settings.batch_size * settings.concept_fraction))
    twins = settings.twins == "on"
    if total == concept_count * (2 if twins else 1):
        n_concept = settings.batch_size // (2 if twins else 1)
    concept = rng.integers(0, concept_count, n_concept)
    paired = [concept + concept_count] if twins else []
    first_base = concept_count * (2 if twins else 1)
    base = rng.integers(first_base, total, settings.batch_size - n_concept * (2 if twins else 1))
    return np.concatenate([concept, *paired, base])


def train_lora(run_dir: Path, settings: LoraSettings, *, resume: bool = False,
               budget: Budget | None = None) -> StageResult:
    run_dir = Path(run_dir)
    models_dir = models_folder(settings.base)
    if settings.concept_clips < 1:
        raise KineFlowError(f"--concept-clips must be >= 1; got {settings.concept_clips}")
    if settings.concept_fraction < 1.0 and settings.base_clips < 1:
        raise KineFlowError("--base-clips must be >= 1 unless --concept-fraction is 1")
    base_dit = base_file(models_dir, "dit")
    cache = build_cache(run_dir, settings, models_dir)
    net = load_base_dit(base_dit)
    generator = torch.Generator().manual_seed(settings.seed)
    network = LoraNetwork(net, TARGET_ROOTS[settings.targets], settings.rank, settings.alpha, generator)
    optimizer = torch.optim.AdamW(network.parameters(), lr=settings.lr, weight_decay=0.0)
    concept_count, total = settings.concept_clips, len(cache["latents"])

    def base_model(*inputs) -> torch.Tensor:
        network.enabled = False
        try:
            return net(*inputs)
        finally:
            network.enabled = True

    def loss_fn(step: int) -> torch.Tensor:
        rng, gen = step_rngs(settings.seed, STAGE, step)
        rows = batch_indices(rng, settings, concept_count, total)
        if settings.preserve == "distill":
            return dit_loss(net, cache, rows, gen, settings, teacher=base_model,
                            taught=torch.as_tensor(rows >= concept_count))
        return dit_loss(net, cache, rows, gen, settings)

    result = run_loop(STAGE, run_dir, network, optimizer, loss_fn, settings, resume=resume,
                      budget=budget or Budget())
    if result.finished:
        path = export_lora(network, run_dir / STAGE / lora_file_name(settings.concept), settings, base_dit=base_dit,
                           steps=result.step, train_seconds=result.train_seconds)
        size = path.stat().st_size
        print(f"lora: {path} ({size / 1e6:.3f} MB, rank {settings.rank}, {len(network.modules_by_key)} layers, "
              f"{network.parameter_count()} parameters); copy it into your models folder's loras/")
    return result
