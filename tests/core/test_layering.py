"""core is layered bottom-up: no import cycle among its modules, the MoE layer loads neither the config
machinery nor the training engine, core never imports a domain package, and no domain or config check
tests for a particular router (they read the routers' declared needs)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "core"
DOMAINS = ("vision", "recsys", "multimodal", "nlp")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``path`` imports, at any depth of its code (lazy imports count:
    a cycle through a function-level import is still a cycle of the design)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # ``from core import losses`` imports the module core.losses; ``from core import MoE`` the package
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def core_import_graph() -> dict[str, set[str]]:
    files = sorted(CORE.rglob("*.py"))
    modules = {_module_name(p) for p in files}
    graph = {}
    for p in files:
        name = _module_name(p)
        # every edge counts, package __init__ re-exports included: a module inside core that imports
        # the package ``core`` itself depends on everything the package re-exports
        graph[name] = _imports(p, modules) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_core_has_no_import_cycle():
    cycle = find_cycle(core_import_graph())
    assert cycle is None, "import cycle in core: " + " -> ".join(cycle)


def test_core_never_imports_a_domain():
    for path in CORE.rglob("*.py"):
        hits = _imports(path, set(DOMAINS))
        assert not hits, f"{path.relative_to(ROOT)} imports {sorted(hits)}: reach domains through the task registry"


def test_the_moe_layer_loads_no_config_machinery_or_engine():
    code = ("import sys, core.moe, core.routers.topk, core.experts; "
            "print(sorted(m for m in ('omegaconf', 'hydra', 'core.engine', 'core.validate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


ROUTER_NAMES = re.compile(r"BaseLayerRouter|LoryRouter|HashRouter|routers\.(base_layer|lory|hash)")


@pytest.mark.parametrize("where", [*DOMAINS, "core/validate.py"])
def test_no_domain_or_config_check_names_a_router(where):
    paths = [ROOT / where] if where.endswith(".py") else sorted((ROOT / where).rglob("*.py"))
    for path in paths:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            assert not ROUTER_NAMES.search(line), f"{path.relative_to(ROOT)}:{i} names a router: {line.strip()}"
