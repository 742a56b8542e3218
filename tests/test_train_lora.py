"""The `lora` training stage: concept clips and their judge, a few steps on a tiny random model, the kohya / musubi
file it exports, that file through the Load LoRA path, resumption, and the `kineflow eval` options that use it."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kineflow.errors import KineFlowError
from kineflow.models import hunyuan_video_dit as dit_mod
from kineflow.models import lora as lora_mod
from kineflow.models.checkpoints import read_header, require_family
from kineflow.runtime import cli, evaluation
from kineflow.runtime.lora import apply_lora
from kineflow.runtime.video_models import load_video_model
from kineflow.shapes import dataset as shapes
from kineflow.shapes.judge import colour_adherence, concept_palette, judge
from kineflow.shapes.prompts import expected_from_spec, heldout_prompts
from kineflow.shapes.shipped import HUNYUAN_VIDEO as SHIPPED_NAMES
from kineflow.training import train, train_lora
from kineflow.training.common import load_checkpoint
from kineflow.training.tiny_models import write_models

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = train.LoraSettings(rank=2, alpha=1.0, steps=3, batch_size=4, lr=1e-2, warmup=1, decay_steps=0,
                              concept_clips=4, base_clips=4, size=32, save_every=1, log_every=1, dtype="fp32")
SHIPPED_DIT = Path(__file__).resolve().parent.parent / "weights" / "diffusion_models" / SHIPPED_NAMES["dit"]


@pytest.fixture(scope="module")
def base_models(tmp_path_factory):
    """A random tiny model set under the shipped file names (as `export` writes), without guidance embedding."""
    folder = tmp_path_factory.mktemp("base")
    paths = write_models(folder, train.caption_vocabulary(), names=SHIPPED_NAMES)
    state = {k: v for k, v in load_file(str(paths["dit"])).items() if not k.startswith("guidance_in.")}
    save_file(state, str(paths["dit"]))
    return folder


def _settings(base, **changes) -> train.LoraSettings:
    return dataclasses.replace(SETTINGS, base=str(base), **changes)


# --------------------------------------------------------------------------- concept data and judge
def test_concept_clips_and_heldout_set_leave_the_standard_set_alone():
    data = shapes.ShapesVideoDataset(length=12, seed=3, concept="orange", height=64, width=64)
    for i in range(len(data)):
        spec, caption = data.spec_and_caption(i)
        assert spec.shapes[0].colour == "orange" and "orange" in caption.split()
        assert spec.background in shapes.COLOURS and shapes.spec_split(spec) == "train"
    train_set = set(shapes.concept_combos("orange", "train"))
    heldout = set(shapes.concept_combos("orange", "heldout"))
    assert heldout and train_set and not train_set & heldout
    concept_prompts = heldout_prompts(10, concept="orange")
    assert all((s.shapes[0].colour, s.shapes[0].kind, s.shapes[0].direction, s.background) in heldout
               for _, s in concept_prompts)
    # The palette, its combinations and the standard held-out prompts know nothing of the concept colours.
    assert "orange" not in shapes.COLOURS and all(c[0] != "orange" and c[3] != "orange" for c in shapes.combos("heldout"))
    assert not any("orange" in prompt for prompt, _ in heldout_prompts(100))
    with pytest.raises(KineFlowError, match="unknown concept"):
        shapes.ShapesVideoDataset(length=1, concept="purple")


def test_the_judge_tells_the_concept_colour_only_when_asked():
    rng = np.random.default_rng(0)
    for background in ("red", "yellow", "blue", "white"):
        shape = shapes.place_shape(rng, "square", "orange", "right", frames=9, height=64, width=64)
        clip = shapes.render(shapes.ClipSpec(background, (shape,)))
        assert judge(clip, concept_palette("orange")).colour == "orange"
        assert judge(clip, concept_palette("orange")).background == background
        assert judge(clip).colour != "orange"  # the standard judge has no such colour
        expected = [expected_from_spec(shapes.ClipSpec(background, (shape,)))]
        assert colour_adherence([judge(clip, concept_palette("orange"))], expected, "orange").correct == 1
        assert colour_adherence([judge(clip)], expected, "orange").correct == 0
    # A palette clip is judged the same with or without the concept colour.
    spec, _ = shapes.ShapesVideoDataset(length=1, seed=1).spec_and_caption(0)
    assert judge(shapes.render(spec), concept_palette("orange")) == judge(shapes.render(spec))


# --------------------------------------------------------------------------- training, export, loading
def test_lora_trains_the_lora_only_and_exports_a_kohya_file_the_loader_reads(base_models, tmp_path):
    settings = _settings(base_models)
    base_dit = base_models / "diffusion_models" / SHIPPED_NAMES["dit"]
    before = load_file(str(base_dit))
    result = train_lora.train_lora(tmp_path, settings)
    assert result.finished and result.step == 3
    assert load_file(str(base_dit)).keys() == before.keys()

    path = tmp_path / "lora" / train_lora.lora_file_name("orange")
    tensors = load_file(str(path))
    assert lora_mod.lora_format(tensors) == "kohya" and lora_mod.is_hunyuan_video_lora(tensors)
    require_family(path, "hunyuan_video_lora")
    modules = {k.rsplit(".lora_", 1)[0].rsplit(".alpha", 1)[0] for k in tensors}
    for module in modules:
        assert module.startswith("lora_unet_")
        down, up = tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"]
        assert down.shape[0] == up.shape[1] == 2 and tensors[f"{module}.alpha"].item() == 1.0
    assert {"lora_unet_txt_in_individual_token_refiner_blocks_0_self_attn_qkv",
            "lora_unet_vector_in_in_layer", "lora_unet_double_blocks_0_img_attn_qkv",
            "lora_unet_single_blocks_1_linear2"} <= modules
    assert any(tensors[f"{m}.lora_up.weight"].abs().max() > 0 for m in modules)  # training moved the zero-init ups
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    record = json.loads(meta["kineflow.lora"])
    assert record["concept"] == "orange" and record["base_model"] == SHIPPED_NAMES["dit"]
    assert record["base_model_sha256"] and record["steps"] == 3
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "1"

    # The trainer's transformer (base + LoRA modules) and the Load LoRA path's merged copy compute the same.
    net = train_lora.load_base_dit(base_dit)
    network = train_lora.LoraNetwork(net, train_lora.TARGET_ROOTS["blocks+text"], 2, 1.0, torch.Generator())
    network.load_state_dict(load_checkpoint(tmp_path / "lora" / "ckpt.pt")["model"])
    handle = load_video_model(str(base_dit), weight_dtype="fp32")
    merged = apply_lora(handle, str(path), 1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    text, mask, pooled = torch.randn(1, 5, 128, generator=g), torch.ones(1, 5, dtype=torch.bool), torch.randn(1, 64, generator=g)
    t = torch.tensor([500.0])
    with torch.no_grad():
        want = net(x, t, text, mask, pooled)
        got = merged.net(x, t, text, mask, pooled)
        plain = handle.net(x, t, text, mask, pooled)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(plain, want, atol=1e-4, rtol=1e-4)

    # The eval helpers: --lora FILE[:STRENGTH] and the words a KineFlow LoRA names as taught.
    assert evaluation.trigger_words(str(path)) == ["orange"]
    assert evaluation.parse_lora_option(f"{path}:0.5") == (str(path), 0.5)
    assert evaluation.parse_lora_option(str(path)) == (str(path), 1.0)
    assert evaluation.parse_lora_option(r"C:\loras\a.safetensors") == (r"C:\loras\a.safetensors", 1.0)
    with pytest.raises(KineFlowError, match="finite"):
        evaluation.parse_lora_option("a.safetensors:nan")


def test_resumed_lora_run_equals_an_uninterrupted_one(base_models, tmp_path):
    straight = train_lora.train_lora(tmp_path / "a", _settings(base_models, steps=4))
    assert straight.finished
    first = train_lora.train_lora(tmp_path / "b", _settings(base_models, steps=2))
    assert first.finished and (tmp_path / "b" / "lora" / train_lora.lora_file_name("orange")).exists()
    with pytest.raises(KineFlowError, match="already exists"):
        train_lora.train_lora(tmp_path / "b", _settings(base_models, steps=4))
    with pytest.raises(KineFlowError, match="rank"):
        train_lora.train_lora(tmp_path / "b", _settings(base_models, steps=4, rank=3), resume=True)
    resumed = train_lora.train_lora(tmp_path / "b", _settings(base_models, steps=4), resume=True)
    assert resumed.finished and resumed.steps_run == 2
    a, b = (load_checkpoint(tmp_path / run / "lora" / "ckpt.pt")["model"] for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    files = [load_file(str(tmp_path / run / "lora" / train_lora.lora_file_name("orange"))) for run in ("a", "b")]
    assert all(torch.equal(files[0][k], files[1][k]) for k in files[0])


def test_the_command_line_stage_and_a_budget_stop(base_models, tmp_path):
    args = ["lora", "--run-dir", str(tmp_path), "--threads", "1", "--base", str(base_models), "--rank", "2",
            "--steps", "2", "--batch-size", "2", "--concept-clips", "2", "--base-clips", "2", "--size", "32",
            "--save-every", "1"]
    assert train.main(args) == 0
    assert (tmp_path / "lora" / train_lora.lora_file_name("orange")).exists()
    assert "lora --run-dir" in (tmp_path / "commands.txt").read_text()
    assert train.main(args + ["--rank", "0"]) == 2  # a KineFlowError is exit 2, not a traceback
    stopped = train_lora.train_lora(tmp_path / "stopped", _settings(base_models), budget=train.Budget(minutes=1e-9))
    assert not stopped.finished
    assert not (tmp_path / "stopped" / "lora" / train_lora.lora_file_name("orange")).exists()


def test_default_rank_keeps_the_shipped_models_lora_under_1_mb():
    """The default settings on the shipped transformer's shapes (built on `meta`, no weights read)."""
    with torch.device("meta"):
        net = dit_mod.HunyuanVideoDiT(dit_mod.config_from_state_dict(read_header(SHIPPED_DIT).shapes()))
    defaults = train.LoraSettings()
    network = train_lora.LoraNetwork(net, train_lora.TARGET_ROOTS[defaults.targets], defaults.rank, defaults.alpha,
                                     torch.Generator())
    bytes_per_value = torch.finfo(train.DTYPES[defaults.dtype]).bits // 8
    assert network.parameter_count() * bytes_per_value < 0.95e6


def test_eval_refuses_lora_where_it_cannot_apply_and_concept_with_a_prompt_file():
    err = io.StringIO()
    code = cli.main(["eval", "--family", "animatediff", "--lora", "x.safetensors", "-n", "1"], stdout=io.StringIO(),
                    stderr=err)
    assert code == 2 and "--lora" in err.getvalue()
    with pytest.raises(KineFlowError, match="prompt file"):
        evaluation.evaluate(None, ["x"], settings=evaluation.shipped_workflow_settings("hunyuan_video"),
                            concept="orange")
