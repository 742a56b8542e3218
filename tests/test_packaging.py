"""The package installs as ComfyUI and pip expect: imports, registration, dependency lists, relative imports."""

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_requirements_txt_matches_pyproject_dependencies():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    listed = [l.strip() for l in (ROOT / "requirements.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert sorted(listed) == sorted(declared)


def test_package_code_uses_only_relative_imports_of_itself():
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "benchmarks", "build") or "egg-info" in str(rel):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "kineflow":
                offenders.append(f"{rel}:{node.lineno}")
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "kineflow" for a in node.names):
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, f"absolute kineflow imports break loading under ComfyUI's module name: {offenders}"


def test_only_the_host_module_imports_comfyui():
    comfy_modules = {"comfy", "folder_paths", "comfy_execution", "server", "nodes", "latent_preview"}
    # The DiT benchmark times ComfyUI's own model as a peer, imported from the ComfyUI tree given with --comfyui; it
    # is a script beside the pack, never imported by it.
    peers = {Path("benchmarks/bench_hunyuan_dit.py")}
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "build") or rel == Path("runtime/host.py") or rel in peers:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            offenders += [f"{rel}:{node.lineno} {n}" for n in names if n.split(".")[0] in comfy_modules]
    assert not offenders, offenders


def test_pack_imports_under_a_path_derived_module_name(tmp_path):
    """ComfyUI imports a custom node folder under its path with dots replaced (nodes.py load_custom_node)."""
    name = str(ROOT).replace(".", "_x_")
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location(r'{name}', r'{ROOT / '__init__.py'}',"
        f" submodule_search_locations=[r'{ROOT}'])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m; spec.loader.exec_module(m)\n"
        "assert 'kineflow' not in sys.modules, 'the pack imported itself by its pip name'\n"
        "print(len(m.NODE_CLASS_MAPPINGS), m.WEB_DIRECTORY)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    count, web = out.stdout.split()
    assert int(count) >= 15 and web == "./web"


def test_console_script_runs_from_any_directory(tmp_path):
    out = subprocess.run(["kineflow", "nodes"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "KineFlowSampler" in out.stdout and "KineFlowSaveVideo (output node)" in out.stdout


# Packages that belong to ComfyUI itself: a custom node that lists one can change the user's ComfyUI on install.
COMFYUI_CORE_PACKAGES = {"comfyui-frontend-package", "comfyui-workflow-templates", "comfyui-embedded-docs",
                         "comfyui", "comfy-kitchen", "comfyui-manager"}


def _requirement_name(line: str) -> str:
    return re.split(r"[\s<>=!~;\[]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_runtime_requirements_leave_comfyui_core_packages_alone():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    listed = [l for l in (ROOT / "requirements.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]
    offenders = {_requirement_name(r) for r in declared + listed} & COMFYUI_CORE_PACKAGES
    assert not offenders, f"installing the pack would change the host ComfyUI: {sorted(offenders)}"


def _imported_packages(rel: Path) -> set[str]:
    """The pack's own top-level packages a module imports (relative imports resolved)."""
    found = set()
    depth = len(rel.parts) - 1  # a module in models/ is one package below the root
    for node in ast.walk(ast.parse((ROOT / rel).read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = list(rel.parts[:-1])[: max(0, depth - (node.level - 1))] + (node.module or "").split(".")
            parts = [p for p in parts if p]
            if parts:
                found.add(parts[0])
            elif node.level > depth:  # `from .. import x` at the root: a top-level module, or the node registry
                found.update(a.name if (ROOT / a.name).exists() or (ROOT / f"{a.name}.py").exists() else "registry"
                             for a in node.names)
    return found


def test_layers_import_only_downwards():
    """models/ and samplers/ are pure torch (errors from the shared errors module); runtime/ never reaches into
    training/ (the headless runner does load the node registry); the shapes world needs neither."""
    allowed = {"models": {"models", "errors"}, "samplers": {"samplers", "errors"},
               "shapes": {"shapes", "errors"},
               "runtime": {"runtime", "models", "samplers", "shapes", "errors", "registry"}}
    offenders = []
    for package, ok in allowed.items():
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT)
            bad = _imported_packages(rel) - ok
            offenders += [f"{rel} imports {sorted(bad)}"] if bad else []
    assert not offenders, offenders


def test_ci_installs_torch_the_way_the_readme_tells_cpu_users():
    """CI must test the torch build users get: the same CPU-only command as the README's Quick start."""
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "install" in line and "torch" in line]
    assert len(ci) == 1 and "--index-url https://download.pytorch.org/whl/cpu" in ci[0]
    command = ci[0].split("pip install", 1)[1].replace(" -q", "").strip()
    quick_start = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert f"pip install {command}" in quick_start
