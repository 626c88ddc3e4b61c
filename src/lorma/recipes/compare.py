"""``lorma compare``: one task, several methods and seeds; a results table, results.md / .json and a PNG
of the training-loss curves (the paper's Fig. 6 as a picture).

Layout: ``OUTPUT_DIR/<method>/seed-<seed>/`` is an ordinary ``lorma train`` run directory;
``OUTPUT_DIR/tuning/<method>/<candidate>/`` the ``--tune`` candidates (:mod:`lorma.recipes.tuning`);
``OUTPUT_DIR/results.{md,json}`` and ``OUTPUT_DIR/loss_curves.png`` summarise them. Beside the table: which
runs collapsed to the label prior (:mod:`lorma.recipes.collapse`) and, for each method against the first, the
difference in the main metric with its intervals over seeds and eval examples (:mod:`lorma.recipes.verdicts`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorma.plumbing.errors import InputError
from lorma.plumbing.fileio import atomic_write_json, atomic_write_text
from lorma.recipes.config import RunConfig
from lorma.runs.method_registry import trainable_method

RESULT_FILES = ("results.json", "results.md", "loss_curves.png")
# Trainer's bookkeeping numbers: not metrics of the model
_NOT_METRICS = ("_runtime", "_samples_per_second", "_steps_per_second", "epoch")


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """``"lora,lorma-plus"`` -> ``["lora", "lorma-plus"]``, each checked against the known methods."""
    items = text.split(",") if isinstance(text, str) else list(text)
    methods = [m.strip() for m in items if m.strip()]
    if not methods:
        raise InputError("--methods: give at least one method")
    for method in methods:
        trainable_method(method)
    if len(set(methods)) != len(methods):
        raise InputError(f"--methods: a method is listed twice ({', '.join(methods)})")
    return methods


def _mean_std(values: list[float]) -> dict[str, float | None]:
    clean = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not clean:
        return {"mean": None, "std": None, "n": 0}
    arr = np.asarray(clean, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0, "n": int(arr.size)}


def metric_keys(eval_metrics: dict[str, float]) -> list[str]:
    """The eval metrics worth a column: not loss, not Trainer's timing numbers."""
    return [k for k in eval_metrics if not k.endswith(_NOT_METRICS) and not k.endswith("_loss")]


def aggregate(runs: dict[str, list[dict[str, Any]]], run_dirs: dict[str, list[str]]) -> dict[str, Any]:
    """Per method: mean and std over seeds of every eval metric, loss AUC, seconds per step; parameters."""
    methods: dict[str, Any] = {}
    for method, metrics_list in runs.items():
        keys: list[str] = []
        for m in metrics_list:
            keys += [k for k in metric_keys(m["eval"]) if k not in keys]
        methods[method] = {
            "metrics": {k: _mean_std([m["eval"].get(k) for m in metrics_list]) for k in keys},
            "best_metrics": {k: _mean_std([m.get("best_eval", {}).get(k) for m in metrics_list]) for k in keys},
            "trainable_params": metrics_list[0]["trainable_params"],
            "total_params": metrics_list[0]["total_params"],
            "loss_auc": _mean_std([m.get("loss_auc") for m in metrics_list]),
            "seconds_per_step": _mean_std([m.get("seconds_per_step") for m in metrics_list]),
            "seeds": [m["seed"] for m in metrics_list],
            "run_dirs": run_dirs[method],
        }
        if any("collapsed" in m for m in metrics_list):
            methods[method]["collapsed_seeds"] = [m["seed"] for m in metrics_list if m.get("collapsed")]
    return methods


def _fmt(stat: dict[str, Any] | None, digits: int = 4) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    if stat["n"] > 1:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def main_metric_keys(results: dict[str, Any]) -> set[str]:
    """The eval keys of the main metric: ``eval_macro_f1``, or one per eval set (MNLI's matched, mismatched)."""
    main = results.get("main_metric")
    if not main:
        return set()
    name = main.removeprefix("eval_")
    sets = list((results.get("data") or {}).get("eval_rows") or {"eval": None})
    return {f"eval_{name}" if s in ("", "eval") else f"eval_{s}_{name}" for s in sets}


def results_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table (methods, then the majority baseline if there is one).

    The main metric's column is marked ``(main)``; with ``--tune`` a column shows each method's chosen values;
    a ``collapsed`` column counts the seeds whose run predicted one class (or constant values); class weights
    show when they are on."""
    metric_cols: list[str] = []
    for info in results["methods"].values():
        metric_cols += [k for k in info["metrics"] if k not in metric_cols]
    main_keys = main_metric_keys(results)
    tuning = results.get("tuning")
    show_collapse = any("collapsed_seeds" in info for info in results["methods"].values())
    weights = results.get("class_weights")
    header = ["method"]
    if tuning:
        header.append("tuned")
    header += [k.removeprefix("eval_") + (" (main)" if k in main_keys else "") for k in metric_cols]
    if show_collapse:
        header.append("collapsed")
    if weights:
        header.append("class weights")
    rates = results.get("learning_rates") or {}
    show_rates = any(rates.values())
    if show_rates:
        header.append("learning rate")
    header += ["trainable params", "loss AUC", "s/step"]
    rows = []
    for method, info in results["methods"].items():
        row = [method]
        if tuning:
            from lorma.recipes.tuning import candidate_label

            row.append(candidate_label(tuning["methods"][method]["chosen"]))
        row += [_fmt(info["metrics"].get(k)) for k in metric_cols]
        if show_collapse:
            collapsed = info.get("collapsed_seeds", [])
            row.append(f"{len(collapsed)}/{len(info['seeds'])}" + (" !" if collapsed else ""))
        if weights:
            row.append(weights)
        if show_rates:
            row.append(rate_label(rates.get(method)))
        row += [f"{info['trainable_params']:,}", _fmt(info["loss_auc"], 2), _fmt(info["seconds_per_step"], 3)]
        rows.append(row)
    baseline = results.get("baseline")
    if baseline:
        row = ["majority baseline"] + (["-"] if tuning else [])
        row += [f"{baseline[k]:.4f}" if k in baseline and baseline[k] is not None else "-" for k in metric_cols]
        row += (["-"] if show_collapse else []) + (["-"] if weights else []) + (["-"] if show_rates else [])
        row += ["0", "-", "-"]
        rows.append(row)
    return header, rows


def rate_label(rate: dict[str, Any] | None) -> str:
    """``1e-03`` or ``1e-03, head 1e-02``: a run's learning rates."""
    if not rate:
        return "-"
    body, head = rate.get("body"), rate.get("head")
    return f"{body:.2g}" + (f", head {head:.2g}" if head is not None and head != body else "")


def recipe_lines(results: dict[str, Any]) -> list[str]:
    """How the learning rates and the class weights were set (one line each, when it needs saying)."""
    lines = []
    auto = results.get("learning_rate_auto")
    if auto:
        lines.append("Learning rates: chosen per method by a learning-rate range test on the training data ("
                     + "; ".join(f"{m}: {info['from']}" for m, info in auto.items())
                     + "; its curve is lr_range.png in that run's directory).")
    if results.get("class_weights"):
        reason = results.get("class_weights_reason")
        lines.append(f"Loss: cross-entropy with {results['class_weights']} class weights (n / (classes x count))"
                     + (f": {reason}." if reason else "."))
    return lines


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table with aligned columns (for the terminal)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def main_metric_line(results: dict[str, Any]) -> str:
    """Which metric is the main one, and why."""
    main = results.get("main_metric")
    if not main:
        return ""
    reason = results.get("main_metric_reason")
    return f"Main metric: {main.removeprefix('eval_')}" + (f" ({reason})." if reason else ".")


def collapse_lines(results: dict[str, Any]) -> list[str]:
    """A line per method whose runs collapsed (empty when none did)."""
    lines = []
    for method, info in results["methods"].items():
        seeds = info.get("collapsed_seeds") or []
        if seeds:
            lines.append(f"{method}: seeds {', '.join(map(str, seeds))} of {len(info['seeds'])} collapsed (one "
                         "class for every input, or a macro-F1 no better than the majority class; constant "
                         "predictions for regression): their scores are the label prior's. See each run's "
                         "metrics.json ('collapse').")
    return lines


def format_markdown(results: dict[str, Any]) -> str:
    """results.md: the tuning, the table, what the numbers are, the collapsed runs and the verdicts."""
    lines = [f"# lorma compare: {results['task']} on {results['model']}", ""]
    tuning = results.get("tuning")
    if tuning:
        from lorma.recipes.tuning import tuning_rows, tuning_summary

        lines += ["## Tuning (validation split)", ""]
        lines += _markdown_table(*tuning_rows(tuning))
        lines += ["", tuning_summary(tuning), ""]
        lines += ["## Results (eval data)", ""]
    lines += _markdown_table(*results_rows(results))
    lines += [
        "",
        f"Metrics: final evaluation, mean ± std over seeds {results['seeds']}; loss AUC: area under the "
        "per-step training-loss curve (trapezoid rule); s/step: training time per optimizer step.",
        "The majority baseline always predicts the most frequent training label.",
    ]
    if (results.get("data") or {}).get("scorer"):
        lines.append(f"Scores computed by the {results['data']['scorer']}.")
    lines += recipe_lines(results)
    if main_metric_line(results):
        lines.append(main_metric_line(results))
    collapsed = collapse_lines(results)
    if collapsed:
        lines += ["", "## Collapsed runs", "", *[f"- {line}" for line in collapsed]]
    verdicts = results.get("verdicts")
    if verdicts:
        lines += ["", f"## Verdicts against {verdicts[0]['reference']}", "",
                  *[f"- {v['sentence']}" for v in verdicts]]
    lines += [
        "",
        "Runs: " + ", ".join(d for info in results["methods"].values() for d in info["run_dirs"]),
        "",
    ]
    return "\n".join(lines)


def short_name(model: str | None) -> str:
    """A model name short enough for a plot title: a hub name as is, a path by its last two parts."""
    if not model:
        return "?"
    parts = Path(model).parts
    return "/".join(parts[-2:]) if Path(model).exists() else model


def check_compare_output(output_dir: str | None, methods: list[str], overwrite: bool) -> Path:
    """Refuse to write over an earlier comparison unless ``overwrite``."""
    if not output_dir:
        raise InputError("no output directory: give --output-dir")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output directory {out} exists and is not a directory")
    existing = [n for n in (*RESULT_FILES, *methods) if (out / n).exists()]
    if existing and not overwrite:
        raise InputError(f"output directory {out} already holds results ({', '.join(existing)}); give --overwrite")
    return out


def run_compare(
    cfg: RunConfig, methods: list[str], seeds: int, overwrite: bool = False, quiet: bool = False
) -> dict[str, Any]:
    """Train every method with ``seeds`` seeds (``cfg.seed``, ``cfg.seed + 1``, ...) and summarise."""
    from tqdm.auto import tqdm

    from lorma.plumbing.processes import is_main_process
    from lorma.recipes.train import run_training
    from lorma.recipes.tuning import final_config, tune, wants_tuning
    from lorma.recipes.verdicts import compare_verdicts
    from lorma.runs.layout import LOSS_LOG, compare_run_dir
    from lorma.runs.loss_curve import read_loss_log
    from lorma.tasks.base import get_task

    if seeds < 1:
        raise InputError(f"--seeds must be at least 1, got {seeds}")
    out = check_compare_output(cfg.output_dir, methods, overwrite)
    task = get_task(cfg)
    task.check_inputs()  # fail on bad data before the first of many runs
    tuning = None
    if wants_tuning(cfg):  # a bad grid fails inside, before the first candidate
        tuning = tune(cfg, methods, out / "tuning", task, quiet=quiet)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    run_dirs: dict[str, list[str]] = {m: [] for m in methods}
    curves: dict[str, list[tuple[list[int], list[float]]]] = {m: [] for m in methods}
    plan = [(m, cfg.seed + i) for m in methods for i in range(seeds)]
    rates: dict[str, dict[str, Any]] = {}  # --learning-rate auto: per method, the first seed's range test
    for method, seed in tqdm(plan, desc="compare: runs", unit="run", disable=quiet or not is_main_process()):
        run_dir = compare_run_dir(out, method, seed)
        method_cfg = final_config(cfg, tuning["methods"][method]["chosen"]) if tuning else cfg
        run_cfg = dataclasses.replace(method_cfg, method=method, seed=seed, output_dir=str(run_dir))
        if run_cfg.learning_rate_auto and method in rates:  # one range test per method: the other seeds reuse it
            body, head = rates[method]["body"], rates[method]["head"]
            run_cfg = dataclasses.replace(run_cfg, training={**run_cfg.training, "learning_rate": body},
                                          head_learning_rate="same" if head == body else str(head))
        metrics = run_training(run_cfg, overwrite=overwrite)
        if run_cfg.learning_rate_auto and method not in rates:
            rates[method] = {**metrics["learning_rate"], "from": f"the range test of seed {seed}"}
        runs[method].append(metrics)
        run_dirs[method].append(str(run_dir))
        if (run_dir / LOSS_LOG).exists():
            curves[method].append(read_loss_log(run_dir / LOSS_LOG))
    first = runs[methods[0]][0]
    main_metric = f"eval_{task.metric_for_best_model}" if task.metric_for_best_model else None
    results = {
        "task": first["task"],
        "model": cfg.model,
        "seeds": [cfg.seed + i for i in range(seeds)],
        "main_metric": main_metric,
        "main_metric_reason": task.main_metric_reason(),
        "class_weights": "balanced" if first.get("class_weights") else None,
        "class_weights_reason": first.get("class_weights_reason"),
        "learning_rates": {m: runs[m][0].get("learning_rate") for m in methods},
        "learning_rate_auto": rates or None,
        "methods": aggregate(runs, run_dirs),
        "baseline": first.get("baseline"),
        "data": first.get("data"),
        "tuning": tuning,
        "verdicts": compare_verdicts(runs, run_dirs, main_metric, task.greater_is_better) if main_metric else [],
    }
    if is_main_process():
        atomic_write_json(out / "results.json", results)
        atomic_write_text(out / "results.md", format_markdown(results))
        from lorma.runs.plots import plot_loss_curves

        plot_loss_curves(curves, out / "loss_curves.png",
                         title=f"{results['task']}: training loss ({short_name(cfg.model)})")
    results["plot"] = str(out / "loss_curves.png")
    return results


def print_tuning(tuning: dict[str, Any]) -> None:
    """The candidates' validation scores, the chosen ones marked, and how they were chosen."""
    from lorma.recipes.tuning import tuning_rows, tuning_summary

    print()
    print(format_table(*tuning_rows(tuning)))
    print(tuning_summary(tuning))


def print_results(results: dict[str, Any], output_dir: str | None, cfg: Any = None,
                  argv: list[str] | None = None) -> None:
    """The tuning table, the results table, the collapsed runs, the verdicts, and where the files are."""
    if results.get("tuning"):
        print_tuning(results["tuning"])
    header, rows = results_rows(results)
    print()
    print(format_table(header, rows))
    if (results.get("data") or {}).get("scorer"):
        print(f"scorer: {results['data']['scorer']}")
    if main_metric_line(results):
        print(main_metric_line(results))
    for line in recipe_lines(results):
        print(line)
    for line in collapse_lines(results):
        print(f"COLLAPSED: {line}")
    verdicts = results.get("verdicts") or []
    if verdicts:
        print()
        print(f"Verdicts against {verdicts[0]['reference']}:")
        for verdict in verdicts:
            print(f"- {verdict['sentence']}")
    print()
    print(f"results: {Path(output_dir or '.') / 'results.md'}, {Path(output_dir or '.') / 'results.json'}")
    print(f"plot: {results['plot']}")
    collapsed = [_run_metrics(d) for info in results["methods"].values()
                 for d, seed in zip(info["run_dirs"], info["seeds"]) if seed in info.get("collapsed_seeds", [])]
    if collapsed and cfg is not None:
        from lorma.recipes.collapse import collapse_advice

        print(collapse_advice(argv, cfg, [m for m in collapsed if m]))


def _run_metrics(run_dir: str) -> dict[str, Any] | None:
    """A run's metrics.json (None if unreadable)."""
    from lorma.plumbing.fileio import read_json
    from lorma.runs.layout import METRICS_FILE

    try:
        return read_json(Path(run_dir) / METRICS_FILE)
    except ValueError:  # DataFormatError: missing, unreadable or malformed
        return None
