"""GGUF: KineFlow's torch dequantizers against the gguf package's, and tiny HunyuanVideo transformers written in
ComfyUI-GGUF's layout (ComfyUI key names, rows of 256 with `comfy.gguf.orig_shape`) with the gguf writer."""

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file

from kineflow.errors import ModelFileError
from kineflow.models import gguf as kf_gguf
from kineflow.models import gguf_blocks
from kineflow.models.checkpoints import inspect_file
from kineflow.runtime import cli, host
from kineflow.runtime.video_models import load_video_model
from kineflow.training.tiny_models import comfy_dit_names, random_k_blocks, write_gguf
from test_quantized import _dit_inputs

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
QUANTIZABLE = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]  # the gguf package quantizes these in numpy
K_QUANTS = [Q.Q4_K, Q.Q5_K, Q.Q6_K]  # dequantize only: random blocks with sane scales stand in
# Output error of the tiny DiT against the unquantized model, as a share of the largest output value. Measured:
# Q8_0 0.8%, Q5_0 9.3%, Q4_0 7.6% (the tiny model's 64-wide rows are regrouped into blocks of 256 values, as
# ComfyUI-GGUF does, so one scale spans four rows).
ERROR_BOUND = {"Q8_0": 0.02, "Q5_0": 0.15, "Q4_0": 0.15}


@pytest.mark.parametrize("qtype", QUANTIZABLE + K_QUANTS, ids=lambda q: q.name)
def test_dequantizers_match_the_gguf_package(qtype):
    generator = np.random.default_rng(0)
    if qtype in K_QUANTS:
        blocks = random_k_blocks(qtype, 4, generator, scale=(0.001, 0.05))
    else:
        blocks = gguf.quants.quantize(generator.standard_normal((4, 512)).astype(np.float32), qtype)
    expected = gguf.quants.dequantize(blocks, qtype)
    got = gguf_blocks.dequantize(torch.from_numpy(blocks.copy()).reshape(-1), qtype.name, expected.shape, torch.float32)
    assert torch.equal(got, torch.from_numpy(expected.astype(np.float32)))


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    (root / "diffusion_models").mkdir()
    comfy = comfy_dit_names(load_file(str(WEIGHTS / "diffusion_models" / "kineflow_tiny_dit.safetensors")))
    for qtype in (Q.Q8_0, Q.Q5_0, Q.Q4_0, Q.Q6_K, Q.Q4_K):
        write_gguf(root / "diffusion_models" / f"tiny_dit_{qtype.name}.gguf", comfy, qtype, seed=1)
    return root


def _dequantized_reference(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors dequantized by the gguf package, in their logical shapes."""
    reader = gguf.GGUFReader(str(path))
    header = kf_gguf.read_header(path)
    return {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).copy())
            .reshape(header.tensors[t.name].shape) for t in reader.tensors}


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q4_0", "Q6_K", "Q4_K"])
@pytest.mark.parametrize("offload", ["full", "blocks"])
def test_gguf_dit_equals_the_gguf_packages_dequantized_weights(gguf_models, qtype, offload):
    from kineflow.models import hunyuan_video_dit as dit_mod

    path = gguf_models / "diffusion_models" / f"tiny_dit_{qtype}.gguf"
    assert inspect_file(path)["quantization"] == f"gguf:{qtype}"
    with host.configured(models_dir=gguf_models):
        assert path.name in host.list_models("diffusion_models")
        model = load_video_model(path.name, offload=offload, resident_blocks=1)
    raw = [m for m in model.net.modules() if getattr(m, "gguf_type", None)]
    assert raw and all(m.weight.dtype == torch.uint8 for m in raw), "linear weights stay GGUF blocks in memory"
    sd = dit_mod.convert_state_dict(_dequantized_reference(path), "comfy")
    reference = dit_mod.HunyuanVideoDiT(dit_mod.config_from_state_dict({k: v.shape for k, v in sd.items()})).eval()
    reference.load_state_dict(sd)
    with model.running(), torch.inference_mode():
        out = model.net(*_dit_inputs())
    with torch.inference_mode():
        expected = reference(*_dit_inputs())
    assert torch.allclose(out, expected, rtol=0, atol=1e-5 * expected.abs().max())


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q4_0"])
def test_gguf_dit_stays_within_the_quantization_error_of_the_original(gguf_models, qtype):
    with host.configured(models_dir=gguf_models):
        quantized = load_video_model(f"tiny_dit_{qtype}.gguf")
        original = load_video_model("kineflow_tiny_dit.safetensors")
    with torch.inference_mode():
        a, b = quantized.net(*_dit_inputs()), original.net(*_dit_inputs())
    assert (a - b).abs().max() <= ERROR_BOUND[qtype] * b.abs().max()


def test_unsupported_gguf_type_is_a_clear_input_error(tmp_path, capsys):
    models = tmp_path / "models"
    (models / "diffusion_models").mkdir(parents=True)
    writer = gguf.GGUFWriter(str(models / "diffusion_models" / "odd.gguf"), "hyvid")
    values, nbytes = gguf.GGML_QUANT_SIZES[Q.Q2_K]
    writer.add_tensor("double_blocks.0.img_attn.qkv.weight", np.zeros((4, nbytes), dtype=np.uint8), raw_dtype=Q.Q2_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFileError, match="odd.gguf.*Q2_K.*supported: .*Q4_K"):
        inspect_file(models / "diffusion_models" / "odd.gguf")
    code = cli.main(["run", "workflows/api/text_to_video.json", "--models-dir", str(models), "--output-dir",
                     str(tmp_path / "out"), "--set", '1.model_name="odd.gguf"'])
    err = capsys.readouterr().err
    assert code == 2 and "Q2_K" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
