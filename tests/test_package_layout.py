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
