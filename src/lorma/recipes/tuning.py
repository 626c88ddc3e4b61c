"""Per-method tuning (``--tune``, ``--grid``): choose settings for each method by cross-validation on the training
data (k-fold on small data, one validation split on large), then train the final runs with them.

Why: one learning rate shared by every method decides a comparison more than the methods do (a rank-8 adapter
and full fine-tuning want steps an order of magnitude apart), and the paper tunes it per method and task
(its Table 14). Choosing on the eval data would flatter the winner, so:

- the training data is cut into ``tune_folds`` folds (stratified, seeded by ``split_seed``: the same folds for
  every method and candidate). Each candidate (one value per tuned setting) trains once per fold with the first
  seed, on the other folds, and is scored on the held-out fold by the task's main metric; its score is the mean of
  its fold scores (their std and values are kept). With one fold it trains on the training data minus
  ``validation_split`` of it and is scored on that split. The fold runs have ``eval_on: validation``, so the eval
  data is not even read. How many folds: ``tune_folds``, or by default from the number of training rows
  (:data:`FOLDS_BY_ROWS`): one split of 120 rows chose the learning rate by chance on a 600-row task (issue 28),
  and k folds score every training row once;
- the best candidate per method (ties: the first in grid order; never one that collapsed) gives the settings of the
  final runs, one per seed, on the whole training data, scored on the eval data. A default grid is widened once
  when every candidate collapsed, and extended past its end when the best value is an end of it (at most
  :data:`EXTEND_ROUNDS` times), so that the choice is not capped by the grid;
- every candidate's validation metrics are kept (``results.json`` of ``lorma compare``, ``metrics.json`` of
  ``lorma train``, under ``tuning``);
- fold runs are ordinary run directories, ``OUTPUT_DIR/tuning/<method>/<setting=value,...>/fold-<i>-of-<k>/``
  (the candidate's directory itself with one fold); one whose ``candidate.json`` records the same resolved
  settings is not trained again, so a rerun (or a comparison that was stopped) reuses every finished fold.
  Deleting ``OUTPUT_DIR/tuning`` retrains them.

This module imports nothing heavy at module level: ``lorma --help`` shows its default grids.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorma.plumbing.errors import InputError
from lorma.plumbing.fileio import atomic_write_json, read_json, strict_json
from lorma.recipes.config import (
    METHOD_FAMILIES,
    RUN_FIELDS,
    RunConfig,
    method_family,
    parse_scalar,
    validate_config,
)
from lorma.runs.layout import TUNING_DIR
from lorma.runs.method_registry import Method, get_method, method_names

# Default candidate values per setting and method family ("adapter": LoRMA, LoRA, DoRA; "full"; "partial":
# BitFit and head-only). The learning-rate grids bracket each family's default (config.DEFAULT_LEARNING_RATES)
# by about a factor of 3 on each side; the adapters' reaches 1e-2 because short runs (a few hundred steps) chose
# the top of a grid ending at 3e-3 on the packaged tweets (docs/main-job.md, "Checked on real data").
DEFAULT_GRIDS: dict[str, dict[str, tuple[Any, ...]]] = {
    "learning_rate": {"adapter": (3e-4, 1e-3, 3e-3, 1e-2), "full": (2e-5, 5e-5, 1e-4),
                      "partial": (1e-3, 3e-3, 1e-2)},
    "r": {"adapter": (4, 8, 16)},
    "alpha": {"adapter": (4, 8, 16)},
    "dropout": {"adapter": (0.0, 0.1)},
    "weight_decay": {family: (0.0, 0.01, 0.1) for family in METHOD_FAMILIES},
    "class_weights": {family: (None, "balanced") for family in METHOD_FAMILIES},
}
# Settings that mean something for some methods only (the adapters' rank, alpha and dropout; LoRMA's side): other
# methods are not tuned on them. Asked of the method registry, so that a method registered later is judged the same.
ONLY_FOR: dict[str, Callable[[Method], bool]] = {
    "r": lambda m: m.adapter, "alpha": lambda m: m.adapter, "dropout": lambda m: m.adapter,
    "side": lambda m: "side" in m.options,
}
# RunConfig fields that may be tuned; the others name the data, the method or the run itself.
TUNABLE_RUN_FIELDS = ("r", "alpha", "dropout", "side", "max_seq_length", "class_weights")
# TrainingArguments fields that are not a setting of the model's training.
UNTUNABLE_TRAINING = ("output_dir", "seed", "data_seed", "logging_dir", "run_name", "report_to")
CANDIDATE_FILE = "candidate.json"


def default_grids_help() -> str:
    """The default grids, one clause per setting (for ``--help``)."""
    parts = []
    for name, by_family in DEFAULT_GRIDS.items():
        grids = {family: ",".join(format_value(v) for v in values) for family, values in by_family.items()}
        if len(by_family) == len(METHOD_FAMILIES) and len(set(grids.values())) == 1:
            parts.append(f"{name}: every method {next(iter(grids.values()))}")
        else:
            parts.append(f"{name}: " + "; ".join(f"{family} {values}" for family, values in grids.items()))
    return ". ".join(parts) + " (adapter: LoRMA, LoRA, DoRA; partial: BitFit, head-only)"


def format_value(value: Any) -> str:
    """A candidate value as it appears in tables and directory names (``0.001``, ``3e-05``, ``8``, ``none``)."""
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def candidate_label(values: dict[str, Any]) -> str:
    """``learning_rate=0.001,r=8``: the candidate's name in tables and its directory name."""
    return ",".join(f"{k}={format_value(v)}" for k, v in values.items()) or "defaults"


def wants_tuning(cfg: RunConfig) -> bool:
    """Whether the config asks for tuning (``tune`` or ``grid`` given)."""
    return bool(cfg.tune) or bool(cfg.grid)


def _grid_key(key: str) -> tuple[str | None, str]:
    """``"full:learning_rate"`` -> ``("full", "learning_rate")``; ``"learning_rate"`` -> ``(None, ...)``."""
    method, sep, name = str(key).rpartition(":")
    return (method if sep else None), name.replace("-", "_")


def _grid_values(key: str, values: Any) -> list[Any]:
    """The candidate values of one grid entry: a list, or text ``"1e-4,3e-4"`` (numbers become numbers)."""
    items = values.split(",") if isinstance(values, str) else values if isinstance(values, (list, tuple)) else [values]
    parsed = [parse_scalar(v) if isinstance(v, str) else v for v in items if not (isinstance(v, str) and not v.strip())]
    if not parsed:
        raise InputError(f"--grid {key}: no values")
    if len({json.dumps(v, default=str) for v in parsed}) != len(parsed):
        raise InputError(f"--grid {key}: a value is listed twice ({', '.join(format_value(v) for v in parsed)})")
    return parsed


def tuned_settings(cfg: RunConfig) -> list[str]:
    """The settings to tune: ``tune`` and the keys of ``grid``, in that order, each once."""
    names = [name.replace("-", "_") for name in (cfg.tune or [])]
    names += [_grid_key(key)[1] for key in cfg.grid]
    return list(dict.fromkeys(names))


def _check_setting(name: str) -> None:
    from lorma.recipes.config import training_argument_names

    if name in TUNABLE_RUN_FIELDS:
        return
    if name in RUN_FIELDS or name in UNTUNABLE_TRAINING:
        raise InputError(f"--tune: '{name}' cannot be tuned (it names the data, the method or the run); "
                          f"tunable: {', '.join(TUNABLE_RUN_FIELDS)} and TrainingArguments fields")
    if name not in training_argument_names():
        raise InputError(f"--tune: unknown setting '{name}' (neither {', '.join(TUNABLE_RUN_FIELDS)} nor a "
                          "TrainingArguments field)")


def method_grid(cfg: RunConfig, method: str) -> dict[str, list[Any]]:
    """The candidate values of each tuned setting for ``method``: ``--grid METHOD:KEY=...``, else ``--grid
    KEY=...``, else the default grid of the method's family. Settings that do not apply to the method (``r``
    for full fine-tuning) are left out."""
    grid: dict[str, list[Any]] = {}
    given = {_grid_key(k): v for k, v in cfg.grid.items()}
    family = method_family(method)
    for name in tuned_settings(cfg):
        if name in ONLY_FOR and not ONLY_FOR[name](get_method(method)):
            continue
        if (method, name) in given:
            grid[name] = _grid_values(f"{method}:{name}", given[(method, name)])
        elif (family, name) in given:
            grid[name] = _grid_values(f"{family}:{name}", given[(family, name)])
        elif (None, name) in given:
            grid[name] = _grid_values(name, given[(None, name)])
        elif family in DEFAULT_GRIDS.get(name, {}):
            grid[name] = list(DEFAULT_GRIDS[name][family])
        else:
            raise InputError(f"--tune {name}: no default grid for {method} ({family} methods); "
                              f"give one: --grid {name}=V1,V2,...")
    return grid


def apply_values(cfg: RunConfig, values: dict[str, Any]) -> RunConfig:
    """``cfg`` with the candidate's values (RunConfig fields or TrainingArguments fields), checked."""
    from lorma.recipes.config import _coerce

    run_values = {k: _coerce(k, v, f"--grid {k}") for k, v in values.items() if k in RUN_FIELDS}
    training = dict(cfg.training)
    training.update({k: v for k, v in values.items() if k not in RUN_FIELDS})
    new = dataclasses.replace(cfg, training=training, **run_values)
    validate_config(new)
    return new


def final_config(cfg: RunConfig, chosen: dict[str, Any]) -> RunConfig:
    """The final runs' settings: ``cfg`` with the chosen values, and no tuning of its own."""
    return dataclasses.replace(apply_values(cfg, chosen), tune=None, grid={}, tune_folds=None)


def plan_tuning(cfg: RunConfig, methods: list[str]) -> dict[str, dict[str, Any]]:
    """Per method: its grid and its candidates (value dicts, grid order). Everything is checked here, before
    any training: setting names, grid keys, and every candidate's settings."""
    for name in tuned_settings(cfg):
        _check_setting(name)
    for key in cfg.grid:
        prefix, _ = _grid_key(key)
        if prefix is not None and prefix not in method_names() and prefix not in METHOD_FAMILIES:
            raise InputError(f"--grid {key}: '{prefix}' is neither a method ({', '.join(method_names())}) nor a "
                             f"family ({', '.join(METHOD_FAMILIES)})")
        if prefix in method_names() and prefix not in methods:
            raise InputError(f"--grid {key}: method '{prefix}' is not among the methods ({', '.join(methods)})")
    plan: dict[str, dict[str, Any]] = {}
    for method in methods:
        grid = method_grid(cfg, method)
        candidates = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else []
        for values in candidates:
            apply_values(dataclasses.replace(cfg, method=method), values)
        keys = {_grid_key(k) for k in cfg.grid}
        given = {name for name in grid if {(method, name), (method_family(method), name), (None, name)} & keys}
        plan[method] = {"grid": grid, "candidates": candidates, "given": sorted(given)}
    return plan


def _number(value: Any) -> float | None:
    """A score as a float, or None when missing or NaN (a cached ``candidate.json`` keeps NaN as the string
    ``"nan"``: strict JSON)."""
    try:
        score = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(score) else score


def _score(value: Any, greater_is_better: bool) -> float:
    """A validation score made comparable: higher is better; a missing or NaN score is the worst."""
    score = _number(value)
    if score is None:
        return -math.inf
    return score if greater_is_better else -score


def choose(candidates: list[dict[str, Any]], greater_is_better: bool) -> int:
    """Index of the best candidate by ``score`` among those that did not collapse (a collapsed run learned the
    label prior: its score says nothing of the setting, however it ranks); ties go to the first in grid order.
    When every candidate collapsed, the best of them all."""
    return max(range(len(candidates)), key=lambda i: (not candidates[i].get("collapsed"),
                                                      _score(candidates[i]["score"], greater_is_better), -i))


# When every candidate of a method collapsed, the default grid of each numeric setting is widened once by one value
# beyond each end (at the grid's own spacing: the mean ratio of neighbours for a geometric grid, else the mean step).
# A grid given with --grid is the user's choice and is kept as it is.
WIDEN_ROUNDS = 1
# When the chosen value of a numeric setting of a default grid is the grid's smallest or largest, one candidate past
# it (the chosen values with that setting one step further, at the grid's own spacing) is trained; again while the
# best stays at an end, at most this many times per method. Then the table still flags an end.
EXTEND_ROUNDS = 2
# The number of cross-validation folds when tune_folds is not given: (fewer training rows than, folds), in order;
# from the last bound on, one validation split (k folds cost k times the training of one split).
FOLDS_BY_ROWS: tuple[tuple[int, int], ...] = ((1000, 5), (5000, 3))


def _numbers(values: list[Any]) -> list[Any] | None:
    """The grid's values sorted, when every one is a number (not a bool); else None."""
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    return sorted(values)


def value_beyond(values: list[Any], end: str) -> Any | None:
    """The next value past the ``"smallest"`` or ``"largest"`` end of a numeric grid of 2 or more values, at the
    grid's own spacing; None for a shorter or non-numeric grid, or when it would repeat a value of the grid.

    Geometric (all positive: learning rates, ranks): the end divided or multiplied by the mean ratio of
    neighbours; otherwise one mean step. Integer grids stay integers (and positive ones at least 1); floats keep
    3 significant digits."""
    numbers = _numbers(values)
    if numbers is None or len(numbers) < 2:
        return None
    low, high = numbers[0], numbers[-1]
    if low > 0:
        ratio = (high / low) ** (1.0 / (len(numbers) - 1))
        value = low / ratio if end == "smallest" else high * ratio
    else:
        step = (high - low) / (len(numbers) - 1)
        value = low - step if end == "smallest" else high + step
    if all(isinstance(v, int) for v in numbers):
        value = max(1, round(value)) if low > 0 else round(value)
    else:
        value = float(f"{value:.3g}")
    return None if value in values else value


def widened_values(values: list[Any]) -> list[Any]:
    """One new value beyond each end of a numeric grid (:func:`value_beyond`; none for a grid of fewer than 2
    numbers, or text)."""
    new = [value_beyond(values, "smallest"), value_beyond(values, "largest")]
    return [v for v in dict.fromkeys(new) if v is not None]


def _sorted_grid(values: list[Any]) -> list[Any]:
    return sorted(values, key=lambda v: (str(type(v)), v))


def widened_candidates(grid: dict[str, list[Any]], tried: list[dict[str, Any]],
                       keep: list[str] | tuple[str, ...] = ()) -> tuple[dict[str, list[Any]], list[dict[str, Any]]]:
    """The widened grid and its candidates not tried yet (grid order), for a method whose candidates all
    collapsed: one more value at each end of every numeric setting, except those in ``keep`` (grids the user
    gave with ``--grid``: taken as given)."""
    wider = {}
    for name, values in grid.items():
        added = [] if name in keep else widened_values(values)
        wider[name] = _sorted_grid([*values, *added]) if added else list(values)
    combos = [dict(zip(wider, combo)) for combo in itertools.product(*wider.values())]
    return wider, [c for c in combos if c not in tried]


def edge_extensions(grid: dict[str, list[Any]], chosen: dict[str, Any], tried: list[dict[str, Any]],
                    keep: list[str] | tuple[str, ...] = (),
                    allowed: Callable[[dict[str, Any]], bool] = lambda values: True) -> list[dict[str, Any]]:
    """New candidates past the edges the chosen values sit at: for each numeric setting (of 2 or more values, not
    in ``keep``) whose chosen value is the smallest or largest of its grid, the chosen values with that setting one
    step past it (:func:`value_beyond`). A value already tried, or one ``allowed`` refuses (out of the setting's
    range: a dropout below 0), is a bound: nothing is added for that setting."""
    new: list[dict[str, Any]] = []
    for name, values in grid.items():
        numbers = _numbers(values)
        if name in keep or numbers is None or len(numbers) < 2 or chosen.get(name) not in (numbers[0], numbers[-1]):
            continue
        past = value_beyond(values, "largest" if chosen[name] == numbers[-1] else "smallest")
        candidate = {**chosen, name: past}
        if past is not None and candidate not in tried and candidate not in new and allowed(candidate):
            new.append(candidate)
    return new


def auto_folds(rows: int) -> tuple[int, str]:
    """The default number of folds for ``rows`` training rows (:data:`FOLDS_BY_ROWS`) and why, in words."""
    for below, folds in FOLDS_BY_ROWS:
        if rows < below:
            return folds, f"{rows:,} training rows, fewer than {below:,}: {folds} folds"
    return 1, f"{rows:,} training rows, {FOLDS_BY_ROWS[-1][0]:,} or more: one validation split"


def resolve_folds(cfg: RunConfig, task: Any) -> dict[str, Any]:
    """The cross-validation of this tuning: ``{"folds", "reason", "rows", "fold_rows", "stratified"}`` (the last
    three with 2 or more folds). ``tune_folds`` when given, else :func:`auto_folds` of the training rows; a task
    that cannot carve folds gets one validation split. Too few rows for the folds is an InputError, before any
    training."""
    supports = bool(getattr(task, "supports_folds", False))
    if cfg.tune_folds is not None:
        folds, reason = cfg.tune_folds, f"--tune-folds {cfg.tune_folds}"
        if folds > 1 and not supports:
            raise InputError(f"--tune-folds {folds}: task '{task.name}' has one validation split only (give "
                             "--tune-folds 1)")
    elif supports:
        folds, reason = auto_folds(task.training_rows())
    else:
        folds, reason = 1, f"task '{task.name}' has one validation split only"
    info: dict[str, Any] = {"folds": folds, "reason": reason}
    if folds > 1:
        info.update(task.cross_validation_folds(folds))
    return info


def _cache_key(cfg: RunConfig) -> dict[str, Any]:
    """What a candidate's result depends on: its settings and the resolved training arguments."""
    return strict_json({"config": cfg.to_dict(), "training": cfg.training_arguments()})  # as candidate.json has it


def _cached(run_dir: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    path = run_dir / CANDIDATE_FILE
    if not path.is_file():
        return None
    try:
        record = read_json(path)
    except (OSError, ValueError):  # unreadable or half-written: train the candidate again
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


def tune(cfg: RunConfig, methods: list[str], root: Path, task: Any, quiet: bool = False) -> dict[str, Any]:
    """Train and score every candidate of every method on every fold (finished folds are read back); returns the
    tuning record.

    ``task`` is the checked task of ``cfg`` (its main metric decides). The record: the main metric and its
    direction, the split or the folds (``cross_validation``: how many and why, rows per fold, stratified), the
    number of candidate runs planned, and per method the grid, every candidate (values, mean validation metrics,
    score = the mean of its fold scores, ``score_std``, ``fold_scores``, collapsed, run directory, whether it came
    from the cache, and ``folds``: each fold run's own), how the grid was widened or extended, and the chosen
    values. Unless ``quiet``, prints how many candidate runs the tuning trains before the first one.
    """
    from tqdm.auto import tqdm

    from lorma.plumbing.processes import is_main_process

    if not getattr(task, "supports_validation", False):
        raise InputError(f"--tune needs a validation split; task '{task.name}' has none (classification tasks do)")
    if not task.metric_for_best_model:
        raise InputError(f"--tune: task '{task.name}' has no main metric to choose by")
    main_metric = f"eval_{task.metric_for_best_model}"
    greater = bool(task.greater_is_better)
    plan = plan_tuning(cfg, methods)
    cross_validation = resolve_folds(cfg, task)  # too few rows for the folds fails here, before any training
    folds = cross_validation["folds"]
    tuned = [m for m in methods if len(plan[m]["candidates"]) > 1]
    candidates_planned = sum(len(plan[m]["candidates"]) for m in tuned)
    record: dict[str, Any] = {
        "main_metric": main_metric,
        "greater_is_better": greater,
        "validation_split": cfg.validation_split,
        "split_seed": cfg.split_seed,
        "seed": cfg.seed,
        "folds": folds,
        "cross_validation": cross_validation,
        "planned_runs": folds * candidates_planned,
        "methods": {},
    }
    if tuned and not quiet and is_main_process():
        print(cost_line(record, candidates_planned, len(tuned)), flush=True)
    bar = tqdm(total=folds * candidates_planned, desc="tune: candidate runs", unit="run",
               disable=quiet or not is_main_process())
    root = Path(root)
    for method in methods:
        candidates = plan[method]["candidates"]
        info: dict[str, Any] = {"grid": plan[method]["grid"], "candidates": [], "chosen": {}}
        record["methods"][method] = info
        if len(candidates) <= 1:  # nothing to choose between: no training
            info["chosen"] = dict(candidates[0]) if candidates else {}
            info["note"] = "no setting to tune applies to this method" if not candidates else "one candidate"
            continue

        def run(values: dict[str, Any], why: str = "", method: str = method) -> dict[str, Any]:
            def step(fold: int) -> None:
                where = f" fold {fold}/{folds}" if folds > 1 else ""
                bar.set_postfix_str(f"{method} {candidate_label(values)}{where}{why}")
                bar.update(1)

            return _run_candidate(cfg, method, values, root, main_metric, folds, step)

        for values in candidates:
            info["candidates"].append(run(values))
        for _ in range(WIDEN_ROUNDS):
            if not all(c.get("collapsed") for c in info["candidates"]):
                break
            wider, extra = widened_candidates(info["grid"], [c["values"] for c in info["candidates"]],
                                              keep=plan[method]["given"])
            if not extra:
                break
            info["widened"] = {"reason": "every candidate collapsed", "grid": wider,
                               "added": [candidate_label(v) for v in extra]}
            info["grid"] = wider
            bar.total += folds * len(extra)
            for values in extra:
                info["candidates"].append(run(values, " (widened)"))
        method_cfg = dataclasses.replace(cfg, method=method)
        for round_number in range(1, EXTEND_ROUNDS + 1):
            best = choose(info["candidates"], greater)
            if info["candidates"][best].get("collapsed"):  # never extend past a collapsed choice
                break
            chosen = info["candidates"][best]["values"]
            extra = edge_extensions(info["grid"], chosen, [c["values"] for c in info["candidates"]],
                                    keep=plan[method]["given"], allowed=functools.partial(_allowed, method_cfg))
            if not extra:
                break
            info.setdefault("extended", []).append({
                "round": round_number, "from": candidate_label(chosen),
                "edges": grid_edges(info["grid"], chosen, least=2),
                "added": [candidate_label(v) for v in extra]})
            for values in extra:
                for name, value in values.items():
                    if value not in info["grid"][name]:
                        info["grid"][name] = _sorted_grid([*info["grid"][name], value])
            bar.total += folds * len(extra)
            for values in extra:
                info["candidates"].append(run(values, " (extended)"))
        best = choose(info["candidates"], greater)
        info["chosen"] = dict(info["candidates"][best]["values"])
        info["all_collapsed"] = all(c.get("collapsed") for c in info["candidates"])
        info["at_grid_edge"] = grid_edges(info["grid"], info["chosen"])
        info["separation"] = separation(info["candidates"], best, record["main_metric"], greater)
    bar.close()
    record["runs"] = folds * sum(len(info["candidates"]) for info in record["methods"].values())
    record["cached_runs"] = sum(sum(bool(f.get("cached")) for f in c.get("folds") or [c])
                                for info in record["methods"].values() for c in info["candidates"])
    return record


def _allowed(cfg: RunConfig, values: dict[str, Any]) -> bool:
    """Whether the candidate's values are valid settings (an extension past a setting's range is not)."""
    try:
        apply_values(cfg, values)
    except InputError:
        return False
    return True


def cost_line(record: dict[str, Any], candidates: int, methods: int) -> str:
    """How many candidate runs the tuning trains, and why that many folds (printed before the first run)."""
    folds = record["folds"]
    how = (f"{folds} folds x {candidates} candidates of {methods} method{'s' if methods != 1 else ''} = "
           f"{folds * candidates} candidate runs" if folds > 1 else
           f"{candidates} candidate runs ({methods} method{'s' if methods != 1 else ''}) on one validation split")
    more = f"{folds} more runs" if folds > 1 else "one more run"
    return (f"tune: {how} ({record['cross_validation']['reason']}). A widened or extended grid adds {more} per "
            "new candidate; finished runs under tuning/ are reused.")


def _run_candidate(cfg: RunConfig, method: str, values: dict[str, Any], root: Path, main_metric: str,
                   folds: int = 1, step: Callable[[int], None] = lambda fold: None) -> dict[str, Any]:
    """Train one candidate on each fold (or its one validation split), or read the finished folds back; its record
    has the mean over folds of each validation metric, the score, its std and the fold scores."""
    base = root / method / candidate_label(values)
    runs = []
    for fold in range(1, folds + 1):
        run_dir = base / f"fold-{fold}-of-{folds}" if folds > 1 else base
        runs.append({"fold": fold, **_run_fold(cfg, method, values, run_dir, main_metric, folds, fold)})
        step(fold)
    scores = [_number(r["score"]) for r in runs]
    flags = [r.get("collapsed") for r in runs]
    collapsed_folds = sum(bool(f) for f in flags)
    metrics = [name for name in runs[0]["validation"] if all(name in r["validation"] for r in runs)]
    record: dict[str, Any] = {
        "values": values,
        # a fold without a score (a NaN correlation) makes the candidate's score missing, the worst
        "score": None if None in scores else sum(scores) / len(scores),  # type: ignore[arg-type]
        "score_std": _std(scores) if folds > 1 and None not in scores else None,
        "fold_scores": scores,
        "validation": {name: _mean([r["validation"][name] for r in runs]) for name in metrics},
        # most folds collapsed: the candidate learned the label prior; some: they stay in its mean, which they lower
        "collapsed": None if all(f is None for f in flags) else collapsed_folds * 2 > len(runs),
        "collapsed_folds": collapsed_folds,
        "validation_rows": _total([r.get("validation_rows") for r in runs]),
        "train_rows": runs[0].get("train_rows") if folds == 1 else [r.get("train_rows") for r in runs],
        "run_dir": str(base),
        "cached": all(r["cached"] for r in runs),
    }
    if folds > 1:
        record["folds"] = runs
    return record


def _mean(values: list[Any]) -> float | None:
    numbers = [_number(v) for v in values]
    return None if not numbers or None in numbers else sum(numbers) / len(numbers)  # type: ignore[arg-type]


def _std(values: list[Any]) -> float:
    """The sample standard deviation (ddof 1) of the fold scores."""
    import statistics

    return statistics.stdev(values) if len(values) > 1 else 0.0


def _total(values: list[Any]) -> int | None:
    return None if not values or any(v is None for v in values) else sum(values)


def _run_fold(cfg: RunConfig, method: str, values: dict[str, Any], run_dir: Path, main_metric: str, folds: int,
              fold: int) -> dict[str, Any]:
    """Train one candidate on one fold (or read it back from its ``candidate.json``)."""
    from lorma.plumbing.processes import is_main_process
    from lorma.recipes.train import run_training
    from lorma.runs.fingerprints import inputs_unchanged

    run_cfg = dataclasses.replace(apply_values(cfg, values), method=method, eval_on="validation", tune=None, grid={},
                                  tune_folds=folds if folds > 1 else None,
                                  validation_fold=fold if folds > 1 else None, output_dir=str(run_dir))
    key = _cache_key(run_cfg)
    cached = _cached(run_dir, key) if inputs_unchanged(run_dir, run_cfg) else None  # same settings, same data
    if cached is not None:
        result = cached["result"]
    else:
        metrics = run_training(run_cfg, overwrite=True)
        result = {
            "validation": {k: v for k, v in metrics["eval"].items()
                           if not k.endswith(("_runtime", "_per_second", "epoch"))},
            "collapsed": metrics.get("collapsed"),
            "validation_rows": (metrics.get("data") or {}).get("eval_rows", {}).get("eval"),
            "train_rows": (metrics.get("data") or {}).get("train_rows"),
        }
        if is_main_process():
            atomic_write_json(run_dir / CANDIDATE_FILE, {"key": key, "result": result})
    return {"score": result["validation"].get(main_metric), **result, "run_dir": str(run_dir),
            "cached": cached is not None}


def _fold_predictions(candidate: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The saved validation predictions of each fold run of a candidate (its one run without folds); None when a
    run has none, or more than one eval set."""
    from lorma.recipes.verdicts import read_eval_predictions

    runs = [f["run_dir"] for f in candidate["folds"]] if candidate.get("folds") else [candidate["run_dir"]]
    out = []
    for run_dir in runs:
        saved = read_eval_predictions(run_dir)
        if not saved or len(saved) != 1:  # one validation set: key ""
            return None
        out.append(next(iter(saved.values())))
    return out


def fold_bootstrap(metric: str, ours: list[Any], theirs: list[Any], labels: list[Any],
                   confidence: float | None = None, n_resamples: int | None = None,
                   seed: int | None = None) -> dict[str, Any] | None:
    """Paired bootstrap of the difference of two candidates' scores, each the mean over folds of the metric on that
    fold's validation rows: every resample draws each fold's rows with replacement (the same rows for both
    candidates) and recomputes the mean of the fold differences; the percentile interval. With one fold this is
    the verdicts' paired bootstrap over the validation rows. None when the metric has no batched form or is
    undefined. Defaults: the verdicts' confidence, resamples and seed."""
    import numpy as np

    from lorma.recipes import verdicts
    from lorma.scoring.classification import batched_metric

    confidence = verdicts.CONFIDENCE if confidence is None else confidence
    n_resamples = verdicts.BOOTSTRAP_RESAMPLES if n_resamples is None else n_resamples
    rng = np.random.default_rng(verdicts.BOOTSTRAP_SEED if seed is None else seed)
    differences, resampled = [], np.zeros(n_resamples)
    try:
        for mine, other, y in zip(ours, theirs, labels):
            mine, other, y = np.asarray(mine), np.asarray(other), np.asarray(y)
            differences.append(float(batched_metric(metric, mine, y) - batched_metric(metric, other, y)))
            for start in range(0, n_resamples, 250):  # in chunks: a (resamples, rows, classes) array per metric
                index = rng.integers(0, y.size, size=(min(250, n_resamples - start), y.size))
                resampled[start:start + len(index)] += (batched_metric(metric, mine[index], y[index])
                                                        - batched_metric(metric, other[index], y[index]))
    except ValueError:  # no batched form of this metric
        return None
    resampled /= len(differences)
    estimate = sum(differences) / len(differences)
    if not (math.isfinite(estimate) and np.all(np.isfinite(resampled))):
        return None
    tail = 100 * (1 - confidence) / 2
    low, high = (float(v) for v in np.percentile(resampled, [tail, 100 - tail]))
    return {"difference": estimate, "low": low, "high": high, "examples": int(sum(np.asarray(y).size for y in labels)),
            "resamples": n_resamples, "fold_differences": differences}


def separation(candidates: list[dict[str, Any]], best: int, main_metric: str,
               greater_is_better: bool = True) -> dict[str, Any] | None:
    """Can the validation rows tell the chosen candidate from the runner-up? A paired bootstrap over the
    validation rows (:func:`fold_bootstrap`: within each fold, the folds' mean) of the difference in the main
    metric between the chosen candidate and the next best that did not collapse; with folds, also how many folds
    the chosen one won. ``None`` without a runner-up or saved predictions."""
    import numpy as np

    order = sorted(range(len(candidates)), key=lambda i: -_score(candidates[i]["score"], greater_is_better))
    ranked = [i for i in order if i != best and not candidates[i].get("collapsed")]
    if not ranked or candidates[best].get("collapsed"):
        return None
    runner = ranked[0]
    ours, theirs = _fold_predictions(candidates[best]), _fold_predictions(candidates[runner])
    if not ours or not theirs or len(ours) != len(theirs):
        return None
    if not all(np.array_equal(a["labels"], b["labels"]) for a, b in zip(ours, theirs)):
        return None
    interval = fold_bootstrap(main_metric.removeprefix("eval_"), [p["predictions"] for p in ours],
                              [p["predictions"] for p in theirs], [p["labels"] for p in ours])
    if interval is None:
        return None
    sign = 1 if greater_is_better else -1
    return {"runner_up": candidate_label(candidates[runner]["values"]), **interval, "folds": len(ours),
            "folds_won": sum(sign * d > 0 for d in interval["fold_differences"]),
            "tells_apart": bool(interval["low"] > 0 or interval["high"] < 0)}


def grid_edges(grid: dict[str, list[Any]], chosen: dict[str, Any], least: int = 3) -> list[str]:
    """The numeric settings whose chosen value is the smallest or largest of a grid of ``least`` or more values
    (3: a grid of 2 has no middle): the best may lie outside the grid, so a wider one may do better."""
    edges = []
    for name, values in grid.items():
        numbers = _numbers(values)
        if numbers is not None and len(numbers) >= least and chosen.get(name) in (numbers[0], numbers[-1]):
            end = "largest" if chosen[name] == numbers[-1] else "smallest"
            edges.append(f"{name}={format_value(chosen[name])} is the {end} value of its grid")
    return edges


def _score_cell(candidate: dict[str, Any]) -> str:
    score, spread = _number(candidate["score"]), _number(candidate.get("score_std"))
    if score is None:
        return "-"
    return f"{score:.4f}" + (f" ± {spread:.4f}" if spread is not None else "")


def _collapsed_cell(candidate: dict[str, Any], folds: int) -> str:
    if folds <= 1 or not candidate.get("folds"):
        return "yes" if candidate.get("collapsed") else "no"
    some = candidate.get("collapsed_folds", 0)
    return ("yes" if candidate.get("collapsed") else "no") + (f" ({some}/{folds} folds)" if some else "")


def tuning_rows(record: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the tuning table: every candidate's validation score (with folds: the mean ± std over
    folds, and each fold's), the chosen one marked."""
    metric = record["main_metric"].removeprefix("eval_")
    folds = int(record.get("folds") or 1)
    header = ["method", "candidate", f"validation {metric}" + (f" (mean ± std, {folds} folds)" if folds > 1 else "")]
    header += ["folds"] if folds > 1 else []
    header += ["collapsed", ""]
    rows = []
    for method, info in record["methods"].items():
        for candidate in info["candidates"]:
            chosen = candidate["values"] == info["chosen"]
            row = [method, candidate_label(candidate["values"]), _score_cell(candidate)]
            if folds > 1:
                row.append(" ".join("-" if _number(v) is None else f"{_number(v):.3f}"
                                    for v in candidate.get("fold_scores") or []))
            row += [_collapsed_cell(candidate, folds),
                    "<- chosen" + "".join(f" ({note})" for note in _choice_notes(info)) if chosen else ""]
            rows.append(row)
        if not info["candidates"]:
            rows.append([method, candidate_label(info["chosen"]), "-", *(["-"] if folds > 1 else []), "-",
                         info.get("note", "")])
    return header, rows


def _choice_notes(info: dict[str, Any]) -> list[str]:
    notes = []
    if info.get("widened"):
        notes.append(f"every candidate of the grid collapsed: widened by {', '.join(info['widened']['added'])}")
    if info.get("extended"):
        rounds = [", ".join(extension["added"]) for extension in info["extended"]]
        notes.append(f"{info['extended'][0]['from']} was at the grid's edge: extended by {', then '.join(rounds)}")
    if info.get("all_collapsed"):
        notes.append("every candidate collapsed: change the grid or the steps")
    notes += [f"{edge}: a wider grid may do better" for edge in info.get("at_grid_edge", [])]
    sep = info.get("separation")
    if sep and not sep["tells_apart"]:
        folds = sep.get("folds", 1)
        rows = f"{sep['examples']} validation rows" + (f" ({folds} folds)" if folds > 1 else "")
        won = f"; better on {sep['folds_won']} of {folds} folds" if folds > 1 else ""
        notes.append(f"the {rows} cannot tell it from {sep['runner_up']}: difference {sep['difference']:+.3f}, "
                     f"95% interval [{sep['low']:+.3f}, {sep['high']:+.3f}]{won}")
    return notes


def chosen_lines(record: dict[str, Any]) -> list[str]:
    """Per tuned method: the chosen values and their validation score, with folds its mean ± std and each fold's."""
    metric = record["main_metric"].removeprefix("eval_")
    lines = []
    for method, info in record["methods"].items():
        chosen = next((c for c in info["candidates"] if c["values"] == info["chosen"]), None)
        if chosen is None:
            continue
        text = f"{method}: {candidate_label(info['chosen'])}, validation {metric} {_score_cell(chosen)}"
        if chosen.get("folds"):
            folds = ", ".join("-" if _number(v) is None else f"{_number(v):.3f}" for v in chosen["fold_scores"])
            text += f" over {len(chosen['folds'])} folds ({folds})"
        lines.append(text)
    return lines


def tuning_summary(record: dict[str, Any]) -> str:
    """How the values were chosen: the split or the folds (how many and why), the number of candidate runs, and
    each method's choice with its score."""
    metric = record["main_metric"].removeprefix("eval_")
    cross_validation = record.get("cross_validation") or {}
    folds = int(record.get("folds") or 1)
    if folds > 1:
        rows = cross_validation.get("rows")
        how = (f"Tuning: {folds}-fold cross-validation of the {rows:,} training rows ({cross_validation['reason']}; "
               f"{'stratified' if cross_validation.get('stratified') else 'not stratified'}, seeded by split_seed "
               f"{record['split_seed']}: the same folds for every method and candidate), seed {record['seed']}: each "
               f"candidate trained once per fold on the other {folds - 1} folds and was scored on the held-out "
               f"one; its score is the mean of its {folds} fold scores (± their sample std). The best mean "
               f"validation {metric} per method (never a candidate that collapsed on most folds)")
    else:
        sizes = [(c.get("train_rows"), c.get("validation_rows")) for info in record["methods"].values()
                 for c in info["candidates"]]
        size = ""
        if sizes and isinstance(sizes[0][0], int) and isinstance(sizes[0][1], int):
            size = f" ({sizes[0][1]} validation rows held out of {sizes[0][0] + sizes[0][1]} training rows)"
        reason = f"; {cross_validation['reason']}" if cross_validation.get("reason") else ""
        how = (f"Tuning: each candidate trained on the training data minus a {record['validation_split']:.0%} "
               f"validation split{size}, stratified and seeded by split_seed {record['split_seed']} (the same for "
               f"every method{reason}), seed {record['seed']}; the best by validation {metric} per method")
    runs = f" {record['runs']} candidate runs ({record.get('cached_runs', 0)} reused)." if "runs" in record else ""
    chosen = chosen_lines(record)
    return (how + " was used for the final runs, which train on all the training rows and are scored on the eval "
            f"data (never read while tuning).{runs}" + (" Chosen: " + "; ".join(chosen) + "." if chosen else ""))


def train_tuned(cfg: RunConfig, overwrite: bool = False, resume: bool = False,
                allow_changed_inputs: bool = False) -> dict[str, Any]:
    """``lorma train --tune``: tune ``cfg.method`` (candidates in ``OUTPUT_DIR/tuning/``), then the final run in
    ``OUTPUT_DIR`` with the chosen values; its ``metrics.json`` keeps the tuning record under ``tuning``."""
    from lorma.plumbing.processes import is_main_process
    from lorma.recipes.train import run_training
    from lorma.runs.fingerprints import check_run_inputs, run_inputs
    from lorma.runs.paths import check_not_input
    from lorma.runs.transaction import RunTransaction
    from lorma.tasks.base import get_task

    # refuse what the final run would refuse (an existing run without --overwrite, ...) before any candidate
    plan = RunTransaction(cfg.output_dir, overwrite=overwrite, resume=resume, main_process=is_main_process())
    check_not_input(plan.final, run_inputs(cfg), replacing=overwrite)
    task = get_task(cfg)
    task.check_inputs()
    # changed inputs are refused before any candidate trains; the final run records an allowed change
    check_run_inputs(cfg, plan.work, resume, plan.resume_from, allow_changed_inputs, tell=lambda message: None)
    record = tune(cfg, [cfg.method], plan.final / TUNING_DIR, task)
    return run_training(final_config(cfg, record["methods"][cfg.method]["chosen"]), overwrite=overwrite,
                        resume=resume, tuning=record, allow_changed_inputs=allow_changed_inputs)
