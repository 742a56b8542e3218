"""Validate an API prompt against node classes with ComfyUI's rules, reporting every problem at once.

ComfyUI stops at the first structural problem; here each node with a problem gets its own error so a user
fixes a workflow in one pass. Errors keep ComfyUI's shape (`type`, `message`, `details`, `extra_info`) and
type names, plus `node_id` and `class_type`. The rules followed (execution.py `validate_inputs`):

- only nodes an OUTPUT_NODE depends on are checked (and executed);
- a list input is a link and must be `[node_id, slot]`; the linked output type must match the input type
  (comma-separated types match when they share one; "*" matches anything) unless VALIDATE_INPUTS asks for
  `input_types`;
- constants are coerced with `int()`, `float()`, `str()`, `bool()` for INT/FLOAT/STRING/BOOLEAN (the coerced
  value is written back into the prompt, as ComfyUI does), then checked against `min`/`max` and COMBO lists,
  except inputs that VALIDATE_INPUTS takes itself;
- VALIDATE_INPUTS gets the constant inputs it names (linked ones as None) and returns True or a message.
"""

from __future__ import annotations

import inspect

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
    spec = cls.INPUT_TYPES()
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


def _link_source(value) -> tuple[str, object]:
    source = value[0]
    return (str(source) if isinstance(source, (int, str)) and not isinstance(source, bool) else source), value[1]


def validate_prompt(prompt, node_classes: dict) -> list[dict]:
    """Every problem of an API prompt as a list of error dicts (empty when the prompt can run)."""
    if not isinstance(prompt, dict) or not prompt:
        return [_error("invalid_prompt", "Prompt must be a non-empty object of nodes",
                       f"received {type(prompt).__name__}")]
    errors: list[dict] = []
    known: dict[str, type] = {}
    unknown_types = False  # a node we cannot classify might be the output node
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            errors.append(_error("invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                                 f"Node ID '#{node_id}'", node_id=node_id))
            unknown_types = True
            continue
        cls = node_classes.get(node["class_type"])
        if cls is None:
            unknown_types = True
            errors.append(_error("missing_node_type", f"Node type {node['class_type']!r} does not exist",
                                 "no installed node pack defines it; install the pack or remove the node",
                                 node_id=node_id, class_type=node["class_type"]))
            continue
        if not isinstance(node.get("inputs", {}), dict):
            errors.append(_error("invalid_prompt", "Node inputs must be an object of input names",
                                 f"Node ID '#{node_id}' has inputs of type {type(node['inputs']).__name__}",
                                 node_id=node_id, class_type=node["class_type"]))
            continue
        known[node_id] = cls

    outputs = [nid for nid, cls in known.items() if getattr(cls, "OUTPUT_NODE", False) is True]
    if not outputs:
        if not unknown_types:
            errors.append(_error("prompt_no_outputs", "Prompt has no outputs",
                                 "no node is an output node (e.g. a Save node), so nothing would run"))
        return errors

    reachable = _reachable(prompt, known, outputs)
    for node_id in reachable:
        errors.extend(_validate_node(prompt, node_id, known, node_classes))
    errors.extend(_find_cycles(prompt, reachable, known))
    return errors


def _reachable(prompt: dict, known: dict, outputs: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    stack = list(reversed(outputs))
    while stack:
        node_id = stack.pop()
        if node_id in seen:
            continue
        seen[node_id] = None
        for value in (prompt[node_id].get("inputs") or {}).values():
            if is_link(value) and len(value) == 2:
                source, _ = _link_source(value)
                if source in known and source not in seen:
                    stack.append(source)
    return list(seen)


def _validate_node(prompt: dict, node_id: str, known: dict, node_classes: dict) -> list[dict]:
    node = prompt[node_id]
    class_type = node["class_type"]
    cls = known[node_id]
    inputs = node.setdefault("inputs", {})
    errors = []

    def err(type_, message, details, **extra):
        errors.append(_error(type_, message, details, node_id=node_id, class_type=class_type, **extra))

    validate_fn = getattr(cls, "VALIDATE_INPUTS", None)
    validate_args: list[str] = []
    validate_kwargs = False
    if validate_fn is not None:
        spec = inspect.getfullargspec(validate_fn)
        validate_args = spec.args
        validate_kwargs = spec.varkw is not None
    received_types = {}

    for name, (category, kind, opts) in declared_inputs(cls).items():
        if name not in inputs:
            if category == "required":
                err("required_input_missing", "Required input is missing", name, input_name=name)
            continue
        value = inputs[name]
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
        except (TypeError, ValueError, OverflowError) as exc:
            err("invalid_input_type", f"Failed to convert an input value to a {kind} value",
                f"{name}, {value!r}, {exc}", input_name=name, received_value=value, exception_message=str(exc))
            continue
        inputs[name] = value
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
            err("invalid_input_type", f"Value {value!r} cannot be compared with the input's limits",
                f"{name}, {exc}", input_name=name, received_value=value, exception_message=str(exc))
            continue
        options = combo_options(kind, opts)
        if options is not None and value not in options:
            shown = f"(list of length {len(options)})" if len(options) > 20 else str(options)
            err("value_not_in_list", "Value not in list", f"{name}: {value!r} not in {shown}",
                input_name=name, received_value=value)

    if validate_fn is not None and (validate_args or validate_kwargs):
        errors.extend(_custom_validation(cls, node_id, class_type, inputs, validate_args, validate_kwargs, received_types))
    return errors


def _check_link(prompt: dict, known: dict, name: str, value: list, kind, skip_type_check: bool):
    """An error dict for a bad link, else the received type (None when the source type is unknown)."""
    if len(value) != 2:
        return _error("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                      name, input_name=name, received_value=value)
    source, slot = _link_source(value)
    if source not in prompt:
        return _error("bad_linked_input", f"Input is linked to node {source!r}, which does not exist",
                      f"{name} <- {value!r}", input_name=name, received_value=value)
    if source not in known:
        return None  # its own error (missing class or malformed node) is already reported
    return_types = tuple(getattr(known[source], "RETURN_TYPES", ()))
    if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < len(return_types):
        return _error("bad_linked_input",
                      f"Input is linked to output {slot!r} of node {source} ({prompt[source]['class_type']}), "
                      f"which has {len(return_types)} outputs",
                      f"{name} <- {value!r}", input_name=name, received_value=value)
    received = return_types[slot]
    if not skip_type_check and not types_match(received, kind):
        return _error("return_type_mismatch", "Return type mismatch between linked nodes",
                      f"{name}, received_type({received}) mismatch input_type({kind})",
                      input_name=name, received_type=received, linked_node=value)
    return received


def _custom_validation(cls, node_id, class_type, inputs, args, has_kwargs, received_types) -> list[dict]:
    call = {}
    for name, value in inputs.items():
        if name in args or has_kwargs:
            call[name] = None if is_link(value) else value
    if "input_types" in args:
        call["input_types"] = received_types
    try:
        result = cls.VALIDATE_INPUTS(**call)
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
    edges: dict[str, list[str]] = {}
    for node_id in nodes:
        targets = []
        for value in (prompt[node_id].get("inputs") or {}).values():
            if is_link(value) and len(value) == 2:
                source, _ = _link_source(value)
                if source in known:
                    targets.append(source)
        edges[node_id] = targets
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
