"""The paper's measurements as tools: rank of I(BA) and of delta W, delta W comparisons, convergence.

Submodules (imported lazily, so that ``lorma --help`` stays fast):

- :mod:`lorma.analysis.matrices`: delta W comparison metrics (on :mod:`lorma.runs.spectrum`'s numerical rank and
  singular-value summaries, which training records too).
- :mod:`lorma.analysis.convergence`: % decrease of the loss AUC against a reference, steps to reach its minimum
  (on :mod:`lorma.runs.loss_curve`'s loss AUC, which training records).
- :mod:`lorma.analysis.deltas`: delta W per module from a live peft model or a saved adapter.
- :mod:`lorma.analysis.runs`: reading run directories (adapter, config, loss log, rank log).
- :mod:`lorma.analysis.report`: the measurements of ``lorma analyze`` for one run (and a reference run).
- :mod:`lorma.analysis.report_text`: the printed tables and summaries of ``lorma analyze``.
- :mod:`lorma.analysis.plots`: the PNG plots (matplotlib, Agg backend).

``RankTrackingCallback`` (the rank of I(BA) during training) is :mod:`lorma.runs.rank_log`'s: training records it.
The names below are importable from here for convenience; each is defined in the module it maps to.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "numerical_rank": "lorma.runs.spectrum",
    "sv_summary": "lorma.runs.spectrum",
    "compare_matrices": "lorma.analysis.matrices",
    "random_control": "lorma.analysis.matrices",
    "loss_auc": "lorma.runs.loss_curve",
    "auc_decrease_pct": "lorma.analysis.convergence",
    "steps_to_reach": "lorma.analysis.convergence",
    "convergence_table": "lorma.analysis.convergence",
    "RankTrackingCallback": "lorma.runs.rank_log",
    "extract_deltas": "lorma.analysis.deltas",
    "load_adapter_model": "lorma.analysis.deltas",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use (PEP 562)."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
