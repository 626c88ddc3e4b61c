"""``lorma analyze``'s work: measure one run (and optionally compare it with another), tables and plots.

:func:`analyze` returns a JSON-ready dict; :func:`format_report` turns it into the printed tables. The
measurements are those of :mod:`lorma.analysis.matrices` and :mod:`lorma.analysis.convergence`:

* per module of the run: rank of delta W (Table 15) with its singular-value summary, and for LoRMA
  layers the rank of the final I(BA);
* with ``against``: delta W of the run against delta W of the other run (Table 9) per module, next
  to a random matrix of the run's delta W norm compared against the same reference (the control);
* with loss logs: loss AUC, % decrease against ``against`` and steps to reach its minimum (Table 5,
  Fig. 6);
* with a ``rank_log.jsonl``: the rank of I(BA) over training (Fig. 7), min / final per module.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorma.fileio import atomic_write_json, atomic_write_text

from .convergence import Smoothing, convergence_table, loss_auc, smooth
from .matrices import compare_matrices, random_control, singular_values, summarise, sv_summary
from .runs import RunInfo, final_ranks, read_run

__all__ = ["analyze", "format_report", "OUTPUT_NAMES"]

OUTPUT_NAMES = (
    "analysis.json",
    "analysis.txt",
    "delta_rank.png",
    "delta_spectra.png",
    "rank_over_steps.png",
    "loss_curves.png",
    "comparison_frobenius.png",
    "comparison_cosine.png",
    "comparison_angle.png",
    "final_ranks.png",
)

_COMPARE_METRICS = ("frobenius_distance", "cosine", "sv_sq_diff", "eig_sq_diff", "angle_first", "angle_largest")


def _measure_model(run: RunInfo, base_model: str | None, rtol: float | None) -> tuple[dict[str, Any], str]:
    """Deltas (numpy, for comparisons) and per-module measurements of one run's adapter."""
    from .callback import rank_records
    from .deltas import extract_deltas, load_adapter_model, resolve_base_model

    if run.adapter_dir is None:
        raise ValueError(f"{run.path}: no saved adapter (adapter_config.json) found in the run directory")
    base = resolve_base_model(run.adapter_dir, base_model, run.base_model_hint)
    model = load_adapter_model(run.adapter_dir, base)
    deltas = extract_deltas(model)
    transforms = {}
    for rec in rank_records(model, rtol=rtol):
        key = rec["module"] + (f"[{rec['part']}]" if rec["part"] is not None else "")
        transforms[key] = rec
    del model
    modules: dict[str, Any] = {}
    arrays: dict[str, Any] = {}
    for name, md in deltas.items():
        summary = sv_summary(md.delta, rtol=rtol, name=f"delta W of {name}")
        arrays[name] = {"delta": md.delta.double().numpy(), "r": md.r, "svals": singular_values(md.delta)}
        modules[name] = {
            "method": md.method,
            "r": md.r,
            "inflation": md.inflation,
            "side": md.side,
            "shape": list(md.delta.shape),
            "delta_rank": summary.rank,
            "delta_size": summary.size,
            "delta_norm": float(math.sqrt(float((md.delta.double() ** 2).sum()))),
            "delta_sv": summary.as_dict(),
        }
    for key, rec in transforms.items():
        base_key = key.split("[")[0]
        entry = modules.setdefault(base_key, {})
        entry.setdefault("transform", {})[key] = {
            k: rec[k] for k in ("d", "rank", "rtol", "tol", "sigma_max", "sigma_min", "cond")
        }
    return {"modules": modules, "arrays": arrays}, base


def _rank_log_summary(path: Path) -> dict[str, Any]:
    from .callback import read_rank_log

    records = read_rank_log(path)
    per: dict[str, dict[str, Any]] = {}
    for rec in records:
        key = rec["module"] + (f"[{rec['part']}]" if rec.get("part") is not None else "")
        entry = per.setdefault(key, {"d": rec.get("d"), "min_rank": rec["rank"], "steps": 0})
        entry["min_rank"] = min(entry["min_rank"], rec["rank"])
        entry["steps"] += 1
        entry["final_rank"] = rec["rank"]
        entry["final_step"] = rec["step"]
        entry["final_cond"] = rec.get("cond")
    return {"records": records, "modules": per}


def analyze(
    run_dir: str | Path,
    against: str | Path | None = None,
    base_model: str | None = None,
    against_base_model: str | None = None,
    out_dir: str | Path | None = None,
    rtol: float | None = None,
    smoothing: Smoothing = 5,
    seed: int = 0,
    plots: bool = True,
) -> dict[str, Any]:
    """Measure ``run_dir`` (and compare with ``against``); write ``analysis.json``/``.txt`` and PNGs to ``out_dir``.

    ``rtol`` is the relative rank tolerance (None: ``max(m, n) * eps(float32)``, the deltas being
    float32). ``against_base_model`` defaults to ``base_model``. ``seed`` seeds the random controls
    (module ``i`` in sorted order uses ``seed`` + a CRC of its name, so controls do not depend on which
    other modules are present).
    """
    run = read_run(run_dir)
    other = read_run(against) if against is not None else None
    result: dict[str, Any] = {
        "run": {
            "path": str(run.path),
            "label": run.label,
            "notes": run.notes,
            "loss_log": str(run.loss_source) if run.loss_source else None,
        },
        "tolerance": {
            "rtol": rtol,
            "rule": "rank = #singular values > rtol * sigma_max; rtol default max(m, n) * eps of the matrix's "
            "dtype (float32 here)",
        },
        "smoothing": smoothing,
    }
    measured = None
    if run.adapter_dir is not None:
        measured, base = _measure_model(run, base_model, rtol)
        result["run"]["base_model"] = base
        result["run"]["adapter_dir"] = str(run.adapter_dir)
        result["modules"] = measured["modules"]
        result["summary"] = {
            "delta_rank": summarise({k: v["delta_rank"] for k, v in measured["modules"].items() if "delta_rank" in v}),
        }
    if run.rank_log is not None:
        result["rank_log"] = _rank_log_summary(run.rank_log)
    budget = final_ranks(run.adapter_config)
    if budget is not None:  # AdaLoRMA / AdaLoRA: the ranks the budget left, as saved with the adapter
        result["final_ranks"] = {"run": budget}
    if other is not None:
        result["against"] = {
            "path": str(other.path),
            "label": other.label,
            "notes": other.notes,
            "loss_log": str(other.loss_source) if other.loss_source else None,
        }
        if measured is not None and other.adapter_dir is None:
            result["against"]["notes"] = [*other.notes, "delta W is not compared (no adapter); convergence is"]
        other_budget = final_ranks(other.adapter_config)
        if other_budget is not None:
            result.setdefault("final_ranks", {})["against"] = other_budget
        if measured is not None and other.adapter_dir is not None:
            ref, ref_base = _measure_model(other, against_base_model or base_model, rtol)
            result["against"]["base_model"] = ref_base
            result["against"]["modules"] = ref["modules"]
            result["comparison"] = _compare(measured["arrays"], ref["arrays"], seed)
            result["summary"]["comparison"] = {
                series: {
                    m: summarise({k: v[series][m] for k, v in result["comparison"].items()}) for m in _COMPARE_METRICS
                }
                for series in ("run", "control")
            }
            result["summary"]["against_delta_rank"] = summarise({k: v["delta_rank"] for k, v in ref["modules"].items()})
        else:
            ref = None
        curves = {}
        if run.loss_curve and other.loss_curve:
            run_key = run.label if run.label != other.label else f"{run.label} (run)"
            curves = {run_key: run.loss_curve, other.label: other.loss_curve}
            result["convergence"] = convergence_table(curves, reference=other.label, smoothing=smoothing)
    else:
        ref = None
        curves = {}
        if run.loss_curve:
            steps, losses = run.loss_curve
            curves = {run.label: run.loss_curve}
            result["convergence"] = {
                run.label: {
                    "auc": loss_auc(steps, losses, smoothing),
                    "min_loss": float(smooth(losses, smoothing).min()),
                    "last_step": steps[-1],
                }
            }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if plots:
            result["plots"] = [str(p) for p in _plots(out, run, other, measured, ref, result, curves, smoothing)]
        atomic_write_text(out / "analysis.txt", format_report(result))
        atomic_write_json(out / "analysis.json", _without_records(result))
    return result


def _without_records(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON written to disk: the rank log's raw records stay in rank_log.jsonl."""
    if "rank_log" not in result:
        return result
    trimmed = dict(result)
    trimmed["rank_log"] = {"modules": result["rank_log"]["modules"]}
    return trimmed


def _compare(run_arrays: dict[str, Any], ref_arrays: dict[str, Any], seed: int) -> dict[str, Any]:
    common = sorted(set(run_arrays) & set(ref_arrays))
    if not common:
        raise ValueError(
            "the two runs adapt no module in common (run: "
            f"{', '.join(sorted(run_arrays)[:3])}...; against: {', '.join(sorted(ref_arrays)[:3])}...)"
        )
    rows: dict[str, Any] = {}
    for name in common:
        x, y = run_arrays[name]["delta"], ref_arrays[name]["delta"]
        if x.shape != y.shape:
            raise ValueError(f"module {name}: delta W shapes differ ({x.shape} vs {y.shape}): different base models?")
        r = int(ref_arrays[name]["r"])  # the reference's rank, as the paper uses LoRA's r for Table 9
        norm = float((x**2).sum() ** 0.5)
        control = random_control(x.shape, norm, seed=seed + zlib.crc32(name.encode()))
        rows[name] = {
            "r": r,
            "run": compare_matrices(x, y, r=r, names=(f"delta W of {name}", "reference delta W")).as_dict(),
            "control": compare_matrices(control, y, r=r, names=("random control", "reference delta W")).as_dict(),
        }
    return rows


def _plots(
    out: Path,
    run: RunInfo,
    other: RunInfo | None,
    measured: dict[str, Any] | None,
    ref: dict[str, Any] | None,
    result: dict[str, Any],
    curves: dict[str, Any],
    smoothing: Smoothing,
) -> list[Path]:
    from . import plots

    written: list[Path] = []
    if measured is not None:
        ranks = {run.label: {k: v.get("delta_rank") for k, v in measured["modules"].items() if "delta_rank" in v}}
        spectra = {run.label: {k: v["svals"] for k, v in measured["arrays"].items()}}
        if ref is not None and other is not None:
            label = other.label if other.label != run.label else f"{other.label} (against)"
            ranks[label] = {k: v.get("delta_rank") for k, v in ref["modules"].items()}
            spectra[label] = {k: v["svals"] for k, v in ref["arrays"].items()}
        written.append(
            plots.plot_module_bars(
                ranks, out / "delta_rank.png", "numerical rank of delta W", "Rank of delta W = W - W0 per module"
            )
        )
        written.append(plots.plot_singular_values(spectra, out / "delta_spectra.png"))
    if "final_ranks" in result:
        budgets = {run.label: result["final_ranks"].get("run", {})}
        if other is not None and "against" in result["final_ranks"]:
            budgets[other.label if other.label != run.label else f"{other.label} (against)"] = result["final_ranks"][
                "against"
            ]
        written.append(
            plots.plot_module_bars(budgets, out / "final_ranks.png", "rank after the budget",
                                   "Final rank per module (rank budget)")
        )
    if "rank_log" in result:
        written.append(
            plots.plot_rank_over_steps(
                result["rank_log"]["records"],
                out / "rank_over_steps.png",
                f"Rank of I(BA) during training: {run.label}",
            )
        )
    if curves:
        written.append(
            plots.plot_loss_curves(
                curves, out / "loss_curves.png", result.get("convergence") if other is not None else None, smoothing
            )
        )
    if "comparison" in result:
        comp = result["comparison"]
        for metric, fname, log in (
            ("frobenius_distance", "comparison_frobenius.png", True),
            ("cosine", "comparison_cosine.png", False),
            ("angle_first", "comparison_angle.png", False),
        ):
            values = {series: {m: comp[m][series][metric] for m in comp} for series in ("run", "control")}
            values = {
                f"{run.label} vs {other.label}" if s == "run" else f"random vs {other.label}": v
                for s, v in values.items()
            }
            written.append(plots.plot_module_bars(values, out / fname, metric, f"delta W: {metric}", log=log))
    return written


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


def format_report(result: dict[str, Any]) -> str:
    """The printed tables: per module, then the summary over modules."""
    out: list[str] = [f"run: {result['run']['path']} ({result['run']['label']})"]
    if "against" in result:
        out.append(f"against: {result['against']['path']} ({result['against']['label']})")
    for note in result["run"].get("notes", []):
        out.append(f"note: {note}")
    for note in result.get("against", {}).get("notes", []):
        out.append(f"note (against): {note}")
    # a reference without an adapter (e.g. a full fine-tuning run) is compared on convergence only
    per_module_against = "modules" in result.get("against", {})
    out.append(
        "rank tolerance: "
        + result["tolerance"]["rule"]
        + (f"; given rtol = {result['tolerance']['rtol']}" if result["tolerance"]["rtol"] is not None else "")
    )
    if "modules" in result:
        rows = []
        for name, m in sorted(result["modules"].items()):
            if "delta_rank" not in m:
                continue
            transform = m.get("transform") or {}
            t_rank = ", ".join(f"{t['rank']}/{t['d']}" for t in transform.values()) or None
            t_cond = max((t["cond"] for t in transform.values()), default=None)
            ref = result.get("against", {}).get("modules", {}).get(name)
            row = [
                name,
                m["method"]
                + (f"-{m['inflation']}" if m.get("inflation") else "")
                + ("-post" if m.get("side") == "post" else ""),
                m["r"],
                f"{m['delta_rank']}/{m['delta_size']}",
                ref and f"{ref['delta_rank']}/{ref['delta_size']}",
                m["delta_norm"],
                m["delta_sv"]["sigma_max"],
                t_rank,
                t_cond,
            ]
            rows.append(row if per_module_against else row[:4] + row[5:])
        headers = [
            "module",
            "method",
            "r",
            "rank dW",
            "rank dW (against)",
            "|dW|_F",
            "s_max dW",
            "rank I(BA)",
            "cond I(BA)",
        ]
        out += [
            "",
            "Per module: rank of delta W = W - W0 (Table 15) and of the final I(BA)",
            _table(headers if per_module_against else headers[:4] + headers[5:], rows),
        ]
    if "comparison" in result:
        rows = []
        for name, c in sorted(result["comparison"].items()):
            for series in ("run", "control"):
                v = c[series]
                rows.append(
                    [
                        name if series == "run" else "",
                        "delta W" if series == "run" else "random control",
                        v["frobenius_distance"],
                        v["cosine"],
                        v["sv_sq_diff"],
                        v["eig_sq_diff"],
                        v["angle_first"],
                        v["angle_largest"],
                    ]
                )
        out += [
            "",
            f"Per module: delta W against {result['against']['label']}'s delta W (Table 9; r = the "
            f"reference's rank; angles in radians between top-r left singular spaces)",
            _table(
                [
                    "module",
                    "matrix",
                    "|X-Y|_F (low)",
                    "cos (high)",
                    "top-r sv sq diff (low)",
                    "top-r |eig| sq diff (low)",
                    "first angle (low)",
                    "largest angle",
                ],
                rows,
            ),
        ]
    if "final_ranks" in result:
        budgets = result["final_ranks"]
        names = sorted(set(budgets.get("run", {})) | set(budgets.get("against", {})))
        rows = [[name, budgets.get("run", {}).get(name), budgets.get("against", {}).get(name)] for name in names]
        rows.append(["total", sum(budgets.get("run", {}).values()) if "run" in budgets else None,
                     sum(budgets.get("against", {}).values()) if "against" in budgets else None])
        headers = ["module", "final rank"] + (["final rank (against)"] if "against" in budgets else [])
        out += [
            "",
            "Per module: the rank the rank budget left (AdaLoRMA's final_ranks, AdaLoRA's rank_pattern)",
            _table(headers, [row[: len(headers)] for row in rows]),
        ]
    if "rank_log" in result:
        rows = [
            [k, v["d"], v["min_rank"], v["final_rank"], v["final_step"], v["final_cond"], v["steps"]]
            for k, v in sorted(result["rank_log"]["modules"].items())
        ]
        out += [
            "",
            "Rank of I(BA) during training (Fig. 7, from rank_log.jsonl)",
            _table(["module", "d", "min rank", "final rank", "final step", "final cond", "records"], rows),
        ]
    if "convergence" in result:
        rows = [
            [k, v.get("auc"), v.get("auc_decrease_pct"), v.get("min_loss"), v.get("steps_to_ref_min"), v.get("speedup")]
            for k, v in result["convergence"].items()
        ]
        first = next(iter(result["convergence"].values()), {})
        ref_note = (
            f" against {first['reference']} (its smoothed minimum {_fmt(first['reference_min_loss'])} at step "
            f"{_fmt(first['reference_min_step'])}; AUC up to step {_fmt(first['auc_max_step'])})"
            if "reference" in first
            else ""
        )
        out += [
            "",
            f"Convergence (Table 5, Fig. 6; smoothing {result['smoothing']}){ref_note}",
            _table(["run", "loss AUC", "% AUC decrease", "min loss", "step at ref min", "speedup"], rows),
        ]
    summary = result.get("summary", {})
    if summary:
        out += ["", "Summary over modules (mean [min, max])"]
        s = summary["delta_rank"]
        out.append(
            f"  rank of delta W ({result['run']['label']}): {_fmt(s['mean'])} [{_fmt(s['min'])}, "
            f"{_fmt(s['max'])}] over {s['n']} modules"
        )
        if "against_delta_rank" in summary:
            s = summary["against_delta_rank"]
            out.append(
                f"  rank of delta W ({result['against']['label']}): {_fmt(s['mean'])} [{_fmt(s['min'])}, "
                f"{_fmt(s['max'])}]"
            )
        if "comparison" in summary:
            rows = []
            for metric in _COMPARE_METRICS:
                r_, c_ = summary["comparison"]["run"][metric], summary["comparison"]["control"][metric]
                rows.append(
                    [
                        metric,
                        f"{_fmt(r_['mean'])} [{_fmt(r_['min'])}, {_fmt(r_['max'])}]",
                        f"{_fmt(c_['mean'])} [{_fmt(c_['min'])}, {_fmt(c_['max'])}]",
                    ]
                )
            out.append(_table(["metric", "delta W vs reference", "random control vs reference"], rows))
    if result.get("plots"):
        out += ["", "plots: " + ", ".join(result["plots"])]
    return "\n".join(out) + "\n"
