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


def plot_paired_differences(diffs: dict[str, dict[str, dict[str, Any] | None]], path: Path, title: str) -> Path | None:
    """Forest plot: per task (rows) and method (colours), the paired difference to LoRA with its 95% interval."""
    tasks = sorted({t for per in diffs.values() for t, d in per.items() if d is not None})
    if not tasks:
        return None
    fig, axes = _figure(size=(7, 0.5 + 0.45 * len(tasks) * max(len(diffs), 1)))
    ax = axes[0][0]
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    y = 0
    ticks, labels = [], []
    for task in tasks:
        for i, (method, per) in enumerate(diffs.items()):
            d = per.get(task)
            if d is None:
                continue
            low = d["low"] if d.get("low") is not None else d["difference"]
            high = d["high"] if d.get("high") is not None else d["difference"]
            ax.errorbar(d["difference"], y, xerr=[[d["difference"] - low], [high - d["difference"]]], fmt="o",
                        color=colours[i % len(colours)], capsize=3, label=method if task == tasks[0] else None)
            ticks.append(y)
            labels.append(f"{task} ({method})")
            y += 1
        y += 0.5
    ax.axvline(0, color="grey", lw=1, ls="--")
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.invert_yaxis()
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
