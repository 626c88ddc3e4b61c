"""The plots a run or a comparison writes as it finishes (``loss_curves.png``, ``lr_range.png``), and the figure
helpers that :mod:`lorma.analysis.plots` shares. matplotlib is imported inside, with the Agg backend (no
screen)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorma.plumbing.fileio import atomic_path


def new_figure(width: float = 8.0, height: float = 4.5) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def plot_loss_curves(
    curves: Mapping[str, Sequence[tuple[Sequence[float], Sequence[float]]]],
    path: str | os.PathLike[str],
    table: Mapping[str, Mapping[str, Any]] | None = None,
    smoothing: int | float | None = None,
    title: str = "Training loss",
) -> Path:
    """Fig. 6: the training loss of each run (or method), ``curves[name]`` being its ``(steps, losses)`` per seed.

    One seed: its (smoothed) curve. Several (``lorma compare``): each faint, and their mean in full where the
    steps agree. With ``table`` (:func:`lorma.analysis.convergence.convergence_table`): the reference's minimum as
    a dotted line and each run's mark where it reaches it.
    """
    from lorma.runs.loss_curve import smooth

    fig, ax = new_figure()
    for i, (name, seeds) in enumerate(curves.items()):
        colour = f"C{i % 10}"
        if len(seeds) > 1:
            for steps, losses in seeds:
                ax.plot(steps, smooth(losses, smoothing), color=colour, alpha=0.25, linewidth=0.8)
        if len({len(steps) for steps, _ in seeds}) == 1:
            mean = np.mean([smooth(losses, smoothing) for _, losses in seeds], axis=0)
            ax.plot(seeds[0][0], mean, color=colour, linewidth=1.8, label=name)
        elif seeds:
            ax.plot(seeds[0][0], smooth(seeds[0][1], smoothing), color=colour, linewidth=1.8, label=name)
    if table:
        first = next(iter(table.values()))
        ax.axhline(
            first["reference_min_loss"], color="k", linestyle=":", linewidth=1, label=f"{first['reference']} minimum"
        )
        for name, row in table.items():
            if row.get("steps_to_ref_min") is not None and name != first["reference"] and row.get("speedup"):
                ax.plot(row["steps_to_ref_min"], first["reference_min_loss"], "kv")
                ax.annotate(
                    f"{name}: {row['speedup']:.2f}x (step {row['steps_to_ref_min']:g})",
                    (row["steps_to_ref_min"], first["reference_min_loss"]),
                    textcoords="offset points",
                    xytext=(4, 8),
                    fontsize="small",
                )
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss" + (f" (smoothing {smoothing})" if smoothing not in (None, 0, 1) else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, path)


def plot_lr_range(record: Mapping[str, Any], path: str | os.PathLike[str], title: str = "") -> Path:
    """The learning-rate range test: loss per step against the rate (log scale), smoothed, and the chosen rate."""
    fig, ax = new_figure(7.0, 4.2)
    rates = np.asarray(record["rates"], dtype=float)
    ax.plot(rates, np.asarray(record["losses"], dtype=float), ".", color="0.6", label="step loss")
    ax.plot(rates, np.asarray(record["smoothed"], dtype=float), "-", color="C0", label="smoothed")
    if np.isfinite(record.get("lowest_at", np.nan)):
        ax.axvline(record["lowest_at"], color="C3", ls=":", label=f"lowest at {record['lowest_at']:.2g}")
    ax.axvline(record["chosen"], color="C2", ls="--", label=f"chosen {record['chosen']:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(title or "learning-rate range test")
    ax.legend(loc="best", fontsize=8)
    return save_figure(fig, path)
