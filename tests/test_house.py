"""The house's floors (README, "Layout"), read from the code's own imports.

Every `import trainer...` / `from trainer... import` in trainer/ (top-level or inside a function: a deferred import
is still a dependency) is an edge of the module graph. The graph must have no cycle, and each module may import only
its own floor or the floors below it: errors and option types -> data, model, engine -> stages -> run -> cli.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "trainer"

# module (or package prefix) -> floor; the most specific prefix wins.
FLOORS = {
    "trainer": 0, "trainer.errors": 0, "trainer.options": 0, "trainer.registry": 0, "trainer.lf_compat": 0,
    "trainer.upstream": 0,
    "trainer.data": 1, "trainer.model": 1, "trainer.engine": 1, "trainer.generation": 1,
    "trainer.config": 2,  # composes the groups of floor 1; the stage registry is handed to it
    "trainer.stages": 3, "trainer.predict": 3,
    "trainer.run": 4, "trainer.plan": 4, "trainer.inference": 4,
    "trainer.cli": 5, "trainer.demo": 5,
}


def modules() -> dict[str, Path]:
    found = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = f
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                target = resolve(name) if name.startswith("trainer") else None
                if target and target != m and not m.startswith(target + "."):  # a package's own __init__
                    graph[m].add(target)
    return graph


def floor(module: str) -> int:
    prefixes = [p for p in FLOORS if module == p or module.startswith(p + ".")]
    assert prefixes, f"{module} has no floor in tests/test_house.py: add it to FLOORS (and to README's Layout)"
    return FLOORS[max(prefixes, key=len)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_each_module_imports_only_its_floor_or_below():
    upward = [f"{m} (floor {floor(m)}) imports {t} (floor {floor(t)})"
              for m, targets in import_graph().items() for t in targets if floor(t) > floor(m)]
    assert upward == []


def test_config_never_imports_the_stages():
    assert not any(t.startswith("trainer.stages") for t in import_graph()["trainer.config"])


def test_config_stays_small():
    lines = len((ROOT / "config.py").read_text().splitlines())
    assert lines < 300, f"trainer/config.py has {lines} lines: move the keys to the group that owns them"


@pytest.mark.parametrize("folder", ["data", "model", "engine"])
def test_no_stage_names_outside_the_stages(folder):
    """data/, model/ and engine/ answer to data kinds and stage attributes, never to a stage's name."""
    from trainer.stages import STAGES

    hits = []
    for f in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and c.value in STAGES
                                                     for c in node.comparators):
                hits.append(f"{f.name}:{node.lineno}")
    assert hits == []
