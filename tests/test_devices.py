"""Device correctness: every path of both families runs with the compute device set to `meta`.

`meta` is a non-CPU device every PyTorch has, so these tests stand in for CUDA and MPS on a CPU-only machine:
`device_check.one_device()` fails at the first operation that mixes a CPU tensor with a device tensor (the
crash users saw at the first sampling step on a GPU). A dry run on `meta` also writes nothing.
"""

import copy
import json
from pathlib import Path

import pytest
import torch

from device_check import DeviceMixError, one_device
from kineflow.runtime import host
from kineflow.runtime.executor import OutputCache, run_workflow
from kineflow.samplers.sampling import SAMPLERS, FlowMatching, sample
from kineflow.training import tiny_sd

ROOT = Path(__file__).resolve().parent.parent
SAMPLER_NAMES = sorted(SAMPLERS)


def _workflow(name: str) -> dict:
    return json.loads((ROOT / "workflows" / "api" / name).read_text())


def _run_on_meta(prompt: dict, tmp_path, models_dir=None) -> dict:
    out_dir = tmp_path / "out"
    with host.configured(device="meta", models_dir=models_dir, output_dir=out_dir), one_device() as mode:
        results = run_workflow(prompt, cache=OutputCache(), output_dir=out_dir, models_dir=models_dir)
    assert mode.ops_on.get("meta", 0) > 100, "the models did not run on the compute device"
    assert not out_dir.exists(), "a dry run must not write"
    return results


def _images(results: dict) -> torch.Tensor:
    """The decoded frames (IMAGE outputs on `meta`; a procedural input clip is real CPU data)."""
    (images,) = [r["outputs"][0] for r in results.values()
                 if r["outputs"] and isinstance(r["outputs"][0], torch.Tensor) and r["outputs"][0].is_meta
                 and r["outputs"][0].ndim == 4]
    return images


def test_the_checker_catches_a_cpu_latent_meeting_a_device_network():
    """The bug this file guards against: the latent stayed on the CPU while the net answered on the device."""
    net = lambda x, t: torch.zeros(x.shape, device="meta")  # noqa: E731
    with one_device(), pytest.raises(DeviceMixError):
        sample(FlowMatching(), FlowMatching().wrap(net), torch.randn(1, 16, 1, 2, 2), torch.tensor([1.0, 0.0]),
               "euler")


# --------------------------------------------------------------------------- HunyuanVideo family
def _hunyuan(sampler="euler", cfg=1.0, **changes) -> dict:
    prompt = _workflow("text_to_video.json")
    prompt["5"]["inputs"].update(width=32, height=32, frames=9)
    prompt["6"]["inputs"].update(sampler_name=sampler, cfg=cfg, steps=2)
    if cfg != 1.0:
        prompt["4"]["inputs"]["negative_prompt"] = "blurry"
    for node_input, value in changes.items():
        node, name = node_input.split("_", 1)
        prompt[node]["inputs"][name] = value
    return prompt


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_hunyuan_video_samples_on_the_compute_device(sampler, cfg, tmp_path):
    images = _images(_run_on_meta(_hunyuan(sampler, cfg), tmp_path))
    assert images.shape == (9, 32, 32, 3)


def test_hunyuan_video_context_windows_tiling_fp8_and_video_to_video(tmp_path):
    prompt = _hunyuan(cfg=2.0, **{"1_fp8": "e4m3fn", "7_tiling": "enabled", "7_tile_size": 64, "7_tile_overlap": 32,
                                  "7_tile_frames": 8, "7_frame_overlap": 4})
    prompt["5"]["inputs"].update(frames=17, width=96, height=96)
    prompt["20"] = {"class_type": "KineFlowContextOptions",
                    "inputs": {"length": 3, "overlap": 1, "stride": 1, "schedule": "uniform", "fuse_method": "pyramid"}}
    prompt["6"]["inputs"]["context_options"] = ["20", 0]
    # video-to-video: a procedural clip encoded by the VAE (tiled) and partly re-noised
    prompt["21"] = {"class_type": "KineFlowShapesVideo",
                    "inputs": {"shape": "circle", "colour": "red", "background": "blue", "direction": "left",
                               "scale_change": "none", "frames": 17, "width": 96, "height": 96, "seed": 0}}
    prompt["22"] = {"class_type": "KineFlowVAEEncode",
                    "inputs": {"vae": ["2", 0], "images": ["21", 0], "tiling": "enabled", "tile_size": 64,
                               "tile_overlap": 32, "tile_frames": 8, "frame_overlap": 4}}
    prompt["6"]["inputs"].update(latent=["22", 0], denoise=0.6)
    images = _images(_run_on_meta(prompt, tmp_path))
    assert images.shape == (17, 96, 96, 3)


# --------------------------------------------------------------------------- AnimateDiff family
@pytest.fixture(scope="module")
def sd_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_models")
    tiny_sd.write_models(root, seed=0)
    return root


def _animatediff(sampler="euler", cfg=1.0, scheduler="default", prediction="eps") -> dict:
    prompt = _workflow("animatediff_tiny.json")
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        if node["class_type"] == "KineFlowSampler":
            node["inputs"].update(sampler_name=sampler, cfg=cfg, steps=2, scheduler=scheduler)
        if node["class_type"] == "KineFlowEmptyVideoLatent":
            node["inputs"].update(width=32, height=32, frames=16)
        if node["class_type"] == "KineFlowLoadSDCheckpoint":
            node["inputs"]["prediction"] = prediction
    return prompt


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_animatediff_samples_on_the_compute_device(sampler, cfg, tmp_path):
    images = _images(_run_on_meta(_animatediff(sampler, cfg), tmp_path))
    assert images.shape == (16, 32, 32, 3)


def test_animatediff_loras_adapter_context_windows_karras_and_v_prediction(sd_models, tmp_path):
    prompt = {
        "1": {"class_type": "KineFlowLoadSDCheckpoint",
              "inputs": {"ckpt_name": "kineflow_random_sd15.safetensors", "prediction": "v", "dtype": "auto"}},
        "2": {"class_type": "KineFlowLoadMotionModule", "inputs": {"model_name": "kineflow_random_mm_v2.safetensors",
                                                                   "dtype": "auto"}},
        "3": {"class_type": "KineFlowLoadMotionLoRA", "inputs": {
            "motion_module": ["2", 0], "lora_name": "kineflow_random_motion_lora.safetensors", "strength": 0.8}},
        "4": {"class_type": "KineFlowApplyDomainAdapter", "inputs": {
            "model": ["1", 0], "adapter_name": "kineflow_random_v3_adapter.safetensors", "strength": 1.0}},
        "5": {"class_type": "KineFlowApplyMotionModule", "inputs": {"model": ["4", 0], "motion_module": ["3", 0],
                                                                    "scale": 1.0}},
        "6": {"class_type": "KineFlowTextEncode", "inputs": {"text_encoder": ["1", 2], "prompt": "a red circle",
                                                              "negative_prompt": "blurry"}},
        "7": {"class_type": "KineFlowEmptyVideoLatent", "inputs": {"width": 32, "height": 32, "frames": 20,
                                                                   "batch_size": 2, "latent_format": "sd15"}},
        "8": {"class_type": "KineFlowContextOptions", "inputs": {"length": 8, "overlap": 2, "stride": 2,
                                                                 "schedule": "uniform", "fuse_method": "overlap-linear"}},
        "9": {"class_type": "KineFlowSampler", "inputs": {
            "model": ["5", 0], "conditioning": ["6", 0], "latent": ["7", 0], "seed": 1, "steps": 2, "cfg": 3.0,
            "shift": 1.0, "embedded_guidance": 6.0, "sampler_name": "dpmpp_2m", "scheduler": "karras",
            "denoise": 1.0, "context_options": ["8", 0]}},
        "10": {"class_type": "KineFlowVAEDecode", "inputs": {"vae": ["1", 1], "latent": ["9", 0], "tiling": "auto",
                                                             "tile_size": 256, "tile_overlap": 64, "tile_frames": 16,
                                                             "frame_overlap": 4}},
        "11": {"class_type": "KineFlowSaveVideo", "inputs": {"images": ["10", 0], "frame_rate": 8.0,
                                                             "filename_prefix": "devices", "format": "webm",
                                                             "quality": 80, "loop_count": 0, "save_metadata": True}},
    }
    images = _images(_run_on_meta(prompt, tmp_path, models_dir=sd_models))
    assert images.shape == (40, 32, 32, 3)


# --------------------------------------------------------------------------- dry run of the full-size workflow
@pytest.fixture(scope="module")
def full_size_models(tmp_path_factory):
    """The HunyuanVideo files the full-size workflow names, as header-only files (their data is a sparse hole)."""
    from checkpoint_fixtures import header_only_safetensors, manifest_shapes
    from kineflow.training.tiny_models import write_word_tokenizer

    root = tmp_path_factory.mktemp("full_size")
    for folder, name, manifest in (("diffusion_models", "hunyuan_video_t2v_720p_bf16.safetensors", "hunyuan_video_dit_comfy"),
                                   ("vae", "hunyuan_video_vae_bf16.safetensors", "hunyuan_video_vae_comfy"),
                                   ("text_encoders", "llava_llama3_fp16.safetensors", "llava_llama3_8b_text_hf"),
                                   ("text_encoders", "clip_l.safetensors", "clip_l_text_hf")):
        (root / folder).mkdir(exist_ok=True)
        header_only_safetensors(manifest_shapes(manifest), root / folder / name)
    # LLaMA-3's tokenizer is not ours to ship; a word-level stand-in has the same special tokens.
    write_word_tokenizer(root / "text_encoders" / "llava_llama3_tokenizer", [])
    return root


def test_dry_run_of_the_full_size_workflow_reads_headers_only_and_writes_nothing(full_size_models, tmp_path, capsys,
                                                                                monkeypatch):
    import safetensors

    from kineflow.runtime import cli

    def no_data(*args, **kwargs):
        raise AssertionError("a dry run read tensor data")

    monkeypatch.setattr(safetensors, "safe_open", no_data)
    out_dir = tmp_path / "out"
    code = cli.main(["run", "--device", "meta", str(ROOT / "workflows/api/hunyuan_video_t2v.json"),
                     "--models-dir", str(full_size_models), "--output-dir", str(out_dir)])
    report = capsys.readouterr().out
    assert code == 0, report
    assert "LATENT [1, 16, 19, 60, 106]" in report and "[73, 480, 848, 3]" in report
    need = float(report.split("device memory this run needs:")[1].split("GiB")[0])
    # 12.8 B DiT + 7.5 B LLaMA + CLIP-L + VAE in bf16 (38.6 GiB), plus the activations of a 30k-token step
    assert 38.5 < need < 60, report
    assert not out_dir.exists()
