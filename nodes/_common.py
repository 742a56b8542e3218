"""Input helpers shared by node modules (not a node module itself: the leading underscore skips registration)."""

from ..runtime import host

DTYPE_CHOICES = ["auto", "bf16", "fp16", "fp32"]
DTYPE_TOOLTIP = "Weight dtype in memory. auto = fp32 on CPU, bf16 on GPU."


def model_choices(kind: str, folders: bool = False) -> list[str]:
    """The files (and, with `folders`, model folders) of a model folder kind, for a loader's dropdown."""
    return host.list_models(kind, include_folders=folders) or [""]
