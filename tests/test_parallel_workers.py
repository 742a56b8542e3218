"""Parallel Options' worker devices inside ComfyUI (a stand-in ComfyUI here: its device, progress bar and interrupt
flag): this process is rank 0, gloo workers on "cpu" are ranks 1..N, kept between prompts. The shipped tiny
HunyuanVideo transformer with a LoRA (so the workers must rebuild the LoRA too) gives the one-process latent within
1e-5; a second call reuses the workers; ComfyUI's interrupt stops every rank at the same step and the pool stays; a
killed or hung worker ends the call with RankFailure within the rank timeout, and the next call starts new workers."""

import json
import os
import signal
import sys
import time
import types

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from kineflow.errors import InputFileError, KineFlowError, RankFailure
from kineflow.nodes.generation import KineFlowSampler
from kineflow.nodes.parallel import KineFlowParallelOptions
from kineflow.runtime import cli, distributed, generation, host, workers
from kineflow.runtime.lora import apply_lora
from kineflow.runtime.media import read_video
from kineflow.runtime.video_models import HunyuanVideoModel, load_video_model

WORKFLOW = host.PACK_DIR / "workflows" / "api" / "text_to_video.json"
TOLERANCE = 1e-5  # as tests/test_parallel.py
STEPS = 3
SETTINGS = dict(seed=7, cfg=2.5, shift=3.0, embedded_guidance=6.0, sampler_name="euler", scheduler="default",
                denoise=1.0)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="worker devices need Linux or macOS")


class StandInComfyUI:
    """ComfyUI's modules as far as the host uses them while a Sampler runs: its torch device, its interrupt flag
    (`interrupt`), and a progress bar recording each update and calling `on_update(value)`."""

    def __init__(self):
        self.interrupt = False
        self.updates: list[int] = []
        self.on_update = None
        management = types.ModuleType("comfy.model_management")
        management.InterruptProcessingException = type("InterruptProcessingException", (Exception,), {})
        management.get_torch_device = lambda: torch.device("cpu")
        management.throw_exception_if_processing_interrupted = self._throw
        utils = types.ModuleType("comfy.utils")
        utils.ProgressBar = lambda total: types.SimpleNamespace(update_absolute=self._update)
        server = types.ModuleType("server")
        server.PromptServer = types.SimpleNamespace(instance=types.SimpleNamespace(client_id=None, sockets={}))
        comfy = types.ModuleType("comfy")
        comfy.model_management, comfy.utils = management, utils
        self.modules = {"folder_paths": types.ModuleType("folder_paths"), "comfy": comfy,
                        "comfy.model_management": management, "comfy.utils": utils, "server": server}
        self.management = management

    def _throw(self):
        if self.interrupt:
            self.interrupt = False
            raise self.management.InterruptProcessingException()

    def _update(self, value, total, *args):
        self.updates.append(value)
        if self.on_update:
            self.on_update(value)


@pytest.fixture
def comfyui(monkeypatch):
    stand_in = StandInComfyUI()
    for name, module in stand_in.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    assert host.in_comfyui()
    return stand_in


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The shipped tiny transformer (fp32) with a LoRA on one layer, a guided conditioning, a latent, and the
    one-process result of STEPS steps."""
    lora = tmp_path_factory.mktemp("loras") / "tiny_lora.safetensors"
    g = torch.Generator().manual_seed(4)
    base_name = "lora_unet_double_blocks_0_img_attn_qkv"
    save_file({f"{base_name}.lora_down.weight": torch.randn(4, 128, generator=g) * 0.2,
               f"{base_name}.lora_up.weight": torch.randn(384, 4, generator=g) * 0.2,
               f"{base_name}.alpha": torch.tensor(4.0)}, str(lora))
    base = load_video_model("kineflow_tiny_dit.safetensors", "fp32")
    model = apply_lora(base, str(lora), 1.0)
    config = model.net.config

    def prompt(real: int) -> dict:
        mask = torch.zeros(1, 8, dtype=torch.long)
        mask[0, :real] = 1
        return {"text_states": torch.randn(1, 8, config.text_states_dim, generator=g), "text_mask": mask,
                "text_states_2": torch.randn(1, config.text_states_dim_2, generator=g)}

    conditioning = {"positive": prompt(6), "negative": prompt(3)}
    latent = {"samples": torch.zeros(1, 16, 3, 6, 10), "latent_format": "hunyuan_video"}
    reference = generation.sample_video(model, conditioning, latent, steps=STEPS, **SETTINGS)["samples"]
    without_lora = generation.sample_video(base, conditioning, latent, steps=STEPS, **SETTINGS)["samples"]
    assert float((reference - without_lora).abs().max()) > 1e-2, "the LoRA must change the result"
    yield types.SimpleNamespace(model=model, conditioning=conditioning, latent=latent, reference=reference)
    workers.shutdown()
    assert not dist.is_initialized(), "closing the pool must leave this process out of any process group"


def sample(tiny, devices: str, steps: int = STEPS, **degrees):
    """The Sampler node fed by a Parallel Options node, as ComfyUI runs them."""
    (parallel,) = KineFlowParallelOptions().build(degrees.get("ulysses", 0), degrees.get("ring", 0),
                                                  degrees.get("cfg", 0), devices)
    settings = {**SETTINGS, "steps": steps}
    (latent,) = KineFlowSampler().sample(tiny.model, tiny.conditioning, tiny.latent, parallel=parallel, **settings)
    return latent["samples"]


def pids() -> list[int]:
    pool = workers.current_pool()
    return [worker.process.pid for worker in pool.workers] if pool else []


def test_two_workers_give_the_one_process_output(tiny, comfyui):
    out = sample(tiny, "cpu, cpu")
    assert float((out - tiny.reference).abs().max()) <= TOLERANCE
    assert comfyui.updates == list(range(1, STEPS + 1)), "rank 0 reports every step through ComfyUI's bar, once"
    pool = workers.current_pool()
    assert pool.world == 3 and len(pids()) == 2 and pool.alive()
    print(f"2 workers started and joined in {pool.start_seconds:.1f} s")


def test_a_second_call_reuses_the_workers(tiny, comfyui):
    before = pids()
    out = sample(tiny, "cpu,cpu", ring=3)  # other degrees, same devices: the same workers
    assert pids() == before
    assert float((out - tiny.reference).abs().max()) <= TOLERANCE


def test_comfyuis_interrupt_stops_every_rank_and_the_next_call_works(tiny, comfyui):
    before = pids()
    interrupted_at = []

    def interrupt(value):
        if value == 2:
            comfyui.interrupt = True
            interrupted_at.append(time.monotonic())

    comfyui.on_update = interrupt
    with pytest.raises(comfyui.management.InterruptProcessingException):
        sample(tiny, "cpu,cpu", steps=200)
    assert time.monotonic() - interrupted_at[0] < 5, "every rank stops at the step where ComfyUI interrupted"
    assert comfyui.updates == [1, 2]
    comfyui.on_update = None
    assert pids() == before and workers.current_pool().alive()
    out = sample(tiny, "cpu,cpu")
    assert pids() == before
    assert float((out - tiny.reference).abs().max()) <= TOLERANCE


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_lost_worker_ends_the_call_within_the_timeout_and_the_next_call_starts_new_ones(tiny, comfyui,
                                                                                         monkeypatch, how):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "4")
    sample(tiny, "cpu,cpu")  # a pool with the 4 s timeout
    before = pids()
    victim = before[1]
    lost_at = []

    def lose(value):
        if value == 2 and not lost_at:
            os.kill(victim, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
            lost_at.append(time.monotonic())

    comfyui.on_update = lose
    with pytest.raises(RankFailure) as failure:
        sample(tiny, "cpu,cpu", steps=200)
    took = time.monotonic() - lost_at[0]
    message = str(failure.value)
    print(f"{how}: the call ended {took:.1f} s after the worker was lost: {message}")
    expected = f"worker rank 2 (pid {victim}, cpu) " + ("was killed by SIGKILL" if how == "killed" else
                                                         "did not answer within 4 s")
    assert expected in message and "nothing was written" in message, message
    assert took < (4 if how == "killed" else 4 + 6), f"the call ended {took:.1f} s after the worker was lost"
    assert workers.current_pool() is None and not dist.is_initialized()
    for pid in before:  # every worker of the failed pool was stopped (and reaped)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    comfyui.on_update = None
    out = sample(tiny, "cpu,cpu")
    assert set(pids()).isdisjoint(before)
    assert float((out - tiny.reference).abs().max()) <= TOLERANCE


def test_kineflow_run_of_one_process_starts_the_workers_the_same_way(tiny, tmp_path):
    """Outside ComfyUI too, a device list makes the one process rank 0 of workers it starts: the same frames as alone
    (the files differ by the workflow they embed)."""
    workflow = json.loads(WORKFLOW.read_text())
    workflow["6"]["inputs"]["steps"] = 3
    (tmp_path / "alone.json").write_text(json.dumps(workflow))
    workflow["9"] = {"class_type": "KineFlowParallelOptions",
                     "inputs": {"ulysses": 0, "ring": 0, "cfg": 0, "devices": "cpu"}}
    workflow["6"]["inputs"]["parallel"] = ["9", 0]
    (tmp_path / "workers.json").write_text(json.dumps(workflow))
    for name in ("alone", "workers"):
        assert cli.main(["run", str(tmp_path / f"{name}.json"), "--output-dir", str(tmp_path / name),
                         "--device", "cpu"]) == 0
    assert workers.current_pool().world == 2
    (alone,), (split,) = (sorted(p for p in (tmp_path / name).rglob("*") if p.is_file()) for name in ("alone", "workers"))
    frames_alone, frames_split = read_video(alone)[0], read_video(split)[0]
    assert frames_alone.std() > 0.02 and torch.equal(frames_split, frames_alone)


def test_bad_device_lists_say_what_was_expected_and_found(tiny, comfyui, monkeypatch):
    validate = KineFlowParallelOptions.VALIDATE_INPUTS
    assert validate(ulysses=0, ring=0, cfg=0, devices="cuda:1,cuda:2") is True
    assert validate(ulysses=0, ring=0, cfg=0, devices="") is True
    for text, found in (("cpu,gpu7", "'gpu7', item 2"), ("cuda", "'cuda', item 1"), ("cpu,,cpu", "'', item 2")):
        message = validate(ulysses=0, ring=0, cfg=0, devices=text)
        assert "expected a comma-separated list of devices" in message and f"found {found}" in message, message
    with pytest.raises(InputFileError, match="found 'cuda0', item 1"):
        sample(tiny, "cuda0")
    with pytest.raises(InputFileError, match=r"\(2 x 2 x 1\) do not divide the 3 processes"):
        sample(tiny, "cpu,cpu", ulysses=2, ring=2, cfg=1)
    if not torch.cuda.is_available():
        with pytest.raises(InputFileError, match="this PyTorch sees no CUDA device"):
            sample(tiny, "cuda:1")
    with pytest.raises(KineFlowError, match="was not made by Load Video Model and Load LoRA"):
        KineFlowSampler().sample(HunyuanVideoModel(net=tiny.model.net, dtype=torch.float32, source="in code"),
                                 tiny.conditioning, tiny.latent, steps=1, parallel=distributed.Degrees(devices=("cpu",)),
                                 **SETTINGS)
    with pytest.raises(KineFlowError, match="split a HunyuanVideo transformer; this model's family is animatediff"):
        workers.sample_video(types.SimpleNamespace(family="animatediff"), {}, {}, distributed.Degrees(devices=("cpu",)))
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost",
                        "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(InputFileError, match="already a rank of a run over several processes"):
        sample(tiny, "cpu")
