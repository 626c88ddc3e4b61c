"""The study's pictures: paired differences to LoRA per task with their intervals, loss curves, the rank sweep.

Drawn from the result files only (matplotlib's Agg backend, no display), written atomically beside the results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lorma.plumbing.fileio import atomic_path, read_jsonl

__all__ = ["plot_loss_curves", "plot_paired_differences", "plot_rank_sweep"]


def _figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (7, 4)) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=size, squeeze=False)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def _forest(ax: Any, rows: list[tuple[str, int, dict[str, Any]]], legend: list[str] | None = None,
            gap_after: tuple[int, ...] = ()) -> None:
    """Points with their intervals, one per row (label, colour index, paired difference), top to bottom, with half
    a row of space after the rows numbered in ``gap_after``; the y ticks are the labels, ``legend`` names the
    colours."""
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    seen: set[int] = set()
    ys = [index + 0.5 * sum(1 for g in gap_after if g < index) for index in range(len(rows))]
    for y, (_, colour, d) in zip(ys, rows):
        low = d["low"] if d.get("low") is not None else d["difference"]
        high = d["high"] if d.get("high") is not None else d["difference"]
        ax.errorbar(d["difference"], y, xerr=[[d["difference"] - low], [high - d["difference"]]], fmt="o",
                    color=colours[colour % len(colours)], capsize=3,
                    label=legend[colour] if legend and colour not in seen else None)
        seen.add(colour)
    ax.axvline(0, color="grey", lw=1, ls="--")
    ax.set_yticks(ys, [name for name, _, _ in rows], fontsize=8)
    ax.set_ylim(ys[-1] + 0.5, -0.5)


def plot_paired_differences(diffs: dict[str, dict[str, dict[str, Any] | None]], path: Path, title: str,
                            panel_per_task: bool = False) -> Path | None:
    """Forest plot: per task and method (colours), the paired difference to LoRA with its 95% interval.

    ``panel_per_task`` gives every task its own panel and x axis: for measures on different scales (E2E's BLEU
    in points, CIDEr near 1), which one shared axis would flatten to a line.
    """
    tasks = sorted({t for per in diffs.values() for t, d in per.items() if d is not None})
    if not tasks:
        return None
    methods = list(diffs)
    groups = [[(m, i, diffs[m][t]) for i, m in enumerate(methods) if diffs[m].get(t) is not None] for t in tasks]
    if panel_per_task:
        fig, axes = _figure(len(tasks), 1, size=(7, sum(0.6 + 0.35 * len(g) for g in groups)))
        for index, (task, group) in enumerate(zip(tasks, groups)):
            ax = axes[index][0]
            _forest(ax, group)
            ax.set_title(task, fontsize=9, loc="left")
        fig.suptitle(title, fontsize=10)
        axes[-1][0].set_xlabel("difference to LoRA (same seed), 95% t interval over seeds")
        fig.tight_layout()
        return _save(fig, path)
    fig, axes = _figure(size=(7, 0.5 + 0.45 * sum(len(g) for g in groups)))
    ax = axes[0][0]
    rows = [(f"{t} ({m})", i, d) for t, group in zip(tasks, groups) for m, i, d in group]
    ends = tuple(int(e) - 1 for e in np.cumsum([len(g) for g in groups])[:-1])
    _forest(ax, rows, legend=methods, gap_after=ends)
    ax.set_xlabel("difference to LoRA (same seed), 95% t interval over seeds")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_loss_curves(curves: dict[str, dict[str, list[Path]]], path: Path) -> Path | None:
    """One panel per task: each method's training loss (mean over seeds at the logged steps)."""
    tasks = [t for t, per in curves.items() if any(per.values())]
    if not tasks:
        return None
    cols = min(3, len(tasks))
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = _figure(rows, cols, size=(4.2 * cols, 3.0 * rows))
    for index, task in enumerate(tasks):
        ax = axes[index // cols][index % cols]
        for method, logs in curves[task].items():
            series = []
            for log in logs:
                records = [r for r in read_jsonl(log) if "loss" in r and "step" in r]
                series.append({int(r["step"]): float(r["loss"]) for r in records})
            steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
            if not steps:
                continue
            mean = np.mean([[s[k] for k in steps] for s in series], axis=0)
            ax.plot(steps, mean, label=f"{method} (n={len(series)})", lw=1.2)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("training loss", fontsize=8)
        ax.legend(fontsize=7)
    for index in range(len(tasks), rows * cols):
        axes[index // cols][index % cols].axis("off")
    fig.tight_layout()
    return _save(fig, path)


def plot_rank_sweep(trend: dict[tuple[str, str], dict[str, Any]], path: Path) -> Path | None:
    """Main metric against r per method (the paper's Fig. 5), one panel per dataset."""
    datasets = sorted({d for d, _ in trend})
    if not datasets:
        return None
    fig, axes = _figure(1, len(datasets), size=(4.5 * len(datasets), 3.2))
    for i, d in enumerate(datasets):
        ax = axes[0][i]
        for (dataset, method), t in sorted(trend.items()):
            if dataset != d:
                continue
            points = [(r, m) for r, m in zip(t["ranks"], t["means"]) if m is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("r", fontsize=8)
        ax.set_ylabel("main metric (mean over seeds)", fontsize=8)
        ax.set_title(d, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
