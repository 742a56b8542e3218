"""Family / layout / version detection on the real checkpoints' key sets, and safe loading rules."""

import json
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from checkpoint_fixtures import header_only_safetensors, manifest, manifest_shapes
from kineflow.models import checkpoints
from kineflow.errors import ModelFileError

EXPECTED = {
    "hunyuan_video_dit_original": ("hunyuan_video_dit", "original", "t2v"),
    "hunyuan_video_dit_comfy": ("hunyuan_video_dit", "comfy", "t2v"),
    "hunyuan_video_dit_diffusers": ("hunyuan_video_dit", "diffusers", "t2v"),
    "hunyuan_video_vae_original": ("hunyuan_video_vae", "original", None),
    "hunyuan_video_vae_diffusers": ("hunyuan_video_vae", "original", None),  # same keys as the original
    "hunyuan_video_vae_comfy": ("hunyuan_video_vae", "comfy", None),
    "clip_l_text_hf": ("clip_text", "hf", "clip_l"),
    "llava_llama3_8b_text_hf": ("llama_text", "hf", None),
    "sd15_unet_ldm": ("sd15_unet", "ldm", "sd15"),
    "sd_vae_ldm": ("sd_vae", "ldm", None),
    "animatediff_mm_sd_v15_v1": ("animatediff_motion_module", "original", "v1"),
    "animatediff_mm_sd_v15_v2": ("animatediff_motion_module", "original", "v2"),
    "animatediff_v3_sd15_mm": ("animatediff_motion_module", "original", "v3"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_inspect_names_family_layout_version_from_header_only(name, tmp_path):
    m = manifest(name)
    path = header_only_safetensors(manifest_shapes(name), tmp_path / f"{name}.safetensors")
    start = time.perf_counter()
    info = checkpoints.inspect_file(path)
    elapsed = time.perf_counter() - start
    assert (info["family"], info["layout"], info["version"]) == EXPECTED[name]
    assert info["params"] == m["num_params"] and info["tensors"] == m["num_tensors"]
    assert info["dtypes"] == {"BF16": m["num_tensors"]}
    assert elapsed < 1.0, f"header-only inspect took {elapsed:.2f}s"


def test_full_sd15_checkpoint_is_recognised_as_one_file(tmp_path):
    shapes = {**manifest_shapes("sd15_unet_ldm"), **manifest_shapes("sd_vae_ldm")}
    shapes.update({"cond_stage_model.transformer." + k: v for k, v in manifest_shapes("clip_l_text_hf").items()})
    info = checkpoints.inspect_file(header_only_safetensors(shapes, tmp_path / "sd15.safetensors"))
    assert (info["family"], info["layout"], info["version"]) == ("sd15_checkpoint", "ldm", "sd15")


def test_comfy_prefixed_dit_keeps_prefix(tmp_path):
    path = header_only_safetensors(manifest_shapes("hunyuan_video_dit_comfy"), tmp_path / "dit.safetensors",
                                   wrap_prefix="model.diffusion_model.")
    det = checkpoints.detect(checkpoints.read_header(path))
    assert (det.family, det.layout, det.prefix) == ("hunyuan_video_dit", "comfy", "model.diffusion_model.")


def test_wrong_family_error_says_what_the_file_is(tmp_path):
    path = header_only_safetensors(manifest_shapes("sd_vae_ldm"), tmp_path / "vae.safetensors")
    with pytest.raises(ModelFileError, match=r"sd_vae.*ldm layout.*expects a HunyuanVideo transformer"):
        checkpoints.require_family(path, "hunyuan_video_dit")


def test_pt_file_nested_under_module_is_read_safely(tmp_path):
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"double_blocks.0.img_attn_qkv.weight": torch.zeros(6, 2),
                           "single_blocks.0.linear1.weight": torch.zeros(4, 2),
                           "img_in.proj.weight": torch.zeros(2, 16, 1, 2, 2)}}, path)
    header = checkpoints.read_header(path)
    assert header.wrapper == "module"
    det = checkpoints.detect(header)
    assert (det.family, det.layout) == ("hunyuan_video_dit", "original")
    tensors = checkpoints.load_tensors(header, dtype=torch.bfloat16)
    assert tensors["img_in.proj.weight"].dtype == torch.bfloat16


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_needing_unsafe_unpickling_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil()}, path)
    with pytest.raises(ModelFileError, match="unsafe unpickling"):
        checkpoints.read_header(path)


@pytest.mark.parametrize("content", [b"", b"\x00" * 3, b"not a checkpoint at all", b"\xff" * 64])
def test_garbage_files_give_clear_errors(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match="not a valid safetensors file"):
        checkpoints.read_header(path)


def test_truncated_safetensors_is_reported(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"a": torch.zeros(1000)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelFileError, match="truncated"):
        checkpoints.read_header(path)


def test_load_tensors_casts_per_tensor_and_strips_prefix(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"pre.a": torch.ones(3), "pre.b": torch.arange(3), "other": torch.ones(1)}, str(path))
    out = checkpoints.load_tensors(checkpoints.read_header(path), prefix="pre.", dtype=torch.float16)
    assert set(out) == {"a", "b"} and out["a"].dtype == torch.float16 and out["b"].dtype == torch.int64


def test_kineflow_inspect_json_command(tmp_path):
    path = header_only_safetensors(manifest_shapes("hunyuan_video_dit_diffusers"), tmp_path / "transformer.safetensors")
    result = subprocess.run([sys.executable, "-m", "kineflow.runtime.cli", "inspect", "--json", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert {k: info[k] for k in ("family", "layout", "version")} == {
        "family": "hunyuan_video_dit", "layout": "diffusers", "version": "t2v"}
    assert info["params"] == 12_821_012_544 and info["dtypes"] == {"BF16": 1264}


def test_kineflow_inspect_bad_file_exits_2_without_traceback(tmp_path):
    from kineflow.runtime import cli

    bad = tmp_path / "notes.safetensors"
    bad.write_text("hello")
    import io

    err = io.StringIO()
    assert cli.main(["inspect", str(bad)], stdout=io.StringIO(), stderr=err) == 2
    assert "not a valid safetensors file" in err.getvalue() and "Traceback" not in err.getvalue()
