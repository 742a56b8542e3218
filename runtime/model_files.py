"""What validation tells about a loader's model file before anything loads, from its header alone (no tensor data):
that the file is found and readable, of the family the loader expects, and that the numbers its metadata gives are
usable. The loaders make the same checks when they load (`checkpoints.require_family`, `checkpoints.metadata_numbers`),
so `validate` and `run` say the same. torch-free: the node registry imports it."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelFileError
from ..models import checkpoints
from . import host


def model_file_problem(kind: str, name: str, family: str | None = None, metadata: str | None = None) -> str | None:
    """None when `name` in folder `kind` is a usable model file, else why not. `family` is the one the loader requires
    (None: the loader finds its part in any file, as text encoders do); `metadata` the family whose metadata numbers it
    reads (default `family`)."""
    missing = host.missing_model(kind, name)
    if missing:
        return missing
    path = host.model_path(kind, name)
    if not _has_cheap_header(path):
        return None  # a pickle's tensors are known only by unpickling it: its loader checks it
    try:
        header = checkpoints.require_family(path, family)[0] if family else checkpoints.read_header(path)
        checkpoints.metadata_numbers(header, metadata or family or "")
    except ModelFileError as error:
        return str(error)
    return None


def llm_tokenizer_path(llm_path: Path, tokenizer: str) -> Path:
    """Where Load Text Encoders reads the LLaMA tokenizer: `tokenizer` when set (absolute, or a name inside
    text_encoders/); else the model itself when it is a folder or a GGUF file, which carry one; else the folder of the
    model file."""
    if tokenizer.strip():
        path = Path(tokenizer.strip()).expanduser()
        return path if path.is_absolute() else host.model_path("text_encoders", tokenizer.strip())
    return llm_path if llm_path.is_dir() or llm_path.suffix.lower() == ".gguf" else llm_path.parent


def llm_tokenizer_problem(llm_name: str, tokenizer: str) -> str | None:
    """None when Load Text Encoders finds a tokenizer.json (or a GGUF file, which carries its tokenizer) where
    `llm_tokenizer_path` says, else why not."""
    try:
        path = llm_tokenizer_path(host.model_path("text_encoders", llm_name), tokenizer)
    except ModelFileError as error:
        return str(error)
    if path.suffix.lower() == ".gguf" and path.is_file():
        return None
    file = path / "tokenizer.json" if path.is_dir() else path
    if file.is_file():
        return None
    return (f"tokenizer file not found: expected {file}. Put the model's tokenizer.json there (it comes with the "
            "model's Hugging Face files, next to config.json), or name its file or folder in llm_tokenizer")


def _has_cheap_header(path: Path) -> bool:
    """Whether the file's tensor list is read without its data: a .safetensors or .gguf file, or a model folder of
    .safetensors files."""
    if path.is_dir():
        return any(p.suffix.lower() in checkpoints.SAFETENSORS_EXTENSIONS for p in path.iterdir())
    return path.suffix.lower() not in checkpoints.PICKLE_EXTENSIONS
