"""Load LoRA for the HunyuanVideo transformer: kohya / musubi-tuner, diffusers / PEFT (split q/k/v and the single
blocks' proj_mlp onto the fused layers) and ComfyUI-style files, written here for the shipped tiny transformer."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kineflow.errors import KineFlowError, ModelFileError
from kineflow.models.checkpoints import inspect_file
from kineflow.runtime import cli, host
from kineflow.runtime.lora import apply_lora
from kineflow.runtime.video_models import load_video_model
from kineflow.training.tiny_models import comfy_dit_names

HIDDEN, MLP = 128, 512  # the shipped tiny transformer
RANK, ALPHA = 4, 2.0
WORKFLOW = Path(__file__).resolve().parent.parent / "workflows" / "api" / "text_to_video.json"


def _pair(out: int, inp: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(RANK, inp, generator=g) * 0.1, torch.randn(out, RANK, generator=g) * 0.1


# Diffusers module -> (original module, rows of the fused layer it updates, input width)
DIFFUSERS_TARGETS = {
    "transformer_blocks.0.attn.to_q": ("double_blocks.0.img_attn_qkv", slice(0, HIDDEN), HIDDEN),
    "transformer_blocks.0.attn.to_k": ("double_blocks.0.img_attn_qkv", slice(HIDDEN, 2 * HIDDEN), HIDDEN),
    "transformer_blocks.0.attn.to_v": ("double_blocks.0.img_attn_qkv", slice(2 * HIDDEN, 3 * HIDDEN), HIDDEN),
    "transformer_blocks.1.attn.add_k_proj": ("double_blocks.1.txt_attn_qkv", slice(HIDDEN, 2 * HIDDEN), HIDDEN),
    "transformer_blocks.2.ff.net.0.proj": ("double_blocks.2.img_mlp.fc1", slice(0, MLP), HIDDEN),
    "single_transformer_blocks.0.attn.to_q": ("single_blocks.0.linear1", slice(0, HIDDEN), HIDDEN),
    "single_transformer_blocks.0.proj_mlp": ("single_blocks.0.linear1", slice(3 * HIDDEN, 3 * HIDDEN + MLP), HIDDEN),
    "single_transformer_blocks.1.proj_out": ("single_blocks.1.linear2", slice(0, HIDDEN), HIDDEN + MLP),
}


def _diffusers_lora(prefix: str = "transformer.") -> dict:
    tensors = {}
    for i, (name, (_, rows, inp)) in enumerate(DIFFUSERS_TARGETS.items()):
        down, up = _pair(rows.stop - rows.start, inp, i)
        tensors[f"{prefix}{name}.lora_A.weight"] = down
        tensors[f"{prefix}{name}.lora_B.weight"] = up
        tensors[f"{prefix}{name}.alpha"] = torch.tensor(ALPHA)
    return tensors


def _expected_deltas() -> dict[str, torch.Tensor]:
    """What the diffusers LoRA adds to each original weight (alpha / rank included)."""
    deltas = {}
    for i, (name, (target, rows, inp)) in enumerate(DIFFUSERS_TARGETS.items()):
        down, up = _pair(rows.stop - rows.start, inp, i)
        out = 3 * HIDDEN + MLP if target.endswith("linear1") else 3 * HIDDEN if target.endswith("qkv") else rows.stop
        delta = deltas.setdefault(target, torch.zeros(out, inp))
        delta[rows] += up @ down * (ALPHA / RANK)
    return deltas


def _fused_lora(style: str) -> dict:
    """The same updates as one pair per original layer, in kohya or ComfyUI-style names."""
    tensors = {}
    for target, delta in _expected_deltas().items():
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        rank = int((s > 1e-6 * s[0]).sum())
        up, down = (u[:, :rank] * s[:rank]).float().contiguous(), vh[:rank].float().contiguous()
        if style == "kohya":
            base = "lora_unet_" + target.replace(".", "_")
            tensors.update({f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up,
                            f"{base}.alpha": torch.tensor(float(rank))})
        else:
            (comfy,) = comfy_dit_names({target + ".weight": None})
            base = "diffusion_model." + comfy.removesuffix(".weight")
            tensors.update({f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up})
    return tensors


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    (root / "loras").mkdir()
    save_file(_diffusers_lora(), str(root / "loras" / "diffusers.safetensors"))
    save_file(_fused_lora("kohya"), str(root / "loras" / "kohya.safetensors"))
    save_file(_fused_lora("comfy"), str(root / "loras" / "comfy.safetensors"))
    with host.configured(models_dir=root):
        yield root


@pytest.fixture(scope="module")
def base():
    return load_video_model("kineflow_tiny_dit.safetensors", "fp32")  # exact sums: not the CPU's auto dtype


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([500.0]), torch.randn(1, 7, 128, generator=g),
            torch.ones(1, 7, dtype=torch.long), torch.randn(1, 64, generator=g), torch.tensor([6000.0]))


def test_diffusers_lora_with_split_qkv_updates_the_fused_layers(models_dir, base):
    before = {k: v.clone() for k, v in base.net.state_dict().items()}
    patched = apply_lora(base, "diffusers.safetensors", 0.5)
    after = patched.net.state_dict()
    deltas = _expected_deltas()
    for key, value in before.items():
        target = key.removesuffix(".weight")
        expected = value + 0.5 * deltas[target] if target in deltas and key.endswith(".weight") else value
        torch.testing.assert_close(after[key], expected, rtol=0, atol=1e-6, msg=key)
    for key, value in base.net.state_dict().items():  # the input model is left as it was
        assert torch.equal(value, before[key]), key


def test_every_format_gives_the_same_model(models_dir, base):
    outputs = []
    for name in ("diffusers", "kohya", "comfy"):
        with torch.inference_mode():
            outputs.append(apply_lora(base, f"{name}.safetensors", 1.0).net(*_inputs()))
    with torch.inference_mode():
        plain = base.net(*_inputs())
    assert (outputs[0] - plain).abs().max() > 1e-3  # the LoRA changes the output
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], rtol=1e-4, atol=1e-5)


def test_block_strengths_scale_named_blocks(models_dir, base):
    patched = apply_lora(base, "kohya.safetensors", 1.0, "single_blocks=0, double_blocks.0=2")
    before, after = base.net.state_dict(), patched.net.state_dict()
    assert torch.equal(after["single_blocks.0.linear1.weight"], before["single_blocks.0.linear1.weight"])
    torch.testing.assert_close(after["double_blocks.0.img_attn_qkv.weight"] - before["double_blocks.0.img_attn_qkv.weight"],
                               2 * _expected_deltas()["double_blocks.0.img_attn_qkv"], rtol=1e-4, atol=1e-5)
    with pytest.raises(KineFlowError, match="block strength 'triple_blocks=1' is not understood"):
        apply_lora(base, "kohya.safetensors", 1.0, "triple_blocks=1")


def test_lora_on_an_fp8_transformer_runs_beside_the_fp8_weights(models_dir, base):
    fp8 = load_video_model("kineflow_tiny_dit.safetensors", "fp32", fp8=True, offload="blocks", resident_blocks=1)
    patched = apply_lora(fp8, "kohya.safetensors", 1.0)
    qkv = patched.net.get_submodule("double_blocks.0.img_attn_qkv")
    assert qkv.weight.dtype == torch.float8_e4m3fn and len(qkv.loras) == 1
    # The same fp8 weights with the update merged in float: what the on-the-fly LoRA must equal.
    reference = load_video_model("kineflow_tiny_dit.safetensors", "fp32", fp8=True)
    for target, delta in _expected_deltas().items():
        layer = reference.net.get_submodule(target)
        layer.weight = torch.nn.Parameter(layer.weight.float() + delta, requires_grad=False)
        layer.forward = torch.nn.Linear.forward.__get__(layer)
    with patched.running(), torch.inference_mode():
        out = patched.net(*_inputs())
    with torch.inference_mode():
        expected = reference.net(*_inputs())
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_inspect_names_family_format_rank_and_targets(models_dir):
    report = inspect_file(models_dir / "loras" / "diffusers.safetensors")
    assert (report["family"], report["layout"], report["version"]) == ("hunyuan_video_lora", "diffusers", f"rank {RANK}")
    assert "targets 8 layers" in report["note"]
    assert inspect_file(models_dir / "loras" / "kohya.safetensors")["layout"] == "kohya"
    assert inspect_file(models_dir / "loras" / "comfy.safetensors")["layout"] == "comfy"


def test_a_lora_for_another_model_is_a_clear_error(models_dir, base, tmp_path):
    tensors = _fused_lora("kohya")
    down, up = _pair(64, 64, 99)
    tensors.update({"lora_unet_double_blocks_9_img_attn_qkv.lora_down.weight": down,
                    "lora_unet_double_blocks_9_img_attn_qkv.lora_up.weight": up})
    save_file(tensors, str(models_dir / "loras" / "other.safetensors"))
    with pytest.raises(ModelFileError, match=r"'other.safetensors': 1 of its \d+ LoRA layers match no layer.*double_blocks_9"):
        apply_lora(base, "other.safetensors", 1.0)


def test_load_lora_node_in_a_workflow(models_dir, tmp_path):
    prompt = json.loads(WORKFLOW.read_text())
    sampler = next(k for k, v in prompt.items() if v["class_type"] == "KineFlowSampler")
    loader = next(k for k, v in prompt.items() if v["class_type"] == "KineFlowLoadVideoModel")
    prompt["90"] = {"class_type": "KineFlowLoadLoRA",
                    "inputs": {"model": [loader, 0], "lora_name": "kohya.safetensors", "strength": 1.0}}
    prompt[sampler]["inputs"]["model"] = ["90", 0]
    path = tmp_path / "with_lora.json"
    path.write_text(json.dumps(prompt))
    assert cli.main(["run", str(path), "--models-dir", str(models_dir), "--output-dir", str(tmp_path / "out")]) == 0
    assert len(list((tmp_path / "out").rglob("*.mp4"))) == 1
    prompt["90"]["inputs"]["lora_name"] = "missing.safetensors"
    path.write_text(json.dumps(prompt))
    assert cli.main(["run", str(path), "--models-dir", str(models_dir), "--output-dir", str(tmp_path / "out2")]) == 2
    prompt["90"]["inputs"].update(lora_name="kohya.safetensors", block_strengths="double_blocks=x")
    path.write_text(json.dumps(prompt))
    assert cli.main(["run", str(path), "--models-dir", str(models_dir), "--output-dir", str(tmp_path / "out3")]) == 2
    assert not (tmp_path / "out3").exists() or not any((tmp_path / "out3").rglob("*.mp4"))
