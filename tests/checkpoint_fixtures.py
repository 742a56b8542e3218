"""Helpers for tests that need the real checkpoints' key sets without their weights.

The manifests in tests/data/checkpoints list the exact tensor names and shapes of released files.
`header_only_safetensors` turns one into a valid safetensors file whose data region is a sparse hole, so a
"12 GB" file costs a few kilobytes of disk and tools that read only the header see the real thing.
"""

import json
import struct
from pathlib import Path

MANIFEST_DIR = Path(__file__).resolve().parent / "data" / "checkpoints"
_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "I64": 8}


def manifest(name: str) -> dict:
    return json.loads((MANIFEST_DIR / f"{name}.json").read_text())


def manifest_shapes(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v["shape"]) for k, v in manifest(name)["tensors"].items()}


def header_only_safetensors(shapes: dict[str, tuple[int, ...]], path: Path, dtype: str = "BF16",
                            wrap_prefix: str = "") -> Path:
    header, offset = {}, 0
    for name in sorted(shapes):
        n = _DTYPE_BYTES[dtype]
        for s in shapes[name]:
            n *= s
        header[wrap_prefix + name] = {"dtype": dtype, "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        f.truncate(8 + len(blob) + offset)  # the data region is a hole: no disk blocks are written
    return path
