"""The node reference (docs/NODES.md), generated from the registered node classes.

`kineflow nodes --markdown > docs/NODES.md` regenerates it; a test fails when the committed file differs.
The text must not depend on the machine, so COMBO inputs whose choices are the files installed in a model or
input folder (found by `file_choice_inputs`) are described as such instead of listing what happens to be there.
"""

from __future__ import annotations

import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

from . import host
from .files import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from .validation import combo_options, declared_inputs
from .workflow import widget_slots

REGENERATE_COMMAND = "kineflow nodes --markdown > docs/NODES.md"
PROBE_STEM = "kineflow-docs-probe"
MAX_LISTED_CHOICES = 12


@contextmanager
def _folders(root: Path | None):
    """Point the standalone model and input folders at `root` (None: empty folders) for the duration."""
    with tempfile.TemporaryDirectory() as empty:
        base = root if root is not None else Path(empty)
        with host.configured(models_dir=base / "models", input_dir=base / "input"):
            yield


def _combo_choices(cls) -> dict[str, list]:
    return {name: combo_options(kind, opts) for name, (_, kind, opts) in declared_inputs(cls).items()
            if combo_options(kind, opts) is not None}


def file_choice_inputs(cls) -> set[str]:
    """Names of COMBO inputs whose choices are installed files: they change when a probe file is added
    to every model folder and to the input folder."""
    with _folders(None):
        before = _combo_choices(cls)
    with tempfile.TemporaryDirectory() as probe_root:
        root = Path(probe_root)
        for names in host.MODEL_FOLDERS.values():
            for name in names:
                (root / "models" / name).mkdir(parents=True, exist_ok=True)
                (root / "models" / name / f"{PROBE_STEM}.safetensors").touch()
        (root / "input").mkdir()
        for extension in {VIDEO_EXTENSIONS[0], IMAGE_EXTENSIONS[0]}:
            (root / "input" / f"{PROBE_STEM}{extension}").touch()
        with _folders(root):
            after = _combo_choices(cls)
    return {name for name in after if after[name] != before.get(name)}


def _cell(value) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _code(value) -> str:
    text = repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
    return f"`{_cell(text)}`" if text != "" else ""


def _type_and_range(name: str, kind, opts: dict, file_inputs: set[str], controlled: set[str]) -> tuple[str, str]:
    choices = combo_options(kind, opts)
    if choices is not None:
        if name in file_inputs:
            return "COMBO", "installed files"
        shown = ", ".join(_code(c) for c in choices[:MAX_LISTED_CHOICES])
        more = f" (+{len(choices) - MAX_LISTED_CHOICES} more)" if len(choices) > MAX_LISTED_CHOICES else ""
        return "COMBO", shown + more
    type_name = str(kind)
    if kind == "STRING" and opts.get("multiline"):
        type_name = "STRING (multiline)"
    if opts.get("forceInput"):
        type_name += " (socket)"
    parts = []
    if "min" in opts or "max" in opts:
        parts.append(f"{opts.get('min', '')} … {opts.get('max', '')}".strip())
    if "step" in opts:
        parts.append(f"step {opts['step']}")
    if name in controlled:
        parts.append("control after generate")
    return type_name, ", ".join(parts)


def _anchor(text: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def _node_section(type_name: str, cls, display_name: str) -> list[str]:
    lines = [f"### {display_name}", ""]
    facts = [f"`{type_name}`"]
    if getattr(cls, "OUTPUT_NODE", False):
        facts.append("output node")
    lines += [" · ".join(facts), ""]
    description = getattr(cls, "DESCRIPTION", "")
    if description:
        lines += [" ".join(str(description).split()), ""]
    inputs = declared_inputs(cls)
    if inputs:
        file_inputs = file_choice_inputs(cls)
        controlled = {name for name, extra, _, _ in widget_slots(cls) if extra}
        lines += ["| Input | Type | Default | Range | Description |", "|---|---|---|---|---|"]
        for name, (category, kind, opts) in inputs.items():
            type_label, value_range = _type_and_range(name, kind, opts, file_inputs, controlled)
            label = f"`{name}`" + (" (optional)" if category == "optional" else "")
            default = "" if name in file_inputs or "default" not in opts else _code(opts["default"])
            lines.append(f"| {label} | {_cell(type_label)} | {default} | {value_range} | {_cell(opts.get('tooltip', ''))} |")
        lines.append("")
    returns = tuple(getattr(cls, "RETURN_TYPES", ()) or ())
    if returns:
        names = tuple(getattr(cls, "RETURN_NAMES", None) or returns)
        tooltips = tuple(getattr(cls, "OUTPUT_TOOLTIPS", None) or ())
        lines += ["| Output | Type | Description |", "|---|---|---|"]
        for i, kind in enumerate(returns):
            kind_label = "COMBO" if isinstance(kind, (list, tuple)) else kind
            tooltip = tooltips[i] if i < len(tooltips) else ""
            lines.append(f"| `{names[i] if i < len(names) else kind_label}` | {_cell(kind_label)} | {_cell(tooltip)} |")
        lines.append("")
    return lines


def node_reference_markdown(node_classes: dict, display_names: dict) -> str:
    """The whole reference: one section per category, nodes sorted by display name within it."""
    by_category: dict[str, list[tuple[str, str]]] = {}
    for type_name, cls in node_classes.items():
        category = str(getattr(cls, "CATEGORY", "") or "uncategorised")
        by_category.setdefault(category, []).append((display_names.get(type_name, type_name), type_name))
    lines = ["# KineFlow node reference", "",
             f"Generated from the registered nodes by `{REGENERATE_COMMAND}`; do not edit by hand.", ""]
    for category in sorted(by_category):
        entries = ", ".join(f"[{d}](#{_anchor(d)})" for d, _ in sorted(by_category[category]))
        lines.append(f"- **{category}**: {entries}")
    lines.append("")
    for category in sorted(by_category):
        lines += [f"## {category}", ""]
        for display_name, type_name in sorted(by_category[category]):
            lines += _node_section(type_name, node_classes[type_name], display_name)
    return "\n".join(lines).rstrip("\n") + "\n"
