"""Prompt travel (issue #32 item 4): schedule parsing, ADE/FizzNodes interpolation parity, the latent-frame mapping,
per-window prompts under context windows, the conditioning reaching each model per frame, the shipped workflow end
to end through `kineflow run`, and a dry run on `meta`."""

import json
from pathlib import Path

import pytest
import torch

from device_check import one_device
from kineflow.errors import KineFlowError
from kineflow.models.hunyuan_video_dit import HunyuanVideoDiT
from kineflow.models.sd15_unet import SD15UNet
from kineflow.nodes.prompt_travel import KineFlowPromptSchedule
from kineflow.runtime import cli, generation, host
from kineflow.runtime.executor import OutputCache, run_workflow
from kineflow.samplers.context import ContextOptions, context_window_denoiser
from kineflow.samplers.prompt_schedule import (PromptSchedule, covered_frames, frame_weights, latent_frame_weights,
                                               parse_schedule, schedule_problem)
from kineflow.samplers.prompt_travel import TravelDenoiser, mix_conditions
from kineflow.training import tiny_sd

ROOT = Path(__file__).resolve().parent.parent
TRAVEL_WORKFLOW = ROOT / "workflows" / "api" / "prompt_travel.json"


# --------------------------------------------------------------------------- parser
@pytest.mark.parametrize("text", [
    '"0": "a red circle", "8": "a green circle"',
    '{"0": "a red circle",\n "8": "a green circle"}',
    '\n  "0": "a red circle",\n  "8": "a green circle",\n',  # ADE's usual form: one per line, trailing comma
    '{"0": "a red circle", "8": "a green circle",}',
    '" 0 ": "a red circle", "8": "a green circle"',
])
def test_schedule_syntax(text):
    assert parse_schedule(text) == PromptSchedule((0, 8), ("a red circle", "a green circle"))


@pytest.mark.parametrize("text, message", [
    ("", "the prompt schedule is empty; expected one keyframe per line"),
    ("   \n", "the prompt schedule is empty"),
    ("{}", "holds no keyframes"),
    ('"zero": "a red circle"', "keys must be video frame numbers such as \"0\" or \"8\"; found 'zero'"),
    ('"max_f/2": "a red circle"', "found 'max_f/2'"),
    ('"-1": "a red circle"', "found '-1'"),
    ('"0": "a", "0": "b"', "keyframe 0 appears twice"),
    ('"8": "a", "4": "b"', "must be in increasing order; found frame 4 after frame 8"),
    ('"0": 5', "the prompt of keyframe 0 must be a string in double quotes; found 5"),
    ("0: a red circle", "cannot read the prompt schedule: Expecting property name enclosed in double quotes"),
    ('"0": "a" "8": "b"', "cannot read the prompt schedule: Expecting ',' delimiter"),
])
def test_schedule_errors_say_what_was_expected_and_found(text, message):
    with pytest.raises(KineFlowError) as error:
        parse_schedule(text)
    assert message in str(error.value)
    assert schedule_problem(text) == str(error.value)


def test_keyframe_beyond_the_video_is_refused_with_its_length():
    schedule = parse_schedule('"0": "a", "9": "b"')
    with pytest.raises(KineFlowError, match=r"keyframe 9 is beyond the video: it has 9 frames \(0..8\)"):
        frame_weights(schedule, 9)
    with pytest.raises(KineFlowError, match=r"it has 9 frames"):  # 3 HunyuanVideo latent frames = 9 video frames
        latent_frame_weights(schedule, 3, 4)
    assert len(frame_weights(schedule, 10)) == 10


def test_node_validation_reports_the_parser_error():
    assert KineFlowPromptSchedule.VALIDATE_INPUTS(schedule='"0": "a", "0": "b"') == (
        "keyframe 0 appears twice in the prompt schedule; each frame takes one prompt")
    assert KineFlowPromptSchedule.VALIDATE_INPUTS(schedule='"0": "a", "4": "b"') is True
    assert KineFlowPromptSchedule.VALIDATE_INPUTS(schedule=None) is True  # linked: checked when it runs


# --------------------------------------------------------------------------- interpolation parity with ADE / FizzNodes
def test_frame_weights_follow_the_ade_fizznodes_linear_schedule():
    """FizzNodes (used by ADE's travel): between keyframes k_i <= f < k_i+1 the weight of prompt i+1 is
    (f - k_i) / (k_i+1 - k_i); before the first keyframe the first prompt holds, after the last the last one.
    Expected rows computed by hand for keyframes 2, 6, 9 over 12 frames."""
    weights = frame_weights(parse_schedule('"2": "A", "6": "B", "9": "C"'), 12)
    expected = [
        [1, 0, 0], [1, 0, 0],                                    # frames 0, 1: before the first keyframe
        [1, 0, 0], [0.75, 0.25, 0], [0.5, 0.5, 0], [0.25, 0.75, 0],  # 2..5: A -> B over 4 frames
        [0, 1, 0], [0, 2 / 3, 1 / 3], [0, 1 / 3, 2 / 3],         # 6..8: B -> C over 3 frames
        [0, 0, 1], [0, 0, 1], [0, 0, 1],                         # 9..11: C holds
    ]
    assert torch.allclose(torch.tensor(weights, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64))


def test_mixed_embeddings_match_conditioning_average_with_zero_padding():
    """ComfyUI's conditioning average as FizzNodes calls it: to * w + from * (1 - w), the shorter token axis padded
    with zeros; pooled vectors mixed the same way. Masks (HunyuanVideo) are united."""
    gen = torch.Generator().manual_seed(0)
    a = {"text_states": torch.randn(1, 3, 4, generator=gen), "text_mask": torch.tensor([[1, 1, 1]]),
         "text_states_2": torch.randn(1, 5, generator=gen), "guidance": torch.tensor([6000.0])}
    b = {"text_states": torch.randn(1, 5, 4, generator=gen), "text_mask": torch.tensor([[1, 1, 1, 1, 0]]),
         "text_states_2": torch.randn(1, 5, generator=gen), "guidance": torch.tensor([6000.0])}
    mixed = mix_conditions([a, b], (0.75, 0.25))
    padded_a = torch.cat([a["text_states"], torch.zeros(1, 2, 4)], dim=1)
    assert torch.allclose(mixed["text_states"], 0.75 * padded_a + 0.25 * b["text_states"])
    assert torch.allclose(mixed["text_states_2"], 0.75 * a["text_states_2"] + 0.25 * b["text_states_2"])
    assert mixed["text_mask"].tolist() == [[1, 1, 1, 1, 0]] and mixed["text_mask"].dtype == a["text_mask"].dtype
    assert torch.equal(mixed["guidance"], a["guidance"])
    assert mix_conditions([a, b], (0.0, 1.0))["text_states"] is b["text_states"]  # a keyframe: its prompt, as is


def test_latent_frames_average_the_video_frames_they_cover():
    assert [list(covered_frames(t, 4)) for t in range(3)] == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
    assert [list(covered_frames(t, 1)) for t in range(3)] == [[0], [1], [2]]
    schedule = parse_schedule('"0": "A", "8": "B"')
    # latent 1 covers frames 1..4 (B weights 1/8..4/8, mean 2.5/8); latent 2 frames 5..8 (mean 6.5/8)
    assert latent_frame_weights(schedule, 3, 4) == [[1.0, 0.0], [0.6875, 0.3125], [0.1875, 0.8125]]
    assert latent_frame_weights(schedule, 9, 1) == frame_weights(schedule, 9)


# --------------------------------------------------------------------------- sampler side
def _recording_denoiser(calls):
    """Records (frames, text) of each call; answers the text's sum on every frame of a one-text call."""
    def denoiser(x, sigma, tag):
        calls.append((x.shape[2], tag.clone()))
        return torch.full_like(x, float(tag.sum())) if tag.ndim == 2 else torch.zeros_like(x)
    return denoiser


def test_each_context_window_gets_the_prompt_of_its_frames():
    """One text per call (the DiT): a window inside one keyframe's span runs once with that prompt; a window whose
    frames have different weights runs once per distinct mix, each frame taking its own mix's output."""
    calls = []
    keyed = [{"tag": torch.tensor([[1.0]])}, {"tag": torch.tensor([[100.0]])}]
    weights = [[1, 0], [1, 0], [0, 1], [0, 1], [0.5, 0.5], [0.5, 0.5]]
    travel = TravelDenoiser(_recording_denoiser(calls), keyed, None, 1.0, weights, frame_text=False)
    options = ContextOptions(length=2, overlap=0, schedule="static", fuse_method="flat")
    out = context_window_denoiser(travel, options)(torch.zeros(1, 1, 6, 1, 1),
                                                                               torch.ones(1))
    assert [(n, float(tag)) for n, tag in calls] == [(2, 1.0), (2, 100.0), (2, 50.5)]
    assert out.flatten().tolist() == [1.0, 1.0, 100.0, 100.0, 50.5, 50.5]

    calls.clear()  # a window across the switch: two passes, frame by frame
    options = ContextOptions(length=2, overlap=0, schedule="static", fuse_method="flat")
    travel = TravelDenoiser(_recording_denoiser(calls), keyed, None, 1.0, weights[1:5], frame_text=False)
    out = context_window_denoiser(travel, options)(torch.zeros(1, 1, 4, 1, 1),
                                                                               torch.ones(1))
    assert [(n, float(tag)) for n, tag in calls] == [(2, 1.0), (2, 100.0), (2, 100.0), (2, 50.5)]
    assert out.flatten().tolist() == [1.0, 100.0, 100.0, 50.5]


def test_per_frame_text_gives_each_window_frame_its_mix():
    """Per-frame text (the UNet): one call per window with text [B, F, ...] holding each frame's interpolation."""
    calls = []
    keyed = [{"tag": torch.tensor([[0.0, 2.0]])}, {"tag": torch.tensor([[4.0, 6.0]])}]  # [B=1, D=2]
    weights = frame_weights(parse_schedule('"0": "A", "4": "B"'), 6)
    travel = TravelDenoiser(_recording_denoiser(calls), keyed, None, 1.0, weights, frame_text=True)
    options = ContextOptions(length=3, overlap=0, schedule="static", fuse_method="flat")
    context_window_denoiser(travel, options)(torch.zeros(1, 1, 6, 1, 1), torch.ones(1))
    assert len(calls) == 2 and all(tag.shape == (1, 3, 2) for _, tag in calls)
    first = [[0.0, 2.0], [1.0, 3.0], [2.0, 4.0]]      # frames 0..2: A -> B by quarters
    second = [[3.0, 5.0], [4.0, 6.0], [4.0, 6.0]]     # frames 3..5
    assert calls[0][1][0].tolist() == first and calls[1][1][0].tolist() == second


def test_a_one_keyframe_schedule_samples_exactly_like_text_encode():
    gen = torch.Generator().manual_seed(0)
    keyed = {"tag": torch.randn(1, 2, generator=gen)}
    plain = lambda x, sigma, tag: x * 0.5 + tag.sum()  # noqa: E731
    travel = TravelDenoiser(plain, [keyed], {"tag": torch.zeros(1, 2)}, 3.0, [[1.0]] * 4, frame_text=False)
    x = torch.randn(1, 1, 4, 2, 2, generator=gen)
    from kineflow.samplers.guidance import make_cfg_denoiser
    assert torch.equal(travel(x, torch.ones(1)), make_cfg_denoiser(plain, keyed, {"tag": torch.zeros(1, 2)}, 3.0)(
        x, torch.ones(1)))


# --------------------------------------------------------------------------- through the models
@pytest.fixture(scope="module")
def sd_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_models")
    tiny_sd.write_models(root, seed=0)
    return root


def _travel_animatediff(schedule: str, frames: int = 8, cfg: float = 1.0) -> dict:
    prompt = json.loads((ROOT / "tests" / "data" / "workflows" / "animatediff_tiny_random_api.json").read_text())
    prompt["4"] = {"class_type": "KineFlowPromptSchedule",
                   "inputs": {"text_encoder": ["1", 2], "schedule": schedule, "negative_prompt": ""}}
    prompt["5"]["inputs"].update(frames=frames, width=32, height=32)
    prompt["6"]["inputs"].update(steps=2, cfg=cfg)
    return prompt


def test_each_unet_frame_cross_attends_to_its_own_interpolated_prompt(sd_models, tmp_path, monkeypatch):
    seen = []
    forward = SD15UNet.forward

    def recording_forward(self, x, timesteps, context, *args, **kwargs):
        seen.append(context.clone())
        return forward(self, x, timesteps, context, *args, **kwargs)

    monkeypatch.setattr(SD15UNet, "forward", recording_forward)
    schedule = '"0": "a red circle on a blue background", "4": "a green square on a white background"'
    run_workflow(_travel_animatediff(schedule), models_dir=sd_models, output_dir=tmp_path, cache=OutputCache())
    assert len(seen) == 2 and seen[0].shape[0] == 8  # one UNet call per step, 8 frames in the batch
    with host.configured(models_dir=sd_models):
        from kineflow.runtime.animatediff import load_sd_checkpoint

        _, _, text = load_sd_checkpoint("kineflow_random_sd15.safetensors")
        red = text.encode(["a red circle on a blue background"])["context"][0]
        green = text.encode(["a green square on a white background"])["context"][0]
    context = seen[0]
    for frame, a in enumerate([0, 0.25, 0.5, 0.75, 1, 1, 1, 1]):
        assert torch.allclose(context[frame], (1 - a) * red + a * green, atol=1e-5), frame


def test_dit_runs_once_per_distinct_mix_with_that_mix(tmp_path, monkeypatch, capsys):
    """The shipped workflow end to end through `kineflow run`: 3 latent frames with distinct weights -> 3 DiT passes
    per step, each with the mix of one latent frame's covered video frames."""
    seen = []
    forward = HunyuanVideoDiT.forward

    def recording_forward(self, x, timestep, text_states, *args, **kwargs):
        seen.append(text_states.clone())
        return forward(self, x, timestep, text_states, *args, **kwargs)

    monkeypatch.setattr(HunyuanVideoDiT, "forward", recording_forward)
    code = cli.main(["run", str(TRAVEL_WORKFLOW), "--set", "6.steps=2", "--set", "5.width=64", "--set", "5.height=64",
                     "--output-dir", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    assert len(list((tmp_path / "KineFlow").glob("prompt_travel_*.mp4"))) == 1
    assert len(seen) == 2 * 3
    prompt = json.loads(TRAVEL_WORKFLOW.read_text())
    schedule = parse_schedule(prompt["4"]["inputs"]["schedule"])
    assert schedule.keyframes == (0, 4)
    from kineflow.runtime.evaluation import load_hunyuan_video

    text = load_hunyuan_video().text
    conditioning = generation.encode_schedule(text, prompt["4"]["inputs"]["schedule"])
    a, b = (c["text_states"] for c in conditioning["travel"]["encoded"])
    length = max(a.shape[1], b.shape[1])
    a, b = (torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[1])) for t in (a, b))
    # latent 1 covers frames 1..4: prompt-2 weights 1/4, 2/4, 3/4, 1 -> mean 0.625
    for got, w in zip(seen[:3], [0.0, 0.625, 1.0]):
        expected = (1 - w) * a + w * b
        assert torch.allclose(got[:, :expected.shape[1]], expected[:, :got.shape[1]], atol=1e-5), w


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_prompt_travel_runs_on_the_compute_device(cfg, sd_models, tmp_path):
    hunyuan = json.loads(TRAVEL_WORKFLOW.read_text())
    hunyuan["5"]["inputs"].update(width=32, height=32, frames=17)
    hunyuan["6"]["inputs"].update(steps=2, cfg=cfg)
    hunyuan["4"]["inputs"]["negative_prompt"] = "blurry"
    hunyuan["9"] = {"class_type": "KineFlowContextOptions",
                    "inputs": {"length": 3, "overlap": 1, "stride": 1, "schedule": "uniform", "fuse_method": "pyramid"}}
    hunyuan["6"]["inputs"]["context_options"] = ["9", 0]
    hunyuan["10"] = {"class_type": "KineFlowStepCache", "inputs": {"threshold": 0.1}}  # its window scope joins travel's
    hunyuan["6"]["inputs"]["step_cache"] = ["10", 0]
    animatediff = _travel_animatediff('"0": "a red circle", "5": "a blue square"', cfg=cfg)
    for prompt, models_dir, frames in ((hunyuan, None, 17), (animatediff, sd_models, 8)):
        out_dir = tmp_path / "out"
        with host.configured(device="meta", models_dir=models_dir, output_dir=out_dir), one_device() as mode:
            results = run_workflow(prompt, cache=OutputCache(), output_dir=out_dir, models_dir=models_dir)
        assert mode.ops_on.get("meta", 0) > 100
        (images,) = [r["outputs"][0] for r in results.values() if r["outputs"]
                     and isinstance(r["outputs"][0], torch.Tensor) and r["outputs"][0].ndim == 4]
        assert images.is_meta and images.shape[0] == frames


def test_a_schedule_longer_than_the_video_fails_at_sampling_with_both_lengths(tmp_path, capsys):
    code = cli.main(["run", str(TRAVEL_WORKFLOW), "--set", '4.schedule="0": "a red circle", "12": "a blue circle"',
                     "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err  # a run-time failure (the length is known when sampling starts)
    assert "prompt schedule keyframe 12 is beyond the video: it has 9 frames (0..8)" in err
