"""Input helpers shared by node modules (not a node module itself: the leading underscore skips registration)."""

from ..runtime import host

DTYPE_CHOICES = ["auto", "bf16", "fp16", "fp32"]
DTYPE_TOOLTIP = "Weight dtype in memory. auto = fp32 on CPU, bf16 on GPU."
OFFLOAD_INPUT = (["auto", "full", "model", "blocks", "sequential"], {"default": "auto", "tooltip": (
    "Where the weights live. full: all on the device. model: on the device only while this model runs. blocks: "
    "a few blocks resident, the others fetched ahead as they run (on a CPU they stay in the file). sequential: "
    "one layer at a time (least memory, slowest). auto: full if the model fits the free memory, else blocks.")})


def model_choices(kind: str, folders: bool = False) -> list[str]:
    """The files (and, with `folders`, model folders) of a model folder kind, for a loader's dropdown."""
    return host.list_models(kind, include_folders=folders) or [""]
