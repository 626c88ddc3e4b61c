"""Where things live (README, "Layout"; issue 23): tasks in ``lorma.tasks``, file readers in ``lorma.tasks.readers``,
scorers in ``lorma.scoring``, and which may import which.

Imports are read from the source with ``ast`` (every ``import`` statement, those inside functions included), so a
lazy import cannot hide a dependency; what the task registry imports is checked in a fresh process.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from import_graph import SRC, imported_modules, imports_in, module_name
from lorma.tasks import task_class, task_names

LORMA = SRC / "lorma"

#: the scorer modules, and the modules of ``lorma.tasks`` they were moved out of (no shim may come back there)
SCORING_MODULES = {"classification", "data_to_text", "e2e_official", "generation_eval", "java", "math_answers",
                   "wordnet"}
FORMER_TASK_MODULES = {"classification_metrics", "math_answers", "nlg_e2e_official", "nlg_generation_eval",
                       "nlg_java", "nlg_metrics", "nlg_wordnet", "packaged_data"}
#: the packages above the scorers: a scorer importing one of them would make scoring depend on tasks or runs
ABOVE_SCORING = ("lorma.tasks", "lorma.recipes", "lorma.analysis", "lorma.runs", "lorma.cli", "lorma.commands")


def under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_import_reader_sees_imports_inside_functions_and_relative_ones() -> None:
    # the checks below are only as good as this: a lazy or relative import of a task module must be seen
    seen = imported_modules(LORMA / "scoring" / "data_to_text.py")
    assert "lorma.scoring.wordnet" in seen  # module level
    assert "lorma.scoring.java" in seen and "lorma.scoring.e2e_official" in seen  # inside functions
    lazy = "def f():\n    from ..tasks import base\n    import lorma.recipes.config\n"
    found = imports_in(lazy, "lorma.scoring.probe")
    assert {"lorma.tasks", "lorma.tasks.base", "lorma.recipes.config"} <= found
    assert all(under(m, ABOVE_SCORING) for m in found)


def test_scoring_imports_nothing_from_tasks_recipes_or_analysis() -> None:
    files = sorted((LORMA / "scoring").rglob("*.py"))
    assert {p.stem for p in files if p.name != "__init__.py"} == SCORING_MODULES
    wrong = {module_name(p): sorted(m for m in imported_modules(p) if under(m, ABOVE_SCORING)) for p in files}
    assert {k: v for k, v in wrong.items() if v} == {}


def test_readers_import_no_task_module() -> None:
    # readers sit below the tasks: they may use the scorers (a gold answer's extraction) but no task or its helpers
    wrong = {}
    for path in sorted((LORMA / "tasks" / "readers").rglob("*.py")):
        bad = sorted(m for m in imported_modules(path)
                     if under(m, ABOVE_SCORING) and not under(m, ("lorma.tasks.readers",)) and m != "lorma.tasks")
        if bad:
            wrong[module_name(path)] = bad
    assert wrong == {}


def test_no_scorer_or_reader_is_left_among_the_tasks() -> None:
    task_modules = {p.stem for p in (LORMA / "tasks").glob("*.py")}
    assert task_modules & FORMER_TASK_MODULES == set()


def test_every_task_module_registers_a_task_or_is_imported_by_one() -> None:
    registering = {task_class(name).__module__ for name in task_names()}
    assert registering == {"lorma.tasks.chat", "lorma.tasks.classification", "lorma.tasks.data_to_text",
                           "lorma.tasks.math_reasoning"}
    files = {module_name(p): p for p in (LORMA / "tasks").glob("*.py") if p.name != "__init__.py"}
    # what the registering modules import from lorma.tasks, transitively (readers/ is a package of its own)
    reached, todo = set(registering), list(registering)
    while todo:
        for target in imported_modules(files[todo.pop()]):
            if target in files and target not in reached:
                reached.add(target)
                todo.append(target)
    assert sorted(set(files) - reached) == []


FRESH = """
import json, sys
from lorma.cli import main
try:
    main(["evaluate", "--help"])
except SystemExit:
    pass
after_help = set(sys.modules)
import lorma.tasks
names = lorma.tasks.task_names()
from lorma.tasks.base import _REGISTRY
heavy = ("torch", "transformers", "peft", "datasets", "nltk", "sacrebleu", "pycocoevalcap")
print(json.dumps({
    "help_scoring": sorted(m for m in after_help if m.startswith("lorma.scoring")),
    "help_heavy": sorted(m for m in heavy if m in after_help),
    "names": names,
    "broken": _REGISTRY.broken,
    "scan_scoring": sorted(m for m in sys.modules if m.startswith("lorma.scoring.")),
    "scan_heavy": sorted(m for m in heavy if m in sys.modules),
}))
"""


@pytest.fixture(scope="module")
def fresh() -> dict:
    proc = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_evaluate_help_imports_no_text_scorer(fresh: dict) -> None:
    # its --task choices come from the task registry, whose scan brings what the task modules import (see below)
    assert fresh["help_scoring"] == ["lorma.scoring", "lorma.scoring.classification", "lorma.scoring.math_answers"]
    assert fresh["help_heavy"] == []


def test_the_registry_finds_every_task_without_the_text_scorers(fresh: dict) -> None:
    assert fresh["broken"] == {}
    assert fresh["names"] == ["chat", "classification", "cola", "dart", "e2e", "gsm8k", "math", "mnli", "mrpc",
                              "qnli", "qqp", "rte", "sst2", "stsb", "webnlg"]
    # the scan imports the task modules: the math answers (gold answers, accuracy) and the classification metrics
    # come with them; the data-to-text scorers, Java and WordNet only when a text is scored
    assert fresh["scan_scoring"] == ["lorma.scoring.classification", "lorma.scoring.math_answers"]
    assert fresh["scan_heavy"] == []


# ------------------------------------------------------------------------------------------------------------------
# The ground floor in rooms (issue 30): the core at the top level, one folder per kind of thing, imports one way
# ------------------------------------------------------------------------------------------------------------------

#: the modules beside the folders: the public entry points (the package face, the command's shell) and the core
TOP_LEVEL = {"__init__", "cli", "config", "model", "functional"}

#: the ground floor's rooms, bottom to top: a module may import from its own room and the rooms before it, never
#: from one after it (the upper floors, commands/ ... scoring/, sit above them all: test_layers.py)
ROOMS = (
    "lorma.plumbing",  # errors, files, the named registry, noise, processes, shards, the Trainer callback
    "lorma.peft_method",  # what peft is told: PeftType.LORMA and the registration hook
    "lorma.functional",  # the math
    "lorma.inflations",
    "lorma.variants",
    "lorma.config",
    "lorma.layers",  # one module per wrapped layer kind
    "lorma.model",  # the peft tuner
    "lorma.export",  # a trained adapter out and into service: LoRA export, hotswap
)
UPPER_FLOORS = ("lorma.cli", "lorma.commands", "lorma.study", "lorma.recipes", "lorma.analysis", "lorma.runs",
                "lorma.tasks", "lorma.scoring")


def room_of(module: str) -> int | None:
    """The index of ``module``'s room in :data:`ROOMS`; None for the package face and the upper floors."""
    for k, room in enumerate(ROOMS):
        if under(module, (room,)):
            return k
    return None


def _backward_imports(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """``module imports target`` for every import in ``sources`` (name -> (source, is a package)) that points from a
    room to a room above it or to an upper floor."""
    wrong = []
    for name, (source, is_package) in sorted(sources.items()):
        here = room_of(name)
        if here is None:
            continue
        for target in sorted(imports_in(source, name, is_package)):
            if not under(target, ("lorma",)) or target == "lorma":
                continue
            there = room_of(target)
            if there is None or there > here:  # an upper floor, or a room above this one
                wrong.append(f"{name} imports {target}")
    return wrong


def _sources() -> dict[str, tuple[str, bool]]:
    return {module_name(p): (p.read_text(encoding="utf-8"), p.name == "__init__.py") for p in LORMA.rglob("*.py")}


def test_the_top_level_holds_only_the_entry_points_and_the_core() -> None:
    assert {p.stem for p in LORMA.glob("*.py")} == TOP_LEVEL
    folders = {p.name for p in LORMA.iterdir() if (p / "__init__.py").exists()}
    assert folders == {r.split(".")[1] for r in ROOMS + UPPER_FLOORS if (LORMA / r.split(".")[1]).is_dir()}


def test_every_folder_says_what_lives_there_and_what_it_may_import() -> None:
    import ast

    missing = []
    for init in sorted(LORMA.rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        if len(doc) < 80:
            missing.append(module_name(init))
        elif room_of(module_name(init)) is not None and "May import" not in doc:
            missing.append(f"{module_name(init)} (no 'May import')")
    assert missing == []


def test_every_import_on_the_ground_floor_points_down_or_sideways() -> None:
    sources = _sources()
    assert sum(room_of(name) is not None for name in sources) > 30  # the rooms hold the ground floor's modules
    assert _backward_imports(sources) == []


def test_the_room_check_sees_a_layer_that_imports_the_model_or_a_run() -> None:
    """The check above can fail: a layer importing the tuner (a room above) inside a function, or plumbing reaching
    into a room above it, is caught; a relative import is resolved first."""
    bad = "def f():\n    from ..model import LormaModel\n    from lorma.runs import layout\n"
    worse = "from ..layers.base import LormaLayer\nfrom .errors import InputError\n"
    found = _backward_imports({"lorma.layers.bad": (bad, False), "lorma.plumbing.worse": (worse, False)})
    assert found == ["lorma.layers.bad imports lorma.model", "lorma.layers.bad imports lorma.model.LormaModel",
                     "lorma.layers.bad imports lorma.runs", "lorma.layers.bad imports lorma.runs.layout",
                     "lorma.plumbing.worse imports lorma.layers.base",
                     "lorma.plumbing.worse imports lorma.layers.base.LormaLayer"]


def _one_letter_apart(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` differ by one letter added, removed or changed (``registry`` / ``registries`` too:
    a plural is a different word ending, checked as one edit on the stem)."""
    if a == b:
        return False
    for x, y in ((a, b), (b, a)):
        if x.endswith("ies") and y == x[:-3] + "y":
            return True
    if len(a) == len(b):
        return sum(p != q for p, q in zip(a, b)) == 1
    short, long_ = sorted((a, b), key=len)
    if len(long_) - len(short) != 1:
        return False
    return any(long_[:k] + long_[k + 1:] == short for k in range(len(long_)))


def test_no_two_module_names_differ_by_one_letter() -> None:
    assert _one_letter_apart("registry", "registries") and _one_letter_apart("layer", "layers")
    assert _one_letter_apart("plot", "plots") and not _one_letter_apart("plots", "plots")
    modules = {p.stem for p in LORMA.rglob("*.py") if p.stem != "__init__"}
    names = sorted(modules | {p.name for p in LORMA.rglob("*") if p.is_dir() and p.name != "__pycache__"})
    assert [(a, b) for k, a in enumerate(names) for b in names[k + 1:] if _one_letter_apart(a, b)] == []


def test_a_module_named_registry_is_the_registry_of_its_folder() -> None:
    # every registry.py builds the Registry of the package it sits in (its built-ins are that folder's modules)
    import ast

    for path in LORMA.rglob("registry.py"):
        calls = [node for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                 if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Registry"]
        packages = {kw.value.value for call in calls for kw in call.keywords if kw.arg == "package"}
        assert packages == {module_name(path.parent / "__init__.py")}, path
