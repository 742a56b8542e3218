"""Sequence parallel (Ulysses, ring, both) and CFG parallel of the HunyuanVideo DiT on gloo processes: every plan
gives the single-process output within 1e-5 (fp32), with padded text, token counts that do not divide by the
degree, heads that do not divide by the Ulysses degree, a step cache, and a few sampler steps with denoise < 1.

One process pool per world size runs every case of that size (each rank compares its own full output with the
single-process forward of the same seeded model); the parent checks the reported differences."""

import dataclasses
import datetime
import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kineflow.errors import KineFlowError
from kineflow.models.hunyuan_video_dit import HunyuanVideoDiT, HunyuanVideoDiTConfig, default_rope_dims
from kineflow.models.attention import attend_partial
from kineflow.models.sequence_parallel import ParallelPlan, merge_partial, parallel_groups

TOLERANCE = 1e-5

# name -> (world size, plan, model, inputs, how the model is driven)
CASES = {
    "ulysses2": (2, ParallelPlan(ulysses=2), "tiny", "padded_odd", "forward"),
    "ulysses2_heads3": (2, ParallelPlan(ulysses=2), "heads3", "padded_odd", "forward"),
    "ring2": (2, ParallelPlan(ring=2), "tiny", "padded_odd", "forward"),
    "ring2_plain": (2, ParallelPlan(ring=2), "tiny", "plain", "forward"),
    "cfg2": (2, ParallelPlan(cfg=2), "tiny", "padded_odd", "forward"),
    "cfg2_odd_batch": (2, ParallelPlan(cfg=2), "tiny", "plain", "forward"),
    "ulysses2_step_cache": (2, ParallelPlan(ulysses=2), "tiny", "plain", "step_cache"),
    "ulysses2_sampler": (2, ParallelPlan(ulysses=2), "tiny", "sampler", "sampler"),
    "ulysses4_padded_heads": (4, ParallelPlan(ulysses=4), "tiny", "padded_odd", "forward"),
    "ring4": (4, ParallelPlan(ring=4), "tiny", "padded_odd", "forward"),
    "ulysses2xring2": (4, ParallelPlan(ulysses=2, ring=2), "tiny", "padded_odd", "forward"),
    "ulysses2xring2_plain": (4, ParallelPlan(ulysses=2, ring=2), "tiny", "plain", "forward"),
    "cfg2xulysses2": (4, ParallelPlan(ulysses=2, cfg=2), "tiny", "padded_odd", "forward"),
    "cfg2xring2_sampler": (4, ParallelPlan(ring=2, cfg=2), "tiny", "sampler", "sampler"),
    # Image to video: the first latent frame's 15 tokens fall on ranks 0 and 1 only (12 + 3 of 45, ring 4); the
    # concatenated image channels are per token.
    "ring4_token_replace": (4, ParallelPlan(ring=4), "tiny", "padded_odd", "token_replace"),
    "ulysses2_token_replace": (2, ParallelPlan(ulysses=2), "tiny", "padded_odd", "token_replace"),
    "cfg2xulysses2_i2v_concat": (4, ParallelPlan(ulysses=2, cfg=2), "i2v33", "padded_odd", "forward"),
}


def build_model(name: str) -> HunyuanVideoDiT:
    if name == "tiny":
        cfg = HunyuanVideoDiTConfig.tiny()
    elif name == "i2v33":  # HunyuanVideo-I2V's latent concat: 16 noisy + 16 image + 1 mask channels
        cfg = dataclasses.replace(HunyuanVideoDiTConfig.tiny(), in_channels=33, image_condition="latent_concat")
    else:  # three heads: no Ulysses degree > 1 divides them, so the heads are padded
        cfg = HunyuanVideoDiTConfig(hidden_size=96, heads_num=3, mm_double_blocks_depth=1, mm_single_blocks_depth=1,
                                    rope_dim_list=default_rope_dims(32), text_states_dim=32, text_states_dim_2=24)
    torch.manual_seed(0)
    return HunyuanVideoDiT(cfg).eval()


def make_inputs(name: str, cfg: HunyuanVideoDiTConfig):
    """padded_odd: batch 2, right-padded text of two lengths (and a trailing all-padding column), 3x3x5 = 45 video
    tokens (divisible by neither 2 nor 4). plain: batch 1, no padding, 2x4x6 = 48 tokens."""
    g = torch.Generator().manual_seed(1)
    batch, text_len, (t, h, w) = (2, 9, (3, 6, 10)) if name == "padded_odd" else (1, 7, (2, 8, 12))
    x = torch.randn(batch, cfg.in_channels, t, h, w, generator=g)
    text = torch.randn(batch, text_len, cfg.text_states_dim, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    if name == "padded_odd":
        mask[0, 5:] = 0
        mask[1, 8:] = 0
    pooled = torch.randn(batch, cfg.text_states_dim_2, generator=g)
    timestep = torch.linspace(900.0, 250.0, batch)
    guidance = torch.full((batch,), 6000.0)
    return (x, timestep, text, mask, pooled, guidance)


def run_sampler(model):
    """Three euler steps of true CFG (cond + uncond in one batch of 2) from an input latent, denoise 0.6."""
    from kineflow.runtime.generation import sample_video
    from kineflow.runtime.video_models import HunyuanVideoModel

    cfg = model.config
    g = torch.Generator().manual_seed(2)

    def prompt(real: int):
        mask = torch.zeros(1, 8, dtype=torch.long)
        mask[0, :real] = 1
        return {"text_states": torch.randn(1, 8, cfg.text_states_dim, generator=g), "text_mask": mask,
                "text_states_2": torch.randn(1, cfg.text_states_dim_2, generator=g)}

    conditioning = {"positive": prompt(6), "negative": prompt(3)}
    latent = {"samples": torch.randn(1, cfg.in_channels, 3, 6, 10, generator=g)}
    handle = HunyuanVideoModel(net=model, dtype=torch.float32, source="test")
    return sample_video(handle, conditioning, latent, seed=5, steps=3, cfg=2.5, shift=3.0, embedded_guidance=6.0,
                        sampler_name="euler", denoise=0.6)["samples"]


def run_step_cache(model, inputs):
    """Five steps through a TeaCache hook whose threshold lets the middle three skip the blocks: ranks must take the
    single process's decisions (the probe is gathered) and reuse their own residual slices. The skip count is the
    last value of the result, so a different decision shows as a difference too."""
    from kineflow.samplers.step_cache import StepCacheOptions, StepCacheRun, teacache

    x, timestep, text, mask, pooled, guidance = inputs
    run = StepCacheRun(StepCacheOptions(threshold=10.0), teacache((1.0, 0.0)), steps=5)
    net = run.bind(model)
    denoiser = run.wrap(lambda latent, t: net(latent, t, text_states=text, text_mask=mask, text_states_2=pooled,
                                              guidance=guidance))
    outs = [denoiser(x + 0.01 * i, timestep - 50 * i).flatten() for i in range(5)]
    assert run.skips == 3, f"the case must exercise skipped steps; {run.skips} of 5 skipped"
    return torch.cat(outs + [torch.tensor([float(run.skips)])])


def drive(model, how: str, inputs):
    with torch.inference_mode():
        if how == "sampler":
            return run_sampler(model)
        if how == "step_cache":
            return run_step_cache(model, inputs)
        x, timestep, text, mask, pooled, guidance = inputs
        return model(x, timestep, text, mask, pooled, guidance, token_replace=how == "token_replace")


def worker(rank: int, world: int, init_file: str, out_dir: str, names: list[str]):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    report = {}
    for name in names:
        start = time.perf_counter()
        _, plan, model_name, inputs_name, how = CASES[name]
        model = build_model(model_name)
        inputs = make_inputs(inputs_name, model.config)
        reference = drive(model, how, inputs)
        model.parallel = parallel_groups(plan)
        out = drive(model, how, inputs)
        report[name] = {"max_diff": float((out - reference).abs().max()), "scale": float(reference.abs().max()),
                        "comm_bytes": sum(model.parallel.comm_bytes.values()), "seconds": time.perf_counter() - start}
    try:
        parallel_groups(ParallelPlan(ulysses=world + 1))
    except KineFlowError as exc:
        report["world_mismatch"] = str(exc)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


def spawn(world: int, tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp(f"world{world}")
    names = [name for name, case in CASES.items() if case[0] == world]
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # read by the children's OpenMP when they import torch
    try:
        mp.spawn(worker, args=(world, str(out_dir / "store"), str(out_dir), names), nprocs=world, join=True)
    finally:
        if previous is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = previous
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    return {world: spawn(world, tmp_path_factory) for world in (2, 4)}


@pytest.mark.parametrize("name", list(CASES))
def test_parallel_matches_single_process(reports, name):
    world = CASES[name][0]
    for rank, report in enumerate(reports[world]):
        case = report[name]
        assert case["scale"] > 0.1, "the reference output must not be trivially small"
        assert case["max_diff"] <= TOLERANCE, f"rank {rank}: {case}"
        if name == "cfg2_odd_batch":  # no cond + uncond pair to split: both groups compute the whole batch
            assert case["comm_bytes"] == 0
        else:
            assert case["comm_bytes"] > 0, "a parallel run must have communicated"


def test_world_size_mismatch_names_both(reports):
    for world in (2, 4):
        message = reports[world][0]["world_mismatch"]
        assert f"needs {world + 1} processes" in message and f"has {world}" in message


def test_plan_validation_and_mixed_degree():
    with pytest.raises(KineFlowError, match="cfg parallel degree must be 1 or 2"):
        ParallelPlan(cfg=3)
    with pytest.raises(KineFlowError, match="ring must be an integer >= 1"):
        ParallelPlan(ring=0)
    assert ParallelPlan(ulysses=2, ring=2, cfg=2).world_size == 8
    assert ParallelPlan.for_heads(8, heads=24) == ParallelPlan(ulysses=8)
    assert ParallelPlan.for_heads(8, heads=12, cfg=2) == ParallelPlan(ulysses=4, cfg=2)
    assert ParallelPlan.for_heads(8, heads=6) == ParallelPlan(ulysses=2, ring=4)
    with pytest.raises(KineFlowError, match="multiple of the cfg degree"):
        ParallelPlan.for_heads(3, heads=24, cfg=2)


def test_groups_need_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(KineFlowError, match="init_process_group"):
        parallel_groups(ParallelPlan(ulysses=2))


def test_partial_attention_merges_to_full_attention():
    """Ring attention's pieces: attention over two key blocks (the second wholly masked for one item), each in
    query chunks, merged by log-sum-exp, equals one attention over all keys."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 50, 16, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 1, 50, generator=g) > 0.3
    mask[:, :, :, 0] = True
    mask[1, :, :, 25:] = False
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    chunked = 4 * 2 * 3 * 25 * 7  # scores of 7 queries at a time
    first = attend_partial(q, k[:, :, :25], v[:, :, :25], mask[..., :25], score_bytes=chunked)
    second = attend_partial(q, k[:, :, 25:], v[:, :, 25:], mask[..., 25:], score_bytes=chunked)
    assert bool(torch.isneginf(second[1][1]).all()) and float(second[0][1].abs().max()) == 0.0
    out, lse = merge_partial(*first, *second)
    assert float((out - expected).abs().max()) < 1e-6
    assert float((lse - torch.logsumexp((q @ k.transpose(-1, -2) / 4).masked_fill(~mask, float("-inf")), -1))
                 .abs().max()) < 1e-5
