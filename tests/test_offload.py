"""The offload helper: every policy gives the same frames as `full`, bounds what is resident, and moves
weights correctly onto a non-CPU compute device (`meta`, checked op by op)."""

from pathlib import Path

import pytest
import torch

from device_check import one_device
from kineflow.errors import InputFileError
from kineflow.runtime import host
from kineflow.runtime.animatediff import apply_motion_module, load_motion_module, load_sd_checkpoint
from kineflow.runtime.generation import decode_video, empty_latent, encode_prompts, sample_video
from kineflow.runtime.offload import Residency
from kineflow.runtime.video_models import load_text_encoders, load_video_model, load_video_vae

POLICIES = ["full", "model", "blocks", "sequential", "auto"]
SAMPLE = dict(seed=3, steps=2, cfg=2.0, shift=3.0, embedded_guidance=6.0, sampler_name="dpmpp_2m")


def _hunyuan_frames(policy: str) -> torch.Tensor:
    model = load_video_model("kineflow_tiny_dit.safetensors", offload=policy, resident_blocks=1)
    vae = load_video_vae("kineflow_tiny_vae.safetensors", offload=policy)
    text = load_text_encoders("kineflow_tiny_llm", "kineflow_tiny_clip.safetensors", offload=policy)
    cond = encode_prompts(text, "a red circle moves to the right on a blue background", "blurry")
    latent = sample_video(model, cond, empty_latent("hunyuan_video", 32, 32, 5, 1), **SAMPLE)
    return decode_video(vae, latent, tiling=None)


def _animatediff_frames(policy: str) -> torch.Tensor:
    model, vae, text = load_sd_checkpoint("kineflow_tiny_sd15.safetensors", offload=policy)
    model = apply_motion_module(model, load_motion_module("kineflow_tiny_mm.safetensors", offload=policy))
    cond = encode_prompts(text, "a green square moves up on a white background", "")
    latent = sample_video(model, cond, empty_latent("sd15", 32, 32, 8, 1), **SAMPLE)
    return decode_video(vae, latent, tiling=None)


@pytest.fixture(scope="module")
def reference():
    return {"hunyuan": _hunyuan_frames("full"), "animatediff": _animatediff_frames("full")}


@pytest.mark.parametrize("policy", POLICIES[1:])
@pytest.mark.parametrize("family", ["hunyuan", "animatediff"])
def test_every_policy_gives_bit_identical_frames_to_full(family, policy, reference):
    frames = (_hunyuan_frames if family == "hunyuan" else _animatediff_frames)(policy)
    assert torch.equal(frames, reference[family])


def test_blocks_on_the_cpu_leave_the_weights_in_the_file_and_hold_few_blocks():
    model = load_video_model("kineflow_tiny_dit.safetensors", offload="blocks", resident_blocks=1)
    residency, net = model.residency, model.net
    blocks = net.offload_blocks()
    assert residency.policy == "blocks" and residency.resident_blocks == 1 and residency.sources

    def resident(block):
        return all(not p.is_meta for p in block.parameters())

    assert not any(resident(b) for b in blocks), "outside a run no block is read from the file"
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, o: seen.append(sum(resident(x) for x in blocks))) for b in blocks]
    text = load_text_encoders("kineflow_tiny_llm", "kineflow_tiny_clip.safetensors")
    cond = encode_prompts(text, "a red circle", "")
    sample_video(model, cond, empty_latent("hunyuan_video", 32, 32, 5, 1), **{**SAMPLE, "cfg": 1.0})
    for h in hooks:
        h.remove()
    # the resident block, the running one and the one fetched ahead
    assert seen and max(seen) <= 3, seen
    assert not any(resident(b) for b in blocks)


def test_a_budget_below_the_largest_block_is_a_clear_error():
    with pytest.raises(InputFileError, match="too small for kineflow_tiny_dit.safetensors.*two largest blocks"):
        with host.configured(memory_budget="0.00001"):
            load_video_model("kineflow_tiny_dit.safetensors", offload="blocks")


@pytest.mark.parametrize("policy", ["model", "blocks", "sequential"])
def test_offloaded_weights_move_to_a_non_cpu_device_and_back(policy):
    """On `meta` the offload device (CPU memory) and the compute device differ, as with a GPU."""
    with host.configured(device="meta"):
        model = load_video_model("kineflow_tiny_dit.safetensors", offload=policy, resident_blocks=1)
        text = load_text_encoders("kineflow_tiny_llm", "kineflow_tiny_clip.safetensors", offload=policy)
        assert all(p.device.type == "cpu" for p in model.net.parameters()), "offloaded between runs"
        with one_device():
            cond = encode_prompts(text, "a red circle", "")
            out = sample_video(model, cond, empty_latent("hunyuan_video", 32, 32, 5, 1), **SAMPLE)
        assert out["samples"].is_meta
        assert all(p.device.type == "cpu" for p in model.net.parameters()), "sent back after the run"


def test_policy_names_are_checked():
    with pytest.raises(InputFileError, match="offload policy must be one of"):
        Residency(torch.nn.Linear(2, 2), "everything", torch.device("cpu"))


@pytest.fixture(scope="module")
def sd_models(tmp_path_factory):
    from kineflow.training import tiny_sd

    root = tmp_path_factory.mktemp("sd_models")
    tiny_sd.write_models(root, seed=0)
    return root


def _merged_frames(policy: str) -> torch.Tensor:
    from kineflow.runtime.animatediff import apply_domain_adapter, apply_motion_lora

    model, vae, text = load_sd_checkpoint("kineflow_random_sd15.safetensors", offload=policy)
    motion = apply_motion_lora(load_motion_module("kineflow_random_mm_v2.safetensors", offload=policy),
                               "kineflow_random_motion_lora.safetensors", 0.7)
    model = apply_motion_module(apply_domain_adapter(model, "kineflow_random_v3_adapter.safetensors", 1.0), motion)
    cond = encode_prompts(text, "a red circle", "")
    return decode_video(vae, sample_video(model, cond, empty_latent("sd15", 32, 32, 8, 1), **SAMPLE), tiling=None)


def test_loras_merge_into_private_copies_under_every_policy(sd_models):
    with host.configured(models_dir=sd_models):
        full = _merged_frames("full")
        for policy in ("blocks", "sequential"):
            assert torch.equal(_merged_frames(policy), full), policy


def test_file_backed_bf16_embedding_gives_the_same_states_as_a_full_load(tmp_path):
    """Under blocks on the CPU a bf16 embedding table stays bf16 and only looked-up rows are widened."""
    from safetensors.torch import load_file, save_file

    from kineflow.runtime.video_models import load_text_tower

    folder = Path(__file__).resolve().parent.parent / "weights" / "text_encoders" / "kineflow_tiny_llm"
    bf16 = {k: v.to(torch.bfloat16) for k, v in load_file(str(folder / "model.safetensors")).items()}
    save_file(bf16, str(tmp_path / "llama_bf16.safetensors"))
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    ids = torch.tensor([[0, 5, 9, 11, 3]])
    outputs = []
    for policy in ("full", "blocks"):
        llama, residency = load_text_tower(tmp_path / "llama_bf16.safetensors", "llama_text", torch.float32,
                                           torch.device("cpu"), policy)
        with residency.active(), torch.inference_mode():
            outputs.append(llama(ids))
        if policy == "blocks":
            assert llama.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(*outputs)
