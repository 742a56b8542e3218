"""Run an API prompt headless, with ComfyUI's execution semantics for V1 node classes.

Only nodes that an OUTPUT_NODE depends on run, each after its inputs, each as
`getattr(cls(), cls.FUNCTION)(**inputs)` with hidden inputs (PROMPT, EXTRA_PNGINFO, UNIQUE_ID) supplied.
A node may return a tuple of outputs or `{"ui": ..., "result": tuple}`.

`OutputCache` mirrors ComfyUI's classic cache: a node's key is its class, its IS_CHANGED result, its
constant inputs and, recursively, the keys of the nodes it is linked to (as small ids, so a long chain is keyed in
linear time). Running a prompt again reuses
the outputs of every node whose key is unchanged; IS_CHANGED returning NaN (or raising) means "always run".
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
import time
from pathlib import Path

from . import distributed, host
from ..errors import InputFileError, InterruptedRun, KineFlowError
from .validation import format_error, is_link, validate_prompt
from .workflow import apply_overrides, detect_format, load_workflow, node_id_sort_key, parse_override, ui_to_api


class WorkflowInvalid(InputFileError):
    """The workflow failed validation; `errors` holds every problem as a ComfyUI-style error dict."""

    def __init__(self, errors: list[dict]):
        self.errors = list(errors)
        lines = "; ".join(format_error(e) for e in self.errors[:5])
        more = f" (and {len(self.errors) - 5} more)" if len(self.errors) > 5 else ""
        super().__init__(f"workflow is invalid, {len(self.errors)} problem(s): {lines}{more}")


class NodeExecutionError(KineFlowError):
    """A node raised while running; names the node and keeps the original exception as `original`."""

    def __init__(self, node_id: str, class_type: str, original: BaseException):
        self.node_id = node_id
        self.class_type = class_type
        self.original = original
        detail = str(original) or type(original).__name__
        kind = "" if isinstance(original, KineFlowError) else f"{type(original).__name__}: "
        super().__init__(f"node {node_id} ({class_type}) failed: {kind}{detail}")


class _Uncomparable:
    """A cache-key part equal to nothing (not even itself): NaN from IS_CHANGED, unhashable constants."""

    def __eq__(self, other):
        return False

    def __hash__(self):
        return id(self)


def _freeze(value):
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return _Uncomparable() if math.isnan(value) else value
    if isinstance(value, dict):
        return ("dict", tuple(sorted(((str(k), _freeze(v)) for k, v in value.items()), key=lambda kv: kv[0])))
    if isinstance(value, (list, tuple)):
        return ("list", tuple(_freeze(v) for v in value))
    return _Uncomparable()


class OutputCache:
    """In-process cache of node outputs keyed by input signature; keeps only the last prompt's entries."""

    def __init__(self):
        self._outputs: dict = {}
        self._objects: dict[tuple[str, str], object] = {}
        self._key_ids: dict[tuple, int] = {}
        self._next_id = itertools.count()

    def key(self, signature: tuple) -> int:
        """The id of a node signature, equal for equal signatures. Signatures hold their linked nodes' ids, not
        their whole signatures, so hashing one costs its own size, not that of everything upstream."""
        if signature not in self._key_ids:
            self._key_ids[signature] = next(self._next_id)
        return self._key_ids[signature]

    def __len__(self) -> int:
        return len(self._outputs)

    def get(self, key):
        return self._outputs.get(key)

    def put(self, key, outputs: tuple, ui) -> None:
        self._outputs[key] = (outputs, ui)

    def instance(self, node_id: str, class_type: str, cls):
        """The node object, reused across runs like ComfyUI's object cache (keyed by id and class)."""
        key = (node_id, class_type)
        if key not in self._objects:
            self._objects[key] = cls()
        return self._objects[key]

    def keep_only(self, keys, node_keys) -> None:
        keys = set(keys)
        self._outputs = {k: v for k, v in self._outputs.items() if k in keys}
        self._key_ids = {s: i for s, i in self._key_ids.items() if i in keys}
        self._objects = {k: v for k, v in self._objects.items() if k in node_keys}

    def clear(self) -> None:
        self._outputs.clear()
        self._objects.clear()
        self._key_ids.clear()


def _unwrap(value):
    return value["__value__"] if isinstance(value, dict) and "__value__" in value else value


def _link(value) -> tuple[str, int]:
    return str(value[0]), value[1]


def execution_order(prompt: dict, node_classes: dict) -> list[str]:
    """Nodes needed by the output nodes, each after everything it is linked to: in waves of the nodes whose inputs
    are all ready, each wave by node id (linear in the prompt's size)."""
    outputs = [nid for nid, node in prompt.items()
               if getattr(node_classes.get(node.get("class_type")), "OUTPUT_NODE", False) is True]
    deps: dict[str, set[str]] = {}
    stack = list(outputs)
    while stack:
        node_id = stack.pop()
        if node_id in deps:
            continue
        if node_id not in prompt:
            raise InputFileError(f"a link points to node {node_id!r}, which is not in the prompt.")
        if prompt[node_id].get("class_type") not in node_classes:
            raise InputFileError(f"node {node_id} has unknown type {prompt[node_id].get('class_type')!r}.")
        deps[node_id] = {_link(v)[0] for v in prompt[node_id].get("inputs", {}).values() if is_link(v)}
        stack.extend(deps[node_id])
    waiting = {nid: len(sources) for nid, sources in deps.items()}
    users: dict[str, list[str]] = {nid: [] for nid in deps}
    for nid, sources in deps.items():
        for source in sources:
            users[source].append(nid)
    order: list[str] = []
    wave = sorted((nid for nid, count in waiting.items() if count == 0), key=node_id_sort_key)
    while wave:
        order.extend(wave)
        ready = []
        for nid in wave:
            for user in users[nid]:
                waiting[user] -= 1
                if waiting[user] == 0:
                    ready.append(user)
        wave = sorted(ready, key=node_id_sort_key)
    if len(order) < len(deps):
        stuck = sorted((nid for nid, count in waiting.items() if count), key=node_id_sort_key)
        raise InputFileError("nodes " + ", ".join(stuck) + " depend on each other in a loop; nothing can run first.")
    return order




def _hidden_inputs(cls, prompt: dict, node_id: str, extra_pnginfo) -> dict:
    hidden = (cls.INPUT_TYPES().get("hidden") or {})
    values = {}
    for name, kind in hidden.items():
        kind = kind[0] if isinstance(kind, (list, tuple)) else kind
        if kind == "PROMPT":
            values[name] = prompt
        elif kind == "EXTRA_PNGINFO":
            values[name] = extra_pnginfo
        elif kind == "UNIQUE_ID":
            values[name] = node_id
        elif kind == "DYNPROMPT":
            values[name] = None
    return values


def _is_changed(cls, node: dict, prompt: dict, node_id: str, extra_pnginfo):
    if not hasattr(cls, "IS_CHANGED"):
        return False
    kwargs = {name: (None if is_link(v) else _unwrap(v)) for name, v in node.get("inputs", {}).items()}
    kwargs.update(_hidden_inputs(cls, prompt, node_id, extra_pnginfo))
    try:
        return _freeze(cls.IS_CHANGED(**kwargs))
    except Exception:  # ComfyUI treats a failing IS_CHANGED as "changed" (NaN); so do we
        return _Uncomparable()


def _signatures(prompt: dict, order: list[str], node_classes: dict, extra_pnginfo, cache: OutputCache
                ) -> dict[str, int]:
    keys: dict[str, int] = {}
    for node_id in order:  # dependencies first, so linked keys exist
        node = prompt[node_id]
        cls = node_classes[node["class_type"]]
        parts = [node["class_type"], _is_changed(cls, node, prompt, node_id, extra_pnginfo)]
        hidden_kinds = [k[0] if isinstance(k, (list, tuple)) else k for k in (cls.INPUT_TYPES().get("hidden") or {}).values()]
        if getattr(cls, "NOT_IDEMPOTENT", False) or "UNIQUE_ID" in hidden_kinds:
            parts.append(("id", node_id))
        for name in sorted(node.get("inputs", {})):
            value = node["inputs"][name]
            if is_link(value):
                source, slot = _link(value)
                parts.append((name, ("link", keys[source], slot)))
            else:
                parts.append((name, _freeze(_unwrap(value))))
        keys[node_id] = cache.key(tuple(parts))
    return keys


def _call_node(obj, cls, kwargs: dict):
    result = getattr(obj, cls.FUNCTION)(**kwargs)
    ui = None
    if isinstance(result, dict):
        ui = result.get("ui")
        result = result.get("result", ())
    if result is None:
        result = ()
    if not isinstance(result, (tuple, list)):
        raise KineFlowError(f"{cls.__name__}.{cls.FUNCTION} returned {type(result).__name__}; "
                            "expected a tuple of outputs or {'ui': ..., 'result': tuple}.")
    return tuple(result), ui


def execute(prompt: dict, node_classes: dict, *, extra_pnginfo=None, cache: OutputCache | None = None,
            progress_stream=None, observe=None) -> dict[str, dict]:
    """Run a validated API prompt; returns {node_id: {"ui": ui dict or None, "outputs": tuple}}.

    `observe(node_id, class_type)`, when given, is a context manager entered around each node that runs (a dry
    run measures memory with it, see runtime/plan.py).

    Interruption is checked before every node (host.check_interrupt). On interruption the partially
    finished node leaves nothing in the cache, the interrupt flag is cleared, and InterruptedRun propagates.
    """
    stream = progress_stream if progress_stream is not None else sys.stderr
    cache = cache if cache is not None else OutputCache()
    order = execution_order(prompt, node_classes)
    keys = _signatures(prompt, order, node_classes, extra_pnginfo, cache)
    cache.keep_only(keys.values(), {(nid, prompt[nid]["class_type"]) for nid in order})
    results: dict[str, dict] = {}
    total = len(order)
    try:
        for position, node_id in enumerate(order, start=1):
            host.check_interrupt()
            node = prompt[node_id]
            class_type = node["class_type"]
            cls = node_classes[class_type]
            cached = cache.get(keys[node_id])
            if cached is not None:
                outputs, ui = cached
                stream.write(f"[{position}/{total}] node {node_id} {class_type} (cached)\n")
                results[node_id] = {"ui": ui, "outputs": outputs}
                continue
            stream.write(f"[{position}/{total}] node {node_id} {class_type}\n")
            stream.flush()
            kwargs = {}
            for name, value in node.get("inputs", {}).items():
                if is_link(value):
                    source, slot = _link(value)
                    kwargs[name] = results[source]["outputs"][slot]
                else:
                    kwargs[name] = _unwrap(value)
            kwargs.update(_hidden_inputs(cls, prompt, node_id, extra_pnginfo))
            start = time.monotonic()
            try:
                with observe(node_id, class_type) if observe is not None else contextlib.nullcontext():
                    obj = cache.instance(node_id, class_type, cls)
                    if getattr(cls, "OUTPUT_NODE", False) is True and distributed.active():
                        # A parallel run: rank 0 writes, the other ranks wait for it (runtime/distributed.py).
                        outputs, ui = distributed.output_node(node_id, lambda: _call_node(obj, cls, kwargs))
                    else:
                        outputs, ui = _call_node(obj, cls, kwargs)
            except (InterruptedRun, KeyboardInterrupt):
                raise
            except Exception as exc:
                raise NodeExecutionError(node_id, class_type, exc) from exc
            elapsed = time.monotonic() - start
            if elapsed >= 1.0:
                stream.write(f"[{position}/{total}] node {node_id} {class_type} done in {elapsed:.1f}s\n")
            cache.put(keys[node_id], outputs, ui)
            results[node_id] = {"ui": ui, "outputs": outputs}
    except InterruptedRun:
        if not host.in_comfyui():
            host.clear_interrupt()
        raise
    stream.flush()
    return results


_DEFAULT_CACHE = OutputCache()


def _private_copy(prompt: dict) -> dict:
    """The nodes and their input objects copied, the values shared: validation and overrides replace values, never
    change them in place (a deep copy of a 20,000-node prompt takes seconds)."""
    copied = {}
    for node_id, node in prompt.items():
        if isinstance(node, dict):
            node = dict(node)
            if isinstance(node.get("inputs"), dict):
                node["inputs"] = dict(node["inputs"])
        copied[node_id] = node
    return copied


def prepare_prompt(source, *, overrides=(), node_classes: dict) -> tuple[dict, dict | None, list[dict]]:
    """Load (path or dict), convert UI format, apply overrides, validate.

    Returns (prompt, extra_pnginfo, errors); the prompt is a private copy with coerced values.
    """
    if isinstance(source, (str, Path)):
        data = load_workflow(source)
    elif isinstance(source, dict):
        data = source
    else:
        raise InputFileError(f"a workflow is a file path or a dict, not {type(source).__name__}.")
    problems: list[dict] = []
    if detect_format(data) == "ui":
        prompt, problems = ui_to_api(data, node_classes)
        extra_pnginfo = {"workflow": data}
    else:
        prompt = _private_copy(data)
        extra_pnginfo = None
    if overrides:
        prompt = apply_overrides(prompt, overrides, node_classes)
    errors = problems + validate_prompt(prompt, node_classes)
    return prompt, extra_pnginfo, errors


def override_paths(overrides) -> frozenset[str]:
    """The text values of `--set` overrides: a file path the user typed may be read outside the input folder
    (host.input_file); paths inside a workflow file may not."""
    return frozenset(value.strip() for _, _, value in map(parse_override, overrides) if isinstance(value, str))


def run_workflow(source, *, overrides=(), node_classes: dict | None = None, output_dir=None, models_dir=None,
                 input_dir=None, device=None, memory_budget=None, attention=None, compile=None,
                 cache: OutputCache | None = None, progress_stream=None, observe=None) -> dict[str, dict]:
    """Load, convert, validate and execute a workflow; raises WorkflowInvalid listing every problem."""
    if node_classes is None:
        from .. import NODE_CLASS_MAPPINGS

        node_classes = NODE_CLASS_MAPPINGS
    with host.configured(models_dir=models_dir, output_dir=output_dir, input_dir=input_dir, device=device,
                         memory_budget=memory_budget, attention=attention, compile=compile,
                         user_paths=override_paths(overrides)):
        prompt, extra_pnginfo, errors = prepare_prompt(source, overrides=overrides, node_classes=node_classes)
        if errors:
            raise WorkflowInvalid(errors)
        return execute(prompt, node_classes, extra_pnginfo=extra_pnginfo,
                       cache=cache if cache is not None else _DEFAULT_CACHE, progress_stream=progress_stream,
                       observe=observe)
