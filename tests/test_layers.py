"""The package has no import cycle, not even one hidden in a function-level import (README, "Layout")."""

from __future__ import annotations

from pathlib import Path

from import_graph import imports_in, lorma_modules


def _module_names() -> dict[str, Path]:
    return lorma_modules()


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The lorma modules ``name`` imports anywhere in its file (itself excluded)."""
    return {t for t in imports_in(path.read_text(encoding="utf-8"), name, path.name == "__init__.py")
            if t in known and t != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_package() -> None:
    known = _module_names()
    graph = {name: _imports(name, path, known) for name, path in known.items()}
    # a package importing its own submodules (lorma/__init__ naming what it exports) is not a cycle of layers
    for name in graph:
        graph[name] = {t for t in graph[name] if not (known[name].name == "__init__.py" and t.startswith(name + "."))}
    assert _cycles(graph) == []


# The upper floors, top to bottom (README, "Layout"): each may import only from the floors below it. study/ (the
# reproduction study) sits above recipes/ and analysis/, which are side by side on one floor and never import each
# other; runs/ (the run directory, its transaction,
# the method registry, adapter loading, the measurements training records) is below both.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "lorma.study": ("lorma.commands", "lorma.cli"),
    "lorma.recipes": ("lorma.analysis", "lorma.study", "lorma.commands", "lorma.cli"),
    "lorma.analysis": ("lorma.recipes", "lorma.study", "lorma.commands", "lorma.cli"),
    "lorma.runs": ("lorma.recipes", "lorma.analysis", "lorma.study", "lorma.commands", "lorma.cli"),
    "lorma.tasks": ("lorma.recipes", "lorma.analysis", "lorma.runs", "lorma.study", "lorma.commands", "lorma.cli"),
}


def _upward_imports(known: dict[str, Path]) -> list[str]:
    wrong = []
    for name, path in sorted(known.items()):
        for floor, above in FORBIDDEN.items():
            if name == floor or name.startswith(floor + "."):
                wrong += [f"{name} imports {t}" for t in sorted(_imports(name, path, known)) if t.startswith(above)]
    return wrong


def test_every_arrow_between_the_upper_floors_points_down() -> None:
    assert _upward_imports(_module_names()) == []


def test_the_floor_check_sees_a_function_level_import_from_analysis_into_recipes(tmp_path: Path) -> None:
    """The check above can fail: a recipe that imports analysis inside a function is caught."""
    bad = tmp_path / "lorma" / "recipes" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("def f():\n    from lorma.analysis.plots import plot_rank_over_steps\n    return 1\n")
    known = {**_module_names(), "lorma.recipes.bad": bad}
    assert _upward_imports(known) == ["lorma.recipes.bad imports lorma.analysis.plots"]
