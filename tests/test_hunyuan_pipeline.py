"""End to end on tiny random-weight HunyuanVideo-family files written in the real layouts.

The files go through the same loader nodes, detection and conversion as full-size checkpoints; the workflow
is tests/data/workflows/hunyuan_video_tiny_random_api.json.
"""

import json
from pathlib import Path

import av
import pytest
import torch

from kineflow.runtime import cli, host
from kineflow.runtime.executor import OutputCache, run_workflow
from kineflow.training.tiny_models import write_models

WORKFLOW = Path(__file__).parent / "data" / "workflows" / "hunyuan_video_tiny_random_api.json"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_models(root, texts=["a red circle moves to the left on a blue background"], seed=0)
    return root


def _run(models_dir, out_dir, overrides=(), cache=None):
    return run_workflow(str(WORKFLOW), overrides=list(overrides), models_dir=models_dir, output_dir=out_dir,
                        cache=cache if cache is not None else OutputCache())


def test_workflow_writes_an_mp4_with_the_requested_frames(models_dir, tmp_path):
    results = _run(models_dir, tmp_path)
    frames = results["7"]["outputs"][0]
    assert frames.shape == (9, 64, 64, 3) and frames.dtype == torch.float32
    assert 0.0 <= float(frames.min()) and float(frames.max()) <= 1.0
    (saved,) = results["8"]["ui"]["images"]
    path = tmp_path / saved["filename"]
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
        assert (len(decoded), stream.width, stream.height) == (9, 64, 64)
        assert float(stream.average_rate) == 8.0
        assert json.loads(container.metadata["prompt"])["6"]["inputs"]["seed"] == 7


def test_same_seed_same_frames_other_seed_other_frames(models_dir, tmp_path):
    a = _run(models_dir, tmp_path)["7"]["outputs"][0]
    b = _run(models_dir, tmp_path)["7"]["outputs"][0]
    c = _run(models_dir, tmp_path, ["6.seed=8"])["7"]["outputs"][0]
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 1e-3


def test_cfg_with_negative_prompt_and_video_to_video(models_dir, tmp_path):
    base = _run(models_dir, tmp_path)["6"]["outputs"][0]["samples"]
    guided = _run(models_dir, tmp_path, ["4.negative_prompt=\"blurry\"", "6.cfg=3.0"])["6"]["outputs"][0]["samples"]
    assert guided.shape == base.shape and not torch.equal(guided, base)


def test_cfg_with_an_empty_negative_prompt_guides_against_the_empty_prompt(models_dir, tmp_path):
    base = _run(models_dir, tmp_path)["6"]["outputs"][0]["samples"]
    guided = _run(models_dir, tmp_path, ["6.cfg=4.0"])["6"]["outputs"][0]["samples"]
    assert not torch.equal(guided, base)


def test_failed_run_is_a_clear_error_and_leaves_no_output(models_dir, tmp_path, capsys):
    code = cli.main(["run", str(WORKFLOW), "--models-dir", str(models_dir), "--output-dir", str(tmp_path),
                     "--set", "6.scheduler=\"karras\""])
    err = capsys.readouterr().err
    assert code == 1 and "discrete-schedule models" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir()), "a failed run must not leave outputs"


def test_invalid_frame_count_fails_validation_with_nearest_value(models_dir, tmp_path, capsys):
    code = cli.main(["validate", str(WORKFLOW), "--set", "5.frames=10", "--set", "5.width=70"])
    err = capsys.readouterr().err
    assert code == 2
    assert "nearest valid: 9" in err and "nearest valid: 64x64" in err


def test_wrong_file_in_loader_says_what_it_is(models_dir, tmp_path, capsys):
    (models_dir / "diffusion_models" / "oops.safetensors").write_bytes(
        (models_dir / "vae" / "kineflow_random_vae.safetensors").read_bytes())
    code = cli.main(["run", str(WORKFLOW), "--models-dir", str(models_dir), "--output-dir", str(tmp_path),
                     "--set", "1.model_name=\"oops.safetensors\""])
    err = capsys.readouterr().err
    assert code == 2, "a file of the wrong kind is an unusable input file"
    assert "hunyuan_video_vae" in err and "expects a HunyuanVideo transformer" in err


def test_vae_encode_then_partial_denoise_keeps_the_input(models_dir):
    from kineflow.runtime.generation import encode_video, sample_video
    from kineflow.runtime.video_models import load_text_encoders, load_video_model, load_video_vae

    host.configure(models_dir=models_dir)
    vae = load_video_vae("kineflow_random_vae.safetensors")
    model = load_video_model("kineflow_random_dit.safetensors")
    te = load_text_encoders("kineflow_random_llm", "kineflow_random_clip.safetensors")
    cond = {"positive": te.encode(["a red circle"]), "negative": None}
    frames = torch.rand(9, 32, 32, 3)
    latent = encode_video(vae, frames, tiling=None)
    assert latent["samples"].shape == (1, 16, 3, 4, 4)
    kwargs = dict(seed=1, steps=4, cfg=1.0, shift=1.0, embedded_guidance=6.0, sampler_name="euler")
    light = sample_video(model, cond, latent, denoise=0.1, **kwargs)["samples"]
    full = sample_video(model, cond, latent, denoise=1.0, **kwargs)["samples"]
    assert (light - latent["samples"]).abs().mean() < (full - latent["samples"]).abs().mean()


def test_conditioning_from_another_family_is_a_clear_error(models_dir):
    from kineflow.errors import KineFlowError
    from kineflow.runtime.video_models import load_video_model

    host.configure(models_dir=models_dir)
    model = load_video_model("kineflow_random_dit.safetensors")
    with pytest.raises(KineFlowError, match="Load Text Encoders"):
        model.net_kwargs({"context": torch.zeros(1, 77, 768)}, 6.0, 1)


def test_diffusers_transformer_folder_loads_through_the_loader_node(tmp_path):
    """A diffusers `save_pretrained` folder (sharded safetensors + config.json) is one choice of the loader."""
    diffusers = pytest.importorskip("diffusers")
    from kineflow.models.hunyuan_video_dit import HunyuanVideoDiTConfig
    from kineflow.nodes.loaders import KineFlowLoadVideoModel

    cfg = HunyuanVideoDiTConfig.tiny()
    torch.manual_seed(0)
    ref = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=cfg.heads_num, attention_head_dim=cfg.head_dim,
        num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
        guidance_embeds=True, text_embed_dim=cfg.text_states_dim, pooled_projection_dim=cfg.text_states_dim_2,
        rope_theta=cfg.rope_theta, rope_axes_dim=cfg.rope_dim_list).eval()
    ref.save_pretrained(tmp_path / "diffusion_models" / "hv_diffusers", max_shard_size="200KB")
    assert len(list((tmp_path / "diffusion_models" / "hv_diffusers").glob("*.safetensors"))) > 1
    host.configure(models_dir=tmp_path)
    assert "hv_diffusers" in KineFlowLoadVideoModel.INPUT_TYPES()["required"]["model_name"][0]
    (model,) = KineFlowLoadVideoModel().load("hv_diffusers", "fp32", "disabled")
    x = torch.randn(1, 16, 2, 4, 4)
    text, mask, pooled = torch.randn(1, 5, cfg.text_states_dim), torch.ones(1, 5), torch.randn(1, cfg.text_states_dim_2)
    t, g = torch.tensor([500.0]), torch.tensor([6000.0])
    with torch.no_grad():
        expected = ref(x, t, text, mask, pooled, guidance=g, return_dict=False)[0]
    ours = model.net_fn(x, t, text_states=text, text_mask=mask, text_states_2=pooled, guidance=g)
    assert (ours - expected).abs().max() < 1e-4
