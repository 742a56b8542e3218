"""Node registration: every module in this package that defines NODE_CLASS_MAPPINGS is collected here.

Modules are discovered rather than listed so that adding a stage means adding one file.
"""

import importlib
import pkgutil

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("_"):
        continue
    _module = importlib.import_module(f".{_info.name}", __package__)
    for _name, _cls in getattr(_module, "NODE_CLASS_MAPPINGS", {}).items():
        if _name in NODE_CLASS_MAPPINGS:
            raise RuntimeError(f"node type {_name!r} is defined twice (second time in nodes/{_info.name}.py)")
        NODE_CLASS_MAPPINGS[_name] = _cls
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_module, "NODE_DISPLAY_NAME_MAPPINGS", {}))
