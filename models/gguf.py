"""GGUF files: their header as a checkpoint Header (no torch: `kineflow inspect` reads it; the tensors' values come
from models/gguf_blocks.py).

A GGUF tensor is stored in GGML order (dimensions innermost first) as blocks of a quantization type. Large
tensors that ComfyUI-GGUF's converter reshaped to rows of 256 (and tensors of more than four dimensions) carry
their real shape in the metadata key `comfy.gguf.orig_shape.<name>`; every tensor here has its logical
(PyTorch) shape.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import ModelFileError

FLOAT_BYTES = {"F32": 4, "F16": 2, "BF16": 2}  # bytes per value of the unquantized types
# (values per block, bytes per block) of the quantized types KineFlow dequantizes.
BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
          "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
SUPPORTED = (*FLOAT_BYTES, *BLOCKS)
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."


def storage_bytes(qtype: str, numel: int) -> int:
    if qtype in FLOAT_BYTES:
        return numel * FLOAT_BYTES[qtype]
    values, nbytes = BLOCKS[qtype]
    return numel // values * nbytes


def read_header(path: Path):
    """The checkpoint Header of a .gguf file: names, logical shapes, quant types, data offsets (no tensor data)."""
    from gguf import GGUFReader, GGUFValueType

    from .checkpoints import Header, TensorInfo

    try:
        reader = GGUFReader(str(path), "r")
    except Exception as e:  # the gguf package raises ValueError, struct errors... for damaged files
        raise ModelFileError(f"{path.name!r} is not a readable GGUF file: {e}") from None
    metadata, orig_shapes = {}, {}
    for name, field in reader.fields.items():
        if name.startswith(ORIG_SHAPE_KEY):
            orig_shapes[name[len(ORIG_SHAPE_KEY):]] = tuple(int(field.parts[i][0]) for i in field.data)
        elif field.types and field.types[0] == GGUFValueType.STRING:
            metadata[name] = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
        elif len(field.types) == 1 and field.types[0] != GGUFValueType.ARRAY:  # numbers, booleans
            metadata[name] = str(field.parts[field.data[0]].tolist()[0])
    tensors = {}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        shape = orig_shapes.get(t.name, tuple(int(d) for d in reversed(t.shape.tolist())))
        if qtype not in SUPPORTED:
            raise ModelFileError(
                f"{path.name!r}: tensor {t.name!r} is stored as GGUF type {qtype}, which KineFlow does not "
                f"dequantize; supported: {', '.join(SUPPORTED)}. Use a file of one of those types")
        if math.prod(shape) != int(t.n_elements) or (qtype in BLOCKS and int(t.n_elements) % BLOCKS[qtype][0]):
            raise ModelFileError(f"{path.name!r}: tensor {t.name!r} has {int(t.n_elements)} values, which do not "
                                 f"fill its shape {list(shape)} in {qtype} blocks")
        tensors[t.name] = TensorInfo(qtype, shape, path, int(t.data_offset))
    return Header(path, tensors, metadata)


def read_array(path: Path, key: str) -> list | None:
    """A metadata array of a .gguf file (e.g. `tokenizer.ggml.tokens`), or None when the file has no such key."""
    from gguf import GGUFReader, GGUFValueType

    field = GGUFReader(str(path), "r").fields.get(key)
    if field is None:
        return None
    if field.types[-1] == GGUFValueType.STRING:
        return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
    return [field.parts[i].tolist()[0] for i in field.data]


def quantization(header) -> str | None:
    """"gguf:<most common quantized type>" for a GGUF header (None for other files)."""
    counts: dict[str, int] = {}
    for info in header.tensors.values():
        if info.dtype in BLOCKS:
            counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    if not counts:
        return "gguf:" + max(FLOAT_BYTES, key=lambda k: sum(i.dtype == k for i in header.tensors.values())) \
            if header.path.suffix.lower() == ".gguf" else None
    return "gguf:" + max(counts, key=counts.get)

