"""fp8 checkpoints: ComfyUI's scaled fp8 (fp8 weights + a `scale_weight` per layer + a `scaled_fp8` marker) and plain
fp8 files, written here from the shipped tiny models in the real key layouts, load through the normal loaders."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kineflow.errors import ModelFileError
from kineflow.models.checkpoints import inspect_file
from kineflow.runtime import cli, host
from kineflow.runtime.video_models import load_text_tower, load_video_model
from kineflow.training.tiny_models import comfy_dit_names

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def _quantize(sd: dict, fp8: torch.dtype, scaled: bool, prefix: str = "") -> tuple[dict, dict]:
    """2-D weights to fp8 (with a per-tensor scale when `scaled`); returns (file tensors, dequantized reference)."""
    out, reference = {}, {}
    for key, tensor in sd.items():
        tensor = tensor.float()
        if tensor.ndim == 2 and key.endswith(".weight") and "embed" not in key:
            scale = tensor.abs().amax().clamp_min(1e-12) / FP8_MAX[fp8] if scaled else torch.tensor(1.0)
            q = (tensor / scale).to(fp8)
            out[prefix + key] = q
            if scaled:
                out[prefix + key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(())
            reference[prefix + key] = q.float() * scale.float()
        else:
            out[prefix + key] = tensor.to(torch.bfloat16)
            reference[prefix + key] = tensor.to(torch.bfloat16).float()
    if scaled:
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=fp8)
    return out, reference


@pytest.fixture(scope="module")
def dit_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8") / "diffusion_models"
    root.mkdir()
    original = load_file(str(WEIGHTS / "diffusion_models" / "kineflow_tiny_dit.safetensors"))
    comfy = comfy_dit_names(original)
    files = {}
    for name, fp8, scaled in (("scaled_e4m3", torch.float8_e4m3fn, True), ("plain_e5m2", torch.float8_e5m2, False)):
        quantized, reference = _quantize(comfy, fp8, scaled, prefix="model.diffusion_model.")
        save_file(quantized, str(root / f"{name}.safetensors"))
        save_file(reference, str(root / f"{name}_reference.safetensors"))
        files[name] = root / f"{name}.safetensors"
    return root.parent, files


def _dit_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([500.0]), torch.randn(1, 7, 128, generator=g),
            torch.ones(1, 7, dtype=torch.long), torch.randn(1, 64, generator=g), torch.tensor([6000.0]))


@pytest.mark.parametrize("name, quantization", [("scaled_e4m3", "fp8_scaled"), ("plain_e5m2", "fp8_e5m2")])
@pytest.mark.parametrize("offload", ["full", "blocks"])
def test_fp8_dit_equals_its_dequantized_weights(dit_files, name, quantization, offload):
    models_dir, files = dit_files
    assert inspect_file(files[name])["quantization"] == quantization
    with host.configured(models_dir=models_dir):
        quantized = load_video_model(f"{name}.safetensors", offload=offload, resident_blocks=1)
        reference = load_video_model(f"{name}_reference.safetensors")
        linears = [m for m in quantized.net.modules() if isinstance(m, torch.nn.Linear)]
        stored = {m.weight.dtype for m in linears if m.weight.ndim == 2}
        assert stored & {torch.float8_e4m3fn, torch.float8_e5m2}, "fp8 weights stay fp8 in memory"
        with quantized.running(), torch.inference_mode():
            out = quantized.net(*_dit_inputs())
        with torch.inference_mode():
            expected = reference.net(*_dit_inputs())
    # Same dequantized weights, same arithmetic: equal up to the order of float sums, which the CPU's matmul kernels
    # may choose by the weight's memory layout (bit-identical on an Intel AVX-512F CPU, 1e-7-scale differences on an
    # AMD EPYC with AVX-512 BF16). Against the unquantized shipped model the output differs by the quantization
    # error, max |diff| / max |out|: measured 2.8% scaled e4m3, 5.5% e5m2, four orders of magnitude more.
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


def test_scaled_fp8_dit_is_close_to_the_unquantized_model(dit_files):
    models_dir, _ = dit_files
    with host.configured(models_dir=models_dir):
        quantized = load_video_model("scaled_e4m3.safetensors")
        original = load_video_model("kineflow_tiny_dit.safetensors")
        with torch.inference_mode():
            a, b = quantized.net(*_dit_inputs()), original.net(*_dit_inputs())
    assert (a - b).abs().max() <= 0.05 * b.abs().max()  # measured 2.8%


def test_scaled_fp8_file_with_a_missing_scale_is_a_clear_input_error(dit_files, tmp_path, capsys):
    models_dir, files = dit_files
    tensors = load_file(str(files["scaled_e4m3"]))
    dropped = next(k for k in tensors if k.endswith(".scale_weight"))
    del tensors[dropped]
    broken = models_dir / "diffusion_models" / "broken_fp8.safetensors"
    save_file(tensors, str(broken))
    with host.configured(models_dir=models_dir), pytest.raises(ModelFileError, match="broken_fp8.*no scale_weight"):
        load_video_model("broken_fp8.safetensors")
    code = cli.main(["run", "workflows/api/text_to_video.json", "--models-dir", str(models_dir), "--output-dir",
                     str(tmp_path), "--set", '1.model_name="broken_fp8.safetensors"'])
    err = capsys.readouterr().err
    assert code == 2 and "broken_fp8.safetensors" in err and "scale_weight" in err
    assert not any(tmp_path.iterdir())


def test_scaled_fp8_llama_in_the_hugging_face_layout(tmp_path):
    """As ComfyUI's llava_llama3_fp8_scaled.safetensors: HF names, fp8 linears with scale_weight, a marker."""
    folder = WEIGHTS / "text_encoders" / "kineflow_tiny_llm"
    quantized, reference = _quantize(load_file(str(folder / "model.safetensors")), torch.float8_e4m3fn, scaled=True)
    save_file(quantized, str(tmp_path / "llama_fp8_scaled.safetensors"))
    save_file(reference, str(tmp_path / "llama_reference.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    device = torch.device("cpu")
    llama, _ = load_text_tower(tmp_path / "llama_fp8_scaled.safetensors", "llama_text", torch.float32, device)
    expected, _ = load_text_tower(tmp_path / "llama_reference.safetensors", "llama_text", torch.float32, device)
    ids = torch.tensor([[0, 5, 9, 11, 3]])
    with torch.inference_mode():
        assert torch.equal(llama(ids), expected(ids))


def _official_fp8_release(folder: Path) -> tuple[Path, Path]:
    """As Tencent's mp_rank_00_model_states_fp8.pt: the original layout under "module", the block linears in fp8
    e4m3fn, and their per-layer scales in a sibling ..._fp8_map.pt ({module name: scale})."""
    original = load_file(str(WEIGHTS / "diffusion_models" / "kineflow_tiny_dit.safetensors"))
    blocks = {k: v for k, v in original.items() if k.startswith(("double_blocks.", "single_blocks."))}
    quantized, reference = _quantize(blocks, torch.float8_e4m3fn, scaled=True)
    scale_map = {k.removesuffix(".scale_weight"): quantized.pop(k) for k in list(quantized) if k.endswith(".scale_weight")}
    del quantized["scaled_fp8"]
    rest = {k: v.to(torch.bfloat16) for k, v in original.items() if k not in blocks}
    checkpoint = folder / "mp_rank_00_model_states_fp8.pt"
    torch.save({"module": {**rest, **quantized}}, checkpoint)
    torch.save(scale_map, folder / "mp_rank_00_model_states_fp8_map.pt")
    save_file({**{k: v.float() for k, v in rest.items()}, **reference}, str(folder / "official_reference.safetensors"))
    return checkpoint, folder / "mp_rank_00_model_states_fp8_map.pt"


def test_official_hunyuan_fp8_release_with_its_scale_map(tmp_path):
    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    checkpoint, _ = _official_fp8_release(folder)
    assert inspect_file(checkpoint)["quantization"] == "fp8_scaled"
    with host.configured(models_dir=tmp_path):
        quantized = load_video_model(checkpoint.name, offload="blocks", resident_blocks=1)
        reference = load_video_model("official_reference.safetensors")
        assert quantized.net.double_blocks[0].img_attn_qkv.weight.dtype == torch.float8_e4m3fn
        with quantized.running(), torch.inference_mode():
            out = quantized.net(*_dit_inputs())
        with torch.inference_mode():
            expected = reference.net(*_dit_inputs())
    assert torch.equal(out, expected)


def test_official_fp8_release_without_its_scale_map_is_a_clear_input_error(tmp_path, capsys):
    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    checkpoint, scale_map = _official_fp8_release(folder)
    scale_map.unlink()
    code = cli.main(["run", "workflows/api/text_to_video.json", "--models-dir", str(tmp_path), "--output-dir",
                     str(tmp_path), "--set", f'1.model_name="{checkpoint.name}"'])
    err = capsys.readouterr().err
    assert code == 2 and checkpoint.name in err and "mp_rank_00_model_states_fp8_map.pt" in err
    assert not list(tmp_path.glob("*.mp4"))


def test_loras_on_fp8_and_gguf_layers_run_on_the_fly_beside_the_quantized_weights():
    """A LoRA is not merged into a quantized weight (that would quantize its update away): the layer keeps its
    fp8 / GGUF weight and adds strength * up(down(x)); the result is that of the merged dequantized weight."""
    import gguf
    import numpy as np

    from kineflow.models import weights

    g = torch.Generator().manual_seed(0)
    full = torch.randn(64, 256, generator=g) * 0.05
    up, down, x = torch.randn(64, 4, generator=g) * 0.1, torch.randn(4, 256, generator=g) * 0.1, torch.randn(3, 256, generator=g)
    fp8 = torch.nn.Linear(256, 64, bias=False)
    fp8.weight = torch.nn.Parameter(full.to(torch.float8_e4m3fn), requires_grad=False)
    weights.fp8_linear(fp8, torch.float32)
    gguf_layer = torch.nn.Linear(256, 64, bias=False)
    blocks = gguf.quants.quantize(full.numpy(), gguf.GGMLQuantizationType.Q8_0)
    weights.gguf_linear(gguf_layer, torch.float32, "Q8_0", torch.from_numpy(np.ascontiguousarray(blocks)).reshape(-1))
    for layer, dequantized in ((fp8, full.to(torch.float8_e4m3fn).float()),
                               (gguf_layer, torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)))):
        stored = layer.weight.clone()
        weights.merge_lora(layer, up, down, 0.7)
        weights.merge_lora(layer, up, down, 0.3)
        assert torch.equal(layer.weight, stored)
        expected = x @ (dequantized + up @ down).T
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_motion_lora_on_an_fp8_motion_module(tmp_path):
    from kineflow.runtime import animatediff as ad_runtime
    from kineflow.training import tiny_sd

    paths = tiny_sd.write_models(tmp_path, seed=0)
    quantized, reference = _quantize(load_file(str(paths["mm_v2"])), torch.float8_e4m3fn, scaled=False)
    folder = paths["mm_v2"].parent
    save_file(quantized, str(folder / "mm_fp8.safetensors"))
    save_file(reference, str(folder / "mm_reference.safetensors"))
    lora = paths["motion_lora"].name
    with host.configured(models_dir=tmp_path):
        model, _vae, text_encoder = ad_runtime.load_sd_checkpoint(paths["checkpoint"].name)
        outputs, q_proj = [], "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q"
        for name in ("mm_fp8.safetensors", "mm_reference.safetensors"):
            motion = ad_runtime.apply_motion_lora(ad_runtime.load_motion_module(name), lora, 0.8)
            layer = motion.module.get_submodule(q_proj)
            # fp8: the weight stays fp8 and the LoRA runs beside it; float: the LoRA is merged in
            assert (layer.weight.dtype == torch.float8_e4m3fn) == hasattr(layer, "loras") == (name == "mm_fp8.safetensors")
            video_model = ad_runtime.apply_motion_module(model, motion)
            x = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
            with torch.inference_mode():
                outputs.append(video_model.net_fn(x, torch.tensor([500.0]), text_encoder.encode(["a red circle"])["context"]))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
