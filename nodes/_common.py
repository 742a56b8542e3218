"""Input helpers shared by node modules (not a node module itself: the leading underscore skips registration)."""

from ..models import ATTENTION_BACKENDS
from ..runtime import host
from ..runtime.model_files import model_file_problem

DTYPE_CHOICES = ["auto", "bf16", "fp16", "fp32"]
DTYPE_TOOLTIP = "Weight dtype in memory. auto = fp32 on CPU, bf16 on GPU."
OFFLOAD_INPUT = (["auto", "full", "model", "blocks", "sequential"], {"default": "auto", "tooltip": (
    "Where the weights live. full: all on the device. model: on the device only while this model runs. blocks: "
    "a few blocks resident, the others fetched ahead as they run (on a CPU they stay in the file). sequential: "
    "one layer at a time (least memory, slowest). auto: full if the model fits the free memory, else blocks.")})
ATTENTION_INPUT = (list(ATTENTION_BACKENDS), {"default": "auto", "tooltip": (
    "Attention kernel of this model. sdpa: PyTorch's. sdpa_math: PyTorch's plain math kernel (a reference). "
    "tiled: bf16 on the CPU in cache-sized tiles of queries. sageattention, flash_attn, xformers: those packages, on "
    "CUDA GPUs, when installed. Calls a kernel cannot run use sdpa. auto: kineflow run --attention or "
    "$KINEFLOW_ATTENTION if set, else per call the first installed of sageattention, flash_attn, xformers that can "
    "run it, then tiled for bf16 calls on a CPU with native bf16 matmul when large enough to gain, else sdpa.")})
COMPILE_INPUT = (["auto", "disabled", "enabled"], {"default": "auto", "tooltip": (
    "Compile the repeated blocks with torch.compile (one compilation per block class; the first run, and each new "
    "size, pays the compile time). Needs a C++ compiler on a CPU, Triton on a GPU; else a warning and eager "
    "execution. Not with 'sequential' offload. auto: enabled by kineflow run --compile or $KINEFLOW_COMPILE=1, "
    "else disabled.")})


def model_choices(kind: str, folders: bool = False) -> list[str]:
    """The files (and, with `folders`, model folders) of a model folder kind, for a loader's dropdown."""
    return host.list_models(kind, include_folders=folders) or [""]


def check_model_files(*files: tuple) -> bool | str:
    """VALIDATE_INPUTS body of a loader: True when each (folder kind, name[, family[, metadata family]]) names a model
    whose header the loader would accept (see runtime/model_files.py), else why not: for a missing file what was
    searched and where it belongs (instead of ComfyUI's bare "Value not in list"). A linked name (None) is checked
    when the node runs."""
    problems = [model_file_problem(kind, str(name), *family) for kind, name, *family in files if name is not None]
    return "; ".join(p for p in problems if p) or True
