"""Every registered node keeps ComfyUI's V1 contract and the pack's own rules (DEVELOPING.md)."""

import pytest

import kineflow

NATIVE_TYPES = {"IMAGE", "LATENT", "MASK", "INT", "FLOAT", "STRING", "BOOLEAN", "*"}
NODES = sorted(kineflow.NODE_CLASS_MAPPINGS.items())


def _inputs(cls):
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            yield section, name, entry


def test_pack_registers_nodes_and_web_directory():
    assert len(NODES) >= 5
    assert kineflow.WEB_DIRECTORY == "./web"
    assert set(kineflow.NODE_DISPLAY_NAME_MAPPINGS) <= set(kineflow.NODE_CLASS_MAPPINGS)


@pytest.mark.parametrize("name,cls", NODES, ids=[n for n, _ in NODES])
def test_node_declares_v1_contract(name, cls):
    assert name.startswith("KineFlow")
    assert kineflow.NODE_DISPLAY_NAME_MAPPINGS.get(name, "").endswith("(KineFlow)")
    assert cls.CATEGORY.startswith("KineFlow/")
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 20
    assert callable(getattr(cls, cls.FUNCTION))
    assert isinstance(cls.RETURN_TYPES, tuple)
    if hasattr(cls, "RETURN_NAMES"):
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    assert isinstance(getattr(cls, "OUTPUT_NODE", False), bool)
    for t in cls.RETURN_TYPES:
        assert t in NATIVE_TYPES or t.startswith("KINEFLOW_") or t in ("CONDITIONING",), f"output type {t}"


@pytest.mark.parametrize("name,cls", NODES, ids=[n for n, _ in NODES])
def test_every_input_has_tooltip_and_numeric_bounds(name, cls):
    for section, input_name, entry in _inputs(cls):
        kind, opts = entry[0], (entry[1] if len(entry) > 1 else {})
        assert opts.get("tooltip"), f"{name}.{input_name} has no tooltip"
        if isinstance(kind, list):
            assert opts.get("default", kind[0] if kind else None) in kind or not kind
            continue
        assert kind in NATIVE_TYPES or kind.startswith("KINEFLOW_"), f"{name}.{input_name}: type {kind}"
        if kind in ("INT", "FLOAT"):
            for key in ("default", "min", "max", "step"):
                assert key in opts, f"{name}.{input_name} lacks {key}"
            assert opts["min"] <= opts["default"] <= opts["max"], f"{name}.{input_name} default out of range"


def test_torch_free_choice_lists_name_what_the_runtime_implements():
    """The nodes offer choices from torch-free modules (samplers/__init__.py); the runtime's tables must match."""
    from kineflow import samplers
    from kineflow.runtime import animatediff
    from kineflow.samplers.sampling import SAMPLERS

    assert tuple(SAMPLERS) == samplers.SAMPLER_NAMES
    assert tuple(animatediff.PREDICTIONS) == samplers.PREDICTION_NAMES
    assert tuple(animatediff.SCHEDULERS) == samplers.SCHEDULER_NAMES
