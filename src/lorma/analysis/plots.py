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

from lorma.runs.plots import new_figure, save_figure

__all__ = ["plot_rank_over_steps", "plot_singular_values", "plot_module_bars"]


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
    return save_figure(fig, path)


def plot_singular_values(
    spectra: Mapping[str, Mapping[str, np.ndarray]], path: str | os.PathLike[str], title: str = ""
) -> Path:
    """Singular values of delta W, largest first, log scale: one colour per run, one line per module."""
    fig, ax = new_figure()
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
    return save_figure(fig, path)


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
    fig, ax = new_figure(max(8.0, 0.35 * len(modules) * max(1, len(series))), 4.5)
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
    return save_figure(fig, path)


