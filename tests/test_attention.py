"""The attention dispatch (models/attention.py): every attention of every model goes through it, each backend that
can run here matches sdpa, calls a backend cannot run fall back to sdpa, and a backend that is chosen but not
installed is a clear error (exit 2 on the command line)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kineflow.errors import InputFileError
from kineflow.models import ATTENTION_BACKENDS, attention
from kineflow.models.animatediff import MotionModule, MotionModuleConfig, attach
from kineflow.models.attention import Backend, KeyPadding, attend, register, set_backend
from kineflow.models.clip_text import CLIPTextConfig, CLIPTextModel
from kineflow.models.hunyuan_video_dit import HunyuanVideoDiT, HunyuanVideoDiTConfig
from kineflow.models.hunyuan_video_vae import HunyuanVideoVAE, HunyuanVideoVAEConfig
from kineflow.models.llama_text import LlamaTextConfig, LlamaTextEncoder
from kineflow.models.sd15_unet import SD15UNet, SD15UNetConfig
from kineflow.models.sd_vae import SDVAE, SDVAEConfig
from kineflow.models.sparsectrl import SparseCtrl, SparseCtrlConfig
from kineflow.runtime import cli, host
from kineflow.runtime.executor import OutputCache, run_workflow
from kineflow.runtime.video_models import load_video_model

ROOT = Path(__file__).resolve().parent.parent
CUDA_ONLY = ("sageattention", "flash_attn", "xformers")


# --------------------------------------------------------------------------- every model, one small run each
def _dit_run(model, text_lengths=(5, 3)):
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    batch = len(text_lengths)
    mask = torch.zeros(batch, 6, dtype=torch.long)
    for row, length in enumerate(text_lengths):
        mask[row, :length] = 1
    return model(torch.randn(batch, 16, 2, 4, 4, generator=g), torch.tensor([500.0] * batch),
                 torch.randn(batch, 6, cfg.text_states_dim, generator=g), mask,
                 torch.randn(batch, cfg.text_states_dim_2, generator=g), torch.tensor([6000.0] * batch))


def _animatediff_run(model):
    g = torch.Generator().manual_seed(0)
    return model(torch.randn(4, 4, 8, 8, generator=g), torch.tensor([500] * 4),
                 torch.randn(4, 7, model.unet.config.context_dim, generator=g), video_frames=4)


def _sparsectrl():
    model = SparseCtrl(SparseCtrlConfig.tiny())
    for p in model.parameters():  # the zero-initialised output convs and temporal projections would hide everything
        if not p.any():
            p.data.normal_(0.0, 0.05)
    return model


def _sparsectrl_run(model):
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(4, 1, 8, 8)
    mask[0] = 1.0
    down, mid = model(torch.randn(4, 4, 8, 8, generator=g), torch.tensor([500] * 4), torch.randn(4, 7, 32, generator=g),
                      torch.randn(4, 4, 8, 8, generator=g) * mask, mask, video_frames=4)
    return mid


MODELS = {
    "hunyuan_dit": (lambda: HunyuanVideoDiT(HunyuanVideoDiTConfig.tiny()), _dit_run),
    "hunyuan_vae": (lambda: HunyuanVideoVAE(HunyuanVideoVAEConfig.tiny()),
                    lambda m: m.decode(torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(0)))),
    "sd15_unet_and_motion_module": (lambda: attach(SD15UNet(SD15UNetConfig.tiny()),
                                                   MotionModule(MotionModuleConfig.tiny())), _animatediff_run),
    "sparsectrl": (_sparsectrl, _sparsectrl_run),
    "sd_vae": (lambda: SDVAE(SDVAEConfig.tiny()),
               lambda m: m.decode(torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)))),
    "clip": (lambda: CLIPTextModel(CLIPTextConfig.tiny()),
             lambda m: m(torch.tensor([[1, 5, 7, 2, 0]]), torch.tensor([[1, 1, 1, 1, 0]])).last_hidden_state),
    "llama": (lambda: LlamaTextEncoder(LlamaTextConfig.tiny()),
              lambda m: m(torch.tensor([[1, 5, 7, 2, 0]]), torch.tensor([[1, 1, 1, 1, 0]]))),
}


def _run(name: str, backend: str) -> torch.Tensor:
    build, run = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    set_backend(model, backend)
    with torch.inference_mode():
        return run(model)


RECORDED: list[str] = []


def _recording(q, k, v, mask):
    RECORDED.append(type(mask).__name__)
    return attention.SDPA.run(q, k, v, mask)


register(Backend("recording", _recording))


@pytest.mark.parametrize("name", MODELS)
def test_every_attention_of_every_model_goes_through_the_dispatch(name, monkeypatch):
    """Each kernel call happens inside the registered backend: a model calling a kernel itself would make the
    counts differ."""
    kernel_calls = []
    kernel = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: kernel_calls.append(1) or kernel(*a, **kw))
    RECORDED.clear()
    _run(name, "recording")
    assert RECORDED and len(RECORDED) == len(kernel_calls), (RECORDED, len(kernel_calls))
    if name == "hunyuan_dit":  # right-padded prompts reach the refiner and the joint attention as KeyPadding
        assert set(RECORDED) == {"KeyPadding"}


def test_no_model_calls_an_attention_kernel_itself():
    models = ROOT / "models"
    callers = [p.name for p in models.glob("*.py") if "scaled_dot_product_attention(" in p.read_text()]
    assert callers == ["attention.py"], callers


def test_the_choices_are_the_implemented_backends():
    """Every name of the nodes' and CLI's list is a backend (possibly not installed here); others are refused."""
    for name in ATTENTION_BACKENDS:
        try:
            set_backend(torch.nn.Linear(2, 2), name)
        except InputFileError as exc:
            assert name in CUDA_ONLY and "cannot be imported" in str(exc), exc
    with pytest.raises(InputFileError, match="unknown attention backend 'fast'"):
        set_backend(torch.nn.Linear(2, 2), "fast")


# --------------------------------------------------------------------------- parity with sdpa
def _runnable_here(name: str) -> None:
    """Skip a backend this machine cannot run: not installed, or CUDA-only without a GPU."""
    try:
        attention.check(name, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    except InputFileError as exc:
        pytest.skip(f"{name} cannot run here: {exc}")


def _qkv(device, dtype, length=64, heads=4, head_dim=64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, length, heads, head_dim, generator=g).to(device, dtype).transpose(1, 2) for _ in range(3)]


@pytest.mark.parametrize("name", [n for n in ATTENTION_BACKENDS if n != "sdpa"])
def test_each_available_backend_matches_sdpa(name):
    _runnable_here(name)
    on_gpu = name in CUDA_ONLY
    device, dtype = ("cuda", torch.bfloat16) if on_gpu or name == "tiled" else ("cpu", torch.float32)
    device = "cpu" if name == "tiled" else device  # tiled runs bf16 on the CPU (fp32 calls go to sdpa)
    # sageattention quantizes q and k to 8 bits; tiled rounds its scores to bf16; the others are exact up to rounding
    tolerance = 3e-2 if on_gpu or name == "tiled" else 1e-5
    q, k, v = _qkv(device, dtype)
    lengths = (64, 37)
    dense = (torch.arange(64, device=device) < torch.tensor(lengths, device=device)[:, None])[:, None, None, :]
    for mask in (None, KeyPadding(dense, lengths)):
        expected = attend(*(t.float() for t in (q, k, v)), mask, "sdpa")
        got = attend(q, k, v, mask, name).float()
        rows = slice(None) if mask is None else slice(0, 37)  # padded queries of item 1 are nobody's concern
        assert (got[:, :, rows] - expected[:, :, rows]).abs().max() <= tolerance * expected.abs().max()
    if not on_gpu:
        for model in MODELS:
            expected, got = _run(model, "sdpa"), _run(model, name)
            assert (got - expected).abs().max() <= tolerance * expected.abs().max(), model


def _counting_fused_kernel(monkeypatch) -> list:
    calls, kernel = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    return calls


def test_tiled_runs_bf16_cpu_calls_itself_and_leaves_the_others_to_sdpa(monkeypatch):
    calls = _counting_fused_kernel(monkeypatch)
    q, k, v = _qkv("cpu", torch.bfloat16, length=150)  # three tiles of queries, the last one short
    expected = attend(*(t.float() for t in (q, k, v)), None, "sdpa")
    calls.clear()
    got = attend(q, k, v, None, "tiled")
    assert calls == [] and got.dtype == torch.bfloat16 and got.shape == q.shape
    assert (got.float() - expected).abs().max() <= 2e-2 * expected.abs().max()
    attend(q.float(), k.float(), v.float(), None, "tiled")  # fp32: torch's fused kernel is as fast
    dense = torch.ones(2, 1, 150, 150, dtype=torch.bool)
    attend(q, k, v, dense, "tiled")  # a general mask
    assert len(calls) == 2


@pytest.mark.parametrize("score_bytes", [4 << 20, 3 * 4 * 64 * 150, 4 * 64 * 150, 1])
def test_tiles_of_fewer_heads_when_the_scores_of_all_would_not_fit(monkeypatch, score_bytes):
    """2 items x 4 heads, 150 keys: all 8 heads in one tile, then 3 (the last group short), then one, then one (a tile
    of one head never splits further); right-padded keys included."""
    monkeypatch.setattr(attention, "TILE_SCORE_BYTES", score_bytes)
    q, k, v = _qkv("cpu", torch.bfloat16, length=150)
    lengths = (150, 97)
    padding = KeyPadding((torch.arange(150)[None] < torch.tensor(lengths)[:, None])[:, None, None], lengths)
    for mask in (None, padding):
        expected = attend(*(t.float() for t in (q, k, v)), mask, "sdpa")
        got = attend(q, k, v, mask, "tiled").float()
        assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()


def test_auto_uses_the_tiles_on_a_native_bf16_cpu_at_any_thread_count(monkeypatch):
    from kineflow.runtime import acceleration, cpu

    calls = _counting_fused_kernel(monkeypatch)
    q, k, v = _qkv("cpu", torch.bfloat16, length=300)  # 2 x 4 heads x 64 rows x 300 keys x 64: 9.8M per tile
    small = _qkv("cpu", torch.bfloat16, length=20, head_dim=32)  # a tiny model's text: too small to repay tiles
    threads = torch.get_num_threads()
    try:
        for native, thread_count, tiled in ((None, 1, False), (None, 2, False), ("AMX", 1, True), ("AMX", 2, True)):
            monkeypatch.setattr(cpu, "native_bf16", lambda: native)
            acceleration.resolve_attention("auto", torch.device("cpu"))
            torch.set_num_threads(thread_count)
            calls.clear()
            attend(q, k, v, None, "auto")
            assert calls == ([] if tiled else [1]), (native, thread_count)
            calls.clear()
            attend(*small, None, "auto")
            assert calls == [1]
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # a compiled block keeps the fused kernel
        calls.clear()
        attend(q, k, v, None, "auto")
        assert calls == [1]
    finally:
        torch.set_num_threads(threads)
        attention.use_cpu_tiles(False)


def test_packed_sequences_give_the_masked_result():
    """The varlen packing (used with flash_attn's and sageattention's kernels) against a masked sdpa call, with a
    reference kernel of the same signature: one sequence per item's real tokens and one per its padding."""

    def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
        out = torch.empty_like(q)
        for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            part = [t[start:end].transpose(0, 1) for t in (q, k, v)]
            out[start:end] = F.scaled_dot_product_attention(*part).transpose(0, 1)
        return out

    q, k, v = _qkv("cpu", torch.float32, length=8)
    lengths = (8, 5)  # one item without padding: no empty sequence is packed
    dense = (torch.arange(8) < torch.tensor(lengths)[:, None])[:, None, None, :]
    got = attention._varlen(reference_varlen, q, k, v, KeyPadding(dense, lengths))
    expected = attend(q, k, v, dense)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1, :, :5], expected[1, :, :5])


def test_a_call_the_backend_cannot_run_goes_to_sdpa():
    register(Backend("picky", lambda q, k, v, mask: torch.zeros_like(q), accepts=lambda q, k, mask: mask is None))
    q, k, v = _qkv("cpu", torch.float32, length=8)
    dense = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    assert not attend(q, k, v, None, "picky").any()
    torch.testing.assert_close(attend(q, k, v, dense, "picky"), attend(q, k, v, dense, "sdpa"))


def test_auto_on_a_cpu_is_sdpa():
    q, k, v = _qkv("cpu", torch.float32, length=8)
    assert torch.equal(attend(q, k, v, None, "auto"), attend(q, k, v, None, "sdpa"))


# --------------------------------------------------------------------------- loaders and the command line
def test_the_loader_choice_overrides_the_run_default():
    def backends(model):
        return {m.attention_backend for m in model.net.modules() if hasattr(m, "attention_backend")}

    assert backends(load_video_model("kineflow_tiny_dit.safetensors")) == {"auto"}
    assert backends(load_video_model("kineflow_tiny_dit.safetensors", attention="sdpa_math")) == {"sdpa_math"}
    with host.configured(attention="sdpa_math"):
        assert backends(load_video_model("kineflow_tiny_dit.safetensors")) == {"sdpa_math"}
        assert backends(load_video_model("kineflow_tiny_dit.safetensors", attention="sdpa")) == {"sdpa"}


def test_the_runs_attention_reaches_the_loaders(tmp_path):
    results = run_workflow(str(ROOT / "workflows" / "api" / "text_to_video.json"), output_dir=tmp_path,
                           cache=OutputCache(), attention="sdpa_math", overrides=["6.steps=1", "5.frames=1"])
    (model,) = [out for r in results.values() for out in r["outputs"][:1] if hasattr(out, "net")]
    assert {block.attention_backend for block in model.net.compile_blocks()} == {"sdpa_math"}


def test_cli_passes_attention_and_compile_to_the_run(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(cli, "run_workflow", lambda file, **options: seen.update(options) or {})
    assert cli.main(["run", "x.json", "--attention", "sdpa_math", "--compile", "--output-dir", str(tmp_path)]) == 0
    assert seen["attention"] == "sdpa_math" and seen["compile"] is True
    assert cli.main(["run", "x.json", "--output-dir", str(tmp_path)]) == 0
    assert seen["attention"] is None and seen["compile"] is None  # the loaders' own defaults


@pytest.mark.parametrize("name", CUDA_ONLY)
def test_a_backend_that_cannot_run_is_a_clear_error(name, capsys, tmp_path):
    """Not installed here (or installed, on a machine without a GPU): exit 2 before anything loads, and the
    loader refuses it too."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    workflow = str(ROOT / "workflows" / "api" / "text_to_video.json")
    assert cli.main(["run", workflow, "--attention", name, "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"attention backend {name!r}" in err and ("pip install" in err or "CUDA GPUs only" in err), err
    with pytest.raises(InputFileError, match=f"attention backend {name!r}"):
        load_video_model("kineflow_tiny_dit.safetensors", attention=name)
