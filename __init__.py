"""KineFlow: a text-to-video node pack for ComfyUI (HunyuanVideo-style and AnimateDiff-style models).

ComfyUI imports this folder as a custom node package and reads the three names below. The same package is
importable as `kineflow` after `pip install -e .`, for the headless runner and the `kineflow` command.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .runtime import host as _host

WEB_DIRECTORY = "./web"

if _host.in_comfyui():
    _host.register_comfyui_folders()
    _host.register_comfyui_routes()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
