"""Image to video. HunyuanVideo: the I2V transformers against diffusers, their detection in every layout, the Image To
Video node's conditioning, a tiny end-to-end run through the nodes, and the refusals of mismatched model and
conditioning. AnimateDiff: the shipped image-to-video workflow (first frame pinned, noised to each step's level),
with context windows and with denoise < 1."""

import dataclasses
import json

import av
import pytest
import torch
from safetensors.torch import save_file

from kineflow.errors import KineFlowError, ModelFileError
from kineflow.models import checkpoints
from kineflow.models.hunyuan_video_dit import (
    HunyuanVideoDiT,
    HunyuanVideoDiTConfig,
    config_from_state_dict,
    convert_state_dict,
    detect_layout,
    image_condition_channels,
)
from kineflow.nodes.synthetic import KineFlowShapesVideo
from kineflow.runtime import generation
from kineflow.runtime.executor import OutputCache, run_workflow
from kineflow.runtime.host import PACK_DIR
from kineflow.training.tiny_models import comfy_dit_names, write_models

# (image_condition, in_channels, guidance_embed) of the released variants: HunyuanVideo-I2V's first release (33ch,
# not guidance-distilled), SkyReels-V1-Hunyuan-I2V (32ch, distilled), HunyuanVideo-I2V's token-replace release (16ch).
VARIANTS = {
    "i2v-33ch": ("latent_concat", 33, False),
    "i2v-32ch": ("latent_concat", 32, True),
    "i2v-token-replace": ("token_replace", 16, True),
}


def i2v_config(variant: str) -> HunyuanVideoDiTConfig:
    mode, in_channels, guidance = VARIANTS[variant]
    return dataclasses.replace(HunyuanVideoDiTConfig.tiny(), in_channels=in_channels, guidance_embed=guidance,
                               image_condition=mode)


def diffusers_reference(cfg: HunyuanVideoDiTConfig):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    # diffusers runs SkyReels' 32 channels as a plain transformer (its pipeline concatenates the image latent).
    condition = None if cfg.in_channels == 32 else cfg.image_condition
    ref = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_attention_heads=cfg.heads_num,
        attention_head_dim=cfg.head_dim, num_layers=cfg.mm_double_blocks_depth,
        num_single_layers=cfg.mm_single_blocks_depth, num_refiner_layers=cfg.refiner_depth,
        mlp_ratio=cfg.mlp_width_ratio, patch_size=cfg.patch_size[1], patch_size_t=cfg.patch_size[0],
        guidance_embeds=cfg.guidance_embed, text_embed_dim=cfg.text_states_dim,
        pooled_projection_dim=cfg.text_states_dim_2, rope_theta=cfg.rope_theta, rope_axes_dim=cfg.rope_dim_list,
        image_condition_type=condition,
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.1)
    return ref


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_with_diffusers_image_to_video_transformer(variant):
    cfg = i2v_config(variant)
    ref = diffusers_reference(cfg)
    converted = convert_state_dict(ref.state_dict(), "diffusers")
    declared = "token_replace" if cfg.image_condition == "token_replace" else None
    assert config_from_state_dict(converted, declared) == cfg
    model = HunyuanVideoDiT(cfg).eval()
    model.load_state_dict(converted, strict=True)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, 3, 8, 12, generator=g)
    text = torch.randn(2, 10, cfg.text_states_dim, generator=g)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 6:] = 0
    pooled = torch.randn(2, cfg.text_states_dim_2, generator=g)
    t = torch.tensor([900.0, 250.0])
    guidance = torch.full((2,), 6000.0) if cfg.guidance_embed else None
    with torch.inference_mode():
        expected = ref(x, t, text, mask, pooled, guidance, return_dict=False)[0]
        got = model(x, t, text, mask, pooled, guidance)
    assert expected.abs().max() > 0.5
    assert (got - expected).abs().max().item() <= 1e-5
    if cfg.image_condition == "token_replace":  # the first frame's own modulation matters, and only there
        with torch.inference_mode():
            plain = model(x, t, text, mask, pooled, guidance, token_replace=False)
        assert (plain - got).abs().max() > 1e-3


def _files(tmp_path, variant: str) -> dict[str, object]:
    """A tiny random I2V transformer written in each layout: original and comfy files, a diffusers folder."""
    cfg = i2v_config(variant)
    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in HunyuanVideoDiT(cfg).state_dict().items()}
    metadata = {"image_condition_type": "token_replace"} if cfg.image_condition == "token_replace" else None
    paths = {}
    for layout, tensors in (("original", sd), ("comfy", comfy_dit_names(sd))):
        paths[layout] = tmp_path / f"{variant}_{layout}.safetensors"
        save_file(tensors, str(paths[layout]), metadata=metadata)
    folder = tmp_path / f"{variant}_diffusers"
    folder.mkdir()
    ref = diffusers_reference(cfg)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    config = {"_class_name": "HunyuanVideoTransformer3DModel", "in_channels": cfg.in_channels}
    if cfg.image_condition == "token_replace":
        config["image_condition_type"] = "token_replace"
    (folder / "config.json").write_text(json.dumps(config))
    paths["diffusers"] = folder
    return paths


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_are_detected_in_every_layout(tmp_path, variant):
    for layout, path in _files(tmp_path, variant).items():
        header = checkpoints.read_header(path)
        det = checkpoints.detect(header)
        assert (det.family, det.layout, det.version) == ("hunyuan_video_dit", layout, variant)
        assert "image to video" in det.note
        shapes = {k: torch.empty(v.shape, device="meta") for k, v in header.tensors.items()}
        converted = convert_state_dict(shapes, detect_layout(shapes.keys()))
        config = config_from_state_dict(converted, header.metadata.get("image_condition_type"))
        assert config == i2v_config(variant)
        assert checkpoints.inspect_file(path)["version"] == variant


def test_text_to_video_shapes_name_the_token_replace_lookalike():
    det = checkpoints.detect({"double_blocks.0.img_attn_qkv.weight": (192, 64), "single_blocks.0.linear1.weight": (1, 1),
                              "img_in.proj.weight": (64, 16, 1, 2, 2)})
    assert det.version == "t2v" and "token_replace" in det.note
    with pytest.raises(ModelFileError, match="latent_concat"):
        config_from_state_dict(_tiny_shapes(), "latent_concat")


def _tiny_shapes():
    with torch.device("meta"):
        return dict(HunyuanVideoDiT(HunyuanVideoDiTConfig.tiny()).state_dict())


def test_image_channels_put_the_image_in_frame_zero_with_the_mask():
    image = torch.randn(2, 16, 1, 4, 6)
    for variant, mask in (("i2v-33ch", True), ("i2v-32ch", False)):
        channels = image_condition_channels(i2v_config(variant), image, frames=3)
        assert channels.shape == (2, 16 + mask, 3, 4, 6)
        assert torch.equal(channels[:, :16, :1], image) and not channels[:, :16, 1:].any()
        if mask:
            assert channels[:, 16, 0].eq(1).all() and not channels[:, 16, 1:].any()
    with pytest.raises(KineFlowError, match="latent_concat"):
        image_condition_channels(i2v_config("i2v-token-replace"), image, frames=3)


# --------------------------------------------------------------------------- through the nodes
@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("i2v_models")
    paths = write_models(root, texts=["a red circle moves to the left on a blue background"], seed=0)
    t2v = config_from_state_dict(checkpoints.read_header(paths["dit"]).shapes())  # the tiny text encoders' widths
    torch.manual_seed(1)
    dit = HunyuanVideoDiT(dataclasses.replace(t2v, in_channels=33, image_condition="latent_concat"))
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0.0, 0.05)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()},
              str(root / "diffusion_models" / "tiny_i2v_33ch.safetensors"))
    return root


def _workflow(model="tiny_i2v_33ch.safetensors", mode="auto", cfg=2.0, image_to_video=True, context=False,
              step_cache=False):
    shapes = {k: v[1]["default"] for k, v in KineFlowShapesVideo.INPUT_TYPES()["required"].items()}
    shapes.update(width=64, height=48, frames=1, colour="red")
    prompt = {
        "1": {"class_type": "KineFlowLoadVideoModel", "inputs": {"model_name": model, "weight_dtype": "fp32", "fp8": "disabled"}},
        "2": {"class_type": "KineFlowLoadVideoVAE", "inputs": {"vae_name": "kineflow_random_vae.safetensors", "dtype": "fp32"}},
        "3": {"class_type": "KineFlowLoadTextEncoders", "inputs": {
            "llm_name": "kineflow_random_llm", "clip_name": "kineflow_random_clip.safetensors", "dtype": "fp32",
            "llm_tokenizer": "", "crop_start": -1}},
        "4": {"class_type": "KineFlowTextEncode", "inputs": {"text_encoder": ["3", 0], "prompt": "a red circle",
                                                              "negative_prompt": "blurry"}},
        "5": {"class_type": "KineFlowShapesVideo", "inputs": shapes},
        "9": {"class_type": "KineFlowImageToVideo", "inputs": {
            "conditioning": ["4", 0], "vae": ["2", 0], "image": ["5", 0], "width": 64, "height": 64, "frames": 9,
            "batch_size": 1, "mode": mode}},
        "10": {"class_type": "KineFlowEmptyVideoLatent", "inputs": {"width": 64, "height": 64, "frames": 9, "batch_size": 1}},
        "6": {"class_type": "KineFlowSampler", "inputs": {
            "model": ["1", 0], "conditioning": ["9", 0] if image_to_video else ["4", 0],
            "latent": ["9", 1] if image_to_video else ["10", 0], "seed": 3, "steps": 3, "cfg": cfg, "shift": 7.0,
            "embedded_guidance": 6.0, "sampler_name": "euler", "scheduler": "default", "denoise": 1.0}},
        "7": {"class_type": "KineFlowVAEDecode", "inputs": {"vae": ["2", 0], "latent": ["6", 0], "tiling": "disabled",
                                                             "tile_size": 256, "tile_overlap": 64, "tile_frames": 16,
                                                             "frame_overlap": 4}},
        "8": {"class_type": "KineFlowSaveVideo", "inputs": {"images": ["7", 0], "frame_rate": 8.0, "filename_prefix": "i2v",
                                                             "format": "mp4", "quality": 80, "loop_count": 0,
                                                             "save_metadata": False}},
    }
    if context:
        prompt["11"] = {"class_type": "KineFlowContextOptions", "inputs": {
            "length": 2, "overlap": 1, "stride": 1, "schedule": "uniform", "fuse_method": "flat"}}
        prompt["6"]["inputs"]["context_options"] = ["11", 0]
    if step_cache:  # a threshold that lets steps skip the blocks: the cached residual composes with the first frame
        prompt["12"] = {"class_type": "KineFlowStepCache", "inputs": {"threshold": 1.0}}
        prompt["6"]["inputs"]["step_cache"] = ["12", 0]
    return prompt


def _run(models_dir, out_dir, prompt, cache=None):
    path = out_dir / "workflow.json"
    path.write_text(json.dumps(prompt))
    return run_workflow(str(path), models_dir=models_dir, output_dir=out_dir, cache=cache or OutputCache())


def test_image_to_video_runs_through_the_nodes_and_writes_a_video(models_dir, tmp_path):
    cache = OutputCache()
    results = _run(models_dir, tmp_path, _workflow(), cache)
    conditioning, latent = results["9"]["outputs"]
    image = conditioning["image"]
    assert image["mode"] == "auto" and image["latent"].shape == (1, 16, 1, 8, 8)
    assert latent["samples"].shape == (1, 16, 3, 8, 8) and not latent["samples"].any()
    # The first frame: the shapes frame centre-cropped from 64x48 to the square's aspect, resized, encoded.
    from kineflow.runtime.media import resize_frames
    from kineflow.runtime.video_models import load_video_vae

    frame = results["5"]["outputs"][0][:1]
    vae = load_video_vae(str(models_dir / "vae" / "kineflow_random_vae.safetensors"), "fp32")
    expected = generation.encode_video(vae, resize_frames(frame, 64, 64, "bilinear", "center"), "auto")["samples"]
    assert torch.allclose(image["latent"], expected, atol=1e-6)

    frames = results["7"]["outputs"][0]
    assert frames.shape == (9, 64, 64, 3)
    (saved,) = results["8"]["ui"]["images"]
    with av.open(str(tmp_path / saved["filename"])) as container:
        assert len(list(container.decode(video=0))) == 9

    # The image steers the model: another first frame, another video.
    other = _workflow()
    other["5"]["inputs"]["colour"] = "green"
    again = _run(models_dir, tmp_path, other, cache)["6"]["outputs"][0]["samples"]
    assert not torch.equal(again, results["6"]["outputs"][0]["samples"])


def test_token_replace_keeps_the_image_as_the_first_latent_frame(models_dir, tmp_path):
    results = _run(models_dir, tmp_path, _workflow(model="kineflow_random_dit.safetensors", mode="token_replace", cfg=1.0,
                                                   step_cache=True))
    image = results["9"]["outputs"][0]["image"]["latent"]
    samples = results["6"]["outputs"][0]["samples"]
    assert (samples[:, :, :1] - image).abs().max() < 1e-6  # the sampler's last step lands on the estimate
    assert samples[:, :, 1:].abs().mean() > 1e-3


@pytest.mark.parametrize("case, message", [
    (dict(model="kineflow_random_dit.safetensors"), "takes no image"),
    (dict(image_to_video=False), "needs a first frame"),
    (dict(mode="token_replace"), "concatenated latent channels"),
    (dict(context=True), "context windows is not supported"),
])
def test_mismatched_model_and_conditioning_are_refused(models_dir, tmp_path, case, message):
    with pytest.raises(Exception, match=message):
        _run(models_dir, tmp_path, _workflow(**case))


def test_conditioning_from_the_other_familys_vae_is_refused():
    class SD15Like:  # AnimateDiff's model handle: no image_kwargs
        family = "sd15"

    made_by_hunyuan_vae = {"latent": torch.zeros(1, 4, 1, 8, 8), "mode": "auto"}
    with pytest.raises(KineFlowError, match="made with HunyuanVideo's VAE"):
        generation._image_condition(SD15Like(), made_by_hunyuan_vae, (1, 4, 9, 8, 8), None)

    class HunyuanLike:
        family = "hunyuan_video"

        def image_kwargs(self, image, latent_shape):
            raise AssertionError("not reached")

    made_by_sd_vae = {"latent": torch.zeros(1, 16, 1, 8, 8), "mode": "first_frame"}
    with pytest.raises(KineFlowError, match="made with an SD VAE"):
        generation._image_condition(HunyuanLike(), made_by_sd_vae, (1, 16, 3, 8, 8), None)


# --------------------------------------------------------------------------- AnimateDiff
def _animatediff_workflow(frames=8, steps=4, denoise=1.0, context=False, mode="auto"):
    prompt = json.loads((PACK_DIR / "workflows" / "api" / "animatediff_image_to_video.json").read_text())
    prompt["5"]["inputs"].update(frames=frames, mode=mode)
    prompt["6"]["inputs"].update(steps=steps, denoise=denoise)
    if context:
        prompt["11"] = {"class_type": "KineFlowContextOptions", "inputs": {
            "length": 6, "overlap": 2, "stride": 1, "schedule": "uniform", "fuse_method": "flat"}}
        prompt["6"]["inputs"]["context_options"] = ["11", 0]
    return prompt


@pytest.fixture(scope="module")
def animatediff_cache():
    return OutputCache()


@pytest.mark.parametrize("context", [False, True])
def test_animatediff_image_to_video_keeps_the_first_frame(tmp_path, animatediff_cache, context):
    results = _run(None, tmp_path, _animatediff_workflow(frames=10 if context else 8, context=context),
                   animatediff_cache)
    image = results["5"]["outputs"][0]["image"]["latent"]
    start = results["5"]["outputs"][1]["samples"]
    frames = 10 if context else 8
    assert image.shape == (1, 4, 1, 8, 8) and start.shape == (1, 4, frames, 8, 8)
    assert torch.equal(start, image.expand_as(start))  # every frame starts as the image (for denoise < 1)
    samples = results["6"]["outputs"][0]["samples"]
    assert (samples[:, :, :1] - image).abs().max() < 1e-5  # the sampler ends on the pinned frame
    assert all((samples[:, :, t] - image[:, :, 0]).abs().mean() > 1e-2 for t in range(1, frames))  # the rest moves
    assert results["7"]["outputs"][0].shape == (frames, 64, 64, 3)


def test_animatediff_image_to_video_denoise_keeps_more_of_the_image(tmp_path, animatediff_cache):
    full, partial = (_run(None, tmp_path, _animatediff_workflow(denoise=d), animatediff_cache)
                     for d in (1.0, 0.5))
    image = full["5"]["outputs"][0]["image"]["latent"]
    distance = {name: (run["6"]["outputs"][0]["samples"][:, :, 1:] - image).abs().mean()
                for name, run in (("full", full), ("partial", partial))}
    assert distance["partial"] < distance["full"]


def test_animatediff_image_to_video_refuses_token_replace(tmp_path, animatediff_cache):
    with pytest.raises(Exception, match="set mode to auto"):
        _run(None, tmp_path, _animatediff_workflow(mode="token_replace"), animatediff_cache)
