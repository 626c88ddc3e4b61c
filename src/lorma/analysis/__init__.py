"""The paper's measurements as tools: rank of I(BA) and of delta W, delta W comparisons, convergence.

Submodules (imported lazily, so that ``lorma --help`` stays fast):

- :mod:`lorma.analysis.matrices`: numerical rank, singular-value summaries, delta W comparison metrics.
- :mod:`lorma.analysis.convergence`: loss AUC, % decrease against a reference, steps to reach its minimum.
- :mod:`lorma.analysis.callback`: ``RankTrackingCallback``, the rank of I(BA) during training.
- :mod:`lorma.analysis.deltas`: delta W per module from a live peft model or a saved adapter.
- :mod:`lorma.analysis.runs`: reading run directories (adapter, config, loss log, rank log).
- :mod:`lorma.analysis.report`: the measurements of ``lorma analyze`` for one run (and a reference run).
- :mod:`lorma.analysis.report_text`: the printed tables and summaries of ``lorma analyze``.
- :mod:`lorma.analysis.plots`: the PNG plots (matplotlib, Agg backend).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "numerical_rank": "matrices",
    "sv_summary": "matrices",
    "compare_matrices": "matrices",
    "random_control": "matrices",
    "loss_auc": "convergence",
    "auc_decrease_pct": "convergence",
    "steps_to_reach": "convergence",
    "convergence_table": "convergence",
    "RankTrackingCallback": "callback",
    "extract_deltas": "deltas",
    "load_adapter_model": "deltas",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use (PEP 562)."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
