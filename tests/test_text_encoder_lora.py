"""Load LoRA on HunyuanVideo's text encoders: files carrying LLaMA / CLIP-L LoRA layers in the kohya (ComfyUI's and
OneTrainer's numbering), diffusers / PEFT, ComfyUI generic and OneTrainer OMI layouts, for the shipped tiny encoders.

The reference is transformers' LlamaModel and CLIPTextModel holding the same weights with each update merged by hand
(W + strength * up @ down * alpha / rank), run through HunyuanVideo's template, skipped layer, crop and pooling."""

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kineflow.errors import KineFlowError, ModelFileError
from kineflow.models import clip_text, llama_text
from kineflow.models import lora as lora_mod
from kineflow.models.checkpoints import inspect_file
from kineflow.nodes.lora import KineFlowLoadLoRA
from kineflow.runtime import cli, generation, host
from kineflow.runtime.lora import apply_lora, load_lora
from kineflow.runtime.video_models import load_text_encoders, load_video_model
from kineflow.shapes.shipped import HUNYUAN_VIDEO

RANK, ALPHA = 4, 2.0
PROMPTS = ["a red circle moves left", "blue square"]
WORKFLOW = Path(__file__).resolve().parent.parent / "workflows" / "api" / "text_to_video.json"
# (encoder, internal module): the shipped LLaMA runs layers 0-1 for its skipped-layer state (4 layers, skip 2), so
# the LoRA on layer 3 is matched and merged but cannot show in the conditioning.
TARGETS = [("llama", "model.layers.0.self_attn.q_proj"), ("llama", "model.layers.1.self_attn.v_proj"),
           ("llama", "model.layers.1.mlp.down_proj"), ("llama", "model.layers.3.mlp.gate_proj"),
           ("clip", "text_model.encoder.layers.0.self_attn.k_proj"),
           ("clip", "text_model.encoder.layers.0.self_attn.out_proj"), ("clip", "text_model.encoder.layers.0.mlp.fc1")]


def _module_name(layout: str, encoder: str, module: str) -> str:
    """The module's name in a LoRA file of `layout`."""
    bare = module.removeprefix("model.")  # diffusers' LlamaModel has no `model.` level
    names = {
        "kohya_onetrainer": {"llama": "lora_te1_" + bare.replace(".", "_"), "clip": "lora_te2_" + module.replace(".", "_")},
        "kohya_comfy": {"llama": "lora_te_" + module.replace(".", "_"), "clip": "lora_te1_" + module.replace(".", "_")},
        "diffusers": {"llama": "text_encoder." + bare, "clip": "text_encoder_2." + module},
        "comfy": {"llama": "text_encoders.llama.transformer." + module,
                  "clip": "text_encoders.clip_l.transformer." + module},
        "omi": {"llama": "llama.language_model." + module, "clip": "clip_l." + module},
    }
    return names[layout][encoder]


LAYOUTS = ["kohya_onetrainer", "kohya_comfy", "diffusers", "comfy", "omi"]


def _pairs(encoders) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    pairs = {}
    for encoder, module in TARGETS:
        out, inp = encoders[encoder].get_submodule(module).weight.shape
        pairs[encoder, module] = (torch.randn(RANK, inp, generator=g) * 0.2, torch.randn(out, RANK, generator=g) * 0.2)
    return pairs


def _lora_file(layout: str, pairs) -> dict[str, torch.Tensor]:
    tensors = {}
    for (encoder, module), (down, up) in pairs.items():
        base = _module_name(layout, encoder, module)
        if layout == "comfy":  # no alpha: the file's up carries alpha / rank
            tensors.update({f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up * (ALPHA / RANK)})
        elif layout == "diffusers":
            tensors.update({f"{base}.lora_A.weight": down, f"{base}.lora_B.weight": up, f"{base}.alpha": torch.tensor(ALPHA)})
        else:
            tensors.update({f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up,
                            f"{base}.alpha": torch.tensor(ALPHA)})
    return tensors


@pytest.fixture(scope="module")
def base():
    return load_text_encoders(HUNYUAN_VIDEO["llm"], HUNYUAN_VIDEO["clip"], dtype_name="fp32")


@pytest.fixture(scope="module")
def dit():
    return load_video_model(HUNYUAN_VIDEO["dit"], "fp32")


@pytest.fixture(scope="module")
def pairs(base):
    return _pairs({"llama": base.encoder.llama, "clip": base.encoder.clip})


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, pairs):
    root = tmp_path_factory.mktemp("te_lora")
    (root / "loras").mkdir()
    for layout in LAYOUTS:
        save_file(_lora_file(layout, pairs), str(root / "loras" / f"{layout}.safetensors"))
    g = torch.Generator().manual_seed(1)
    mixed = {**_lora_file("kohya_onetrainer", pairs),  # a transformer layer too
             "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(RANK, 128, generator=g) * 0.1,
             "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(128, RANK, generator=g) * 0.1}
    save_file(mixed, str(root / "loras" / "mixed.safetensors"))
    with host.configured(models_dir=root):
        yield root


def _hf_encoders(base, pairs, strength: float):
    """transformers' LlamaModel / CLIPTextModel with the shipped weights and the LoRA merged by hand."""
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    llama, clip = base.encoder.llama, base.encoder.clip
    lc, cc = llama.config, clip.config
    hf_llama = LlamaModel(LlamaConfig(
        vocab_size=lc.vocab_size, hidden_size=lc.hidden_size, intermediate_size=lc.intermediate_size,
        num_hidden_layers=lc.num_hidden_layers, num_attention_heads=lc.num_attention_heads,
        num_key_value_heads=lc.num_key_value_heads, rope_theta=lc.rope_theta, rms_norm_eps=lc.rms_norm_eps,
        max_position_embeddings=512, attention_bias=False, mlp_bias=False)).eval()
    assert cc.eos_token_id is None  # pooled at the highest id: transformers does so when its eos_token_id is 2
    hf_clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=cc.vocab_size, hidden_size=cc.hidden_size, intermediate_size=cc.intermediate_size,
        num_hidden_layers=cc.num_hidden_layers, num_attention_heads=cc.num_attention_heads,
        max_position_embeddings=cc.max_position_embeddings, hidden_act=cc.hidden_act, layer_norm_eps=cc.layer_norm_eps,
        bos_token_id=0, pad_token_id=1, eos_token_id=2)).eval()
    for hf, ours, module in ((hf_llama, llama, llama_text), (hf_clip, clip, clip_text)):
        weights = {k: v.detach().clone().float() for k, v in ours.state_dict().items()}
        for (encoder, name), (down, up) in pairs.items():
            if ours is (llama if encoder == "llama" else clip):
                weights[name + ".weight"] += strength * (up @ down) * (ALPHA / RANK)
        hf_names = module.convert_state_dict({k: k for k in hf.state_dict()})  # internal name -> transformers'
        missing, unexpected = hf.load_state_dict({hf_names[k]: v for k, v in weights.items()}, strict=False)
        assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return hf_llama, hf_clip


def _reference(base, pairs, strength: float) -> dict[str, torch.Tensor]:
    enc = base.encoder
    hf_llama, hf_clip = _hf_encoders(base, pairs, strength)
    ids, mask = enc.llama_tokenizer.encode([enc.template.replace("{}", p) for p in PROMPTS], enc.max_length)
    clip_ids, clip_mask = enc.clip_tokenizer.encode(PROMPTS, enc.clip_length)
    with torch.no_grad():
        states = hf_llama(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        pooled = hf_clip(input_ids=clip_ids, attention_mask=clip_mask).pooler_output
    return {"text_states": states[-(enc.hidden_state_skip_layer + 1)][:, enc.crop_start:],
            "text_mask": mask[:, enc.crop_start:], "text_states_2": pooled}


def _assert_matches(out: dict, expected: dict):
    assert torch.equal(out["text_mask"], expected["text_mask"])
    for key in ("text_states", "text_states_2"):
        assert (out[key] - expected[key]).abs().max() <= 1e-4, key


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_matches_transformers_with_the_lora_merged_by_hand(models_dir, base, dit, pairs, layout):
    before = {k: v.clone() for k, v in base.encoder.state_dict().items()}
    plain = base.encode(PROMPTS)
    model, patched = load_lora(dit, base, f"{layout}.safetensors", 1.0)
    assert model is dit  # no transformer layers in the file: the model is passed through
    out = patched.encode(PROMPTS)
    _assert_matches(out, _reference(base, pairs, 1.0))
    assert (out["text_states"] - plain["text_states"]).abs().max() > 1e-3  # both encoders changed
    assert (out["text_states_2"] - plain["text_states_2"]).abs().max() > 1e-3
    assert patched.encoder.llama_tokenizer is base.encoder.llama_tokenizer and patched.vocabulary == base.vocabulary
    for key, value in base.encoder.state_dict().items():  # the input handle is left as it was
        assert torch.equal(value, before[key]), key
    assert base.encoder.llama is not patched.encoder.llama and base.encoder.clip is not patched.encoder.clip
    for key, value in base.encode(PROMPTS).items():
        assert torch.equal(value, plain[key]), key


def test_strength_scales_the_update_and_zero_is_the_input(models_dir, base, dit, pairs):
    _, half = load_lora(dit, base, "diffusers.safetensors", 0.5)
    _assert_matches(half.encode(PROMPTS), _reference(base, pairs, 0.5))
    model, same = load_lora(dit, base, "mixed.safetensors", 0.0)
    assert model is dit and same is base
    plain = base.encode(PROMPTS)
    for key, value in same.encode(PROMPTS).items():
        assert torch.equal(value, plain[key]), key


def test_a_file_with_both_patches_both_and_a_model_only_chain_warns(models_dir, base, dit, pairs, caplog):
    with caplog.at_level(logging.WARNING, logger="kineflow.runtime.lora"):  # text encoders connected: no warning
        model, patched = load_lora(dit, base, "mixed.safetensors", 1.0)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    layer = "double_blocks.0.img_attn_proj.weight"
    assert not torch.equal(model.net.state_dict()[layer], dit.net.state_dict()[layer])
    _assert_matches(patched.encode(PROMPTS), _reference(base, pairs, 1.0))
    assert model.recipe.loras[-1][0].endswith("mixed.safetensors")
    with caplog.at_level(logging.WARNING, logger="kineflow.runtime.lora"):
        alone, none = load_lora(dit, None, "mixed.safetensors", 1.0)
    assert none is None
    assert torch.equal(alone.net.state_dict()[layer], model.net.state_dict()[layer])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"skipped its {len(TARGETS)} text-encoder layers" in w and "text_encoders input" in w for w in warnings)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kineflow.runtime.lora"):  # replaying a recipe (workers) is quiet
        apply_lora(dit, "mixed.safetensors", 1.0)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_foreign_text_encoder_layers_are_clear_errors(models_dir, base, dit):
    g = torch.Generator().manual_seed(2)
    t5 = {"lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.randn(RANK, 64, generator=g),
          "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.randn(64, RANK, generator=g)}
    save_file({**_lora_file("kohya_comfy", _pairs({"llama": base.encoder.llama, "clip": base.encoder.clip})), **t5},
              str(models_dir / "loras" / "t5.safetensors"))
    with pytest.raises(ModelFileError, match=r"'t5.safetensors': 1 of its 8 text-encoder LoRA layers match no layer "
                                             r"of the LLaMA or CLIP-L.*lora_te3_encoder_block_0"):
        load_lora(dit, base, "t5.safetensors", 1.0)
    clip_g = {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(RANK, 1280),
              "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(1280, RANK)}
    save_file(clip_g, str(models_dir / "loras" / "clip_g.safetensors"))
    with pytest.raises(ModelFileError, match=r"is \[1280, 1280\] \(\[out, in\]\); the CLIP-L layer "
                                             r"'text_model.encoder.layers.0.self_attn.q_proj' is \[64, 64\]"):
        load_lora(dit, base, "clip_g.safetensors", 1.0)
    with pytest.raises(KineFlowError, match="text_encoders input takes HunyuanVideo's text encoders"):
        load_lora(dit, dit, "diffusers.safetensors", 1.0)


def test_inspect_and_detection_name_the_text_encoder_targets(models_dir):
    for layout, fmt in (("kohya_onetrainer", "kohya"), ("diffusers", "diffusers"), ("comfy", "comfy")):
        report = inspect_file(models_dir / "loras" / f"{layout}.safetensors")
        assert (report["family"], report["layout"], report["version"]) == ("hunyuan_video_lora", fmt, f"rank {RANK}")
        assert report["note"] == "targets 0 layers and text-encoder layers: 4 LLaMA, 3 CLIP-L"
    assert inspect_file(models_dir / "loras" / "mixed.safetensors")["note"] == (
        "targets 1 layers and text-encoder layers: 4 LLaMA, 3 CLIP-L")
    # An SD1.5 LoRA (UNet and CLIP layers) is not one.
    assert not lora_mod.is_hunyuan_video_lora(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
                                               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"])


def test_load_lora_node_feeds_the_text_encoders_in_a_workflow(models_dir, base, dit, tmp_path):
    spec = KineFlowLoadLoRA.INPUT_TYPES()
    assert spec["optional"]["text_encoders"][0] == "KINEFLOW_TEXT_ENCODER"
    assert KineFlowLoadLoRA.RETURN_TYPES == ("KINEFLOW_VIDEO_MODEL", "KINEFLOW_TEXT_ENCODER")
    model, patched = KineFlowLoadLoRA().apply(dit, "omi.safetensors", 1.0, text_encoders=base)
    assert model is dit and patched is not base
    assert KineFlowLoadLoRA().apply(dit, "omi.safetensors", 1.0) == (dit, None)
    with pytest.raises(KineFlowError, match="text_encoder output carries text encoders only when its text_encoders "):
        generation.encode_prompts(None, "a red circle")  # that empty output wired to Text Encode

    prompt = json.loads(WORKFLOW.read_text())
    loader = next(k for k, v in prompt.items() if v["class_type"] == "KineFlowLoadVideoModel")
    texts = next(k for k, v in prompt.items() if v["class_type"] == "KineFlowLoadTextEncoders")
    prompt["90"] = {"class_type": "KineFlowLoadLoRA", "inputs": {
        "model": [loader, 0], "lora_name": "mixed.safetensors", "strength": 1.0, "text_encoders": [texts, 0]}}
    for node in prompt.values():
        if node["class_type"] != "KineFlowLoadLoRA":
            for name, value in node["inputs"].items():
                if value == [loader, 0]:
                    node["inputs"][name] = ["90", 0]
                elif value == [texts, 0]:
                    node["inputs"][name] = ["90", 1]
    path = tmp_path / "with_lora.json"
    path.write_text(json.dumps(prompt))
    assert cli.main(["run", str(path), "--models-dir", str(models_dir), "--output-dir", str(tmp_path / "out")]) == 0
    assert len(list((tmp_path / "out").rglob("*.mp4"))) == 1
