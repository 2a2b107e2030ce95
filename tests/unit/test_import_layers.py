"""deftlab's packages import downward only: every import (module level and inside functions) is parsed, and any
circle between subpackages, or an import from a higher layer, fails with the offending import named."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import deftlab

ROOT = Path(deftlab.__file__).resolve().parent

# bottom -> top; a unit may import its own layer's *other* units only if no circle results (checked separately)
LAYERS = [
    {"__init__", "errors", "paths", "settings", "checksums", "linalg", "manifest", "config"},  # core
    {"store", "models", "allocate", "scoring", "prune"},
    {"data", "planner"},
    {"tasks", "decompose"},
    {"surgery", "eval"},
    {"adapters", "train"},
    {"delta"},
    {"recipes"},  # the only place a run kind is strung together
    {"experiments", "export"},  # export rebuilds a recorded run (recipes) and writes a standalone model
    {"commands", "cli", "__main__"},
]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "deftlab":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in the file, wherever it is, and every
    importlib.import_module("deftlab...") with a literal name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, node.lineno))
            # `from deftlab import settings` imports the submodule deftlab.settings
            if mod == "deftlab":
                out += [(f"deftlab.{a.name}", node.lineno) for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.args[0].value, node.lineno))
    return out


def edges() -> dict[tuple[str, str], list[str]]:
    """(from unit, to unit) -> where ("file:line imports module")."""
    found = defaultdict(list)
    for path in sorted(ROOT.rglob("*.py")):
        src = _unit(_module_name(path))
        for mod, line in imports_of(path):
            dst = _unit(mod)
            if dst is None or dst == src:
                continue
            if dst != "__init__" or mod == "deftlab":
                found[(src, dst)].append(f"{path.relative_to(ROOT.parent)}:{line} imports {mod}")
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_the_parser_sees_imports_inside_functions(tmp_path):
    f = ROOT / "recipes" / "osd.py"
    mods = {m for m, _ in imports_of(f)}
    assert "deftlab.store" in mods and "deftlab.recipes.finetune" in mods
    # an in-function import is found too (the parser walks the whole tree)
    g = ROOT / "models" / "config.py"
    assert "deftlab.models.loading" in {m for m, _ in imports_of(g)}


def test_no_import_circle_between_subpackages():
    graph = defaultdict(set)
    where = edges()
    for a, b in where:
        graph[a].add(b)
    circles = _cycles(graph)
    detail = []
    for comp in circles:
        for a, b in where:
            if a in comp and b in comp:
                detail.append(where[(a, b)][0])
    assert not circles, f"import circle(s) {circles}: " + "; ".join(detail)


def test_every_unit_has_a_layer_and_imports_only_downward():
    units = {_unit(_module_name(p)) for p in ROOT.rglob("*.py")}
    missing = sorted(u for u in units if u not in LAYER_OF)
    assert not missing, f"add {missing} to LAYERS in this test (where does it sit?)"
    upward = [w for (a, b), ws in edges().items() if LAYER_OF[b] > LAYER_OF[a] for w in ws]
    assert not upward, "imports from a higher layer: " + "; ".join(upward)


def test_a_planted_circle_is_caught():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
