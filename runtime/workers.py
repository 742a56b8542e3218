"""Worker processes for a run of one process (a ComfyUI server, or `kineflow run` without --nproc): Parallel Options'
device list starts one worker per listed device, and the Sampler's HunyuanVideo transformer is split over this
process (rank 0, on its own compute device) and the workers (ranks 1..N, in the order listed).

- Engine: a fresh Python interpreter per worker (`subprocess`, what torch.multiprocessing's spawn starts too), running
  this module's `worker_main` with a socket pair as its control channel. Not spawn itself: inside ComfyUI spawn re-runs
  ComfyUI's main.py in every child and pickles the target by a module name the child cannot import. DEVELOPING.md
  ("Runs over several processes") gives the measurements and why not Ray.
- Pool: the workers are started on the first prompt that names the devices and kept between prompts (one pool,
  keyed by the device list, this process's device and the rank timeout; the degrees only change the plan, whose
  process groups are built once per plan). This process joins a torch.distributed process group with them (gloo on
  the CPU, nccl on CUDA; a TCP store on a free localhost port) and leaves it when the pool is closed. A pool whose
  worker died between prompts is closed and started again.
- A call: rank 0 sends each worker the model's recipe (its files and load options, runtime/video_models.LoadRecipe;
  a worker keeps the last model it loaded) and the sampling inputs, then every rank runs the same
  `generation.sample_video`; only rank 0 reports progress and previews through the host. After each step the ranks
  agree whether to go on (`distributed.step_agreement`): ComfyUI's interrupt, checked by rank 0's progress update,
  stops every rank at the same step and the pool stays usable.
- Failure: anything else that ends a call early (a worker killed, hung past the rank timeout or failed; rank 0's own
  error) closes the pool (its workers are killed) and rank 0 raises RankFailure naming the worker and what happened.
  The next prompt starts new workers. The Sampler writes nothing, so a failed call leaves no file behind.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import io
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection

from ..errors import InputFileError, KineFlowError, RankFailure, StoppedByRankZero
from . import distributed, host

log = logging.getLogger(__name__)

PACKAGE = __name__.split(".")[0]  # this pack's module name here (inside ComfyUI, the name ComfyUI gave it)
WORKER_PACKAGE = "kineflow"  # the name a worker imports the pack under
START_TIMEOUT = 300.0  # seconds a worker may take to import torch and the pack and report ready
EXIT_TIMEOUT = 5.0  # seconds a worker asked to exit gets before it is killed
DEVICE_FORMAT = "a comma-separated list of devices, one per worker, such as 'cuda:1,cuda:2' or 'cpu,cpu'"
# A worker's interpreter loads the pack from its folder under WORKER_PACKAGE, then runs worker_main.
_BOOT = ("import importlib, importlib.util, sys; pack, name = sys.argv[1], sys.argv[2]; "
         "spec = importlib.util.spec_from_file_location(name, pack + '/__init__.py', submodule_search_locations=[pack]); "
         "module = importlib.util.module_from_spec(spec); sys.modules[name] = module; spec.loader.exec_module(module); "
         "sys.exit(importlib.import_module(name + '.runtime.workers').worker_main(*sys.argv[3:]))")


# --------------------------------------------------------------------------- the device list
def _items(text: str) -> list[str]:
    return [item.strip().lower() for item in text.split(",")] if text.strip() else []


def device_list_problem(text: str) -> str | None:
    """None when `text` is a well-formed device list (or empty: no workers), else what is wrong. torch-free: node
    validation calls it."""
    for index, item in enumerate(_items(text), 1):
        kind, colon, number = item.partition(":")
        if (kind == "cpu" and not colon) or (kind == "cuda" and number.isdigit()):
            continue
        return (f"devices: expected {DEVICE_FORMAT} (a CUDA device with its number); found {item!r}, item {index} "
                f"of {text.strip()!r}")
    return None


def parse_devices(text: str) -> tuple[str, ...]:
    """The workers' devices of a device list, normalized; InputFileError when it is malformed."""
    problem = device_list_problem(text)
    if problem:
        raise InputFileError(problem)
    return tuple(_items(text))


def check_devices(devices: tuple[str, ...], own) -> None:
    """Refuse workers' devices this machine lacks, or that cannot join this process (`own`: its compute device) in
    one process group: gloo joins CPU processes, nccl CUDA ones with a device each."""
    if own.type not in ("cpu", "cuda"):
        raise InputFileError(f"worker devices need this process to compute on CUDA or the CPU; it computes on "
                             f"{own.type}")
    for name in devices:
        device = host.parse_device(name)
        if device.type != own.type:
            raise InputFileError(f"worker devices must be of the type this process computes on ({own}, so "
                                 f"{'cpu' if own.type == 'cpu' else 'cuda:N'} for each worker); found {name!r}")
    if own.type == "cuda":
        taken = [f"cuda:{own.index if own.index is not None else 0}", *devices]
        twice = sorted({name for name in taken if taken.count(name) > 1})
        if twice:
            raise InputFileError(f"each worker needs a CUDA device of its own, and not this process's ({taken[0]}); "
                                 f"found {', '.join(twice)} more than once in {', '.join(taken)}")


# --------------------------------------------------------------------------- messages
def _send(conn: Connection, message) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


class _Unpickler(pickle.Unpickler):
    """Reads classes of the sender's name for the pack (`sender`) under this process's name for it."""

    def __init__(self, data: bytes, sender: str):
        super().__init__(io.BytesIO(data))
        self.sender = sender

    def find_class(self, module, name):
        if module == self.sender or module.startswith(self.sender + "."):
            module = PACKAGE + module[len(self.sender):]
        return super().find_class(module, name)


def _receive(conn: Connection, sender: str):
    return _Unpickler(conn.recv_bytes(), sender).load()


def _on_cpu(value):
    """`value` (dicts, lists and tuples of tensors and plain values) with every tensor on the CPU, to be sent."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_on_cpu(item) for item in value)
    return value


# --------------------------------------------------------------------------- the pool (rank 0's side)
@dataclasses.dataclass
class _Worker:
    rank: int
    device: str
    process: subprocess.Popen
    conn: Connection

    def describe(self) -> str:
        return f"worker rank {self.rank} (pid {self.process.pid}, {self.device})"

    def ended(self) -> str | None:
        """How the process ended, or None while it runs."""
        code = self.process.poll()
        if code is None:
            return None
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-code).name}"
            return f"was killed by signal {-code}"
        return f"exited with code {code}"


def _child_environment(world: int) -> dict:
    """The workers' environment: this process's, with OpenMP threads shared out over the ranks (unless the user
    set OMP_NUM_THREADS) and passive OpenMP waiting. This process's own settings are left alone."""
    environment = dict(os.environ)
    environment.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    environment.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return environment


class Pool:
    """The workers of one device list, and this process's membership of their process group."""

    def __init__(self, devices: tuple[str, ...], own, timeout: float):
        self.devices, self.own, self.timeout = devices, own, timeout
        self.key = (devices, str(own), timeout)
        self.world = len(devices) + 1
        self.workers: list[_Worker] = []
        self.groups: dict = {}  # plan -> ParallelGroups (distributed.apply_plan), kept between calls
        self.announced: set = set()
        self.store = None
        self.joined = False
        self.start_seconds = 0.0  # from the first worker started to the process group joined

    # ----------------------------------------------------------------- start and stop
    def start(self) -> None:
        import torch.distributed as dist

        if sys.platform == "win32":
            raise KineFlowError("worker devices need Linux or macOS (the workers' control channel is a socket pair "
                                "passed to them); on Windows leave Parallel Options' devices empty")
        if dist.is_initialized():
            raise KineFlowError("this process already belongs to a torch.distributed process group (set up by "
                                "another node pack or script); worker devices need it free")
        began = time.monotonic()
        self.store = dist.TCPStore("127.0.0.1", 0, self.world, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=START_TIMEOUT))
        environment = _child_environment(self.world)
        for rank, device in enumerate(self.devices, 1):
            mine, theirs = socket.socketpair()
            try:
                process = subprocess.Popen(
                    [sys.executable, "-c", _BOOT, str(host.PACK_DIR), WORKER_PACKAGE, str(theirs.fileno()), str(rank),
                     str(self.world), device, str(self.store.port), repr(self.timeout), PACKAGE],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=environment,
                    start_new_session=True)  # Ctrl-C in ComfyUI's terminal is for ComfyUI, which stops the workers
            finally:
                theirs.close()
            self.workers.append(_Worker(rank, device, process, Connection(mine.detach())))
        for worker in self.workers:
            self._wait_ready(worker, began + START_TIMEOUT)
        options = {"device_id": self.own} if self.own.type == "cuda" else {}
        dist.init_process_group("nccl" if self.own.type == "cuda" else "gloo", store=self.store, rank=0,
                                world_size=self.world, timeout=datetime.timedelta(seconds=max(distributed.MEETING_TIMEOUT,
                                                                                               self.timeout)),
                                **options)
        self.joined = True
        self.start_seconds = time.monotonic() - began
        log.info("KineFlow: %d worker(s) on %s started and joined in %.1f s (pids %s)", len(self.workers),
                 ", ".join(self.devices), self.start_seconds, ", ".join(str(w.process.pid) for w in self.workers))

    def _wait_ready(self, worker: _Worker, deadline: float) -> None:
        while not worker.conn.poll(0.1):
            ended = worker.ended()
            if ended:
                raise RankFailure(f"{worker.describe()} {ended} while starting (its messages, if any, are above in "
                                  "the log)")
            if time.monotonic() > deadline:
                raise RankFailure(f"{worker.describe()} did not start within {START_TIMEOUT:g} s")
            host.check_interrupt()
        reply = _receive(worker.conn, WORKER_PACKAGE)
        if reply[0] != "ready":
            raise RankFailure(f"{worker.describe()} could not start: {reply[1]}")

    def alive(self) -> bool:
        return self.joined and all(worker.ended() is None for worker in self.workers)

    def close(self, gently: bool = False) -> None:
        """Stop the workers (`gently`: ask them to exit first) and leave their process group."""
        for worker in self.workers:
            if gently and worker.ended() is None:
                with contextlib.suppress(OSError):
                    _send(worker.conn, ("exit",))
        for worker in self.workers:
            if gently:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.process.wait(EXIT_TIMEOUT)
            if worker.ended() is None:
                worker.process.kill()
            worker.process.wait()
            worker.conn.close()
        self.workers = []
        self.groups = {}
        if self.joined:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            self.joined = False
        self.store = None

    # ----------------------------------------------------------------- one call
    def replies(self, expected: str) -> list[str]:
        """Wait (up to the rank timeout each) for every worker's reply to a call; what went wrong, if anything."""
        problems = []
        for worker in self.workers:
            deadline = time.monotonic() + self.timeout
            while not worker.conn.poll(0.1):
                if worker.ended() or time.monotonic() > deadline:
                    problems.append(f"{worker.describe()} {worker.ended() or f'did not answer within {self.timeout:g} s'}")
                    break
            else:
                reply = _receive(worker.conn, WORKER_PACKAGE)
                if reply[0] != expected:
                    problems.append(f"{worker.describe()} failed: {reply[1]}" if reply[0] == "failed" else
                                    f"{worker.describe()} answered {reply[0]!r}, expected {expected!r}")
        return problems

    def reports(self) -> list[str]:
        """After a call that failed: the workers that ended or failed on their own, else those that did not answer
        (hung), else those that only lost the others (their RankFailure)."""
        causes, silent, lost = [], [], []
        settle = time.monotonic() + 1.0  # a killed worker's exit shows a moment after its sockets close
        for worker in self.workers:
            # A worker that fails sends its message and exits at once: wait for the exit before reading, or a worker
            # that only lost a hung peer (its RankFailure) would be reported by its exit code as the cause.
            while worker.ended() is None and time.monotonic() < settle:
                time.sleep(0.05)
            message = None
            with contextlib.suppress(OSError, EOFError):
                if worker.conn.poll(0):
                    message = _receive(worker.conn, WORKER_PACKAGE)
            if message and message[0] == "failed":
                (lost if message[1].startswith(RankFailure.__name__) else causes).append(
                    f"{worker.describe()} failed: {message[1]}")
                continue
            if worker.ended():
                causes.append(f"{worker.describe()} {worker.ended()}")
            else:
                silent.append(f"{worker.describe()} did not answer within {self.timeout:g} s ({distributed.TIMEOUT_ENV})")
        return causes or silent or lost


_POOL: Pool | None = None


def current_pool() -> Pool | None:
    """The running pool, if any."""
    return _POOL


def shutdown() -> None:
    """Stop the workers, if any (at exit, and before a pool of other devices starts)."""
    global _POOL
    if _POOL is not None:
        _POOL.close(gently=True)
        _POOL = None


def _pool(devices: tuple[str, ...], own, timeout: float) -> Pool:
    global _POOL
    key = (devices, str(own), timeout)
    if _POOL is not None and not _POOL.alive():
        lost = "; ".join(f"{w.describe()} {w.ended()}" for w in _POOL.workers if w.ended()) or "it was closed"
        log.warning("KineFlow: the workers are started again (%s since the last prompt)", lost)
        _POOL.close()
        _POOL = None
    if _POOL is not None and _POOL.key != key:
        shutdown()
    if _POOL is None:
        pool = Pool(devices, own, timeout)
        try:
            pool.start()
        except BaseException:
            pool.close()
            raise
        _POOL = pool
    return _POOL


atexit.register(shutdown)


def _recipe(model):
    family = getattr(model, "family", type(model).__name__)
    if family != "hunyuan_video":
        raise KineFlowError(f"Parallel Options' worker devices split a HunyuanVideo transformer; this model's "
                            f"family is {family}. Its context windows are shared over processes by `kineflow run --nproc N`; "
                            "here, leave devices empty")
    if getattr(model, "recipe", None) is None:
        raise KineFlowError(f"the workers rebuild the model from its files, and this HunyuanVideo model "
                            f"({model.source}) was not made by Load Video Model and Load LoRA alone; worker devices "
                            "do not support it yet, leave devices empty")
    return model.recipe


def sample_video(model, conditioning: dict, latent: dict, parallel, **options) -> dict:
    """`generation.sample_video` over this process (rank 0) and the workers of `parallel.devices`."""
    from . import generation

    if distributed.launched():
        raise InputFileError("Parallel Options names worker devices, but this process is already a rank of a run "
                             "over several processes (kineflow run --nproc N, or torchrun), whose processes are the "
                             "ranks: leave devices empty there")
    recipe = _recipe(model)
    own = host.compute_device()
    check_devices(parallel.devices, own)
    distributed.check_degrees(parallel, len(parallel.devices) + 1)
    pool = _pool(parallel.devices, own, distributed.timeout_seconds())
    call = dataclasses.replace(parallel, devices=())
    inputs = {"conditioning": _on_cpu(conditioning), "latent": _on_cpu(latent), "parallel": call, **options}
    try:
        for worker in pool.workers:
            try:
                _send(worker.conn, ("sample", recipe, inputs))
            except OSError as error:  # it died since the pool was checked: a lost rank, reported as one
                raise RankFailure(f"{worker.describe()} could not be sent the call ({error})") from error
        with distributed.joined(0, pool.world, pool.timeout, pool.groups, pool.announced):
            result = generation.sample_video(model, conditioning, latent, parallel=call, **options)
    except BaseException as error:
        if distributed.stopped_together() and not pool.replies("stopped"):
            raise  # every rank stopped at the same step (ComfyUI's interrupt): the pool stays
        raise _failed(pool, error) from None
    problems = pool.replies("done")
    if problems:
        raise _failed(pool, RankFailure("; ".join(problems)))
    return result


def _failed(pool: Pool, error: BaseException) -> BaseException:
    """Close the pool after a call that did not end on every rank together; the error rank 0 raises."""
    global _POOL
    reports = pool.reports()
    pool.close()
    _POOL = None
    if not isinstance(error, RankFailure):
        return error  # rank 0's own error (a bad input, an interrupt outside a step): the workers were stopped
    what = "; ".join(reports) or str(error).strip()[:300]
    return RankFailure(f"sampling over {pool.world} processes stopped: {what}. Every worker was stopped and nothing "
                       "was written; the workers start again with the next prompt.")


# --------------------------------------------------------------------------- the worker's side
def worker_main(fd: str, rank: str, world: str, device_name: str, port: str, timeout: str, sender: str) -> int:
    """A worker's life: join the process group, then run rank 0's sampling calls until told to exit or until the
    control channel closes (rank 0's process ended). A failure other than a stop rank 0 agreed to ends the worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ComfyUI's process stops the workers, not the terminal
    conn = Connection(int(fd))
    rank_, world_, seconds = int(rank), int(world), float(timeout)
    logging.basicConfig(level=logging.ERROR, format=f"[KineFlow worker rank {rank_}] %(levelname)s: %(message)s")
    try:
        import torch
        import torch.distributed as dist

        device = host.parse_device(device_name)
        host.configure(device=device)
        options = {}
        if device.type == "cuda":
            torch.cuda.set_device(device)
            options["device_id"] = device
        _send(conn, ("ready",))
        store = dist.TCPStore("127.0.0.1", int(port), world_, is_master=False,
                              timeout=datetime.timedelta(seconds=START_TIMEOUT))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank_,
                                world_size=world_, timeout=datetime.timedelta(
                                    seconds=max(distributed.MEETING_TIMEOUT, seconds)), **options)
    except Exception as error:
        with contextlib.suppress(OSError):
            _send(conn, ("failed", f"{type(error).__name__}: {error}"))
        return 1
    groups, announced, models = {}, set(), {}
    while True:
        try:
            message = _receive(conn, sender)
        except (EOFError, OSError):
            return 0  # rank 0's process has gone
        if message[0] == "exit":
            dist.destroy_process_group()
            return 0
        _, recipe, inputs = message
        try:
            with distributed.joined(rank_, world_, seconds, groups, announced), host.quiet():
                _worker_sample(models, recipe, inputs)
        except StoppedByRankZero:
            _send(conn, ("stopped",))
            continue
        except Exception as error:
            if not isinstance(error, RankFailure):  # a lost rank is rank 0's to report
                log.error("%s", error)
            with contextlib.suppress(OSError):
                _send(conn, ("failed", f"{type(error).__name__}: {error}"))
            sys.stderr.flush()
            os._exit(1)  # its sockets close now, so the other ranks stop at once instead of at the rank timeout
        _send(conn, ("done",))


def _worker_sample(models: dict, recipe, inputs: dict) -> None:
    """Rank r's share of a sampling call: the model of `recipe` (kept from the last call when it is the same one)."""
    from .generation import sample_video as sample
    from .lora import apply_lora
    from .video_models import load_video_model

    if recipe not in models:
        models.clear()
        model = load_video_model(recipe.path, recipe.weight_dtype, fp8=recipe.fp8, offload=recipe.offload,
                                 resident_blocks=recipe.resident_blocks, attention=recipe.attention,
                                 compile=recipe.compile)
        for path, strength, block_strengths in recipe.loras:
            model = apply_lora(model, path, strength, block_strengths)
        models[recipe] = model
    sample(models[recipe], **inputs)
