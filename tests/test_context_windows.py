"""Context windows: schedules cover every frame with the promised lengths and overlaps, looped windows wrap,
fusion is a normalised weighted average, and the inner denoiser never sees more than `length` frames."""

import pytest
import torch

from kineflow.errors import KineFlowError
from kineflow.samplers import sampling, schedules
from kineflow.samplers.context import (
    FUSE_METHODS,
    SCHEDULES,
    ContextOptions,
    context_window_denoiser,
    context_windows,
    fusion_weights,
)

CASES = [(n, length, overlap) for n in (1, 7, 16, 17, 33, 48, 61) for length, overlap in ((8, 2), (16, 4), (5, 0))]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("n,length,overlap", CASES)
def test_every_frame_covered_with_full_length_windows(schedule, n, length, overlap):
    windows = context_windows(n, ContextOptions(length, overlap, stride=2, schedule=schedule))
    assert set().union(*map(set, windows)) == set(range(n))
    for w in windows:
        assert len(w) == min(length, n) and len(set(w)) == len(w)
        assert all(0 <= f < n for f in w)


@pytest.mark.parametrize("n,length,overlap", [c for c in CASES if c[0] > c[1]])
def test_contiguous_schedules_overlap_as_requested(n, length, overlap):
    for schedule in ("static", "uniform"):
        windows = context_windows(n, ContextOptions(length, overlap, stride=1, schedule=schedule))
        assert windows[0][0] == 0 and windows[-1][-1] == n - 1
        for a, b in zip(windows, windows[1:]):
            assert b == list(range(b[0], b[0] + length))  # contiguous
            assert overlap <= a[-1] - b[0] + 1 < length  # overlap at least as asked, windows advance
    uniform = context_windows(n, ContextOptions(length, overlap, schedule="uniform"))
    overlaps = [a[-1] - b[0] + 1 for a, b in zip(uniform, uniform[1:])]
    assert max(overlaps) - min(overlaps) <= 1  # spread evenly


def test_static_windows_step_by_length_minus_overlap():
    starts = [w[0] for w in context_windows(40, ContextOptions(16, 4, schedule="static"))]
    assert starts == [0, 12, 24]
    starts = [w[0] for w in context_windows(45, ContextOptions(16, 4, schedule="static"))]
    assert starts == [0, 12, 24, 29]


def test_looped_windows_wrap_around_the_end():
    windows = context_windows(40, ContextOptions(16, 4, schedule="looped"))
    assert [w[0] for w in windows] == [0, 12, 24, 36]
    assert windows[-1] == [36, 37, 38, 39] + list(range(12))
    first, last = windows[0], windows[-1]
    assert len(set(first) & set(last)) >= 4  # the seam n-1 -> 0 is inside a window and overlapped
    assert any(last[j] == 39 and last[j + 1] == 0 for j in range(15))


def test_uniform_stride_adds_dilated_windows():
    windows = context_windows(40, ContextOptions(16, 4, stride=2, schedule="uniform"))
    dilated = [w for w in windows if w[1] - w[0] == 2]
    assert dilated and all(w == list(range(w[0], w[0] + 32, 2)) for w in dilated)
    assert {w[0] % 2 for w in dilated} == {0, 1}  # both phases
    # a level whose phases are shorter than `length` is skipped
    assert context_windows(20, ContextOptions(16, 4, stride=3)) == context_windows(20, ContextOptions(16, 4))


@pytest.mark.parametrize("method", FUSE_METHODS)
def test_fusion_weights_are_positive_and_shaped(method):
    w = fusion_weights(8, ContextOptions(8, 3, fuse_method=method))
    assert w.shape == (8,) and bool((w > 0).all())
    assert torch.equal(w, w.flip(0))
    expected = {"flat": [1.0] * 8, "pyramid": [1, 2, 3, 4, 4, 3, 2, 1],
                "overlap-linear": [0.25, 0.5, 0.75, 1, 1, 0.75, 0.5, 0.25]}[method]
    assert w.tolist() == pytest.approx(expected)


def _frame_local(x, sigma):
    """A denoiser that acts on each frame independently: windowing must not change its result."""
    return torch.tanh(x) * 0.5 + sigma.view(-1, 1, 1, 1, 1) * 0.01


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("method", FUSE_METHODS)
def test_fused_frame_local_denoiser_equals_unwindowed(schedule, method):
    x = torch.randn(2, 3, 21, 2, 3, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([2.0, 0.5])
    seen = []

    def inner(xw, s):
        seen.append(xw.shape[2])
        return _frame_local(xw, s)

    windowed = context_window_denoiser(inner, ContextOptions(6, 2, stride=2, schedule=schedule, fuse_method=method))
    out = windowed(x, sigma)
    assert (out - _frame_local(x, sigma)).abs().max().item() < 1e-6
    assert len(seen) > 1 and max(seen) <= 6  # memory bound: never more than `length` frames at once


def test_windows_blend_different_estimates_by_weight():
    """Where two windows disagree the output is their weighted average, not the last write."""
    opts = ContextOptions(4, 2, schedule="static", fuse_method="pyramid")  # windows [0..3], [2..5]
    calls = []

    def inner(xw, s):
        calls.append(len(calls))
        return torch.full_like(xw, float(len(calls)))  # window k returns the constant k+1

    out = context_window_denoiser(inner, opts)(torch.zeros(1, 1, 6, 1, 1), torch.ones(1))
    frames = out.flatten().tolist()
    # pyramid weights for 4 frames are [1, 2, 2, 1]. Frame 2: window 1 at position 2 (weight 2, value 1) and
    # window 2 at position 0 (weight 1, value 2); frame 3: positions 3 (weight 1) and 1 (weight 2).
    assert frames == pytest.approx([1, 1, (2 * 1 + 1 * 2) / 3, (1 * 1 + 2 * 2) / 3, 2, 2])


def test_windowed_sampling_runs_end_to_end_and_short_videos_pass_through():
    ms = sampling.FlowMatching()
    net = lambda x, t: torch.tanh(x) * 0.3 + t.view(-1, 1, 1, 1, 1) / 1000  # noqa: E731
    noise = torch.randn(1, 2, 10, 2, 2, generator=torch.Generator().manual_seed(1))
    sigmas = schedules.flow_sigmas(4, 3.0)
    plain = sampling.sample(ms, ms.wrap(net), noise, sigmas, "euler")
    windowed = sampling.sample(ms, context_window_denoiser(ms.wrap(net), ContextOptions(4, 1)), noise, sigmas, "euler")
    assert (plain - windowed).abs().max().item() < 1e-5  # the net is frame-local
    calls = []
    short = context_window_denoiser(lambda x, s: calls.append(x.shape[2]) or x, ContextOptions(16, 4))
    short(noise, torch.ones(1))
    assert calls == [10]


def test_invalid_options_are_rejected_with_clear_messages():
    with pytest.raises(KineFlowError, match="overlap"):
        ContextOptions(8, 8)
    with pytest.raises(KineFlowError, match="schedule"):
        ContextOptions(schedule="spiral")
    with pytest.raises(KineFlowError, match="fuse method"):
        ContextOptions(fuse_method="max")
    with pytest.raises(KineFlowError, match=r"\[B, C, T, H, W\]"):
        context_window_denoiser(lambda x, s: x, ContextOptions())(torch.zeros(1, 2, 3, 4), torch.ones(1))


def test_window_edges_and_seam_ratio():
    from kineflow.samplers.context import ContextOptions, seam_ratio, window_edges

    options = ContextOptions(length=16, overlap=4)
    edges = window_edges(64, options)
    assert edges and all(0 < e < 64 for e in edges)
    smooth = torch.linspace(0, 1, 64).view(64, 1, 1).expand(64, 8, 8)
    assert abs(seam_ratio(smooth, edges) - 1.0) < 1e-4
    jumpy = smooth.clone()
    for e in edges:
        jumpy[e:] += 0.05  # a visible jump at every window edge
    assert seam_ratio(jumpy, edges) > 1.5
