"""The one module that knows whether KineFlow runs inside ComfyUI or standalone.

Everything host-specific goes through here: where model files live, where outputs go, which input files a workflow
may read, how much memory a file read may take, progress bars, latent previews, interruption and the compute device.
No other module in the pack imports ComfyUI.

Detection looks at what ComfyUI has already loaded (`folder_paths` is a top-level module of ComfyUI's
source tree). We never decide by trying `import comfy`: an unrelated PyPI package has that name.

torch is imported by the device functions only: the node registry imports this module, and listing nodes or
converting a workflow must not wait for torch.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputFileError, InterruptedRun, ModelFileError
from ..models import checkpoints

if TYPE_CHECKING:
    import torch

PACK_DIR = Path(__file__).resolve().parent.parent
# Weights shipped with the pack (the tiny default models). Searched in both modes, after the user's folders.
SHIPPED_WEIGHTS_DIR = PACK_DIR / "weights"

# Model folder kinds we use, and the sub-folder names searched for each (ComfyUI's standard names).
MODEL_FOLDERS: dict[str, tuple[str, ...]] = {
    "diffusion_models": ("diffusion_models", "unet"),
    "vae": ("vae",),
    "text_encoders": ("text_encoders", "clip"),
    "loras": ("loras",),
    "checkpoints": ("checkpoints",),
    "animatediff_models": ("animatediff_models",),
    "animatediff_motion_lora": ("animatediff_motion_lora",),
    "controlnet": ("controlnet",),
    "clip_vision": ("clip_vision",),
}
MODEL_EXTENSIONS = (".safetensors", ".sft", ".gguf", ".pt", ".pth", ".ckpt", ".bin")


def in_comfyui() -> bool:
    """True when ComfyUI's own modules are loaded in this process (we are a custom node inside it)."""
    return "folder_paths" in sys.modules and "comfy.model_management" in sys.modules


# --------------------------------------------------------------------------- standalone settings
# Relative to the working folder, like output/ and input/. Not "models": run from the repository, that is the pack's
# own source package.
DEFAULT_MODELS_DIR = "kineflow_models"


class _Standalone:
    models_dir: Path = Path(os.environ.get("KINEFLOW_MODELS", DEFAULT_MODELS_DIR))
    output_dir: Path = Path("output")
    input_dir: Path = Path("input")
    user_paths: frozenset[str] = frozenset()  # loader file values typed on the command line (--set): read anywhere
    device: torch.device | None = None  # None: $KINEFLOW_DEVICE, else the best available
    memory_budget: str | None = None  # GiB as the user wrote it; None: $KINEFLOW_MEMORY_BUDGET, else free memory
    attention: str | None = None  # None: $KINEFLOW_ATTENTION, else auto
    compile: bool | None = None  # None: $KINEFLOW_COMPILE, else off
    interrupt = threading.Event()
    quiet = 0  # > 0 while standalone progress bars are silenced (see quiet())


def configure(
    models_dir: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    input_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    memory_budget: str | float | None = None,
    attention: str | None = None,
    compile: bool | None = None,
    user_paths: frozenset[str] | None = None,
) -> None:
    """Set the standalone models, output and input folders, the compute device, the memory budget and the loaders'
    default attention backend and compilation (the CLI's --models-dir, --output-dir, --input-dir, --device,
    --memory-budget, --attention and --compile), and the file values given with --set (see `input_file`)."""
    if models_dir is not None:
        _Standalone.models_dir = Path(models_dir)
    if output_dir is not None:
        _Standalone.output_dir = Path(output_dir)
    if input_dir is not None:
        _Standalone.input_dir = Path(input_dir)
    if device is not None:
        _Standalone.device = parse_device(device) if isinstance(device, str) else device
    if memory_budget is not None:
        _Standalone.memory_budget = str(memory_budget)
    if attention is not None:
        _Standalone.attention = attention
    if compile is not None:
        _Standalone.compile = compile
    if user_paths is not None:
        _Standalone.user_paths = frozenset(user_paths)


@contextlib.contextmanager
def configured(**folders):
    """`configure(**folders)` for the duration of a `with` block, then restore the previous standalone folders."""
    fields = ("models_dir", "output_dir", "input_dir", "device", "memory_budget", "attention", "compile",
              "user_paths")
    saved = {name: getattr(_Standalone, name) for name in fields}
    configure(**folders)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(_Standalone, name, value)


def register_comfyui_folders() -> None:
    """Inside ComfyUI: add the `animatediff_models` / `animatediff_motion_lora` folder kinds ComfyUI lacks.

    The pack's shipped tiny weights are *not* registered with ComfyUI: its native loaders (UNETLoader,
    VAELoader, ...) would list them and always fail on them. `_search_dirs` adds them for KineFlow's loaders only."""
    import folder_paths  # ComfyUI's module; only reached when in_comfyui()

    models_root = Path(folder_paths.models_dir)
    for kind, names in MODEL_FOLDERS.items():
        for name in names:
            if kind not in folder_paths.folder_names_and_paths or name in ("animatediff_models", "animatediff_motion_lora"):
                folder_paths.add_model_folder_path(kind, str(models_root / name))


def _search_dirs(kind: str) -> list[Path]:
    """The user's folders for a model kind (ComfyUI's, or the standalone models folder), then the shipped ones."""
    if kind not in MODEL_FOLDERS:
        raise ValueError(f"unknown model folder kind {kind!r}; expected one of {sorted(MODEL_FOLDERS)}")
    if in_comfyui():
        import folder_paths

        dirs = [Path(p) for p in folder_paths.get_folder_paths(kind)]
    else:
        dirs = [_Standalone.models_dir / name for name in MODEL_FOLDERS[kind]]
    dirs.append(SHIPPED_WEIGHTS_DIR / MODEL_FOLDERS[kind][0])
    return dirs


def is_shipped(path: Path) -> bool:
    """Whether `path` is one of the pack's shipped weights (a file or model folder under weights/)."""
    return SHIPPED_WEIGHTS_DIR in Path(path).resolve().parents


def _is_model_folder(path: Path) -> bool:
    """A Hugging Face style model folder (config.json next to weights) counts as one selectable model."""
    return path.is_dir() and (path / "config.json").is_file()


def list_models(kind: str, include_folders: bool = False) -> list[str]:
    """Model files (relative names, '/'-separated) available for a folder kind, sorted, without duplicates."""
    names: set[str] = set()
    for root in _search_dirs(kind):
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in _walk_once(root):
            here = Path(dirpath)
            if include_folders and here != root and _is_model_folder(here):
                names.add(here.relative_to(root).as_posix())
                dirnames[:] = []
                continue
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for f in filenames:
                if f.lower().endswith(MODEL_EXTENSIONS):
                    names.add((here / f).relative_to(root).as_posix())
    return sorted(names)


def _walk_once(root: Path):
    """`os.walk` following symlinks (model folders are often links to other drives), entering each real folder once,
    in name order: a link back up the tree (a loop) would otherwise make the walk endless."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            info = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (info.st_dev, info.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        dirnames.sort()
        yield dirpath, dirnames, filenames


def _find_model(kind: str, name: str) -> Path | None:
    if not name.strip():
        return None
    direct = Path(name).expanduser()
    if direct.is_absolute() and direct.exists():
        return direct
    return next((root / name for root in _search_dirs(kind) if (root / name).exists()), None)


def model_path(kind: str, name: str) -> Path:
    """Resolve a model name from a loader widget to a path: a name in the kind's folders, or an existing absolute
    path as is."""
    path = _find_model(kind, name)
    if path is None:
        raise ModelFileError(missing_model(kind, name))
    return path


def missing_model(kind: str, name: str) -> str | None:
    """None when a loader's model name resolves (see `model_path`), else a message naming the folders searched, the
    folder the file belongs in and what the folders hold."""
    if _find_model(kind, name) is not None:
        return None
    user_dirs = _search_dirs(kind)[:-1]  # the last one holds the shipped tiny models
    available = list_models(kind, include_folders=True)
    shown = ", ".join(available[:8]) + (f" and {len(available) - 8} more" if len(available) > 8 else "")
    models_dir = "" if in_comfyui() else f" (--models-dir; default $KINEFLOW_MODELS or ./{DEFAULT_MODELS_DIR})"
    return (f"model file {name!r} not found in {', '.join(str(d) for d in user_dirs)} or the shipped models "
            f"(available: {shown or 'none'}); it belongs in {user_dirs[0]}{os.sep}{models_dir}, and the README's "
            "table 'Where model files go' says where it is published")


def output_dir() -> Path:
    if in_comfyui():
        import folder_paths

        return Path(folder_paths.get_output_directory())
    return _Standalone.output_dir


def input_dir() -> Path:
    """Where Load Video / Load Image look for relative file names (ComfyUI's input folder inside ComfyUI)."""
    if in_comfyui():
        import folder_paths

        return Path(folder_paths.get_input_directory())
    return _Standalone.input_dir


def input_file(name: str) -> Path:
    """The file a Load Video / Load Image value names; InputFileError when it lies outside the input folder.

    Inside ComfyUI a workflow arrives over the network: the value follows ComfyUI's annotated names ("clip.mp4 [input]";
    "[output]" and "[temp]" choose those folders; a plain name is in the input folder) and the file, symlinks resolved,
    must lie in the folder chosen. Standalone, a value is relative to --input-dir and must stay in it too, except one
    the user typed on the command line (`--set NODE.video_path=...`), which is read wherever it points.
    """
    name = name.strip()
    if in_comfyui():
        import folder_paths

        _, folder = folder_paths.annotated_filepath(name)
        path = Path(folder_paths.get_annotated_filepath(name))
        return _inside(path, Path(folder or folder_paths.get_input_directory()), name,
                       "upload the file to ComfyUI's input folder")
    path = Path(name.removesuffix(" [input]")).expanduser()
    if name in _Standalone.user_paths:
        return _Standalone.input_dir / path  # an absolute path stays as it is
    return _inside(_Standalone.input_dir / path, _Standalone.input_dir, name,
                   "move the file into the input folder (--input-dir), or give its path on the command line with "
                   "--set NODE.input=PATH")


def _inside(path: Path, folder: Path, name: str, remedy: str) -> Path:
    """`path` with symlinks resolved, if that lies inside `folder` (itself resolved)."""
    try:
        real, root = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    except (OSError, ValueError) as error:  # e.g. a NUL byte in the name
        raise InputFileError(f"{name!r} is not a usable file name: {error}") from None
    if not real.is_relative_to(root):
        raise InputFileError(f"{name!r} points to {real}, outside {root}: a workflow may only read files inside "
                             f"that folder; {remedy}")
    return real


DEVICE_CHOICES = "cpu, cuda, cuda:N, mps, meta"


def parse_device(name: str) -> torch.device:
    """A compute device from a user's `--device` / KINEFLOW_DEVICE value, checked against this machine.

    `meta` is always available: the whole graph then runs on shapes only (a dry run, see runtime/plan.py)."""
    import torch

    try:
        device = torch.device(str(name).strip().lower())
    except (RuntimeError, ValueError):
        raise InputFileError(f"unknown device {name!r}; expected one of {DEVICE_CHOICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputFileError(f"device {name!r} was asked for, but this PyTorch sees no CUDA device "
                                 f"(torch {torch.__version__}); use --device cpu, or install a CUDA build of PyTorch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputFileError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} "
                                 f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InputFileError(f"device {name!r} was asked for, but MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps", "meta"):
        raise InputFileError(f"device {name!r} is not supported; expected one of {DEVICE_CHOICES}")
    return device


def best_device() -> torch.device:
    """The fastest device this machine has: CUDA, then Apple's MPS, then the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def compute_device() -> torch.device:
    """Where models compute: ComfyUI's choice inside ComfyUI; standalone `--device`, $KINEFLOW_DEVICE, or the best."""
    if in_comfyui():
        import comfy.model_management as mm

        return mm.get_torch_device()
    if _Standalone.device is not None:
        return _Standalone.device
    env = os.environ.get("KINEFLOW_DEVICE", "").strip()
    return parse_device(env) if env else best_device()


def is_dry_run() -> bool:
    """True when the compute device is `meta`: tensors have shapes but no data, and nothing is written."""
    return compute_device().type == "meta"


def free_memory(device: torch.device | None = None) -> int:
    """Bytes that a computation on `device` may use now (ComfyUI's own estimate inside ComfyUI)."""
    device = device or compute_device()
    if in_comfyui():
        import comfy.model_management as mm

        return int(mm.get_free_memory(device))
    if device.type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return _available_ram()


def _available_ram() -> int:
    """Free host memory, standalone (no torch needed)."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 4 << 30  # no way to ask: assume a modest 4 GiB


def memory_budget() -> int | None:
    """Bytes the models of a run may keep on the compute device (--memory-budget / KINEFLOW_MEMORY_BUDGET, in
    GiB), or None: the offloader then plans from the device's free memory."""
    value = _Standalone.memory_budget if _Standalone.memory_budget is not None else os.environ.get(
        "KINEFLOW_MEMORY_BUDGET", "").strip()
    if value in (None, ""):
        return None
    try:
        gib = float(value)
    except ValueError:
        raise InputFileError(f"memory budget must be a number of GiB, e.g. 6 or 11.5; got {value!r}") from None
    if not math.isfinite(gib) or gib <= 0:
        raise InputFileError(f"memory budget must be a positive number of GiB; got {value!r}")
    return int(gib * 2**30)


RAISE_BUDGET = "raise the memory budget (--memory-budget or $KINEFLOW_MEMORY_BUDGET, in GiB)"


def read_budget() -> int:
    """Bytes what one file holds may take in host memory (Load Video's frames, a legacy .pt pickle; also the video an
    Empty Video Latent asks for, checked at validation), checked before anything is allocated: the memory budget when
    set, else half the free RAM (the rest stays for the work on what was read). Standalone, no torch is imported."""
    budget = memory_budget()
    if budget is not None:
        return budget
    if not in_comfyui():
        return _available_ram() // 2
    import torch

    return free_memory(torch.device("cpu")) // 2


checkpoints.read_budget = read_budget  # models/ imports nothing of the runtime: it asks through this hook


def attention_default() -> str:
    """The attention backend of loaders left at 'auto': --attention, else $KINEFLOW_ATTENTION, else 'auto'."""
    return _Standalone.attention or os.environ.get("KINEFLOW_ATTENTION", "").strip() or "auto"


def compile_default() -> bool:
    """Whether loaders left at 'auto' compile their model's blocks: --compile, else $KINEFLOW_COMPILE=1, else no."""
    if _Standalone.compile is not None:
        return _Standalone.compile
    return os.environ.get("KINEFLOW_COMPILE", "").strip().lower() in ("1", "true", "yes", "on")


def offload_device() -> torch.device:
    if in_comfyui():
        import comfy.model_management as mm

        return mm.unet_offload_device()
    import torch

    return torch.device("cpu")


# --------------------------------------------------------------------------- ComfyUI's model management
class _ComfyModel:
    """What `comfy.model_management.LoadedModel` calls on the models in its loaded list (ComfyUI 0.3.64 to 0.8.0),
    answered by a KineFlow model's Residency (runtime/offload.py). ComfyUI then frees memory for it, keeps it
    loaded between prompts, loads it partially under --lowvram/--novram or a tight budget (resident blocks), and
    unloads it when another model needs the room or the user frees memory."""

    def __init__(self, residency):
        import comfy.model_management as mm

        self.residency = residency
        self.model = residency.model  # ComfyUI holds it through a weakref: the Residency keeps us alive
        self.load_device = mm.get_torch_device()
        self.offload_device = residency.offload_device
        self.parent = None

    def model_size(self) -> int:
        return self.residency.total_bytes()

    def loaded_size(self) -> int:
        return self.residency.loaded_bytes()

    def current_loaded_device(self):
        return self.load_device if self.loaded_size() > 0 else self.offload_device

    def model_dtype(self):
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)

    def model_patches_models(self) -> list:
        return []

    def model_patches_to(self, device_or_dtype) -> None:
        return None

    def lowvram_patch_counter(self) -> int:
        return 0

    def is_clone(self, other) -> bool:
        return other is self

    def is_dynamic(self) -> bool:
        return False

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False) -> int:
        if extra_memory < 0:  # ComfyUI 0.8.0 asks a loaded model to shrink with a negative budget
            self.residency.shed(-extra_memory)
            return 0
        return self.residency.fit(self.loaded_size() + extra_memory)

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False) -> int:
        return self.residency.shed(memory_to_free)

    def detach(self, unpatch_all=True):
        if unpatch_all:
            self.residency.unload()
        return self.model


def claim_device(*residencies) -> None:
    """Before KineFlow models run inside ComfyUI: hand them to ComfyUI's memory manager in one request (models that
    run together must not evict each other), which frees what they need (unloading other models) and grants each
    a budget of resident weights. Standalone: nothing to do."""
    managed = [r for r in residencies if r.managed]
    if not managed:
        return
    import comfy.model_management as mm

    for residency in managed:
        if getattr(residency, "comfy_model", None) is None:
            residency.comfy_model = _ComfyModel(residency)
    mm.load_models_gpu([r.comfy_model for r in managed])


def loaded_kineflow_models() -> list[dict]:
    """The KineFlow models in ComfyUI's loaded list: name, device, size and bytes on the device."""
    import comfy.model_management as mm

    listed = []
    for entry in mm.current_loaded_models:
        model = entry.model
        if isinstance(model, _ComfyModel):
            listed.append({"name": model.residency.name, "device": str(model.load_device),
                           "size": model.model_size(), "loaded": model.loaded_size()})
    return listed


def register_comfyui_routes() -> None:
    """Inside ComfyUI: GET /kineflow/loaded_models lists the KineFlow models ComfyUI's manager holds (read-only;
    what the live tests and curious users look at)."""
    from aiohttp import web
    from server import PromptServer

    @PromptServer.instance.routes.get("/kineflow/loaded_models")
    async def _loaded_models(request):
        return web.json_response(loaded_kineflow_models())


# --------------------------------------------------------------------------- interruption
def request_interrupt() -> None:
    """Standalone: ask the running workflow to stop at its next check (Ctrl-C does the same)."""
    _Standalone.interrupt.set()


def clear_interrupt() -> None:
    _Standalone.interrupt.clear()


def check_interrupt() -> None:
    """Raise InterruptedRun if the user asked to stop. Call it between steps of long loops."""
    if in_comfyui():
        import comfy.model_management as mm

        try:
            mm.throw_exception_if_processing_interrupted()
        except mm.InterruptProcessingException:
            raise  # ComfyUI's executor expects its own exception type
        return
    if _Standalone.interrupt.is_set():
        raise InterruptedRun("interrupted by the user")


# --------------------------------------------------------------------------- progress
class Progress:
    """A progress bar: ComfyUI's node progress bar inside ComfyUI, a bar on stderr standalone.

    `update(n, preview=...)` accepts an optional live preview, a JSON-able dict (runtime/previews.py builds the
    Sampler's), which the web extension shows on the running node. Each update also checks for interruption, so
    every long loop with a progress bar is interruptible.
    """

    def __init__(self, total: int, desc: str = ""):
        self.total = max(int(total), 1)
        self.current = 0
        self.desc = desc
        self._start = time.monotonic()
        self._comfy_bar = None
        if in_comfyui():
            import comfy.utils

            self._comfy_bar = comfy.utils.ProgressBar(self.total)
        self._tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()

    @property
    def shows_previews(self) -> bool:
        """Whether a preview would be seen: inside ComfyUI, with the browser that queued the prompt connected (any
        browser for a prompt queued without a client id). Callers skip building previews otherwise."""
        if self._comfy_bar is None:
            return False
        from server import PromptServer

        server = PromptServer.instance
        return server.client_id in server.sockets if server.client_id is not None else bool(server.sockets)

    def update(self, n: int = 1, preview: dict | None = None) -> None:
        self.current = min(self.current + n, self.total)
        if self._comfy_bar is not None:
            self._comfy_bar.update_absolute(self.current, self.total)
            if preview is not None:
                _send_preview(preview)
        else:
            self._draw()
        check_interrupt()

    def _draw(self) -> None:
        if _Standalone.quiet:
            return
        done = self.current >= self.total
        if not self._tty and not done:
            return
        width = 24
        filled = int(width * self.current / self.total)
        elapsed = time.monotonic() - self._start
        line = f"{self.desc:<14} [{'#' * filled}{'.' * (width - filled)}] {self.current}/{self.total} {elapsed:5.1f}s"
        sys.stderr.write(("\r" + line) if self._tty else line + "\n")
        if done and self._tty:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        return None


PREVIEW_EVENT = "kineflow.preview"  # the message web/kineflow.js listens for


def _send_preview(preview: dict) -> None:
    """Send a live preview to the browser that queued the prompt, tagged with the running node's id as the canvas
    knows it. ComfyUI's own preview message carries one still image; the web extension plays ours."""
    from comfy_execution.progress import get_progress_state
    from comfy_execution.utils import get_executing_context
    from server import PromptServer

    context = get_executing_context()
    if context is None:
        return
    node = get_progress_state().dynprompt.get_display_node_id(context.node_id)
    server = PromptServer.instance
    server.send_sync(PREVIEW_EVENT, {**preview, "node": node, "prompt_id": context.prompt_id}, server.client_id)


def progress(total: int, desc: str = "") -> Progress:
    return Progress(total, desc)


@contextlib.contextmanager
def quiet():
    """Silence standalone progress bars inside (a loop with its own bar over many generations uses it)."""
    _Standalone.quiet += 1
    try:
        yield
    finally:
        _Standalone.quiet -= 1
