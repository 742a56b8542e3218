"""Workflow files: loading, format detection, UI (canvas) -> API conversion and `--set` overrides.

ComfyUI knows two JSON shapes. The *API format* (what `/prompt` receives) maps node ids to
`{"class_type", "inputs", "_meta"}`; an input is a constant or a link `[source_id, output_slot]`.
The *UI format* is the canvas the frontend saves: `nodes` with positional `widgets_values`, `links`
(litegraph 0.4 arrays or version-1 objects), virtual nodes (Reroute, PrimitiveNode, notes), node modes
(muted, bypassed) and subgraph definitions. `ui_to_api` converts the second into the first with the rules
of the ComfyUI frontend (1.27.10 and 1.35.9 checked live; its `graphToPrompt` and `ExecutableNodeDTO`):

- widgets are the inputs of type INT/FLOAT/STRING/BOOLEAN/COMBO (a list or "COMBO") without `forceInput`,
  in declaration order, required then optional; an INT whose `control_after_generate` option is set (or,
  when the option is absent, which is named `seed`/`noise_seed`) is followed by one control value, a COMBO
  with `control_after_generate` by two (control and filter list); those values are never sent;
- a widget input that is linked takes the link; list values are wrapped as `{"__value__": [...]}`;
- a Reroute passes its input through, a PrimitiveNode writes its value into the widgets it feeds, notes
  vanish, muted nodes (mode 2) vanish and inputs linked to them are dropped, a bypassed node (mode 4) hands
  each output the first input of a compatible type;
- a subgraph instance is replaced by the nodes of its definition, with execution ids `"outer:inner"`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import InputFileError

MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_NESTING_DEPTH = 100

MODE_NEVER = 2  # muted
MODE_BYPASS = 4
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_NAMES = ("seed", "noise_seed")
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
REROUTE_TYPE = "Reroute"
PRIMITIVE_TYPE = "PrimitiveNode"
VIRTUAL_TYPES = NOTE_TYPES | {REROUTE_TYPE, PRIMITIVE_TYPE}
SUBGRAPH_INPUT_NODE_ID = -10


# --------------------------------------------------------------------------- loading
def _nesting_depth(text: str) -> int:
    """Deepest bracket nesting outside strings; checked before parsing so deep input cannot exhaust the stack."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_NESTING_DEPTH:
                    return deepest
        elif ch in "]}":
            depth -= 1
    return deepest


def load_workflow(path: str | os.PathLike) -> dict:
    """Read a workflow JSON file (UI or API format) and return the parsed object.

    Every way a file can be unusable (missing, a folder, too big, empty, binary, not UTF-8, not JSON,
    truncated, absurdly nested, not an object of a known shape) raises InputFileError naming the file.
    """
    p = Path(path)
    name = str(p)
    if not p.exists():
        raise InputFileError(f"workflow file {name!r} does not exist.")
    if not p.is_file():
        raise InputFileError(f"workflow path {name!r} is not a file (expected a .json workflow file).")
    size = p.stat().st_size
    if size > MAX_FILE_BYTES:
        raise InputFileError(
            f"workflow file {name!r} is {size} bytes; a workflow is JSON text of at most {MAX_FILE_BYTES} bytes."
        )
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise InputFileError(f"cannot read workflow file {name!r}: {exc.strerror or exc}.") from exc
    if not raw.strip():
        raise InputFileError(f"workflow file {name!r} is empty; expected a JSON object.")
    if b"\x00" in raw:
        raise InputFileError(f"workflow file {name!r} contains binary data (NUL bytes); expected JSON text.")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputFileError(
            f"workflow file {name!r} is not UTF-8 text (bad byte at offset {exc.start}); expected JSON text."
        ) from exc
    depth = _nesting_depth(text)
    if depth > MAX_NESTING_DEPTH:
        raise InputFileError(
            f"workflow file {name!r} nests brackets more than {MAX_NESTING_DEPTH} levels deep; "
            "a ComfyUI workflow never does, so the file is not a workflow."
        )
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (the file looks truncated)" if exc.pos >= len(text.rstrip()) else ""
        raise InputFileError(
            f"workflow file {name!r} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}{hint}."
        ) from exc
    except ValueError:  # an integer literal longer than Python's int-string conversion limit
        raise InputFileError(f"workflow file {name!r} holds {_too_long_number()}.") from None
    if not isinstance(obj, dict):
        raise InputFileError(
            f"workflow file {name!r} holds a JSON {_json_type(obj)}; expected an object "
            "(an API prompt of node ids, or a UI workflow with 'nodes' and 'links')."
        )
    detect_format(obj, source=name)
    return obj


def _too_long_number() -> str:
    """What a ValueError from json.loads that is not a JSONDecodeError means: Python's int-string conversion limit."""
    return f"an integer of more than {sys.get_int_max_str_digits()} digits, longer than any input takes"


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number"}.get(type(value), type(value).__name__)


def detect_format(obj, source: str = "workflow") -> str:
    """'ui' for a canvas workflow (has a `nodes` list), 'api' for a prompt (an object of node objects)."""
    if not isinstance(obj, dict):
        raise InputFileError(f"{source} is a JSON {_json_type(obj)}; expected an object.")
    if "nodes" in obj:
        if not isinstance(obj["nodes"], list):
            raise InputFileError(
                f"{source} has 'nodes' of type {_json_type(obj['nodes'])}; a UI workflow has a list of nodes."
            )
        return "ui"
    if not obj:
        raise InputFileError(f"{source} is an empty object; expected nodes (API format) or 'nodes' (UI format).")
    not_nodes = [k for k, v in obj.items() if not isinstance(v, dict)]
    if not_nodes:
        key = not_nodes[0]
        raise InputFileError(
            f"{source} is neither format: key {key!r} holds a JSON {_json_type(obj[key])}, but an API prompt maps "
            "node ids to objects with 'class_type' and 'inputs', and a UI workflow has a 'nodes' list."
        )
    return "api"


# --------------------------------------------------------------------------- node definitions
def _input_spec(spec) -> tuple[object, dict]:
    if not isinstance(spec, (list, tuple)) or not spec:
        return None, {}
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0], opts


def is_widget_type(kind) -> bool:
    """Whether an input of this type holds a constant (a widget on the canvas) rather than needing a link."""
    return isinstance(kind, (list, tuple)) or (isinstance(kind, str) and kind in WIDGET_TYPES)


def _control_values(name: str, kind, opts: dict) -> int:
    """How many frontend-only control values follow this widget in `widgets_values`."""
    if kind == "INT":
        return 1 if opts.get("control_after_generate", name in SEED_NAMES) else 0
    if _is_combo(kind) and opts.get("control_after_generate"):
        return 2
    return 0


def _is_combo(kind) -> bool:
    return isinstance(kind, (list, tuple)) or kind == "COMBO"


def _default_value(kind, opts: dict):
    if "default" in opts:
        return opts["default"]
    if isinstance(kind, (list, tuple)):
        return kind[0] if kind else None
    if kind == "COMBO":
        options = opts.get("options") or []
        return options[0] if options else None
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind)


def widget_slots(cls, *, include_force_input: bool = False) -> list[tuple[str, int, object, bool]]:
    """The widgets the frontend creates for a node class: (name, control values after it, default, forceInput)."""
    declared = cls.INPUT_TYPES()
    slots = []
    for group in ("required", "optional"):
        for name, spec in (declared.get(group) or {}).items():
            kind, opts = _input_spec(spec)
            if not is_widget_type(kind):
                continue
            forced = bool(opts.get("forceInput")) or (group == "optional" and bool(opts.get("defaultInput")))
            if forced and not include_force_input:
                continue
            slots.append((name, _control_values(name, kind, opts), _default_value(kind, opts), forced))
    return slots


def _wrap(value):
    """Lists are links in the API format, so a list-valued widget travels as {"__value__": [...]}."""
    return {"__value__": value} if isinstance(value, list) else value


def _widget_values_for(cls, values) -> dict:
    """Map a node's `widgets_values` (list or dict) onto its widget input names, defaults filling gaps."""
    slots = widget_slots(cls)
    if isinstance(values, dict):
        return {name: values.get(name, default) for name, _, default, _ in slots}
    values = values if isinstance(values, list) else []
    # Workflows saved before frontend 1.16 also hold a value for every forceInput input; drop those.
    legacy = widget_slots(cls, include_force_input=True)
    if len(legacy) != len(slots) and len(values) == sum(1 + extra for _, extra, _, _ in legacy):
        slots_with_positions = legacy
    else:
        slots_with_positions = slots
    result = {}
    index = 0
    for name, extra, default, forced in slots_with_positions:
        if not forced:
            result[name] = values[index] if index < len(values) else default
        index += 1 + extra
    return result


# --------------------------------------------------------------------------- UI graph model
class _ConversionProblem(Exception):
    def __init__(self, type_: str, message: str, details: str = "", **extra):
        super().__init__(message)
        self.error = {"type": type_, "message": message, "details": details, "extra_info": extra}


class _Graph:
    """One canvas graph (the root or a subgraph definition): nodes and links by id."""

    def __init__(self, data: dict, where: str):
        self.where = where
        nodes = data.get("nodes")
        if not isinstance(nodes, list):
            raise InputFileError(f"{where}: 'nodes' must be a list, found {_json_type(nodes)}.")
        self.nodes: dict[str, dict] = {}
        for i, node in enumerate(nodes):
            if not isinstance(node, dict):
                raise InputFileError(f"{where}: nodes[{i}] is a JSON {_json_type(node)}; expected a node object.")
            if "id" not in node or not isinstance(node["id"], (int, str)) or isinstance(node["id"], bool):
                raise InputFileError(f"{where}: nodes[{i}] has no usable 'id' (expected a number or string).")
            if not isinstance(node.get("type"), str):
                raise InputFileError(f"{where}: node {node['id']} has no 'type' string (the node class name).")
            for key in ("inputs", "outputs"):
                if key in node and node[key] is not None and not isinstance(node[key], list):
                    raise InputFileError(f"{where}: node {node['id']} has '{key}' of type {_json_type(node[key])}; expected a list.")
            for slot in (node.get("inputs") or []) + (node.get("outputs") or []):
                if not isinstance(slot, dict):
                    raise InputFileError(f"{where}: node {node['id']} has a slot that is a JSON {_json_type(slot)}; expected an object.")
            _check_slots(node, where)
            key = str(node["id"])
            if key in self.nodes:
                raise InputFileError(f"{where}: node id {key} is used by two nodes.")
            self.nodes[key] = node
        self.links: dict[int, tuple] = {}
        links = data.get("links") or []
        if not isinstance(links, list):
            raise InputFileError(f"{where}: 'links' must be a list, found {_json_type(links)}.")
        for i, link in enumerate(links):
            self.links.update([self._parse_link(link, i)])
        input_node = data.get("inputNode") or {}
        if not isinstance(input_node, dict):
            raise InputFileError(f"{where}: 'inputNode' must be an object, found {_json_type(input_node)}.")
        self.input_node_id = str(input_node.get("id", SUBGRAPH_INPUT_NODE_ID))

    def _parse_link(self, link, i: int):
        if isinstance(link, list) and len(link) >= 5:
            link_id, origin_id, origin_slot, target_id, target_slot = link[:5]
            link_type = link[5] if len(link) > 5 else "*"
        elif isinstance(link, dict) and all(k in link for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot")):
            link_id, origin_id, origin_slot = link["id"], link["origin_id"], link["origin_slot"]
            target_id, target_slot, link_type = link["target_id"], link["target_slot"], link.get("type", "*")
        else:
            raise InputFileError(
                f"{self.where}: links[{i}] is not a link; expected [id, from_node, from_slot, to_node, to_slot, type] "
                "or an object with id/origin_id/origin_slot/target_id/target_slot."
            )
        try:
            parsed = int(link_id), (str(origin_id), int(origin_slot), str(target_id), int(target_slot), link_type)
        except (TypeError, ValueError, OverflowError):
            raise InputFileError(f"{self.where}: links[{i}] has an id or slot that is not a whole number "
                                 f"({_brief_json(link)}).") from None
        if parsed[1][1] < 0 or parsed[1][3] < 0:
            raise InputFileError(f"{self.where}: links[{i}] has a negative slot ({_brief_json(link)}).")
        return parsed


def _brief_json(value, limit: int = 80) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_link_id(value) -> bool:
    return isinstance(value, (int, float, str)) and not isinstance(value, bool)


def _check_slots(node: dict, where: str) -> None:
    """The slot fields the conversion reads, each of the JSON type the frontend writes (an InputFileError if not)."""
    here = f"{where}: node {node['id']}"
    for slot in node.get("inputs") or []:
        name, link, widget = slot.get("name"), slot.get("link"), slot.get("widget")
        if name is not None and not isinstance(name, str):
            raise InputFileError(f"{here} has an input named {_brief_json(name)}; input names are strings.")
        if link is not None and not _is_link_id(link):
            raise InputFileError(f"{here} input {name!r} has link {_brief_json(link)}; expected a link id or null.")
        if widget is not None and not (isinstance(widget, dict) and isinstance(widget.get("name", ""), str)):
            raise InputFileError(f"{here} input {name!r} has widget {_brief_json(widget)}; expected an object with "
                                 "a 'name' string.")
    for slot in node.get("outputs") or []:
        links = slot.get("links")
        if links is not None and not (isinstance(links, list) and all(_is_link_id(link) for link in links)):
            raise InputFileError(f"{here} has an output whose 'links' is {_brief_json(links)}; expected a list of "
                                 "link ids.")


class _Dto:
    """A node as it executes: its execution id, graph, and the chain of subgraph instances around it."""

    def __init__(self, node: dict, graph: _Graph, path: tuple[str, ...], instance: "_Dto | None"):
        self.node = node
        self.graph = graph
        self.path = path
        self.instance = instance
        self.exec_id = ":".join(path + (str(node["id"]),))
        self.inputs: list[dict] = node.get("inputs") or []
        self.outputs: list[dict] = node.get("outputs") or []
        self.mode = node.get("mode", 0)
        self.subgraph: "_Subgraph | None" = None
        self.widget_values: dict = {}
        self.promoted: dict = {}  # subgraph instance only: input name -> promoted widget value

    @property
    def type(self) -> str:
        return self.node["type"]

    @property
    def excluded_by_instance(self) -> bool:
        inst = self.instance
        while inst is not None:
            if inst.mode in (MODE_NEVER, MODE_BYPASS):
                return True
            inst = inst.instance
        return False


class _Subgraph:
    def __init__(self, data: dict, where: str):
        self.id = data["id"]
        self.graph = _Graph(data, where)
        self.inputs, self.outputs = (self._slots(data, key, where) for key in ("inputs", "outputs"))

    @staticmethod
    def _slots(data: dict, key: str, where: str) -> list[dict]:
        slots = data.get(key) or []
        if not isinstance(slots, list):
            raise InputFileError(f"{where}: '{key}' must be a list, found {_json_type(slots)}.")
        slots = [slot for slot in slots if isinstance(slot, dict)]
        for slot in slots:
            name, link_ids = slot.get("name"), slot.get("linkIds")
            if name is not None and not isinstance(name, str):
                raise InputFileError(f"{where}: a subgraph {key[:-1]} is named {_brief_json(name)}; names are strings.")
            if link_ids is not None and not (isinstance(link_ids, list) and all(_is_link_id(i) for i in link_ids)):
                raise InputFileError(f"{where}: subgraph {key[:-1]} {name!r} has 'linkIds' {_brief_json(link_ids)}; "
                                     "expected a list of link ids.")
        return slots


def _valid_connection(a, b) -> bool:
    """litegraph's type compatibility: equal, wildcard/empty, or overlapping comma-separated lists."""
    if not a or not b or a == b:
        return True
    a, b = str(a).upper(), str(b).upper()
    if a == "*" or b == "*" or a == b:
        return True
    return bool({t.strip() for t in a.split(",")} & {t.strip() for t in b.split(",")})


class _Converter:
    def __init__(self, ui: dict, node_classes: dict):
        self.node_classes = node_classes
        self.root = _Graph(ui, "UI workflow")
        self.subgraphs: dict[str, _Subgraph] = {}
        self._collect_definitions(ui, "UI workflow")
        self.dtos: dict[str, _Dto] = {}
        self.problems: list[dict] = []

    def _collect_definitions(self, data: dict, where: str) -> None:
        definitions = data.get("definitions") or {}
        if not isinstance(definitions, dict):
            raise InputFileError(f"{where}: 'definitions' must be an object, found {_json_type(definitions)}.")
        subgraphs = definitions.get("subgraphs") or []
        if not isinstance(subgraphs, list):
            raise InputFileError(f"{where}: 'definitions.subgraphs' must be a list, found {_json_type(subgraphs)}.")
        for i, sub in enumerate(subgraphs):
            if not isinstance(sub, dict) or not isinstance(sub.get("id"), str):
                raise InputFileError(f"{where}: definitions.subgraphs[{i}] has no 'id' string.")
            sub_where = f"subgraph {sub.get('name') or sub['id']!r}"
            self.subgraphs.setdefault(sub["id"], _Subgraph(sub, sub_where))
            self._collect_definitions(sub, sub_where)

    # ---- flattening
    def _add_graph(self, graph: _Graph, path: tuple[str, ...], instance: _Dto | None, stack: tuple[str, ...]) -> None:
        for node in graph.nodes.values():
            dto = _Dto(node, graph, path, instance)
            self.dtos[dto.exec_id] = dto
            sub = self.subgraphs.get(dto.type)
            if sub is not None:
                if sub.id in stack:
                    raise InputFileError(
                        f"subgraph {sub.id!r} contains itself (through node {dto.exec_id}); subgraphs cannot be recursive."
                    )
                dto.subgraph = sub
                self._add_graph(sub.graph, path + (str(node["id"]),), dto, stack + (sub.id,))

    # ---- widget values
    def _init_widgets(self) -> None:
        for dto in self.dtos.values():
            cls = self.node_classes.get(dto.type)
            if cls is not None and dto.subgraph is None:
                dto.widget_values = _widget_values_for(cls, dto.node.get("widgets_values"))
        # Subgraph instances promote the first inner widget each of their inputs feeds (innermost first).
        for dto in sorted(self.dtos.values(), key=lambda d: -len(d.path)):
            if dto.subgraph is not None:
                self._init_promoted(dto)
        for dto in self.dtos.values():
            if dto.type == PRIMITIVE_TYPE:
                self._apply_primitive(dto)

    def _init_promoted(self, dto: _Dto) -> None:
        sub = dto.subgraph
        names = []
        inner_values = {}
        for outer_input in dto.inputs:
            slot = next((s for s in sub.inputs if s.get("name") == outer_input.get("name")), None)
            if slot is None:
                continue
            for link_id in slot.get("linkIds") or []:
                link = sub.graph.links.get(link_id)
                if link is None:
                    continue
                inner = self.dtos.get(":".join(dto.path + (str(dto.node["id"]), link[2])))
                if inner is None or link[3] >= len(inner.inputs):
                    continue
                target = inner.inputs[link[3]]
                widget_name = (target.get("widget") or {}).get("name")
                values = inner.promoted if inner.subgraph is not None else inner.widget_values
                if widget_name is None or widget_name not in values:
                    continue
                names.append(slot["name"])
                inner_values[slot["name"]] = values[widget_name]
                break
        saved = dto.node.get("widgets_values")
        for i, name in enumerate(names):
            if isinstance(saved, dict) and name in saved:
                dto.promoted[name] = saved[name]
            elif isinstance(saved, list) and i < len(saved):
                dto.promoted[name] = saved[i]
            else:
                dto.promoted[name] = inner_values[name]

    def _apply_primitive(self, dto: _Dto) -> None:
        values = dto.node.get("widgets_values")
        if not dto.outputs or not isinstance(values, list) or not values:
            return
        for link_id in dto.outputs[0].get("links") or []:
            link = dto.graph.links.get(link_id)
            if link is None:
                continue
            target = self.dtos.get(":".join(dto.path + (link[2],)))
            if target is None or link[3] >= len(target.inputs):
                continue
            widget_name = (target.inputs[link[3]].get("widget") or {}).get("name")
            store = target.promoted if target.subgraph is not None else target.widget_values
            if widget_name is not None and (widget_name in store or target.type not in self.node_classes):
                store[widget_name] = values[0]

    # ---- link resolution (mirrors ExecutableNodeDTO.resolveInput / resolveOutput)
    def _resolve_input(self, dto: _Dto, slot: int, visited: set, want_type=None):
        key = (dto.exec_id, "I", slot)
        if key in visited:
            raise _ConversionProblem("dependency_cycle", "Links form a loop through virtual or bypassed nodes",
                                     f"input {slot} of node {dto.exec_id}")
        visited.add(key)
        if slot >= len(dto.inputs):
            raise _ConversionProblem("bad_linked_input", "Link goes to an input slot the node does not have",
                                     f"node {dto.exec_id} has {len(dto.inputs)} inputs, link targets slot {slot}")
        link_id = dto.inputs[slot].get("link")
        if link_id is None:
            return None
        link = dto.graph.links.get(link_id)
        if link is None:
            raise _ConversionProblem("bad_linked_input", "Input refers to a link that does not exist",
                                     f"node {dto.exec_id} input {dto.inputs[slot].get('name')!r} uses link {link_id}",
                                     input_name=dto.inputs[slot].get("name"), received_value=link_id)
        origin_id, origin_slot = link[0], link[1]
        want_type = want_type if want_type is not None else dto.inputs[slot].get("type")
        if dto.instance is not None and origin_id == dto.graph.input_node_id:
            outer = dto.instance
            if origin_slot >= len(outer.inputs):
                name = outer.subgraph.inputs[origin_slot].get("name") if origin_slot < len(outer.subgraph.inputs) else None
                return ("value", outer.promoted[name]) if name in outer.promoted else None
            outer_input = outer.inputs[origin_slot]
            if outer_input.get("link") is None:
                name = outer_input.get("name")
                return ("value", outer.promoted[name]) if name in outer.promoted else None
            return self._resolve_input(outer, origin_slot, visited)
        origin = self.dtos.get(":".join(dto.path + (origin_id,)))
        if origin is None:
            raise _ConversionProblem("bad_linked_input", "Link comes from a node that does not exist",
                                     f"node {dto.exec_id} input {dto.inputs[slot].get('name')!r} is linked from node {origin_id}",
                                     input_name=dto.inputs[slot].get("name"), received_value=[origin_id, origin_slot])
        return self._resolve_output(origin, origin_slot, want_type, visited)

    def _resolve_output(self, dto: _Dto, slot: int, want_type, visited: set):
        key = (dto.exec_id, "O", slot)
        if key in visited:
            raise _ConversionProblem("dependency_cycle", "Links form a loop through virtual or bypassed nodes",
                                     f"output {slot} of node {dto.exec_id}")
        visited.add(key)
        if dto.mode == MODE_BYPASS:
            index = self._bypass_slot(dto, slot, want_type)
            return None if index is None else self._resolve_input(dto, index, visited)
        if dto.subgraph is not None:
            return self._resolve_subgraph_output(dto, slot, want_type, visited)
        if dto.type in VIRTUAL_TYPES:
            return self._resolve_input(dto, slot, visited, want_type) if slot < len(dto.inputs) else None
        return ("link", dto.exec_id, slot)

    def _bypass_slot(self, dto: _Dto, slot: int, want_type) -> int | None:
        inputs = dto.inputs
        if not inputs:
            return None
        if want_type in ("*", "", None):
            return slot if len(inputs) > slot else 0
        output_type = dto.outputs[slot].get("type") if slot < len(dto.outputs) else "*"
        if slot < len(inputs):
            same = inputs[slot].get("type")
            if _valid_connection(same, output_type) and _valid_connection(same, want_type):
                return slot
        for i, inp in enumerate(inputs):
            if inp.get("type") == want_type:
                return i
        for i, inp in enumerate(inputs):
            if _valid_connection(inp.get("type"), output_type) and _valid_connection(inp.get("type"), want_type):
                return i
        return None

    def _resolve_subgraph_output(self, dto: _Dto, slot: int, want_type, visited: set):
        sub = dto.subgraph
        if slot >= len(sub.outputs):
            raise _ConversionProblem("bad_linked_input", "Link comes from a subgraph output that does not exist",
                                     f"subgraph node {dto.exec_id} has {len(sub.outputs)} outputs, link uses {slot}")
        for link_id in sub.outputs[slot].get("linkIds") or []:
            link = sub.graph.links.get(link_id)
            if link is None:
                continue
            inner = self.dtos.get(":".join(dto.path + (str(dto.node["id"]), link[0])))
            if inner is None:
                raise _ConversionProblem("bad_linked_input", "Subgraph output comes from a node that does not exist",
                                         f"subgraph {sub.id} output {slot} from node {link[0]}")
            return self._resolve_output(inner, link[1], want_type, visited)
        return None

    # ---- assembly
    def convert(self) -> dict:
        self._add_graph(self.root, (), None, ())
        self._init_widgets()
        output: dict[str, dict] = {}
        for dto in self.dtos.values():
            if (dto.type in VIRTUAL_TYPES or dto.subgraph is not None or dto.mode in (MODE_NEVER, MODE_BYPASS)
                    or dto.excluded_by_instance):
                continue
            inputs = {name: _wrap(value) for name, value in dto.widget_values.items()}
            for slot, inp in enumerate(dto.inputs):
                name = inp.get("name")
                try:
                    resolved = self._resolve_input(dto, slot, set())
                except _ConversionProblem as problem:
                    self.problems.append({**problem.error, "node_id": dto.exec_id, "class_type": dto.type})
                    continue
                if resolved is None:
                    continue
                if not name:
                    self.problems.append({"type": "bad_linked_input", "message": "Linked input slot has no name",
                                          "details": f"input slot {slot} of node {dto.exec_id}: the name says which "
                                                     "input the link feeds", "extra_info": {},
                                          "node_id": dto.exec_id, "class_type": dto.type})
                    continue
                if resolved[0] == "value":
                    inputs[name] = _wrap(resolved[1])
                else:
                    inputs[name] = [resolved[1], resolved[2]]
            title = dto.node.get("title")
            output[dto.exec_id] = {
                "inputs": inputs,
                "class_type": dto.type,
                "_meta": {"title": title if isinstance(title, str) else dto.type},
            }
        for node in output.values():
            for name, value in list(node["inputs"].items()):
                if isinstance(value, list) and len(value) == 2 and value[0] not in output:
                    del node["inputs"][name]
        return output


def ui_to_api(ui_workflow: dict, node_classes: dict) -> tuple[dict, list[dict]]:
    """Convert a UI-format workflow to an API prompt like the ComfyUI frontend does.

    Returns (prompt, problems): problems are error dicts in the validator's shape (links that point
    nowhere, loops through virtual nodes), reported instead of raised so every one is shown at once.
    Node types missing from `node_classes` are kept (validation reports them) but their widgets cannot
    be mapped. A structurally broken file raises InputFileError.
    """
    if detect_format(ui_workflow, "UI workflow") != "ui":
        raise InputFileError("expected a UI-format workflow (with 'nodes' and 'links'), got an API prompt.")
    try:
        converter = _Converter(ui_workflow, node_classes)
        prompt = converter.convert()
    except RecursionError:  # subgraphs inside subgraphs, or chains of reroutes, thousands deep
        raise InputFileError("the UI workflow nests subgraphs or chains reroutes and bypassed nodes too deeply to "
                             "follow; a canvas workflow never does.") from None
    return prompt, converter.problems


# --------------------------------------------------------------------------- overrides
def parse_override(text: str) -> tuple[str, str, object]:
    """'NODE_ID.input=value' -> (node_id, input, value); the value is JSON when it parses, else the raw string."""
    target, sep, raw = text.partition("=")
    node_id, dot, input_name = target.rpartition(".")
    if not sep or not dot or not node_id or not input_name:
        raise InputFileError(f"--set {text!r} is not of the form NODE_ID.input=value (e.g. 3.seed=42).")
    if _nesting_depth(raw) > MAX_NESTING_DEPTH:
        raise InputFileError(f"--set {target}: the value nests brackets more than {MAX_NESTING_DEPTH} levels deep.")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    except ValueError:  # an integer longer than Python's int-string conversion limit
        raise InputFileError(f"--set {target}: the value is {_too_long_number()}.") from None
    return node_id.strip(), input_name.strip(), value


def apply_overrides(prompt: dict, overrides, node_classes: dict | None = None) -> dict:
    """Return a copy of an API prompt with `NODE_ID.input=value` overrides applied.

    The input must already be set on the node or, when `node_classes` is given, be declared by its class. Only the
    nodes changed are copied.
    """
    result = dict(prompt)
    for text in overrides:
        node_id, input_name, value = parse_override(text)
        node = result.get(node_id)
        if not isinstance(node, dict):
            known = ", ".join(sorted(result, key=node_id_sort_key)[:20])
            raise InputFileError(f"--set {text!r}: there is no node {node_id!r}; the workflow's node ids are: {known}.")
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            raise InputFileError(f"--set {text!r}: node {node_id} has inputs of type {_json_type(inputs)}; expected an "
                                 "object of input names.")
        inputs = dict(inputs)
        result[node_id] = {**node, "inputs": inputs}
        declared: set[str] = set()
        class_type = node.get("class_type")
        cls = (node_classes or {}).get(class_type) if isinstance(class_type, str) else None
        if cls is not None:
            spec = cls.INPUT_TYPES()
            declared = set(spec.get("required") or {}) | set(spec.get("optional") or {})
        if input_name not in inputs and input_name not in declared:
            names = ", ".join(sorted(set(inputs) | declared)) or "(none)"
            raise InputFileError(
                f"--set {text!r}: node {node_id} ({node.get('class_type')}) has no input {input_name!r}; "
                f"its inputs are: {names}."
            )
        inputs[input_name] = _wrap(value)
    return result


def node_id_sort_key(node_id: str):
    """Node ids in numeric order ("2" before "10"), parts of subgraph ids ("5:12") one by one. Digit strings are
    compared by length and text, never converted: an id may be longer than Python converts to an int."""
    return [(0, len(p.lstrip("0")), p.lstrip("0")) if p.isdigit() else (1, 0, p) for p in str(node_id).split(":")]
