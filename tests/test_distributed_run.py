"""Runs over several processes (runtime/distributed.py): `kineflow run --nproc 2` writes what one process writes, only
rank 0 writes and reports, and a rank that dies or hangs ends every rank with exit 1 and nothing written. Also the
UNet family's context windows shared out over ranks (samplers/context.py), the same bit for bit."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from kineflow.errors import InputFileError
from kineflow.runtime import cli, distributed
from kineflow.samplers.context import ContextOptions, context_window_denoiser

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / "workflows" / "api" / "text_to_video.json"
LINUX = Path("/proc/self/environ").exists()


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "KINEFLOW_DEVICE")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _kineflow(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kineflow", "run", str(WORKFLOW), *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_two_processes_write_the_same_file_and_only_rank_0_writes(tmp_path):
    single = _kineflow(tmp_path, "--output-dir", "single")
    assert single.returncode == 0, single.stderr
    parallel = _kineflow(tmp_path, "--output-dir", "parallel", "--nproc", "2")
    assert parallel.returncode == 0, parallel.stderr
    written = _files(tmp_path / "parallel")
    assert [p.name for p in written] == ["text_to_video_00001_.mp4"]  # one file: rank 1 wrote none
    assert written[0].read_bytes() == _files(tmp_path / "single")[0].read_bytes()
    # rank 0 alone reports: one result line, one summary, and the plan said once
    assert parallel.stdout.count("node 8:") == 1
    assert parallel.stderr.count("done: 8 nodes") == 1 and parallel.stderr.count("saved ") == 1
    assert parallel.stderr.count("2 ranks split the transformer: ulysses 2 x ring 1 x cfg 1") == 1
    assert "Traceback" not in parallel.stderr


def test_unet_context_windows_over_two_processes_write_the_same_file(tmp_path):
    workflow = json.loads((REPO / "workflows" / "api" / "animatediff_tiny.json").read_text())
    workflow["9"] = {"class_type": "KineFlowContextOptions", "inputs": {
        "length": 8, "overlap": 2, "stride": 1, "schedule": "uniform", "fuse_method": "pyramid"}}
    workflow["6"]["inputs"]["context_options"] = ["9", 0]
    workflow["5"]["inputs"]["frames"] = 20  # 3 windows: rank 0 runs two, rank 1 one
    workflow["6"]["inputs"]["steps"] = 4
    (tmp_path / "wf.json").write_text(json.dumps(workflow))
    results = [subprocess.run([sys.executable, "-m", "kineflow", "run", "wf.json", "--output-dir", name, *args],
                              cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
               for name, args in (("single", []), ("parallel", ["--nproc", "2"]))]
    for result in results:
        assert result.returncode == 0, result.stderr
    assert "context windows are shared out over the ranks" in results[1].stderr
    single, parallel = _files(tmp_path / "single"), _files(tmp_path / "parallel")
    assert len(parallel) == 1 and parallel[0].read_bytes() == single[0].read_bytes()


def test_parallel_options_node_sets_the_split(tmp_path):
    workflow = json.loads(WORKFLOW.read_text())
    workflow["9"] = {"class_type": "KineFlowParallelOptions", "inputs": {"ulysses": 1, "ring": 2, "cfg": 0}}
    workflow["6"]["inputs"]["parallel"] = ["9", 0]
    (tmp_path / "wf.json").write_text(json.dumps(workflow))
    result = subprocess.run([sys.executable, "-m", "kineflow", "run", "wf.json", "--nproc", "2", "--ulysses", "2"],
                            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # the node's degrees win over the command line's; cfg 0 is chosen (1: the workflow's cfg is 1)
    assert "2 ranks split the transformer: ulysses 1 x ring 2 x cfg 1" in result.stderr
    assert len(_files(tmp_path / "output")) == 1


def test_parallel_options_in_a_one_process_run_say_they_do_nothing(caplog):
    class Model:
        family = "hunyuan_video"
        net = None

    with caplog.at_level("WARNING"), distributed.parallel_sampling(Model(), False, False, distributed.Degrees(2)):
        pass
    assert "Parallel Options has no effect in a run of one process" in caplog.text


def _rank_pids(launcher: int) -> dict[int, int]:
    """{rank: pid} of the workers the launcher started (their environment says their rank)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher:
            for item in environ:
                if item.startswith(b"RANK="):
                    ranks[int(item[5:])] = int(entry.name)
    return ranks


def _start_and_hit_rank_1(tmp_path: Path, sig: int, *args: str):
    """Start a long parallel run, send `sig` to rank 1 once sampling runs; returns (exit code, stdout, stderr, seconds
    from the signal to the end of the run (SIGSTOP: to rank 0's error), worker pids)."""
    proc = subprocess.Popen([sys.executable, "-m", "kineflow", "run", str(WORKFLOW), "--nproc", "2", "--output-dir",
                             "out", "--set", "6.steps=200", *args], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    sampling = threading.Event()
    workers: dict[int, int] = {}
    reported: list[float] = []

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "node 6 KineFlowSampler" in line:
                sampling.set()
            if line.startswith("[rank 0] error:") and sig == signal.SIGSTOP:
                # rank 0 has given up on the stopped rank: let it go on, so it takes the agent's SIGTERM at once
                # instead of the SIGKILL the agent sends 30 s later
                reported.append(time.monotonic())
                os.kill(workers[1], signal.SIGCONT)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while not sampling.wait(0.2) and proc.poll() is None and time.monotonic() < deadline:
            pass
        assert sampling.is_set(), "".join(lines)
        time.sleep(1.0)
        workers.update(_rank_pids(proc.pid))
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1], sig)
        hit = time.monotonic()
        proc.wait(timeout=90)
        elapsed = (reported[0] if reported else time.monotonic()) - hit
        stdout = proc.stdout.read()
        reader.join(5)
        return proc.returncode, stdout, "".join(lines), elapsed, workers
    finally:
        for pid in workers.values():  # nothing may outlive the test, whatever it found
            for s in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, s)
                except ProcessLookupError:
                    pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


@pytest.mark.skipif(not LINUX, reason="finds the ranks' processes through /proc")
def test_killing_one_rank_ends_every_rank_with_exit_1_and_nothing_written(tmp_path):
    code, stdout, stderr, elapsed, workers = _start_and_hit_rank_1(tmp_path, signal.SIGKILL)
    assert code == 1, stderr
    assert elapsed < 60
    assert "error: rank 1 (pid " in stderr and "was killed by SIGKILL" in stderr
    assert "every rank was stopped and nothing was written" in stderr
    # rank 0 says why it stopped: the agent stopped it, or it saw the connection to rank 1 close first
    assert ("[rank 0] error: stopped by the launcher" in stderr
            or "[rank 0] error: node 6 (KineFlowSampler) failed: rank 0 lost the other ranks while sampling" in stderr), stderr
    assert "Traceback" not in stderr and "node 8:" not in stdout
    assert _files(tmp_path / "out") == []  # no output, no temporary file
    assert all(_gone(pid) for pid in workers.values())


@pytest.mark.skipif(not LINUX, reason="finds the ranks' processes through /proc")
def test_a_hung_rank_ends_the_run_after_the_rank_timeout(tmp_path):
    code, stdout, stderr, elapsed, workers = _start_and_hit_rank_1(tmp_path, signal.SIGSTOP, "--rank-timeout", "3")
    assert code == 1, stderr
    assert elapsed < 20
    # rank 0 waited 3 s for the stopped rank inside the transformer's collectives, then failed with the reason
    assert "[rank 0] error: node 6 (KineFlowSampler) failed: rank 0 lost the other ranks while sampling" in stderr, stderr
    assert "did not answer within 3 s (--rank-timeout)" in stderr
    # the launcher names the rank it saw end first: rank 0 with its error, or rank 1, which the test lets go on once
    # rank 0 has given up and which then finds the connection closed
    assert re.search(r"error: rank [01] \(pid \d+\) exited with code 1", stderr), stderr
    assert "Traceback" not in stderr
    assert _files(tmp_path / "out") == []


@pytest.mark.skipif(not LINUX, reason="signals a process group")
def test_ctrl_c_stops_every_rank_with_exit_130(tmp_path):
    """Ctrl-C in a terminal reaches the launcher and every rank (one process group)."""
    proc = subprocess.Popen([sys.executable, "-m", "kineflow", "run", str(WORKFLOW), "--nproc", "2", "--output-dir",
                             "out", "--set", "6.steps=200"], cwd=tmp_path, env=_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "node 6 KineFlowSampler" in line:
                break
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)
        lines += proc.stderr.readlines()
        assert proc.wait(timeout=60) == 130, "".join(lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = "".join(lines)
    assert "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert _files(tmp_path / "out") == []


# --------------------------------------------------------------------------- refused before any worker starts
@pytest.mark.parametrize("args, message", [
    (["--nproc", "0"], "expected a whole number >= 1"),
    (["--nproc", "2", "--nnodes", "2"], "--nnodes above 1 needs --rdzv-endpoint"),
    (["--nproc", "2", "--nnodes", "3:2"], "1 <= MIN <= MAX"),
    (["--nproc", "2", "--cfg-parallel", "3"], "--cfg-parallel is 1 or 2"),
    (["--nproc", "2", "--ulysses", "1", "--ring", "1", "--cfg-parallel", "1"], "the product must equal it"),
    (["--nproc", "2", "--ulysses", "3"], "do not divide the 2 processes"),
    (["--nproc", "2", "--rank-timeout", "0"], "rank timeout must be a positive number"),
    (["--nproc", "2", "--set", "6.steps=0"], "workflow is invalid"),
    (["--nproc", "2", "--device", "meta"], "a dry run (--device meta) runs in one process"),
])
def test_bad_parallel_options_are_refused_with_exit_2(tmp_path, capsys, args, message, monkeypatch):
    started = []
    monkeypatch.setattr(distributed, "launch", lambda *a, **k: started.append(a) or 0)
    code = cli.main(["run", str(WORKFLOW), "--output-dir", str(tmp_path / "out"), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert started == [] and _files(tmp_path / "out") == []


def test_workers_get_the_command_line_without_the_launcher_options():
    takes_value = {"--set", "--nproc", "--nnodes", "--rdzv-endpoint", "--output-dir", "--ulysses"}
    argv = ["--debug", "run", "wf.json", "--nproc", "2", "--set", "3.x=--nproc", "--nnodes=1",
            "--rdzv-endpoint", "h:1", "--ulysses", "2", "--output-dir", "o"]
    assert distributed.worker_arguments(argv, takes_value) == [
        "--debug", "run", "wf.json", "--set", "3.x=--nproc", "--ulysses", "2", "--output-dir", "o"]


@pytest.mark.parametrize("world, guided, asked, heads, expected", [
    (2, False, (0, 0, 0), 4, (2, 1, 1)),   # all to Ulysses
    (2, True, (0, 0, 0), 4, (1, 1, 2)),    # guided: the two CFG passes on two ranks
    (4, True, (0, 0, 0), 4, (2, 1, 2)),
    (3, True, (0, 0, 0), 4, (1, 3, 1)),    # odd: no CFG split; 3 does not divide 4 heads: ring
    (4, False, (0, 0, 0), 2, (2, 2, 1)),   # Ulysses up to the heads, ring for the rest
    (4, True, (0, 2, 1), 4, (2, 2, 1)),    # asked degrees kept, the rest filled in
])
def test_default_plan(world, guided, asked, heads, expected):
    assert distributed.plan_degrees(world, guided, distributed.Degrees(*asked), heads)[:3] == expected


def test_degrees_that_do_not_fit_the_ranks_are_refused():
    with pytest.raises(InputFileError, match="must be the number of processes"):
        distributed.plan_degrees(4, False, distributed.Degrees(ulysses=3), 4)


# --------------------------------------------------------------------------- context windows over ranks
WINDOW_SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from kineflow.samplers.context import ContextOptions, context_window_denoiser
    dist.init_process_group("gloo")
    seen = []
    def denoiser(x, sigma):
        seen.append(x[0, 0, :, 0, 0].tolist())
        return torch.sin(x * 3.0 + sigma.view(-1, 1, 1, 1, 1)) * 0.7
    options = ContextOptions(**json.loads(sys.argv[1]))
    x = torch.load(sys.argv[2])
    out = context_window_denoiser(denoiser, options, group=dist.group.WORLD)(x, torch.tensor([0.5]))
    torch.save({"out": out, "seen": seen}, sys.argv[3] + str(dist.get_rank()))
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("options", [dict(length=4, overlap=1, schedule="static"),
                                     dict(length=4, overlap=2, stride=2, fuse_method="overlap-linear")])
def test_context_windows_shared_over_ranks_blend_the_same_bits(tmp_path, options):
    x = torch.randn(1, 2, 13, 3, 3, generator=torch.Generator().manual_seed(0))
    x[0, 0, :, 0, 0] = torch.arange(13.0)  # frame numbers: which windows each rank ran
    torch.save(x, tmp_path / "x.pt")
    _two_ranks(tmp_path, WINDOW_SCRIPT, json.dumps(options), str(tmp_path / "x.pt"), str(tmp_path / "r"))
    seen = []
    expected = context_window_denoiser(lambda v, s: seen.append(v[0, 0, :, 0, 0].tolist()) or
                                       torch.sin(v * 3.0 + s.view(-1, 1, 1, 1, 1)) * 0.7,
                                       ContextOptions(**options))(x, torch.tensor([0.5]))
    results = [torch.load(tmp_path / f"r{r}") for r in range(2)]
    for result in results:
        assert torch.equal(result["out"], expected)  # bit for bit, on every rank
    # each window ran once, on one rank: rank r ran windows r, r+2, ...
    assert results[0]["seen"] == seen[0::2] and results[1]["seen"] == seen[1::2]
    assert len(seen) > 2


# --------------------------------------------------------------------------- VAE decode over ranks
VAE_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from kineflow.models.hunyuan_video_vae import HunyuanVideoVAE, HunyuanVideoVAEConfig, TilingOptions
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    vae = HunyuanVideoVAE(HunyuanVideoVAEConfig.tiny()).eval()
    latents = torch.load(sys.argv[1])
    seen = []
    tiling = TilingOptions(tile_size=32, tile_overlap=16, tile_frames=8, frame_overlap=4)
    with torch.inference_mode():
        video = vae.decode(latents, tiling=tiling, callback=lambda done, total: seen.append((done, total)),
                           group=dist.group.WORLD)
    from kineflow.models.sd_vae import SDVAE, SDVAEConfig
    from kineflow.runtime.animatediff import SDVideoVAE
    torch.manual_seed(0)
    sd = SDVideoVAE(vae=SDVAE(SDVAEConfig.tiny()).eval(), dtype=torch.float32, source="tiny")
    sd_tiling = TilingOptions(tile_size=64, tile_overlap=0, tile_frames=4, frame_overlap=0)
    with torch.inference_mode():
        sd_video = sd.decode(torch.load(sys.argv[3]), sd_tiling, 1 << 30, lambda done, total: None,
                             group=dist.group.WORLD)
    torch.save({"video": video, "progress": seen, "sd": sd_video}, sys.argv[2] + str(dist.get_rank()))
    dist.destroy_process_group()
""")


def _two_ranks(tmp_path: Path, script: str, *args: str) -> None:
    (tmp_path / "script.py").write_text(script)
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "script.py"), *args],
                              env=_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()


def test_vae_decode_tiles_shared_over_ranks_give_the_same_bits(tmp_path):
    from kineflow.models.hunyuan_video_vae import HunyuanVideoVAE, HunyuanVideoVAEConfig, TilingOptions
    from kineflow.models.sd_vae import SDVAE, SDVAEConfig
    from kineflow.runtime.animatediff import SDVideoVAE

    config = HunyuanVideoVAEConfig.tiny()
    latents = torch.randn(1, config.latent_channels, 5, 8, 6, generator=torch.Generator().manual_seed(1))
    torch.save(latents, tmp_path / "latents.pt")
    sd_latents = torch.randn(1, 4, 9, 4, 4, generator=torch.Generator().manual_seed(2))
    torch.save(sd_latents, tmp_path / "sd.pt")
    _two_ranks(tmp_path, VAE_SCRIPT, str(tmp_path / "latents.pt"), str(tmp_path / "r"), str(tmp_path / "sd.pt"))
    torch.manual_seed(0)
    vae = HunyuanVideoVAE(config).eval()
    seen = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1): convolutions sum in another order with more threads
    try:
        with torch.inference_mode():
            expected = vae.decode(latents, tiling=TilingOptions(tile_size=32, tile_overlap=16, tile_frames=8,
                                                                frame_overlap=4),
                                  callback=lambda done, total: seen.append((done, total)))
            torch.manual_seed(0)
            sd = SDVideoVAE(vae=SDVAE(SDVAEConfig.tiny()).eval(), dtype=torch.float32, source="tiny")
            sd_expected = sd.decode(sd_latents, TilingOptions(tile_size=64, tile_overlap=0, tile_frames=4,
                                                              frame_overlap=0), 1 << 30, lambda done, total: None)
    finally:
        torch.set_num_threads(threads)
    assert seen[-1][1] > 2  # several tiles, so both ranks had some
    for r in range(2):
        result = torch.load(tmp_path / f"r{r}")
        assert torch.equal(result["video"], expected)
        assert result["progress"] == seen
        assert torch.equal(result["sd"], sd_expected)  # SD: chunks of 4 frames (3 of them) shared out
