"""Schedules, samplers, guidance wrappers, context windows, step caching and seeded noise. Nothing here imports
ComfyUI.

The names below are the nodes' choices, kept here free of torch so that the node registry loads without it;
sampling.SAMPLERS and runtime/animatediff.py implement them (tests/test_node_contract.py checks that they agree).
"""

SAMPLER_NAMES = ("euler", "euler_ancestral", "ddim", "dpmpp_2m")
SCHEDULER_NAMES = ("default", "karras")  # sigma spacing: the family's own, or Karras'
PREDICTION_NAMES = ("eps", "v")  # what a discrete-schedule (SD1.5) UNet predicts: noise, or v
# The Step Cache node's default threshold (step_cache.py; measured by benchmarks/bench_step_cache.py).
DEFAULT_STEP_CACHE_THRESHOLD = 0.1


def context_problem(length: int, overlap: int, stride: int) -> str | None:
    """None when context windows of these sizes work, else why not (ContextOptions checks it when built; Context
    Options' validation, which must not wait for torch, checks it before the run)."""
    if length < 1:
        return f"context length must be >= 1 frame, got {length}"
    if not 0 <= overlap < length:
        return f"context overlap must be in [0, length={length}), got {overlap}"
    if stride < 1:
        return f"context stride must be >= 1, got {stride}"
    return None
