"""One run over several processes: `kineflow run --nproc N`, or any torchrun-style launcher.

Two halves:

- The launcher (`launch`), in the process the user started: torch's elastic agent (what `torchrun` runs) starts N
  local workers, each `python -m kineflow run ...` with the same arguments minus the launcher's, and watches them.
  `--nnodes` and the rendezvous options go to the agent as they are, so several machines join one run the way
  torchrun's do. Workers are not restarted (max_restarts 0): a run that lost a rank is over. When one exits or is
  killed, the agent stops the others (SIGTERM, then SIGKILL after 30 s) and the launcher prints which
  rank failed first and how, and exits 1 (2 for a bad input file, 128+n when the user stopped it by a signal).
  DEVELOPING.md says why the elastic agent and not torch.multiprocessing or Ray.

- The worker side, in each rank (`start`, reached through `kineflow run` when torchrun's environment variables are
  set): the process group (gloo on the CPU, nccl on CUDA with one device per local rank) with a collective timeout,
  so a rank that hangs makes the others fail within it instead of waiting for ever. Every rank runs the whole
  workflow; the work that is split is the Sampler's model (`parallel_sampling`: HunyuanVideo's transformer through
  models/sequence_parallel.py; the UNet family's context windows, each rank a share of the windows) and VAE decode
  (`decode_options`: each rank a share of the tiles). Only rank 0 runs output nodes (`output_node`): the other ranks wait for it in one collective,
  and each file rank 0 writes is renamed into place only after every rank has answered, so a run that loses a rank
  writes nothing. Only rank 0 prints progress and results; errors are printed by every rank, prefixed `[rank N]`.

A one-process run (a ComfyUI server) with Parallel Options' worker devices runs the same worker side on each of its
ranks, through runtime/workers.py (`joined`, `step_agreement`): there the process group outlives a prompt.

torch is imported inside the functions: `kineflow --help` and validation must not wait for it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass

from ..errors import InputFileError, KineFlowError, RankFailure, StoppedByRankZero
from . import files, host

log = logging.getLogger(__name__)

TIMEOUT_ENV = "KINEFLOW_RANK_TIMEOUT"
DEFAULT_TIMEOUT = 60.0  # seconds a collective of the split work waits for the other ranks before the run fails
# Where ranks meet after work that may take them different times (joining, loading models before sampling, rank 0
# encoding the outputs), they wait longer: at least this, never less than the rank timeout.
MEETING_TIMEOUT = 900.0
# Seconds the agent gives the ranks to exit on SIGTERM when the launcher itself is stopped (Ctrl-C) before SIGKILL;
# after a rank's failure torch's agent waits its own fixed 30 s.
SHUTDOWN_TIMEOUT = 10
LAUNCHER_OPTIONS = ("--nproc", "--nnodes", "--rdzv-endpoint", "--rdzv-id", "--rdzv-backend")

_STOPPED_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGHUP)  # our CLI's exits on a stop signal
# Output-node protocol: rank 0 sends one code per collective, the others answer 0 (MAX all-reduce).
_WAIT, _COMMIT, _DONE, _FAILED = 0, 1, 2, 3


@dataclass(frozen=True)
class Degrees:
    """Parallel degrees asked for (0 = choose): from the CLI (--ulysses/--ring/--cfg-parallel) or Parallel Options.
    `devices`: Parallel Options' worker devices (runtime/workers.py), one per worker; empty: no workers."""
    ulysses: int = 0
    ring: int = 0
    cfg: int = 0
    devices: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("ulysses", "ring", "cfg"):
            if getattr(self, name) < 0:
                raise InputFileError(f"the {name} degree must be 0 (choose) or a number of ranks; got "
                                     f"{getattr(self, name)}")


class _Run:
    active = False
    rank = 0
    world_size = 1
    timeout = DEFAULT_TIMEOUT
    degrees = Degrees()
    groups: dict = {}  # plan -> ParallelGroups, built once per run on every rank (building is a collective)
    announced: set = set()
    # A sampling call of a worker pool (runtime/workers.py): the ranks agree after every step whether to go on.
    agreeing = False
    agreed_stop = False  # set when the ranks agreed to stop (rank 0 was interrupted or failed in its step callback)


# --------------------------------------------------------------------------- worker side
def launched() -> bool:
    """Whether this process is a rank started by torch's elastic agent (ours or the user's torchrun)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def active() -> bool:
    return _Run.active


def is_writer() -> bool:
    """Whether this process prints results and writes outputs: rank 0, or any process not in a parallel run."""
    return _Run.rank == 0


def message_prefix() -> str:
    """`[rank N] ` in a rank of a parallel run (its error messages say which rank they come from), else ''."""
    return f"[rank {os.environ['RANK']}] " if launched() else ""


def timeout_seconds(value: str | float | None = None) -> float:
    """The collective timeout: --rank-timeout, else $KINEFLOW_RANK_TIMEOUT, else DEFAULT_TIMEOUT."""
    text = value if value is not None else os.environ.get(TIMEOUT_ENV, "").strip() or DEFAULT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        raise InputFileError(f"the rank timeout must be a number of seconds; got {text!r}") from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise InputFileError(f"the rank timeout must be a positive number of seconds; got {text!r}")
    return seconds


def start(timeout: float | None = None, degrees: Degrees | None = None, device_name: str | None = None):
    """Join the process group of this rank (torchrun's environment variables say which) on the compute device
    (`device_name`: --device, else the default); returns the device this rank computes on.

    CPU: gloo. CUDA: nccl, each local rank on its own device (cuda:LOCAL_RANK unless --device names one)."""
    import datetime

    import torch
    import torch.distributed as dist

    rank_, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    degrees = degrees or Degrees()
    _Run.rank, _Run.world_size = rank_, world
    _Run.timeout = timeout_seconds(timeout)
    _Run.degrees = degrees
    _Run.groups, _Run.announced = {}, set()
    _Run.active = True
    device = host.parse_device(device_name) if device_name else host.compute_device()
    if device.type == "meta":
        raise InputFileError("a dry run (--device meta) runs in one process; run it without --nproc / torchrun")
    if device.type == "mps":
        raise InputFileError("runs over several processes need CUDA devices or the CPU; MPS has no collectives")
    options = {}
    if device.type == "cuda":
        if device.index is None:
            count = torch.cuda.device_count()
            if os.environ.get("LOCAL_WORLD_SIZE") and int(os.environ["LOCAL_WORLD_SIZE"]) > count:
                raise InputFileError(f"{os.environ['LOCAL_WORLD_SIZE']} processes per machine were started but this "
                                     f"machine has {count} CUDA device(s); use --nproc {count} or fewer")
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
        options["device_id"] = device
    else:
        backend = "gloo"
    if world > 1:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=_meeting_timeout()), **options)
        _meet("joining the run")  # connects every pair now, while the ranks are in step
    if rank_ != 0:
        logging.getLogger().setLevel(logging.ERROR)  # rank 0 logs for the run
    return device


def stop() -> None:
    """Leave the process group (every way out of a worker's run)."""
    if not _Run.active:
        return
    _Run.active = False
    _Run.groups = {}
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def joined(rank_: int, world: int, timeout: float, groups: dict, announced: set):
    """One sampling call of a worker pool (runtime/workers.py) on one of its ranks: the process group is already
    joined; `groups` and `announced` are the pool's, kept between calls. The ranks agree after each step whether to
    go on (`step_agreement`). Restores the one-process state after."""
    _Run.rank, _Run.world_size, _Run.timeout = rank_, world, timeout
    _Run.groups, _Run.announced = groups, announced
    _Run.active = _Run.agreeing = True
    _Run.agreed_stop = False
    try:
        yield
    finally:
        _Run.active = _Run.agreeing = False
        _Run.rank, _Run.world_size, _Run.groups, _Run.announced = 0, 1, {}, set()


@contextlib.contextmanager
def step_agreement():
    """Around a sampler's step callback (progress, previews, interruption): in a worker pool's call every rank
    says whether its callback raised, and all stop together if one did. Rank 0's callback is where ComfyUI's
    interrupt is checked, so an interrupt stops every rank at the same step and the pool stays usable. Elsewhere,
    nothing."""
    if not _Run.agreeing:
        yield
        return
    import torch
    import torch.distributed as dist

    raised = None
    try:
        yield
    except BaseException as error:  # the host's interrupt exception is not an Exception in every host
        raised = error
    flag = torch.tensor([int(raised is not None)], dtype=torch.int64,
                        device=host.compute_device() if dist.get_backend() == "nccl" else "cpu")
    try:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    except Exception as error:
        raise _lost("agreeing to go on after a step", error) from None
    if not int(flag.item()):
        return
    _Run.agreed_stop = True
    if raised is not None:
        raise raised
    if _Run.rank == 0:
        raise RankFailure("a worker failed in its step callback; every rank stopped (the worker's message says why)")
    raise StoppedByRankZero("rank 0 stopped the run (interrupted or failed); this worker stopped with it")


def stopped_together() -> bool:
    """Whether the last worker-pool call on this rank ended by the ranks agreeing to stop (`step_agreement`)."""
    return _Run.agreed_stop


def _lost(what: str, error: BaseException, waited: float | None = None) -> RankFailure:
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    within = (f"within {_Run.timeout:g} s (--rank-timeout)" if waited is None else
              f"within {waited:g} s (where ranks meet: the --rank-timeout, at least {MEETING_TIMEOUT:g} s)")
    return RankFailure(f"rank {_Run.rank} lost the other ranks while {what}: a rank died, failed or did not answer "
                       f"{within}. Nothing was written. ({detail[:300]})")


def _collective_error(error: BaseException) -> bool:
    """Whether `error` is a collective's failure (a closed peer, a timeout), not a bug: torch raises DistError for
    some, a bare RuntimeError from gloo's transport for others."""
    import torch.distributed as dist

    text = str(error)
    return isinstance(error, dist.DistError) or any(
        mark in text for mark in ("gloo/transport", "Connection reset by peer", "Connection closed by peer",
                                  "ProcessGroupNCCL", "NCCL error", "Timed out waiting"))


def _meeting_timeout() -> float:
    return max(MEETING_TIMEOUT, _Run.timeout)


def _set_timeout(seconds: float, group=None) -> None:
    import datetime

    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(datetime.timedelta(seconds=seconds), group)


def _all_reduce_max(code: int, what: str) -> int:
    """The largest `code` of all ranks, waiting for them up to the meeting timeout (then the rank timeout again)."""
    import torch
    import torch.distributed as dist

    device = host.compute_device() if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([code], dtype=torch.int64, device=device)
    _set_timeout(_meeting_timeout())
    try:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    except Exception as error:  # gloo / nccl raise RuntimeError subclasses on a closed peer or a timeout
        raise _lost(what, error, _meeting_timeout()) from None
    finally:
        _set_timeout(_Run.timeout)
    return int(value.item())


def _meet(what: str) -> None:
    """Every rank reaches this point (up to the meeting timeout) before the split work starts."""
    _all_reduce_max(0, what)


def _parallel() -> bool:
    return _Run.active and _Run.world_size > 1


@contextlib.contextmanager
def _commit_barrier():
    """While rank 0 runs an output node: each file is renamed into place only once every rank has answered."""
    previous = files.before_commit
    files.before_commit = lambda path: _all_reduce_max(_COMMIT, f"writing {path.name}")
    try:
        yield
    finally:
        files.before_commit = previous


def output_node(node_id: str, call):
    """Run an output node (`call() -> (outputs, ui)`) in a parallel run: on rank 0, while the others wait for it in
    a collective; its result is then sent to every rank, so the nodes after it run everywhere alike."""
    if not _parallel():
        return call()
    import torch.distributed as dist

    what = f"saving node {node_id}'s output"
    if _Run.rank == 0:
        try:
            with _commit_barrier():
                result = call()
        except Exception:
            with contextlib.suppress(RankFailure):
                _all_reduce_max(_FAILED, what)
            raise
        _all_reduce_max(_DONE, what)
    else:
        while True:
            code = _all_reduce_max(_WAIT, what)
            if code == _FAILED:
                raise RankFailure(f"rank 0 failed while {what} (its message says why); this rank stops too.")
            if code == _DONE:
                break
        result = None
    box = [result]
    try:
        dist.broadcast_object_list(box, src=0)
    except Exception as error:
        raise _lost(what, error) from None
    return box[0]


# --------------------------------------------------------------------------- what is split
def plan_degrees(world: int, guided: bool, requested: Degrees, heads: int) -> tuple[int, int, int, str]:
    """(ulysses, ring, cfg, why) for `world` ranks: the degrees asked for, the others chosen. Chosen: cfg 2 when the
    run is guided (two passes per step) and the ranks pair up; of the rest, Ulysses as far as it divides the
    attention heads, ring attention for what remains."""
    cfg = requested.cfg or (2 if guided and world % 2 == 0 and world >= 2 else 1)
    if world % cfg:
        raise InputFileError(f"--cfg-parallel {cfg} does not divide the {world} ranks")
    rest = world // cfg
    if requested.ulysses and requested.ring:
        ulysses, ring = requested.ulysses, requested.ring
    elif requested.ulysses:
        ulysses, ring = requested.ulysses, rest // max(requested.ulysses, 1)
    elif requested.ring:
        ring, ulysses = requested.ring, rest // max(requested.ring, 1)
    else:
        from ..models.sequence_parallel import ParallelPlan

        chosen = ParallelPlan.for_heads(world, heads, cfg)
        ulysses, ring = chosen.ulysses, chosen.ring
    if ulysses * ring * cfg != world:
        raise InputFileError(f"parallel degrees ulysses {ulysses} x ring {ring} x cfg {cfg} = {ulysses * ring * cfg} "
                             f"do not match the {world} ranks; their product must be the number of processes")
    asked = all((requested.ulysses, requested.ring, requested.cfg))
    why = "as asked" if asked else (f"cfg 2 when guided and the ranks pair up, Ulysses as far as it divides the "
                                    f"{heads} attention heads, ring for the rest; --ulysses/--ring/--cfg-parallel "
                                    "choose")
    return ulysses, ring, cfg, why


def apply_plan(handle, plan) -> None:
    """Make the model of `handle` split its work by `plan` (models/sequence_parallel.py); the groups are built once
    per plan on every rank."""
    from ..models import sequence_parallel

    import torch.distributed as dist

    if plan not in _Run.groups:
        groups = sequence_parallel.parallel_groups(plan)
        for group in vars(groups).values():  # new groups wait 30 min by default: the rank timeout instead
            if isinstance(group, dist.ProcessGroup):
                _set_timeout(_Run.timeout, group)
        _Run.groups[plan] = groups
    handle.net.parallel = _Run.groups[plan]


def _announce(text: str) -> None:
    if text not in _Run.announced and _Run.rank == 0:
        _Run.announced.add(text)
        log.warning("KineFlow: %s", text)
    _Run.announced.add(text)


def _splits_calls(model) -> bool:
    return getattr(getattr(model, "net", None), "parallel", False) is not False


def window_group(model):
    """The process group a sampling run's context windows are shared out over, or None (not split): in a parallel
    run, for a model that does not split its own calls (the UNet family); a HunyuanVideo transformer splits each
    window's call instead."""
    if not _parallel() or _splits_calls(model):
        return None
    import torch.distributed as dist

    return dist.group.WORLD


def decode_options() -> dict:
    """Keyword arguments of a VAE handle's `decode` in a parallel run: the ranks share its tiles (HunyuanVideo) or
    chunks of frames (SD); nothing outside one."""
    if not _parallel():
        return {}
    import torch.distributed as dist

    _meet("starting VAE decode")  # the ranks may reach it at different times
    return {"group": dist.group.WORLD}


@contextlib.contextmanager
def parallel_sampling(model, guided: bool, context: bool = False, requested: Degrees | None = None):
    """Around a sampling run in a parallel run: a HunyuanVideo transformer splits each call (CFG halves, video
    tokens) by a plan chosen from the ranks and guidance (or `requested`, else the CLI's degrees); for other models
    says how the work is shared. Outside a parallel run, nothing."""
    if not _parallel():
        if requested is not None:
            log.warning("KineFlow: Parallel Options has no effect in a run of one process unless it names worker "
                        "devices (e.g. cuda:1,cuda:2); its degrees apply to runs started with `kineflow run --nproc N` "
                        "(or torchrun)")
        yield
        return
    if not _splits_calls(model):
        if context:
            _meet("starting to sample")  # the ranks may have loaded the models at different speeds
        _announce(f"{_Run.world_size} ranks: the {model.family} model's context windows are shared out over the ranks"
                  if context else f"{_Run.world_size} ranks: the {model.family} model does not split its calls and "
                  "no context windows are set, so every rank samples the whole video (add Context Options to share "
                  "the work)")
        yield
        return
    from ..models import sequence_parallel

    net = model.net
    requested = requested if requested is not None else _Run.degrees
    ulysses, ring, cfg, why = plan_degrees(_Run.world_size, guided, requested, net.config.heads_num)
    plan = sequence_parallel.ParallelPlan(ulysses=ulysses, ring=ring, cfg=cfg)
    _announce(f"{_Run.world_size} ranks split the transformer: ulysses {ulysses} x ring {ring} x cfg {cfg} ({why})")
    previous = net.parallel
    try:
        _meet("starting to sample")  # the ranks may have loaded the models at different speeds
        apply_plan(model, plan)
        yield
    except RuntimeError as error:
        if not _collective_error(error):
            raise
        raise _lost("sampling", error) from None
    finally:
        net.parallel = previous


# --------------------------------------------------------------------------- launcher
def worker_arguments(argv: list[str], takes_value: set[str]) -> list[str]:
    """The command line of a worker: `argv` without the launcher's options (and their values). `takes_value` are
    the option strings that take a value, so a value that looks like an option (`--set 3.x=--nproc`) is kept."""
    kept = []
    tokens = iter(argv)
    for token in tokens:
        name = token.split("=", 1)[0]
        if token.startswith("--") and name in LAUNCHER_OPTIONS:
            if "=" not in token:
                next(tokens, None)
            continue
        kept.append(token)
        if token in takes_value:
            value = next(tokens, None)
            if value is not None:
                kept.append(value)
    return kept


def _nodes(text: str) -> tuple[int, int]:
    try:
        low, _, high = text.partition(":")
        low, high = int(low), int(high or low)
    except ValueError:
        raise InputFileError(f"--nnodes takes N or MIN:MAX machines; got {text!r}") from None
    if not 1 <= low <= high:
        raise InputFileError(f"--nnodes takes N or MIN:MAX machines with 1 <= MIN <= MAX; got {text!r}")
    return low, high


def _describe(failure) -> str:
    code = failure.exitcode
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


def check_launch(nproc: int, nnodes: str, rdzv_endpoint: str | None) -> tuple[int, int]:
    """The launcher's options checked before anything starts; returns (min, max) machines."""
    if nproc < 1:
        raise InputFileError(f"--nproc takes a number of processes >= 1; got {nproc}")
    min_nodes, max_nodes = _nodes(nnodes)
    if max_nodes > 1 and not rdzv_endpoint:
        raise InputFileError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT, the same on every machine")
    if launched():
        raise InputFileError("this process is already a rank of a parallel run (torchrun's variables are set); "
                             "run `kineflow run` without --nproc under torchrun")
    return min_nodes, max_nodes


def check_degrees(degrees: Degrees, world: int | None) -> None:
    """Refuse, before any worker starts, degrees that cannot fit `world` ranks (None: not known yet)."""
    if degrees.cfg > 2:
        raise InputFileError(f"--cfg-parallel is 1 or 2 (the conditional and unconditional passes); got {degrees.cfg}")
    given = [value for value in (degrees.ulysses, degrees.ring, degrees.cfg) if value]
    if world is not None and given and world % math.prod(given):
        raise InputFileError(f"the parallel degrees asked for ({' x '.join(map(str, given))}) do not divide the "
                             f"{world} processes of the run")
    if world is not None and len(given) == 3 and math.prod(given) != world:
        raise InputFileError(f"ulysses {degrees.ulysses} x ring {degrees.ring} x cfg {degrees.cfg} = "
                             f"{math.prod(given)}, but the run has {world} processes; the product must equal it")


def launch(worker_argv: list[str], *, nproc: int, nnodes: str = "1", rdzv_endpoint: str | None = None,
           rdzv_id: str | None = None, rdzv_backend: str = "c10d", debug: bool = False, stderr=None) -> int:
    """Start `nproc` workers on this machine (with `nnodes` > 1, this machine's share of a run joined at
    `rdzv_endpoint`), wait for them, and return the exit code of the run."""
    stderr = stderr if stderr is not None else sys.stderr
    min_nodes, max_nodes = check_launch(nproc, nnodes, rdzv_endpoint)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not debug:  # the agent's own INFO/WARNING lines (closing signals, rendezvous) are not for users
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    # The workers import torch before the command's own thread set-up runs (runtime/cpu.py), so they get its
    # passive OpenMP waiting from here: spinning threads of N ranks sharing the cores collapse like a busy machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "OMP_NUM_THREADS" not in os.environ:  # N processes each using every core would thrash
        threads = max(1, (os.cpu_count() or 1) // nproc)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        stderr.write(f"parallel run: {nproc} process(es) here, OMP_NUM_THREADS={threads} each (set it to change)\n")
    config = LaunchConfig(
        min_nodes=min_nodes, max_nodes=max_nodes, nproc_per_node=nproc,
        run_id=rdzv_id or (uuid.uuid4().hex if max_nodes == 1 else "kineflow"),
        rdzv_endpoint=rdzv_endpoint or "localhost:0", rdzv_backend=rdzv_backend,
        max_restarts=0, monitor_interval=0.1, start_method="spawn", shutdown_timeout=SHUTDOWN_TIMEOUT)
    package = __name__.split(".")[0]
    start = time.monotonic()
    try:
        elastic_launch(config, sys.executable)("-m", package, *worker_argv)
    except ChildFailedError as error:
        # The root cause: not a rank the agent stopped itself (SIGTERM: 143 from our handler, or -15); a rank killed
        # by another signal before one that exited on its own (a rank that lost a killed peer exits with code 1, and
        # may do so before the agent has seen the kill); then the earliest.
        stopped = (128 + signal.SIGTERM, -signal.SIGTERM)
        first_rank, first = min(error.failures.items(),
                                key=lambda item: (item[1].exitcode in stopped, (item[1].exitcode or 0) >= 0,
                                                  item[1].timestamp, item[0]))
        stderr.write(f"error: rank {first_rank} (pid {first.pid}) {_describe(first)} after "
                     f"{time.monotonic() - start:.1f}s; every rank was stopped and nothing was written"
                     f"{'' if first.exitcode in (1, 2) else ' (its own messages, if any, are above)'}.\n")
        if first.exitcode == 2 or first.exitcode in _STOPPED_CODES:  # a bad input; the user's Ctrl-C / kill
            return first.exitcode
        return 1
    except SignalException as error:  # the launcher was stopped (Ctrl-C, SIGTERM): the agent stopped the workers
        stderr.write(f"error: interrupted by {error.sigval.name}; every rank was stopped and nothing was written.\n")
        return 128 + int(error.sigval)
    except KeyboardInterrupt:
        stderr.write("error: interrupted; every rank was stopped and nothing was written.\n")
        return 130
    except Exception as error:  # the rendezvous itself failed (endpoint unreachable, nodes missing)
        if debug:
            raise
        raise KineFlowError(f"could not start the parallel run: {type(error).__name__}: {error}") from None
    return 0
