"""API prompt -> UI (canvas) workflow: the inverse of `workflow.ui_to_api`.

The result is a litegraph version 0.4 workflow shaped like the ones ComfyUI's frontend (1.27.10) saves and
embeds in outputs, so a headless prompt can be opened, read and edited on the canvas:

- each node lists its socket inputs (non-widget inputs and `forceInput` ones, declaration order, optional
  ones with the hollow-circle shape 7), then the widget inputs that are linked, each with `widget: {name}`
  (the frontend drops unlinked widget inputs when it saves: `compressWidgetInputSlots`);
- `widgets_values` holds one value per widget in the order the frontend creates them (`widget_slots`), a
  linked widget keeping its default, followed by the frontend-only control values ("fixed" after a seed-like
  INT, "fixed" and an empty filter after a COMBO with `control_after_generate`), so seeds stay as given;
- links are `[id, from_node, from_slot, to_node, to_slot, type]`; outputs list their link ids;
- nodes are laid out left to right by dependency depth, stacked in execution order within a column.

API ids that are positive integers are kept, so converting back gives the same ids; other ids (e.g. the
`"outer:inner"` ids of flattened subgraphs) are renumbered after the largest integer id.
"""

from __future__ import annotations

from ..errors import InputFileError
from .workflow import detect_format, widget_slots

LITEGRAPH_VERSION = 0.4
COLUMN_SPACING = 400
ROW_GAP = 50
ORIGIN = (50, 50)
TITLE_HEIGHT = 30
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 24
MULTILINE_HEIGHT = 100
WIDGET_NODE_WIDTH = 315
PLAIN_NODE_WIDTH = 225
MULTILINE_NODE_WIDTH = 360
SHAPE_OPTIONAL = 7  # litegraph RenderShape.HollowCircle: how the frontend marks optional inputs
SHAPE_LIST = 6  # litegraph GRID_SHAPE: an output that is a list
CONTROL_FIXED = "fixed"
ANY_TYPE = "*"


def _is_link(value) -> bool:
    return isinstance(value, list)


def _unwrap(value):
    if isinstance(value, dict) and set(value) == {"__value__"}:
        return value["__value__"]
    return value


def _slot_type(kind) -> str:
    """The slot type the frontend gives a declared type: combos (option lists) are "COMBO"."""
    if isinstance(kind, (list, tuple)):
        return "COMBO"
    return kind if isinstance(kind, str) else ANY_TYPE


def _declared(cls) -> list[tuple[str, object, dict, bool]]:
    """(name, kind, options, optional) of every required and optional input, in declaration order."""
    spec = cls.INPUT_TYPES()
    result = []
    for group in ("required", "optional"):
        for name, entry in (spec.get(group) or {}).items():
            entry = entry if isinstance(entry, (list, tuple)) and entry else (ANY_TYPE,)
            opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            result.append((name, entry[0], opts, group == "optional"))
    return result


def _outputs_of(cls) -> list[tuple[str, str, bool]]:
    """(name, type, is_list) of every output of a node class."""
    types = tuple(getattr(cls, "RETURN_TYPES", ()) or ())
    names = tuple(getattr(cls, "RETURN_NAMES", None) or ())
    is_list = tuple(getattr(cls, "OUTPUT_IS_LIST", None) or ())
    result = []
    for i, kind in enumerate(types):
        slot_type = _slot_type(kind)
        name = names[i] if i < len(names) else slot_type
        result.append((name, slot_type, bool(is_list[i]) if i < len(is_list) else False))
    return result


def unknown_node_types(prompt: dict, node_classes: dict) -> list[str]:
    """Class types of the prompt missing from `node_classes` (their widget order has to be guessed)."""
    return sorted({node["class_type"] for node in prompt.values()
                   if isinstance(node, dict) and isinstance(node.get("class_type"), str)
                   and node["class_type"] not in node_classes})


def _check_prompt(prompt) -> None:
    if detect_format(prompt, "API prompt") != "api":
        raise InputFileError("expected an API-format prompt (node ids mapping to class_type and inputs), "
                             "got a UI workflow with 'nodes'.")
    for node_id, node in prompt.items():
        if not isinstance(node.get("class_type"), str):
            raise InputFileError(f"API prompt node {node_id!r} has no 'class_type' string (the node class name).")
        if not isinstance(node.get("inputs", {}), dict):
            raise InputFileError(f"API prompt node {node_id!r} has 'inputs' that is not an object of input names.")
        for name, value in (node.get("inputs") or {}).items():
            if _is_link(value):
                source = value[0] if len(value) == 2 else None
                if (len(value) != 2 or not isinstance(value[1], int) or isinstance(value[1], bool) or value[1] < 0
                        or not isinstance(source, (str, int)) or isinstance(source, bool)):
                    raise InputFileError(f"API prompt node {node_id!r} input {name!r} is {value!r}; a link is "
                                         "[source_node_id, output_index] (wrap list values as {\"__value__\": [...]}).")
                if str(source) not in prompt:
                    raise InputFileError(f"API prompt node {node_id!r} input {name!r} is linked from node "
                                         f"{str(source)!r}, which is not in the prompt.")


def _assign_ids(prompt: dict) -> dict[str, int]:
    """Keep ids that are canonical positive integers; number the rest after the largest one."""
    ids: dict[str, int] = {}
    for key in prompt:
        if key.isdigit() and str(int(key)) == key and int(key) > 0:
            ids[key] = int(key)
    next_id = max(ids.values(), default=0) + 1
    for key in prompt:
        if key not in ids:
            ids[key] = next_id
            next_id += 1
    return ids


def _sources(node: dict) -> list[str]:
    return [str(v[0]) for v in (node.get("inputs") or {}).values() if _is_link(v)]


def _execution_order(prompt: dict, ids: dict[str, int]) -> tuple[list[str], dict[str, int]]:
    """Kahn's order (ties by node id) and each node's dependency depth; nodes on a cycle go last."""
    pending = {key: len(set(_sources(node))) for key, node in prompt.items()}
    users: dict[str, set[str]] = {key: set() for key in prompt}
    for key, node in prompt.items():
        for source in set(_sources(node)):
            users[source].add(key)
    ready = sorted((k for k, n in pending.items() if n == 0), key=ids.get)
    order, depth = [], {}
    while ready:
        key = ready.pop(0)
        order.append(key)
        depth[key] = 1 + max((depth[s] for s in _sources(prompt[key]) if s in depth), default=-1)
        for user in users[key]:
            pending[user] -= 1
            if pending[user] == 0:
                ready.append(user)
        ready.sort(key=ids.get)
    for key in sorted((k for k in prompt if k not in depth), key=ids.get):  # a cycle: still shown
        order.append(key)
        depth[key] = 1 + max((depth[s] for s in _sources(prompt[key]) if s in depth), default=-1)
    return order, depth


class _NodeBuilder:
    """Inputs, outputs and widget values of one node before links are numbered."""

    def __init__(self, key: str, node: dict, cls, prompt: dict, node_classes: dict):
        self.key = key
        self.type = node["class_type"]
        self.inputs: list[dict] = []  # {"name", "type", ["shape"], ["widget"]} + "source" for links
        self.widgets_values: list = []
        self.multiline = False
        values = {name: value for name, value in (node.get("inputs") or {}).items()}
        if cls is None:
            self._build_unknown(values, prompt, node_classes)
        else:
            self._build_known(values, cls, prompt, node_classes)

    def _link_input(self, name: str, slot_type: str, optional: bool, link, widget: bool = False) -> dict:
        entry = {"name": name, "type": slot_type}
        if optional:
            entry["shape"] = SHAPE_OPTIONAL
        if widget:
            entry["widget"] = {"name": name}
        entry["source"] = (str(link[0]), link[1]) if link is not None else None
        return entry

    def _build_known(self, values: dict, cls, prompt: dict, node_classes: dict) -> None:
        slots = widget_slots(cls)
        widget_names = {name for name, _, _, _ in slots}
        declared = _declared(cls)
        for name, kind, opts, optional in declared:
            if name in widget_names:
                continue
            value = values.pop(name, None)
            if value is not None and not _is_link(value):
                raise InputFileError(
                    f"node {self.key} ({self.type}) input {name!r} is a socket ({_slot_type(kind)}) that only takes a "
                    f"link on the canvas, but the prompt gives the constant {value!r}.")
            self.inputs.append(self._link_input(name, _slot_type(kind), optional, value))
        kinds = {name: (kind, opts, optional) for name, kind, opts, optional in declared}
        for name, extra, default, _ in slots:
            kind, opts, optional = kinds[name]
            value = values.pop(name, default)
            if _is_link(value):
                self.inputs.append(self._link_input(name, _slot_type(kind), optional, value, widget=True))
                value = default
            self.widgets_values.append(_unwrap(value))
            self.widgets_values.extend([CONTROL_FIXED, ""][:extra])
            self.multiline |= kind == "STRING" and bool(opts.get("multiline"))
        for name, value in values.items():  # inputs the class does not declare
            if not _is_link(value):
                raise InputFileError(
                    f"node {self.key} ({self.type}) has input {name!r} = {value!r}, which its class does not declare "
                    f"(declared: {', '.join(n for n, _, _, _ in declared) or 'none'}); a canvas node cannot hold it.")
            self.inputs.append(self._link_input(name, _source_type(prompt, value, node_classes), False, value))

    def _build_unknown(self, values: dict, prompt: dict, node_classes: dict) -> None:
        """A class we do not know: links become sockets, constants widget values in the prompt's order."""
        for name, value in values.items():
            if _is_link(value):
                self.inputs.append(self._link_input(name, _source_type(prompt, value, node_classes), False, value))
            else:
                self.widgets_values.append(_unwrap(value))


def _source_type(prompt: dict, link, node_classes: dict) -> str:
    cls = node_classes.get(prompt[str(link[0])]["class_type"])
    outputs = _outputs_of(cls) if cls is not None else []
    return outputs[link[1]][1] if link[1] < len(outputs) else ANY_TYPE


def _size(builder: _NodeBuilder, output_count: int) -> list[int]:
    """Roughly litegraph's computeSize: one row per socket, one per widget (taller for multiline text)."""
    sockets = sum(1 for entry in builder.inputs if "widget" not in entry)
    widgets = len(builder.widgets_values)
    height = SLOT_HEIGHT * max(sockets, output_count, 1)
    if widgets:
        height += WIDGET_HEIGHT * widgets + 14 + (MULTILINE_HEIGHT if builder.multiline else 0)
    else:
        height += 6
    width = MULTILINE_NODE_WIDTH if builder.multiline else WIDGET_NODE_WIDTH if widgets else PLAIN_NODE_WIDTH
    return [width, height]


def api_to_ui(prompt: dict, node_classes: dict, *, display_names: dict | None = None) -> dict:
    """Convert an API prompt to a UI (canvas) workflow that `ui_to_api` turns back into the same prompt.

    `display_names` (type -> display name, e.g. NODE_DISPLAY_NAME_MAPPINGS) decides which `_meta.title`s are
    custom titles worth keeping. Node types missing from `node_classes` are converted on a best guess (links as
    sockets, constants as widget values in the prompt's order); `unknown_node_types` lists them.
    Raises InputFileError for a prompt that cannot be drawn (dangling links, constants on sockets).
    """
    _check_prompt(prompt)
    display_names = display_names or {}
    ids = _assign_ids(prompt)
    order, depth = _execution_order(prompt, ids)
    builders = {key: _NodeBuilder(key, node, node_classes.get(node["class_type"]), prompt, node_classes)
                for key, node in prompt.items()}

    outputs: dict[str, list[dict]] = {}
    for key, node in prompt.items():
        cls = node_classes.get(node["class_type"])
        declared = _outputs_of(cls) if cls is not None else []
        used = [entry["source"][1] for b in builders.values() for entry in b.inputs
                if entry["source"] is not None and entry["source"][0] == key]
        if cls is not None and used and max(used) >= len(declared):
            raise InputFileError(f"a link uses output {max(used)} of node {key} ({node['class_type']}), which has "
                                 f"{len(declared)} output(s).")
        slots = declared if cls is not None else [(ANY_TYPE, ANY_TYPE, False)] * (max(used, default=-1) + 1)
        outputs[key] = []
        for index, (name, slot_type, is_list) in enumerate(slots):
            entry = {"name": name, "type": slot_type, "links": None, "slot_index": index}
            if is_list:
                entry["shape"] = SHAPE_LIST
            outputs[key].append(entry)

    links = []
    for key in sorted(prompt, key=ids.get):
        for slot, entry in enumerate(builders[key].inputs):
            source = entry.pop("source")
            entry["link"] = None
            if source is None:
                continue
            link_id = len(links) + 1
            origin = outputs[source[0]][source[1]]
            links.append([link_id, ids[source[0]], source[1], ids[key], slot, origin["type"]])
            origin["links"] = (origin["links"] or []) + [link_id]
            entry["link"] = link_id

    positions = _layout(order, depth, builders, outputs)
    nodes = []
    for key in sorted(prompt, key=ids.get):
        builder, node = builders[key], prompt[key]
        ui_node = {
            "id": ids[key],
            "type": builder.type,
            "pos": positions[key],
            "size": _size(builder, len(outputs[key])),
            "flags": {},
            "order": order.index(key),
            "mode": 0,
            "inputs": builder.inputs,
            "outputs": outputs[key],
        }
        meta = node.get("_meta")
        title = meta.get("title") if isinstance(meta, dict) else None
        if isinstance(title, str) and title and title != display_names.get(builder.type, builder.type):
            ui_node["title"] = title
        ui_node["properties"] = {"Node name for S&R": builder.type}
        ui_node["widgets_values"] = builder.widgets_values
        nodes.append(ui_node)

    return {
        "last_node_id": max(ids.values(), default=0),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
        "version": LITEGRAPH_VERSION,
    }


def _layout(order: list[str], depth: dict[str, int], builders: dict, outputs: dict) -> dict[str, list[int]]:
    """One column per dependency depth, ~COLUMN_SPACING px apart; nodes stacked in execution order."""
    next_y: dict[int, int] = {}
    positions = {}
    for key in order:
        column = depth[key]
        y = next_y.get(column, ORIGIN[1])
        positions[key] = [ORIGIN[0] + column * COLUMN_SPACING, y]
        next_y[column] = y + _size(builders[key], len(outputs[key]))[1] + TITLE_HEIGHT + ROW_GAP
    return positions
