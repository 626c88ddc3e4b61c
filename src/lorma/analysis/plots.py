"""PNG plots of the measurements (matplotlib, Agg backend: no display needed).

Every function writes one PNG atomically (to a temporary name in the same directory, then
``os.replace``) and returns its path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorma.fileio import atomic_path

__all__ = ["plot_rank_over_steps", "plot_singular_values", "plot_loss_curves", "plot_module_bars", "plot_lr_range"]


def _figure(width: float = 8.0, height: float = 4.5) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def _short(name: str) -> str:
    """A module name short enough for a legend: the layer number and the last component."""
    parts = name.split(".")
    numbers = [p for p in parts if p.isdigit()]
    return f"L{numbers[-1]}.{parts[-1]}" if numbers else parts[-1]


def plot_rank_over_steps(records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], title: str = "") -> Path:
    """Fig. 7: numerical rank of every I(BA) against the step (dashed: full rank d), and its condition number.

    The rank of an inflated transform often sits at d throughout, so the second panel shows how far
    from singular it is (sigma_max / sigma_min, log scale), which the rank alone cannot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_cond) = plt.subplots(1, 2, figsize=(12.0, 4.5))
    series: dict[str, list[tuple[float, float, float]]] = {}
    dims: set[int] = set()
    for rec in records:
        key = rec["module"] + (f"[{rec['part']}]" if rec.get("part") is not None else "")
        cond = float(rec.get("cond", float("nan")))
        series.setdefault(key, []).append((float(rec["step"]), float(rec["rank"]), cond))
        dims.add(int(rec.get("d", rec.get("size", 0))))
    for key, points in sorted(series.items()):
        points.sort()
        steps = [p[0] for p in points]
        ax.plot(steps, [p[1] for p in points], marker=".", label=_short(key), alpha=0.8)
        ax_cond.plot(steps, [p[2] if np.isfinite(p[2]) else np.nan for p in points], marker=".", alpha=0.8)
    for d in sorted(dims):
        ax.axhline(d, color="k", linestyle="--", linewidth=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("numerical rank of I(BA)")
    ax.set_title(title or "Rank of I(BA) during training (dashed: full rank d)")
    ax_cond.set_yscale("log")
    ax_cond.set_xlabel("training step")
    ax_cond.set_ylabel("condition number of I(BA)")
    ax_cond.set_title("sigma_max / sigma_min (infinite values not drawn)")
    if len(series) <= 24:
        ax.legend(fontsize="x-small", ncol=3)
    return _save(fig, path)


def plot_singular_values(
    spectra: Mapping[str, Mapping[str, np.ndarray]], path: str | os.PathLike[str], title: str = ""
) -> Path:
    """Singular values of delta W, largest first, log scale: one colour per run, one line per module."""
    fig, ax = _figure()
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for i, (run, modules) in enumerate(spectra.items()):
        for j, (_, svals) in enumerate(sorted(modules.items())):
            values = np.maximum(np.asarray(svals, dtype=float), np.finfo(float).tiny)
            ax.semilogy(
                np.arange(1, values.size + 1),
                values,
                color=colours[i % len(colours)],
                alpha=0.4,
                label=run if j == 0 else None,
            )
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value s_i of delta W")
    ax.set_title(title or "Singular-value spectra of delta W (one line per module)")
    ax.legend(fontsize="small")
    return _save(fig, path)


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
    from .convergence import smooth

    fig, ax = _figure()
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
    return _save(fig, path)


def plot_module_bars(
    values: Mapping[str, Mapping[str, float | None]],
    path: str | os.PathLike[str],
    ylabel: str,
    title: str = "",
    log: bool = False,
) -> Path:
    """Grouped bars, one group per module, one bar per series (e.g. run vs random control)."""
    series = list(values)
    modules = sorted({m for s in values.values() for m in s})
    fig, ax = _figure(max(8.0, 0.35 * len(modules) * max(1, len(series))), 4.5)
    width = 0.8 / max(1, len(series))
    x = np.arange(len(modules))
    for i, name in enumerate(series):
        heights = [values[name].get(m) for m in modules]
        ax.bar(x + i * width, [np.nan if h is None else h for h in heights], width, label=name)
    ax.set_xticks(x + width * (len(series) - 1) / 2)
    ax.set_xticklabels([_short(m) for m in modules], rotation=60, ha="right", fontsize="x-small")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_lr_range(record: Mapping[str, Any], path: str | os.PathLike[str], title: str = "") -> Path:
    """The learning-rate range test: loss per step against the rate (log scale), smoothed, and the chosen rate."""
    fig, ax = _figure(7.0, 4.2)
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
    return _save(fig, path)
