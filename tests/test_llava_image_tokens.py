"""HunyuanVideo-I2V's image in the prompt: LLaVA's CLIP vision tower + projector against transformers, the I2V template
and the interleave against diffusers' HunyuanVideoImageToVideoPipeline at a tiny size, loading and detection of the
published layouts, clear refusals, a dry run on `meta` and a tiny end-to-end run through the nodes."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from device_check import one_device
from kineflow.errors import KineFlowError, ModelFileError
from kineflow.models import checkpoints, llama_text
from kineflow.models.clip_text import CLIPTextConfig, CLIPTextModel
from kineflow.models.clip_vision import (
    CLIP_IMAGE_MEAN,
    CLIP_IMAGE_STD,
    CLIPVisionConfig,
    LlavaVisionEncoder,
    config_from_state_dict,
    convert_state_dict,
    preprocess,
)
from kineflow.models.hunyuan_text import I2V_VIDEO_PROMPT_TEMPLATE, HunyuanTextEncoder
from kineflow.models.llama_text import LlamaTextConfig, LlamaTextEncoder
from kineflow.models.tokenization import TextTokenizer, clip_l_tokenizer
from kineflow.runtime import host
from kineflow.runtime.executor import OutputCache, run_workflow
from kineflow.training.tiny_models import write_models, write_word_tokenizer

torch.set_num_threads(1)
MANIFEST = Path(__file__).resolve().parent / "data" / "checkpoints" / "llava_llama3_vision_hf.json"


# --------------------------------------------------------------------------- references (transformers, tiny)
def _hf_vision_config(cfg: CLIPVisionConfig):
    from transformers import CLIPVisionConfig as HFVisionConfig

    return HFVisionConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                          num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                          image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act="quick_gelu",
                          layer_norm_eps=cfg.layer_norm_eps, projection_dim=32)


def _hf_llama_config(cfg: LlamaTextConfig, pad_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                       num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
                       rms_norm_eps=cfg.rms_norm_eps, pad_token_id=pad_id)


def llava_reference(vision: CLIPVisionConfig, text: LlamaTextConfig, image_id: int, pad_id: int, seed: int = 0):
    """transformers' LlavaForConditionalGeneration as HunyuanVideo-I2V's text encoder is configured (xtuner's
    llava-llama-3-8b-v1_1-transformers: feature layer -2, class token dropped, gelu projector), random weights."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlavaConfig(vision_config=_hf_vision_config(vision), text_config=_hf_llama_config(text, pad_id),
                                      image_token_index=image_id, pad_token_id=pad_id, projector_hidden_act="gelu",
                                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                                      image_seq_length=vision.num_patches)
    torch.manual_seed(seed)
    ref = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") or "layer_norm" in name or "layrnorm" in name else 0.0, 0.1)
    return ref


def _language_model(ref) -> dict:
    """The LLaVA language model's weights under KineFlow's LLaMA names (transformers 4.x `language_model.model.*` or
    5.x `model.language_model.*`)."""
    sd = {k: v for k, v in ref.state_dict().items() if "language_model." in k}
    return llama_text.convert_state_dict({k.replace("model.language_model.", "language_model.model."): v
                                          for k, v in sd.items()})


def _legacy_names(sd: dict) -> dict:
    """transformers 4.x on-disk names of a LLaVA state dict (the xtuner / HunyuanVideo-I2V files)."""
    out = {}
    for key, value in sd.items():
        if key.startswith("model.vision_tower."):
            out["vision_tower.vision_model." + key[len("model.vision_tower."):]] = value
        elif key.startswith("model.multi_modal_projector."):
            out[key[len("model."):]] = value
        elif key.startswith("model.language_model."):
            out["language_model.model." + key[len("model.language_model."):]] = value
        elif key == "lm_head.weight":
            out["language_model.lm_head.weight"] = value
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------- vision tower + projector parity
def test_vision_tower_and_projector_match_transformers():
    cfg = CLIPVisionConfig.tiny()
    text = LlamaTextConfig(vocab_size=64, hidden_size=256, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)
    ref = llava_reference(cfg, text, image_id=63, pad_id=62)
    converted = convert_state_dict(ref.state_dict(), "hf_bare")  # transformers 5's names: model.vision_tower.*
    assert config_from_state_dict(converted) == cfg
    model = LlavaVisionEncoder(cfg).eval()
    model.load_state_dict(converted, strict=True)

    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        tower = ref.model.vision_tower(pixels, output_hidden_states=True)
        expected = torch.stack(ref.model.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                                            vision_feature_select_strategy="default").pooler_output)
        hidden = [model.hidden_state(pixels, i) for i in range(cfg.num_hidden_layers + 1)]
        pooled = model.pooled(hidden[-1])
        got = model(pixels)
        last_layer_features = model.multi_modal_projector(hidden[-1][:, 1:])
    errors = [(h - r).abs().max().item() for h, r in zip(hidden, tower.hidden_states)]
    assert len(hidden) == len(tower.hidden_states) and max(errors) <= 1e-5, errors
    assert (pooled - tower.pooler_output).abs().max().item() <= 1e-5
    assert got.shape == (2, cfg.num_patches, cfg.projector_width) and expected.abs().max() > 0.5
    assert (got - expected).abs().max().item() <= 1e-5
    # The layer LLaVA reads is the second-to-last, without its class token: not the last one.
    assert (last_layer_features - expected).abs().max() > 1e-2


def test_preprocess_resizes_the_short_side_crops_the_centre_and_normalises():
    image = torch.rand(1, 30, 60, 3)
    image[:, :, :15] = 0.0  # the left quarter, cropped away
    pixels = preprocess(image, 28)
    assert pixels.shape == (1, 3, 28, 28)
    mean, std = torch.tensor(CLIP_IMAGE_MEAN).view(3, 1, 1), torch.tensor(CLIP_IMAGE_STD).view(3, 1, 1)
    restored = pixels[0] * std + mean
    assert restored.min() >= -1e-6 and restored.max() <= 1 + 1e-6
    flat = torch.full((1, 5, 5, 3), 0.5)
    assert torch.allclose(preprocess(flat, 28)[0], ((0.5 - mean) / std).expand(3, 28, 28), atol=1e-5)
    with pytest.raises(ValueError, match="IMAGE"):
        preprocess(torch.rand(3, 4, 4), 28)


# --------------------------------------------------------------------------- the prompt (template, crop, interleave)
@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """A word tokenizer with LLaVA's `<image>` token, a tiny LLaVA (transformers) and KineFlow's encoders on its weights."""
    folder = write_word_tokenizer(tmp_path_factory.mktemp("tok"),
                                  [I2V_VIDEO_PROMPT_TEMPLATE.replace("<image>", ""), "a red circle moves left"] +
                                  ["word%d" % i for i in range(40)])
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(["<image>"])
    tok.save(str(folder / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    image_id, pad_id = tok.token_to_id("<image>"), tok.token_to_id("<pad>")
    vision = CLIPVisionConfig.tiny(projector_width=256)
    text = LlamaTextConfig(vocab_size=vocab, hidden_size=256, intermediate_size=256, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=1)
    ref = llava_reference(vision, text, image_id, pad_id)
    llama = LlamaTextEncoder(text).eval()
    llama.load_state_dict(_language_model(ref), strict=True)
    vision_model = LlavaVisionEncoder(vision).eval()
    vision_model.load_state_dict(convert_state_dict(ref.state_dict()), strict=True)
    torch.manual_seed(2)
    clip = CLIPTextModel(CLIPTextConfig.tiny(vocab_size=49408)).eval()
    encoder = HunyuanTextEncoder(llama, TextTokenizer(tok, pad_id, str(folder)), clip, clip_l_tokenizer(), text_length=24)
    return SimpleNamespace(folder=folder, tok=tok, ref=ref, encoder=encoder, vision=vision_model, image_id=image_id,
                           pad_id=pad_id)


def _diffusers_embeds(t, prompts, pixels, crop_start, image_at, interleave):
    """diffusers' HunyuanVideoImageToVideoPipeline._get_llama_prompt_embeds on the tiny LLaVA (its tokenizer, template
    crop and interleave; the image processor stands aside for the same pixels)."""
    pipeline = pytest.importorskip("diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video")
    from transformers import PreTrainedTokenizerFast

    n = t.vision.config.num_patches
    fake = SimpleNamespace(tokenizer=PreTrainedTokenizerFast(tokenizer_object=t.tok, pad_token="<pad>"),
                           text_encoder=t.ref, image_processor=lambda image, return_tensors: SimpleNamespace(pixel_values=pixels),
                           _execution_device=torch.device("cpu"))
    template = {"template": I2V_VIDEO_PROMPT_TEMPLATE, "crop_start": crop_start, "image_emb_start": image_at,
                "image_emb_end": image_at + n, "image_emb_len": n}
    with torch.inference_mode():
        return pipeline.HunyuanVideoImageToVideoPipeline._get_llama_prompt_embeds(
            fake, None, prompts, template, device=torch.device("cpu"), dtype=torch.float32, max_sequence_length=24,
            image_embed_interleave=interleave)


@pytest.mark.parametrize("interleave", [1, 2, 3])
@pytest.mark.parametrize("prompt", ["a red circle moves left", " ".join(f"word{i}" for i in range(40))])
def test_image_prompt_matches_diffusers_image_to_video_pipeline(tiny_llava, prompt, interleave):
    t = tiny_llava
    n = t.vision.config.num_patches
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    ids, mask, image_at, assistant, crop_start = t.encoder.image_prompt_ids([prompt])
    assert ids[0, image_at] == t.image_id and image_at == 4  # BOS, <|start_header_id|>, system, <|end_header_id|>
    truncated = len(prompt) > 100  # 40 words do not fit the 24 prompt tokens: the assistant header is cut off
    assert int(assistant[0]) == (ids.shape[1] if truncated else int(mask[0].sum()))
    with torch.inference_mode():
        tokens = t.vision(pixels)
        got = t.encoder.encode_with_image([prompt], tokens, interleave)
    expected, expected_mask = _diffusers_embeds(t, [prompt], pixels, crop_start, image_at, interleave)
    kept = math.ceil(n / interleave)
    assert got["text_states"].shape == expected.shape == (1, kept + 24 - 4, 256)
    assert torch.equal(got["text_mask"], expected_mask.long())
    real = expected_mask.bool()  # padded positions are masked for the DiT (and get other RoPE positions in diffusers)
    error = (got["text_states"][real] - expected[real]).abs().max().item()
    assert error <= 1e-5, error
    assert got["text_states_2"].shape == (1, 128)


def test_interleave_keeps_every_nth_image_token_in_front_of_the_same_text(tiny_llava):
    t = tiny_llava
    tokens = torch.randn(1, t.vision.config.num_patches, 256, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        full = t.encoder.encode_with_image(["a red circle"], tokens, 1)
        other_image = t.encoder.encode_with_image(["a red circle"], tokens.flip(1), 1)
        kept = {k: t.encoder.encode_with_image(["a red circle"], tokens, k) for k in (2, 3, 4, 5)}
    n = tokens.shape[1]
    for k, out in kept.items():
        assert torch.equal(out["text_states"][:, :math.ceil(n / k)], full["text_states"][:, :n:k])
        assert torch.equal(out["text_states"][:, math.ceil(n / k):], full["text_states"][:, n:])
        assert torch.equal(out["text_mask"][:, math.ceil(n / k):], full["text_mask"][:, n:])
        assert out["text_mask"][:, :math.ceil(n / k)].eq(1).all()
    # The text tokens read the image (they come after it in LLaMA's causal attention).
    assert (other_image["text_states"][:, n:] - full["text_states"][:, n:]).abs().max() > 1e-3
    # A batch of prompts shares the image.
    with torch.inference_mode():
        batch = t.encoder.encode_with_image(["a red circle", "moves left"], tokens, 2)
    assert torch.allclose(batch["text_states"][:1], kept[2]["text_states"], atol=1e-5)


def test_image_prompt_refusals(tiny_llava):
    t = tiny_llava
    tokens = torch.randn(1, 4, 256)
    with pytest.raises(KineFlowError, match="128"):
        t.encoder.encode_with_image(["x"], torch.randn(1, 4, 128), 2)  # a projector for another LLaMA width
    with pytest.raises(KineFlowError, match="image_interleave"):
        t.encoder.encode_with_image(["x"], tokens, 0)
    plain = Tokenizer.from_file(str(write_word_tokenizer(t.folder.parent / "plain", ["x"]) / "tokenizer.json"))
    no_image = HunyuanTextEncoder(t.encoder.llama, TextTokenizer(plain, 0), t.encoder.clip, clip_l_tokenizer())
    with pytest.raises(KineFlowError, match=r"no '<image>' token.*LLaVA-LLaMA-3's tokenizer"):
        no_image.encode_with_image(["x"], tokens, 2)


# --------------------------------------------------------------------------- files: layouts, detection, errors
def _tiny_vision_sd(projector_width: int = 256, seed: int = 5) -> dict:
    torch.manual_seed(seed)
    model = LlavaVisionEncoder(CLIPVisionConfig.tiny(projector_width))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _write_layouts(root: Path, sd: dict) -> dict[str, Path]:
    """The tiny encoder as ComfyUI's llava_llama3_vision file, transformers 4.x's LLaVA file (with a language model)
    and a transformers 5 LLaVA folder."""
    paths = {}
    comfy = dict(sd, **{"vision_model.embeddings.position_ids": torch.arange(5)[None]})
    paths["comfy"] = root / "llava_llama3_vision.safetensors"
    save_file(comfy, str(paths["comfy"]))
    legacy = {("vision_tower." + k if k.startswith("vision_model.") else k): v for k, v in sd.items()}
    legacy["language_model.model.embed_tokens.weight"] = torch.zeros(8, 256)
    legacy["language_model.model.layers.0.self_attn.q_proj.weight"] = torch.zeros(256, 256)
    legacy["language_model.model.layers.0.mlp.gate_proj.weight"] = torch.zeros(16, 256)
    paths["legacy"] = root / "llava_transformers4.safetensors"
    save_file(legacy, str(paths["legacy"]))
    folder = root / "llava_transformers5"
    folder.mkdir()
    bare = {("model.vision_tower." + k[len("vision_model."):] if k.startswith("vision_model.") else "model." + k): v
            for k, v in sd.items()}
    bare["model.language_model.embed_tokens.weight"] = torch.zeros(8, 256)
    save_file(bare, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"]}))
    paths["folder"] = folder
    return paths


def test_published_layouts_are_detected_and_load_to_the_same_encoder(tmp_path):
    sd = _tiny_vision_sd()
    reference = LlavaVisionEncoder(CLIPVisionConfig.tiny()).eval()
    reference.load_state_dict(sd)
    image = torch.rand(1, 40, 30, 3)
    with torch.inference_mode():
        expected = reference(preprocess(image, 28))
    from kineflow.runtime.video_models import load_clip_vision

    layouts = {"comfy": ("hf", ""), "legacy": ("hf", "vision_tower."), "folder": ("hf_bare", "model.vision_tower.")}
    for name, path in _write_layouts(tmp_path, sd).items():
        det = checkpoints.detect(checkpoints.read_header(path))
        assert (det.family, det.version, (det.layout, det.prefix)) == ("clip_vision", "llava", layouts[name])
        assert "LLaVA's projector to 256" in det.note
        with host.configured(device="cpu"):
            handle = load_clip_vision(str(path), "fp32")
            assert torch.equal(handle.encode(image), expected), name


def test_a_plain_clip_vision_model_and_other_files_are_refused_clearly(tmp_path):
    from kineflow.runtime.video_models import load_clip_vision

    sd = {k: v for k, v in _tiny_vision_sd().items() if not k.startswith("multi_modal_projector.")}
    sd["visual_projection.weight"] = torch.zeros(32, 128)
    plain = tmp_path / "clip_vision_h.safetensors"
    save_file(sd, str(plain))
    det = checkpoints.detect(checkpoints.read_header(plain))
    assert det.family is None and "without LLaVA's multimodal projector" in det.note
    with pytest.raises(ModelFileError, match=r"without LLaVA's multimodal projector.*expects a LLaVA CLIP vision"):
        load_clip_vision(str(plain), "fp32")
    with pytest.raises(ModelFileError, match="plain CLIP image encoder"):
        convert_state_dict(sd)
    llm = tmp_path / "llm.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(8, 256), "model.layers.0.self_attn.q_proj.weight":
               torch.zeros(256, 256), "model.layers.0.mlp.gate_proj.weight": torch.zeros(16, 256)}, str(llm))
    with pytest.raises(ModelFileError, match=r"is a llama_text.*expects a LLaVA CLIP vision encoder.*Load Text Encoders"):
        load_clip_vision(str(llm), "fp32")


def test_full_size_model_matches_the_manifest_of_the_released_keys():
    manifest = json.loads(MANIFEST.read_text())
    with torch.device("meta"):
        model = LlavaVisionEncoder(CLIPVisionConfig.full())
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    released = convert_state_dict({k: torch.empty(v["shape"], device="meta") for k, v in manifest["tensors"].items()})
    assert {k: list(v.shape) for k, v in released.items()} == shapes
    assert sum(math.prod(s) for s in shapes.values()) == manifest["num_params"]
    det = checkpoints.detect({k: tuple(v["shape"]) for k, v in manifest["tensors"].items()})
    assert (det.family, det.layout, det.version, det.prefix) == ("clip_vision", "hf", "llava", "vision_tower.")
    assert config_from_state_dict(released) == CLIPVisionConfig.full()
    assert CLIPVisionConfig.full().image_tokens == 576


# --------------------------------------------------------------------------- through the nodes
@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """The tiny random HunyuanVideo models, their LLaMA tokenizer given LLaVA's `<image>`, and a tiny LLaVA vision
    file in ComfyUI's layout whose projector gives the tiny LLaMA's width."""
    root = tmp_path_factory.mktemp("i2v_llava")
    paths = write_models(root, texts=["a red circle moves to the left on a blue background"], seed=0)
    tokenizer = root / "text_encoders" / "kineflow_random_llm" / "tokenizer.json"
    tok = Tokenizer.from_file(str(tokenizer))
    tok.add_special_tokens(["<image>"])
    tok.save(str(tokenizer))
    width = checkpoints.read_header(paths["dit"]).shapes()["txt_in.input_embedder.weight"][1]
    (root / "clip_vision").mkdir()
    save_file(_tiny_vision_sd(width), str(root / "clip_vision" / "llava_llama3_vision.safetensors"))
    return root


def _workflow(colour="red", interleave=2):
    from kineflow.nodes.synthetic import KineFlowShapesVideo

    shapes = {k: v[1]["default"] for k, v in KineFlowShapesVideo.INPUT_TYPES()["required"].items()}
    shapes.update(width=64, height=48, frames=1, colour=colour)
    return {
        "1": {"class_type": "KineFlowLoadVideoModel", "inputs": {"model_name": "kineflow_random_dit.safetensors",
                                                                 "weight_dtype": "fp32", "fp8": "disabled"}},
        "2": {"class_type": "KineFlowLoadVideoVAE", "inputs": {"vae_name": "kineflow_random_vae.safetensors", "dtype": "fp32"}},
        "3": {"class_type": "KineFlowLoadTextEncoders", "inputs": {
            "llm_name": "kineflow_random_llm", "clip_name": "kineflow_random_clip.safetensors", "dtype": "fp32",
            "llm_tokenizer": "", "crop_start": -1}},
        "4": {"class_type": "KineFlowLoadCLIPVision", "inputs": {"clip_name": "llava_llama3_vision.safetensors",
                                                                 "dtype": "fp32"}},
        "5": {"class_type": "KineFlowShapesVideo", "inputs": shapes},
        "6": {"class_type": "KineFlowTextEncodeImageToVideo", "inputs": {
            "text_encoder": ["3", 0], "clip_vision": ["4", 0], "image": ["5", 0], "prompt": "a red circle",
            "negative_prompt": "blurry", "image_interleave": interleave}},
        "7": {"class_type": "KineFlowImageToVideo", "inputs": {
            "conditioning": ["6", 0], "vae": ["2", 0], "image": ["5", 0], "width": 32, "height": 32, "frames": 5,
            "batch_size": 1, "mode": "token_replace"}},
        "8": {"class_type": "KineFlowSampler", "inputs": {
            "model": ["1", 0], "conditioning": ["7", 0], "latent": ["7", 1], "seed": 3, "steps": 2, "cfg": 2.0,
            "shift": 7.0, "embedded_guidance": 6.0, "sampler_name": "euler", "scheduler": "default", "denoise": 1.0}},
        "9": {"class_type": "KineFlowVAEDecode", "inputs": {"vae": ["2", 0], "latent": ["8", 0], "tiling": "disabled",
                                                             "tile_size": 256, "tile_overlap": 64, "tile_frames": 16,
                                                             "frame_overlap": 4}},
        "10": {"class_type": "KineFlowSaveVideo", "inputs": {"images": ["9", 0], "frame_rate": 8.0,
                                                              "filename_prefix": "i2v_llava", "format": "mp4",
                                                              "quality": 80, "loop_count": 0, "save_metadata": False}},
    }


def test_text_encode_image_to_video_runs_through_the_nodes(models_dir, tmp_path):
    cache = OutputCache()
    results = run_workflow(_workflow(), models_dir=models_dir, output_dir=tmp_path, cache=cache)
    conditioning = results["6"]["outputs"][0]
    positive = conditioning["positive"]
    # 2 x 2 patches, every second kept: 2 image tokens, then the 256 - 4 text tokens of the I2V crop.
    assert positive["text_states"].shape == (1, 2 + 252, 128) and positive["text_mask"][0, :2].eq(1).all()
    assert conditioning["negative"]["text_states"].shape == positive["text_states"].shape
    assert results["9"]["outputs"][0].shape == (5, 32, 32, 3)
    # Another first frame: other image tokens, and the text read after them changes too.
    green = run_workflow(_workflow("green"), models_dir=models_dir, output_dir=tmp_path, cache=cache)
    other = green["6"]["outputs"][0]["positive"]["text_states"]
    assert (other[:, :2] - positive["text_states"][:, :2]).abs().max() > 1e-4
    assert (other[:, 2:] - positive["text_states"][:, 2:]).abs().max() > 1e-6
    assert not torch.equal(green["8"]["outputs"][0]["samples"], results["8"]["outputs"][0]["samples"])
    every = run_workflow(_workflow(interleave=1), models_dir=models_dir, output_dir=tmp_path, cache=cache)
    assert every["6"]["outputs"][0]["positive"]["text_states"].shape == (1, 4 + 252, 128)


def test_text_encode_image_to_video_runs_on_the_compute_device(models_dir, tmp_path):
    prompt = _workflow()
    out_dir = tmp_path / "out"
    with host.configured(device="meta", models_dir=models_dir, output_dir=out_dir), one_device() as mode:
        results = run_workflow(prompt, cache=OutputCache(), output_dir=out_dir, models_dir=models_dir)
    assert mode.ops_on.get("meta", 0) > 100
    states = results["6"]["outputs"][0]["positive"]["text_states"]
    assert states.is_meta and states.shape == (1, 2 + 252, 128)
    assert results["8"]["outputs"][0]["samples"].is_meta
    assert not out_dir.exists(), "a dry run must not write"
