"""The package's layers: imports point down, never up, and no module imports itself back.

Every import counts: top-level, inside functions (the engine's lazy factories) and under
``TYPE_CHECKING`` (an annotation that needs a higher layer is still an arrow up).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "appliance"

# Bottom to top. A module may import its own layer and the layers below it; within a layer the
# import graph must still be acyclic. The longest matching prefix decides a module's layer.
LAYERS: list[tuple[str, ...]] = [
    ("appliance", "appliance.offline", "appliance.imaging", "appliance.serialization",
     "appliance.names"),
    ("appliance.vlm",),
    ("appliance.tools",),
    ("appliance.agent",),
    ("appliance.policies",),
    ("appliance.models",),
    ("appliance.engine",),
    ("appliance.storage", "appliance.dataset"),
    ("appliance.batch", "appliance.config", "appliance.cluster", "appliance.evaluation",
     "appliance.training"),
    ("appliance.service", "appliance.review"),
    ("appliance.cli",),
]
TOOLS = ("prompt_gen", "image_gen", "quality_eval", "knowledge", "mask_gen")


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (``from x import y`` counts x.y when y is one)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                candidates = [module] + [f"{module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            for candidate in candidates:
                while candidate and candidate not in modules:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:
                    targets.add(candidate)
        graph[name] = targets
    return graph


def layer_of(module: str) -> int:
    best: tuple[int, int] | None = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (
                    best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    if best is None:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {__file__}")
    return best[0]


def arrows_up(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} -> {target}" for module, targets in graph.items()
                  for target in targets if layer_of(target) > layer_of(module))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_no_import_points_up_a_layer():
    assert arrows_up(import_graph()) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_tool_packages_do_not_import_each_other_in_a_circle():
    """Within the tools layer, the five tool packages form a DAG as packages, not only as modules."""
    graph = import_graph()
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        source = ".".join(module.split(".")[:3])
        if not module.startswith("appliance.tools."):
            continue
        for target in targets:
            destination = ".".join(target.split(".")[:3])
            if target.startswith("appliance.tools.") and destination != source:
                packages.setdefault(source, set()).add(destination)
    assert cycles(packages) == []


def test_the_vlm_runtime_imports_no_tool_agent_or_policy():
    graph = import_graph()
    for module, targets in graph.items():
        if module.startswith("appliance.vlm"):
            assert not [t for t in targets if t.startswith(
                ("appliance.tools", "appliance.agent", "appliance.policies"))], module


def test_each_tool_has_its_folder():
    for tool in TOOLS:
        folder = PACKAGE / "tools" / tool
        assert (folder / "__init__.py").is_file(), f"appliance/tools/{tool}/ is missing"
        assert len(list(folder.glob("*.py"))) >= 2, f"appliance/tools/{tool}/ holds no backend"


def test_the_engine_is_the_one_place_backends_register():
    from appliance.engine import BACKENDS, ROLES

    assert set(BACKENDS) == set(ROLES)
    # No other module keeps a registry of backend factories.
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name != "engine":
            assert "BACKENDS: dict" not in path.read_text(encoding="utf-8"), path


# The checks above are only worth something if they can fail: feed them a small package that
# breaks each rule.

def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "appliance"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()
    return root


@pytest.mark.parametrize("files, expected_up, expected_cycle", [
    ({"tools/mask_gen/difference.py": "from appliance.engine.registry import X\n",
      "engine/registry.py": "X = 1\n"},
     ["appliance.tools.mask_gen.difference -> appliance.engine.registry"], []),
    ({"agent/environment.py": "from typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    from appliance.agent.policy import P\n",
      "agent/policy.py": "def f():\n    from appliance.agent import environment\n"},
     [], [["appliance.agent.environment", "appliance.agent.policy"]]),
    ({"vlm/chat.py": "from . import runtime\n", "vlm/runtime.py": "from .chat import X\n"},
     [], [["appliance.vlm.chat", "appliance.vlm.runtime"]]),
])
def test_the_graph_sees_lazy_relative_and_type_checking_imports(tmp_path, files, expected_up,
                                                                 expected_cycle):
    graph = import_graph(_fake_package(tmp_path, files))
    assert arrows_up(graph) == expected_up
    assert cycles(graph) == expected_cycle
