"""The `lora` training stage: concept clips (the colour `orange`, the speed word `quickly`) and their judge, a few
steps on a tiny random model and on the shipped one, the kohya / musubi file it exports, that file through the Load
LoRA path, resumption, and the `kineflow eval` options that use it."""

from __future__ import annotations

import dataclasses
import hashlib
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
from kineflow.runtime.lora import apply_lora, trigger_words
from kineflow.runtime.video_models import load_video_model
from kineflow.shapes import dataset as shapes
from kineflow.shapes.attributes import CONCEPTS
from kineflow.shapes.judge import (FAST_TRAVEL, colour_adherence, concept_adherence, concept_judge_palette,
                                   concept_palette, judge)
from kineflow.shapes.prompts import expected_from_spec, heldout_prompts, parse_prompt
from kineflow.shapes.vocabulary import words
from kineflow.shapes.shipped import HUNYUAN_VIDEO as SHIPPED_NAMES
from kineflow.training import train, train_lora
from kineflow.training.common import load_checkpoint
from kineflow.training.tiny_models import write_models

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = train.LoraSettings(concept="orange", rank=2, alpha=1.0, steps=3, batch_size=4, lr=1e-2, warmup=1,
                              decay_steps=0, concept_clips=4, base_clips=4, size=32, save_every=1, log_every=1,
                              dtype="fp32")
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


def _spec_key(spec):
    return (spec.background, spec.frames, spec.height, spec.width,
            tuple((s.kind, s.colour, round(s.x, 6), round(s.y, 6), round(s.size, 6), s.direction, round(s.travel, 6),
                   s.scale_change) for s in spec.shapes))


# The standard held-out set `kineflow eval` scores the shipped models on (60 prompts at the shipped workflow's
# 128x128), as it was before any concept existed: no concept may change it, or the base model's figures would move.
STANDARD_HELDOUT_SHA256 = "c1a1bc26294dfe7bdceaf31b099bb542c5543fb2956008900381b3d916b60358"


def test_quickly_prompts_name_a_direction_and_a_trigger_word_on_heldout_combinations():
    moving = {c for c in shapes.combos("heldout") if c[2] != "still"}
    assert set(shapes.concept_combos("quickly", "heldout")) == moving
    assert set(shapes.concept_combos("quickly", "train")) == {c for c in shapes.combos("train") if c[2] != "still"}
    trigger = set(CONCEPTS["quickly"].words)
    for prompt, spec in heldout_prompts(40, concept="quickly", height=128, width=128):
        first = spec.shapes[0]
        assert len(spec.shapes) == 1 and first.speed == "quickly"
        assert (first.colour, first.kind, first.direction, spec.background) in moving
        assert shapes.FAST_TRAVEL_RANGE[0] <= first.travel <= shapes.FAST_TRAVEL_RANGE[1] + 1e-9
        assert trigger & set(words(prompt)), prompt
        assert parse_prompt(prompt).objects[0].direction == first.direction, prompt  # direction is scored normally
        assert expected_from_spec(spec).objects[0].speed == "quickly"
    data = shapes.ShapesVideoDataset(length=12, seed=3, concept="quickly", two_shape_prob=1.0)
    for i in range(len(data)):
        spec, caption = data.spec_and_caption(i)
        assert len(spec.shapes) == 1 and spec.shapes[0].speed == "quickly" and shapes.spec_split(spec) == "train"
        assert trigger & set(words(caption)) and spec.shapes[0].direction != "still"
    with pytest.raises(KineFlowError, match="unknown speed"):
        shapes.ShapeSpec("circle", "red", 0.5, 0.5, 0.1, "left", 0.3, speed="slowly")


def test_the_standard_heldout_set_is_unchanged_by_the_concepts():
    pairs = heldout_prompts(60, height=128, width=128)
    digest = hashlib.sha256(repr([(p, _spec_key(s)) for p, s in pairs]).encode()).hexdigest()
    assert digest == STANDARD_HELDOUT_SHA256
    concept_words = {w for c in CONCEPTS.values() for w in c.words}
    for prompt, spec in heldout_prompts(200):
        assert not concept_words & set(words(prompt)), prompt
        assert all(s.speed == "" and s.colour in shapes.COLOURS for s in spec.shapes)
        assert all(s.travel <= shapes.TRAVEL_RANGE[1] + 1e-9 for s in spec.shapes)


def test_the_judge_tells_fast_clips_from_normal_ones_by_travel():
    """Ground truth through the judge: >= 95% of the fast concept clips travel past FAST_TRAVEL, <= 5% of normal clips
    of the same shape, colour, direction, scale change and background do (measured: 100% and 0% of 300 each at 64x64
    and at 128x128, judged travel 0.533-0.602 against 0.339-0.403)."""
    assert shapes.TRAVEL_RANGE[1] < FAST_TRAVEL < shapes.FAST_TRAVEL_RANGE[0]
    fast, normal, expected_fast, expected_normal = [], [], [], []
    for split in ("train", "heldout"):
        data = shapes.ShapesVideoDataset(length=24, seed=5, split=split, concept="quickly")
        for i in range(len(data)):
            spec, _ = data.spec_and_caption(i)
            first = spec.shapes[0]
            fast.append(judge(shapes.render(spec), concept_judge_palette("quickly")))
            expected_fast.append(expected_from_spec(spec))
            rng = np.random.default_rng([99, i])
            same = shapes.place_shape(rng, first.kind, first.colour, first.direction, first.scale_change)
            normal_spec = shapes.ClipSpec(spec.background, (dataclasses.replace(same, speed="quickly"),))
            normal.append(judge(shapes.render(normal_spec)))  # asked to move quickly, drawn at the normal speed
            expected_normal.append(expected_from_spec(normal_spec))
            assert fast[-1].direction == first.direction == normal[-1].direction
    fast_score = concept_adherence(fast, expected_fast, "quickly")
    normal_score = concept_adherence(normal, expected_normal, "quickly")
    assert fast_score.scored == normal_score.scored == 48
    assert fast_score.accuracy >= 0.95 and normal_score.accuracy <= 0.05
    # A shape not asked to move quickly is not counted; the colour concept's figure is the colour's.
    plain = [dataclasses.replace(e, objects=(dataclasses.replace(e.objects[0], speed=""),)) for e in expected_fast]
    assert concept_adherence(fast, plain, "quickly").scored == 0
    assert concept_judge_palette("quickly") == concept_judge_palette("") and "orange" in concept_judge_palette("orange")


# --------------------------------------------------------------------------- training, export, loading
def test_lora_trains_the_lora_only_and_exports_a_kohya_file_the_loader_reads(base_models, tmp_path, monkeypatch):
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
    assert trigger_words(read_header(path)) == ["orange"]
    assert evaluation.parse_lora_option(f"{path}:0.5") == (str(path), 0.5)
    assert evaluation.parse_lora_option(str(path)) == (str(path), 1.0)
    assert evaluation.parse_lora_option(r"C:\loras\a.safetensors") == (r"C:\loras\a.safetensors", 1.0)
    monkeypatch.chdir(path.parent.parent)  # a relative path with a folder is the working directory's
    assert evaluation.parse_lora_option(f"{path.parent.name}/{path.name}:0.5") == (str(path.resolve()), 0.5)
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
            "--save-every", "1", "--concept", "orange", "--lr", "3e-4", "--concept-fraction", "0.5",
            "--targets", "blocks"]
    assert train.main(args) == 0
    assert (tmp_path / "lora" / train_lora.lora_file_name("orange")).exists()
    assert train.LoraSettings().concept == "quickly"  # the concept the shipped VAE can render is the default
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


def test_a_quickly_lora_on_the_shipped_model_names_its_concept(tmp_path):
    """Two steps on the shipped weights (the default base), at 32x32: the file's metadata names the speed concept and
    its trigger words, which Load LoRA (and `kineflow eval --lora`) adds to the text encoder's vocabulary."""
    settings = train.LoraSettings(rank=1, steps=2, batch_size=2, warmup=1, decay_steps=0, concept_clips=2,
                                  base_clips=2, size=32, save_every=2, log_every=1, dtype="fp16")
    assert settings.concept == "quickly" and settings.base == ""
    result = train_lora.train_lora(tmp_path, settings)
    assert result.finished and result.step == 2
    path = tmp_path / "lora" / train_lora.lora_file_name("quickly")
    assert lora_mod.lora_format(load_file(str(path))) == "kohya"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    record = json.loads(meta["kineflow.lora"])
    assert record["concept"] == "quickly" and record["kind"] == "speed"
    assert record["trigger_words"] == ["quickly", "fast", "rapidly"] and record["base_model"] == SHIPPED_NAMES["dit"]
    assert "quickly" in meta["ss_training_comment"]
    assert trigger_words(read_header(path)) == ["quickly", "fast", "rapidly"]
    cache = torch.load(tmp_path / "lora" / "cache.pt", weights_only=True)
    assert all(set(CONCEPTS["quickly"].words) & set(words(c)) for c in cache["captions"][:2])


def test_eval_concept_quickly_reports_its_own_line(capsys):
    """`kineflow eval --concept quickly` (here on the shipped VAE's reconstructions of its held-out clips, which keep
    the travel): the report adds the concept's line; an unknown concept is refused."""
    args = ["eval", "--reconstruct", "--concept", "quickly", "-n", "3", "--width", "64", "--threads", "1"]
    assert cli.main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["concept"] == "quickly" and result["concept_adherence"]["kind"] == "speed"
    assert result["concept_adherence"]["scored"] == 3 and result["counts"]["direction"]["scored"] == 3
    report = evaluation.format_report(result)
    assert "quickly shapes" in report and "moved quickly" in report
    assert cli.main(["eval", "--concept", "purple", "-n", "1"]) == 2
    assert "invalid choice: 'purple' (choose from 'orange', 'quickly')" in capsys.readouterr().err
    with pytest.raises(KineFlowError, match="unknown concept"):
        evaluation.evaluate(None, None, settings=evaluation.shipped_workflow_settings("hunyuan_video"),
                            concept="purple")


def test_distillation_fits_the_base_rows_to_the_base_models_own_prediction(base_models, tmp_path):
    """--preserve distill: with the LoRA switched off the layers are the base model's; at initialisation (every
    `up` zero) the student equals its teacher, so base rows cost nothing and only concept rows move the LoRA."""
    settings = _settings(base_models, preserve="distill", caption_dropout=0.0)
    net = train_lora.load_base_dit(base_models / "diffusion_models" / SHIPPED_NAMES["dit"])
    network = train_lora.LoraNetwork(net, train_lora.TARGET_ROOTS["blocks+text"], 2, 1.0, torch.Generator())
    cache = train_lora.build_cache(tmp_path, settings, base_models)
    rows = np.arange(len(cache["latents"]))
    everything_taught = torch.ones(len(rows), dtype=torch.bool)
    teacher_calls = []

    def teacher(*inputs):
        teacher_calls.append(len(inputs[0]))
        network.enabled = False
        try:
            return net(*inputs)
        finally:
            network.enabled = True

    loss = train.dit_loss(net, cache, rows, torch.Generator().manual_seed(0), settings, teacher=teacher,
                          taught=everything_taught)
    assert teacher_calls == [len(rows)] and float(loss.detach()) == 0.0
    with torch.no_grad():
        for up in network.up.values():
            up.normal_(0, 0.1)  # a trained LoRA: now the student differs from its teacher on the taught rows
    taught = torch.as_tensor(rows >= settings.concept_clips)
    distilled = train.dit_loss(net, cache, rows, torch.Generator().manual_seed(0), settings, teacher=teacher,
                               taught=taught)
    plain = train.dit_loss(net, cache, rows, torch.Generator().manual_seed(0), settings)
    assert float(distilled.detach()) > 0.0 and not torch.isclose(distilled, plain)
    assert train_lora.train_lora(tmp_path / "run", settings).finished


def test_twins_are_the_concept_clips_without_the_concept_paired_row_for_row(tmp_path):
    """`--twins on`: each concept clip's twin is the same scene at the normal travel, captioned without the word, and
    every batch holds each concept row's twin; the cache keeps them between the concept and base clips."""
    concept = shapes.ShapesVideoDataset(length=6, seed=4, concept="quickly", height=64, width=64)
    twins = shapes.ShapesVideoDataset(length=6, seed=4, concept="quickly", twins=True, height=64, width=64)
    for i in range(6):
        (fast, fast_caption), (twin, twin_caption) = concept.spec_and_caption(i), twins.spec_and_caption(i)
        a, b = fast.shapes[0], twin.shapes[0]
        assert (a.kind, a.colour, a.direction, fast.background) == (b.kind, b.colour, b.direction, twin.background)
        assert a.speed == "quickly" and b.speed == "" and len(twin.shapes) == 1
        assert shapes.TRAVEL_RANGE[0] <= b.travel <= shapes.TRAVEL_RANGE[1] < shapes.FAST_TRAVEL_RANGE[0] <= a.travel
        assert set(CONCEPTS["quickly"].words) & set(words(fast_caption))
        assert not set(CONCEPTS["quickly"].words) & set(words(twin_caption))
    with pytest.raises(KineFlowError, match="speed concept"):
        shapes.ShapesVideoDataset(length=1, concept="orange", twins=True)

    settings = train.LoraSettings(concept="quickly", twins="on", batch_size=8, concept_fraction=0.25,
                                  concept_clips=5, base_clips=7)
    rows = train_lora.batch_indices(np.random.default_rng(0), settings, 5, 17)
    assert len(rows) == 8 and list(rows[2:4]) == [r + 5 for r in rows[:2]] and all(r >= 10 for r in rows[4:])
    with pytest.raises(KineFlowError, match="at most 0.5"):
        train.LoraSettings(twins="on", concept_fraction=0.6)
    with pytest.raises(KineFlowError, match="speed concepts"):
        train.LoraSettings(concept="orange", twins="on")
