"""Files without tensors: atomic writes, ComfyUI-style output names, input file lists, and the media formats
the nodes offer.

Nothing here imports torch, PyAV or Pillow: the node registry reads these names, and listing nodes or converting
a workflow must not wait for those (runtime/media.py encodes and decodes).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Iterator

from ..errors import KineFlowError

VIDEO_FORMATS = ("mp4", "webm", "gif", "webp")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".m4v", ".avi", ".gif", ".webp")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
RESIZE_METHODS = ("nearest", "bilinear", "bicubic", "area", "lanczos")
CROP_MODES = ("disabled", "center")


# --------------------------------------------------------------------------- files
# What this process is writing: temporary files, and output names it has claimed but not written yet. A write that
# fails removes its own; `remove_unfinished` removes what an interruption at an unlucky moment left (the CLI calls it
# on every exit).
_temporaries: set[Path] = set()
_claims: set[Path] = set()
# Called with the target path after a file is complete and before it is renamed into place; it may raise to leave
# nothing written (a parallel run's rank 0 waits there for every rank: runtime/distributed.py).
before_commit = None


def _create_new(path: Path) -> None:
    """Create `path` empty, failing with FileExistsError if anything has that name (an exclusive create)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync it and `os.replace` it onto `path`.

    The temporary name keeps the target's extension (encoders pick the container from it) and starts with a
    dot so it never matches an output counter. On any exception, KeyboardInterrupt and InterruptedRun included,
    the temporary file is deleted and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(8)}.tmp{path.suffix}")
    _temporaries.add(tmp)  # before it exists: an interruption between creating and recording it cannot leak it
    try:
        _create_new(tmp)
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        if before_commit is not None:
            before_commit(path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        _temporaries.discard(tmp)
        raise
    _temporaries.discard(tmp)
    _fsync_dir(path.parent)


def write_text_to(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a file the user named: atomically (see `atomic_write`) when the name is new or a regular file;
    anything else, such as /dev/stdout, /dev/null, a pipe or a symlink, is opened and written in place like a shell's
    `>` does, because replacing it would turn it into a regular file (or break the link)."""
    path = Path(path)
    try:
        try:
            replaceable = stat.S_ISREG(path.lstat().st_mode)
        except FileNotFoundError:
            replaceable = True
        if replaceable:
            with atomic_write(path) as tmp:
                tmp.write_text(text, encoding="utf-8")
        else:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)
    except OSError as error:
        raise KineFlowError(f"cannot write {path}: {error.strerror or error}") from None


def release_claim(path: Path) -> None:
    """Give back a name `next_output_path` claimed: the empty placeholder is deleted unless a write filled it (a
    written output is never empty)."""
    _claims.discard(path)
    with contextlib.suppress(OSError):
        if path.stat().st_size == 0:
            path.unlink()


def remove_unfinished() -> None:
    """Delete this process's temporary files and the claimed output names it never wrote."""
    for tmp in list(_temporaries):
        tmp.unlink(missing_ok=True)
        _temporaries.discard(tmp)
    for path in list(_claims):
        release_claim(path)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; not all platforms can open a directory (Windows), which is fine to skip."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# The longest suffix an output name gets after its prefix (`_00001_.webm`; a counter past 99999 adds digits).
_COUNTER_SUFFIX = len("_00001_.webm")
_WINDOWS_FORBIDDEN = set('<>:"|?*')


def filename_prefix_problem(filename_prefix: str) -> str | None:
    """None when outputs can be named with this prefix, else why not. Only the text is looked at, so validation says
    it before anything runs; `next_output_path` checks it again, with the folder (a link may lead out of it)."""
    prefix = filename_prefix.strip().replace("\\", "/")
    no_name = (f"filename_prefix must end with a file name, e.g. 'KineFlow' or 'videos/KineFlow'; got "
               f"{filename_prefix!r}.")
    if not prefix or prefix.endswith("/"):
        return no_name
    refused = sorted({c for c in prefix if c == "\0" or (os.name == "nt" and (c in _WINDOWS_FORBIDDEN or ord(c) < 32))})
    try:
        os.fsencode(prefix)
    except UnicodeEncodeError as error:
        refused.append(error.object[error.start])
    if refused:
        return f"filename_prefix {filename_prefix!r} has characters file names cannot hold: {refused}."
    normalized = os.path.normpath(prefix)
    parts = Path(normalized).parts
    if os.path.isabs(normalized) or (parts and parts[0] == ".."):
        return (f"filename_prefix {filename_prefix!r} points outside the output folder; use a relative prefix such as "
                "'videos/KineFlow'.")
    if not parts:  # "." or "a/.."
        return no_name
    longest = max(len(os.fsencode(part)) for part in parts[:-1] + (parts[-1] + "x" * _COUNTER_SUFFIX,))
    if longest > 255:
        return (f"filename_prefix {filename_prefix[:40]!r}... makes a file or folder name of {longest} bytes; file "
                "systems allow 255.")
    return None


def next_output_path(output_dir: str | os.PathLike, filename_prefix: str, ext: str,
                     claim: bool = True) -> tuple[Path, str, str]:
    """Next free `<prefix>_<00001>_.<ext>` in `output_dir` (ComfyUI's naming); returns (path, subfolder, filename).

    The prefix may contain sub-folders ("videos/run"). The counter is one more than the highest counter of any file
    with the same prefix, whatever its extension, as ComfyUI does. With `claim` (all but dry runs) the sub-folders
    are created and so is the file, empty and exclusively: of runs racing for a counter, one gets it and the others
    move on to the next, so no two runs write the same name. Write the output with `atomic_write(path)`, which
    replaces only that placeholder, then `release_claim(path)` (also when the write failed).
    """
    ext = ext.lstrip(".")
    problem = filename_prefix_problem(filename_prefix)
    if problem:
        raise KineFlowError(problem)
    root = Path(output_dir).resolve()
    normalized = os.path.normpath(filename_prefix.strip().replace("\\", "/"))
    subfolder, name = os.path.split(normalized)
    folder = (root / subfolder).resolve()
    if os.path.isabs(normalized) or not folder.is_relative_to(root):
        raise KineFlowError(
            f"filename_prefix {filename_prefix!r} points outside the output folder {root}; "
            f"use a relative prefix such as 'videos/KineFlow'."
        )
    pattern = re.compile(re.escape(name) + r"_(\d+)_")
    counters = [int(m.group(1)) for f in (os.listdir(folder) if folder.is_dir() else ()) if (m := pattern.match(f))]
    counter = max(counters, default=0) + 1
    if claim:
        counter = _claim(folder, name, ext, counter)
    filename = f"{name}_{counter:05d}_.{ext}"
    return folder / filename, Path(subfolder).as_posix() if subfolder else "", filename


def _claim(folder: Path, name: str, ext: str, counter: int) -> int:
    """Create the first free `<name>_<counter>_.<ext>` from `counter` on, exclusively; returns its counter."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            path = folder / f"{name}_{counter:05d}_.{ext}"
            try:
                _create_new(path)
            except FileExistsError:  # another run took it since the listing
                counter += 1
                continue
            _claims.add(path)
            return counter
    except OSError as error:
        raise KineFlowError(f"cannot create an output file in {folder}: {error.strerror or error}") from None


# --------------------------------------------------------------------------- inputs
def list_input_files(folder: str | os.PathLike, extensions: tuple[str, ...]) -> list[str]:
    """Files directly in `folder` with one of the extensions, sorted (what a loader's COMBO offers)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(f.name for f in folder.iterdir() if f.is_file() and f.suffix.lower() in extensions and not f.name.startswith("."))
