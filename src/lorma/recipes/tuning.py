"""Per-method tuning (``--tune``, ``--grid``): choose settings for each method on a validation split carved from
the training data, then train the final runs with them.

Why: one learning rate shared by every method decides a comparison more than the methods do (a rank-8 adapter
and full fine-tuning want steps an order of magnitude apart), and the paper tunes it per method and task
(its Table 14). Choosing on the eval data would flatter the winner, so:

- each candidate (one value per tuned setting) trains on the training data minus ``validation_split`` of it
  (stratified, seeded by ``split_seed``: the same rows for every method and candidate) with the first seed,
  and is scored on that split by the task's main metric. It runs with ``eval_on: validation``, so the eval
  data is not even read;
- the best candidate per method (ties: the first in grid order) gives the settings of the final runs, one per
  seed, on the whole training data, scored on the eval data;
- every candidate's validation metrics are kept (``results.json`` of ``lorma compare``, ``metrics.json`` of
  ``lorma train``, under ``tuning``);
- candidates are ordinary run directories, ``OUTPUT_DIR/tuning/<method>/<setting=value,...>/``; one whose
  ``candidate.json`` records the same resolved settings is not trained again, so a rerun (or a comparison
  that was stopped) reuses what is done. Deleting ``OUTPUT_DIR/tuning`` retrains them.

This module imports nothing heavy at module level: ``lorma --help`` shows its default grids.
"""

from __future__ import annotations

import dataclasses
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
    return dataclasses.replace(apply_values(cfg, chosen), tune=None, grid={})


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


def widened_values(values: list[Any]) -> list[Any]:
    """One new value beyond each end of a numeric grid (none for a grid of fewer than 2 numbers, or text).

    Geometric (all positive: learning rates, ranks): the smallest / r and the largest * r with r the mean ratio of
    neighbours; otherwise the mean step. Integer grids stay integers (and positive ones at least 1)."""
    numbers = sorted(v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool))
    if len(numbers) < 2 or len(numbers) != len(values):
        return []
    low, high = numbers[0], numbers[-1]
    if low > 0:
        ratio = (high / low) ** (1.0 / (len(numbers) - 1))
        new = [low / ratio, high * ratio]
    else:
        step = (high - low) / (len(numbers) - 1)
        new = [low - step, high + step]
    if all(isinstance(v, int) for v in numbers):
        new = [max(1, round(v)) if low > 0 else round(v) for v in new]
    else:
        new = [float(f"{v:.3g}") for v in new]
    return [v for v in dict.fromkeys(new) if v not in values]


def widened_candidates(grid: dict[str, list[Any]], tried: list[dict[str, Any]],
                       keep: list[str] | tuple[str, ...] = ()) -> tuple[dict[str, list[Any]], list[dict[str, Any]]]:
    """The widened grid and its candidates not tried yet (grid order), for a method whose candidates all
    collapsed: one more value at each end of every numeric setting, except those in ``keep`` (grids the user
    gave with ``--grid``: taken as given)."""
    wider = {}
    for name, values in grid.items():
        added = [] if name in keep else widened_values(values)
        wider[name] = sorted({*values, *added}, key=lambda v: (str(type(v)), v)) if added else list(values)
    combos = [dict(zip(wider, combo)) for combo in itertools.product(*wider.values())]
    return wider, [c for c in combos if c not in tried]


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
    """Train and score every candidate of every method (cached ones are read back); returns the tuning record.

    ``task`` is the checked task of ``cfg`` (its main metric decides). The record: the main metric and its
    direction, the split, and per method the grid, every candidate (values, validation metrics, score,
    collapsed, run directory, whether it came from the cache) and the chosen values.
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
    record: dict[str, Any] = {
        "main_metric": main_metric,
        "greater_is_better": greater,
        "validation_split": cfg.validation_split,
        "split_seed": cfg.split_seed,
        "seed": cfg.seed,
        "methods": {},
    }
    jobs = [(m, values) for m in methods for values in plan[m]["candidates"] if len(plan[m]["candidates"]) > 1]
    bar = tqdm(total=len(jobs), desc="tune: candidates", unit="run", disable=quiet or not is_main_process())
    root = Path(root)
    for method in methods:
        candidates = plan[method]["candidates"]
        info: dict[str, Any] = {"grid": plan[method]["grid"], "candidates": [], "chosen": {}}
        record["methods"][method] = info
        if len(candidates) <= 1:  # nothing to choose between: no training
            info["chosen"] = dict(candidates[0]) if candidates else {}
            info["note"] = "no setting to tune applies to this method" if not candidates else "one candidate"
            continue
        for values in candidates:
            info["candidates"].append(_run_candidate(cfg, method, values, root, main_metric))
            bar.set_postfix_str(f"{method} {candidate_label(values)}")
            bar.update(1)
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
            bar.total += len(extra)
            for values in extra:
                info["candidates"].append(_run_candidate(cfg, method, values, root, main_metric))
                bar.set_postfix_str(f"{method} {candidate_label(values)} (widened)")
                bar.update(1)
        best = choose(info["candidates"], greater)
        info["chosen"] = dict(info["candidates"][best]["values"])
        info["all_collapsed"] = all(c.get("collapsed") for c in info["candidates"])
        info["at_grid_edge"] = grid_edges(info["grid"], info["chosen"])
        info["separation"] = separation(info["candidates"], best, record["main_metric"], greater)
    bar.close()
    return record


def _run_candidate(cfg: RunConfig, method: str, values: dict[str, Any], root: Path,
                   main_metric: str) -> dict[str, Any]:
    """Train one candidate on the validation split (or read it back from its ``candidate.json``)."""
    from lorma.plumbing.processes import is_main_process
    from lorma.recipes.train import run_training
    from lorma.runs.fingerprints import inputs_unchanged

    run_dir = root / method / candidate_label(values)
    run_cfg = dataclasses.replace(apply_values(cfg, values), method=method, eval_on="validation",
                                  tune=None, grid={}, output_dir=str(run_dir))
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
    return {"values": values, "score": result["validation"].get(main_metric), **result, "run_dir": str(run_dir),
            "cached": cached is not None}


def separation(candidates: list[dict[str, Any]], best: int, main_metric: str,
               greater_is_better: bool = True) -> dict[str, Any] | None:
    """Can the validation split tell the chosen candidate from the runner-up? A paired bootstrap over the
    validation examples (:func:`lorma.recipes.verdicts.bootstrap_interval`, the verdicts' own) of the difference
    in the main metric between the chosen candidate and the next best that did not collapse. ``None`` without a
    runner-up or saved predictions."""
    import numpy as np

    from lorma.recipes.verdicts import bootstrap_interval, read_eval_predictions

    order = sorted(range(len(candidates)), key=lambda i: -_score(candidates[i]["score"], greater_is_better))
    ranked = [i for i in order if i != best and not candidates[i].get("collapsed")]
    if not ranked or candidates[best].get("collapsed"):
        return None
    runner = ranked[0]
    ours, theirs = read_eval_predictions(candidates[best]["run_dir"]), read_eval_predictions(
        candidates[runner]["run_dir"])
    if not ours or not theirs or len(ours) != 1 or ours.keys() != theirs.keys():  # one validation set: key ""
        return None
    (mine,), (other,) = ours.values(), theirs.values()
    if not np.array_equal(mine["labels"], other["labels"]):
        return None
    metric = main_metric.removeprefix("eval_")
    interval = bootstrap_interval(metric, [mine["predictions"]], [other["predictions"]], mine["labels"])
    if interval is None:
        return None
    return {"runner_up": candidate_label(candidates[runner]["values"]), **interval,
            "tells_apart": bool(interval["low"] > 0 or interval["high"] < 0)}


def grid_edges(grid: dict[str, list[Any]], chosen: dict[str, Any]) -> list[str]:
    """The numeric settings whose chosen value is the smallest or largest of a grid of 3 or more values: the
    best may lie outside the grid, so a wider one may do better."""
    edges = []
    for name, values in grid.items():
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numbers) == len(values) >= 3 and chosen.get(name) in (min(numbers), max(numbers)):
            end = "largest" if chosen[name] == max(numbers) else "smallest"
            edges.append(f"{name}={format_value(chosen[name])} is the {end} value of its grid")
    return edges


def tuning_rows(record: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the tuning table: every candidate's validation score, the chosen one marked."""
    metric = record["main_metric"].removeprefix("eval_")
    header = ["method", "candidate", f"validation {metric}", "collapsed", ""]
    rows = []
    for method, info in record["methods"].items():
        for candidate in info["candidates"]:
            score = _number(candidate["score"])
            chosen = candidate["values"] == info["chosen"]
            rows.append([
                method,
                candidate_label(candidate["values"]),
                "-" if score is None else f"{score:.4f}",
                "yes" if candidate.get("collapsed") else "no",
                "<- chosen" + "".join(f" ({note})" for note in _choice_notes(info)) if chosen else "",
            ])
        if not info["candidates"]:
            rows.append([method, candidate_label(info["chosen"]), "-", "-", info.get("note", "")])
    return header, rows


def _choice_notes(info: dict[str, Any]) -> list[str]:
    notes = []
    if info.get("widened"):
        notes.append(f"every candidate of the grid collapsed: widened by {', '.join(info['widened']['added'])}")
    if info.get("all_collapsed"):
        notes.append("every candidate collapsed: change the grid or the steps")
    notes += [f"{edge}: a wider grid may do better" for edge in info.get("at_grid_edge", [])]
    sep = info.get("separation")
    if sep and not sep["tells_apart"]:
        notes.append(f"the {sep['examples']} validation rows cannot tell it from {sep['runner_up']}: difference "
                     f"{sep['difference']:+.3f}, 95% interval [{sep['low']:+.3f}, {sep['high']:+.3f}]")
    return notes


def tuning_summary(record: dict[str, Any]) -> str:
    """One sentence on how the values were chosen."""
    sizes = [(c.get("train_rows"), c.get("validation_rows")) for info in record["methods"].values()
             for c in info["candidates"]]
    size = ""
    if sizes and sizes[0][0] is not None and sizes[0][1] is not None:
        size = f" ({sizes[0][1]} validation rows held out of {sizes[0][0] + sizes[0][1]} training rows)"
    return (f"Tuning: each candidate trained on the training data minus a {record['validation_split']:.0%} "
            f"validation split{size}, stratified and seeded by split_seed {record['split_seed']} (the same for "
            f"every method), seed {record['seed']}; the best by validation "
            f"{record['main_metric'].removeprefix('eval_')} per method was used for the final runs, which are "
            "scored on the eval data (never read while tuning).")


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
