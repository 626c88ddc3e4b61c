"""The printed report of ``lorma analyze`` (``analysis.txt``): one function per section of
:func:`lorma.analysis.report.analyze`'s result, joined by :func:`format_report`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lorma.runs.method_registry import label_of

__all__ = ["COMPARE_METRICS", "format_report"]

#: the delta W comparison metrics of Table 9, in the order they are shown
COMPARE_METRICS = ("frobenius_distance", "cosine", "sv_sq_diff", "eig_sq_diff", "angle_first", "angle_largest")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _stat(s: dict[str, Any]) -> str:
    """``mean [min, max]`` of a summary over modules."""
    return f"{_fmt(s['mean'])} [{_fmt(s['min'])}, {_fmt(s['max'])}]"


def _header(result: dict[str, Any]) -> list[str]:
    """Which runs, their notes, and the rank tolerance."""
    out = [f"run: {result['run']['path']} ({result['run']['label']})"]
    if "against" in result:
        out.append(f"against: {result['against']['path']} ({result['against']['label']})")
    out += [f"note: {note}" for note in result["run"].get("notes", [])]
    out += [f"note (against): {note}" for note in result.get("against", {}).get("notes", [])]
    tolerance = result["tolerance"]
    given = f"; given rtol = {tolerance['rtol']}" if tolerance["rtol"] is not None else ""
    out.append(f"rank tolerance: {tolerance['rule']}{given}")
    return out


def _module_method(m: dict[str, Any]) -> str:
    """The method of one module's adapter, labelled as :mod:`lorma.runs.method_registry` does
    (``lorma-plus-post``, ``lora``)."""
    if not m.get("inflation"):
        return m["method"]
    name = f"{m['method']}-{m['inflation']}"
    try:
        return label_of(name, {"side": m.get("side")})
    except ValueError:  # an inflation registered outside lorma (docs/extending.md): no method of its own
        return name + (f"-{m['side']}" if m.get("side") not in (None, "pre") else "")


def _modules_section(result: dict[str, Any]) -> list[str]:
    """Table 15: rank of delta W per module (and of the reference's), with the final I(BA)."""
    # a reference without an adapter (e.g. a full fine-tuning run) is compared on convergence only
    with_against = "modules" in result.get("against", {})
    headers = ["module", "method", "r", "rank dW", "rank dW (against)", "|dW|_F", "s_max dW", "rank I(BA)",
               "cond I(BA)"]
    rows = []
    for name, m in sorted(result["modules"].items()):
        if "delta_rank" not in m:
            continue
        transform = m.get("transform") or {}
        ref = result.get("against", {}).get("modules", {}).get(name)
        rows.append([
            name,
            _module_method(m),
            m["r"],
            f"{m['delta_rank']}/{m['delta_size']}",
            ref and f"{ref['delta_rank']}/{ref['delta_size']}",
            m["delta_norm"],
            m["delta_sv"]["sigma_max"],
            ", ".join(f"{t['rank']}/{t['d']}" for t in transform.values()) or None,
            max((t["cond"] for t in transform.values()), default=None),
        ])
    if not with_against:
        headers = headers[:4] + headers[5:]
        rows = [row[:4] + row[5:] for row in rows]
    return ["", "Per module: rank of delta W = W - W0 (Table 15) and of the final I(BA)", _table(headers, rows)]


def _comparison_section(result: dict[str, Any]) -> list[str]:
    """Table 9: delta W against the reference's, per module, beside the random control."""
    rows = []
    for name, c in sorted(result["comparison"].items()):
        for series in ("run", "control"):
            rows.append([name if series == "run" else "", "delta W" if series == "run" else "random control",
                         *(c[series][metric] for metric in COMPARE_METRICS)])
    headers = ["module", "matrix", "|X-Y|_F (low)", "cos (high)", "top-r sv sq diff (low)",
               "top-r |eig| sq diff (low)", "first angle (low)", "largest angle"]
    title = (f"Per module: delta W against {result['against']['label']}'s delta W (Table 9; r = the reference's "
             "rank; angles in radians between top-r left singular spaces)")
    return ["", title, _table(headers, rows)]


def _final_ranks_section(result: dict[str, Any]) -> list[str]:
    """The ranks a rank budget left per module (AdaLoRMA's final_ranks, AdaLoRA's rank_pattern)."""
    budgets = result["final_ranks"]
    run, against = budgets.get("run"), budgets.get("against")
    names = sorted(set(run or {}) | set(against or {}))
    rows = [[name, (run or {}).get(name), (against or {}).get(name)] for name in names]
    rows.append(["total", sum(run.values()) if run is not None else None,
                 sum(against.values()) if against is not None else None])
    headers = ["module", "final rank"] + (["final rank (against)"] if against is not None else [])
    title = "Per module: the rank the rank budget left (AdaLoRMA's final_ranks, AdaLoRA's rank_pattern)"
    return ["", title, _table(headers, [row[: len(headers)] for row in rows])]


def _rank_log_section(result: dict[str, Any]) -> list[str]:
    """Fig. 7 as numbers: the rank of I(BA) during training, per module."""
    rows = [[k, v["d"], v["min_rank"], v["final_rank"], v["final_step"], v["final_cond"], v["steps"]]
            for k, v in sorted(result["rank_log"]["modules"].items())]
    headers = ["module", "d", "min rank", "final rank", "final step", "final cond", "records"]
    return ["", "Rank of I(BA) during training (Fig. 7, from rank_log.jsonl)", _table(headers, rows)]


def _convergence_section(result: dict[str, Any]) -> list[str]:
    """Table 5 / Fig. 6: loss AUC, its decrease against the reference, and steps to the reference's minimum."""
    rows = [[k, v.get("auc"), v.get("auc_decrease_pct"), v.get("min_loss"), v.get("steps_to_ref_min"),
             v.get("speedup")] for k, v in result["convergence"].items()]
    first = next(iter(result["convergence"].values()), {})
    ref_note = (
        f" against {first['reference']} (its smoothed minimum {_fmt(first['reference_min_loss'])} at step "
        f"{_fmt(first['reference_min_step'])}; AUC up to step {_fmt(first['auc_max_step'])})"
        if "reference" in first else ""
    )
    headers = ["run", "loss AUC", "% AUC decrease", "min loss", "step at ref min", "speedup"]
    return ["", f"Convergence (Table 5, Fig. 6; smoothing {result['smoothing']}){ref_note}", _table(headers, rows)]


def _summary_section(result: dict[str, Any]) -> list[str]:
    """Means over modules, with their range."""
    summary = result["summary"]
    s = summary["delta_rank"]
    out = ["", "Summary over modules (mean [min, max])",
           f"  rank of delta W ({result['run']['label']}): {_stat(s)} over {s['n']} modules"]
    if "against_delta_rank" in summary:
        out.append(f"  rank of delta W ({result['against']['label']}): {_stat(summary['against_delta_rank'])}")
    if "comparison" in summary:
        run, control = summary["comparison"]["run"], summary["comparison"]["control"]
        rows = [[metric, _stat(run[metric]), _stat(control[metric])] for metric in COMPARE_METRICS]
        out.append(_table(["metric", "delta W vs reference", "random control vs reference"], rows))
    return out


def format_report(result: dict[str, Any]) -> str:
    """The printed tables: per module, then the summary over modules."""
    out = _header(result)
    if "modules" in result:
        out += _modules_section(result)
    if "comparison" in result:
        out += _comparison_section(result)
    if "final_ranks" in result:
        out += _final_ranks_section(result)
    if "rank_log" in result:
        out += _rank_log_section(result)
    if "convergence" in result:
        out += _convergence_section(result)
    if result.get("summary"):
        out += _summary_section(result)
    if result.get("plots"):
        out += ["", "plots: " + ", ".join(result["plots"])]
    return "\n".join(out) + "\n"
