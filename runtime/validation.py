"""Validate an API prompt against node classes with ComfyUI's rules, reporting every problem at once.

ComfyUI stops at the first structural problem; here each node with a problem gets its own error so a user
fixes a workflow in one pass. Errors keep ComfyUI's shape (`type`, `message`, `details`, `extra_info`) and
type names, plus `node_id` and `class_type`. The rules followed (execution.py `validate_inputs`):

- only nodes an OUTPUT_NODE depends on are checked (and executed);
- a list input is a link and must be `[node_id, slot]`; the linked output type must match the input type
  (comma-separated types match when they share one; "*" matches anything) unless VALIDATE_INPUTS asks for
  `input_types`;
- an input of another type than INT/FLOAT/STRING/BOOLEAN/COMBO (or "*") must be a link: ComfyUI would pass a
  constant there to the node, which then fails at run time (stricter than ComfyUI);
- constants are coerced with `int()`, `float()`, `str()`, `bool()` for INT/FLOAT/STRING/BOOLEAN (the coerced
  value is written back into the prompt, as ComfyUI does), then checked against `min`/`max` and COMBO lists,
  except inputs that VALIDATE_INPUTS takes itself;
- VALIDATE_INPUTS gets the constant inputs it names (linked ones as None) and returns True or a message;
- inputs a node does not declare are ignored, as ComfyUI ignores such constants: they are removed, with a logged
  note.

Stricter than ComfyUI (which lets these through to the node): a FLOAT that is NaN or infinite is an error
(`value_not_finite`) even where VALIDATE_INPUTS takes the input, and a link must come from a node id (a string or
number). The work is linear in the prompt's size: input declarations are read once per class, and graphs are
walked without recursion.
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import NamedTuple

from .workflow import is_widget_type

log = logging.getLogger(__name__)

LINK_TYPES_ANY = "*"


def _error(type_: str, message: str, details: str = "", node_id=None, class_type=None, **extra) -> dict:
    return {"type": type_, "message": message, "details": details, "extra_info": extra,
            "node_id": node_id, "class_type": class_type}


def types_match(received, expected) -> bool:
    """ComfyUI's non-strict type check: equal, or comma-separated lists that share a type; '*' matches all."""
    if not received != expected:
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    if LINK_TYPES_ANY in (received.strip(), expected.strip()):
        return True
    return bool({t.strip() for t in received.split(",")} & {t.strip() for t in expected.split(",")})


def is_link(value) -> bool:
    return isinstance(value, list)


def declared_inputs(cls) -> dict[str, tuple[str, object, dict]]:
    """name -> (category, type, options) for required and optional inputs, in declaration order."""
    return _declared(cls.INPUT_TYPES())


def _declared(spec) -> dict[str, tuple[str, object, dict]]:
    result = {}
    for category in ("required", "optional"):
        for name, entry in (spec.get(category) or {}).items():
            kind = entry[0] if isinstance(entry, (list, tuple)) and entry else entry
            opts = entry[1] if isinstance(entry, (list, tuple)) and len(entry) > 1 and isinstance(entry[1], dict) else {}
            result[name] = (category, kind, opts)
    return result


def combo_options(kind, opts: dict):
    if isinstance(kind, (list, tuple)):
        return list(kind)
    if kind == "COMBO" and isinstance(opts.get("options"), (list, tuple)):
        return list(opts["options"])
    return None


def check_declared(node_class, **values) -> bool | str:
    """VALIDATE_INPUTS helper: ComfyUI's own checks (COMBO lists, min and max) and a finite number for each FLOAT, for
    the inputs a node's VALIDATE_INPUTS names. ComfyUI skips its checks for those inputs, so the node makes them
    itself. True, or one message naming each bad input; linked inputs (None) are checked when the node runs."""
    declared = declared_inputs(node_class)
    problems = []
    for name, value in values.items():
        if value is None or name not in declared:
            continue
        _, kind, opts = declared[name]
        problem = _declared_problem(kind, opts, value)
        if problem:
            problems.append(f"{name}: {problem}")
    return "; ".join(problems) or True


def _declared_problem(kind, opts: dict, value) -> str | None:
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{_brief(value)} is not a number"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{value} is not a finite number"
        if "min" in opts and value < opts["min"]:
            return f"Value {value} smaller than min of {opts['min']}"
        if "max" in opts and value > opts["max"]:
            return f"Value {value} bigger than max of {opts['max']}"
        return None
    options = combo_options(kind, opts)
    if options is not None and value not in options:
        shown = f"(list of length {len(options)})" if len(options) > 20 else str(options)
        return f"{_brief(value)} not in {shown}"
    return None


class _ClassSpec(NamedTuple):
    """What validation reads of a node class, read once per class and prompt."""

    node_class: type
    inputs: dict[str, tuple[str, object, dict]]
    hidden: frozenset
    validate_args: tuple
    validate_kwargs: bool
    return_types: tuple

    @classmethod
    def of(cls, node_class) -> "_ClassSpec":
        spec = node_class.INPUT_TYPES()
        args, kwargs = (), False
        validate_fn = getattr(node_class, "VALIDATE_INPUTS", None)
        if validate_fn is not None:
            argspec = inspect.getfullargspec(validate_fn)
            args, kwargs = tuple(argspec.args), argspec.varkw is not None
        return cls(node_class, _declared(spec), frozenset(spec.get("hidden") or {}), args, kwargs,
                   tuple(getattr(node_class, "RETURN_TYPES", ())))


def _link_source(value):
    """The node id a link comes from as a string, or None when it is not a node id (a list, object, bool...)."""
    source = value[0]
    return str(source) if isinstance(source, (int, str)) and not isinstance(source, bool) else None


def _brief(value, limit: int = 80) -> str:
    """repr() cut to `limit` characters (a hostile workflow may hold megabytes in one value)."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for repr (Python's int-string conversion limit)
        return f"<a {value.bit_length()}-bit number>"
    return text if len(text) <= limit else text[:limit] + "..."


def validate_prompt(prompt, node_classes: dict) -> list[dict]:
    """Every problem of an API prompt as a list of error dicts (empty when the prompt can run)."""
    if not isinstance(prompt, dict) or not prompt:
        return [_error("invalid_prompt", "Prompt must be a non-empty object of nodes",
                       f"received {type(prompt).__name__}")]
    errors: list[dict] = []
    known: dict[str, _ClassSpec] = {}
    specs: dict[type, _ClassSpec] = {}
    unknown_types = False  # a node we cannot classify might be the output node
    outputs = []
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            errors.append(_error("invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                                 f"Node ID '#{node_id}'", node_id=node_id))
            unknown_types = True
            continue
        cls = node_classes.get(node["class_type"])
        if cls is None:
            unknown_types = True
            errors.append(_error("missing_node_type", f"Node type {_brief(node['class_type'])} does not exist",
                                 "no installed node pack defines it; install the pack or remove the node",
                                 node_id=node_id, class_type=node["class_type"]))
            continue
        if not isinstance(node.get("inputs", {}), dict):
            errors.append(_error("invalid_prompt", "Node inputs must be an object of input names",
                                 f"Node ID '#{node_id}' has inputs of type {type(node['inputs']).__name__}",
                                 node_id=node_id, class_type=node["class_type"]))
            continue
        if cls not in specs:
            specs[cls] = _ClassSpec.of(cls)
        known[node_id] = specs[cls]
        _drop_undeclared_inputs(node_id, node, specs[cls])
        if getattr(cls, "OUTPUT_NODE", False) is True:
            outputs.append(node_id)

    if not outputs:
        if not unknown_types:
            errors.append(_error("prompt_no_outputs", "Prompt has no outputs",
                                 "no node is an output node (e.g. a Save node), so nothing would run"))
        return errors

    reachable = _reachable(prompt, known, outputs)
    for node_id in reachable:
        errors.extend(_validate_node(prompt, node_id, known))
    errors.extend(_find_cycles(prompt, reachable, known))
    return errors


def _drop_undeclared_inputs(node_id: str, node: dict, spec: _ClassSpec) -> None:
    """ComfyUI ignores constants a node class does not declare (and hands undeclared links to the node, which then
    fails on an unexpected argument); both are dropped here, with a note naming them."""
    inputs = node.get("inputs") or {}
    extra = [name for name in inputs if name not in spec.inputs and name not in spec.hidden]
    if extra:
        for name in extra:
            del inputs[name]
        log.warning("KineFlow: node %s (%s) has input(s) %s that its class does not declare; they are ignored.",
                    node_id, node["class_type"], ", ".join(_brief(name) for name in extra))


def _links(node: dict):
    """The node ids a node's inputs link to (well-formed links only)."""
    for value in (node.get("inputs") or {}).values():
        if is_link(value) and len(value) == 2:
            source = _link_source(value)
            if source is not None:
                yield source


def _reachable(prompt: dict, known: dict, outputs: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    stack = list(reversed(outputs))
    while stack:
        node_id = stack.pop()
        if node_id in seen:
            continue
        seen[node_id] = None
        stack.extend(source for source in _links(prompt[node_id]) if source in known and source not in seen)
    return list(seen)


def _validate_node(prompt: dict, node_id: str, known: dict[str, _ClassSpec]) -> list[dict]:
    node = prompt[node_id]
    class_type = node["class_type"]
    spec = known[node_id]
    inputs = node.setdefault("inputs", {})
    errors = []

    def err(type_, message, details, **extra):
        errors.append(_error(type_, message, details, node_id=node_id, class_type=class_type, **extra))

    validate_args, validate_kwargs = spec.validate_args, spec.validate_kwargs
    received_types = {}

    for name, (category, kind, opts) in spec.inputs.items():
        if name not in inputs:
            if category == "required":
                err("required_input_missing", "Required input is missing", name, input_name=name)
            continue
        value = inputs[name]
        if not is_link(value) and not (is_widget_type(kind) or kind == LINK_TYPES_ANY):
            shown = value["__value__"] if isinstance(value, dict) and "__value__" in value else value
            err("invalid_input_type", f"Input needs a link from a node's {kind} output, not a constant",
                f"{name}, {_brief(shown)}", input_name=name, received_value=shown)
            continue
        if is_link(value):
            problem = _check_link(prompt, known, name, value, kind, skip_type_check="input_types" in validate_args)
            if isinstance(problem, dict):
                errors.append({**problem, "node_id": node_id, "class_type": class_type})
            elif problem is not None:
                received_types[name] = problem
            continue
        if isinstance(value, dict) and "__value__" in value:
            value = value["__value__"]
            inputs[name] = value
        try:
            if kind == "INT":
                value = int(value)
            elif kind == "FLOAT":
                value = float(value)
            elif kind == "STRING":
                value = str(value)
            elif kind == "BOOLEAN":
                value = bool(value)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            err("invalid_input_type", f"Failed to convert an input value to a {kind} value",
                f"{name}, {_brief(value)}, {exc}", input_name=name, received_value=value, exception_message=str(exc))
            continue
        inputs[name] = value
        if kind == "FLOAT" and not math.isfinite(value):
            err("value_not_finite", f"Value {value} is not a finite number", name, input_name=name,
                received_value=value)
            continue
        if name in validate_args or validate_kwargs:
            continue
        try:
            if "min" in opts and value < opts["min"]:
                err("value_smaller_than_min", f"Value {value} smaller than min of {opts['min']}", name,
                    input_name=name, received_value=value)
                continue
            if "max" in opts and value > opts["max"]:
                err("value_bigger_than_max", f"Value {value} bigger than max of {opts['max']}", name,
                    input_name=name, received_value=value)
                continue
        except TypeError as exc:
            err("invalid_input_type", f"Value {_brief(value)} cannot be compared with the input's limits",
                f"{name}, {exc}", input_name=name, received_value=value, exception_message=str(exc))
            continue
        options = combo_options(kind, opts)
        if options is not None and value not in options:
            shown = f"(list of length {len(options)})" if len(options) > 20 else str(options)
            err("value_not_in_list", "Value not in list", f"{name}: {_brief(value)} not in {shown}",
                input_name=name, received_value=value)

    if validate_args or validate_kwargs:
        errors.extend(_custom_validation(spec, node_id, class_type, inputs, received_types))
    return errors


def _check_link(prompt: dict, known: dict[str, _ClassSpec], name: str, value: list, kind, skip_type_check: bool):
    """An error dict for a bad link, else the received type (None when the source type is unknown)."""
    if len(value) != 2:
        return _error("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                      name, input_name=name, received_value=value)
    source, slot = _link_source(value), value[1]
    if source is None:
        return _error("bad_linked_input", "Bad linked input, the node id must be a string or a number",
                      f"{name} <- {_brief(value)}", input_name=name, received_value=value)
    if source not in prompt:
        return _error("bad_linked_input", f"Input is linked to node {_brief(source)}, which does not exist",
                      f"{name} <- {_brief(value)}", input_name=name, received_value=value)
    if source not in known:
        return None  # its own error (missing class or malformed node) is already reported
    return_types = known[source].return_types
    if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < len(return_types):
        return _error("bad_linked_input",
                      f"Input is linked to output {_brief(slot)} of node {source} ({prompt[source]['class_type']}), "
                      f"which has {len(return_types)} outputs",
                      f"{name} <- {_brief(value)}", input_name=name, received_value=value)
    received = return_types[slot]
    if not skip_type_check and not types_match(received, kind):
        return _error("return_type_mismatch", "Return type mismatch between linked nodes",
                      f"{name}, received_type({received}) mismatch input_type({kind})",
                      input_name=name, received_type=received, linked_node=value)
    return received


def _custom_validation(spec: _ClassSpec, node_id, class_type, inputs, received_types) -> list[dict]:
    args, has_kwargs = spec.validate_args, spec.validate_kwargs
    call = {}
    for name, value in inputs.items():
        if name in args or has_kwargs:
            call[name] = None if is_link(value) else value
    if "input_types" in args:
        call["input_types"] = received_types
    try:
        result = spec.node_class.VALIDATE_INPUTS(**call)
    except Exception as exc:  # a node's validator is user code; report, do not crash the whole validation
        return [_error("exception_during_validation", "Exception when validating node",
                       f"{type(exc).__name__}: {exc}", node_id=node_id, class_type=class_type,
                       exception_type=type(exc).__name__, exception_message=str(exc))]
    if result is True:
        return []
    names = ", ".join(n for n in call if n != "input_types")
    details = names if result is False else f"{names} - {result}"
    return [_error("custom_validation_failed", "Custom validation failed for node", details,
                   node_id=node_id, class_type=class_type, input_name=names,
                   received_value={n: v for n, v in call.items() if n != "input_types"})]


def _find_cycles(prompt: dict, nodes: list[str], known: dict) -> list[dict]:
    """One dependency_cycle error per strongly connected loop among the nodes that would run."""
    edges = {node_id: [source for source in _links(prompt[node_id]) if source in known] for node_id in nodes}
    # Tarjan's algorithm, iterative so long chains cannot hit the recursion limit.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    errors = []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            node, child = work.pop()
            if child == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            succ = edges.get(node, [])
            if child < len(succ):
                work.append((node, child + 1))
                nxt = succ[child]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges.get(node, []):
                    members = sorted(component)
                    errors.append(_error("dependency_cycle", "Nodes depend on each other in a loop",
                                         "loop through nodes " + " -> ".join(members),
                                         node_id=members[0], class_type=prompt[members[0]]["class_type"],
                                         nodes=members))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return errors


def format_error(error: dict) -> str:
    """One readable line: node id, class, input, message, details and the error type."""
    parts = []
    if error.get("node_id") is not None:
        where = f"node {error['node_id']}"
        if error.get("class_type"):
            where += f" ({error['class_type']})"
        parts.append(where)
    input_name = (error.get("extra_info") or {}).get("input_name")
    if input_name:
        parts.append(f"input {input_name!r}")
    message = error.get("message", "")
    details = error.get("details")
    text = f"{message}: {details}" if details else message
    prefix = " ".join(parts)
    return f"{prefix}: {text} [{error.get('type')}]" if prefix else f"{text} [{error.get('type')}]"
