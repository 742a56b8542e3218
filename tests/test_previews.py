"""The Sampler's animated live preview (runtime/previews.py): which latent -> RGB map each model gets, the preview
encoder, the time budget, when previews are built at all, and the fitted factors of the shipped tiny models.
tests/test_comfyui_live.py watches the preview play in ComfyUI's real frontend."""

import io
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import kineflow
from kineflow.runtime import animatediff as ad_runtime
from kineflow.runtime import generation, host, previews, video_models
from kineflow.runtime.executor import OutputCache, run_workflow
from kineflow.runtime.latent_formats import HUNYUAN_VIDEO_LATENT, SD15_LATENT
from kineflow.training import tiny_sd
from kineflow.training.preview_factors import write_preview_factors
from kineflow.training.tiny_models import set_metadata

PACK = Path(kineflow.__file__).resolve().parent
KEY = previews.FACTORS_METADATA_KEY


def _entry(factors, bias) -> dict:
    return {KEY: json.dumps({"factors": factors, "bias": bias})}


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- which factors
@pytest.mark.parametrize("fmt", [SD15_LATENT, HUNYUAN_VIDEO_LATENT])
def test_a_file_without_fitted_factors_gets_the_released_vaes(fmt):
    factors, bias = previews.preview_factors({}, fmt)
    assert factors.shape == (fmt.channels, 3) and bias.shape == (3,)
    assert _same((factors, bias), previews.released_factors(fmt))


def test_fitted_factors_in_the_metadata_are_used_when_they_fit_the_latent_format():
    fitted = [[0.1 * c, 0.2, -0.3] for c in range(4)]
    factors, bias = previews.preview_factors(_entry(fitted, [0.5, 0.0, -0.5]), SD15_LATENT)
    assert torch.allclose(factors, torch.tensor(fitted)) and bias.tolist() == [0.5, 0.0, -0.5]
    released = previews.released_factors(HUNYUAN_VIDEO_LATENT)
    # four rows do not describe 16-channel latents; unreadable metadata changes nothing either
    assert _same(previews.preview_factors(_entry(fitted, [0.5, 0.0, -0.5]), HUNYUAN_VIDEO_LATENT), released)
    assert _same(previews.preview_factors({KEY: "not json"}, HUNYUAN_VIDEO_LATENT), released)
    assert _same(previews.preview_factors(_entry(fitted, [1.0]), SD15_LATENT), previews.released_factors(SD15_LATENT))


def test_shipped_tiny_models_carry_fitted_factors_and_their_handles_use_them(shipped_only_models_dir):
    for name, fmt, load in (
            ("diffusion_models/kineflow_tiny_dit.safetensors", HUNYUAN_VIDEO_LATENT,
             lambda: video_models.load_video_model("kineflow_tiny_dit.safetensors")),
            ("checkpoints/kineflow_tiny_sd15.safetensors", SD15_LATENT,
             lambda: ad_runtime.load_sd_checkpoint("kineflow_tiny_sd15.safetensors")[0])):
        with safe_open(str(PACK / "weights" / name), "pt") as f:
            stored = json.loads(f.metadata()[KEY])
        model = load()
        assert torch.allclose(model.preview_factors[0], torch.tensor(stored["factors"]))
        assert torch.allclose(model.preview_factors[1], torch.tensor(stored["bias"]))
        assert not _same(model.preview_factors, previews.released_factors(fmt))


def test_released_style_files_get_the_released_factors(tmp_path):
    """Files without KineFlow's metadata (tiny random weights in the released layouts stand in for released files),
    through Load SD Checkpoint and Load SD Components; Apply Motion Module keeps the factors."""
    tiny_sd.write_models(tmp_path, seed=0)
    with host.configured(models_dir=tmp_path):
        model, _, _ = ad_runtime.load_sd_checkpoint("kineflow_random_sd15.safetensors")
        components, _, _ = ad_runtime.load_sd_components(
            "kineflow_random_sd15_unet.safetensors", "kineflow_random_sd_vae.safetensors",
            "kineflow_random_sd_clip.safetensors")
        motion = ad_runtime.load_motion_module("kineflow_random_mm_v2.safetensors")
        animated = ad_runtime.apply_motion_module(model, motion)
    for handle in (model, components, animated):
        assert _same(handle.preview_factors, previews.released_factors(SD15_LATENT))


# --------------------------------------------------------------------------- the encoder
def _decoded_frames(preview: previews.AnimatedPreview) -> np.ndarray:
    strip = np.asarray(Image.open(io.BytesIO(preview.png)).convert("RGB"))
    assert strip.shape == (preview.height, preview.frames * preview.width, 3)
    return strip.reshape(preview.height, preview.frames, preview.width, 3).transpose(1, 0, 2, 3)


def test_preview_holds_every_latent_frame_in_the_colours_the_factors_give():
    # channel c of frame t is t/10 - 0.5 in the channel's own colour: R, G, B, then grey from channel 3
    factors = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.5, 0.5, 0.5]])
    latent = torch.zeros(2, 4, 5, 6, 10)
    for t in range(5):
        latent[0, t % 4, t] = t / 10 - 0.5
    latent[1] = 9.0  # only the first video of a batch is previewed
    preview = previews.animated_preview(latent, factors, torch.zeros(3), temporal_ratio=1)
    assert (preview.frames, preview.width, preview.height) == (5, 10, 6)
    assert preview.frame_ms == round(1000 / previews.PLAYBACK_FPS)
    frames = _decoded_frames(preview)
    for t in range(5):
        rgb = np.zeros(3)
        rgb += factors[t % 4].numpy() * (t / 10 - 0.5)
        expected = np.round((rgb + 1) * 127.5)
        assert (frames[t] == expected).all(), (t, frames[t][0, 0], expected)
    message = preview.message()
    assert message["image"].startswith("data:image/png;base64,") and message["frames"] == 5


def test_preview_size_and_frame_count_are_capped():
    released = previews.released_factors(HUNYUAN_VIDEO_LATENT)
    # 129 frames of 1280x720: 33 latent frames of 160x90
    preview = previews.animated_preview(torch.randn(1, 16, 33, 90, 160), *released, temporal_ratio=4)
    assert preview.frames == 33 and max(preview.width, preview.height) == previews.MAX_SIDE
    assert preview.width / preview.height == pytest.approx(160 / 90, rel=0.02)
    assert preview.frame_ms == 500  # a latent frame stands for 4 video frames
    long = previews.animated_preview(torch.randn(1, 4, 200, 64, 64), *previews.released_factors(SD15_LATENT), 1)
    assert long.frames == previews.MAX_FRAMES and (long.width, long.height) == (64, 64)
    assert long.frame_ms == round(1000 * 200 / previews.MAX_FRAMES / previews.PLAYBACK_FPS)  # same loop length


def test_area_averaging_keeps_a_flat_colour():
    factors, bias = previews.released_factors(SD15_LATENT)
    latent = torch.full((1, 4, 2, 200, 300), 0.3)
    frames = previews.preview_frames(latent, factors, bias)
    assert frames.shape == (2, 85, 128, 3)
    expected = ((0.3 * factors.sum(0) + bias + 1) * 127.5).round()
    assert (frames.float() - expected).abs().max() <= 1


def test_budget_thins_out_previews_that_cost_more_than_their_share():
    now = [0.0]
    budget = previews.PreviewBudget(share=0.05, clock=lambda: now[0])
    sent = 0
    for _step in range(100):
        now[0] += 0.010  # a 10 ms step
        if budget.due():
            sent += 1
            with budget.spending():
                now[0] += 0.002  # a 2 ms preview: 20% of a step
    assert 24 <= sent <= 28  # about one step in four: 5% of the time
    assert budget.spent <= 0.05 * now[0] + 0.002


# --------------------------------------------------------------------------- who builds and sends previews
def test_standalone_runs_build_no_previews(shipped_only_models_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a preview was built with nothing to show it")

    monkeypatch.setattr(previews, "animated_preview", refuse)
    model = video_models.load_video_model("kineflow_tiny_dit.safetensors")
    conditioning = {"positive": {"text_states": torch.zeros(1, 4, model.net.config.text_states_dim),
                                 "text_mask": torch.ones(1, 4, dtype=torch.bool),
                                 "text_states_2": torch.zeros(1, model.net.config.text_states_dim_2)}}
    latent = generation.empty_latent("hunyuan_video", 32, 32, 5, 1)
    out = generation.sample_video(model, conditioning, latent, seed=0, steps=2, cfg=1.0, shift=3.0,
                                  embedded_guidance=6.0, sampler_name="euler")
    assert out["samples"].shape == latent["samples"].shape


@pytest.fixture
def fake_comfyui(monkeypatch):
    """The ComfyUI modules the host's progress bar and preview sender use, recording what is sent."""
    sent = []
    server = types.SimpleNamespace(client_id="browser-1", sockets={},
                                   send_sync=lambda event, data, sid: sent.append((event, data, sid)))
    modules = {
        "folder_paths": types.ModuleType("folder_paths"),
        "comfy.model_management": types.SimpleNamespace(throw_exception_if_processing_interrupted=lambda: None,
                                                        InterruptProcessingException=RuntimeError),
        "comfy.utils": types.SimpleNamespace(ProgressBar=lambda total: types.SimpleNamespace(
            update_absolute=lambda value, total, preview=None: None)),
        "server": types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=server)),
        "comfy_execution.utils": types.SimpleNamespace(get_executing_context=lambda: types.SimpleNamespace(
            node_id="12:6", prompt_id="p1")),
        "comfy_execution.progress": types.SimpleNamespace(get_progress_state=lambda: types.SimpleNamespace(
            dynprompt=types.SimpleNamespace(get_display_node_id=lambda node_id: node_id))),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "comfy", types.SimpleNamespace(utils=modules["comfy.utils"],
                                                                    model_management=modules["comfy.model_management"]))
    return server, sent


def test_inside_comfyui_previews_go_to_the_browser_that_queued_the_prompt(fake_comfyui):
    server, sent = fake_comfyui
    bar = host.progress(3, "sampling")
    assert not bar.shows_previews  # nobody connected
    server.sockets["someone-else"] = object()
    assert not bar.shows_previews  # the browser that queued the prompt is gone
    server.sockets["browser-1"] = object()
    assert bar.shows_previews
    bar.update(1, preview={"image": "data:image/png;base64,", "frames": 2})
    bar.update(1)
    assert sent == [(host.PREVIEW_EVENT, {"image": "data:image/png;base64,", "frames": 2, "node": "12:6",
                                          "prompt_id": "p1"}, "browser-1")]
    server.client_id = None  # a prompt queued without a client id: ComfyUI's messages go to every browser
    assert bar.shows_previews


# --------------------------------------------------------------------------- the shipped models' factors
def _mean_colour_errors(workflow: str, models_dir: Path, output_dir: Path) -> tuple[float, float]:
    """Largest per-channel difference (0..1) between the mean colour of the preview of the workflow's final latent
    and of its decoded video: with the model's factors, and with the released family's."""
    path = PACK / "workflows" / "api" / f"{workflow}.json"
    prompt = json.loads(path.read_text())
    sampler = next(key for key, node in prompt.items() if node["class_type"] == "KineFlowSampler")
    decode = next(key for key, node in prompt.items() if node["class_type"] == "KineFlowVAEDecode")
    results = run_workflow(str(path), models_dir=models_dir, output_dir=output_dir, cache=OutputCache())
    model = results[prompt[sampler]["inputs"]["model"][0]]["outputs"][0]
    latent = results[sampler]["outputs"][0]["samples"]
    video_mean = results[decode]["outputs"][0].mean(dim=(0, 1, 2))
    errors = []
    for factors in (model.preview_factors, previews.released_factors(model.latent_format)):
        preview_mean = previews.preview_frames(latent, *factors).float().mean(dim=(0, 1, 2)) / 255
        errors.append(float((preview_mean - video_mean).abs().max()))
    return errors[0], errors[1]


@pytest.mark.parametrize("workflow", ["text_to_video", "animatediff_tiny"])
def test_shipped_workflows_preview_the_colours_of_their_videos(workflow, shipped_only_models_dir, tmp_path):
    """The fitted factors give the decoded video's mean colour to a few hundredths (0.024 and 0.044 measured); the
    released family's factors, which do not fit the tiny VAEs, are off by 0.39 and 0.49."""
    fitted, released = _mean_colour_errors(workflow, shipped_only_models_dir, tmp_path)
    assert fitted < 0.06 and released > 0.3, (fitted, released)


# --------------------------------------------------------------------------- fitting and storing them
def test_fitted_factors_are_written_into_the_checkpoint_and_nothing_else_changes(tmp_path):
    path = tiny_sd.write_sd_checkpoint(tmp_path / "tiny.safetensors", seed=0)
    set_metadata(path, {"kineflow.training": json.dumps({"vae": {"seed": 3, "clips": 40}})})
    before = path.read_bytes()
    entry = json.loads(write_preview_factors(path))
    after = path.read_bytes()
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata[KEY]) == entry and json.loads(metadata["kineflow.training"])["vae"]["seed"] == 3
    assert np.array(entry["factors"]).shape == (4, 3) and len(entry["bias"]) == 3
    tensors_at = lambda raw: raw[8 + int.from_bytes(raw[:8], "little"):]  # noqa: E731
    assert tensors_at(after) == tensors_at(before)
    assert int.from_bytes(after[:8], "little") % 8 == 0
    assert json.loads(write_preview_factors(path)) == entry  # the same seed and clips: the same fit
    assert path.read_bytes() == after
